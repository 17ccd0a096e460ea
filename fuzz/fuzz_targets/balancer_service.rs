//! The whole balancer in process, its proxy answering GETs with arbitrary bytes: arbitrary
//! client bytes get one valid JSON answer per request line, and the balancer goes on serving.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (client, proxy_answer) = cachetier_fuzz::split(data);
    let (addr, proxy) = cachetier_fuzz::balancer();
    proxy.set(proxy_answer);
    cachetier_fuzz::drive(addr, client);
});
