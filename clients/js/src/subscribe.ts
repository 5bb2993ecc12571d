// Live lists: one subscription per user, over SSE (fetch-streamed) or a WebSocket, that reconnects
// with backoff, resumes with `Last-Event-ID`, refreshes its stream token through the provider, and
// never hands `onList` a list older than one it already delivered.

import type { RecList } from "./generated.js";
import { backoff, Credentials, delay, LiverecError, type TokenProvider } from "./request.js";
import { SseParser } from "./sse.js";

export type Transport = "sse" | "ws";

/** `connecting` before the first connection is open, `open` while one is, `reconnecting` between
 * connections, `closed` after `close()` or a refusal that retrying cannot cure (`400`, `403`, a
 * `401` without a token provider), `erased` when the user was erased (the server ends the stream). */
export type SubscriptionStatus = "connecting" | "open" | "reconnecting" | "closed" | "erased";

export interface SubscribeOptions {
  /** `sse` (default): Server-Sent Events read with `fetch`; `ws`: one WebSocket per subscription. */
  transport?: Transport;
  /** A stream token for this subscription, or a provider of fresh ones (overrides the client's
   * credential). The provider is called again when the server says the token expired or answers
   * 401. Over `ws` only a stream token (or no credential) works: a WebSocket carries it as
   * `?access_token=`, where the server refuses API keys. */
  token?: string | TokenProvider;
  /** Told every status change. */
  onStatus?: (status: SubscriptionStatus) => void;
  /** Told every failure the subscription survives (it keeps retrying) and the one that closes it. */
  onError?: (error: Error) => void;
  /** First reconnection delay in ms (default: the server's `retry:`, 2000, or 1000 before it said). */
  initialDelayMs?: number;
  /** Longest reconnection delay in ms (default 30000). */
  maxDelayMs?: number;
  /** SSE only: reconnect when nothing, not even a heartbeat, arrived for this long (default 45000,
   * three of the server's default `stream.heartbeat_secs`). */
  stallMs?: number;
}

/** Counters for dashboards and tests. */
export interface SubscriptionStats {
  /** Connections opened (a response or a socket that opened). */
  connects: number;
  /** Lists handed to `onList`. */
  delivered: number;
  /** Lists received and not delivered: a repeat of the current one, or an older one. */
  skipped: number;
  /** Times the subscription asked for a fresh token after an expiry or a 401. */
  tokenRefreshes: number;
}

/** What ended one connection, and so what the next step is. */
type Outcome =
  | { kind: "ended"; delivered: boolean; error?: Error }
  | { kind: "expired" }
  | { kind: "unauthorized"; error: Error }
  | { kind: "refused"; error: LiverecError }
  | { kind: "wait"; seconds: number; error: Error }
  | { kind: "erased" }
  | { kind: "closed" };

/** Whether `list` should follow `last`: a newer `seq`, or, as the first list of a new connection,
 * one generated later. `seq` counts the lists of one user on the server; a server that lost its
 * state (the embedded mode, restarted) counts again from 1, and its first list is then recognised
 * by its later `generated_at`. A repeat (same `rec_id`) is never newer. */
export function isNewer(list: RecList, last: RecList | undefined, firstOnConnection: boolean): boolean {
  if (last === undefined) return true;
  if (list.rec_id === last.rec_id) return false;
  if (list.seq > last.seq) return true;
  return firstOnConnection && list.generated_at > last.generated_at;
}

export interface SubscriptionDeps {
  baseUrl: string;
  credentials: Credentials;
  fetch: typeof fetch;
  WebSocket: typeof WebSocket | undefined;
}

export class Subscription {
  readonly userId: string;
  readonly transport: Transport;
  /** The last list delivered. */
  latest: RecList | undefined;
  status: SubscriptionStatus = "connecting";
  readonly stats: SubscriptionStats = { connects: 0, delivered: 0, skipped: 0, tokenRefreshes: 0 };
  /** Resolves once the subscription has stopped for good (closed or erased). */
  readonly done: Promise<void>;

