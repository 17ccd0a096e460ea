//! A connection from a service to the next tier (proxy → origin, balancer → proxy): a
//! non-blocking connect, buffered writes, and answer lines read as they arrive.
//!
//! It is I/O only. What a line means, how many requests may be outstanding, and when to give
//! up belong to the service that owns it.

use std::io;
use std::net::SocketAddr;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::framing::{next_frame, read_once, Frame, OutBuf};

/// Bytes read per `read` call on an upstream socket.
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug)]
pub struct Upstream {
    stream: TcpStream,
    token: Token,
    connected: bool,
    /// Received bytes live in `input[start..end]`; `input` is zeroed once when it grows, so
    /// reads do not pay for clearing memory.
    input: Vec<u8>,
    start: usize,
    end: usize,
    out: OutBuf,
    eof: bool,
    /// Bytes received over the connection's life: comparing it before and after a request
    /// tells whether the peer said anything to that request.
    received: u64,
}

/// What a readiness event did.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Progress {
    /// Still connecting; nothing else to do.
    Connecting,
    /// Connected; any input read is available through [`Upstream::frame`].
    Ready,
}

impl Upstream {
    /// Starts a non-blocking connect and registers for both readiness kinds: edge-triggered,
    /// so an idle connection costs no wake-ups, and a close is noticed while idle.
    pub fn connect(addr: SocketAddr, registry: &Registry, token: Token) -> io::Result<Upstream> {
        let mut stream = TcpStream::connect(addr)?;
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        let _ = stream.set_nodelay(true);
        Ok(Upstream {
            stream,
            token,
            connected: false,
            input: Vec::new(),
            start: 0,
            end: 0,
            out: OutBuf::new(),
            eof: false,
            received: 0,
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
        self.eof
    }

    pub fn received_bytes(&self) -> u64 {
        self.received
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
    /// everything available (stopping early once more than `max_line` bytes are buffered
    /// without a complete line, which [`Upstream::frame`] then reports as too long). An error
    /// means the connection is unusable (refused, reset, ...).
    pub fn on_ready(&mut self, max_line: usize) -> io::Result<Progress> {
        if !self.connected {
            if let Some(e) = self.stream.take_error()? {
                return Err(e);
            }
            match self.stream.peer_addr() {
                Ok(_) => self.connected = true,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(Progress::Connecting),
                Err(e) => return Err(e),
            }
        }
        self.flush()?;
        self.make_room();
        while !self.eof && self.end - self.start <= max_line {
            if self.end == self.input.len() {
                self.make_room();
            }
            match read_once(&mut self.stream, &mut self.input[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.end += n;
                    self.received += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(Progress::Ready)
    }

    /// The next complete answer line in the input, if any. Call [`Upstream::consume`] with
    /// the length it reports once the line has been used.
    pub fn frame(&self, max_line: usize) -> Frame<'_> {
        next_frame(&self.input[self.start..self.end], max_line)
    }

    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.input.len() > 4 * READ_CHUNK {
                // One huge answer should not pin its buffer for the life of the connection.
                self.input.truncate(READ_CHUNK);
                self.input.shrink_to_fit();
            }
        }
    }

    /// Bytes received but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Ensures free space after `end`: moves unconsumed bytes to the front, and grows the
    /// buffer only when it is more than half full of them.
    fn make_room(&mut self) {
        if self.start > 0 {
            self.input.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.input.len() - self.end < READ_CHUNK / 2 {
            let size = (self.input.len() * 2).max(READ_CHUNK);
            self.input.resize(size, 0);
        }
    }

    /// Stops watching the socket; dropping the `Upstream` afterwards closes it.
    pub fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.stream);
    }
}
