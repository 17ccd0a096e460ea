//! One service of the simulated cluster: the real service (the same code as its binary) in
//! an [`Engine`], driven like the mio driver drives it — peer events first, then accepts
//! and client connections, leftovers, timers, the turn's end — but on simulated sockets and
//! the virtual clock.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use common::server::{Admission, Engine, ServerConfig, Service, Slots, Sockets};

use crate::net::{EndId, Net, NodeId, Tag};

pub type SharedNet = Rc<RefCell<Net>>;

/// A socket of the simulated network; dropping it closes its end.
pub struct SimStream {
    end: EndId,
    net: SharedNet,
}

impl SimStream {
    pub fn new(end: EndId, net: SharedNet) -> Self {
        SimStream { end, net }
    }

    pub fn end(&self) -> EndId {
        self.end
    }
}

impl Read for SimStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.net.borrow_mut().read(self.end, buf)
    }
}

impl Write for SimStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.net.borrow_mut().write(self.end, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SimStream {
    fn drop(&mut self) {
        if let Ok(mut net) = self.net.try_borrow_mut() {
            net.close(self.end);
        }
    }
}

/// A node's sockets, lent to its engine.
struct SimSockets {
    node: NodeId,
    net: SharedNet,
    clients: Slots<SimStream>,
    peers: Slots<SimStream>,
}

impl Sockets for SimSockets {
    type Stream = SimStream;

    fn client(&mut self, index: usize) -> Option<&mut SimStream> {
        self.clients.get_mut(index)
    }

    fn watch_client_writes(&mut self, _index: usize, _on: bool) -> io::Result<()> {
        // The network reports room to write whenever a blocked writer's reader reads.
        Ok(())
    }

    fn drop_client(&mut self, index: usize) {
        self.clients.take(index);
    }

    fn connect_peer(&mut self, index: usize, addr: SocketAddr) -> io::Result<()> {
        let end = self.net.borrow_mut().connect(self.node, Tag::Peer(index), addr);
        self.peers.put(index, SimStream::new(end, self.net.clone()));
        Ok(())
    }

    fn peer_connected(&mut self, index: usize) -> io::Result<bool> {
        match self.peers.get(index) {
            Some(s) => self.net.borrow().connected(s.end),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    fn peer(&mut self, index: usize) -> Option<&mut SimStream> {
        self.peers.get_mut(index)
    }

    fn drop_peer(&mut self, index: usize) {
        self.peers.take(index);
    }
}

/// What the simulator needs of a node, whatever its service.
pub trait SimNode {
    fn name(&self) -> &str;
    fn addr(&self) -> SocketAddr;
    fn is_up(&self) -> bool;
    /// Runs one loop turn at `now` for what became ready.
    fn turn(&mut self, now: Instant, ready: &[Tag]);
    /// When it next wants a turn without anything becoming ready.
    fn next_deadline(&self) -> Option<Instant>;
    fn has_leftovers(&self) -> bool;
    /// The process dies: state lost, sockets gone.
    fn crash(&mut self);
    /// A new process starts at `now`.
    fn restart(&mut self, now: Instant);
    /// Work still held that should be gone once the cluster is idle: (what, how many).
    fn outstanding(&self) -> Vec<(String, usize)>;
    /// The largest output any client connection holds now (SPEC 3.8).
    fn max_client_output(&self) -> usize;
    /// Its METRICS data now.
    fn metrics(&self) -> Option<serde_json::Value>;
}

/// How to make the node's service (again, after a crash).
pub type Make<S> = Box<dyn FnMut(Instant) -> S>;

pub struct Node<S: Service> {
    id: NodeId,
    name: String,
    addr: SocketAddr,
    config: ServerConfig,
    make: Make<S>,
    net: SharedNet,
    live: Option<(Engine<S>, SimSockets)>,
}

impl<S: Service> Node<S>
where
    S::Timer: 'static,
{
    pub fn start(
        id: NodeId,
        name: &str,
        addr: SocketAddr,
        config: ServerConfig,
        make: Make<S>,
        net: SharedNet,
        now: Instant,
    ) -> Self {
        let mut node = Node { id, name: name.to_string(), addr, config, make, net, live: None };
        node.restart(now);
        node
    }

    pub fn engine(&self) -> Option<&Engine<S>> {
        self.live.as_ref().map(|(e, _)| e)
    }

    fn accept_all(engine: &mut Engine<S>, sockets: &mut SimSockets) {
        loop {
            let accepted = sockets.net.borrow_mut().accept(sockets.node);
            let Some((end, from)) = accepted else { return };
            let stream = SimStream::new(end, sockets.net.clone());
            match engine.admit(from) {
                Admission::Admitted(index) => {
                    sockets.net.borrow_mut().retag(end, Tag::Client(index));
                    sockets.clients.put(index, stream);
                    // What arrived before the accept is read now.
                    engine.client_ready(sockets, index, false);
                }
                Admission::Refused(line) => {
                    let mut stream = stream;
                    let _ = stream.write(&line);
                }
            }
        }
    }
}

impl<S: Service> SimNode for Node<S>
where
    S::Timer: 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn is_up(&self) -> bool {
        self.live.is_some()
    }

    fn turn(&mut self, now: Instant, ready: &[Tag]) {
        let Some((engine, sockets)) = self.live.as_mut() else { return };
        engine.begin_turn(now);
        for tag in ready {
            if let Tag::Peer(index) = tag {
                engine.peer_ready(sockets, *index);
            }
        }
        for tag in ready {
            match tag {
                Tag::Listener => Self::accept_all(engine, sockets),
                Tag::Client(index) => {
                    let hangup = sockets.clients.get(*index).is_some_and(|s| self.net.borrow().hung_up(s.end()));
                    engine.client_ready(sockets, *index, hangup);
                }
                _ => {}
            }
        }
        engine.drive_again(sockets);
        let due = engine.fire_timers(sockets, now);
        if due.drain_deadline {
            self.crash();
            return;
        }
        engine.end_turn(sockets);
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.engine()?.next_deadline()
    }

    fn has_leftovers(&self) -> bool {
        self.engine().is_some_and(Engine::has_leftovers)
    }

    fn crash(&mut self) {
        self.net.borrow_mut().crash(self.id);
        // The network has already closed its ends: dropping the streams closes nothing more.
        self.live = None;
    }

    fn restart(&mut self, now: Instant) {
        if self.live.is_some() {
            return;
        }
        let service = (self.make)(now);
        let Ok(mut engine) = Engine::new(self.config.clone(), self.addr, service, None, now) else { return };
        let mut sockets =
            SimSockets { node: self.id, net: self.net.clone(), clients: Slots::default(), peers: Slots::default() };
        self.net.borrow_mut().listen(self.addr, self.id);
        engine.start(&mut sockets, now, false);
        self.live = Some((engine, sockets));
    }

    fn outstanding(&self) -> Vec<(String, usize)> {
        let Some(engine) = self.engine() else { return Vec::new() };
        let mut out = engine.outstanding();
        out.extend(engine.service().outstanding());
        out
    }

    fn max_client_output(&self) -> usize {
        self.engine().map_or(0, Engine::max_client_output)
    }

    fn metrics(&self) -> Option<serde_json::Value> {
        let engine = self.engine()?;
        Some(engine.service().metrics_json(engine.ctx()))
    }
}
