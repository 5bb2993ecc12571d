// liverec live dashboard. Polls this server's own endpoints with relative URLs (so the page also
// works behind a path prefix) and watches one user's list over Server-Sent Events. No framework,
// no build step, nothing fetched from anywhere else.
"use strict";

(() => {
  const METRICS_EVERY_MS = 1000;
  const STATE_EVERY_MS = 3000;
  // Rates and percentiles are taken between the newest scrape and the oldest one within this span.
  const WINDOW_MS = 10000;
  const SPARK_POINTS = 60;
  const LOG_LINES = 8;
  const STAGES = ["receive", "apply", "model", "push"];

  const $ = (selector) => document.querySelector(selector);

  // With auth on, the operator pastes an admin API key (or a user's stream token) once; it stays
  // in this tab's sessionStorage and goes with every request (EventSource cannot set headers, so
  // the stream takes it as access_token). The field shows only once the server has asked for a
  // credential (a 401) or one is stored: with auth off there is nothing to paste.
  const CREDENTIAL_KEY = "liverec.credential";
  const credential = () => sessionStorage.getItem(CREDENTIAL_KEY) || "";
  function authFetch(url, init = {}) {
    const headers = new Headers(init.headers || {});
    if (credential()) headers.set("authorization", `Bearer ${credential()}`);
    return fetch(url, { ...init, headers }).then((response) => {
      if (response.status === 401) showCredential();
      return response;
    });
  }
  function showCredential() {
    const input = document.querySelector("#credential");
    if (input) input.hidden = false;
  }
  function withToken(url) {
    return credential() ? `${url}${url.includes("?") ? "&" : "?"}access_token=${encodeURIComponent(credential())}` : url;
  }
  document.addEventListener("DOMContentLoaded", () => {
    const input = document.querySelector("#credential");
    if (!input) return;
    input.value = credential();
    if (credential()) input.hidden = false;
    input.addEventListener("change", () => {
      if (input.value) sessionStorage.setItem(CREDENTIAL_KEY, input.value.trim());
      else sessionStorage.removeItem(CREDENTIAL_KEY);
      location.reload();
    });
  });

  /** A new element with attributes and children (strings become text, never HTML). */
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else if (key in node) node[key] = value;
      else node.setAttribute(key, value);
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function setText(selector, text) {
    const node = $(selector);
    if (node && node.textContent !== text) node.textContent = text;
  }

  // ---------------------------------------------------------------------------------------------
  // Formatting

  function fmtRate(value) {
    if (value === null || !Number.isFinite(value)) return "—";
    if (value < 10) return value.toFixed(1);
    return Math.round(value).toLocaleString("en-US");
  }

  function fmtCount(value) {
    return value === null || value === undefined ? "—" : Math.round(value).toLocaleString("en-US");
  }

  function fmtSeconds(seconds) {
    if (seconds === null || !Number.isFinite(seconds)) return "—";
    if (seconds < 1e-3) return `${Math.round(seconds * 1e6)} µs`;
    const ms = seconds * 1e3;
    if (ms < 10) return `${ms.toFixed(2)} ms`;
    if (ms < 100) return `${ms.toFixed(1)} ms`;
    if (ms < 1000) return `${Math.round(ms)} ms`;
    return `${seconds.toFixed(2)} s`;
  }

  /** A quantile estimate: `{value, over}` where `over` means "above the largest finite bucket". */
  function fmtQuantile(q) {
    if (!q) return "—";
    return q.over ? `> ${fmtSeconds(q.value)}` : fmtSeconds(q.value);
  }

  function fmtShare(value, digits = 1) {
    return value === null || value === undefined ? "—" : `${(value * 100).toFixed(digits)} %`;
  }

  function fmtAgo(atMs) {
    const seconds = Math.max(0, Math.round((Date.now() - atMs) / 1000));
    if (seconds < 60) return `${seconds} s ago`;
    if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
    return new Date(atMs).toLocaleDateString();
  }

  function clock(date = new Date()) {
    return date.toLocaleTimeString([], { hour12: false });
  }

  // ---------------------------------------------------------------------------------------------
  // Status line

  const failures = new Map();

  function reportFailure(source, error) {
    failures.set(source, error instanceof Error ? error.message : String(error));
    renderStatus();
  }

  function reportSuccess(source) {
    failures.delete(source);
    renderStatus();
  }

  function renderStatus() {
    const status = $("#status");
    if (failures.size > 0) {
      const [source, message] = failures.entries().next().value;
      status.dataset.state = "error";
      status.textContent = `${source}: ${message}`;
    } else {
      status.dataset.state = "ok";
      status.textContent = `live · ${clock()}`;
    }
  }

  window.addEventListener("error", (event) => reportFailure("script", event.message));
  window.addEventListener("unhandledrejection", (event) => reportFailure("script", event.reason));

  async function getJson(url) {
    const response = await authFetch(url, { headers: { accept: "application/json" }, cache: "no-store" });
    if (!response.ok) throw new Error(`${url} answered ${response.status}`);
    return response.json();
  }

  // ---------------------------------------------------------------------------------------------
  // Prometheus text exposition

  /** Samples of the text format: `[{name, labels, value}]`. */
  function parseExposition(text) {
    const samples = [];
    const line = /^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
    const label = /([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
    for (const raw of text.split("\n")) {
      if (raw === "" || raw.startsWith("#")) continue;
      const match = line.exec(raw);
      if (!match) continue;
      const labels = {};
      for (const [, key, value] of (match[2] || "").matchAll(label)) {
        labels[key] = value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
      }
      samples.push({ name: match[1], labels, value: Number(match[3]) });
    }
    return samples;
  }

  function total(samples, name, where = () => true) {
    let sum = 0;
    let found = false;
    for (const s of samples) {
      if (s.name === name && where(s.labels)) {
        sum += s.value;
        found = true;
      }
    }
    return found ? sum : null;
  }

  /** Cumulative buckets `[{le, count}]` (ascending, ending with +Inf) of one histogram series. */
  function buckets(samples, name, where = () => true) {
    const out = [];
    for (const s of samples) {
      if (s.name === `${name}_bucket` && where(s.labels)) {
        out.push({ le: s.labels.le === "+Inf" ? Infinity : Number(s.labels.le), count: s.value });
      }
    }
    return out.sort((a, b) => a.le - b.le);
  }

  /** What one scrape says, reduced to what the page shows. */
  function snapshot(samples) {
    const histograms = { event_to_push: buckets(samples, "liverec_event_to_push_seconds") };
    for (const stage of STAGES) {
      histograms[stage] = buckets(samples, "liverec_stage_seconds", (l) => l.stage === stage);
    }
    return {
      at: performance.now(),
      events: total(samples, "liverec_ingest_events_total"),
      pushes: total(samples, "liverec_push_updates_total"),
      sessions: total(samples, "liverec_sessions_active"),
      sse: total(samples, "liverec_stream_subscribers", (l) => l.kind === "sse"),
      websocket: total(samples, "liverec_stream_subscribers", (l) => l.kind === "websocket"),
      histograms,
    };
  }

  /** Counter increase from `before` to `after`; a counter that went down restarted from zero. */
  function increase(before, after) {
    if (after === null || before === null) return null;
    return after >= before ? after - before : after;
  }

  /** Bucket-wise increase; a histogram whose count went down restarted from zero. */
  function bucketIncrease(before, after) {
    if (!after.length) return [];
    const reset = !before.length || after[after.length - 1].count < before[before.length - 1].count;
    if (reset || before.length !== after.length) return after;
    return after.map((b, i) => ({ le: b.le, count: b.count - before[i].count }));
  }

  /** The q-quantile of cumulative buckets, linear within the bucket that holds it. */
  function quantile(q, cumulative) {
    if (!cumulative.length) return null;
    const count = cumulative[cumulative.length - 1].count;
    if (!(count > 0)) return null;
    const rank = q * count;
    let lower = 0;
    let below = 0;
    for (const b of cumulative) {
      if (b.count >= rank) {
        if (b.le === Infinity) return { value: lower, over: true };
        const inBucket = b.count - below;
        const value = inBucket > 0 ? lower + ((b.le - lower) * (rank - below)) / inBucket : b.le;
        return { value, over: false };
      }
      lower = b.le;
      below = b.count;
    }
    return null;
  }

  // ---------------------------------------------------------------------------------------------
  // Metrics panel

  let snapshots = [];
  const sparks = { events: [], pushes: [] };

  async function pollMetrics() {
    const response = await authFetch("metrics", { cache: "no-store" });
    if (!response.ok) throw new Error(`metrics answered ${response.status}`);
    const now = snapshot(parseExposition(await response.text()));
    const previous = snapshots[snapshots.length - 1];
    // Keep the scrapes within the window, and always the one before this one (after a pause).
    snapshots = snapshots.filter((s) => now.at - s.at <= WINDOW_MS || s === previous);
    const base = snapshots[0];
    snapshots.push(now);
    if (previous) {
      const seconds = (now.at - previous.at) / 1000;
      pushSpark("events", (increase(previous.events, now.events) ?? NaN) / seconds);
      pushSpark("pushes", (increase(previous.pushes, now.pushes) ?? NaN) / seconds);
    }
    renderMetrics(base, now);
  }

  function pushSpark(name, value) {
    const points = sparks[name];
    points.push(Number.isFinite(value) ? value : 0);
    if (points.length > SPARK_POINTS) points.shift();
    drawSpark($(`#${name}-spark`), points);
  }

  function drawSpark(svg, points) {
    const max = Math.max(1, ...points);
    const step = 100 / (SPARK_POINTS - 1);
    const offset = (SPARK_POINTS - points.length) * step;
    const coords = points.map((v, i) => `${(offset + i * step).toFixed(2)},${(23 - (v / max) * 22).toFixed(2)}`);
    let line = svg.querySelector("polyline");
    if (!line) {
      line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
      line.setAttribute("vector-effect", "non-scaling-stroke");
      svg.append(line);
    }
    line.setAttribute("points", coords.join(" "));
  }

  function renderMetrics(base, now) {
    const seconds = base && base !== now ? (now.at - base.at) / 1000 : null;
    const rate = (key) => {
      const delta = seconds ? increase(base[key], now[key]) : null;
      return delta === null ? null : delta / seconds;
    };
    setText("#events-rate", fmtRate(rate("events")));
    setText("#pushes-rate", fmtRate(rate("pushes")));
    setText("#sessions", fmtCount(now.sessions));
    setText("#subscribers", fmtCount((now.sse || 0) + (now.websocket || 0)));
    setText("#subscribers-sse", fmtCount(now.sse));
    setText("#subscribers-ws", fmtCount(now.websocket));
    setText("#latency-window", seconds ? `last ${Math.round(seconds)} s` : "waiting for a second scrape");

    const rows = [["event → push", "event_to_push"], ...STAGES.map((s) => [s, s])];
    const tbody = $("#latency tbody");
    const fresh = rows.map(([label, key]) => {
      const delta = seconds ? bucketIncrease(base.histograms[key], now.histograms[key]) : [];
      const count = delta.length ? delta[delta.length - 1].count : null;
      const qs = [0.5, 0.9, 0.99].map((q) => quantile(q, delta));
      if (key === "event_to_push") {
        setText("#e2p-p50", fmtQuantile(qs[0]));
        setText("#e2p-p90", fmtQuantile(qs[1]));
        setText("#e2p-p99", fmtQuantile(qs[2]));
      }
      return h(
        "tr",
        { "data-stage": key, class: key === "event_to_push" ? "main" : "" },
        h("th", {}, label),
        qs.map((q) => h("td", {}, fmtQuantile(q))),
        h("td", {}, count === null ? "—" : fmtCount(count)),
      );
    });
    tbody.replaceChildren(...fresh);
  }

  // ---------------------------------------------------------------------------------------------
  // Monitor: CTR and drift

  async function pollMonitor() {
    const report = await getJson("v1/monitor");
    renderCtr(report);
    renderDrift(report);
  }

  function renderCtr(report) {
    setText(
      "#monitor-summary",
      `Window ${report.window_secs} s · ${fmtCount(report.events)} events from ${fmtCount(report.active_users)} users · ` +
        `catalogue coverage ${fmtShare(report.coverage)}`,
    );
    const variants = [...report.variants].sort(
      (a, b) => a.version.localeCompare(b.version) || a.variant.localeCompare(b.variant),
    );
    // The bars share one scale: the smallest of 5 %, 10 %, 20 %, 50 %, 100 % that holds every interval.
    const highest = Math.max(0, ...variants.map((v) => v.ctr.high));
    const scale = [0.05, 0.1, 0.2, 0.5, 1].find((s) => highest <= s) || 1;
    const rows = variants.map((v) => {
      const bar = h("div", { class: "interval", title: `${fmtShare(v.ctr.low)} to ${fmtShare(v.ctr.high)}` });
      const range = h("span", { class: "range" });
      range.style.left = `${(v.ctr.low / scale) * 100}%`;
      range.style.width = `${Math.max(0.5, ((v.ctr.high - v.ctr.low) / scale) * 100)}%`;
      const tick = h("span", { class: "tick" });
      tick.style.left = `${(v.ctr.value / scale) * 100}%`;
      bar.append(range, tick);
      if (v.baseline_ctr !== null && v.baseline_ctr !== undefined) {
        const baseline = h("span", { class: "baseline", title: `baseline ${fmtShare(v.baseline_ctr)}` });
        baseline.style.left = `${(v.baseline_ctr / scale) * 100}%`;
        bar.append(baseline);
      }
      return h(
        "tr",
        { "data-version": v.version, "data-variant": v.variant },
        h("td", { class: "text" }, h("code", {}, v.version)),
        h("td", { class: "text" }, h("span", { class: `badge variant-${v.variant}` }, v.variant)),
        h("td", {}, fmtCount(v.impressions)),
        h("td", {}, fmtCount(v.clicks)),
        h("td", { class: "ctr" }, fmtShare(v.ctr.value)),
        h(
          "td",
          { class: "bar-col" },
          bar,
          h("div", { class: "interval-text" }, `${fmtShare(v.ctr.low)} – ${fmtShare(v.ctr.high)} (scale 0 – ${fmtShare(scale, 0)})`),
        ),
      );
    });
    if (!rows.length) {
      rows.push(h("tr", {}, h("td", { class: "empty", colSpan: 6 }, "No lists served in the window yet.")));
    }
    $("#ctr tbody").replaceChildren(...rows);
  }

  function renderDrift(report) {
    const d = report.drift;
    const meters = [
      ["popularity", "Item popularity PSI", d.popularity_psi, d.psi_threshold],
      ["category", "Category mix PSI", d.category_psi, d.psi_threshold],
      ["context", "Context mix PSI", d.context_psi, d.psi_threshold],
      ["ctr_z", "CTR drop z", d.ctr_z, d.z_threshold],
    ].map(([key, label, value, threshold]) => {
      const known = value !== null && value !== undefined;
      const over = known && value > threshold;
      const fill = h("span", { class: "fill" });
      // The threshold sits in the middle of the track.
      fill.style.width = `${known ? Math.min(1, Math.max(0, value / (2 * threshold))) * 100 : 0}%`;
      return h(
        "div",
        { class: `meter${over ? " over" : ""}`, "data-drift": key, "data-over": String(over) },
        h("span", { class: "meter-label" }, label),
        h("span", { class: "track", title: `threshold ${threshold}` }, fill, h("span", { class: "threshold" })),
        h("span", { class: "meter-value" }, known ? value.toFixed(3) : "—", h("span", { class: "muted" }, ` / ${threshold}`)),
      );
    });
    $("#drift").replaceChildren(...meters);
    setText(
      "#drift-reference",
      d.reference ? `Reference: ${d.reference}. The bar's middle mark is the threshold.` : "No reference yet: drift is judged once a full window has been seen.",
    );
    const breaches = [...report.breaches].sort((a, b) => b.at_ms - a.at_ms).slice(0, LOG_LINES);
    const items = breaches.map((b) =>
      h(
        "li",
        { "data-kind": b.kind },
        h("span", { class: "when", title: new Date(b.at_ms).toLocaleString() }, fmtAgo(b.at_ms)),
        h("span", { class: "badge warn" }, b.kind.replace(/_/g, " ")),
        h("span", {}, b.reason),
      ),
    );
    if (!items.length) items.push(h("li", { class: "empty" }, "None in the window."));
    $("#breaches").replaceChildren(...items);
  }

  // ---------------------------------------------------------------------------------------------
  // Models and the loop

  async function pollModels() {
    const models = await getJson("v1/admin/models");
    setText("#serving", models.serving_name ? `${models.serving_name} (${models.serving})` : models.serving);
    const state = $("#loop-state");
    state.textContent = models.state.replace(/_/g, " ");
    state.dataset.state = models.state;

    const arms = [models.traffic && models.traffic.control, models.traffic && models.traffic.challenger].filter(Boolean);
    $("#traffic").replaceChildren(
      ...arms.map((arm) =>
        h("span", { class: "arm" }, h("span", { class: `badge variant-${arm.variant}` }, arm.variant), " ", h("code", {}, arm.version), ` ${fmtShare(arm.share, 0)}`),
      ),
    );

    const versions = (models.versions || []).map((v) =>
      h(
        "tr",
        { "data-name": v.name, "data-status": v.status },
        h("td", {}, v.name),
        h("td", {}, h("code", {}, v.version)),
        h("td", {}, h("span", { class: `badge status-${v.status}` }, v.status.replace(/_/g, " "))),
      ),
    );
    if (!versions.length) {
      versions.push(
        h("tr", {}, h("td", { class: "empty", colSpan: 3 }, `No registry versions: the ${models.kind || "online"} model serves.`)),
      );
    }
    $("#versions tbody").replaceChildren(...versions);

    const history = (models.history || []).slice(0, LOG_LINES).map((step) =>
      h(
        "li",
        { "data-step": step.step },
        h("span", { class: "when", title: new Date(step.at_ms).toLocaleString() }, fmtAgo(step.at_ms)),
        h("span", { class: `badge step-${step.step}` }, step.step.replace(/_/g, " ")),
        step.run !== undefined && step.run !== null ? h("span", { class: "muted" }, `run ${step.run}`) : null,
        h("span", {}, step.detail || step.version || ""),
      ),
    );
    if (!history.length) history.push(h("li", { class: "empty" }, "Nothing has happened yet."));
    $("#history").replaceChildren(...history);
  }

  async function pollReady() {
    const ready = await getJson("readyz");
    const durability = ready.durable ? "durable" : "in memory only";
    setText(
      "#backend",
      `bus ${ready.bus} · store ${ready.store} (${durability}${ready.degraded ? ", degraded" : ""}) · ${fmtCount(ready.catalog_items)} items`,
    );
  }

  // ---------------------------------------------------------------------------------------------
  // Polling loops: one request at a time each, paused while the page is hidden.

  function loop(name, everyMs, poll) {
    let timer = null;
    let busy = false;
    const run = async () => {
      if (busy) return;
      clearTimeout(timer);
      busy = true;
      if (!document.hidden) {
        try {
          await poll();
          reportSuccess(name);
        } catch (error) {
          reportFailure(name, error);
        }
      }
      busy = false;
      timer = setTimeout(run, everyMs);
    };
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) run();
    });
    run();
  }

  // ---------------------------------------------------------------------------------------------
  // Demo: one user's live list

  const itemCache = new Map();
  let source = null;
  let watched = null;
  let current = null; // {list, at}: the newest list and when it arrived
  let pending = null; // {eventId, item, at}: a click waiting for the list that reflects it

  function item(id) {
    if (!itemCache.has(id)) {
      itemCache.set(
        id,
        authFetch(`v1/items/${encodeURIComponent(id)}`, { headers: { accept: "application/json" } })
          .then((r) => (r.ok ? r.json() : null))
          .catch(() => null),
      );
    }
    return itemCache.get(id);
  }

  function log(text, kind = "") {
    const list = $("#demo-log");
    list.prepend(h("li", { class: kind }, h("span", { class: "when" }, clock()), h("span", {}, text)));
    while (list.children.length > LOG_LINES) list.lastChild.remove();
  }

  function streamState(state, text) {
    const badge = $("#stream-state");
    badge.dataset.state = state;
    badge.textContent = text;
  }

  function watch(user) {
    if (source) source.close();
    watched = user;
    current = null;
    pending = null;
    $("#recs").replaceChildren();
    setText("#list-meta", "");
    const url = new URL(location.href);
    url.searchParams.set("user", user);
    history.replaceState(null, "", url);
    streamState("connecting", "connecting");
    streamUrl(user).then((url) => {
      if (watched === user) listen(user, url);
    });
    log(`watching ${user}`);
  }

  // API keys never travel in a query string (the server refuses them there): with a key pasted,
  // mint a stream token for the watched user and give the stream that. A token ends the stream
  // with `token_expired` when it expires; the dashboard then mints a fresh one.
  async function streamUrl(user) {
    const path = `v1/users/${encodeURIComponent(user)}/recommendations/stream`;
    const key = credential();
    if (!key || key.split(".").length === 3) return withToken(path);
    const response = await authFetch("v1/admin/tokens", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ user_id: user }),
    });
    if (!response.ok) return path;
    const { token } = await response.json();
    return `${path}?access_token=${encodeURIComponent(token)}`;
  }

  function listen(user, url) {
    if (source) source.close();
    const stream = new EventSource(url);
    source = stream;
    stream.addEventListener("token_expired", () => {
      stream.close();
      if (stream === source) watch(user);
    });
    stream.addEventListener("open", () => streamState("live", "live"));
    stream.addEventListener("recommendations", (event) => {
      if (stream === source) showList(JSON.parse(event.data));
    });
    stream.addEventListener("shutdown", () => {
      stream.close();
      streamState("closed", "server shutting down");
    });
    stream.addEventListener("error", () => {
      if (stream !== source) return;
      if (stream.readyState === EventSource.CLOSED) {
        streamState("closed", "refused: check the user id");
      } else {
        streamState("connecting", "reconnecting");
      }
    });
  }

  function showList(list) {
    const before = current ? new Map(current.list.items.map((it, i) => [it.item_id, i])) : null;
    current = { list, at: performance.now() };
    const ol = $("#recs");
    ol.dataset.seq = list.seq;
    ol.dataset.recId = list.rec_id;
    setText(
      "#list-meta",
      `list #${list.seq} · ${list.model_version} · ${list.variant} · ${clock(new Date(list.generated_at))}`,
    );
    const rows = list.items.map((rec, i) => {
      let move = null;
      if (before) {
        const was = before.get(rec.item_id);
        if (was === undefined) move = h("span", { class: "move new", title: "new in this list" }, "new");
        else if (was > i) move = h("span", { class: "move up", title: `was #${was + 1}` }, `▲${was - i}`);
        else if (was < i) move = h("span", { class: "move down", title: `was #${was + 1}` }, `▼${i - was}`);
      }
      const li = h(
        "li",
        { "data-item": rec.item_id, "data-rank": String(i + 1), class: before && !before.has(rec.item_id) ? "fresh" : "" },
        h(
          "button",
          { type: "button", title: `Click ${rec.item_id}: posts a click event` },
          h("span", { class: "rank" }, String(i + 1)),
          h("span", { class: "body" }, h("span", { class: "title" }, rec.item_id), h("span", { class: "cats" })),
          move,
          h("span", { class: "score", title: "score" }, rec.score.toFixed(3)),
        ),
      );
      item(rec.item_id).then((view) => fillItem(li, rec.item_id, view));
      return li;
    });
    ol.replaceChildren(...rows);
    settle();
  }

  function fillItem(li, id, view) {
    if (!view) return;
    li.querySelector(".title").textContent = view.title || id;
    const cats = (view.categories || []).map((c) => h("span", { class: "chip" }, c));
    if (view.title) cats.push(h("span", { class: "item-id" }, id));
    li.querySelector(".cats").replaceChildren(...cats);
  }

  async function click(li) {
    if (!current || li.classList.contains("pending")) return;
    const itemId = li.dataset.item;
    const list = current.list;
    li.classList.add("pending");
    const at = performance.now();
    try {
      const response = await authFetch("v1/events", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ user_id: list.user_id, item_id: itemId, event_type: "click", rec_id: list.rec_id }),
      });
      const body = await response.json().catch(() => null);
      if (response.status !== 202) {
        const message = body && body.error ? body.error.message : `status ${response.status}`;
        li.classList.remove("pending");
        log(`click on ${itemId} refused: ${message}`, "error");
        return;
      }
      pending = { eventId: body.event_ids[0], item: itemId, at };
      log(`clicked ${itemId} (list #${list.seq})`);
      settle();
    } catch (error) {
      li.classList.remove("pending");
      log(`click on ${itemId} failed: ${error.message}`, "error");
    }
  }

  /** Once the newest list reflects the pending click, say how long the round trip took. */
  function settle() {
    if (!pending || !current || current.list.last_event_id !== pending.eventId) return;
    const ms = Math.max(0, current.at - pending.at);
    const gone = !current.list.items.some((it) => it.item_id === pending.item);
    log(
      `list #${current.list.seq} reflects the click ${ms.toFixed(0)} ms after it was sent` +
        (gone ? `; ${pending.item} is no longer recommended` : ""),
      "ok",
    );
    pending = null;
  }

  function setupDemo() {
    const input = $("#user");
    const initial = new URLSearchParams(location.search).get("user");
    if (initial) input.value = initial;
    $("#demo-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const user = input.value.trim();
      if (user && user !== watched) watch(user);
    });
    $("#new-visitor").addEventListener("click", () => {
      input.value = `visitor-${Math.random().toString(36).slice(2, 8)}`;
      watch(input.value);
    });
    $("#recs").addEventListener("click", (event) => {
      const li = event.target.closest("li[data-item]");
      if (li) click(li);
    });
    watch(input.value.trim() || "demo-user");
  }

  // ---------------------------------------------------------------------------------------------

  setupDemo();
  loop("metrics", METRICS_EVERY_MS, pollMetrics);
  loop("v1/monitor", STATE_EVERY_MS, pollMonitor);
  loop("v1/admin/models", STATE_EVERY_MS, pollModels);
  loop("readyz", STATE_EVERY_MS, pollReady);
})();
