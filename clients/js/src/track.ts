// Events out: `track(event)` queues, a batch goes out when it is full or a moment later, refusals
// that say "later" (429, 503, with Retry-After) and network failures are retried, and what is
// still queued when the page is hidden leaves with `sendBeacon` (or a keepalive fetch).

import type { EventIn } from "./generated.js";
import { backoff, Credentials, delay, LiverecError, uuidv7 } from "./request.js";

export interface TrackOptions {
  /** Most events per request (default 100; the server takes up to `events.max_batch`, 1000). */
  maxBatch?: number;
  /** How long an event may wait for others to share its request, in ms (default 1000). */
  flushIntervalMs?: number;
  /** Most events held while the server cannot take them (default 10000); past it the oldest are
   * dropped (reported through `onError`). */
  maxQueue?: number;
  /** Retries of one batch before it is dropped (default 10; with the default delays, minutes). */
  maxRetries?: number;
  /** First retry delay in ms when the server gave no `Retry-After` (default 500). */
  initialDelayMs?: number;
  /** Longest retry delay in ms (default 30000). */
  maxDelayMs?: number;
  /** Send what is queued when the page is hidden or unloaded (default true where there is a page). */
  flushOnHide?: boolean;
  /** Told when events are dropped: refused by the server (4xx that a retry cannot cure), or
   * retried `maxRetries` times, or pushed out of a full queue. */
  onError?: (error: Error, events: EventIn[]) => void;
}

/** Counters for dashboards and tests. */
export interface TrackStats {
  /** Events accepted by the server (202). */
  accepted: number;
  /** Requests retried (429, 503, 408, 5xx, network). */
  retries: number;
  /** Events dropped (see `onError`). */
  dropped: number;
  /** Events handed to `sendBeacon` or a keepalive fetch when the page was hidden. */
  beaconed: number;
}

/** The body size a keepalive request or a beacon may carry (browsers allow 64 KiB in flight). */
const BEACON_BYTES = 60_000;

export interface TrackerDeps {
  baseUrl: string;
  credentials: Credentials;
  fetch: typeof fetch;
}

export class Tracker {
  readonly stats: TrackStats = { accepted: 0, retries: 0, dropped: 0, beaconed: 0 };
  private readonly deps: TrackerDeps;
  private readonly options: Required<Omit<TrackOptions, "onError">> & Pick<TrackOptions, "onError">;
  private queue: EventIn[] = [];
  private timer: ReturnType<typeof setTimeout> | undefined;
  private pumping: Promise<void> | undefined;
  private readonly stop = new AbortController();
  private readonly onVisibility = () => {
    if (document.visibilityState === "hidden") this.beacon();
  };
  private readonly onPageHide = () => this.beacon();

  constructor(deps: TrackerDeps, options: TrackOptions = {}) {
    this.deps = deps;
    const page = typeof window !== "undefined" && typeof document !== "undefined";
    this.options = {
      maxBatch: options.maxBatch ?? 100,
      flushIntervalMs: options.flushIntervalMs ?? 1000,
      maxQueue: options.maxQueue ?? 10_000,
      maxRetries: options.maxRetries ?? 10,
      initialDelayMs: options.initialDelayMs ?? 500,
      maxDelayMs: options.maxDelayMs ?? 30_000,
      flushOnHide: options.flushOnHide ?? page,
      onError: options.onError,
    };
    if (this.options.flushOnHide && page) {
      // `visibilitychange` to hidden is the last event a page reliably gets on mobile;
      // `pagehide` covers desktop navigations.
      document.addEventListener("visibilitychange", this.onVisibility);
      window.addEventListener("pagehide", this.onPageHide);
    }
  }

  /** Queues an event. It gets an `event_id` (a UUID v7) when it has none, so that retries of its
   * batch are applied once. Returns the id. */
  track(event: EventIn): string {
    if (this.stop.signal.aborted) throw new Error("the client is closed");
    const queued: EventIn = { ...event, event_id: event.event_id ?? uuidv7() };
    this.queue.push(queued);
    if (this.queue.length > this.options.maxQueue) {
      const dropped = this.queue.splice(0, this.queue.length - this.options.maxQueue);
      this.drop(new Error(`the event queue is full (maxQueue ${this.options.maxQueue})`), dropped);
    }
    if (this.queue.length >= this.options.maxBatch) {
      void this.pump();
    } else if (this.timer === undefined && !this.pumping) {
      this.timer = setTimeout(() => void this.pump(), this.options.flushIntervalMs);
    }
    return queued.event_id!;
  }

  /** Sends everything queued now; resolves when the queue is empty (sent, or dropped). */
  flush(): Promise<void> {
    return this.pump();
  }

  /** Events queued and not yet sent. */
  get pending(): number {
    return this.queue.length;
  }

  /** Sends what is queued with the page-hide path, then stops listening. */
  async close(): Promise<void> {
    await this.flush();
    this.stop.abort();
    clearTimeout(this.timer);
    if (typeof document !== "undefined") document.removeEventListener("visibilitychange", this.onVisibility);
    if (typeof window !== "undefined") window.removeEventListener("pagehide", this.onPageHide);
  }

  private pump(): Promise<void> {
    clearTimeout(this.timer);
    this.timer = undefined;
    this.pumping ??= (async () => {
      try {
        while (this.queue.length > 0) {
          const batch = this.queue.splice(0, this.options.maxBatch);
          await this.send(batch);
        }
      } finally {
        this.pumping = undefined;
      }
    })();
    return this.pumping;
  }

