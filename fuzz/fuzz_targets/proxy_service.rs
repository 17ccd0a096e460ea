//! The whole proxy in process, its origin answering with arbitrary bytes: arbitrary client
//! bytes get one valid JSON answer per request line, and the proxy goes on serving.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (client, origin_answer) = cachetier_fuzz::split(data);
    let (addr, origin) = cachetier_fuzz::proxy();
    origin.set(origin_answer);
    cachetier_fuzz::drive(addr, client);
});
