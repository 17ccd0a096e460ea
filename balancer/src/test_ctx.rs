//! For unit tests of the parts that talk to peers through a [`Ctx`]: a real one, from an
//! engine over sockets that never connect (connects stay under way; nothing is read).

use std::io::{self, Empty};
use std::marker::PhantomData;
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

/// Runs `test` once, from the service's `on_start`; `T` is the timer type it wants.
struct Once<F, T>(Option<F>, PhantomData<T>);

impl<T, F: FnOnce(&mut Ctx<T>)> Service for Once<F, T> {
    type Timer = T;

    fn on_start(&mut self, ctx: &mut Ctx<T>) {
        if let Some(test) = self.0.take() {
            test(ctx);
        }
    }
    fn on_line(&mut self, _: &mut Ctx<T>, _: ClientId, _: &[u8]) {}
    fn on_timer(&mut self, _: &mut Ctx<T>, _: T) {}
}

/// Runs `test` with a live `Ctx` (no waker, as in the simulator).
pub fn with_ctx<T>(test: impl FnOnce(&mut Ctx<T>)) {
    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let service = Once(Some(test), PhantomData);
    let mut engine = Engine::new(ServerConfig::default(), addr, service, None, Instant::now()).unwrap();
    engine.start(&mut NoSockets, Instant::now(), false);
}
