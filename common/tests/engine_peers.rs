//! The engine's peer connections driven by a scripted driver (the `Sockets` seam), for orders
//! of events a real socket gives only by chance.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::peer::{PeerClosed, PeerId, PeerLine};
use common::server::{ClientId, Ctx, Engine, ServerConfig, Service, Sockets};

/// A peer socket as scripted: bytes to read, then (with `reset`) a reset; writes fail once
/// `reset` is set.
#[derive(Default)]
struct Scripted {
    inbox: VecDeque<u8>,
    reset: bool,
}

impl Read for Scripted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.inbox.is_empty() {
            return Err(if self.reset { io::ErrorKind::ConnectionReset } else { io::ErrorKind::WouldBlock }.into());
        }
        let n = buf.len().min(self.inbox.len());
        for (slot, b) in buf.iter_mut().zip(self.inbox.drain(..n)) {
            *slot = b;
        }
        Ok(n)
    }
}

impl Write for Scripted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.reset {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Default)]
struct Driver {
    peers: Vec<Option<Scripted>>,
}

impl Sockets for Driver {
    type Stream = Scripted;

    fn client(&mut self, _index: usize) -> Option<&mut Scripted> {
        None
    }

    fn watch_client_writes(&mut self, _index: usize, _on: bool) -> io::Result<()> {
        Ok(())
    }

    fn drop_client(&mut self, _index: usize) {}

    fn connect_peer(&mut self, index: usize, _addr: SocketAddr) -> io::Result<()> {
        if self.peers.len() <= index {
            self.peers.resize_with(index + 1, || None);
        }
        self.peers[index] = Some(Scripted::default());
        Ok(())
    }

    fn peer_connected(&mut self, _index: usize) -> io::Result<bool> {
        Ok(true)
    }

    fn peer(&mut self, index: usize) -> Option<&mut Scripted> {
        self.peers.get_mut(index)?.as_mut()
    }

    fn drop_peer(&mut self, index: usize) {
        if let Some(slot) = self.peers.get_mut(index) {
            *slot = None;
        }
    }
}

/// Connects on start; sends a request to its peer when its timer fires.
#[derive(Default)]
struct Toy {
    peer: Option<PeerId>,
    lines: Vec<Vec<u8>>,
    closed: usize,
}

impl Service for Toy {
    type Timer = ();

    fn on_start(&mut self, ctx: &mut Ctx<()>) {
        self.peer = Some(ctx.connect("127.0.0.1:9".parse().unwrap(), 1024));
    }

    fn on_line(&mut self, ctx: &mut Ctx<()>, client: ClientId, _line: &[u8]) {
        ctx.reply(client, true, |out| out.extend_from_slice(b"?\n"));
    }

    fn on_timer(&mut self, ctx: &mut Ctx<()>, _timer: ()) {
        if let Some(peer) = self.peer {
            ctx.send_to_peer(peer, b"GET k\n");
        }
    }

    fn on_peer_connected(&mut self, ctx: &mut Ctx<()>, _peer: PeerId) {
        let at = ctx.now() + Duration::from_millis(500);
        ctx.schedule(at, ());
    }

    fn on_peer_line(&mut self, _ctx: &mut Ctx<()>, _peer: PeerId, line: PeerLine<'_>) {
        self.lines.push(line.bytes().to_vec());
    }

    fn on_peer_closed(&mut self, _ctx: &mut Ctx<()>, _peer: PeerId, _closed: PeerClosed) {
        self.closed += 1;
    }
}

/// The peer answered and reset before the driver reported it readable, and the turn's own
/// write to it is what finds the reset: the answers it sent first are still handed over.
#[test]
fn answers_before_a_reset_found_by_the_turns_write_are_delivered() {
    let now = Instant::now();
    let addr = "127.0.0.1:1".parse().unwrap();
    let mut driver = Driver::default();
    let mut engine = Engine::new(ServerConfig::default(), addr, Toy::default(), None, now).unwrap();
    engine.start(&mut driver, now, false);
    let index = engine.service().peer.unwrap().index();
    engine.peer_ready(&mut driver, index);
    assert!(engine.ctx().is_peer_connected(engine.service().peer.unwrap()));
    // The answers and the reset arrive; no readiness is reported yet.
    let socket = driver.peers[index].as_mut().unwrap();
    socket.inbox.extend(b"one\ntwo\n");
    socket.reset = true;
    // A turn in which the service writes to the peer (its timer), ended by the engine.
    let later = now + Duration::from_secs(1);
    engine.begin_turn(later);
    let _ = engine.fire_timers(&mut driver, later);
    engine.end_turn(&mut driver);
    // The readiness the driver reports after that (the socket is gone by then, if it ended).
    engine.peer_ready(&mut driver, index);
    let toy = engine.service();
    assert_eq!(toy.lines, vec![b"one".to_vec(), b"two".to_vec()]);
    assert_eq!(toy.closed, 1);
}
