// Overview: the trust domain at a glance, the signing keys' lifetimes on a timeline, the
// rotation in progress, and tainted keys with how many SVIDs they still sign.

import { getJson } from "../api";
import { h, on, replace, table } from "../dom";
import { Page } from "../page";
import { overview, type Key, type Overview, type Taint } from "../schema";
import { setTrustDomain } from "../shell";
import { clock, duration, when } from "../time";
import { timeline, token, type Zoom } from "../timeline";

const ZOOMS: readonly (readonly [string, string])[] = [
  ["issuing", "intermediate and JWT key lifetimes"],
  ["all", "all lifetimes, roots included"],
  [String(365 * 86400), "now \u00b1 1 year"],
  [String(30 * 86400), "now \u00b1 30 days"],
  [String(7 * 86400), "now \u00b1 7 days"],
  [String(86400), "now \u00b1 1 day"],
];

export class OverviewPage extends Page<Overview> {
  private readonly summary = h("div", { class: "summary" });
  private readonly chart = h("div", { class: "chart" });
  private readonly keys = h("div", {});
  private readonly taints = h("div", {});
  private readonly zoom: HTMLSelectElement;
  private last: Overview | null = null;

  constructor() {
    super("overview", "Overview");
    this.zoom = on(
      h(
        "select",
        { id: "timeline-zoom", "data-testid": "timeline-zoom" },
        ZOOMS.map(([v, label]) => h("option", { value: v }, label)),
      ),
      { change: () => this.drawChart() },
    );
    this.root.append(
      this.summary,
      h(
        "section",
        { "aria-labelledby": "h-keys" },
        h(
          "div",
          { class: "section-head" },
          h("h3", { id: "h-keys" }, "Signing keys"),
          h("label", { for: "timeline-zoom" }, "Show "),
          this.zoom,
        ),
        this.chart,
        h(
          "p",
          { class: "legend" },
          ["active", "prepared", "retired", "expired"].map((st) =>
            h("span", { class: `swatch state-${st}` }, st),
          ),
          h("span", { class: "swatch tainted" }, "tainted"),
          h("span", { class: "swatch now" }, "now"),
        ),
        this.keys,
      ),
      h("section", { "aria-labelledby": "h-taints" }, h("h3", { id: "h-taints" }, "Tainted keys"), this.taints),
    );
  }

  protected fetch(signal: AbortSignal): Promise<Overview> {
    return getJson("/api/overview", overview, signal);
  }

  protected render(o: Overview): void {
    clock.observe(o.now);
    setTrustDomain(o.trust_domain);
    this.last = o;
    replace(this.summary, summary(o));
    this.drawChart();
    replace(this.keys, keyTable(o.keys));
    replace(this.taints, taintTable(o.taints));
  }

  private drawChart(): void {
    const o = this.last;
    if (!o) return;
    if (o.keys.length === 0) {
      replace(this.chart, h("p", { class: "muted" }, "No signing keys yet."));
      return;
    }
    const tainted = new Map<string, number>();
    for (const k of o.keys) {
      const at = taintedAt(k);
      if (at !== null) tainted.set(k.id, at);
    }
    for (const t of o.taints) if (!tainted.has(t.key_id)) tainted.set(t.key_id, t.tainted_at);
    const v = this.zoom.value;
    const zoom: Zoom = v === "all" || v === "issuing" ? v : Number(v);
    replace(this.chart, timeline(o.keys, tainted, o.now, zoom));
  }
}

/** When the key was tainted, or null. */
function taintedAt(k: Key): number | null {
  return k.tainted_at !== null && k.tainted_at > 0 ? k.tainted_at : null;
}

function stat(label: string, value: Node | string | number, cls = ""): HTMLElement {
  return h("div", { class: `stat ${cls}`.trim() }, h("dt", {}, label), h("dd", {}, value));
}

function summary(o: Overview): HTMLElement {
  const behind = o.agents.behind > 0;
  return h(
    "dl",
    { class: "stats" },
    stat("Trust domain", o.trust_domain),
    stat("CA server", o.server_id),
    stat("Bundle sequence", o.bundle_sequence),
    stat("Policy revision", o.policy_revision === null ? "none" : o.policy_revision),
    stat("Registration entries", o.entries.toLocaleString("en-US")),
    stat(
      "Agents",
      h(
        "span",
        {},
        `${o.agents.total} total, ${o.agents.current} current, `,
        h("span", { class: behind ? "warn" : "" }, `${o.agents.behind} behind`),
      ),
      behind ? "attention" : "",
    ),
    stat(
      "Rotation",
      h(
        "span",
        {},
        h("strong", { "data-testid": "rotation-phase" }, o.rotation.phase),
        o.rotation.detail ? h("span", { class: "detail" }, o.rotation.detail) : null,
        o.rotation.lagging && o.rotation.lagging.length > 0
          ? h(
              "span",
              { class: "detail" },
              "lagging: ",
              o.rotation.lagging.map((l, i) => [
                i > 0 ? ", " : "",
                h("span", { class: "mono" }, l.agent),
                l.delivered === null ? " (none delivered)" : ` (has ${l.delivered})`,
              ]),
            )
          : null,
      ),
      o.rotation.phase === "idle" ? "wide" : "wide attention",
    ),
  );
}

function keyTable(keys: readonly Key[]): HTMLTableElement {
  return table(
    { class: "data" },
    null,
    ["Key", "Kind", "State", "Signed by", "Not before", "Not after", "Tainted"],
    keys.map((k) => {
      const tainted = taintedAt(k);
      return h(
        "tr",
        { class: `state-${token(k.state)}${tainted !== null ? " tainted" : ""}` },
        h("td", { class: "mono" }, k.id),
        h("td", {}, k.kind),
        h("td", {}, h("span", { class: `pill state-${token(k.state)}` }, k.state)),
        h("td", { class: "mono" }, k.parent ?? "\u2014"),
        h("td", {}, when(k.not_before)),
        h("td", {}, when(k.not_after)),
        h("td", {}, tainted !== null ? [h("span", { class: "badge tainted" }, "tainted"), " ", when(tainted)] : "\u2014"),
      );
    }),
    "No signing keys.",
  );
}

function taintTable(taints: readonly Taint[]): HTMLTableElement {
  return table(
    { class: "data", "data-testid": "taints" },
    null,
    ["Key", "Kind", "Tainted at", { num: "SVIDs still signed by it" }, "Until (at the latest)", { num: "Replaced" }, "Cleared after"],
    taints.map((t) =>
      h(
        "tr",
        { "data-testid": `taint-${t.key_id}`, class: t.remaining > 0 ? "pending" : "cleared" },
        h("td", { class: "mono" }, t.key_id),
        h("td", {}, t.kind),
        h("td", {}, when(t.tainted_at)),
        h("td", { class: "num" }, h("span", { "data-testid": "taint-remaining" }, t.remaining)),
        h("td", {}, t.remaining > 0 ? when(t.remaining_until, "\u2014") : "\u2014"),
        h("td", { class: "num" }, t.replaced),
        h("td", {}, t.cleared_after_s === null ? (t.remaining > 0 ? "in progress" : "\u2014") : duration(t.cleared_after_s)),
      ),
    ),
    "No tainted keys.",
  );
}
