//! Benchmark baseline, part 2: a naive 2-hop relay. Each client connection gets its own
//! upstream connection, and bytes are copied both ways as they come — no parsing, no
//! multiplexing, no batching beyond what one read gives. It is the limit a "just forward it"
//! design reaches on this machine, for `scripts/bench.sh` to compare the balancer with.
//!
//!     cargo run --release -p client --example relay -- 127.0.0.1:7000 127.0.0.1:7001
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark tool: failing loudly is fine

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

/// One side of a pair: its socket and the bytes waiting to be written to it.
struct Side {
    stream: TcpStream,
    pending: Vec<u8>,
}

struct Pair {
    client: Side,
    upstream: Side,
}

/// Reads everything available from `from` into `to.pending`, then writes what `to` takes.
/// Returns false once the pair should be closed.
fn pump(from: &mut Side, to: &mut Side, buf: &mut [u8]) -> bool {
    let mut open = true;
    loop {
        match from.stream.read(buf) {
            Ok(0) => {
                open = false;
                break;
            }
            Ok(n) => to.pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::NotConnected => break,
            Err(_) => return false,
        }
    }
    while !to.pending.is_empty() {
        match to.stream.write(&to.pending) {
            Ok(n) => {
                to.pending.drain(..n);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::NotConnected) => break,
            Err(_) => return false,
        }
    }
    open
}

fn main() {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args.next().unwrap_or_else(|| "127.0.0.1:7000".into()).parse().unwrap();
    let upstream: SocketAddr = args.next().unwrap_or_else(|| "127.0.0.1:7001".into()).parse().unwrap();
    let mut poll = Poll::new().unwrap();
    let mut listener = TcpListener::bind(listen).unwrap();
    poll.registry().register(&mut listener, Token(0), Interest::READABLE).unwrap();
    println!("listening on {}", listener.local_addr().unwrap());
    // Pair n uses tokens 2n (client) and 2n + 1 (upstream).
    let mut pairs: HashMap<usize, Pair> = HashMap::new();
    let mut next = 1;
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let both = Interest::READABLE | Interest::WRITABLE;
    loop {
        poll.poll(&mut events, None).unwrap();
        for event in events.iter() {
            if event.token() == Token(0) {
                while let Ok((mut client, _)) = listener.accept() {
                    let mut up = TcpStream::connect(upstream).unwrap();
                    client.set_nodelay(true).unwrap();
                    up.set_nodelay(true).unwrap();
                    poll.registry().register(&mut client, Token(2 * next), both).unwrap();
                    poll.registry().register(&mut up, Token(2 * next + 1), both).unwrap();
                    let pair = Pair {
                        client: Side { stream: client, pending: Vec::new() },
                        upstream: Side { stream: up, pending: Vec::new() },
                    };
                    pairs.insert(next, pair);
                    next += 1;
                }
                continue;
            }
            let id = event.token().0 / 2;
            let Some(pair) = pairs.get_mut(&id) else { continue };
            let open = pump(&mut pair.client, &mut pair.upstream, &mut buf)
                && pump(&mut pair.upstream, &mut pair.client, &mut buf);
            if !open {
                pairs.remove(&id);
            }
        }
    }
}
