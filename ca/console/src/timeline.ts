// The overview's key timeline: one bar per signing key from not_before to not_after, grouped
// roots / intermediates / JWT keys, a "now" line, and tainted keys hatched and labelled. Drawn
// as SVG with attributes only (no inline styles); colours come from app.css by class.

import { s } from "./dom";
import type { Key } from "./schema";
import { relative, utc } from "./time";

/**
 * What the time axis spans: every key's whole lifetime ("all"); the lifetimes of the keys that
 * are not roots ("issuing": intermediates and JWT keys, whose rotations matter day to day,
 * with roots cut at the edges); or a window of this many seconds either side of now.
 */
export type Zoom = "all" | "issuing" | number;

const W = 1200; // viewBox width; the SVG scales to its container
const LABEL = 250; // the key-name column
const RIGHT = 20;
const AXIS = 30;
const GROUP = 24;
const ROW = 22;
const BAR = 12;

const GROUPS: readonly (readonly [string, string])[] = [
  ["x509_root", "X.509 roots"],
  ["x509_intermediate", "X.509 intermediates"],
  ["jwt", "JWT signing keys"],
];

const DAY = 86400;
const STEPS = [
  60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, DAY, 2 * DAY, 7 * DAY, 14 * DAY,
  30 * DAY, 91 * DAY, 182 * DAY, 365 * DAY, 2 * 365 * DAY, 5 * 365 * DAY, 10 * 365 * DAY,
  25 * 365 * DAY, 50 * 365 * DAY, 100 * 365 * DAY,
];

/** A class-name-safe form of a server-provided word (state, kind). */
export function token(word: string): string {
  return word.toLowerCase().replace(/[^a-z0-9_-]/g, "_");
}

function shorten(text: string, max: number): string {
  return text.length <= max ? text : `${text.slice(0, max - 1)}\u2026`;
}

function tickLabel(t: number, step: number): string {
  const u = utc(t); // "2025-12-06 05:46:40Z"
  return step >= DAY ? u.slice(0, 10) : u.slice(5, 16);
}

export function timeline(
  keys: readonly Key[],
  taintedAt: ReadonlyMap<string, number>,
  now: number,
  zoom: Zoom,
): SVGSVGElement {
  let lo: number;
  let hi: number;
  const issuing = keys.filter((k) => k.kind !== "x509_root");
  if (zoom === "all" || zoom === "issuing") {
    const span = zoom === "issuing" && issuing.length > 0 ? issuing : keys;
    lo = Math.min(now, ...span.map((k) => k.not_before));
    hi = Math.max(now, ...span.map((k) => k.not_after));
    const pad = Math.max((hi - lo) * 0.02, 3600);
    lo -= pad;
    hi += pad;
  } else {
    lo = now - zoom;
    hi = now + zoom;
  }
  const plotW = W - LABEL - RIGHT;
  const x = (t: number): number => LABEL + ((t - lo) / (hi - lo)) * plotW;
  const clampX = (t: number): number => Math.min(W - RIGHT, Math.max(LABEL, x(t)));

  const known = new Set(GROUPS.map(([kind]) => kind));
  const groups: [string, Key[]][] = GROUPS.map(([kind, title]) => [
    title,
    keys.filter((k) => k.kind === kind),
  ]);
  groups.push(["Other keys", keys.filter((k) => !known.has(k.kind))]);

  const rows: SVGElement[] = [];
  let y = AXIS;
  for (const [title, members] of groups) {
    if (members.length === 0) continue;
    rows.push(s("text", { class: "group-title", x: 8, y: y + 16 }, title));
    y += GROUP;
    const sorted = [...members].sort((a, b) => a.not_before - b.not_before || a.id.localeCompare(b.id));
    for (const k of sorted) {
      rows.push(keyRow(k, taintedAt.get(k.id) ?? null, y, x, clampX, lo, hi));
      y += ROW;
    }
  }
  const height = y + 8;

  // Ticks: the smallest step that gives at most 8, on whole multiples of the step (UTC).
  const step = STEPS.find((st) => (hi - lo) / st <= 8) ?? STEPS[STEPS.length - 1] ?? DAY;
  const ticks: SVGElement[] = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi; t += step) {
    const tx = x(t);
    ticks.push(s("line", { class: "grid", x1: tx, x2: tx, y1: AXIS - 6, y2: height }));
    // A label that would run past either end of the plot is left out; its grid line stays.
    if (tx - 40 >= LABEL - 20 && tx + 40 <= W) {
      ticks.push(s("text", { class: "tick", x: tx, y: AXIS - 10, "text-anchor": "middle" }, tickLabel(t, step)));
    }
  }

  const nowMark: SVGElement[] = [];
  if (now >= lo && now <= hi) {
    const nx = x(now);
    nowMark.push(
      s("line", { class: "now", x1: nx, x2: nx, y1: AXIS - 4, y2: height }),
      s("text", { class: "now-label", x: nx + 4, y: AXIS + 2 }, "now"),
    );
  }

  return s(
    "svg",
    {
      class: "timeline",
      viewBox: `0 0 ${W} ${height}`,
      role: "img",
      "aria-label": `Lifetimes of ${keys.length} signing keys from ${utc(lo)} to ${utc(hi)}`,
      "data-testid": "key-timeline",
    },
    s(
      "defs",
      {},
      s(
        "pattern",
        { id: "hatch", width: 6, height: 6, patternUnits: "userSpaceOnUse", patternTransform: "rotate(45)" },
        s("rect", { class: "hatch-bg", width: 6, height: 6 }),
        s("line", { class: "hatch-line", x1: 0, y1: 0, x2: 0, y2: 6 }),
      ),
    ),
    s("line", { class: "axis", x1: LABEL, x2: W - RIGHT, y1: AXIS - 6, y2: AXIS - 6 }),
    ticks,
    rows,
    nowMark,
  );
}

