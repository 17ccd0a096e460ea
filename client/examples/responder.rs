//! Benchmark baseline, part 1: answers every request line with the same 250-byte JSON line.
//! One mio loop; the cheapest possible "service" to put behind the relay.
//!
//!     cargo run --release -p client --example responder -- 127.0.0.1:7001
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark tool: failing loudly is fine

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

fn answer_line() -> Vec<u8> {
    let head = br#"{"status":"OK","data":{"value":""#;
    let tail = b"\"}}\n";
    let mut line = head.to_vec();
    line.resize(250 - tail.len(), b'x');
    line.extend_from_slice(tail);
    line
}

struct Conn {
    stream: TcpStream,
    out: Vec<u8>,
}

fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:7001".into()).parse().unwrap();
    let answer = answer_line();
    let mut poll = Poll::new().unwrap();
    let mut listener = TcpListener::bind(addr).unwrap();
    poll.registry().register(&mut listener, Token(0), Interest::READABLE).unwrap();
    println!("listening on {}", listener.local_addr().unwrap());
    let mut conns: HashMap<usize, Conn> = HashMap::new();
    let mut next = 1;
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        poll.poll(&mut events, None).unwrap();
        for event in events.iter() {
            if event.token() == Token(0) {
                while let Ok((mut stream, _)) = listener.accept() {
                    stream.set_nodelay(true).unwrap();
                    poll.registry()
                        .register(&mut stream, Token(next), Interest::READABLE | Interest::WRITABLE)
                        .unwrap();
                    conns.insert(next, Conn { stream, out: Vec::new() });
                    next += 1;
                }
                continue;
            }
            let id = event.token().0;
            let Some(c) = conns.get_mut(&id) else { continue };
            let mut closed = false;
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => {
                        for _ in buf[..n].iter().filter(|b| **b == b'\n') {
                            c.out.extend_from_slice(&answer);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            while !c.out.is_empty() {
                match c.stream.write(&c.out) {
                    Ok(n) => {
                        c.out.drain(..n);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            if closed {
                conns.remove(&id);
            }
        }
    }
}
