//! The admin listener (SPEC 6): HTTP/1.1 on `--admin-port`, served by the service's own event
//! loop next to the line protocol. `GET /healthz` and `GET /metrics` are answered here for
//! every service; any other request is offered to the service ([`Service::admin_request`]),
//! which is how the balancer serves its dashboard.
//!
//! Requests are parsed with `httparse`. What one admin client can cost is bounded: a request
//! head of at most [`MAX_HEAD`] bytes, a body of at most [`MAX_BODY`], one answer buffered at a
//! time (the next request is not read while an answer is unwritten), [`MAX_CONNECTIONS`]
//! connections, and a deadline both for silence and for finishing a request once begun
//! (slowloris). A turn answers at most [`REQUEST_BUDGET`] requests of one connection, so a
//! pipelining client cannot hold the loop.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::debug;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use serde_json::Value;
use slab::Slab;

use crate::prom::{self, AdminStats};
use crate::server::{Ctx, Service};

/// The admin listener's token.
pub(crate) const LISTENER: Token = Token(3);
/// Admin connections use tokens `CONN_BASE + slab index` (below the peers' `PEER_BASE`).
const CONN_BASE: usize = 1 << 39;
const CONN_END: usize = 1 << 40;

/// The longest request head (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// The longest request body (the admin API takes none worth more).
pub const MAX_BODY: usize = 64 * 1024;
/// Admin connections at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 256;
/// Silence (or an unfinished request) after which a connection is closed, unless the
/// service's `--idle-timeout-ms` is shorter.
pub const MAX_IDLE: Duration = Duration::from_secs(10);
/// Requests of one connection answered per loop turn, and of all connections together; and
/// once this much loop time went to admin requests in a turn, the rest wait for the next
/// (a scrape costs tens of µs in a release build, milliseconds in a debug one). A line
/// protocol request that arrives while admin work runs waits at most this budget plus one
/// admin request: a hostile review measured HEALTH's p50 going from 24 µs to 305 µs under a
/// scraping flood with 500 µs, so the budget is kept to a few scrapes.
const REQUEST_BUDGET: usize = 2;
const TURN_BUDGET: usize = 4;
const TURN_TIME: Duration = Duration::from_micros(150);
/// Connections accepted (or refused) per loop turn: a flood of connects waits in the backlog
/// instead of holding the loop.
const ACCEPT_BUDGET: usize = 32;
/// What a connection past [`MAX_CONNECTIONS`] gets before it is closed.
const REFUSAL: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 27\r\nConnection: close\r\n\r\ntoo many admin connections\n";
const MAX_HEADERS: usize = 48;

/// An HTTP request, as a service sees it.
#[derive(Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The path without the query string.
    pub path: &'a str,
    pub query: &'a str,
    pub body: &'a [u8],
}

impl Request<'_> {
    pub fn is_get_or_head(&self) -> bool {
        self.method == "GET" || self.method == "HEAD"
    }
}

/// A response body: static bytes (embedded assets) or bytes made for this request.
#[derive(Debug)]
pub enum Body {
    Static(&'static [u8]),
    Owned(Vec<u8>),
}

impl Body {
    fn bytes(&self) -> &[u8] {
        match self {
            Body::Static(b) => b,
            Body::Owned(b) => b,
        }
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Body,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: Body) -> Self {
        Response { status, content_type, body }
    }

    pub fn text(status: u16, text: &str) -> Self {
        let mut body = text.as_bytes().to_vec();
        body.push(b'\n');
        Response::new(status, "text/plain; charset=utf-8", Body::Owned(body))
    }

    pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> Self {
        let mut body = Vec::with_capacity(1024);
        crate::protocol::write_json_value(&mut body, value);
        Response::new(200, "application/json", Body::Owned(body))
    }

    pub fn not_found() -> Self {
        Response::text(404, "not found")
    }

