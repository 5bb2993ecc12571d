// track() against a real server with a per-credential rate limit and a small batch limit: 429s are
// retried no sooner than Retry-After says and every event arrives once; a batch over the limit is
// split; one invalid event is dropped (and reported) while the rest of its batch is sent.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { LiverecClient } from "../dist/index.js";
import { eventually, mintToken, startServer } from "./support.mjs";

let server;
before(async () => {
  server = await startServer({
    extra: ["[limits]", "per_key_per_sec = 1", "per_key_burst = 1", "[events]", "max_batch = 3"].join("\n"),
  });
});
after(() => server?.close());

/** A fetch that records each request to /v1/events and its answer. */
function recordingFetch() {
  const log = [];
  const recording = async (input, init) => {
    const sent = Date.now();
    const response = await fetch(input, init);
    if (String(input).endsWith("/v1/events")) {
      log.push({ sent, status: response.status, retryAfter: response.headers.get("retry-after"), size: JSON.parse(init.body).length });
    }
    return response;
  };
  return { log, fetch: recording };
}

/** The user's stored interactions, read with the admin key (itself rate limited: retried). */
function interactions(user) {
  const admin = new LiverecClient({ baseUrl: server.url, apiKey: server.admin });
  return eventually(`${user}'s export`, async () => (await admin.export({ user_id: user })).profile.interactions);
}

test("429 answers are retried after Retry-After, and every event is applied once", async () => {
  const user = "js-track-429";
  const token = await eventually("a token (the admin key is rate limited too)", () => mintToken(server, user));
  const { log, fetch } = recordingFetch();
  const client = new LiverecClient({ baseUrl: server.url, token, fetch, track: { maxBatch: 1 } });
  const ids = [0, 1, 2, 3].map((i) => client.track({ user_id: user, item_id: `item-000${i + 1}`, event_type: "view" }));
  await client.flush();
  assert.equal(client.tracker.stats.accepted, 4);
  assert.equal(client.tracker.stats.dropped, 0);
  const limited = log.filter((r) => r.status === 429);
  assert.ok(limited.length >= 1, `no 429 in ${JSON.stringify(log)}: is the rate limit on?`);
  assert.equal(client.tracker.stats.retries, limited.length);
  for (const [i, request] of log.entries()) {
    if (request.status !== 429) continue;
    assert.ok(request.retryAfter !== null, "a 429 without Retry-After");
    const next = log[i + 1];
    // The next attempt waited at least what the server asked (timers may fire a little early).
    assert.ok(next.sent - request.sent >= Number(request.retryAfter) * 1000 - 20, `retried after ${next.sent - request.sent} ms`);
  }
  const stored = (await interactions(user)).map((i) => i.event_id);
  for (const id of ids) assert.equal(stored.filter((s) => s === id).length, 1, `event ${id} stored ${stored.filter((s) => s === id).length} times`);
});

test("a batch over events.max_batch is split, and an invalid event is dropped from its batch", async () => {
  const user = "js-track-split";
  const token = await eventually("a token (the admin key is rate limited too)", () => mintToken(server, user));
  const { log, fetch } = recordingFetch();
  const dropped = [];
  const client = new LiverecClient({
    baseUrl: server.url,
    token,
    fetch,
    track: { maxBatch: 10, onError: (error, events) => dropped.push({ code: error.code, field: error.field, events }) },
  });
  const good = [];
  for (let i = 0; i < 6; i++) {
    if (i === 4) client.track({ user_id: user, item_id: "item-0001", event_type: "rating", value: 99 });
    good.push(client.track({ user_id: user, item_id: `item-001${i}`, event_type: "click" }));
  }
  await client.flush();
  assert.ok(log.some((r) => r.status === 413 && r.size === 7), `no 413 for the batch of 7: ${JSON.stringify(log)}`);
  assert.ok(log.every((r) => r.status !== 202 || r.size <= 3));
  assert.equal(dropped.length, 1);
  assert.equal(dropped[0].code, "invalid_event");
  assert.match(dropped[0].field, /^\[\d\]\.value$/);
  assert.equal(dropped[0].events[0].value, 99);
  assert.equal(client.tracker.stats.accepted, 6);
  const stored = (await interactions(user)).map((i) => i.event_id);
  for (const id of good) assert.ok(stored.includes(id), `event ${id} is missing`);
});
