//! The driver the binaries run: one single-threaded mio loop that owns the listener, every
//! socket (clients by `Token(CLIENT_BASE + index)`, peers by `Token(PEER_BASE + index)`),
//! signals, the admin listener and the real clock, and hands the rest to the [`Engine`].

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};

use super::bind::{bind_listener_with, ShutdownHandle};
use super::engine::{Admission, Engine, Slots, Sockets};
use super::{ServerConfig, Service};
use crate::admin::Admin;
use crate::upstream::connect_finished;

/// What a client connection is watched for. Priority too, where the platform reports it: Linux
/// stops a read at a TCP urgent mark with the rest of the data still queued, so once a client
/// has sent urgent data its reads go on to `WouldBlock` (a short read would otherwise leave its
/// requests unread, with no readiness event to come for them).
#[cfg(any(target_os = "linux", target_os = "android"))]
const CLIENT_READS: Interest = Interest::READABLE.add(Interest::PRIORITY);
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const CLIENT_READS: Interest = Interest::READABLE;

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const WAKER: Token = Token(2);
/// Client connections use tokens `CLIENT_BASE + index`.
const CLIENT_BASE: usize = 16;
/// Peer connections use tokens `PEER_BASE + index`.
const PEER_BASE: usize = 1 << 40;

/// The sockets, indexed like the engine's connections.
struct MioSockets {
    registry: Registry,
    clients: Slots<TcpStream>,
    peers: Slots<TcpStream>,
}

impl MioSockets {
    fn close(registry: &Registry, socket: Option<TcpStream>) {
        if let Some(mut stream) = socket {
            let _ = registry.deregister(&mut stream);
        }
    }
}

impl Sockets for MioSockets {
    type Stream = TcpStream;

    fn client(&mut self, index: usize) -> Option<&mut TcpStream> {
        self.clients.get_mut(index)
    }