    pub fn method_not_allowed() -> Self {
        Response::text(405, "method not allowed")
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

struct Conn {
    stream: TcpStream,
    input: Vec<u8>,
    out: Vec<u8>,
    written: usize,
    eof: bool,
    /// Close once `out` is written (Connection: close).
    close_after: bool,
    /// After an error answer: our side is shut, and what the client still sends is read and
    /// dropped until it closes or goes quiet, so that the answer is not lost to a reset.
    linger: bool,
    last_active: Instant,
    /// When the first byte of the request being read arrived.
    request_started: Option<Instant>,
}

/// The admin listener and its connections.
pub(crate) struct Admin {
    /// Its own handle on the loop's poll, for its sockets.
    registry: Registry,
    listener: TcpListener,
    addr: SocketAddr,
    conns: Slab<Conn>,
    /// Connections that used up their request budget: driven again next turn.
    again: Vec<usize>,
    /// The accept budget ran out with connections perhaps still in the backlog.
    accept_again: bool,
    /// Requests that may still be answered this turn, and the loop time they took so far.
    turn_budget: usize,
    turn_busy: Duration,
    stats: AdminStats,
    idle: Duration,
    scratch: Box<[u8]>,
}

/// The connection index for an admin token.
pub(crate) fn conn_index(token: Token) -> Option<usize> {
    (CONN_BASE..CONN_END).contains(&token.0).then(|| token.0 - CONN_BASE)
}

/// What parsing the front of a connection's input found.
enum Parsed {
    Incomplete,
    /// A complete request: its head length, body length, and whether to keep the connection.
    Request {
        head: usize,
        body: usize,
        keep_alive: bool,
    },
    /// Answer with this status and close.
    Reject(u16, &'static str),
}

fn parse(input: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head = match request.parse(input) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if input.len() > MAX_HEAD => {
            return Parsed::Reject(431, "request head too large")
        }
        Ok(httparse::Status::Partial) => return Parsed::Incomplete,
        Err(httparse::Error::TooManyHeaders) => return Parsed::Reject(431, "too many headers"),
        Err(_) => return Parsed::Reject(400, "malformed request"),
    };
    if head > MAX_HEAD {
        return Parsed::Reject(431, "request head too large");
    }
    let mut keep_alive = request.version == Some(1);
    let mut body: Option<usize> = None;
    let mut host = false;
    for h in request.headers.iter() {
        if h.name.eq_ignore_ascii_case("host") {
            host = true;
        } else if h.name.eq_ignore_ascii_case("content-length") {
            // RFC 9110: 1*DIGIT, nothing else (no sign, no blanks inside): a front proxy that
            // reads `+5` differently must not see a different request boundary.
            let digits = h.value.trim_ascii();
            let valid = !digits.is_empty() && digits.iter().all(u8::is_ascii_digit);
            let Some(n) = std::str::from_utf8(digits).ok().filter(|_| valid).and_then(|v| v.parse::<usize>().ok())
            else {
                return Parsed::Reject(400, "bad Content-Length");
            };
            if body.is_some_and(|b| b != n) {
                return Parsed::Reject(400, "conflicting Content-Length");
            }
            body = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Reject(400, "Transfer-Encoding is not accepted; send Content-Length");
        } else if h.name.eq_ignore_ascii_case("connection") {
            let value = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if value.contains("close") {
                keep_alive = false;
            } else if value.contains("keep-alive") {
                keep_alive = true;
            }
        }
    }
    if request.version == Some(1) && !host {
        // RFC 9112 3.2: an HTTP/1.1 request without Host is answered 400.
        return Parsed::Reject(400, "an HTTP/1.1 request needs a Host header");
    }
    let body = body.unwrap_or(0);
    if body > MAX_BODY {
        return Parsed::Reject(413, "request body too large");
    }
    if input.len() < head + body {
        return Parsed::Incomplete;
    }
    Parsed::Request { head, body, keep_alive }
}

/// Appends a whole response (no body for HEAD).
fn write_response(out: &mut Vec<u8>, response: &Response, head_only: bool, keep_alive: bool) {
    let body = response.body.bytes();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        body.len()
    );
    if response.status == 405 {
        out.extend_from_slice(b"Allow: GET, HEAD\r\n");
    }
    out.extend_from_slice(if keep_alive { b"Connection: keep-alive\r\n\r\n" } else { b"Connection: close\r\n\r\n" });
    if !head_only {
        out.extend_from_slice(body);
    }
}

/// The service's METRICS data for the admin views, with `total_requests` as answered so far
/// (`common_metrics` counts the METRICS request being answered, and there is none here).
pub fn metrics_value<S: Service>(service: &S, ctx: &Ctx<S::Timer>) -> Value {
    let mut value = service.metrics_json(ctx);
    if let Some(total) = value.get_mut("total_requests") {
        if let Some(n) = total.as_u64() {
            *total = Value::from(n.saturating_sub(1));
        }
    }
    value
}

impl Admin {
    pub(crate) fn bind(host: &str, port: u16, registry: &Registry, idle_timeout: Duration) -> io::Result<Admin> {
        let mut listener = crate::server::bind_listener(host, port)
            .map_err(|e| io::Error::new(e.kind(), format!("admin listener: {e}")))?;
        let addr = listener.local_addr()?;
        registry.register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Admin {
            registry: registry.try_clone()?,
            listener,
            addr,
            conns: Slab::new(),
            again: Vec::new(),
            accept_again: false,
            turn_budget: TURN_BUDGET,
            turn_busy: Duration::ZERO,
            stats: AdminStats::default(),
            idle: idle_timeout.min(MAX_IDLE),
            scratch: vec![0; 16 * 1024].into_boxed_slice(),
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn has_again(&self) -> bool {
        !self.again.is_empty() || self.accept_again
    }

    pub(crate) fn accept_all(&mut self, now: Instant) {
        self.accept_again = false;
        for _ in 0..ACCEPT_BUDGET {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    if self.conns.len() >= MAX_CONNECTIONS {
                        // A fresh socket's buffer takes this whole; then the connection closes.
                        let _ = stream.write(REFUSAL);
                        debug!("admin: refused {peer}: at {MAX_CONNECTIONS} connections");
                        continue;
                    }
                    let entry = self.conns.vacant_entry();
                    let token = Token(CONN_BASE + entry.key());
                    if self.registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE).is_err() {
                        continue;
                    }
                    crate::sockopt::set_stream_options(&stream);
                    entry.insert(Conn {
                        stream,
                        input: Vec::new(),
                        out: Vec::new(),
                        written: 0,
                        eof: false,
                        close_after: false,
                        linger: false,
                        last_active: now,
                        request_started: None,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted || e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    // Out of descriptors: the next readiness (or tick) tries again.
                    debug!("admin: accept failed: {e}");
                    return;
                }
            }
        }
        self.accept_again = true;
    }

    /// Closes connections that were silent, or slow to finish a request, for too long.
    pub(crate) fn sweep(&mut self, now: Instant) {
        let idle = self.idle;
        let expired: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                now.saturating_duration_since(c.last_active) >= idle
                    || c.request_started.is_some_and(|t| now.saturating_duration_since(t) >= idle)
            })
            .map(|(i, _)| i)
            .collect();
        for index in expired {
            debug!("admin: closing connection {index}: idle or too slow");
            self.close(index);
        }
    }

