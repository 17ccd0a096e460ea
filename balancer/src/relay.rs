//! Passing a proxy's answer on to the client (SPEC 2.3: unchanged, with the client's `id`).
//!
//! On a multiplexed connection the balancer tags requests with its own numeric ids. This
//! project's proxies write `id` as the last member, so an answer ends in `,"id":N}` and the
//! relay is a copy of everything before that plus the client's id: no JSON parsing on the hit
//! path. An answer shaped otherwise (another implementation) goes through a full parse.

use serde_json::{Map, Value};

const ID_MEMBER: &[u8] = b",\"id\":";

/// A proxy answer to a request tagged with a balancer id.
#[derive(Debug, PartialEq)]
pub enum Tagged<'a> {
    /// `body` is the answer without its trailing `,"id":N}`.
    Fast { id: u64, body: &'a [u8] },
    /// Parsed, because the id was not the last member; the `id` member is already removed.
    Parsed { id: u64, object: Map<String, Value> },
}

impl Tagged<'_> {
    pub fn id(&self) -> u64 {
        match self {
            Tagged::Fast { id, .. } | Tagged::Parsed { id, .. } => *id,
        }
    }
}

/// Reads the balancer id of an answer line (without its newline). `None` for a line that is
/// not a JSON object with a non-negative integer `id`.
pub fn parse_tagged(line: &[u8]) -> Option<Tagged<'_>> {
    if let Some((id, body)) = trailing_id(line) {
        return Some(Tagged::Fast { id, body });
    }
    let Ok(Value::Object(mut object)) = serde_json::from_slice::<Value>(line) else { return None };
    // `shift_remove` keeps the other members in the order the proxy wrote them.
    let id = object.shift_remove("id")?.as_u64()?;
    Some(Tagged::Parsed { id, object })
}

/// `…,"id":123}` → (123, `…`).
fn trailing_id(line: &[u8]) -> Option<(u64, &[u8])> {
    let inner = line.strip_suffix(b"}")?;
    let digits = inner.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    let (head, number) = inner.split_at(inner.len() - digits);
    let body = head.strip_suffix(ID_MEMBER)?;
    if !body.starts_with(b"{") {
        return None;
    }
    let id = std::str::from_utf8(number).ok()?.parse().ok()?;
    Some((id, body))
}

/// Writes a tagged answer for the client: the balancer's id removed, the client's (raw JSON
/// text, as the client wrote it) put in its place if it had one, and the newline.
pub fn write_tagged(answer: &Tagged<'_>, client_id: Option<&str>, out: &mut Vec<u8>) {
    match answer {
        Tagged::Fast { body, .. } => close_object(body, client_id, out),
        Tagged::Parsed { object, .. } => {
            let mut object = object.clone();
            if let Some(raw) = client_id {
                if let Ok(value) = serde_json::from_str::<Value>(raw) {
                    object.insert("id".into(), value);
                }
            }
            common::protocol::write_json_value(out, &Value::Object(object));
            out.push(b'\n');
        }
    }
}

/// Checks that an untagged answer (from a text-form request) is one JSON object, and returns
/// it without its closing brace, ready for [`close_object`] to add a client's id. `None` for
/// anything else.
pub fn untagged_body(line: &[u8]) -> Option<&[u8]> {
    let body = line.strip_suffix(b"}").filter(|b| b.starts_with(b"{"))?;
    serde_json::from_slice::<serde::de::IgnoredAny>(line).ok()?;
    Some(body)
}

/// Writes an untagged answer with the client's id added. `None` if the line is not a JSON
/// object.
pub fn write_untagged(line: &[u8], client_id: Option<&str>, out: &mut Vec<u8>) -> Option<()> {
    close_object(untagged_body(line)?, client_id, out);
    Some(())
}

/// `body` is an object missing its closing brace.
pub fn close_object(body: &[u8], client_id: Option<&str>, out: &mut Vec<u8>) {
    out.extend_from_slice(body);
    if let Some(raw) = client_id {
        out.extend_from_slice(ID_MEMBER);
        out.extend_from_slice(raw.as_bytes());
    }
    out.extend_from_slice(b"}\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(line: &str, client_id: Option<&str>) -> (u64, String) {
        let tagged = parse_tagged(line.as_bytes()).unwrap();
        let mut out = Vec::new();
        write_tagged(&tagged, client_id, &mut out);
        (tagged.id(), String::from_utf8(out).unwrap())
    }

    #[test]
    fn the_fast_path_swaps_the_trailing_id() {
        let line = r#"{"status":"OK","data":{"id":5,"x":"a,\"id\":9}"},"cache_hit":true,"node":8001,"id":42}"#;
        assert!(matches!(parse_tagged(line.as_bytes()), Some(Tagged::Fast { id: 42, .. })));
        let (id, out) = relay(line, None);
        assert_eq!(id, 42);
        assert_eq!(
            out,
            "{\"status\":\"OK\",\"data\":{\"id\":5,\"x\":\"a,\\\"id\\\":9}\"},\"cache_hit\":true,\"node\":8001}\n"
        );
        let (_, out) = relay(line, Some("\"client-7\""));
        assert!(out.ends_with(",\"node\":8001,\"id\":\"client-7\"}\n"), "{out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["data"]["id"], 5);
    }

    #[test]
    fn an_id_elsewhere_takes_the_parsing_path() {
        let line = r#"{"id":7,"status":"NOT_FOUND","data":null}"#;
        assert!(matches!(parse_tagged(line.as_bytes()), Some(Tagged::Parsed { id: 7, .. })));
        let (id, out) = relay(line, Some("1.5"));
        assert_eq!(id, 7);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!((v["status"].as_str(), v["id"].as_f64()), (Some("NOT_FOUND"), Some(1.5)));
        let (_, out) = relay(line, None);
        assert_eq!(out, "{\"status\":\"NOT_FOUND\",\"data\":null}\n");
    }

    #[test]
    fn answers_without_a_usable_id_are_rejected() {
        for line in [r#"{"status":"OK","data":1}"#, r#"{"status":"OK","id":"x"}"#, "garbage", "", r#"{"id":-1}"#, "}"] {
            assert_eq!(parse_tagged(line.as_bytes()), None, "{line}");
        }
    }

    #[test]
    fn untagged_answers_get_the_client_id() {
        let mut out = Vec::new();
        write_untagged(br#"{"status":"OK","data":[1]}"#, Some("3"), &mut out).unwrap();
        assert_eq!(out, b"{\"status\":\"OK\",\"data\":[1],\"id\":3}\n");
        out.clear();
        write_untagged(br#"{"status":"OK","data":[1]}"#, None, &mut out).unwrap();
        assert_eq!(out, b"{\"status\":\"OK\",\"data\":[1]}\n");
        assert!(write_untagged(b"HTTP/1.1 200 OK", None, &mut out).is_none());
        assert!(write_untagged(b"[1]", None, &mut out).is_none());
    }
}
