//! Every example in `docs/protocol.md` marked `client` or `server` decodes as that side's
//! message, so the reference for other-language clients cannot drift from the code.

use kalphite_sync::{DEFAULT_MAX_FRAME_BYTES, decode_client, decode_server};

const DOC: &str = include_str!("../../../docs/protocol.md");

/// `(direction, json)` for every fenced block whose info string is `json client|server`.
fn examples() -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let mut current: Option<(&'static str, String)> = None;
    for line in DOC.lines() {
        match (&mut current, line.trim()) {
            (None, "```json client") => current = Some(("client", String::new())),
            (None, "```json server") => current = Some(("server", String::new())),
            (Some(_), "```") => out.extend(current.take()),
            (Some((_, body)), text) => {
                body.push_str(text);
                body.push('\n');
            }
            (None, _) => {}
        }
    }
    out
}

#[test]
fn every_documented_message_decodes() {
    let examples = examples();
    assert!(
        examples.len() >= 11,
        "found only {} examples",
        examples.len()
    );
    for (side, json) in examples {
        let result = match side {
            "client" => decode_client(&json, DEFAULT_MAX_FRAME_BYTES).map(drop),
            _ => decode_server(&json, DEFAULT_MAX_FRAME_BYTES).map(drop),
        };
        assert!(
            result.is_ok(),
            "{side} example does not decode: {result:?}\n{json}"
        );
    }
}

#[test]
fn every_message_type_is_documented() {
    let examples = examples();
    for (side, ty) in [
        ("client", "hello"),
        ("client", "change"),
        ("client", "heartbeat"),
        ("server", "welcome"),
        ("server", "catchUp"),
        ("server", "change"),
        ("server", "ack"),
        ("server", "conflict"),
        ("server", "heartbeat"),
        ("server", "error"),
    ] {
        let needle = format!(r#""type": "{ty}""#);
        assert!(
            examples
                .iter()
                .any(|(s, json)| *s == side && json.contains(&needle)),
            "no {side} example of '{ty}'"
        );
    }
}