    fn close(&mut self, index: usize) {
        if let Some(mut c) = self.conns.try_remove(index) {
            let _ = self.registry.deregister(&mut c.stream);
        }
    }

    /// Drives the connections that used up their budget last turn.
    pub(crate) fn drive_again<S: Service>(&mut self, service: &mut S, ctx: &mut Ctx<S::Timer>) {
        if self.accept_again {
            self.accept_all(ctx.now());
        }
        let again = std::mem::take(&mut self.again);
        for index in again {
            self.drive(index, service, ctx);
        }
        // The turn is over: the next one has a fresh budget.
        self.turn_budget = TURN_BUDGET;
        self.turn_busy = Duration::ZERO;
    }

    /// Brings one connection up to date: writes what is owed, then reads and answers requests
    /// one at a time until the socket is empty, an answer waits to be written, or the budget
    /// is spent.
    pub(crate) fn drive<S: Service>(&mut self, index: usize, service: &mut S, ctx: &mut Ctx<S::Timer>) {
        let mut answered = 0;
        loop {
            let now = ctx.now();
            let Some(c) = self.conns.get_mut(index) else { return };
            // Write what is owed.
            while c.written < c.out.len() {
                match c.stream.write(&c.out[c.written..]) {
                    Ok(0) => return self.close(index),
                    Ok(n) => {
                        c.written += n;
                        c.last_active = now;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return self.close(index),
                }
            }
            c.out.clear();
            c.written = 0;
            if c.close_after {
                return self.close(index);
            }
            if c.linger {
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
                // Bounded per turn, like everything else; the deadline ends it.
                for _ in 0..64 {
                    match c.stream.read(&mut self.scratch) {
                        Ok(0) => return self.close(index),
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(_) => return self.close(index),
                    }
                }
                self.again.push(index);
                return;
            }
            // Answer the next request, if a whole one is here.
            if !c.input.is_empty() {
                match parse(&c.input) {
                    Parsed::Request { head, body, keep_alive } => {
                        if answered == REQUEST_BUDGET || self.turn_budget == 0 || self.turn_busy >= TURN_TIME {
                            self.again.push(index);
                            return;
                        }
                        answered += 1;
                        self.turn_budget -= 1;
                        let input = std::mem::take(&mut c.input);
                        let mut out = std::mem::take(&mut c.out);
                        let started = Instant::now();
                        self.answer(&input[..head + body], head, keep_alive, &mut out, service, ctx);
                        let busy = started.elapsed();
                        self.stats.requests += 1;
                        self.stats.busy_seconds += busy.as_secs_f64();
                        self.turn_busy += busy;
                        let Some(c) = self.conns.get_mut(index) else { return };
                        c.out = out;
                        c.input = input;
                        c.input.drain(..head + body);
                        c.close_after = !keep_alive;
                        c.request_started = (!c.input.is_empty()).then_some(now);
                        continue;
                    }
                    Parsed::Reject(status, why) => {
                        debug!("admin: {status} {why}");
                        write_response(&mut c.out, &Response::text(status, why), false, false);
                        c.linger = true;
                        c.input = Vec::new();
                        continue;
                    }
                    Parsed::Incomplete => {}
                }
            }
            if c.eof {
                return self.close(index);
            }
            // Read more (the head and body limits bound what is kept).
            match c.stream.read(&mut self.scratch) {
                Ok(0) => c.eof = true,
                Ok(n) => {
                    c.last_active = now;
                    if c.input.is_empty() {
                        c.request_started = Some(now);
                    }
                    let room = (MAX_HEAD + MAX_BODY + 1).saturating_sub(c.input.len());
                    c.input.extend_from_slice(&self.scratch[..n.min(room)]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.close(index),
            }
        }
    }

    /// Answers one complete request into `out`.
    fn answer<S: Service>(
        &mut self,
        raw: &[u8],
        head: usize,
        keep_alive: bool,
        out: &mut Vec<u8>,
        service: &mut S,
        ctx: &mut Ctx<S::Timer>,
    ) {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        let _ = parsed.parse(raw);
        let (method, target) = (parsed.method.unwrap_or(""), parsed.path.unwrap_or(""));
        // RFC 9112 3.2.2: the absolute form (`http://host/path`) is accepted too.
        let target = absolute_form_path(target).unwrap_or(target);
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let request = Request { method, path, query, body: raw.get(head..).unwrap_or_default() };
        let response = match path {
            "/healthz" | "/metrics" if !request.is_get_or_head() => Response::method_not_allowed(),
            "/healthz" => Response::new(200, "text/plain; charset=utf-8", Body::Static(b"ok")),
            "/metrics" => {
                let value = metrics_value(service, ctx);
                let text = prom::render(&value, service.latency_histogram(), self.stats);
                Response::new(200, prom::CONTENT_TYPE, Body::Owned(text.into_bytes()))
            }
            _ if !path.starts_with('/') => Response::text(400, "the request target must be a path"),
            _ => service.admin_request(ctx, &request).unwrap_or_else(Response::not_found),
        };
        write_response(out, &response, method == "HEAD", keep_alive);
    }
}

/// The path of an absolute-form request target (`http://host:port/path?q` → `/path?q`).
fn absolute_form_path(target: &str) -> Option<&str> {
    let rest = target.strip_prefix("http://").or_else(|| target.strip_prefix("https://"))?;
    Some(rest.find('/').and_then(|at| rest.get(at..)).unwrap_or("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_and_rejects_bad_ones() {
        assert!(matches!(parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Parsed::Request { keep_alive: true, .. }));
        assert!(matches!(parse(b"GET / HTTP/1.0\r\n\r\n"), Parsed::Request { keep_alive: false, .. }));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            Parsed::Request { keep_alive: false, .. }
        ));
        assert!(matches!(parse(b"GET /metrics HTTP/1.1\r\nHost"), Parsed::Incomplete));
        assert!(matches!(parse(b"\x01\x02 nonsense\r\n\r\n"), Parsed::Reject(400, _)));
        assert!(matches!(parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), Parsed::Reject(400, _)));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n"),
            Parsed::Reject(413, _)
        ));
        // Only digits make a Content-Length; HTTP/1.1 needs a Host.
        for bad in ["+5", "-1", "5 5", "0x5", ""] {
            let request = format!("GET / HTTP/1.1\r\nHost: x\r\nContent-Length: {bad}\r\n\r\nabcde");
            assert!(matches!(parse(request.as_bytes()), Parsed::Reject(400, _)), "Content-Length {bad:?} accepted");
        }
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n\r\n"), Parsed::Reject(400, _)), "no Host accepted");
        assert!(matches!(parse(b"GET / HTTP/1.0\r\n\r\n"), Parsed::Request { .. }), "HTTP/1.0 needs no Host");
        assert_eq!(absolute_form_path("http://127.0.0.1:9/healthz?x=1"), Some("/healthz?x=1"));
        assert_eq!(absolute_form_path("http://host"), Some("/"));
        assert_eq!(absolute_form_path("/healthz"), None);
        assert!(matches!(parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab"), Parsed::Incomplete));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab"),
            Parsed::Request { body: 2, .. }
        ));
        let mut huge = b"GET / HTTP/1.1\r\nX-A: ".to_vec();
        huge.resize(MAX_HEAD + 10, b'a');
        assert!(matches!(parse(&huge), Parsed::Reject(431, _)));
    }
}
