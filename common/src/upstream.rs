//! A connection to a server for tools that run their own mio loop (the load generator): a
//! non-blocking connect, buffered writes, and answer lines read as they arrive. The services
//! do not use it: their driver owns their peer sockets ([`crate::peer`]); both read through
//! the same [`PeerInput`].

use std::io;
use std::net::SocketAddr;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::framing::{Frame, OutBuf, SharedBytes};
use crate::peer::{InputPool, PeerInput};
pub use crate::peer::{RETAINED_INPUT, SHARE_LINE_MIN};

#[derive(Debug)]
pub struct Upstream {
    stream: TcpStream,
    token: Token,
    connected: bool,
    input: PeerInput,
    /// Where `input` takes a bigger buffer from (and gives one back).
    pool: InputPool,
    out: OutBuf,
}

/// What a readiness event did.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Progress {
    /// Still connecting; nothing else to do.
    Connecting,
    /// Connected; any input read is available through [`Upstream::frame`].
    Ready,
}

/// Whether a non-blocking connect has completed: `Ok(false)` while it is under way, an error
/// when it failed.
pub fn connect_finished(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

impl Upstream {
    /// Starts a non-blocking connect and registers for both readiness kinds: edge-triggered,
    /// so an idle connection costs no wake-ups, and a close is noticed while idle.
    pub fn connect(addr: SocketAddr, registry: &Registry, token: Token) -> io::Result<Upstream> {
        let mut stream = TcpStream::connect(addr)?;
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        crate::sockopt::set_stream_options(&stream);
        Ok(Upstream {
            stream,
            token,
            connected: false,
            input: PeerInput::new(),
            pool: InputPool::new(),
            out: OutBuf::new(),
        })
    }

    pub fn token(&self) -> Token {
        self.token
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The peer closed its side.
    pub fn is_eof(&self) -> bool {
        self.input.is_eof()
    }

    pub fn received_bytes(&self) -> u64 {
        self.input.received()
    }

    /// Queues `bytes` and writes what the socket takes now (nothing until connected).
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.extend(bytes);
        self.flush()
    }

    /// The buffer to append whole requests to; call [`Upstream::flush`] afterwards.
    pub fn out_buf(&mut self) -> &mut Vec<u8> {
        self.out.buf_mut()
    }

    pub fn flush(&mut self) -> io::Result<()> {
        if self.connected {
            self.out.flush_to(&mut self.stream)?;
        }
        Ok(())
    }

    /// Handles a readiness event: completes the connect, writes what is queued, and reads
    /// everything available (see [`PeerInput::fill`]). An error means the connection is
    /// unusable (refused, reset, ...).
    pub fn on_ready(&mut self, max_line: usize) -> io::Result<Progress> {
        if !self.connected {
            if !connect_finished(&self.stream)? {
                return Ok(Progress::Connecting);
            }
            self.connected = true;
        }
        self.flush()?;
        self.input.fill(&mut self.stream, max_line, &mut self.pool)?;
        Ok(Progress::Ready)
    }

    /// The next complete answer line in the input, if any. Call [`Upstream::consume`] with
    /// the length it reports once the line has been used.
    pub fn frame(&self, max_line: usize) -> Frame<'_> {
        self.input.frame(max_line)
    }

    pub fn consume(&mut self, n: usize) {
        self.input.consume(n);
    }

    /// The last [`Upstream::on_ready`] stopped reading at `max_line` buffered bytes with the
    /// socket not empty: once the complete lines are consumed, call it again (readiness is
    /// edge-triggered, no event comes for what the socket still holds).
    pub fn stopped_short(&self) -> bool {
        self.input.stopped_short()
    }

    /// Bytes received but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.input.buffered()
    }

    /// `part` of the input as shared bytes, without copying (see [`crate::peer::PeerLine::share`]).
    pub fn share(&self, part: &[u8]) -> Option<SharedBytes> {
        self.input.line(part).share(part)
    }

    /// Capacity of the input buffer (for tests of its bounds).
    pub fn input_capacity(&self) -> usize {
        self.input.capacity()
    }

    /// Stops watching the socket; dropping the `Upstream` afterwards closes it.
    pub fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    /// An upstream connected to a plain socket the test writes answers into.
    fn pair() -> (mio::Poll, Upstream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let poll = mio::Poll::new().unwrap();
        let up = Upstream::connect(listener.local_addr().unwrap(), poll.registry(), Token(7)).unwrap();
        let (peer, _) = listener.accept().unwrap();
        (poll, up, peer)
    }

    /// Reads until a complete line is buffered (bounded in time).
    fn wait_line(poll: &mut mio::Poll, up: &mut Upstream) -> usize {
        let mut events = mio::Events::with_capacity(8);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            up.on_ready(usize::MAX / 2).unwrap();
            if let Frame::Line(_, n) = up.frame(16 << 20) {
                return n;
            }
            assert!(Instant::now() < deadline, "no line within 10 s");
            poll.poll(&mut events, Some(Duration::from_millis(50))).unwrap();
        }
    }

    fn answer(len: usize, fill: u8) -> Vec<u8> {
        let mut line = vec![fill; len];
        line.push(b'\n');
        line
    }

    #[test]
    fn the_input_buffer_keeps_one_capacity_across_large_answers() {
        let (mut poll, mut up, mut peer) = pair();
        let mut capacities = Vec::new();
        for i in 0..40u8 {
            peer.write_all(&answer(300 * 1024, b'a' + i % 26)).unwrap();
            let n = wait_line(&mut poll, &mut up);
            assert_eq!(n, 300 * 1024 + 1);
            capacities.push(up.input_capacity());
            up.consume(n);
            capacities.push(up.input_capacity());
        }
        // It grows to hold one answer once, then neither grows nor shrinks per answer.
        let settled = capacities[4];
        assert!(capacities[4..].iter().all(|c| *c == settled), "{capacities:?}");
        assert!(settled <= RETAINED_INPUT, "{settled}");
    }

    #[test]
    fn reading_stopped_at_max_line_says_so_and_the_rest_comes_on_the_next_call() {
        let (mut poll, mut up, mut peer) = pair();
        // 100 KB of short lines: more than one read takes, far more than max_line.
        let max_line = 1000;
        let lines: Vec<u8> = (0..1000).flat_map(|_| answer(99, b'a')).collect();
        peer.write_all(&lines).unwrap();
        let mut events = mio::Events::with_capacity(8);
        let deadline = Instant::now() + Duration::from_secs(10);
        while up.buffered() <= max_line {
            up.on_ready(max_line).unwrap();
            assert!(Instant::now() < deadline, "nothing read");
            if up.buffered() <= max_line {
                poll.poll(&mut events, Some(Duration::from_millis(50))).unwrap();
            }
        }
        // No more readiness is waited for: what the socket still holds comes because
        // `stopped_short` says to read again.
        let mut got = 0;
        loop {
            while let Frame::Line(_, n) = up.frame(max_line) {
                up.consume(n);
                got += 1;
            }
            if !up.stopped_short() {
                break;
            }
            up.on_ready(max_line).unwrap();
        }
        assert_eq!(got, 1000, "every line, without another readiness event");
    }

    #[test]
    fn a_burst_beyond_the_retained_capacity_is_given_back() {
        let (mut poll, mut up, mut peer) = pair();
        peer.write_all(&answer(3 * RETAINED_INPUT, b'x')).unwrap();
        let n = wait_line(&mut poll, &mut up);
        assert!(up.input_capacity() > RETAINED_INPUT);
        up.consume(n);
        assert!(up.input_capacity() <= RETAINED_INPUT);
    }

    #[test]
    fn a_shared_line_stays_intact_while_reading_goes_on() {
        let (mut poll, mut up, mut peer) = pair();
        let mut held = Vec::new();
        for i in 0..12u8 {
            peer.write_all(&answer(100 * 1024, b'a' + i)).unwrap();
            let n = wait_line(&mut poll, &mut up);
            let Frame::Line(line, _) = up.frame(16 << 20) else { unreachable!() };
            let shared = up.share(line).expect("a long line is shared");
            assert_eq!(shared.len(), 100 * 1024);
            up.consume(n);
            held.push((i, shared));
            // Every other view is dropped, so buffers get reused while others stay pinned.
            if i % 2 == 1 {
                held.remove(0);
            }
        }
        for (i, shared) in &held {
            assert!(shared.iter().all(|b| *b == b'a' + i), "view {i} was overwritten");
        }
        let Frame::Incomplete = up.frame(16 << 20) else { panic!("nothing left") };
        assert!(up.share(b"short").is_none());
    }

    #[test]
    fn a_partial_line_carries_over_into_a_new_buffer() {
        let (mut poll, mut up, mut peer) = pair();
        let first = answer(64 * 1024, b'1');
        let second = answer(200 * 1024, b'2');
        let mut bytes = first.clone();
        bytes.extend_from_slice(&second[..1000]);
        peer.write_all(&bytes).unwrap();
        let n = wait_line(&mut poll, &mut up);
        let Frame::Line(line, _) = up.frame(16 << 20) else { unreachable!() };
        let view = up.share(line).unwrap();
        up.consume(n);
        peer.write_all(&second[1000..]).unwrap();
        let n = wait_line(&mut poll, &mut up);
        let Frame::Line(line, _) = up.frame(16 << 20) else { unreachable!() };
        assert_eq!(line, &second[..second.len() - 1]);
        assert_eq!(&view[..], &first[..first.len() - 1]);
        up.consume(n);
        assert_eq!(up.buffered(), 0);
    }
}
