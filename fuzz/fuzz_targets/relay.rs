//! Relaying a proxy's answer: never a panic; and a JSON object carrying a balancer id is
//! relayed as one line of valid JSON with the client's id in its place.
#![no_main]

use balancer::relay::{parse_tagged, write_tagged};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(tagged) = parse_tagged(data) else { return };
    let mut out = Vec::new();
    write_tagged(&tagged, Some("\"client\""), &mut out);
    assert_eq!(out.last(), Some(&b'\n'));
    // The fast path trusts its peer (this project's proxies) to send JSON; when the input
    // was JSON, the output must be too, with the client's id.
    if serde_json::from_slice::<serde_json::Value>(data).is_ok() {
        let value: serde_json::Value = serde_json::from_slice(&out[..out.len() - 1]).expect("relayed JSON");
        assert_eq!(value["id"], "client");
    }
});
