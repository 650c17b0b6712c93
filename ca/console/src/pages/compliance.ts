// Compliance: how punctually each service renewed its X509-SVIDs over the window, and which
// services fetched the most, with an hourly sparkline.

import { getJson } from "../api";
import { h, replace, s, table } from "../dom";
import { Page } from "../page";
import { compliance, type Compliance, type Fetcher } from "../schema";
import { duration } from "../time";

/** Renewal shares below this are highlighted. */
const TARGET = 0.99;

export function percent(share: number): string {
  // Floor, not round: 99.96 % must not read as a passing 100.0 %.
  return `${(Math.floor(share * 1000) / 10).toFixed(1)}%`;
}

export class CompliancePage extends Page<Compliance> {
  private readonly body = h("div", {});

  constructor() {
    super("compliance", "Compliance");
    this.root.append(this.body);
  }

  protected fetch(signal: AbortSignal): Promise<Compliance> {
    return getJson("/api/compliance", compliance, signal);
  }

  protected render(c: Compliance): void {
    // "24h" reads better than "1d" for a window.
    const span = c.window_s % 3600 === 0 && c.window_s <= 72 * 3600 ? `${c.window_s / 3600}h` : duration(c.window_s);
    const low = c.services.filter((sv) => sv.share < TARGET).length;
    replace(
      this.body,
      h(
        "section",
        { "aria-labelledby": "h-renewals" },
        h("h3", { id: "h-renewals" }, `Renewals on time, last ${span}`),
        h(
          "p",
          { class: "counts" },
          c.on_time_share === null
            ? "A renewal is on time when it comes early enough in the previous SVID's life. "
            : `A renewal is on time when it comes before ${Math.round(c.on_time_share * 100)}% of the previous SVID's life; a lapse is an SVID that expired with no successor. `,
          h("span", { class: low > 0 ? "warn" : "" }, `${low} of ${c.services.length} services below ${percent(TARGET)}`),
          ".",
        ),
        table(
          { class: "data", "data-testid": "compliance" },
          null,
          ["SPIFFE ID", { num: "Renewals" }, { num: "On time" }, { num: "Lapsed" }, { num: "Share" }],
          c.services.map((sv) =>
            h(
              "tr",
              { class: sv.share < TARGET ? "low" : null, "data-testid": "compliance-row" },
              h("td", { class: "mono id" }, sv.spiffe_id),
              h("td", { class: "num" }, sv.renewals),
              h("td", { class: "num" }, sv.on_time),
              h("td", { class: "num" }, sv.lapsed),
              h("td", { class: "num share" }, percent(sv.share)),
            ),
          ),
          "No renewals or lapses in the window.",
        ),
      ),
      h(
        "section",
        { "aria-labelledby": "h-fetchers" },
        h("h3", { id: "h-fetchers" }, `Most X509-SVIDs issued, last ${span}`),
        table(
          { class: "data", "data-testid": "fetchers" },
          null,
          ["SPIFFE ID", { num: "Issued" }, "Per hour (oldest first)"],
          c.top_fetchers.map((f) =>
            h(
              "tr",
              { "data-testid": "fetcher-row" },
              h("td", { class: "mono id" }, f.spiffe_id),
              h("td", { class: "num" }, f.issued),
              h("td", {}, sparkline(f)),
            ),
          ),
          "Nothing issued in the window.",
        ),
      ),
    );
  }
}

function sparkline(f: Fetcher): SVGSVGElement {
  const BW = 5;
  const H = 24;
  const max = Math.max(1, ...f.hours);
  const bars = f.hours.map((n, i) => {
    const bh = n === 0 ? 1 : Math.max(2, (n / max) * (H - 2));
    return s("rect", { class: n === 0 ? "zero" : "bar", x: i * BW, y: H - bh, width: BW - 1, height: bh });
  });
  return s(
    "svg",
    {
      class: "spark",
      width: f.hours.length * BW,
      height: H,
      viewBox: `0 0 ${f.hours.length * BW} ${H}`,
      role: "img",
      "aria-label": `issued per hour, oldest first: ${f.hours.join(", ")} (peak ${max})`,
    },
    s("title", {}, `per hour, oldest first: ${f.hours.join(", ")}`),
    bars,
  );
}
