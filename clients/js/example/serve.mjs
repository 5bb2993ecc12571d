#!/usr/bin/env node
// Serves the example page (example/ and the built dist/) and, as a page's backend would, mints
// its stream tokens: GET /token?user=ID answers a token from liverec's POST /v1/admin/tokens,
// made with the admin key in LIVEREC_ADMIN_KEY (without one, /token is 404 and the page sends
// no credential, which suits a server with auth off such as the embedded demo).
//
//   npm run build && node example/serve.mjs [--port 8000] [--server http://127.0.0.1:8080]
//   then open http://127.0.0.1:8000/example/?server=http://127.0.0.1:8080&user=alice
//
// liverec must allow this page's origin: LIVEREC_AUTH__ALLOWED_ORIGINS='["http://127.0.0.1:8000"]'.

import { createReadStream, statSync } from "node:fs";
import { createServer } from "node:http";
import { extname, join, normalize, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(fileURLToPath(new URL("..", import.meta.url)));
const types = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".map": "application/json", ".css": "text/css" };

/** Starts the example server; resolves to `{ url, close() }`. */
export function startExample({ port = 8000, server = "http://127.0.0.1:8080", adminKey = process.env.LIVEREC_ADMIN_KEY } = {}) {
  const http = createServer(async (req, res) => {
    const url = new URL(req.url, "http://localhost");
    if (url.pathname === "/" ) {
      res.writeHead(302, { location: "/example/" }).end();
      return;
    }
    if (url.pathname === "/example/token") {
      if (!adminKey) return res.writeHead(404).end();
      if (req.method === "HEAD") return res.writeHead(200).end();
      const user = url.searchParams.get("user") ?? "";
      try {
        const answer = await fetch(`${server}/v1/admin/tokens`, {
          method: "POST",
          headers: { authorization: `Bearer ${adminKey}`, "content-type": "application/json" },
          body: JSON.stringify({ user_id: user, ttl_secs: Number(process.env.EXAMPLE_TOKEN_TTL_SECS ?? 600) }),
        });
        const body = await answer.json();
        if (answer.status !== 201) return res.writeHead(answer.status, { "content-type": "application/json" }).end(JSON.stringify(body));
        res.writeHead(200, { "content-type": "text/plain", "cache-control": "no-store" }).end(body.token);
      } catch (error) {
        res.writeHead(502, { "content-type": "text/plain" }).end(`liverec unreachable: ${error.message}`);
      }
      return;
    }
    // Static files, only under example/ and dist/.
    let path = normalize(decodeURIComponent(url.pathname)).replace(/^\/+/, "");
    if (path.endsWith("/") || path === "example") path = join(path, "index.html");
    if (!/^(example|dist)\//.test(path)) return res.writeHead(404).end();
    const file = join(root, path);
    try {
      if (!statSync(file).isFile()) throw new Error("not a file");
    } catch {
      return res.writeHead(404).end();
    }
    res.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream", "cache-control": "no-cache" });
    createReadStream(file).pipe(res);
  });
  return new Promise((resolvePromise, reject) => {
    http.once("error", reject);
    http.listen(port, "127.0.0.1", () => {
      resolvePromise({
        url: `http://127.0.0.1:${http.address().port}`,
        close: () => new Promise((r) => {
          http.closeAllConnections();
          http.close(() => r());
        }),
      });
    });
  });
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2);
  const option = (name, fallback) => {
    const i = args.indexOf(name);
    return i === -1 ? fallback : args[i + 1];
  };
  const server = option("--server", "http://127.0.0.1:8080");
  const { url } = await startExample({ port: Number(option("--port", "8000")), server });
  console.log(`example page: ${url}/example/?server=${encodeURIComponent(server)}&user=demo-user`);
  if (!process.env.LIVEREC_ADMIN_KEY) console.log("no LIVEREC_ADMIN_KEY: the page sends no credential (auth off)");
}
