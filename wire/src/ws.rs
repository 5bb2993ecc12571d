//! The WebSocket text messages clients send, parsed into commands. Pure (no server state but the
//! id length limit), so the parser can be fuzzed on its own (`fuzz/`).

use serde_json::Value;

use crate::event::check_id;

/// One WebSocket text message, parsed: what the client asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// `{"subscribe": "<user>"}`: the user id as sent (not yet pseudonymised), already checked
    /// (non-empty, at most `events.max_id_len` characters, no control characters).
    Subscribe(String),
    /// `{"unsubscribe": "<user>"}`: the user id as sent, checked like [`Command::Subscribe`]'s.
    Unsubscribe(String),
    /// `{"event": {...}}` (`many: false`) or `{"events": [...]}` (`many: true`): the JSON as sent;
    /// the server decodes and validates it, as that needs its limits and pseudonyms.
    Events { value: Value, many: bool },
}

/// Parses a WebSocket text message into a [`Command`], or the error the client gets back. Pure:
/// no state but the id length limit (`events.max_id_len`), so it can be fuzzed on its own.
pub fn parse_message(text: &str, max_id_len: usize) -> Result<Command, MessageError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|error| MessageError::new("malformed_json", format!("the message is not valid JSON: {error}")))?;
    let Value::Object(mut object) = value else {
        return Err(MessageError::new("invalid_message", "a message is a JSON object"));
    };
    if object.len() != 1 {
        return Err(MessageError::new(
            "invalid_message",
            "a message has exactly one of the keys subscribe, unsubscribe, event, events",
        ));
    }
    let (key, value) = object.iter_mut().next().map(|(k, v)| (k.clone(), v.take())).expect("one entry");
    let user_of = |value: Value, field: &str| -> Result<String, MessageError> {
        let Value::String(raw) = value else {
            return Err(MessageError::new("invalid_user_id", "the user id must be a string").with_field(field));
        };
        check_id(field, &raw, max_id_len)
            .map_err(|e| MessageError::new("invalid_user_id", e.message).with_field(&e.field))?;
        Ok(raw)
    };
    match key.as_str() {
        "subscribe" => user_of(value, "subscribe").map(Command::Subscribe),
        "unsubscribe" => user_of(value, "unsubscribe").map(Command::Unsubscribe),
        "event" | "events" => Ok(Command::Events { value, many: key == "events" }),
        other => Err(MessageError::new("invalid_message", format!("unknown message key {other:?}")).with_field(other)),
    }
}

/// Why a message was refused: a stable code (`malformed_json`, `invalid_message`,
/// `invalid_user_id`), a message, and the offending field. The server answers it as a `400`-class
/// error message on the socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageError {
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl MessageError {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), field: None }
    }

    fn with_field(mut self, field: &str) -> Self {
        self.field = Some(field.to_owned());
        self
    }
}
