// The page shell around the pages (index.html): header, nav, error banner, main.

/** An element of index.html that must exist. */
export function byId(id: string): HTMLElement {
  const el = document.getElementById(id);
  if (!el) throw new Error(`index.html has no #${id}: the page shell and app.js do not match`);
  return el;
}

/** Shows the trust domain in the header (and the tab title). */
export function setTrustDomain(td: string): void {
  const el = byId("trust-domain");
  if (el.textContent !== td) el.textContent = td;
  document.title = `meshid console \u2014 ${td}`;
}
