// Times: the API speaks unix seconds; the console shows UTC ("2025-12-06 05:46:40Z") with a
// hint relative to the CA's clock ("in 3h", "5m ago"). The CA's clock is estimated from the
// responses (the overview's `now`, otherwise the Date header), so a browser whose clock is off
// still says the right thing about expiries.

import { h } from "./dom";

class Clock {
  /** Server time minus browser time, in seconds. */
  private offset = 0;

  /** Records a server timestamp (unix seconds) seen just now. */
  observe(serverNow: number): void {
    if (Number.isFinite(serverNow)) this.offset = serverNow - Date.now() / 1000;
  }

  /** The CA's current time, unix seconds. */
  now(): number {
    return Date.now() / 1000 + this.offset;
  }
}

export const clock = new Clock();

function pad(n: number): string {
  return n < 10 ? `0${n}` : String(n);
}

/** `2025-12-06 05:46:40Z` */
export function utc(ts: number): string {
  const d = new Date(ts * 1000);
  if (Number.isNaN(d.getTime())) return `(bad time ${ts})`;
  return (
    `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ` +
    `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())}Z`
  );
}

const UNITS: readonly [string, number][] = [
  ["y", 365 * 86400],
  ["d", 86400],
  ["h", 3600],
  ["m", 60],
  ["s", 1],
];

/** A duration in its largest unit or two: `3h`, `2d4h`, `45s`. */
export function duration(seconds: number): string {
  let rest = Math.round(Math.abs(seconds));
  if (rest === 0) return "0s";
  const parts: string[] = [];
  for (const [unit, size] of UNITS) {
    if (rest >= size) {
      parts.push(`${Math.floor(rest / size)}${unit}`);
      rest %= size;
      if (parts.length === 2) break;
    } else if (parts.length === 1) {
      break;
    }
  }
  return parts.join("");
}

/** `in 3h`, `5m ago`, `just now`. */
export function relative(ts: number, now: number = clock.now()): string {
  const delta = ts - now;
  if (Math.abs(delta) < 5) return "just now";
  // One unit is enough for a hint; the absolute time is beside it.
  const d = duration(delta).replace(/^(\d+[a-z])\d+[a-z]$/, "$1");
  return delta > 0 ? `in ${d}` : `${d} ago`;
}

/** A timestamp cell's content: the UTC time and a relative hint that `tick` keeps fresh. */
export function when(ts: number | null, never = "never"): HTMLElement {
  if (ts === null) return h("span", { class: "muted" }, never);
  return h(
    "span",
    { class: "when" },
    h("time", { datetime: new Date(ts * 1000).toISOString(), title: `unix ${ts}` }, utc(ts)),
    " ",
    h("span", { class: "rel", "data-ts": ts }, relative(ts)),
  );
}

/** Refreshes every relative hint on the page (called every few seconds). */
export function tick(): void {
  const now = clock.now();
  for (const el of document.querySelectorAll<HTMLElement>("span.rel[data-ts]")) {
    const ts = Number(el.dataset["ts"]);
    const text = relative(ts, now);
    if (el.textContent !== text) el.textContent = text;
  }
}
