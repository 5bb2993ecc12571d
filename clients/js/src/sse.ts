// A Server-Sent Events parser (the WHATWG "event stream" interpretation), fed text chunks as they
// arrive. The client reads the stream with `fetch` rather than `EventSource` so that it can send
// `Authorization` and `Last-Event-ID` itself and pick a fresh token on every reconnection: an
// `EventSource` retries the URL it was made with, expired token included.

/** One dispatched event. */
export interface SseEvent {
  /** The `event:` field, `message` when absent. */
  event: string;
  /** The `data:` lines joined with newlines. */
  data: string;
  /** The last event id after this event (ids persist across events, as the spec says). */
  lastEventId: string | undefined;
}

export class SseParser {
  private buffer = "";
  private data: string[] = [];
  private event = "";
  private sawData = false;
  /** The last `id:` seen: what to send as `Last-Event-ID` when reconnecting. */
  lastEventId: string | undefined;
  /** The last `retry:` the server asked for, in milliseconds. */
  retry: number | undefined;

  constructor(lastEventId?: string) {
    this.lastEventId = lastEventId;
  }

  /** Feeds decoded text; returns the events completed by it. */
  push(chunk: string): SseEvent[] {
    this.buffer += chunk;
    const events: SseEvent[] = [];
    for (;;) {
      const match = /\r\n|\r|\n/.exec(this.buffer);
      if (!match) break;
      // A lone CR at the very end may be the first half of a CRLF split across chunks.
      if (match[0] === "\r" && match.index === this.buffer.length - 1) break;
      const line = this.buffer.slice(0, match.index);
      this.buffer = this.buffer.slice(match.index + match[0].length);
      const event = this.line(line);
      if (event) events.push(event);
    }
    return events;
  }

  private line(line: string): SseEvent | undefined {
    if (line === "") {
      const dispatch = this.sawData
        ? { event: this.event || "message", data: this.data.join("\n"), lastEventId: this.lastEventId }
        : undefined;
      this.data = [];
      this.event = "";
      this.sawData = false;
      return dispatch;
    }
    if (line.startsWith(":")) return undefined; // a comment: the server's heartbeat
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    switch (field) {
      case "data":
        this.data.push(value);
        this.sawData = true;
        break;
      case "event":
        this.event = value;
        break;
      case "id":
        if (!value.includes("\0")) this.lastEventId = value;
        break;
      case "retry":
        if (/^\d+$/.test(value)) this.retry = Number(value);
        break;
      default:
        break; // unknown fields are ignored
    }
    return undefined;
  }
}
