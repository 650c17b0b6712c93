// Identities: the registration entries, 50 a page, searched on the server. With 10,000 entries
// the browser never holds more than one page: the search box and the pager each ask the CA for
// exactly the rows to show. The query and page live in the URL (#/identities?q=web&page=3), so
// a reload or a shared link shows the same rows.

import { getJson, withQuery } from "../api";
import { breakable, h, on, replace, table } from "../dom";
import { Page } from "../page";
import { identities, type Identities, type Identity } from "../schema";
import { duration, when } from "../time";

export const PER_PAGE = 50;
const DEBOUNCE_MS = 300;

function pages(total: number, perPage: number): number {
  return Math.max(1, Math.ceil(total / Math.max(1, perPage)));
}

export class IdentitiesPage extends Page<Identities> {
  private q: string;
  private page: number;
  private debounce: number | null = null;
  private readonly search: HTMLInputElement;
  private readonly prev: HTMLButtonElement;
  private readonly next: HTMLButtonElement;
  private readonly status = h("span", { class: "pager-status", "data-testid": "identities-pager", "aria-live": "polite" }, "loading\u2026");
  private readonly body = h("div", {});

  constructor(params: URLSearchParams) {
    super("identities", "Identities");
    this.q = params.get("q") ?? "";
    const p = Number(params.get("page") ?? "1");
    this.page = Number.isInteger(p) && p >= 1 ? p : 1;

    this.search = on(
      h("input", {
        id: "identities-search",
        type: "search",
        "data-testid": "identities-search",
        placeholder: "SPIFFE ID, parent ID, selector or entry ID",
        autocomplete: "off",
        spellcheck: "false",
        value: this.q,
      }),
      {
        input: () => this.scheduleSearch(),
        keydown: (ev) => {
          if (ev.key === "Enter") {
            ev.preventDefault();
            this.runSearch();
          }
        },
      },
    );
    this.search.value = this.q;
    this.prev = on(h("button", { type: "button", "data-testid": "identities-prev" }, "\u2190 Previous"), {
      click: () => this.go(this.page - 1),
    });
    this.next = on(h("button", { type: "button", "data-testid": "identities-next" }, "Next \u2192"), {
      click: () => this.go(this.page + 1),
    });
    this.prev.disabled = true;
    this.next.disabled = true;

    this.root.append(
      h(
        "div",
        { class: "toolbar" },
        h(
          "div",
          { class: "field grow", role: "search" },
          h("label", { for: "identities-search" }, "Search"),
          this.search,
        ),
        h("nav", { class: "pager", "aria-label": "Identities pages" }, this.prev, this.status, this.next),
      ),
      this.body,
    );
  }

  protected fetch(signal: AbortSignal): Promise<Identities> {
    const path = withQuery("/api/identities", { q: this.q, page: this.page, per_page: PER_PAGE });
    return getJson(path, identities, signal);
  }

  protected render(data: Identities): void {
    const last = pages(data.total, data.per_page);
    if (data.items.length === 0 && this.page > last) {
      // Entries went away under us: show the last page that exists.
      this.go(last);
      return;
    }
    this.page = data.page;
    this.prev.disabled = data.page <= 1;
    this.next.disabled = data.page >= last;
    replace(
      this.status,
      `page ${data.page} of ${last} (${data.total.toLocaleString("en-US")} ${data.total === 1 ? "entry" : "entries"})`,
    );
    replace(
      this.body,
      table(
        { class: "data identities", "data-testid": "identities" },
        null,
        ["SPIFFE ID and parent", "Selectors", "DNS names", { num: "TTL" }, "Latest X509-SVID", "Issued", "Expires", "Last rotation"],
        data.items.map(row),
        this.q ? `No entry matches \u201c${this.q}\u201d.` : "No registration entries.",
      ),
    );
  }

  override dispose(): void {
    if (this.debounce !== null) window.clearTimeout(this.debounce);
    super.dispose();
  }

  private scheduleSearch(): void {
    if (this.debounce !== null) window.clearTimeout(this.debounce);
    this.debounce = window.setTimeout(() => this.runSearch(), DEBOUNCE_MS);
  }

  private runSearch(): void {
    if (this.debounce !== null) window.clearTimeout(this.debounce);
    this.debounce = null;
    const q = this.search.value.trim();
    if (q === this.q && this.root.dataset["loaded"] === "true") return;
    this.q = q;
    this.go(1);
  }

  private go(page: number): void {
    this.page = Math.max(1, page);
    // Keep the URL in step without a hashchange (which would rebuild the page and its input).
    const hash = withQuery("#/identities", { q: this.q, page: this.page > 1 ? this.page : null });
    history.replaceState(null, "", hash);
    void this.refresh();
  }
}

function row(e: Identity): HTMLTableRowElement {
  const svid = e.svid;
  return h(
    "tr",
    { "data-testid": "identity-row", "data-entry-id": e.entry_id, class: svid?.tainted ? "tainted" : null },
    h(
      "td",
      { class: "id" },
      h("span", { class: "mono strong", title: `entry ${e.entry_id}` }, breakable(e.spiffe_id)),
      e.admin ? [" ", h("span", { class: "badge" }, "admin")] : null,
      h("span", { class: "sub mono", title: "parent ID" }, "\u21b3 ", breakable(e.parent_id)),
    ),
    h("td", {}, e.selectors.map((sel) => h("code", { class: "chip" }, sel))),
    h("td", {}, e.dns_names.length ? e.dns_names.map((d) => h("code", { class: "chip" }, d)) : "\u2014"),
    h("td", { class: "num" }, e.x509_ttl_s === null ? h("span", { class: "muted" }, "default") : duration(e.x509_ttl_s)),
    h(
      "td",
      { class: "nowrap" },
      svid
        ? [
            h("span", { class: "mono" }, svid.serial),
            h("span", { class: "sub" }, "by ", h("span", { class: "mono" }, svid.issuer), svid.tainted ? [" ", h("span", { class: "badge tainted" }, "tainted")] : null),
          ]
        : h("span", { class: "muted" }, "none issued"),
    ),
    h("td", {}, svid ? when(svid.issued_at) : "\u2014"),
    h("td", {}, svid ? when(svid.not_after) : "\u2014"),
    h("td", {}, when(e.last_rotation)),
  );
}
