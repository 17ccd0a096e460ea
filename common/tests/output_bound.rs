//! SPEC 3.8 on the shared loop, through the public `Service` API over real sockets: answers
//! that wait in their slot for an earlier one count against the connection's output bound,
//! and shared bytes count once per connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::framing::SharedBytes;
use common::server::{ClientId, Ctx, Server, ServerConfig, Service, Ticket};
use testkit::{wait_until, RunningServer};

/// `SLOW` is answered only when `RELEASE` arrives (on any connection); `BIG` at once with
/// 64 KiB; `SHARED` at once with one shared 64 KiB value; `COUNT` with how many BIG and
/// SHARED lines were handled.
struct Toy {
    slow: Vec<Ticket>,
    handled: Arc<AtomicUsize>,
    shared: SharedBytes,
}

const VALUE: usize = 64 * 1024;

impl Service for Toy {
    type Timer = ();

    fn on_line(&mut self, ctx: &mut Ctx<()>, client: ClientId, line: &[u8]) {
        match line {
            b"SLOW" => self.slow.push(ctx.defer(client, true)),
            b"RELEASE" => {
                for ticket in self.slow.drain(..) {
                    ctx.complete(ticket, |out| out.extend_from_slice(b"slow\n"));
                }
                ctx.reply(client, true, |out| out.extend_from_slice(b"released\n"));
            }
            b"BIG" => {
                self.handled.fetch_add(1, Ordering::SeqCst);
                ctx.reply(client, true, |out| {
                    out.resize(out.len() + VALUE, b'b');
                    out.push(b'\n');
                });
            }
            b"SHARED" => {
                self.handled.fetch_add(1, Ordering::SeqCst);
                ctx.reply_shared(client, true, b"<", &self.shared, b">\n");
            }
            _ => ctx.reply(client, true, |out| out.extend_from_slice(b"?\n")),
        }
    }

    fn on_timer(&mut self, _ctx: &mut Ctx<()>, _timer: ()) {}
}

fn start(output_limit: usize) -> (RunningServer, Arc<AtomicUsize>) {
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = handled.clone();
    let config = ServerConfig { output_limit, ..ServerConfig::default() };
    let server =
        Server::bind(config, move |_| Ok(Toy { slow: Vec::new(), handled: counter, shared: vec![b's'; VALUE].into() }))
            .unwrap();
    (RunningServer::start(server), handled)
}

/// Once counted only when queued, 1,000 BIG answers behind one SLOW waited in their slots
/// uncounted: 64 MB for one client that never reads.
#[test]
fn answers_waiting_behind_an_earlier_one_count_against_the_bound() {
    let (server, handled) = start(256 * 1024);
    let mut hog = TcpStream::connect(server.addr()).unwrap();
    hog.write_all(b"SLOW\n").unwrap();
    hog.write_all(&b"BIG\n".repeat(1000)).unwrap();
    // Reading stops once the held-back answers pass the bound: four of 64 KiB and a bit.
    assert!(wait_until(Duration::from_secs(5), || handled.load(Ordering::SeqCst) >= 4));
    // And stays stopped (before the fix all 1,000 were handled within milliseconds).
    let more = wait_until(Duration::from_millis(500), || handled.load(Ordering::SeqCst) > 5);
    let settled = handled.load(Ordering::SeqCst);
    assert!(!more, "{settled} BIG answers held back for a client that reads nothing");
}

/// Shared bytes count once per connection: many answers of one value do not pause reading
/// sooner than one would, and each is written whole.
#[test]
fn shared_bytes_count_once_per_connection_and_arrive_whole() {
    let (server, handled) = start(256 * 1024);
    let mut c = testkit::LineClient::connect(server.addr()).unwrap();
    // Behind a SLOW, 100 SHARED answers wait in their slots: counted as one value, so all are
    // read (100 copies would be 6.4 MB, far over the bound).
    c.send_raw(b"SLOW\n").unwrap();
    c.send_raw(&b"SHARED\n".repeat(100)).unwrap();
    assert!(wait_until(Duration::from_secs(5), || handled.load(Ordering::SeqCst) == 100));
    testkit::LineClient::connect(server.addr()).unwrap().send_raw(b"RELEASE\n").unwrap();
    assert_eq!(c.recv_line().unwrap().unwrap(), "slow\n");
    let expected = format!("<{}>\n", "s".repeat(VALUE));
    for _ in 0..100 {
        assert_eq!(c.recv_line().unwrap().unwrap(), expected);
    }
}
