// The client: typed REST methods (generated from the OpenAPI document), live subscriptions and
// event tracking, sharing one base URL and one credential.

import type { EventIn, RecList } from "./generated.js";
import { Operations, operations, type OperationId } from "./generated.js";
import { type CallOptions, Credentials, LiverecError, type TokenProvider } from "./request.js";
import { Subscription, type SubscribeOptions } from "./subscribe.js";
import { Tracker, type TrackOptions } from "./track.js";

export interface ClientOptions {
  /** The server, e.g. `https://recs.example.com` or `http://127.0.0.1:8080` (no trailing path). */
  baseUrl: string;
  /** An API key (`producer`, `reader` or `admin`), for servers and scripts. Never put one in a page:
   * pages use a stream token. */
  apiKey?: string;
  /** A stream token for the page's user, or a provider of fresh ones (called again when one
   * expires). Ignored when `apiKey` is set. */
  token?: string | TokenProvider;
  /** The `fetch` to use (default `globalThis.fetch`). */
  fetch?: typeof fetch;
  /** The WebSocket class for `transport: "ws"` (default `globalThis.WebSocket`; Node 20 has it
   * with `--experimental-websocket`, Node 22 without). */
  WebSocket?: typeof WebSocket;
  /** How `track` batches and retries. */
  track?: TrackOptions;
}

export class LiverecClient extends Operations {
  readonly baseUrl: string;
  /** The event tracker behind `track` and `flush`. */
  readonly tracker: Tracker;
  private readonly credentials: Credentials;
  private readonly fetchFn: typeof fetch;
  private readonly WebSocketClass: typeof WebSocket | undefined;
  private readonly subscriptions = new Set<Subscription>();

  constructor(options: ClientOptions) {
    super();
    if (!options || typeof options.baseUrl !== "string" || !/^https?:\/\//.test(options.baseUrl)) {
      throw new TypeError(`baseUrl must be an http(s) URL, not ${JSON.stringify(options?.baseUrl)}`);
    }
    this.baseUrl = options.baseUrl.replace(/\/+$/, "");
    this.credentials = new Credentials(options.apiKey, options.token);
    const fetchFn = options.fetch ?? globalThis.fetch;
    if (typeof fetchFn !== "function") throw new TypeError("no fetch: pass the fetch option");
    // Called unbound, a browser's fetch throws "Illegal invocation".
    this.fetchFn = (input, init) => fetchFn(input, init);
    this.WebSocketClass = options.WebSocket ?? (globalThis as { WebSocket?: typeof WebSocket }).WebSocket;
    this.tracker = new Tracker({ baseUrl: this.baseUrl, credentials: this.credentials, fetch: this.fetchFn }, options.track);
  }

  /** Streams `userId`'s lists to `onList`: the current one at once, then every newer one. See
   * `SubscribeOptions`; `close()` the returned subscription to stop. */
  subscribe(userId: string, onList: (list: RecList) => void, options: SubscribeOptions = {}): Subscription {
    if (typeof userId !== "string" || userId === "") throw new TypeError("userId must be a non-empty string");
    const subscription = new Subscription(
      { baseUrl: this.baseUrl, credentials: this.credentials, fetch: this.fetchFn, WebSocket: this.WebSocketClass },
      userId,
      onList,
      options,
    );
    this.subscriptions.add(subscription);
    void subscription.done.then(() => this.subscriptions.delete(subscription));
    return subscription;
  }

  /** Queues an event for the next batch (see `TrackOptions`); returns its `event_id`. */
  track(event: EventIn): string {
    return this.tracker.track(event);
  }

  /** Sends every queued event now; resolves when each was accepted or dropped. */
  flush(): Promise<void> {
    return this.tracker.flush();
  }

  /** Closes every subscription and sends what is queued. */
  async close(): Promise<void> {
    for (const subscription of this.subscriptions) subscription.close();
    await this.tracker.close();
    await Promise.all([...this.subscriptions].map((s) => s.done));
  }

  protected async call(
    operation: OperationId,
    params: object | undefined,
    body: unknown,
    options: CallOptions | undefined,
  ): Promise<unknown> {
    const spec = operations[operation];
    const values = (params ?? {}) as Record<string, unknown>;
    let path: string = spec.path;
    for (const name of spec.pathParams as readonly string[]) {
      const value = values[name];
      if (value === undefined || value === null || value === "") {
        throw new TypeError(`${operation}: the path parameter ${name} is required`);
      }
      path = path.replace(`{${name}}`, encodeURIComponent(String(value)));
    }
    const query = new URLSearchParams();
    for (const name of spec.query as readonly string[]) {
      const value = values[name];
      if (value === undefined || value === null) continue;
      query.set(name, Array.isArray(value) ? value.join(",") : String(value));
    }
    const headers: Record<string, string> = { accept: spec.text ? "text/plain" : "application/json" };
    for (const name of spec.headers as readonly string[]) {
      const value = values[name];
      if (value !== undefined && value !== null) headers[name] = String(value);
    }
    if (spec.body && body !== undefined) headers["content-type"] = "application/json";
    const url = `${this.baseUrl}${path}${query.size > 0 ? `?${query}` : ""}`;
    let refreshed = false;
    for (;;) {
      const credential = await this.credentials.current();
      let response: Response;
      try {
        response = await this.fetchFn(url, {
          method: spec.method,
          headers: { ...headers, ...Credentials.header(credential), ...options?.headers },
          body: spec.body && body !== undefined ? JSON.stringify(body) : undefined,
          signal: options?.signal,
        });
      } catch (error) {
        throw LiverecError.network(error);
      }
      if (response.status === 401 && this.credentials.refreshable && !refreshed) {
        refreshed = true;
        await this.credentials.refresh();
        continue;
      }
      if (!response.ok) throw await LiverecError.from(response);
      if (response.status === 204) return undefined;
      if (spec.text) return response.text();
      const text = await response.text();
      return text === "" ? undefined : JSON.parse(text);
    }
  }
}

/** Subscribes without keeping a client: `subscribe(user, onList, { baseUrl, token, transport })`. */
export function subscribe(
  userId: string,
  onList: (list: RecList) => void,
  options: SubscribeOptions & Pick<ClientOptions, "baseUrl" | "apiKey" | "fetch" | "WebSocket">,
): Subscription {
  const client = new LiverecClient({
    baseUrl: options.baseUrl,
    apiKey: options.apiKey,
    fetch: options.fetch,
    WebSocket: options.WebSocket,
    track: { flushOnHide: false },
  });
  return client.subscribe(userId, onList, options);
}
