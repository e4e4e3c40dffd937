//! What the frame decoders must do with any input: return a typed result without
//! panicking, and re-encode whatever they accept into a frame that decodes to the same
//! message. Shared by the `decode_client` / `decode_server` fuzz targets and the replay
//! test.

use kalphite_sync::{
    ClientMessage, DEFAULT_MAX_FRAME_BYTES, ProtocolError, ServerMessage, WireMessage, decode,
    encode, peek_message_id,
};

/// Checks the client-message decoder (the server's side) on one frame.
///
/// # Panics
/// When the decoder panics or breaks the round trip.
pub fn check_client(text: &str) {
    check::<ClientMessage>(text, ClientMessage::message_id);
}

/// Checks the server-message decoder (the client's side) on one frame.
///
/// # Panics
/// When the decoder panics or breaks the round trip.
pub fn check_server(text: &str) {
    check::<ServerMessage>(text, ServerMessage::message_id);
}

fn check<M: WireMessage + PartialEq + std::fmt::Debug>(text: &str, message_id: fn(&M) -> &str) {
    // The peek used for oversized frames must hold up on anything, too.
    let _ = peek_message_id(text);
    let decoded: Result<M, ProtocolError> = decode(text, DEFAULT_MAX_FRAME_BYTES);
    // A smaller limit: refused for size before anything is parsed.
    if text.len() > 16 {
        let small: Result<M, ProtocolError> = decode(text, 16);
        assert!(
            matches!(small, Err(ProtocolError::Oversized { size, limit: 16 }) if size == text.len()),
            "a frame over the limit is refused as oversized: {small:?}"
        );
    }
    match decoded {
        Ok(message) => {
            let frame = encode(&message).expect("a decoded message encodes");
            // The peek (used on oversized frames) finds the id of an encoded message.
            if frame.len() <= kalphite_sync::PEEK_BYTES {
                assert_eq!(
                    peek_message_id(&frame).as_deref(),
                    Some(message_id(&message)),
                    "the peek misses the id of {frame}"
                );
            }
            let again: M = decode(&frame, usize::MAX)
                .unwrap_or_else(|e| panic!("the re-encoded frame {frame} does not decode: {e}"));
            assert_eq!(
                again, message,
                "decode → encode → decode changed the message"
            );
        }
        Err(error) => {
            // Every error maps to a wire payload; `refersTo` is the frame's id when given.
            let payload = error.to_payload();
            assert_eq!(payload.code, error.code());
            assert_eq!(payload.refers_to.as_deref(), error.refers_to());
        }
    }
}
