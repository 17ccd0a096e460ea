//! A small blocking client for the line protocol: one connection, one request at a time, with
//! read and write timeouts. The `client` CLI's one-shot requests use it, and so do the tests
//! (through `testkit`, which re-exports it).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde_json::Value;

/// Default time to wait for one answer (and for the connect) before failing instead of hanging.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// One blocking connection speaking the line protocol.
pub struct LineClient {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl LineClient {
    pub fn connect(addr: impl ToSocketAddrs) -> io::Result<Self> {
        Self::connect_timeout(addr, ANSWER_TIMEOUT)
    }

    pub fn connect_timeout(addr: impl ToSocketAddrs, timeout: Duration) -> io::Result<Self> {
        let mut last = io::Error::new(io::ErrorKind::InvalidInput, "address resolves to nothing");
        for addr in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(timeout))?;
                    stream.set_write_timeout(Some(timeout))?;
                    stream.set_nodelay(true)?;
                    let reader = BufReader::new(stream.try_clone()?);
                    return Ok(LineClient { writer: stream, reader });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The connection itself, for writes this client has no method for.
    pub fn stream(&self) -> &TcpStream {
        &self.writer
    }

    pub fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.writer.set_read_timeout(Some(timeout))
    }

    /// Sends `line` followed by `\n`.
    pub fn send(&mut self, line: &str) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        self.writer.write_all(&bytes)
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)
    }

    /// Reads one answer line; `Ok(None)` when the server closed the connection.
    pub fn recv_line(&mut self) -> io::Result<Option<String>> {
        let mut line = String::new();
        match self.reader.read_line(&mut line)? {
            0 => Ok(None),
            _ => Ok(Some(line)),
        }
    }

    /// Reads one answer and parses it as JSON; a close or non-JSON is an error.
    pub fn recv(&mut self) -> io::Result<Value> {
        let line = self
            .recv_line()?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before an answer"))?;
        if !line.ends_with('\n') {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("answer without newline: {line:?}")));
        }
        serde_json::from_str(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}: {line:?}")))
    }

    /// Sends one line and reads one answer.
    pub fn request(&mut self, line: &str) -> io::Result<Value> {
        self.send(line)?;
        self.recv()
    }

    /// True once the server has closed the connection (reads EOF or a reset), within the
    /// read timeout. Any answer lines still in flight are skipped.
    pub fn is_closed_by_peer(&mut self) -> bool {
        let mut sink = [0u8; 4096];
        loop {
            match self.reader.read(&mut sink) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted) => {
                    return true
                }
                Err(e) => {
                    // Said, so that a failure shows what the socket reported.
                    eprintln!("is_closed_by_peer: {e} ({:?})", e.kind());
                    return false;
                }
            }
        }
    }
}
