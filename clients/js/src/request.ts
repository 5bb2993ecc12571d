// The request layer the generated methods, the tracker and the subscriptions share: credentials,
// the error type, and the small timing helpers.

/** Per-call options of every REST method. */
export interface CallOptions {
  /** Aborts the request. */
  signal?: AbortSignal;
  /** Extra request headers. */
  headers?: Record<string, string>;
}

/** Returns a stream token: called at the first connection and again whenever the server says the
 * token expired (or answers 401), so it should fetch a fresh one from your backend. */
export type TokenProvider = () => string | Promise<string>;

/** An answer other than 2xx, with liverec's error body (`{"error": {"code", "message", "field"}}`). */
export class LiverecError extends Error {
  /** The HTTP status (0 for a network failure). */
  readonly status: number;
  /** liverec's stable error code, e.g. `invalid_event`, `rate_limited` (`network` for a network failure). */
  readonly code: string;
  /** The field to blame, e.g. `[3].item_id`, when the server named one. */
  readonly field: string | undefined;
  /** Seconds the server asked to wait (`Retry-After`), on 429 and 503. */
  readonly retryAfter: number | undefined;
  /** The decoded body (or its text when it was not JSON). */
  readonly body: unknown;

  constructor(
    status: number,
    code: string,
    message: string,
    field?: string,
    retryAfter?: number,
    body?: unknown,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = "LiverecError";
    this.status = status;
    this.code = code;
    this.field = field;
    this.retryAfter = retryAfter;
    this.body = body;
  }

  /** Reads an error answer. */
  static async from(response: Response): Promise<LiverecError> {
    const text = await response.text().catch(() => "");
    let body: unknown = text;
    try {
      body = JSON.parse(text);
    } catch {
      // Not JSON (a bare 408 from the server, or a proxy's page): keep the text.
    }
    const detail = (body as { error?: { code?: unknown; message?: unknown; field?: unknown } } | null)?.error;
    const code = typeof detail?.code === "string" ? detail.code : `http_${response.status}`;
    const message = typeof detail?.message === "string" ? detail.message : text.slice(0, 200) || response.statusText;
    const field = typeof detail?.field === "string" ? detail.field : undefined;
    return new LiverecError(
      response.status,
      code,
      `${response.status} ${code}: ${message}`,
      field,
      retryAfter(response),
      body,
    );
  }

  /** A request that got no answer (connection refused, reset, DNS, CORS). */
  static network(cause: unknown): LiverecError {
    const message = cause instanceof Error ? cause.message : String(cause);
    return new LiverecError(0, "network", `network: ${message}`, undefined, undefined, undefined, { cause });
  }
}

/** `Retry-After` in seconds (liverec sends whole seconds; an HTTP date is honoured too). */
export function retryAfter(response: Response): number | undefined {
  const value = response.headers.get("retry-after");
  if (value === null) return undefined;
  const seconds = Number(value);
  if (Number.isFinite(seconds) && seconds >= 0) return seconds;
  const date = Date.parse(value);
  return Number.isNaN(date) ? undefined : Math.max(0, (date - Date.now()) / 1000);
}

/** Where a credential comes from: an API key (server side), a fixed stream token, or a provider
 * of fresh stream tokens. Concurrent refreshes share one call of the provider. */
export class Credentials {
  private readonly apiKey: string | undefined;
  private readonly source: string | TokenProvider | undefined;
  private token: string | undefined;
  private pending: Promise<string | undefined> | undefined;
  /** How many times the provider was called. */
  calls = 0;

  constructor(apiKey: string | undefined, token: string | TokenProvider | undefined) {
    this.apiKey = apiKey;
    this.source = token;
    if (typeof token === "string") this.token = token;
  }

  /** Whether a 401 can be cured by asking the provider again. */
  get refreshable(): boolean {
    return typeof this.source === "function";
  }

  /** The credential to send, fetching a token on first use. */
  async current(): Promise<string | undefined> {
    if (this.apiKey !== undefined) return this.apiKey;
    if (this.token !== undefined) return this.token;
    return this.refresh();
  }

  /** The credential at hand without waiting (undefined before a provider was first called). */
  cached(): string | undefined {
    return this.apiKey ?? this.token;
  }

  /** Asks the provider for a fresh token (a fixed credential stays as it is). */
  async refresh(): Promise<string | undefined> {
    if (this.apiKey !== undefined) return this.apiKey;
    if (typeof this.source !== "function") return this.token;
    const source = this.source;
    this.pending ??= (async () => {
      try {
        this.calls += 1;
        const token = await source();
        if (typeof token !== "string" || token === "") throw new Error("the token provider returned no token");
        this.token = token;
        return token;
      } finally {
        this.pending = undefined;
      }
    })();
    return this.pending;
  }

  /** The Authorization header for a credential, if any. */
  static header(credential: string | undefined): Record<string, string> {
    return credential === undefined ? {} : { authorization: `Bearer ${credential}` };
  }
}

/** Resolves after `ms`, or at once when `signal` aborts. */
export function delay(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted || ms <= 0) return resolve();
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
  });
}

/** Capped exponential backoff with jitter: attempt 0 waits about `initial`, each next one twice as
 * long up to `max`; the jitter (between half and all of it) keeps a crowd of clients that lost the
 * same server from coming back in step. */
export function backoff(attempt: number, initial: number, max: number): number {
  const ceiling = Math.min(max, initial * 2 ** Math.min(attempt, 30));
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

/** A UUID v7 (time-ordered, like the ids the server assigns), from `crypto.getRandomValues`, which,
 * unlike `crypto.randomUUID`, pages served over plain HTTP have too. */
export function uuidv7(): string {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  const now = Date.now();
  for (let i = 0; i < 6; i++) bytes[i] = Math.floor(now / 2 ** (8 * (5 - i))) & 0xff;
  bytes[6] = (bytes[6]! & 0x0f) | 0x70;
  bytes[8] = (bytes[8]! & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}