    fn watch_client_writes(&mut self, index: usize, on: bool) -> io::Result<()> {
        let interest = if on { CLIENT_READS | Interest::WRITABLE } else { CLIENT_READS };
        match self.clients.get_mut(index) {
            Some(stream) => self.registry.reregister(stream, Token(CLIENT_BASE + index), interest),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    fn drop_client(&mut self, index: usize) {
        Self::close(&self.registry, self.clients.take(index));
    }

    /// A non-blocking connect, watched for both readiness kinds: edge-triggered, so an idle
    /// connection costs no wake-ups, and a close is noticed while idle.
    fn connect_peer(&mut self, index: usize, addr: SocketAddr) -> io::Result<()> {
        let mut stream = TcpStream::connect(addr)?;
        self.registry.register(&mut stream, Token(PEER_BASE + index), Interest::READABLE | Interest::WRITABLE)?;
        crate::sockopt::set_stream_options(&stream);
        let old = self.peers.put(index, stream);
        Self::close(&self.registry, old);
        Ok(())
    }

    fn peer_connected(&mut self, index: usize) -> io::Result<bool> {
        match self.peers.get(index) {
            Some(stream) => connect_finished(stream),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    fn peer(&mut self, index: usize) -> Option<&mut TcpStream> {
        self.peers.get_mut(index)
    }

    fn drop_peer(&mut self, index: usize) {
        Self::close(&self.registry, self.peers.take(index));
    }
}

/// A service bound to its listener and ready to run.
pub struct Server<S: Service> {
    poll: Poll,
    events: Events,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    shutdown: ShutdownHandle,
    /// The admin HTTP listener (SPEC 6), when `--admin-port` is given.
    admin: Option<Admin>,
    sockets: MioSockets,
    engine: Engine<S>,
}

impl<S: Service> Server<S> {
    /// Binds `config.host:config.port` and builds the service with the bound address (a proxy
    /// needs its own port to fill in `node`).
    pub fn bind(config: ServerConfig, make: impl FnOnce(SocketAddr) -> io::Result<S>) -> io::Result<Self> {
        let listener = bind_listener_with(&config.host, config.port, config.reuse_port)?;
        let local_addr = listener.local_addr()?;
        let service = make(local_addr)?;
        Server::with_listener(config, listener, service)
    }

    /// Runs on an already bound listener (made non-blocking here).
    pub fn with_std_listener(config: ServerConfig, listener: StdListener, service: S) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Server::with_listener(config, TcpListener::from_std(listener), service)
    }

    /// Runs on an already bound mio listener.
    pub fn with_listener(config: ServerConfig, mut listener: TcpListener, service: S) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        registry.register(&mut listener, LISTENER, Interest::READABLE)?;
        let signals = if config.handle_signals {
            let mut signals =
                signal_hook_mio::v1_0::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGUSR1, libc::SIGHUP])?;
            registry.register(&mut signals, SIGNALS, Interest::READABLE)?;
            Some(signals)
        } else {
            None
        };
        let waker = Arc::new(Waker::new(&registry, WAKER)?);
        let admin = match config.admin_port {
            Some(port) => {
                let host = config.admin_host.as_deref().unwrap_or(&config.host);
                Some(Admin::bind(host, port, &registry, config.idle_timeout)?)
            }
            None => None,
        };
        let shutdown = ShutdownHandle::new(waker.clone());
        let engine = Engine::new(config, local_addr, service, Some(waker), Instant::now())?;
        Ok(Server {
            poll,
            events: Events::with_capacity(1024),
            listener: Some(listener),
            local_addr,
            signals,
            shutdown,
            admin,
            sockets: MioSockets { registry, clients: Slots::default(), peers: Slots::default() },
            engine,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the admin listener listens, when there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(Admin::local_addr)
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Runs the loop until a drain completes. Returns an error only if polling itself fails.
    pub fn run(mut self) -> io::Result<()> {
        if self.engine.ctx.config.announce {
            let mut stdout = io::stdout().lock();
            writeln!(stdout, "listening on {}", self.local_addr)?;
            if let Some(addr) = self.admin_addr() {
                writeln!(stdout, "admin listening on {addr}")?;
            }
            stdout.flush()?;
        }
        info!("listening on {}", self.local_addr);
        self.engine.start(&mut self.sockets, Instant::now(), self.admin.is_some());
        loop {
            let now = Instant::now();
            self.engine.begin_turn(now);
            let busy = self.engine.has_leftovers() || self.admin.as_ref().is_some_and(Admin::has_again);
            let timeout = if busy {
                Some(Duration::ZERO)
            } else {
                self.engine.next_deadline().map(|at| at.saturating_duration_since(now))
            };
            if let Err(e) = self.poll.poll(&mut self.events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!("poll failed: {e}");
                return Err(e);
            }
            self.engine.set_now(Instant::now());
            self.handle_events();
            self.engine.drive_again(&mut self.sockets);
            if let Some(admin) = self.admin.as_mut() {
                admin.drive_again(&mut self.engine.service, &mut self.engine.ctx);
            }
            let due = self.engine.fire_timers(&mut self.sockets, Instant::now());
            if due.drain_deadline {
                break;
            }
            if due.accept {
                self.accept_all();
            }
            if due.tick {
                if let Some(admin) = self.admin.as_mut() {
                    let now = self.engine.ctx.now();
                    admin.sweep(now);
                    // Connections left in the backlog by an accept that ran out of descriptors.
                    admin.accept_all(now);
                    self.engine.admin_tick();
                }
            }
            self.engine.end_turn(&mut self.sockets);
            if self.engine.is_finished() {
                break;
            }
        }
        self.engine.stop();
        Ok(())
    }

    fn handle_events(&mut self) {
        // Taken out for the turn so that handlers may borrow `self` mutably; swapping in an
        // empty `Events` does not allocate.
        let events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        // Upstream answers first: they retire requests (a balancer's in-flight counts drop)
        // before the turn's new requests are routed on those counts.
        for event in events.iter() {
            if let Some(index) = event.token().0.checked_sub(PEER_BASE) {
                self.engine.peer_ready(&mut self.sockets, index);
            }
        }
        for event in events.iter() {
            match event.token() {
                LISTENER => self.accept_all(),
                SIGNALS => self.on_signals(),
                WAKER if self.shutdown.is_requested() => self.begin_drain("shutdown requested"),
                WAKER => self.engine.wake(&mut self.sockets),
                Token(t) if t >= PEER_BASE => {}
                crate::admin::LISTENER => {
                    if let Some(admin) = self.admin.as_mut() {
                        admin.accept_all(self.engine.ctx.now());
                    }
                }
                // After the line protocol's events, below.
                token if crate::admin::conn_index(token).is_some() => {}
                Token(t) if t >= CLIENT_BASE => {
                    // After urgent data, a short read no longer means an empty socket.
                    let read_until_empty = event.is_read_closed() || event.is_error() || event.is_priority();
                    self.engine.client_ready(&mut self.sockets, t - CLIENT_BASE, read_until_empty);
                }
                _ => {}
            }
        }
        // Admin connections last: a request on the line protocol that arrived in the same
        // turn as a scrape is not kept waiting behind it.
        if let Some(admin) = self.admin.as_mut() {
            for index in events.iter().filter_map(|e| crate::admin::conn_index(e.token())) {
                admin.drive(index, &mut self.engine.service, &mut self.engine.ctx);
            }
        }
        self.events = events;
    }

    fn on_signals(&mut self) {
        let mut got = false;
        let (mut reopen, mut reload) = (false, false);
        if let Some(signals) = self.signals.as_mut() {
            // Drain every pending signal so the edge-triggered source re-arms.
            for signal in signals.pending() {
                match signal {
                    libc::SIGUSR1 => reopen = true,
                    libc::SIGHUP => reload = true,
                    _ => got = true,
                }
            }
        }
        if reload {
            info!("SIGHUP: reloading");
            self.engine.reload(&mut self.sockets);
        }
        if reopen {
            self.engine.reopen_log();
        }
        if got {
            self.begin_drain("signal received");
        }
    }

    fn begin_drain(&mut self, why: &str) {
        if self.engine.begin_drain(&mut self.sockets, why) {
            if let Some(mut listener) = self.listener.take() {
                let _ = self.sockets.registry.deregister(&mut listener);
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            let Some(listener) = self.listener.as_ref() else { return };
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => continue,
                Err(e) => {
                    // Out of descriptors or memory: the pending connection stays in the backlog.
                    self.engine.accept_failed(&e);
                    return;
                }
            }
        }
    }

    fn admit(&mut self, mut stream: TcpStream, peer: SocketAddr) {
        match self.engine.admit(peer) {
            Admission::Refused(line) => {
                // A fresh socket's send buffer is empty, so this either goes out whole or the
                // client is gone; either way the connection is closed right after.
                let _ = stream.write(&line);
            }
            Admission::Admitted(index) => {
                crate::sockopt::set_stream_options(&stream);
                let token = Token(CLIENT_BASE + index);
                if let Err(e) = self.sockets.registry.register(&mut stream, token, CLIENT_READS) {
                    warn!("cannot register connection from {peer}: {e}");
                    return self.engine.abandon(&mut self.sockets, index);
                }
                self.sockets.clients.put(index, stream);
                debug!("accepted {peer} as connection {index}");
            }
        }
    }
}
