//! Relaying a proxy's answer: never a panic; and whatever bytes arrive, what reaches the
//! client is one line of valid JSON with a string `status`, a `data`, and the client's id,
//! byte for byte, as its last member — or the line is refused (the attempt fails).
#![no_main]

use std::collections::HashMap;

use balancer::relay::{read_answer, Line};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

const CLIENT_ID: &str = "123456789012345678901234567890";

fuzz_target!(|data: &[u8]| {
    for multiplexed in [false, true] {
        let Line::Answer(_, answer) = read_answer(data, multiplexed) else { continue };
        let mut out = Vec::new();
        answer.write_with_id(&mut out, Some(CLIENT_ID));
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        let line = std::str::from_utf8(&out).expect("UTF-8");
        assert!(line.ends_with(&format!("\"id\":{CLIENT_ID}}}\n")), "{line}");
        // Raw values are skipped without recursion: any depth is checked.
        let members: HashMap<String, &RawValue> = serde_json::from_str(line).expect("relayed JSON");
        assert!(members.get("status").is_some_and(|s| s.get().starts_with('"')), "{line}");
        assert!(members.contains_key("data"), "{line}");
    }
});
