// The example page in headless Chromium (Debian's /usr/bin/chromium, or $LIVEREC_CHROMIUM) against
// a real liverec with auth on, the page on another origin with its own token backend
// (example/serve.mjs): the list shows, a click brings the list that reflects it, the server
// restarted on the same port -> the stream resumes and clicks work again; events still queued
// when the page goes away are delivered (the page-hide flush).

import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { chromium } from "playwright-core";

import { startExample } from "../example/serve.mjs";
import { DEADLINE_MS, eventually, freePort, startServer } from "./support.mjs";

const executablePath = process.env.LIVEREC_CHROMIUM ?? "/usr/bin/chromium";
const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

let server;
let example;
let context;
let profile;
before(async () => {
  const examplePort = await freePort();
  const origin = `http://127.0.0.1:${examplePort}`;
  server = await startServer({ origins: [origin] });
  example = await startExample({ port: examplePort, server: server.url, adminKey: server.admin });
  profile = mkdtempSync(join(tmpdir(), "liverec-chromium-"));
  context = await chromium.launchPersistentContext(profile, { executablePath, headless: true, args: FLAGS });
  context.setDefaultTimeout(DEADLINE_MS);
});
after(async () => {
  await context?.close();
  await example?.close();
  await server?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
});

for (const transport of ["sse", "ws"]) {
  describe(`the example page over ${transport}`, () => {
    test("click -> the list that reflects it; server restarted -> the stream resumes", async () => {
      const page = await context.newPage();
      const errors = [];
      page.on("pageerror", (error) => errors.push(error.message));
      const user = `browser-${transport}`;
      await page.goto(`${example.url}/example/?server=${encodeURIComponent(server.url)}&user=${user}&transport=${transport}`);
      await page.locator('#status[data-status="open"]').waitFor();
      await page.locator("#list button").first().waitFor();
      const seq = Number(await page.locator("#seq").textContent());

      // A click: the page tracks it and the list that reflects it arrives over the stream.
      await page.locator("#list button").first().click();
      const clicked = await eventually("the page to track the click", async () => {
        const text = await page.locator("#clicked").textContent();
        return text !== "none" && text;
      });
      await page.waitForFunction((id) => document.getElementById("reflected").textContent === id, clicked);
      assert.ok(Number(await page.locator("#seq").textContent()) > seq);

      // The server restarts on the same port: the page says so, reconnects, and clicks work again.
      await server.stop();
      await page.locator('#status[data-status="reconnecting"]').waitFor();
      await server.start();
      await page.locator('#status[data-status="open"]').waitFor();
      await page.locator("#list button").nth(1).click();
      const second = await eventually("the page to track the second click", async () => {
        const text = await page.locator("#clicked").textContent();
        return text !== clicked && text;
      });
      await page.waitForFunction((id) => document.getElementById("reflected").textContent === id, second);
      assert.deepEqual(errors, []);
      await page.close();
    });
  });
}

test("events still queued when the page goes away are delivered", async () => {
  const page = await context.newPage();
  const user = "browser-pagehide";
  await page.goto(`${example.url}/example/?server=${encodeURIComponent(server.url)}&user=${user}`);
  await page.locator('#status[data-status="open"]').waitFor();
  // Queued, not flushed (the batch would go a second later): then the page is left at once.
  const id = await page.evaluate(() => window.liverec.track({ item_id: "item-0042", event_type: "view" }));
  const pending = await page.evaluate(() => window.liverec.client.tracker.pending);
  assert.equal(pending, 1);
  await page.goto("about:blank");
  await page.close();
  const headers = { authorization: `Bearer ${server.admin}` };
  await eventually("the event queued at page hide to be stored", async () => {
    const exported = await (await fetch(`${server.url}/v1/users/${user}/export`, { headers })).json();
    return exported.profile.interactions.some((i) => i.event_id === id);
  });
});

test("events queued when the page goes away are delivered by a page without a credential too (auth off)", async () => {
  const examplePort = await freePort();
  const open = await startServer({ auth: false, origins: [`http://127.0.0.1:${examplePort}`] });
  const plain = await startExample({ port: examplePort, server: open.url, adminKey: undefined });
  try {
    const page = await context.newPage();
    const user = "browser-beacon";
    await page.goto(`${plain.url}/example/?server=${encodeURIComponent(open.url)}&user=${user}`);
    await page.locator('#status[data-status="open"]').waitFor();
    const id = await page.evaluate(() => window.liverec.track({ item_id: "item-0042", event_type: "view" }));
    await page.goto("about:blank");
    await page.close();
    await eventually("the event queued at page hide to be stored", async () => {
      const exported = await (await fetch(`${open.url}/v1/users/${user}/export`)).json();
      return exported.profile.interactions.some((i) => i.event_id === id);
    });
  } finally {
    await plain.close();
    await open.close();
  }
});
