// subscribe() against a real server, over SSE and WebSocket: the first list and the list that
// reflects a tracked event, token refresh when the server ends the stream on expiry (SSE resuming
// with Last-Event-ID, so the current list is not sent twice), and a server restarted on the same
// port: the stream resumes and an event tracked while it was down is delivered and reflected.

import assert from "node:assert/strict";
import { connect, createServer } from "node:net";
import { after, before, describe, test } from "node:test";

import { isNewer, LiverecClient } from "../dist/index.js";
import { assertMonotonic, eventually, Lists, mintToken, startServer } from "./support.mjs";

let server;
before(async () => {
  // A heartbeat every second, so that a client may call a connection silent for 3 s stalled.
  server = await startServer({ extra: "[stream]\nheartbeat_secs = 1" });
});
/** Every client a test made: closed at the end even when the test failed half-way. */
const clients = [];
function make(options) {
  const client = new LiverecClient(options);
  clients.push(client);
  return client;
}
after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await server?.close();
});

/** Fast reconnection for tests: the defaults (the server's 2 s, doubling to 30 s) are for crowds. */
const quick = { initialDelayMs: 100, maxDelayMs: 1000 };

for (const transport of ["sse", "ws"]) {
  describe(`over ${transport}`, () => {
    test("the current list at once, then the list that reflects a tracked event", async () => {
      const user = `js-${transport}-first`;
      const client = make({ baseUrl: server.url, token: () => mintToken(server, user) });
      const lists = new Lists();
      const statuses = [];
      const sub = client.subscribe(user, lists.onList, { transport, ...quick, onStatus: (s) => statuses.push(s) });
      await lists.until("the first list", () => true);
      assert.equal(sub.status, "open");
      const id = client.track({ user_id: user, item_id: "item-0007", event_type: "click", rec_id: lists.last.rec_id });
      await client.flush();
      assert.equal(client.tracker.stats.accepted, 1);
      const reflecting = await lists.until("the list reflecting the click", (l) => l.last_event_id === id);
      assert.equal(reflecting.user_id, user);
      assert.ok(reflecting.seq > lists.all[0].seq);
      assertMonotonic(lists.all);
      await client.close();
      assert.equal(sub.status, "closed");
      assert.deepEqual(statuses, ["open", "closed"]);
    });

    test("an expiring stream token is refreshed through the callback and the stream goes on", async () => {
      const user = `js-${transport}-expiry`;
      let minted = 0;
      // Two-second tokens: the server ends the stream when each expires.
      const client = make({ baseUrl: server.url, token: () => (minted++, mintToken(server, user, 2)) });
      const admin = make({ baseUrl: server.url, apiKey: server.admin });
      const lists = new Lists();
      const sub = client.subscribe(user, lists.onList, { transport, ...quick });
      await lists.until("the first list", () => true);
      await eventually("the token to expire and the stream to reconnect with a fresh one", () =>
        sub.stats.tokenRefreshes >= 1 && sub.stats.connects >= 2 && sub.status === "open",
      );
      assert.ok(minted >= 2, `the provider was called ${minted} times`);
      const { event_ids } = await admin.postEvents({ user_id: user, item_id: "item-0011", event_type: "click" });
      await lists.until("the list reflecting an event posted after the refresh", (l) => l.last_event_id === event_ids[0]);
      assertMonotonic(lists.all);
      if (transport === "sse") {
        // The reconnection sent Last-Event-ID, so the server did not send the current list again.
        assert.equal(sub.stats.skipped, 0, "the server repeated a list the client had");
      } else {
        // A WebSocket subscription gets the current list on every subscribe: the client drops the repeat.
        assert.ok(sub.stats.skipped >= 1, "expected the repeated list to be skipped");
      }
      assert.equal(new Set(lists.all.map((l) => l.rec_id)).size, lists.all.length, "a list was delivered twice");
      await client.close();
    });

    test("a token for another user closes the subscription (403); erasing the user ends it as erased", async () => {
      const errors = [];
      const wrong = make({ baseUrl: server.url, token: () => mintToken(server, "someone-else") });
      const refused = wrong.subscribe(`js-${transport}-not-mine`, () => assert.fail("a list for a refused subscription"), {
        transport,
        ...quick,
        onError: (e) => errors.push(e),
      });
      await refused.done;
      assert.equal(refused.status, "closed");
      assert.equal(errors.at(-1).code, "forbidden");

      const user = `js-${transport}-erased`;
      const client = make({ baseUrl: server.url, token: () => mintToken(server, user) });
      const lists = new Lists();
      const sub = client.subscribe(user, lists.onList, { transport, ...quick });
      await lists.until("the first list", () => true);
      await make({ baseUrl: server.url, apiKey: server.admin }).erase({ user_id: user });
      await sub.done;
      assert.equal(sub.status, "erased");
    });
  });
}

