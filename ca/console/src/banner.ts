// The error banner: one line per source of trouble (the current page's data, the explain form,
// the login), each replaced by that source's next error and cleared by its next success.
// Nothing is swallowed: every failed API call ends up here until it is retried successfully.

import { h, replace } from "./dom";

const messages = new Map<string, string>();
let host: HTMLElement | null = null;

/** Where the banner lives (an empty element in the page shell). */
export function mountBanner(el: HTMLElement): void {
  host = el;
  render();
}

function render(): void {
  if (!host) return;
  if (messages.size === 0) {
    host.replaceChildren();
    return;
  }
  const dismiss = h("button", { type: "button", class: "dismiss", "aria-label": "Dismiss errors" }, "×");
  dismiss.addEventListener("click", () => {
    messages.clear();
    render();
  });
  replace(
    host,
    h(
      "div",
      { class: "banner", role: "alert", "data-testid": "error" },
      h("ul", {}, [...messages.values()].map((m) => h("li", {}, m))),
      dismiss,
    ),
  );
}

export function showError(source: string, message: string): void {
  messages.set(source, message);
  render();
}

export function clearError(source: string): void {
  if (messages.delete(source)) render();
}

export function clearAllErrors(): void {
  messages.clear();
  render();
}

/** A message for any thrown value. */
export function describeError(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
