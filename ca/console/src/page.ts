// What every page shares: its root element (data-testid="page-<name>", data-loaded="true" once
// its data is on screen), one request in flight at a time (a newer load aborts the older), and
// errors reported to the banner while the last good data stays on screen.

import { ApiError, Unauthorized, isAbort } from "./api";
import { clearError, describeError, showError } from "./banner";
import { h } from "./dom";

export abstract class Page<T> {
  readonly root: HTMLElement;
  private inflight: AbortController | null = null;
  private disposed = false;
  /** A live update came while a load was in flight: load again when it ends. */
  private stale = false;

  constructor(
    readonly name: string,
    title: string,
  ) {
    this.root = h(
      "section",
      { class: `page page-${name}`, "data-testid": `page-${name}`, "aria-labelledby": `h-${name}` },
      h("h2", { id: `h-${name}` }, title),
    );
  }

  /** Fetches this page's data (with the given abort signal). */
  protected abstract fetch(signal: AbortSignal): Promise<T>;

  /** Puts the data on screen. */
  protected abstract render(data: T): void;

  /**
   * A live update: reload, unless a load is in flight, in which case reload once it ends. (A
   * live update never aborts a load, or a server slower than the event rate would never get a
   * page rendered.)
   */
  update(): Promise<void> {
    if (this.inflight) {
      this.stale = true;
      return Promise.resolve();
    }
    return this.refresh();
  }

  /** Fetches and renders the current data, superseding any load in flight; never throws. */
  async refresh(): Promise<void> {
    this.stale = false;
    this.inflight?.abort();
    const ctl = new AbortController();
    this.inflight = ctl;
    this.root.setAttribute("aria-busy", "true");
    try {
      const data = await this.fetch(ctl.signal);
      if (ctl.signal.aborted || this.disposed) return;
      this.render(data);
      // render may have started a newer load (the identities pager does): that one reports.
      if (ctl.signal.aborted) return;
      clearError("page");
      this.root.dataset["loaded"] = "true";
    } catch (e) {
      if (ctl.signal.aborted || this.disposed || isAbort(e) || e instanceof Unauthorized) return;
      if (e instanceof ApiError) {
        showError("page", e.message);
      } else {
        // A bug in this console, not the server's doing: say so, and keep the stack.
        console.error(e);
        showError("page", `the ${this.name} page failed to render: ${describeError(e)}`);
      }
    } finally {
      if (this.inflight === ctl) {
        this.inflight = null;
        this.root.removeAttribute("aria-busy");
        if (this.stale && !this.disposed) void this.refresh();
      }
    }
  }

  /** Stops everything in flight; the page is not used again. */
  dispose(): void {
    this.disposed = true;
    this.inflight?.abort();
  }
}