test("both transports resume after the server restarts on the same port, and events tracked while it was down arrive", async () => {
  const clients = [];
  const subs = {};
  const lists = {};
  // The Last-Event-ID of each SSE connection, in order.
  const sentIds = [];
  const recording = (input, init) => {
    if (String(input).endsWith("/recommendations/stream")) sentIds.push(init?.headers?.["last-event-id"]);
    return fetch(input, init);
  };
  for (const transport of ["sse", "ws"]) {
    const user = `js-${transport}-restart`;
    const client = make({
      baseUrl: server.url,
      token: () => mintToken(server, user),
      track: { initialDelayMs: 100, maxDelayMs: 1000, maxRetries: 1000 },
      ...(transport === "sse" ? { fetch: recording } : {}),
    });
    clients.push(client);
    lists[transport] = new Lists();
    subs[transport] = client.subscribe(user, lists[transport].onList, { transport, ...quick });
  }
  for (const transport of ["sse", "ws"]) await lists[transport].until(`the first ${transport} list`, () => true);

  await server.stop();
  await eventually("both subscriptions to notice", () => subs.sse.status === "reconnecting" && subs.ws.status === "reconnecting");
  // Tracked while nothing listens: retried until the server is back.
  const ids = clients.map((client, i) =>
    client.track({ user_id: `js-${["sse", "ws"][i]}-restart`, item_id: "item-0003", event_type: "click" }),
  );
  const flushed = Promise.all(clients.map((c) => c.flush()));
  await eventually("a failed attempt to post the events", () => clients.every((c) => c.tracker.stats.retries >= 1));
  await server.start();
  await flushed;
  for (const [i, transport] of ["sse", "ws"].entries()) {
    assert.equal(clients[i].tracker.stats.accepted, 1);
    assert.equal(clients[i].tracker.stats.dropped, 0);
    await lists[transport].until(`the ${transport} list reflecting the event tracked during the restart`, (l) => l.last_event_id === ids[i]);
    assert.equal(subs[transport].status, "open");
    assert.ok(subs[transport].stats.connects >= 2);
    assertMonotonic(lists[transport].all);
  }
  // The SSE client sent the old server's event id to the new one (ids name the server process,
  // so it sent its current list all the same): the first connection had none, every later one had.
  assert.equal(sentIds[0], undefined);
  assert.ok(sentIds.length >= 2 && sentIds.slice(1).every((id) => /^\d+-\d+$/.test(id)), `Last-Event-IDs sent: ${sentIds}`);
  // The restarted (embedded) server counts seq from 1 again: the client took its lists as newer
  // by their time, not as stale by their seq.
  for (const transport of ["sse", "ws"]) {
    const after = lists[transport].all.at(-1);
    assert.ok(after.seq <= lists[transport].all[0].seq + 1, `seq ${after.seq}: did the server keep its state?`);
  }
  await Promise.all(clients.map((c) => c.close()));
});

/** A TCP proxy to `port` whose open connections can be frozen: kept open, nothing forwarded (a
 * half-open connection, as a dead NAT entry or a crashed middlebox leaves it). */
async function proxy(port) {
  const pairs = new Set();
  const server = createServer((client) => {
    const upstream = connect(port, "127.0.0.1");
    const pair = { client, upstream, frozen: false };
    pairs.add(pair);
    for (const [from, to] of [[client, upstream], [upstream, client]]) {
      from.on("data", (chunk) => pair.frozen || to.write(chunk));
      from.on("error", () => to.destroy());
      from.on("close", () => {
        to.destroy();
        pairs.delete(pair);
      });
    }
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    freeze: () => pairs.forEach((p) => (p.frozen = true)),
    close: () => {
      pairs.forEach((p) => (p.client.destroy(), p.upstream.destroy()));
      server.close();
    },
  };
}

test("an SSE stream that goes silent (no heartbeat for stallMs) is dropped and opened again", async () => {
  const relay = await proxy(server.port);
  try {
    const user = "js-sse-stall";
    const client = make({ baseUrl: relay.url, token: () => mintToken(server, user) });
    const lists = new Lists();
    const sub = client.subscribe(user, lists.onList, { ...quick, stallMs: 3000 });
    await lists.until("the first list", () => true);
    relay.freeze();
    await eventually("the stalled stream to be replaced by a new connection", () => sub.stats.connects >= 2 && sub.status === "open");
    const { event_ids } = await make({ baseUrl: server.url, apiKey: server.admin }).postEvents({
      user_id: user,
      item_id: "item-0005",
      event_type: "click",
    });
    await lists.until("the list reflecting an event posted after the stall", (l) => l.last_event_id === event_ids[0]);
  } finally {
    relay.close();
  }
});

test("isNewer: a repeat or an older list is never delivered; a restarted server's first list is", () => {
  const list = (seq, generated_at, rec_id = `r${seq}-${generated_at}`) => ({ seq, generated_at, rec_id, items: [] });
  assert.equal(isNewer(list(1, 10), undefined, false), true);
  assert.equal(isNewer(list(2, 20), list(1, 10), false), true);
  assert.equal(isNewer(list(2, 20), list(2, 20), true), false, "a repeat");
  assert.equal(isNewer(list(1, 10), list(2, 20), true), false, "an older list from another instance");
  assert.equal(isNewer(list(1, 30), list(5, 20), false), false, "a lower seq within one connection");
  assert.equal(isNewer(list(1, 30), list(5, 20), true), true, "a restarted server's first list");
});
