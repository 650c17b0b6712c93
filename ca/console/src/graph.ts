// The policy graph: who may call whom. A layered layout drawn as SVG: callers in the first
// column, each callee one column right of its furthest caller (cycles broken where they
// close), nodes in a column ordered by where their neighbours sit to keep crossings down. Edges
// carry their rule names; deny edges are dashed and red, audit-only ones dotted.

import { s } from "./dom";
import type { Edge } from "./schema";
import { token } from "./timeline";

const PAD = 16;
const NH = 26; // node height
const RG = 14; // gap between rows
const LABEL_H = 14;

interface Box {
  x: number;
  y: number;
  w: number;
  h: number;
}

/** `spiffe://example.org/very/long/…/path` shortened in the middle to `max` characters. */
export function middle(text: string, max: number): string {
  if (text.length <= max) return text;
  const head = Math.ceil((max - 1) * 0.6);
  return `${text.slice(0, head)}\u2026${text.slice(text.length - (max - 1 - head))}`;
}

/** Layers and in-layer order for the nodes; edges that close a cycle are ignored for layering. */
function layout(ids: readonly string[], edges: readonly Edge[]): string[][] {
  const out = new Map<string, string[]>(ids.map((id) => [id, []]));
  const inn = new Map<string, string[]>(ids.map((id) => [id, []]));
  for (const e of edges) {
    if (e.from === e.to) continue;
    out.get(e.from)?.push(e.to);
    inn.get(e.to)?.push(e.from);
  }
  // A topological order (Kahn); on a cycle, continue from the remaining node with the fewest
  // unplaced callers, so every node is placed and the loop ends.
  const pending = new Map(ids.map((id) => [id, new Set(inn.get(id))]));
  const order: string[] = [];
  while (order.length < ids.length) {
    let next: string | null = null;
    let best = Infinity;
    for (const [id, callers] of pending) {
      if (callers.size < best) {
        best = callers.size;
        next = id;
        if (best === 0) break;
      }
    }
    if (next === null) break;
    pending.delete(next);
    order.push(next);
    for (const to of out.get(next) ?? []) pending.get(to)?.delete(next);
  }
  const rank = new Map(order.map((id, i) => [id, i]));
  const layer = new Map<string, number>();
  for (const id of order) {
    let l = 0;
    for (const from of inn.get(id) ?? []) {
      if ((rank.get(from) ?? 0) < (rank.get(id) ?? 0)) l = Math.max(l, (layer.get(from) ?? 0) + 1);
    }
    layer.set(id, l);
  }
  const count = Math.max(0, ...layer.values()) + 1;
  const layers: string[][] = Array.from({ length: count }, () => []);
  for (const id of [...ids].sort()) layers[layer.get(id) ?? 0]?.push(id);

  // Barycentre sweeps: order each layer by the mean position of its neighbours in the layer
  // before (forward) or after (backward).
  const pos = new Map<string, number>();
  const index = (): void => {
    for (const l of layers) l.forEach((id, i) => pos.set(id, i));
  };
  index();
  const sweep = (from: number, to: number, dir: 1 | -1, near: Map<string, string[]>): void => {
    for (let i = from; i !== to; i += dir) {
      const l = layers[i];
      if (!l) continue;
      const score = new Map<string, number>();
      for (const id of l) {
        const ns = (near.get(id) ?? []).filter((n) => (layer.get(n) ?? 0) === i - dir);
        score.set(id, ns.length ? ns.reduce((a, n) => a + (pos.get(n) ?? 0), 0) / ns.length : (pos.get(id) ?? 0));
      }
      l.sort((a, b) => (score.get(a) ?? 0) - (score.get(b) ?? 0) || a.localeCompare(b));
      index();
    }
  };
  sweep(1, count, 1, inn);
  sweep(count - 2, -1, -1, out);
  sweep(1, count, 1, inn);
  return layers;
}

function overlaps(a: Box, b: Box): boolean {
  return a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;
}

/**
 * The graph as SVG, sized to fit `avail` pixels across when it can (columns narrow down to a
 * floor; past that the container scrolls).
 */
