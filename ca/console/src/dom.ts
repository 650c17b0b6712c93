// A small DOM builder. Text always goes in through text nodes, never through HTML parsing, so
// nothing the API returns can become markup; and no `style` attribute is ever written (the
// Content-Security-Policy's style-src 'self' forbids it): looks come from classes in app.css
// and geometry from SVG attributes.

export type Child = Node | string | number | null | undefined | false | readonly Child[];

/** Attribute values; `null`, `undefined` and `false` leave the attribute out. */
export type Attrs = Record<string, string | number | boolean | null | undefined>;

/** Event listeners, keyed by event name. */
export type Handlers = { [K in keyof HTMLElementEventMap]?: (ev: HTMLElementEventMap[K]) => void };

const SVG_NS = "http://www.w3.org/2000/svg";

function setAttrs(el: Element, attrs: Attrs | undefined): void {
  if (!attrs) return;
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "style" || name.startsWith("on")) {
      // Neither would survive the CSP, and neither is ever needed: fail loudly in development.
      throw new Error(`dom: attribute ${name} is not allowed; use a class or a listener`);
    }
    if (value === null || value === undefined || value === false) continue;
    el.setAttribute(name, value === true ? "" : String(value));
  }
}

function append(parent: Node, child: Child): void {
  if (child === null || child === undefined || child === false) return;
  if (Array.isArray(child)) {
    for (const c of child as readonly Child[]) append(parent, c);
  } else if (child instanceof Node) {
    parent.appendChild(child);
  } else {
    parent.appendChild(document.createTextNode(String(child)));
  }
}

/** An HTML element with attributes, listeners and children. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs?: Attrs,
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

/** Adds listeners to an element and returns it. */
export function on<E extends HTMLElement>(el: E, handlers: Handlers): E {
  for (const [name, fn] of Object.entries(handlers)) {
    if (fn) el.addEventListener(name, fn as EventListener);
  }
  return el;
}

/** An SVG element with attributes and children. */
export function s<K extends keyof SVGElementTagNameMap>(
  tag: K,
  attrs?: Attrs,
  ...children: Child[]
): SVGElementTagNameMap[K] {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

/** A SPIFFE ID (or any path) that may wrap after each "/" rather than inside a name. */
export function breakable(text: string): Child[] {
  const parts = text.split("/");
  return parts.map((p, i) => (i < parts.length - 1 ? [`${p}/`, document.createElement("wbr")] : p));
}

/** Replaces all children of `el`. */
export function replace(el: Element, ...children: Child[]): void {
  el.replaceChildren();
  append(el, children);
}

/** A column heading; `num` right-aligns it over a numeric column. */
export type Header = string | { readonly num: string };

/** A table with a header row of <th scope="col"> and the given body rows. */
export function table(
  attrs: Attrs,
  caption: string | null,
  headers: readonly Header[],
  rows: readonly HTMLTableRowElement[],
  empty: string,
): HTMLTableElement {
  const body =
    rows.length > 0
      ? rows
      : [h("tr", { class: "empty" }, h("td", { colspan: headers.length }, empty))];
  return h(
    "table",
    attrs,
    caption ? h("caption", {}, caption) : null,
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        headers.map((t) =>
          typeof t === "string" ? h("th", { scope: "col" }, t) : h("th", { scope: "col", class: "num" }, t.num),
        ),
      ),
    ),
    h("tbody", {}, body),
  );
}
