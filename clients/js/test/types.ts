// Compiled (not run) by `npm run typecheck`: the declarations a TypeScript user gets describe the
// API as docs/clients/js.md shows it, and wrong calls do not compile.

import { LiverecClient, LiverecError, type RecList, type Subscription } from "../dist/index.js";

const client = new LiverecClient({ baseUrl: "http://127.0.0.1:8080", token: async () => "token" });
const sub: Subscription = client.subscribe("alice", (list: RecList) => list.items.map((i) => i.item_id), {
  transport: "ws",
  onStatus: (status) => status satisfies "connecting" | "open" | "reconnecting" | "closed" | "erased",
});
sub.close();
const id: string = client.track({ user_id: "alice", item_id: "item-1", event_type: "click" });
void id;

async function rest(): Promise<void> {
  const list = await client.getRecommendations({ user_id: "alice", k: 5, device: "mobile" });
  const seq: number = list.seq;
  void seq;
  const item = await client.putItem({ item_id: "blue-train" }, { title: "Blue Train", categories: ["jazz"] });
  const title: string | null | undefined = item.title;
  void title;
  const accepted = await client.postEvents([{ user_id: "alice", item_id: "i", event_type: "purchase", value: 10 }]);
  accepted.event_ids satisfies string[];
  await client.deleteItem({ item_id: "blue-train" }) satisfies void;
  // @ts-expect-error: not an event type
  await client.postEvents({ user_id: "alice", item_id: "i", event_type: "clicked" });
  // @ts-expect-error: the path parameter is required
  await client.getItem({});
  try {
    await client.models();
  } catch (error) {
    if (error instanceof LiverecError) error.code satisfies string;
  }
}
void rest;