  private drop(error: Error, events: EventIn[]): void {
    this.stats.dropped += events.length;
    this.options.onError?.(error, events);
  }

  /** Sends one batch until it is accepted or dropped. */
  private async send(events: EventIn[]): Promise<void> {
    let batch = events;
    let attempt = 0;
    let refreshed = false;
    while (batch.length > 0) {
      const body = JSON.stringify(batch);
      let response: Response;
      try {
        const credential = await this.deps.credentials.current();
        response = await this.deps.fetch(`${this.deps.baseUrl}/v1/events`, {
          method: "POST",
          headers: { "content-type": "application/json", ...Credentials.header(credential) },
          body,
          // A batch in flight when the page goes away is still delivered.
          keepalive: body.length <= BEACON_BYTES,
        });
      } catch (error) {
        if (!(await this.retry(LiverecError.network(error), batch, ++attempt, undefined))) return;
        continue;
      }
      if (response.status === 202) {
        const accepted = (await response.json().catch(() => ({}))) as { accepted?: number };
        this.stats.accepted += accepted.accepted ?? batch.length;
        return;
      }
      const error = await LiverecError.from(response);
      const status = error.status;
      if (status === 429 || status === 503 || status === 408 || status >= 500) {
        if (!(await this.retry(error, batch, ++attempt, error.retryAfter))) return;
        continue;
      }
      if (status === 401 && this.deps.credentials.refreshable && !refreshed) {
        refreshed = true;
        await this.deps.credentials.refresh().catch(() => undefined);
        continue;
      }
      if (status === 413 && batch.length > 1) {
        // Over the server's batch or body limit: halve until it fits.
        const half = Math.ceil(batch.length / 2);
        await this.send(batch.slice(0, half));
        batch = batch.slice(half);
        continue;
      }
      const index = /^\[(\d+)\]/.exec(error.field ?? "")?.[1];
      if (status === 422 && index !== undefined && batch.length > 1 && Number(index) < batch.length) {
        // One invalid event refuses its whole batch: drop that one, send the others.
        const bad = Number(index);
        this.drop(error, [batch[bad]!]);
        batch = batch.filter((_, i) => i !== bad);
        continue;
      }
      // 400, 403, 409 user_erased, 422 ...: sending the same again cannot succeed.
      this.drop(error, batch);
      return;
    }
  }

  /** Waits before the next attempt; false (and the batch dropped) once retries are used up. */
  private async retry(error: LiverecError, batch: EventIn[], attempt: number, seconds: number | undefined): Promise<boolean> {
    if (attempt > this.options.maxRetries || this.stop.signal.aborted) {
      this.drop(error, batch);
      return false;
    }
    this.stats.retries += 1;
    const wait =
      seconds !== undefined ? seconds * 1000 : backoff(attempt - 1, this.options.initialDelayMs, this.options.maxDelayMs);
    await delay(wait, this.stop.signal);
    return true;
  }

  /** Hands what is queued to the browser to deliver after the page is gone. A `keepalive` fetch
   * where it can go: it carries the credential header, and it is sent without cookies, which a
   * cross-origin beacon is not (`sendBeacon` always includes credentials, so a cross-origin one
   * needs `Access-Control-Allow-Credentials`, which liverec does not send: Chromium drops it). A
   * beacon for a same-origin server without a credential (a page liverec serves itself), and as
   * the fallback where `keepalive` is missing. */
  private beacon(): void {
    if (this.queue.length === 0) return;
    const events = this.queue.splice(0);
    clearTimeout(this.timer);
    this.timer = undefined;
    const url = `${this.deps.baseUrl}/v1/events`;
    // Synchronously: a page being hidden may be frozen before a promise settles.
    const credential = this.deps.credentials.cached();
    const sameOrigin = typeof location !== "undefined" && new URL(url, location.href).origin === location.origin;
    const beacon = (body: string) =>
      typeof navigator !== "undefined" &&
      typeof navigator.sendBeacon === "function" &&
      navigator.sendBeacon(url, new Blob([body], { type: "application/json" }));
    for (const chunk of chunks(events, this.options.maxBatch)) {
      const body = JSON.stringify(chunk);
      this.stats.beaconed += chunk.length;
      if (credential === undefined && sameOrigin && beacon(body)) continue;
      try {
        this.deps
          .fetch(url, {
            method: "POST",
            headers: { "content-type": "application/json", ...Credentials.header(credential) },
            body,
            keepalive: true,
          })
          .catch(() => {
            // The page is going away: nobody is left to tell.
          });
      } catch {
        // No keepalive in this browser: a beacon is the best left (it cannot carry a credential).
        beacon(body);
      }
    }
  }
}

/** Splits events into batches of at most `max` events and about `BEACON_BYTES` of JSON. */
function chunks(events: EventIn[], max: number): EventIn[][] {
  const out: EventIn[][] = [];
  let current: EventIn[] = [];
  let bytes = 2;
  for (const event of events) {
    const size = JSON.stringify(event).length + 1;
    if (current.length > 0 && (current.length >= max || bytes + size > BEACON_BYTES)) {
      out.push(current);
      current = [];
      bytes = 2;
    }
    current.push(event);
    bytes += size;
  }
  if (current.length > 0) out.push(current);
  return out;
}
