//! Asking the balancer for METRICS over one kept-alive connection (reconnected after any
//! failure), reading the answer line with a bound on its size and on the time it takes.

use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::snapshot::{NotBalancerMetrics, Snapshot};
use super::view::Sample;

/// The longest METRICS answer read: thousands of proxies with their polled METRICS fit.
pub const MAX_ANSWER_BYTES: usize = 32 << 20;

/// Why a sample could not be taken.
#[derive(Debug)]
pub enum FetchError {
    /// No connection, no answer in time, or the connection broke.
    Unreachable(String),
    /// An answer came, and it is not a balancer's METRICS.
    NotMetrics(String),
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Unreachable(why) | FetchError::NotMetrics(why) => f.write_str(why),
        }
    }
}

/// Where METRICS come from.
pub struct MetricsSource {
    host: String,
    port: u16,
    timeout: Duration,
    max_answer: usize,
    connection: Option<BufReader<TcpStream>>,
}

impl MetricsSource {
    pub fn new(host: &str, port: u16, timeout: Duration) -> MetricsSource {
        MetricsSource { host: host.to_owned(), port, timeout, max_answer: MAX_ANSWER_BYTES, connection: None }
    }

    /// `host:port` as given, for titles and messages.
    pub fn name(&self) -> String {
        super::snapshot::printable(&format!("{}:{}", self.host, self.port))
    }

    /// Asks for METRICS and reads the answer into a sample stamped with its arrival time.
    pub fn sample(&mut self) -> Result<Sample, FetchError> {
        let result = self.exchange();
        if result.is_err() {
            // Whatever state the connection is in, the next sample starts afresh.
            self.connection = None;
        }
        let line = result?;
        let at = Instant::now();
        let not_metrics = |why: String| {
            FetchError::NotMetrics(format!("{} did not answer with balancer METRICS: {why}", self.name()))
        };
        let answer: Value = serde_json::from_slice(&line).map_err(|e| not_metrics(format!("not JSON ({e})")))?;
        let snapshot = Snapshot::from_answer(&answer).map_err(|e: NotBalancerMetrics| not_metrics(e.to_string()))?;
        Ok(Sample { at, snapshot })
    }

    fn exchange(&mut self) -> Result<Vec<u8>, FetchError> {
        let name = self.name();
        let unreachable = |why: String| FetchError::Unreachable(format!("cannot reach the balancer at {name}: {why}"));
        if self.connection.is_none() {
            self.connection = Some(self.connect().map_err(|e| unreachable(e.to_string()))?);
        }
        let deadline = Instant::now() + self.timeout;
        let max = self.max_answer;
        let Some(reader) = self.connection.as_mut() else {
            return Err(unreachable("no connection".into()));
        };
        reader.get_mut().write_all(b"METRICS\n").map_err(|e| unreachable(e.to_string()))?;
        read_line(reader, deadline, max).map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => FetchError::NotMetrics(format!("{name} answered {e}")),
            _ => unreachable(e.to_string()),
        })
    }

    fn connect(&self) -> io::Result<BufReader<TcpStream>> {
        let mut last = io::Error::new(io::ErrorKind::InvalidInput, "the address resolves to nothing");
        for addr in (self.host.as_str(), self.port).to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, self.timeout) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(self.timeout))?;
                    stream.set_write_timeout(Some(self.timeout))?;
                    stream.set_nodelay(true)?;
                    return Ok(BufReader::new(stream));
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    #[cfg(test)]
    fn with_max_answer(mut self, max: usize) -> Self {
        self.max_answer = max;
        self
    }
}

/// One line (without its `\n`), given up on past `deadline` or `max` bytes, so that a peer
/// that trickles or never ends its line costs bounded time and memory.
fn read_line(reader: &mut impl BufRead, deadline: Instant, max: usize) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    loop {
        if Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no whole answer in time"));
        }
        let buffered = reader.fill_buf()?;
        if buffered.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before an answer"));
        }
        let (chunk, done) = match buffered.iter().position(|&b| b == b'\n') {
            Some(end) => (&buffered[..end], Some(end + 1)),
            None => (buffered, None),
        };
        if line.len().saturating_add(chunk.len()) > max {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a line longer than {max} bytes")));
        }
        line.extend_from_slice(chunk);
        let used = done.unwrap_or(buffered.len());
        reader.consume(used);
        if done.is_some() {
            return Ok(line);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use testkit::{refused_addr, FakeBehavior, FakeServer};

    fn source(port: u16) -> MetricsSource {
        MetricsSource::new("127.0.0.1", port, Duration::from_millis(300))
    }

    #[test]
    fn a_refused_connection_is_unreachable() {
        let e = source(refused_addr().port()).sample().unwrap_err();
        assert!(matches!(e, FetchError::Unreachable(_)), "{e:?}");
        assert!(e.to_string().starts_with("cannot reach the balancer at 127.0.0.1:"), "{e}");
    }

    #[test]
    fn silence_is_unreachable_after_the_timeout() {
        let silent = FakeServer::start(FakeBehavior::Silent).unwrap();
        let started = Instant::now();
        let e = source(silent.addr().port()).sample().unwrap_err();
        assert!(matches!(e, FetchError::Unreachable(_)), "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn garbage_and_other_services_are_not_metrics() {
        for reply in ["hello", r#"{"status":"OK","data":{"role":"proxy"}}"#, r#"{"status":"WRONG_METHOD","data":null}"#]
        {
            let fake = FakeServer::start(FakeBehavior::Reply(reply.into())).unwrap();
            let e = source(fake.addr().port()).sample().unwrap_err();
            assert!(matches!(e, FetchError::NotMetrics(_)), "{reply}: {e:?}");
            assert!(e.to_string().contains("did not answer with balancer METRICS"), "{e}");
        }
    }

    #[test]
    fn an_endless_line_is_cut_at_the_bound() {
        let fake = FakeServer::start(FakeBehavior::Reply("x".repeat(5000))).unwrap();
        let e = source(fake.addr().port()).with_max_answer(1000).sample().unwrap_err();
        assert!(e.to_string().contains("longer than 1000 bytes"), "{e}");
    }

    #[test]
    fn the_connection_is_kept_and_lines_split_anywhere_are_joined() {
        let answer = r#"{"status":"OK","data":{"role":"balancer","proxies":{"a:1":{"healthy":true}}}}"#;
        let fake = FakeServer::start(FakeBehavior::Reply(answer.into())).unwrap();
        let mut s = source(fake.addr().port());
        for _ in 0..3 {
            assert_eq!(s.sample().unwrap().snapshot.proxies[0].healthy, Some(true));
        }
        let mut split = io::BufReader::with_capacity(3, &b"abcdefg\nrest"[..]);
        let far = Instant::now() + Duration::from_secs(5);
        assert_eq!(read_line(&mut split, far, 100).unwrap(), b"abcdefg");
        assert!(read_line(&mut split, far, 100).is_err(), "no newline before EOF");
    }
}