function keyRow(
  k: Key,
  tainted: number | null,
  y: number,
  x: (t: number) => number,
  clampX: (t: number) => number,
  lo: number,
  hi: number,
): SVGElement {
  const cls = `key-row state-${token(k.state)}${tainted !== null ? " tainted" : ""}`;
  const mid = y + ROW / 2;
  const tip = [
    `${k.id} (${k.kind}, ${k.state})`,
    `not before ${utc(k.not_before)} (${relative(k.not_before)})`,
    `not after  ${utc(k.not_after)} (${relative(k.not_after)})`,
    k.parent ? `signed by ${k.parent}` : null,
    tainted !== null ? `TAINTED at ${utc(tainted)} (${relative(tainted)})` : null,
  ]
    .filter((l) => l !== null)
    .join("\n");

  const parts: SVGElement[] = [
    s("title", {}, tip),
    s("rect", { class: "row-bg", x: 0, y, width: W, height: ROW }),
    s("text", { class: "key-label", x: 20, y: mid + 4 }, shorten(k.id, 24)),
    s("text", { class: "key-state", x: LABEL - 8, y: mid + 4, "text-anchor": "end" }, k.state),
  ];

  if (k.not_after < lo) {
    parts.push(s("text", { class: "off-window", x: LABEL + 4, y: mid + 4 }, `\u25c2 ended ${utc(k.not_after).slice(0, 10)}`));
  } else if (k.not_before > hi) {
    parts.push(
      s("text", { class: "off-window", x: W - RIGHT - 4, y: mid + 4, "text-anchor": "end" }, `starts ${utc(k.not_before).slice(0, 10)} \u25b8`),
    );
  } else {
    const x0 = clampX(k.not_before);
    const x1 = clampX(k.not_after);
    parts.push(s("rect", { class: "bar", x: x0, y: mid - BAR / 2, width: Math.max(2, x1 - x0), height: BAR, rx: 2 }));
    if (k.not_after > hi) {
      // The key lives on past the window.
      parts.push(s("path", { class: "clip-mark", d: `M${x1 + 3} ${mid - 5}l6 5l-6 5z` }));
    }
    if (tainted !== null) {
      if (tainted >= lo && tainted <= hi) {
        const tx = x(tainted);
        parts.push(s("line", { class: "taint-mark", x1: tx, x2: tx, y1: mid - BAR / 2 - 3, y2: mid + BAR / 2 + 3 }));
      }
      // The label goes after the bar when there is room, else before it, else on it.
      const room = 64;
      const [lx, anchor, where] =
        x1 + 6 + room < W - RIGHT
          ? [x1 + 6, "start", ""]
          : x0 - 6 - room > LABEL
            ? [x0 - 6, "end", ""]
            : [x0 + 6, "start", " on-bar"];
      parts.push(s("text", { class: `taint-label${where}`, x: lx, y: mid + 4, "text-anchor": anchor }, "TAINTED"));
    }
  }
  if (tainted !== null && (k.not_after < lo || k.not_before > hi)) {
    parts.push(s("text", { class: "taint-label", x: LABEL + (W - LABEL) / 2, y: mid + 4, "text-anchor": "middle" }, "TAINTED"));
  }
  return s("g", { class: cls, "data-key": k.id }, parts);
}
