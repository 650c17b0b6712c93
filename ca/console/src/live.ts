// Live updates. The CA sends a Server-Sent Event `change` (data {"seq": n}, at most once a
// second) on /api/events whenever what the console shows may have changed; the current page
// then re-fetches its data, no more than once a second. While the event stream is not open
// (never opened, dropped, or refused) the page is polled every 5 s instead, and a closed
// stream is retried every 30 s.

const POLL_MS = 5000;
const REOPEN_MS = 30000;
const MIN_REFRESH_MS = 1000;

export type LiveState = "connecting" | "live" | "polling" | "paused";

/** Runs `refresh` at most once per MIN_REFRESH_MS, coalescing requests, never two at once. */
export class Throttle {
  private last = -Infinity;
  private timer: number | null = null;
  private running = false;
  private again = false;

  constructor(private readonly refresh: () => Promise<void>) {}

  request(): void {
    if (this.running) {
      this.again = true;
      return;
    }
    if (this.timer !== null) return;
    const wait = Math.max(0, this.last + MIN_REFRESH_MS - performance.now());
    this.timer = window.setTimeout(() => void this.run(), wait);
  }

  private async run(): Promise<void> {
    this.timer = null;
    this.running = true;
    this.last = performance.now();
    try {
      await this.refresh();
    } finally {
      this.running = false;
      if (this.again) {
        this.again = false;
        this.request();
      }
    }
  }

  cancel(): void {
    if (this.timer !== null) window.clearTimeout(this.timer);
    this.timer = null;
    this.again = false;
  }
}

export class Live {
  private source: EventSource | null = null;
  private poll: number | null = null;
  private reopen: number | null = null;
  private stopped = true;
  /** The last `seq` the server announced, shown in the indicator's tooltip. */
  private seq: number | null = null;

  constructor(
    private readonly changed: () => void,
    private readonly show: (state: LiveState, detail: string) => void,
  ) {}

  start(): void {
    this.stopped = false;
    this.open();
  }

  /** Stops the stream and the polling (while the login form is up). */
  stop(): void {
    this.stopped = true;
    this.source?.close();
    this.source = null;
    this.stopPolling();
    if (this.reopen !== null) window.clearTimeout(this.reopen);
    this.reopen = null;
    this.show("paused", "live updates paused");
  }

  private open(): void {
    if (this.stopped) return;
    if (this.poll === null) this.show("connecting", "connecting to /api/events");
    const es = new EventSource("/api/events");
    this.source = es;
    es.addEventListener("open", () => {
      this.stopPolling();
      this.show("live", "live: the CA pushes changes");
    });
    es.addEventListener("change", (ev) => {
      try {
        const data: unknown = JSON.parse((ev as MessageEvent<string>).data);
        if (typeof data === "object" && data !== null && "seq" in data) {
          const seq = (data as { seq: unknown }).seq;
          if (typeof seq === "number") this.seq = seq;
        }
      } catch {
        // The event itself is the signal; a malformed payload changes nothing about it.
      }
      this.show("live", this.seq === null ? "live" : `live: change ${this.seq}`);
      this.changed();
    });
    es.addEventListener("error", () => {
      if (this.source !== es) return;
      // CONNECTING: the browser retries by itself; CLOSED: it gave up (the server refused the
      // stream). Either way poll meanwhile, and after CLOSED open a new stream later.
      this.startPolling();
      if (es.readyState === EventSource.CLOSED) {
        this.source = null;
        this.reopen = window.setTimeout(() => {
          this.reopen = null;
          this.open();
        }, REOPEN_MS);
      }
    });
  }

  private startPolling(): void {
    this.show("polling", `event stream unavailable: polling every ${POLL_MS / 1000} s`);
    if (this.poll !== null || this.stopped) return;
    this.poll = window.setInterval(() => this.changed(), POLL_MS);
  }

  private stopPolling(): void {
    if (this.poll !== null) window.clearInterval(this.poll);
    this.poll = null;
  }
}
