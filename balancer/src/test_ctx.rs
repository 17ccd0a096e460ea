//! For unit tests of the parts that talk to peers through a [`Ctx`]: a real one, from an
//! engine over sockets that never connect (connects stay under way; nothing is read).

use std::io::{self, Empty};
use std::net::SocketAddr;
use std::time::Instant;

use common::server::{ClientId, Ctx, Engine, ServerConfig, Service, Sockets};

struct NoSockets;

impl Sockets for NoSockets {
    type Stream = Empty;

    fn client(&mut self, _: usize) -> Option<&mut Empty> {
        None
    }
    fn watch_client_writes(&mut self, _: usize, _: bool) -> io::Result<()> {
        Ok(())
    }
    fn drop_client(&mut self, _: usize) {}
    fn connect_peer(&mut self, _: usize, _: SocketAddr) -> io::Result<()> {
        Ok(())
    }
    fn peer_connected(&mut self, _: usize) -> io::Result<bool> {
        Ok(false)
    }
    fn peer(&mut self, _: usize) -> Option<&mut Empty> {
        None
    }
    fn drop_peer(&mut self, _: usize) {}
}

/// Runs `test` once, from the service's `on_start`.
struct Once<F>(Option<F>);

impl<F: FnOnce(&mut Ctx<()>)> Service for Once<F> {
    type Timer = ();

    fn on_start(&mut self, ctx: &mut Ctx<()>) {
        if let Some(test) = self.0.take() {
            test(ctx);
        }
    }
    fn on_line(&mut self, _: &mut Ctx<()>, _: ClientId, _: &[u8]) {}
    fn on_timer(&mut self, _: &mut Ctx<()>, _: ()) {}
}

/// Runs `test` with a live `Ctx`.
pub fn with_ctx(test: impl FnOnce(&mut Ctx<()>)) {
    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut engine = Engine::new(ServerConfig::default(), addr, Once(Some(test)), None, Instant::now()).unwrap();
    engine.start(&mut NoSockets, Instant::now(), false);
}
