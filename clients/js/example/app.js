// The example page: one user's live list, with clicks tracked. Served by example/serve.mjs
// (which also mints the page's stream token) or any static server next to the built dist/.
//
// Query parameters: server (liverec's URL, default http://127.0.0.1:8080), user (default
// demo-user), transport (sse or ws, default sse).

import { LiverecClient } from "../dist/index.js";

const params = new URLSearchParams(location.search);
const server = params.get("server") ?? "http://127.0.0.1:8080";
const user = params.get("user") ?? "demo-user";
const transport = params.get("transport") === "ws" ? "ws" : "sse";
const $ = (id) => document.getElementById(id);

function log(line) {
  const now = new Date().toISOString().slice(11, 23);
  $("log").textContent = `${now} ${line}\n${$("log").textContent}`.slice(0, 4000);
}

// The page's credential: a stream token for its user from its own backend (serve.mjs answers
// /token with one minted by liverec's POST /v1/admin/tokens). Without a backend (auth off, as in
// the embedded demo) the page sends none.
const hasBackend = await fetch(`token?user=${encodeURIComponent(user)}`, { method: "HEAD" })
  .then((r) => r.ok)
  .catch(() => false);
const token = hasBackend
  ? async () => {
      const response = await fetch(`token?user=${encodeURIComponent(user)}`);
      if (!response.ok) throw new Error(`token: ${response.status}`);
      log("fetched a fresh stream token");
      return response.text();
    }
  : undefined;

const client = new LiverecClient({ baseUrl: server, token });
let current;

function render(list) {
  current = list;
  $("seq").textContent = String(list.seq);
  $("rec-id").textContent = list.rec_id;
  $("reflected").textContent = list.last_event_id ?? "-";
  const ol = $("list");
  ol.replaceChildren(
    ...list.items.map((item) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.textContent = item.item_id;
      button.dataset.item = item.item_id;
      button.addEventListener("click", () => click(item.item_id));
      li.append(button);
      return li;
    }),
  );
  log(`list ${list.seq}: ${list.items.length} items${list.last_event_id ? `, reflects ${list.last_event_id}` : ""}`);
}

async function click(itemId) {
  const id = client.track({ user_id: user, item_id: itemId, event_type: "click", rec_id: current?.rec_id });
  $("clicked").textContent = id;
  log(`clicked ${itemId} (${id})`);
  // A click should change the list now: send it at once rather than with the next batch.
  await client.flush();
}

$("user").textContent = user;
$("transport").textContent = transport;
client.subscribe(user, render, {
  transport,
  onStatus: (status) => {
    $("status").textContent = status;
    $("status").dataset.status = status;
    log(`stream ${status}`);
  },
  onError: (error) => log(`stream: ${error.message}`),
});

// For the browser test and for poking at it from the console.
window.liverec = { client, user, track: (event) => client.track({ user_id: user, ...event }) };
