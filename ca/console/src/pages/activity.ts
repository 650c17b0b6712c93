// Activity: the CA's latest audit records (newest first) and the denials the proxies reported.

import { getJson } from "../api";
import { breakable, h, on, replace, table } from "../dom";
import { Page } from "../page";
import { activity, type ActivityRecord, type Denial } from "../schema";
import { when } from "../time";

type Activity = { records: ActivityRecord[]; denials: Denial[]; denials_reported: boolean | null };
type Filter = "all" | "issuance" | "admin" | "revocation";

const LIMIT = 100;

/** Which filter a record kind falls under. */
export function category(kind: string): Exclude<Filter, "all"> {
  if (kind.startsWith("svid.x509.") || kind.startsWith("svid.jwt.")) return "issuance";
  if (kind === "svid.revoked") return "revocation";
  return "admin";
}

export class ActivityPage extends Page<Activity> {
  private readonly filter: HTMLSelectElement;
  private readonly records = h("div", {});
  private readonly denials = h("div", {});
  private last: Activity | null = null;

  constructor() {
    super("activity", "Activity");
    this.filter = on(
      h(
        "select",
        { id: "activity-filter", "data-testid": "activity-filter" },
        h("option", { value: "all" }, "all records"),
        h("option", { value: "issuance" }, "issuances (svid.x509.*, svid.jwt.*)"),
        h("option", { value: "admin" }, "admin changes and other records"),
        h("option", { value: "revocation" }, "revocations (svid.revoked)"),
      ),
      { change: () => this.drawRecords() },
    );
    this.root.append(
      h(
        "section",
        { "aria-labelledby": "h-records" },
        h(
          "div",
          { class: "section-head" },
          h("h3", { id: "h-records" }, "Audit records"),
          h("label", { for: "activity-filter" }, "Show "),
          this.filter,
        ),
        this.records,
      ),
      h(
        "section",
        { "aria-labelledby": "h-denials" },
        h("h3", { id: "h-denials" }, "Denied calls"),
        this.denials,
      ),
    );
  }

  protected fetch(signal: AbortSignal): Promise<Activity> {
    return getJson(`/api/activity?limit=${LIMIT}`, activity, signal);
  }

  protected render(a: Activity): void {
    this.last = a;
    this.drawRecords();
    replace(
      this.denials,
      table(
        { class: "data", "data-testid": "denials" },
        null,
        ["Caller", "Callee", "Rule", { num: "Count" }, "Last denied"],
        a.denials.map((d) =>
          h(
            "tr",
            { "data-testid": "denial-row" },
            d.caller === ""
              ? h("td", { class: "muted" }, "unverified (handshake refused)")
              : h("td", { class: "mono id" }, breakable(d.caller)),
            h("td", { class: "mono id" }, breakable(d.callee)),
            h("td", { class: d.rule === "<default>" || d.rule === "(default)" ? "muted" : "mono" }, d.rule),
            h("td", { class: "num" }, d.count),
            h("td", {}, when(d.last_at)),
          ),
        ),
        a.denials_reported === false
          ? "No proxy reports its denials to the CA yet."
          : "No denied calls reported.",
      ),
    );
  }

  private drawRecords(): void {
    const a = this.last;
    if (!a) return;
    const f = this.filter.value as Filter;
    const shown = f === "all" ? a.records : a.records.filter((r) => category(r.kind) === f);
    replace(
      this.records,
      h("p", { class: "counts" }, `Showing ${shown.length} of the latest ${a.records.length} records, newest first.`),
      table(
        { class: "data", "data-testid": "activity" },
        null,
        [{ num: "Seq" }, "Time", "Kind", "Actor", "Summary"],
        shown.map((r) =>
          h(
            "tr",
            { "data-testid": "activity-row", "data-kind": r.kind, "data-seq": r.seq, class: `cat-${category(r.kind)}` },
            h("td", { class: "num" }, r.seq),
            h("td", {}, when(r.time)),
            h("td", {}, h("code", {}, r.kind)),
            h("td", { class: "mono" }, r.actor),
            h("td", { class: "summary" }, r.summary),
          ),
        ),
        f === "all" ? "No audit records yet." : "No records of this kind among the latest.",
      ),
    );
  }
}
