// liverec's client for browsers and Node: see docs/clients/js.md.

export { LiverecClient, subscribe, type ClientOptions } from "./client.js";
export {
  isNewer,
  Subscription,
  type SubscribeOptions,
  type SubscriptionStats,
  type SubscriptionStatus,
  type Transport,
} from "./subscribe.js";
export { Tracker, type TrackOptions, type TrackStats } from "./track.js";
export { LiverecError, type CallOptions, type TokenProvider } from "./request.js";
export { SseParser, type SseEvent } from "./sse.js";
export * from "./generated.js";