  private readonly deps: SubscriptionDeps;
  private readonly credentials: Credentials;
  private readonly onList: (list: RecList) => void;
  private readonly options: SubscribeOptions;
  private readonly stop = new AbortController();
  /** The id of the last list received, sent as `Last-Event-ID` on every SSE connection. The
   * server's ids are `<incarnation>-<seq>`: a server process that did not send it (an embedded
   * server since restarted, which counts `seq` from 1 again, or another instance) sends its
   * current list, which `offer` drops if it is a repeat. */
  private lastEventId: string | undefined;
  private serverRetry: number | undefined;

  constructor(
    deps: SubscriptionDeps,
    userId: string,
    onList: (list: RecList) => void,
    options: SubscribeOptions = {},
  ) {
    this.deps = deps;
    this.userId = userId;
    this.onList = onList;
    this.options = options;
    this.transport = options.transport ?? "sse";
    if (this.transport !== "sse" && this.transport !== "ws") {
      throw new TypeError(`transport must be "sse" or "ws", not ${JSON.stringify(options.transport)}`);
    }
    if (this.transport === "ws" && !deps.WebSocket) {
      throw new TypeError("transport \"ws\" needs a WebSocket class (globalThis.WebSocket or the client's WebSocket option)");
    }
    this.credentials = options.token !== undefined ? new Credentials(undefined, options.token) : deps.credentials;
    this.done = this.run();
  }

  /** Stops the subscription: the open connection is closed and no list is delivered after. */
  close(): void {
    this.stop.abort();
  }

  private setStatus(status: SubscriptionStatus): void {
    if (this.status === status) return;
    this.status = status;
    this.options.onStatus?.(status);
  }

  private report(error: Error): void {
    this.options.onError?.(error);
  }

  private async run(): Promise<void> {
    let attempt = 0;
    let refreshedAfter401 = false;
    while (!this.stop.signal.aborted) {
      let outcome: Outcome;
      try {
        const credential = await this.credentials.current();
        outcome = this.transport === "sse" ? await this.sse(credential) : await this.ws(credential);
      } catch (error) {
        // The token provider failed (its backend is down): retry it with backoff.
        outcome = { kind: "ended", delivered: false, error: error instanceof Error ? error : new Error(String(error)) };
      }
      if (this.stop.signal.aborted || outcome.kind === "closed") break;
      let wait = 0;
      switch (outcome.kind) {
        case "erased":
          this.setStatus("erased");
          return;
        case "refused":
          this.report(outcome.error);
          this.setStatus("closed");
          return;
        case "expired":
          // Not a failure: fetch a fresh token and come back at once.
          attempt = 0;
          refreshedAfter401 = false;
          await this.refreshToken();
          break;
        case "unauthorized":
          if (!this.credentials.refreshable) {
            this.report(outcome.error);
            this.setStatus("closed");
            return;
          }
          this.report(outcome.error);
          // One immediate retry with a fresh token; a provider that keeps handing out refused
          // tokens is retried with backoff, like a server that is down.
          if (refreshedAfter401) wait = backoff(attempt++, this.initialDelay(), this.maxDelay());
          refreshedAfter401 = true;
          await this.refreshToken();
          break;
        case "wait":
          this.report(outcome.error);
          wait = Math.max(outcome.seconds * 1000, backoff(attempt++, this.initialDelay(), this.maxDelay()));
          break;
        case "ended":
          if (outcome.error) this.report(outcome.error);
          if (outcome.delivered) {
            attempt = 0;
            refreshedAfter401 = false;
          }
          wait = backoff(attempt++, this.initialDelay(), this.maxDelay());
          break;
      }
      this.setStatus("reconnecting");
      await delay(wait, this.stop.signal);
    }
    this.setStatus("closed");
  }

