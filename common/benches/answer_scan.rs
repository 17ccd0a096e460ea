//! What the balancer's answer check (`parse_answer`, SPEC 3.6) costs per byte, on answer lines
//! built the way a proxy sends them.
//!
//! `cargo bench -p common --bench answer_scan` times every input (best of five rounds of a
//! fixed number of checks) and prints ns per answer and bytes per ns. `… -- NAME` times only
//! the inputs whose name contains NAME; `… -- --once NAME` checks each such input once, for
//! `valgrind --tool=callgrind --toggle-collect='*answer_scan::check*'` (instructions per byte).

use std::hint::black_box;
use std::time::{Duration, Instant};

use common::protocol::{parse_answer, parse_answer_with_serde, Data, Id, Reply, Status};

/// What a proxy sends the balancer for a cache hit: `Reply::encode` of the stored bytes with
/// `cache_hit`, `node` and the balancer's tag (proxy/src/service.rs `cached_reply`), without
/// the `\n` (framing cuts it off).
fn proxy_line(data: &[u8]) -> Vec<u8> {
    let mut reply = Reply::new(Status::Ok, Data::Json(data));
    reply.cache_hit = Some(true);
    reply.node = Some(7001);
    reply.id = Id::from_raw_json("123456");
    let mut out = Vec::new();
    reply.encode(&mut out);
    out.pop();
    out
}

/// The origin's `--synthetic-keys N --value-bytes B` value (origin/src/store.rs
/// `write_synthetic`): `{"key":"synthetic/N","value":"xxx…"}`, B bytes in all.
fn synthetic(n: u64, value_bytes: usize) -> Vec<u8> {
    let head = format!("{{\"key\":\"synthetic/{n}\",\"value\":\"");
    let tail = "\"}";
    let mut out = head.into_bytes();
    out.resize(value_bytes.saturating_sub(tail.len()), b'x');
    out.extend_from_slice(tail.as_bytes());
    out
}

/// An array of small records (short strings, numbers, literals, nesting), about `bytes` long.
fn small_members(bytes: usize) -> Vec<u8> {
    let mut out = b"[".to_vec();
    let mut n = 0u32;
    while out.len() < bytes {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(
            format!(
                "{{\"id\":{n},\"name\":\"item-{n}\",\"price\":{}.{:02},\"tags\":[\"a\",\"bc\",\"def\"],\
                 \"ok\":{},\"ref\":null,\"pos\":{{\"x\":-1.25e-3,\"y\":{}}}}}",
                n % 1000,
                n % 100,
                n.is_multiple_of(2),
                n * 7
            )
            .as_bytes(),
        );
        n += 1;
    }
    out.push(b']');
    out
}

/// A JSON string of `text` repeated to about `bytes`, in an object.
fn text_value(text: &str, bytes: usize) -> Vec<u8> {
    let mut out = b"{\"text\":\"".to_vec();
    while out.len() < bytes {
        out.extend_from_slice(text.as_bytes());
    }
    out.extend_from_slice(b"\"}");
    out
}

const CJK: &str = "日本語のテキストは一文字三バイトです。中文字符也是三个字节。Ελληνικά кириллица 😀🎉 ";
const LATIN: &str = "Příliš žluťoučký kůň úpěl ďábelské ódy; Größenwahn, façade, naïve café. ";
/// English with a non-ASCII character now and then (every ~150 bytes).
const ENGLISH: &str = "The cache tier answers every GET from the nearest proxy — or from the origin \
                       when no proxy has it — and the balancer checks each answer before it relays it. ";
/// Runs of 17 ASCII bytes between non-ASCII characters: each run one byte past the two words
/// a short string is read in.
const SHORT_RUNS: &str = "abcdefghijklmnopqé";
const ESCAPED: &str = "He said \\\"hello\\\" and left.\\nLine two\\tends here, path C:\\\\tmp\\\\x. ";

fn inputs() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("synthetic_200", proxy_line(&synthetic(7, 200))),
        ("synthetic_64k", proxy_line(&synthetic(7, 64 << 10))),
        ("synthetic_512k", proxy_line(&synthetic(7, 512 << 10))),
        ("small_members_64k", proxy_line(&small_members(64 << 10))),
        ("utf8_cjk_64k", proxy_line(&text_value(CJK, 64 << 10))),
        ("utf8_latin_64k", proxy_line(&text_value(LATIN, 64 << 10))),
        ("english_64k", proxy_line(&text_value(ENGLISH, 64 << 10))),
        ("short_runs_64k", proxy_line(&text_value(SHORT_RUNS, 64 << 10))),
        ("escaped_text_64k", proxy_line(&text_value(ESCAPED, 64 << 10))),
    ]
}

/// The measured call (kept out of line so that callgrind can count it alone).
#[inline(never)]
fn check(line: &[u8]) -> bool {
    parse_answer(black_box(line)).is_ok()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let once = args.iter().any(|a| a == "--once");
    let filter: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    for (name, line) in inputs() {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        // The inputs are well-formed answers, and the checker agrees with the reference.
        assert_eq!(parse_answer(&line), parse_answer_with_serde(&line), "{name}");
        assert!(parse_answer(&line).is_ok(), "{name}");
        if once {
            assert!(check(&line));
            println!("{name}: {} bytes, checked once", line.len());
            continue;
        }
        // About 256 MiB of answers per round.
        let iterations = ((256usize << 20) / line.len()).max(1);
        let mut best = Duration::MAX;
        for _ in 0..5 {
            let start = Instant::now();
            for _ in 0..iterations {
                assert!(check(&line));
            }
            best = best.min(start.elapsed());
        }
        let ns = best.as_nanos() as f64 / iterations as f64;
        println!(
            "{name:<20} {:>8} bytes {:>12.1} ns/answer {:>7.2} bytes/ns (GB/s)  [{iterations} x 5]",
            line.len(),
            ns,
            line.len() as f64 / ns
        );
    }
}
