//! liverec's events on the wire: the event types producers send and their validation
//! ([`event`]), the Kafka record codec, JSON and Avro ([`codec`]), and the WebSocket message
//! parser ([`ws`]). Everything here reads untrusted bytes and holds no server state, which is
//! why it is a crate of its own: the fuzz targets in `fuzz/` build it without the server.

pub mod codec;
pub mod event;
pub mod ws;