  private async refreshToken(): Promise<void> {
    this.stats.tokenRefreshes += 1;
    try {
      await this.credentials.refresh();
    } catch (error) {
      this.report(error instanceof Error ? error : new Error(String(error)));
    }
  }

  private initialDelay(): number {
    return this.options.initialDelayMs ?? this.serverRetry ?? 1000;
  }

  private maxDelay(): number {
    return this.options.maxDelayMs ?? 30_000;
  }

  /** Offers a received list to `onList`; returns whether it was delivered. */
  private offer(list: RecList, firstOnConnection: boolean): boolean {
    if (this.stop.signal.aborted) return false;
    if (!isNewer(list, this.latest, firstOnConnection)) {
      this.stats.skipped += 1;
      return false;
    }
    this.latest = list;
    this.stats.delivered += 1;
    try {
      this.onList(list);
    } catch (error) {
      this.report(error instanceof Error ? error : new Error(String(error)));
    }
    return true;
  }

  /** One SSE connection, read to its end. */
  private async sse(credential: string | undefined): Promise<Outcome> {
    const url = `${this.deps.baseUrl}/v1/users/${encodeURIComponent(this.userId)}/recommendations/stream`;
    const headers: Record<string, string> = { accept: "text/event-stream", ...Credentials.header(credential) };
    if (this.lastEventId !== undefined) headers["last-event-id"] = this.lastEventId;
    const connection = new AbortController();
    const abort = () => connection.abort();
    this.stop.signal.addEventListener("abort", abort, { once: true });
    let stalled = false;
    let stallTimer: ReturnType<typeof setTimeout> | undefined;
    const stallMs = this.options.stallMs ?? 45_000;
    const armStall = () => {
      clearTimeout(stallTimer);
      stallTimer = setTimeout(() => {
        stalled = true;
        connection.abort();
      }, stallMs);
    };
    let delivered = false;
    try {
      armStall();
      let response: Response;
      try {
        response = await this.deps.fetch(url, { headers, signal: connection.signal, cache: "no-store" });
      } catch (error) {
        if (this.stop.signal.aborted) return { kind: "closed" };
        return { kind: "ended", delivered: false, error: LiverecError.network(stalled ? "connection stalled" : error) };
      }
      if (!response.ok || !response.body) {
        return outcomeOf(await LiverecError.from(response));
      }
      this.stats.connects += 1;
      this.setStatus("open");
      const parser = new SseParser(this.lastEventId);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let first = true;
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          armStall();
          for (const event of parser.push(value)) {
            this.lastEventId = parser.lastEventId;
            switch (event.event) {
              case "recommendations": {
                const list = JSON.parse(event.data) as RecList;
                if (this.offer(list, first)) delivered = true;
                first = false;
                break;
              }
              case "token_expired":
                return { kind: "expired" };
              case "erased":
                return { kind: "erased" };
              case "shutdown":
                // The server is stopping (a restart, a deploy): reconnect with backoff.
                return { kind: "ended", delivered };
              default:
                break;
            }
          }
          if (parser.retry !== undefined) this.serverRetry = parser.retry;
        }
      } catch (error) {
        if (this.stop.signal.aborted) return { kind: "closed" };
        return { kind: "ended", delivered, error: LiverecError.network(stalled ? "stream stalled" : error) };
      } finally {
        reader.cancel().catch(() => {});
      }
      // The server ended the stream without saying why (a proxy's idle timeout).
      return { kind: "ended", delivered };
    } finally {
      clearTimeout(stallTimer);
      this.stop.signal.removeEventListener("abort", abort);
      connection.abort();
    }
  }

  /** One WebSocket, until it closes. */
  private ws(credential: string | undefined): Promise<Outcome> {
    const WS = this.deps.WebSocket!;
    let url = `${this.deps.baseUrl.replace(/^http/, "ws")}/v1/ws`;
    if (credential !== undefined) url += `?access_token=${encodeURIComponent(credential)}`;
    return new Promise<Outcome>((resolve) => {
      let opened = false;
      let first = true;
      let delivered = false;
      let outcome: Outcome | undefined;
      let socket: WebSocket;
      try {
        socket = new WS(url);
      } catch (error) {
        resolve({ kind: "ended", delivered: false, error: LiverecError.network(error) });
        return;
      }
      const finish = (result: Outcome) => {
        outcome ??= result;
        try {
          socket.close();
        } catch {
          // already closing
        }
      };
      // Closed by the caller: done at once, without waiting for a close event that a socket still
      // in its handshake may never fire (Node 20).
      const onAbort = () => {
        finish({ kind: "closed" });
        settle({ code: 1000, reason: "closed" });
      };
      this.stop.signal.addEventListener("abort", onAbort, { once: true });
      socket.onopen = () => {
        opened = true;
        this.stats.connects += 1;
        socket.send(JSON.stringify({ subscribe: this.userId }));
      };
      socket.onmessage = (message: MessageEvent) => {
        let data: { type?: string; data?: RecList; error?: { code?: string; message?: string; field?: string } };
        try {
          data = JSON.parse(String(message.data));
        } catch {
          return;
        }
        switch (data.type) {
          case "subscribed":
            this.setStatus("open");
            break;
          case "recommendations":
            if (data.data && this.offer(data.data, first)) delivered = true;
            first = false;
            break;
          case "token_expired":
            finish({ kind: "expired" });
            break;
          case "erased":
            finish({ kind: "erased" });
            break;
          case "error": {
            const code = data.error?.code ?? "error";
            const error = new LiverecError(
              code === "unauthorized" ? 401 : code === "forbidden" ? 403 : 400,
              code,
              `${code}: ${data.error?.message ?? ""}`,
              data.error?.field,
            );
            if (code === "unauthorized") finish({ kind: "unauthorized", error });
            else if (code === "forbidden" || code === "invalid_user_id") finish({ kind: "refused", error });
            else this.report(error);
            break;
          }
          default:
            break;
        }
      };
      let settled = false;
      const settle = (event: { code: number; reason: string }) => {
        if (settled) return;
        settled = true;
        this.stop.signal.removeEventListener("abort", onAbort);
        if (outcome) return resolve(outcome);
        if (event.code === 1008) return resolve({ kind: "expired" });
        // A browser does not show why a handshake failed (401, 403, 429 all look like 1006): with
        // a token provider, take a fresh token before the next attempt, in case that was it.
        if (!opened && this.credentials.refreshable) {
          return resolve({ kind: "unauthorized", error: LiverecError.network(`WebSocket closed before opening (${event.code})`) });
        }
        resolve({
          kind: "ended",
          delivered,
          error: LiverecError.network(`WebSocket closed (${event.code}${event.reason ? `: ${event.reason}` : ""})`),
        });
      };
      socket.onclose = (event: CloseEvent) => settle(event);
      socket.onerror = () => {
        // Browsers follow an error with a close event. Node 20's WebSocket does not after a
        // failed handshake (it stays CONNECTING for ever), so a failure to open ends the attempt
        // here, and an error on an open socket does if no close follows.
        if (!opened) settle({ code: 1006, reason: "the handshake failed" });
        else setTimeout(() => settle({ code: 1006, reason: "error" }), 5000);
        try {
          socket.close();
        } catch {
          // not open
        }
      };
    });
  }
}

/** What to do after a refused connection. */
function outcomeOf(error: LiverecError): Outcome {
  if (error.status === 401) return { kind: "unauthorized", error };
  if (error.status === 429 || error.status === 503) return { kind: "wait", seconds: error.retryAfter ?? 0, error };
  if (error.status >= 400 && error.status < 500 && error.status !== 408) return { kind: "refused", error };
  return { kind: "ended", delivered: false, error };
}
