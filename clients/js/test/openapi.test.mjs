// The generated REST layer against the live document: src/generated.ts is what the running
// server's /openapi.json renders to (a stale client fails here), every operation has a method,
// and the methods' answers have the shapes the document declares.

import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { after, before, test } from "node:test";

import { LiverecClient, LiverecError, operations, streamingOperations } from "../dist/index.js";
import { docsPage, render, renderTable, target, withTable } from "../scripts/generate.mjs";
import { startServer } from "./support.mjs";

let server;
let doc;
before(async () => {
  server = await startServer();
  doc = await (await fetch(`${server.url}/openapi.json`)).json();
});
after(() => server?.close());

test("src/generated.ts is what the live /openapi.json renders to", async () => {
  const committed = await readFile(target, "utf8");
  const fresh = render(doc);
  if (committed !== fresh) {
    const a = committed.split("\n");
    const b = fresh.split("\n");
    const line = a.findIndex((l, i) => l !== b[i]);
    assert.fail(
      `src/generated.ts is stale against the server's /openapi.json (first difference at line ${line + 1}:\n` +
        `  committed: ${a[line]}\n  document:  ${b[line]})\n` +
        `regenerate with a server running: npm run generate -- ${"http://127.0.0.1:8080/openapi.json"}`,
    );
  }
});

test("the method table of docs/clients/js.md is what the live /openapi.json renders to", async () => {
  const page = await readFile(docsPage, "utf8");
  assert.equal(
    page,
    withTable(page, renderTable(doc)),
    "docs/clients/js.md's method table is stale: npm run generate -- http://127.0.0.1:8080/openapi.json",
  );
});

test("every operation of the document has a typed method, or is a stream subscribe() covers", () => {
  const methods = ["get", "put", "post", "delete", "patch"];
  let count = 0;
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const method of methods) {
      const op = item[method];
      if (!op) continue;
      count += 1;
      const id = op.operationId;
      if (id in streamingOperations) continue;
      assert.ok(id in operations, `${method.toUpperCase()} ${path} (${id}) has no entry in operations`);
      assert.equal(operations[id].method, method.toUpperCase());
      assert.equal(operations[id].path, path);
      const name = id.replace(/_([a-z0-9])/g, (_, c) => c.toUpperCase());
      assert.equal(typeof LiverecClient.prototype[name], "function", `${id} has no method ${name}`);
    }
  }
  assert.ok(count >= 20, `only ${count} operations in the document`);
  assert.deepEqual(Object.keys(streamingOperations).sort(), ["sse", "websocket"]);
});

test("the methods' answers have the shapes the document declares", async () => {
  const client = new LiverecClient({ baseUrl: server.url, apiKey: server.admin });
  const check = (id, status, value) => {
    const [path, method] = locate(doc, id);
    const response = deref(doc, doc.paths[path][method].responses[status]);
    const schema = response.content?.["application/json"]?.schema ?? response.content?.["text/plain"]?.schema;
    if (schema) validate(doc, schema, value, `${id} ${status}`);
    else assert.equal(value, undefined, `${id} ${status} has no body`);
  };
  const item = `js-item-${Date.now()}`;
  check("put_item", "201", await client.putItem({ item_id: item }, { title: "Blue Train", categories: ["jazz"] }));
  check("put_item", "200", await client.putItem({ item_id: item }, { title: "Blue Train", categories: ["jazz", "hard-bop"] }));
  const got = await client.getItem({ item_id: item });
  check("get_item", "200", got);
  assert.deepEqual(got.categories, ["jazz", "hard-bop"]);
  check("put_items", "200", await client.putItems([{ item_id: `${item}-b` }, { item_id: `${item}-c`, available: false }]));
  check("list_items", "200", await client.listItems({ limit: 5 }));
  const accepted = await client.postEvents([
    { user_id: "js-rest", item_id: item, event_type: "click" },
    { user_id: "js-rest", item_id: `${item}-b`, event_type: "rating", value: 4 },
  ]);
  check("post_events", "202", accepted);
  assert.equal(accepted.accepted, 2);
  check("get_recommendations", "200", await client.getRecommendations({ user_id: "js-rest", k: 3, device: "mobile" }));
  check("export", "200", await client.export({ user_id: "js-rest" }));
  check("merge", "200", await client.merge({ user_id: "js-rest" }, { from: "js-anon" }));
  check("mint_token", "201", await client.mintToken({ user_id: "js-rest", ttl_secs: 60 }));
  check("models", "200", await client.models());
  check("report", "200", await client.report());
  check("experiment", "200", await client.experiment());
  check("healthz", "200", await client.healthz());
  check("readyz", "200", await client.readyz());
  check("openapi_json", "200", await client.openapiJson());
  const metrics = await client.metrics();
  check("metrics", "200", metrics);
  assert.match(metrics, /^liverec_/m);
  check("delete_item", "204", await client.deleteItem({ item_id: `${item}-b` }));
  check("erase", "200", await client.erase({ user_id: "js-rest" }));
});

