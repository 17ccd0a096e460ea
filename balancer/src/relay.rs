//! Reading a proxy's answer for the client it belongs to (SPEC 2.3, 3.6): the proxy's own
//! `id` (our tag) is cut out and the client's put in its place, byte for byte as the client
//! wrote it; every other byte is passed through unchanged. Anything that is not one
//! well-formed answer is a [`Failure::Garbage`] — the attempt is retried — so a client only
//! ever receives one valid JSON object per line.

use common::protocol::{parse_answer, Answer};

use crate::failure::Failure;

/// A checked answer from a proxy connection, and the tag it carried (on a multiplexed
/// connection, where one is required).
pub fn read_answer(line: &[u8], multiplexed: bool) -> Result<(Option<u64>, Answer<'_>), Failure> {
    let answer = parse_answer(line).map_err(|_| Failure::Garbage)?;
    if !multiplexed {
        // A text-form request has no id; whatever id a simple proxy wrote is cut out.
        return Ok((None, answer));
    }
    let tag = answer.tag().ok_or(Failure::Garbage)?;
    Ok((Some(tag), answer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    /// The client ids the property is checked with: each must come back byte for byte.
    const CLIENT_IDS: [&str; 5] = ["123456789012345678901234567890", "1.10", "\"a\\\"b\\u00e9\\n\"", "-0", "7"];

    fn check(line: &[u8], multiplexed: bool, client_id: Option<&str>) {
        let Ok((_, answer)) = read_answer(line, multiplexed) else { return };
        let mut out = Vec::new();
        answer.write_with_id(&mut out, client_id);
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1, "one line");
        assert_eq!(out.last(), Some(&b'\n'));
        let text = std::str::from_utf8(&out).expect("UTF-8");
        let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert!(value.is_object() && value["status"].is_string(), "{text}");
        match client_id {
            Some(id) => assert!(text.ends_with(&format!("\"id\":{id}}}\n")), "{text}"),
            None => assert!(value.get("id").is_none(), "{text}"),
        }
    }

    /// Answer-like lines: members in any order, the tag anywhere (or twice, or missing), odd
    /// values, and junk around it.
    fn answer_like() -> impl Strategy<Value = Vec<u8>> {
        let value = prop_oneof![
            Just("1.10".to_string()),
            Just("123456789012345678901234567890".to_string()),
            Just("\"x\\\"y\\\\\"".to_string()),
            Just("{\"id\":3,\"a\":[1,{}]}".to_string()),
            Just("null".to_string()),
            "[a-z0-9\" ,:{}\\[\\]\\\\]{0,12}".prop_map(|s| s),
        ];
        let member = prop_oneof![
            Just("\"status\":\"OK\"".to_string()),
            (0u64..50).prop_map(|n| format!("\"id\":{n}")),
            value.clone().prop_map(|v| format!("\"data\":{v}")),
            value.prop_map(|v| format!("\"other\" : {v}")),
        ];
        (prop::collection::vec(member, 0..6), "[ ]{0,2}", "[ x}]{0,2}")
            .prop_map(|(members, pad, tail)| format!("{pad}{{{}}}{tail}", members.join(",")).into_bytes())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_bytes_relay_as_one_json_line_with_the_clients_id_or_fail(
            line in prop_oneof![answer_like(), prop::collection::vec(any::<u8>(), 0..64)],
            which in 0usize..6,
            multiplexed in any::<bool>(),
        ) {
            check(&line, multiplexed, CLIENT_IDS.get(which).copied());
        }
    }

    #[test]
    fn a_multiplexed_answer_needs_our_tag() {
        assert_eq!(read_answer(br#"{"status":"OK","data":1}"#, true).err(), Some(Failure::Garbage));
        assert_eq!(read_answer(br#"{"status":"OK","id":"x"}"#, true).err(), Some(Failure::Garbage));
        assert_eq!(read_answer(br#"{"status":"OK","id":5}"#, true).map(|(t, _)| t), Ok(Some(5)));
        assert_eq!(read_answer(br#"{"status":"OK","id":5}"#, false).map(|(t, _)| t), Ok(None));
        assert_eq!(read_answer(b"garbage,\"id\":5}", true).err(), Some(Failure::Garbage));
    }
}
