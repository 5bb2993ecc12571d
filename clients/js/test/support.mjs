// The server under test: a real liverec binary (target/debug/liverec, or $LIVEREC_BIN) on a free
// port, with auth on and an admin key made by `liverec key`, restartable on the same port; and
// waits that poll with a deadline instead of sleeping.

import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

if (typeof WebSocket === "undefined") {
  throw new Error("no WebSocket in this Node: Node 20 needs NODE_OPTIONS=--experimental-websocket (test.sh sets it)");
}

export const repoRoot = resolve(fileURLToPath(new URL("../../..", import.meta.url)));

/** How long one wait may see no progress before the test fails: generous, because a debug server
 * on a loaded machine starts slowly. It bounds a hang; it asserts nothing about speed. */
export const DEADLINE_MS = Number(process.env.LIVEREC_TEST_DEADLINE_MS ?? 90_000);

export function liverecBin() {
  const bin = process.env.LIVEREC_BIN ?? join(repoRoot, "target", "debug", "liverec");
  if (!existsSync(bin)) {
    throw new Error(`no liverec binary at ${bin}: run \`cargo build -p liverec --bin liverec\` or set LIVEREC_BIN`);
  }
  return bin;
}

/** A port nobody listens on now (the kernel's pick). */
export function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

/** A new admin API key: `{ key, entry }`, the entry being the TOML `liverec key` prints. */
export function adminKey() {
  // The key on stdout, the entry (with comments) on stderr.
  const run = spawnSync(liverecBin(), ["key", "--id", "js-tests", "--role", "admin"], { encoding: "utf8" });
  const out = `${run.stdout}\n${run.stderr}`;
  const lines = out.split("\n");
  const key = run.stdout.trim();
  const entry = lines.slice(lines.findIndex((l) => l.startsWith("[[auth.api_keys]]"))).join("\n");
  if (run.status !== 0 || !key.startsWith("lrk_") || !entry.includes("hash")) throw new Error(`unexpected output of liverec key:\n${out}`);
  return { key: key.trim(), entry };
}

/** Polls `check` (sync or async) until it returns a value other than undefined/false/null; fails
 * after `ms` with `what` in the message. */
export async function eventually(what, check, ms = DEADLINE_MS) {
  const start = Date.now();
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value !== undefined && value !== false && value !== null) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() - start > ms) {
      throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? ` (last error: ${last.message})` : ""}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

/**
 * Starts liverec. Options: `auth` (default true: auth on with an admin key, `server.admin`),
 * `origins` (auth.allowed_origins), `extra` (more TOML), `port` (default a free one).
 * Returns `{ url, port, admin, stop(), restart(), logs() }`; `restart()` stops it and starts a
 * new process on the same port with the same configuration (the embedded state is lost, as in a
 * real restart).
 */
export async function startServer({ auth = true, origins = [], extra = "", port } = {}) {
  const dir = mkdtempSync(join(tmpdir(), "liverec-js-"));
  const admin = auth ? adminKey() : undefined;
  const config = [
    "[server]",
    "workers = 1",
    "shutdown_timeout_secs = 1",
    "[session]",
    "arbiters = 1",
    "[demo]",
    "items = 100",
    "users = 50",
    "[trainer]",
    "enabled = false",
    "[model]",
    `registry_dir = ${JSON.stringify(join(dir, "models"))}`,
    "[log]",
    'level = "warn"',
    "[auth]",
    `mode = ${auth ? '"on"' : '"off"'}`,
    'token_secret = "a test secret that is long enough to sign tokens"',
    `allowed_origins = ${JSON.stringify(origins)}`,
    admin ? admin.entry : "",
    extra,
  ].join("\n");
  const file = join(dir, "config.toml");
  writeFileSync(file, config);
  const server = {
    port: port ?? (await freePort()),
    admin: admin?.key,
    dir,
    child: undefined,
    output: "",
    get url() {
      return `http://127.0.0.1:${this.port}`;
    },
    logs() {
      return this.output;
    },
    async start() {
      const child = spawn(liverecBin(), ["serve", "--config", file, "--listen", `127.0.0.1:${this.port}`], {
        cwd: dir,
        stdio: ["ignore", "pipe", "pipe"],
        env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "warn" },
      });
      this.child = child;
      child.stdout.on("data", (d) => (this.output += d));
      child.stderr.on("data", (d) => (this.output += d));
      const exited = new Promise((r) => child.once("exit", r));
      this.exited = exited;
      await eventually(`liverec to answer /readyz on port ${this.port}`, async () => {
        if (child.exitCode !== null) throw new Error(`liverec exited (${child.exitCode}):\n${this.output}`);
        const response = await fetch(`${this.url}/readyz`).catch(() => undefined);
        return response?.status === 200;
      });
    },
    /** Stops the process (SIGTERM, as a deploy does; SIGKILL with `kill: true`). */
    async stop({ kill = false } = {}) {
      if (!this.child || this.child.exitCode !== null || this.child.signalCode !== null) return;
      this.child.kill(kill ? "SIGKILL" : "SIGTERM");
      await this.exited;
    },
    async restart(options) {
      await this.stop(options);
      await this.start();
    },
    async close() {
      await this.stop({ kill: true });
      rmSync(dir, { recursive: true, force: true });
    },
  };
  await server.start();
  return server;
}

/** Mints a stream token for `user` with the admin key (what a page's backend does). */
export async function mintToken(server, user, ttlSecs = 600) {
  const response = await fetch(`${server.url}/v1/admin/tokens`, {
    method: "POST",
    headers: { authorization: `Bearer ${server.admin}`, "content-type": "application/json" },
    body: JSON.stringify({ user_id: user, ttl_secs: ttlSecs }),
  });
  if (response.status !== 201) throw new Error(`minting a token: ${response.status} ${await response.text()}`);
  return (await response.json()).token;
}

/** Collects the lists a subscription delivers, and waits for one that matches. */
export class Lists {
  constructor() {
    this.all = [];
    this.onList = (list) => this.all.push(list);
  }
  get last() {
    return this.all.at(-1);
  }
  /** Waits for a delivered list that satisfies `predicate`. */
  until(what, predicate) {
    return eventually(what, () => this.all.find(predicate));
  }
}

/** Throws unless no delivered list is older than the one delivered before it. */
export function assertMonotonic(lists) {
  for (let i = 1; i < lists.length; i++) {
    const [a, b] = [lists[i - 1], lists[i]];
    const newer = b.seq > a.seq || b.generated_at > a.generated_at;
    if (!newer || a.rec_id === b.rec_id) {
      throw new Error(`list ${i} (seq ${b.seq}, generated ${b.generated_at}) follows a newer one (seq ${a.seq}, generated ${a.generated_at})`);
    }
  }
}