test("a refusal is a LiverecError with the server's status, code and field", async () => {
  const client = new LiverecClient({ baseUrl: server.url, apiKey: server.admin });
  await assert.rejects(client.getItem({ item_id: "no-such-item" }), (error) => {
    assert.ok(error instanceof LiverecError);
    assert.equal(error.status, 404);
    assert.equal(error.code, "item_not_found");
    return true;
  });
  await assert.rejects(
    client.postEvents([{ user_id: "u", item_id: "i", event_type: "click" }, { user_id: "u", item_id: "", event_type: "click" }]),
    (error) => error.status === 422 && error.code === "invalid_event" && error.field === "[1].item_id",
  );
  const anonymous = new LiverecClient({ baseUrl: server.url });
  await assert.rejects(anonymous.models(), (error) => error.status === 401 && error.code === "unauthorized");
  // A token provider is asked again after a 401, once per call.
  let calls = 0;
  const refused = new LiverecClient({ baseUrl: server.url, token: () => `not-a-token-${++calls}` });
  await assert.rejects(refused.getRecommendations({ user_id: "u" }), (error) => error.status === 401);
  assert.equal(calls, 2);
});

/** [path, method] of an operation id. */
function locate(doc, id) {
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) if (op?.operationId === id) return [path, method];
  }
  throw new Error(`no operation ${id}`);
}

function deref(doc, value) {
  let v = value;
  while (v?.$ref) v = v.$ref.slice(2).split("/").reduce((node, key) => node[key], doc);
  return v;
}

/** Checks `value` against the JSON Schema subset the document uses (types, required, properties,
 * additionalProperties: false, items, enum, oneOf/anyOf/allOf, $ref). */
function validate(doc, schema, value, at) {
  schema = deref(doc, schema);
  if (schema === true || schema === undefined) return;
  if (schema.oneOf || schema.anyOf) {
    const options = schema.oneOf ?? schema.anyOf;
    const errors = [];
    for (const option of options) {
      try {
        validate(doc, option, value, at);
        return;
      } catch (error) {
        errors.push(error.message);
      }
    }
    assert.fail(`${at}: matches none of ${options.length} alternatives: ${errors.join("; ")}`);
  }
  if (schema.allOf) for (const part of schema.allOf) validate(doc, part, value, at);
  if (schema.enum) assert.ok(schema.enum.includes(value), `${at}: ${JSON.stringify(value)} is not one of ${schema.enum}`);
  const types = Array.isArray(schema.type) ? schema.type : schema.type ? [schema.type] : [];
  if (types.length > 0) {
    const actual =
      value === null ? "null" : Array.isArray(value) ? "array" : Number.isInteger(value) ? "integer" : typeof value;
    const ok = types.some((t) => t === actual || (t === "number" && actual === "integer"));
    assert.ok(ok, `${at}: ${JSON.stringify(value)?.slice(0, 80)} is ${actual}, not ${types.join("|")}`);
  }
  if (Array.isArray(value) && schema.items) value.forEach((v, i) => validate(doc, schema.items, v, `${at}[${i}]`));
  if (value !== null && typeof value === "object" && !Array.isArray(value)) {
    for (const name of schema.required ?? []) assert.ok(name in value, `${at}: lacks the required ${name}`);
    for (const [name, v] of Object.entries(value)) {
      if (schema.properties?.[name]) validate(doc, schema.properties[name], v, `${at}.${name}`);
      else if (schema.additionalProperties === false && schema.properties) assert.fail(`${at}: ${name} is not in the schema`);
      else if (typeof schema.additionalProperties === "object") validate(doc, schema.additionalProperties, v, `${at}.${name}`);
    }
  }
}