export function policyGraph(nodeIds: readonly string[], edges: readonly Edge[], avail: number): SVGSVGElement {
  const ids = [...new Set([...nodeIds, ...edges.flatMap((e) => [e.from, e.to])])];
  const layers = layout(ids, edges);
  const n = layers.length;
  const CG = n > 1 ? Math.max(120, Math.min(190, (avail - 2 * PAD) / n / 2.2)) : 0; // the gap between columns, for labels
  const NW = Math.max(200, Math.min(300, (avail - 2 * PAD - (n - 1) * CG) / n)); // node width
  const chars = Math.floor((NW - 16) / 6.9);
  const tallest = Math.max(1, ...layers.map((l) => l.length));
  const colH = (n: number): number => n * NH + (n - 1) * RG;

  const where = new Map<string, { x: number; y: number; layer: number }>();
  layers.forEach((l, li) => {
    const top = PAD + (colH(tallest) - colH(l.length)) / 2;
    l.forEach((id, i) => where.set(id, { x: PAD + li * (NW + CG), y: top + i * (NH + RG), layer: li }));
  });

  const callers = new Set(edges.map((e) => e.from));
  const callees = new Set(edges.map((e) => e.to));
  const width = PAD * 2 + layers.length * NW + (layers.length - 1) * CG;
  const bottom = PAD + colH(tallest);
  let height = bottom + PAD;

  const labels: Box[] = [...where.values()].map((p) => ({ x: p.x, y: p.y, w: NW, h: NH }));
  const paths: SVGElement[] = [];
  const texts: SVGElement[] = [];
  const seen = new Map<string, number>();
  let detours = 0;

  for (const e of edges) {
    const a = where.get(e.from);
    const b = where.get(e.to);
    if (!a || !b) continue;
    const pair = `${e.from}\u0000${e.to}`;
    const k = seen.get(pair) ?? 0;
    seen.set(pair, k + 1);
    const bend = k * 10;
    const ay = a.y + NH / 2;
    const by = b.y + NH / 2;
    let d: string;
    let mx: number;
    let my: number;
    if (e.from === e.to) {
      const x = a.x + NW;
      d = `M${x} ${ay - 6}C${x + 50 + bend} ${ay - 34},${x + 50 + bend} ${ay + 34},${x} ${ay + 6}`;
      mx = x + 40 + bend;
      my = ay;
    } else if (b.layer === a.layer + 1) {
      const x0 = a.x + NW;
      const x1 = b.x;
      const c = (x1 - x0) / 2;
      d = `M${x0} ${ay}C${x0 + c} ${ay + bend},${x1 - c} ${by + bend},${x1} ${by}`;
      mx = (x0 + x1) / 2;
      my = (ay + by) / 2 + bend * 0.75;
    } else {
      // An edge that skips columns, stays in one, or goes back would cross the nodes between:
      // it leaves from under its caller, runs below every node, and enters its callee from below.
      const dip = bottom + 22 + 16 * detours++;
      const x0 = a.x + NW / 2 + bend;
      const x1 = b.x + NW / 2 - 20 + bend;
      const y0 = a.y + NH;
      const y1 = b.y + NH;
      d = `M${x0} ${y0}C${x0} ${dip},${x1} ${dip},${x1} ${y1}`;
      mx = (x0 + x1) / 2;
      my = y0 + (dip - y0) * 0.75 + (y1 - y0) / 8;
    }
    const cls = `edge action-${token(e.action)}`;
    paths.push(
      s("path", { class: cls, d, "marker-end": `url(#arrow-${markerFor(e.action)})` }, s("title", {}, `${e.rule}: ${e.from} \u2192 ${e.to} (${e.action})`)),
    );
    const text = middle(e.rule, Math.max(12, Math.floor(CG / 6.4) - 2));
    const w = text.length * 6.4 + 8;
    const box: Box = { x: mx - w / 2, y: my - LABEL_H / 2, w, h: LABEL_H };
    for (let tries = 0; tries < 12 && labels.some((l) => overlaps(l, box)); tries++) box.y += LABEL_H + 1;
    labels.push(box);
    height = Math.max(height, box.y + box.h + PAD);
    texts.push(
      s(
        "g",
        { class: `edge-label action-${token(e.action)}` },
        s("title", {}, `rule ${e.rule} (${e.action})`),
        s("rect", { x: box.x, y: box.y, width: box.w, height: box.h, rx: 3 }),
        s("text", { x: mx, y: box.y + LABEL_H - 3.5, "text-anchor": "middle" }, text),
      ),
    );
  }

  const nodes = [...where.entries()].map(([id, p]) => {
    const role = callers.has(id) && !callees.has(id) ? "caller" : callees.has(id) && !callers.has(id) ? "callee" : "both";
    return s(
      "g",
      { class: `node ${role}`, "data-node": id },
      s("title", {}, id),
      s("rect", { x: p.x, y: p.y, width: NW, height: NH, rx: 4 }),
      s("text", { x: p.x + 8, y: p.y + NH / 2 + 4 }, middle(id.replace(/^spiffe:\/\//, ""), chars)),
    );
  });

  const marker = (name: string): SVGElement =>
    s(
      "marker",
      { id: `arrow-${name}`, class: `arrow-${name}`, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
      s("path", { d: "M0 0L10 5L0 10z" }),
    );

  return s(
    "svg",
    {
      class: "graph",
      width,
      height,
      viewBox: `0 0 ${width} ${height}`,
      role: "img",
      "aria-label": `Policy graph: ${ids.length} identities, ${edges.length} edges; the rules table below lists the same`,
      "data-testid": "policy-graph",
    },
    s("defs", {}, marker("allow"), marker("deny"), marker("other")),
    paths,
    nodes,
    texts,
  );
}

function markerFor(action: string): "allow" | "deny" | "other" {
  return action === "allow" ? "allow" : action === "deny" ? "deny" : "other";
}
