//! Reading a proxy's answer for the client it belongs to (SPEC 2.3, 3.6): the proxy's own
//! `id` (our tag) is cut out and the client's put in its place, byte for byte as the client
//! wrote it; every other byte is passed through unchanged. Anything that is not one
//! well-formed answer (valid JSON, a string `status`, a `data`) is garbage: the attempt it
//! was for fails and is retried — and only that attempt, when its tag can still be read — so
//! a client only ever receives one valid JSON object per line.

use common::protocol::{parse_answer, trailing_tag, Answer};

/// What one line from a proxy connection is.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A well-formed answer, with the tag it carried (on a multiplexed connection, where one
    /// is required; `None` on a single-request one, whose answers come in order).
    Answer(Option<u64>, Answer<'a>),
    /// Not a well-formed answer. On a multiplexed connection, the tag of the attempt it
    /// answered when that can still be read; on a single-request one always `None`.
    Garbage(Option<u64>),
}

/// Reads one answer line from a proxy connection.
pub fn read_answer(line: &[u8], multiplexed: bool) -> Line<'_> {
    let Ok(answer) = parse_answer(line) else {
        return Line::Garbage(if multiplexed { trailing_tag(line) } else { None });
    };
    if !multiplexed {
        // A text-form request has no id; whatever id a simple proxy wrote is cut out.
        return Line::Answer(None, answer);
    }
    match answer.tag() {
        Some(tag) => Line::Answer(Some(tag), answer),
        None => Line::Garbage(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    /// The client ids the property is checked with: each must come back byte for byte.
    const CLIENT_IDS: [&str; 5] = ["123456789012345678901234567890", "1.10", "\"a\\\"b\\u00e9\\n\"", "-0", "7"];

    fn check(line: &[u8], multiplexed: bool, client_id: Option<&str>) {
        let Line::Answer(_, answer) = read_answer(line, multiplexed) else { return };
        let mut out = Vec::new();
        answer.write_with_id(&mut out, client_id);
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1, "one line");
        assert_eq!(out.last(), Some(&b'\n'));
        let text = std::str::from_utf8(&out).expect("UTF-8");
        let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert!(value.is_object() && value["status"].is_string() && value.get("data").is_some(), "{text}");
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

    /// Lines in this project's own encoding (which the scanner reads on a shortcut), and
    /// near-misses of it.
    fn canonical_like() -> impl Strategy<Value = Vec<u8>> {
        let status = prop::sample::select(vec!["OK", "NOT_FOUND", "", "ok", "O\\\"K", "é"]);
        let data = prop::sample::select(vec!["1", "null", "{\"a\":[1,{}]}", "\"x\\\"\"", "[1,]", "01", "{", "\"\t\""]);
        let opt = |values: Vec<&'static str>| prop::option::of(prop::sample::select(values));
        (
            status,
            data,
            opt(vec!["true", "false", "tru", "1"]),
            opt(vec!["8001", "0", "01", "-1", ""]),
            opt(vec!["true", "false"]),
            opt(vec!["5", "0", "05", "18446744073709551616", "\"5\"", "1.0", ""]),
            prop::sample::select(vec!["}", "} ", "}}", "", " }"]),
        )
            .prop_map(|(status, data, hit, node, stale, id, end)| {
                let mut line = format!("{{\"status\":\"{status}\",\"data\":{data}");
                for (key, value) in [("cache_hit", hit), ("node", node), ("stale", stale), ("id", id)] {
                    if let Some(value) = value {
                        line.push_str(&format!(",\"{key}\":{value}"));
                    }
                }
                line.push_str(end);
                line.into_bytes()
            })
    }

    /// Arbitrary JSON values (serialized by serde, so valid), wrapped as answers, with
    /// blanks and escapes.
    fn json_values() -> impl Strategy<Value = Vec<u8>> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| serde_json::json!(f)),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            ".{0,8}".prop_map(Value::String),
        ];
        let value = leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z\\\"]{0,3}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        (value, any::<bool>()).prop_map(|(v, pretty)| {
            let answer = serde_json::json!({"status": "OK", "data": v, "id": 7});
            if pretty {
                serde_json::to_vec_pretty(&answer).unwrap_or_default().into_iter().filter(|b| *b != b'\n').collect()
            } else {
                serde_json::to_vec(&answer).unwrap_or_default()
            }
        })
    }

    /// Answers whose `data` is a random run of JSON tokens, near-misses included.
    fn token_soup() -> impl Strategy<Value = Vec<u8>> {
        let token = prop::sample::select(vec![
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            " ",
            "\"a\"",
            "\"\\\\\"",
            "\"\\u00e9\"",
            "\"\\ud800\"",
            "\"\\udfff\\ud800\"",
            "\"\\x\"",
            "\"\t\"",
            "0",
            "01",
            "-",
            "-0",
            "1.",
            ".5",
            "1.5",
            "1e",
            "1e+2",
            "2E-3",
            "true",
            "tru",
            "null",
            "nul",
            "\"",
            "\\",
        ]);
        (prop::collection::vec(token, 0..12), any::<bool>()).prop_map(|(tokens, wrap)| {
            let data = tokens.concat();
            let line = if wrap { format!("{{\"status\":\"OK\",\"data\":{data},\"id\":3}}") } else { data };
            line.into_bytes()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// The hit path's own JSON checker agrees with serde, lone surrogate escapes included
        /// (the origin stores what serde accepts).
        #[test]
        fn the_answer_checker_agrees_with_serde(
            line in prop_oneof![
                answer_like(),
                prop::collection::vec(any::<u8>(), 0..64),
                json_values(),
                token_soup(),
                canonical_like(),
            ],
        ) {
            let fast = common::protocol::parse_answer(&line);
            let reference = common::protocol::parse_answer_with_serde(&line);
            prop_assert_eq!(fast, reference, "{:?}", String::from_utf8_lossy(&line));
        }

        #[test]
        fn any_bytes_relay_as_one_json_line_with_the_clients_id_or_fail(
            line in prop_oneof![answer_like(), prop::collection::vec(any::<u8>(), 0..64), canonical_like()],
            which in 0usize..6,
            multiplexed in any::<bool>(),
        ) {
            check(&line, multiplexed, CLIENT_IDS.get(which).copied());
        }
    }

    #[test]
    fn a_multiplexed_answer_needs_our_tag() {
        let tag = |line: &[u8], mux| match read_answer(line, mux) {
            Line::Answer(tag, _) => Ok(tag),
            Line::Garbage(tag) => Err(tag),
        };
        assert_eq!(tag(br#"{"status":"OK","data":1}"#, true), Err(None));
        assert_eq!(tag(br#"{"status":"OK","data":1,"id":"x"}"#, true), Err(None));
        assert_eq!(tag(br#"{"status":"OK","data":1,"id":5}"#, true), Ok(Some(5)));
        assert_eq!(tag(br#"{"status":"OK","data":1,"id":5}"#, false), Ok(None));
        // Not well-formed, but still naming the attempt it was for: that one alone fails.
        assert_eq!(tag(b"garbage,\"id\":5}", true), Err(Some(5)));
        assert_eq!(tag(br#"{"status":"OK","id":6}"#, true), Err(Some(6)));
        assert_eq!(tag(br#"{"status":"OK","id":6}"#, false), Err(None));
    }
}
