//! The WebSocket text message parser (`parse_message`), then the events a message carries decoded
//! and validated as the server does: no panic, errors carry one of the documented codes, user ids
//! satisfy the limits, a parsed message re-serialised parses to the same command, and decoded
//! events satisfy the limits and survive the wire round trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use liverec_wire::event::EventIn;
use liverec_wire::ws::{parse_message, Command};
use liverec_fuzz::{check_event, check_round_trips, limits, NOW};
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    // Text frames are UTF-8: actix-ws refuses anything else before the parser sees it.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let limits = limits();
    let command = match parse_message(text, limits.max_id_len) {
        Ok(command) => command,
        Err(error) => {
            assert!(
                matches!(error.code, "malformed_json" | "invalid_message" | "invalid_user_id"),
                "unexpected error code {}",
                error.code
            );
            return;
        }
    };
    let again = match &command {
        Command::Subscribe(user) | Command::Unsubscribe(user) => {
            assert!(!user.is_empty() && user.chars().count() <= limits.max_id_len, "user id {user:?}");
            assert!(!user.chars().any(char::is_control), "user id {user:?} holds a control character");
            let key = if matches!(command, Command::Subscribe(_)) { "subscribe" } else { "unsubscribe" };
            json!({ key: user })
        }
        Command::Events { value, many } => {
            let events: Result<Vec<EventIn>, _> = if *many {
                serde_json::from_value(value.clone())
            } else {
                serde_json::from_value(value.clone()).map(|e| vec![e])
            };
            for event in events.into_iter().flatten() {
                if let Ok(event) = event.validate(&limits, NOW) {
                    check_event(&event, &limits);
                    check_round_trips(&event, &limits);
                }
            }
            let key = if *many { "events" } else { "event" };
            json!({ key: value })
        }
    };
    let reparsed = parse_message(&again.to_string(), limits.max_id_len);
    assert!(reparsed.as_ref().ok() == Some(&command), "{again} does not parse back to the same command: {reparsed:?}");
});
