//! The whole origin in process: arbitrary client bytes on one connection get one valid JSON
//! answer per request line, and the origin goes on serving others.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cachetier_fuzz::drive(cachetier_fuzz::origin(), data);
});
