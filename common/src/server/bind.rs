//! Binding a listener the way every service does, and stopping a running server.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::warn;
use mio::net::TcpListener;
use mio::Waker;

/// Asks a running server to drain and stop, from any thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    pub(super) requested: Arc<AtomicBool>,
    pub(super) waker: Arc<Waker>,
}

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownHandle").field("requested", &self.requested).finish()
    }
}

impl ShutdownHandle {
    pub(super) fn new(waker: Arc<Waker>) -> Self {
        ShutdownHandle { requested: Arc::new(AtomicBool::new(false)), waker }
    }

    pub(super) fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    pub fn shutdown(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            warn!("could not wake the event loop for shutdown: {e}");
        }
    }
}

/// Listen backlog: deep enough that a burst of connects is not dropped (a dropped SYN costs
/// the client a one-second retransmit) while the loop is busy with other work.
const LISTEN_BACKLOG: i32 = 1024;

/// Binds a listener (port 0 picks a free one) the way every service does: SO_REUSEADDR, so a
/// restarted service gets its port back at once, and a backlog of [`LISTEN_BACKLOG`].
pub fn bind_listener(host: &str, port: u16) -> io::Result<TcpListener> {
    bind_listener_with(host, port, false)
}

/// [`bind_listener`], and with `reuse_port` also SO_REUSEPORT: other processes (of the same
/// user) that set it too may bind the same port, and the kernel spreads connections over them.
pub fn bind_listener_with(host: &str, port: u16, reuse_port: bool) -> io::Result<TcpListener> {
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    let mut last_err = io::Error::new(io::ErrorKind::AddrNotAvailable, format!("{host} resolves to no address"));
    for addr in addrs {
        match bind_one(addr, reuse_port) {
            Ok(listener) => return Ok(listener),
            Err(e) => last_err = io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")),
        }
    }
    Err(last_err)
}

fn bind_one(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(TcpListener::from_std(socket.into()))
}
