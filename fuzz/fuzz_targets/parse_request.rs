//! Any bytes as a request line: either a request whose key is valid, or an error; and in both
//! cases the answer encodes to exactly one line of valid JSON (ids echoed as written).
#![no_main]

use common::protocol::{parse_request, validate_key, Op, Reply};
use libfuzzer_sys::fuzz_target;

fn one_json_line(out: &[u8]) {
    assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1, "{:?}", String::from_utf8_lossy(out));
    assert_eq!(out.last(), Some(&b'\n'));
    let value: serde_json::Value = serde_json::from_slice(&out[..out.len() - 1]).expect("answer is JSON");
    assert!(value.is_object());
}

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    match parse_request(data) {
        Ok(request) => {
            if let Op::Get(key) | Op::Purge(key) = &request.op {
                assert!(validate_key(key.as_str()).is_ok(), "accepted a bad key {key}");
            }
            Reply::ok(b"{\"v\":1}").id(request.id).encode(&mut out);
        }
        Err(error) => error.encode(&mut out),
    }
    one_json_line(&out);
});
