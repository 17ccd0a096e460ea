//! The line protocol every tier speaks (SPEC 2): request parsing in both forms, key
//! validation, the status set and response encoding.
//!
//! Parsing borrows from the request line wherever it can, so the common case (a text-form
//! `GET key` or a JSON request without escapes) allocates nothing.

use std::borrow::Cow;
use std::fmt;
use std::io::Write;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The longest key, in bytes, after the optional leading `/` is removed (SPEC 2.2).
pub const MAX_KEY_BYTES: usize = 256;

/// The longest piece of client input echoed back inside an error message.
const ECHO_LIMIT: usize = 40;

/// Every status a service may answer with (SPEC 2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    Ok,
    NotFound,
    OriginError,
    BadRequest,
    WrongMethod,
    OriginFailure,
    ProxyUnreachable,
    Overloaded,
}

impl Status {
    pub const ALL: [Status; 8] = [
        Status::Ok,
        Status::NotFound,
        Status::OriginError,
        Status::BadRequest,
        Status::WrongMethod,
        Status::OriginFailure,
        Status::ProxyUnreachable,
        Status::Overloaded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::NotFound => "NOT_FOUND",
            Status::OriginError => "ORIGIN_ERROR",
            Status::BadRequest => "BAD_REQUEST",
            Status::WrongMethod => "WRONG_METHOD",
            Status::OriginFailure => "ORIGIN_FAILURE",
            Status::ProxyUnreachable => "PROXY_UNREACHABLE",
            Status::Overloaded => "OVERLOADED",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|status| status.as_str() == s)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request id exactly as the client wrote it: the raw JSON text of a number or a string,
/// echoed back byte for byte so that the client gets "the same JSON value".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Id<'a>(&'a str);

impl<'a> Id<'a> {
    /// Accepts the raw JSON text of a number or a string; anything else is not an id.
    pub fn from_raw_json(raw: &'a str) -> Option<Id<'a>> {
        match raw.as_bytes().first()? {
            b'"' | b'-' | b'0'..=b'9' => Some(Id(raw)),
            _ => None,
        }
    }

    pub fn as_json(&self) -> &'a str {
        self.0
    }
}

/// A validated key, without the optional leading `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key<'a>(Cow<'a, str>);

impl<'a> Key<'a> {
    pub fn parse(raw: Cow<'a, str>) -> Result<Key<'a>, &'static str> {
        let stripped = match raw {
            Cow::Borrowed(s) => Cow::Borrowed(s.strip_prefix('/').unwrap_or(s)),
            Cow::Owned(s) => match s.strip_prefix('/') {
                Some(rest) => Cow::Owned(rest.to_owned()),
                None => Cow::Owned(s),
            },
        };
        validate_key(&stripped)?;
        Ok(Key(stripped))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_owned(self) -> Key<'static> {
        Key(Cow::Owned(self.0.into_owned()))
    }
}

/// An owned copy of a validated key, kept while its request is under way and written on
/// without being checked again. Built from a spare `String`, so keeping one need not allocate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyBuf(String);

impl KeyBuf {
    /// `key`, in `buf`'s allocation (whatever `buf` held is dropped).
    pub fn copy_of(key: &Key<'_>, mut buf: String) -> KeyBuf {
        buf.clear();
        buf.push_str(key.as_str());
        KeyBuf(buf)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its allocation back, for reuse.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::ops::Deref for KeyBuf {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for KeyBuf {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for KeyBuf {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a key (already without its optional leading `/`) against SPEC 2.2. Because a
/// segment may hold only unreserved characters and is never `.` or `..`, a valid key can be
/// used as a relative path that stays below its base directory.
pub fn validate_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("empty key");
    }
    if key.len() > MAX_KEY_BYTES {
        return Err("key longer than 256 bytes");
    }
    for segment in key.split('/') {
        if segment.is_empty() {
            return Err("empty key segment");
        }
        if segment == "." || segment == ".." {
            return Err("key segment may not be '.' or '..'");
        }
        if !segment.bytes().all(is_unreserved) {
            return Err("key may only contain A-Z a-z 0-9 - . _ ~ and /");
        }
    }
    Ok(())
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op<'a> {
    Get(Key<'a>),
    Purge(Key<'a>),
    Metrics,
    Health,
}

impl Op<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Get(_) => "GET",
            Op::Purge(_) => "PURGE",
            Op::Metrics => "METRICS",
            Op::Health => "HEALTH",
        }
    }
}

/// One parsed request line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub op: Op<'a>,
    pub id: Option<Id<'a>>,
}

/// Why a line is not a valid request, with the status to answer and the id to echo (when
/// the line got far enough for its id to be read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestError<'a> {
    pub status: Status,
    pub message: String,
    pub id: Option<Id<'a>>,
    /// The verb, when it was recognised (a `GET` with a bad key, say), for per-op counters.
    pub verb: Option<&'static str>,
}

impl<'a> RequestError<'a> {
    fn bad(message: impl Into<String>) -> Self {
        RequestError { status: Status::BadRequest, message: message.into(), id: None, verb: None }
    }

    fn for_verb(mut self, verb: &'static str) -> Self {
        self.verb = Some(verb);
        self
    }

    /// True when the line was recognisably a GET (it counts as an answered GET).
    pub fn is_get(&self) -> bool {
        self.verb == Some("GET")
    }

    fn with_id(mut self, id: Option<Id<'a>>) -> Self {
        self.id = id;
        self
    }

    /// Encodes the error answer as one line.
    pub fn encode(&self, out: &mut Vec<u8>) {
        Reply::error(self.status, &self.message).id(self.id).encode(out);
    }
}

/// Parses one request line (without its `\n`, and without the `\r` before it).
pub fn parse_request(line: &[u8]) -> Result<Request<'_>, RequestError<'_>> {
    if let Some(request) = text_get_fast(line) {
        return Ok(request);
    }
    let text = std::str::from_utf8(line).map_err(|_| RequestError::bad("request is not valid UTF-8"))?;
    let text = text.trim_matches(|c| c == ' ' || c == '\t');
    if text.starts_with('{') {
        parse_json(text)
    } else {
        parse_text(text)
    }
}

/// The hot path: a valid text-form `GET key`, read in one pass over the bytes with no
/// splitting and no separate UTF-8 check. `None` for anything else (including every
/// malformed line), which the general parser then judges, so errors read the same.
fn text_get_fast(line: &[u8]) -> Option<Request<'_>> {
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    let start = line.iter().position(|b| !blank(b))?;
    let end = line.iter().rposition(|b| !blank(b))?.checked_add(1)?;
    let text = line.get(start..end)?;
    let (verb, rest) = (text.get(..3)?, text.get(3..)?);
    if !verb.eq_ignore_ascii_case(b"get") {
        return None;
    }
    let key_start = rest.iter().position(|b| !blank(b))?;
    if key_start == 0 {
        return None; // `GETx`: not this verb
    }
    let raw = rest.get(key_start..)?;
    let key = raw.strip_prefix(b"/").unwrap_or(raw);
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return None;
    }
    // Every byte unreserved or `/` (so no blank: nothing after the key), and every segment
    // non-empty and neither `.` nor `..` (SPEC 2.2).
    let mut segment = 0usize;
    let mut dots = 0usize;
    for &b in key {
        if b == b'/' {
            if segment == 0 || segment == dots && dots <= 2 {
                return None;
            }
            (segment, dots) = (0, 0);
        } else if is_unreserved(b) {
            segment += 1;
            dots += usize::from(b == b'.');
        } else {
            return None;
        }
    }
    if segment == 0 || segment == dots && dots <= 2 {
        return None;
    }
    let key = std::str::from_utf8(key).ok()?; // ASCII, so this cannot fail
    Some(Request { op: Op::Get(Key(Cow::Borrowed(key))), id: None })
}

fn parse_text(text: &str) -> Result<Request<'_>, RequestError<'_>> {
    let mut words = text.split([' ', '\t']).filter(|w| !w.is_empty());
    let verb = words.next().unwrap_or("");
    let arg = words.next();
    if words.next().is_some() {
        // Checked before the verb is judged, so `FOO a b` and `GET a b` say the same thing.
        return Err(RequestError::bad("unexpected text after the key"));
    }
    let op = op_from_name(verb, arg.map(Cow::Borrowed), true)?;
    Ok(Request { op, id: None })
}

/// Borrows `op` and `key` when they hold no escapes; `id` stays raw JSON text to be echoed.
#[derive(Deserialize)]
struct WireRequest<'a> {
    #[serde(default, borrow)]
    op: Option<Text<'a>>,
    #[serde(default, borrow)]
    key: Option<Text<'a>>,
    #[serde(default, borrow)]
    id: Option<&'a RawValue>,
}

/// A JSON string, borrowed from the line unless it has escapes. serde borrows a `Cow<str>`
/// only when the field's type is exactly that; inside an `Option` it would always allocate,
/// hence this newtype.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// Used only when a JSON request is malformed, to find an id to echo in the error.
#[derive(Deserialize)]
struct WireId<'a> {
    #[serde(default, borrow)]
    id: Option<&'a RawValue>,
}

fn parse_json(text: &str) -> Result<Request<'_>, RequestError<'_>> {
    let wire: WireRequest = match serde_json::from_str(text) {
        Ok(wire) => wire,
        Err(err) => {
            let id = serde_json::from_str::<WireId>(text)
                .ok()
                .and_then(|w| w.id)
                .and_then(|raw| Id::from_raw_json(raw.get()));
            return Err(RequestError::bad(format!("invalid JSON request: {err}")).with_id(id));
        }
    };
    let id = match wire.id {
        None => None,
        Some(raw) => match Id::from_raw_json(raw.get()) {
            Some(id) => Some(id),
            None => return Err(RequestError::bad("id must be a number, a string or null")),
        },
    };
    let Some(Text(op)) = wire.op else {
        return Err(RequestError::bad("missing \"op\"").with_id(id));
    };
    let op = op_from_name(&op, wire.key.map(|Text(key)| key), false).map_err(|e| e.with_id(id))?;
    Ok(Request { op, id })
}

/// Builds the op from its name and argument. The text form treats an argument to an op that
/// takes none as an error; the JSON form ignores a `key` that the op does not use.
fn op_from_name<'a>(name: &str, key: Option<Cow<'a, str>>, strict_args: bool) -> Result<Op<'a>, RequestError<'a>> {
    let takes_key = |key: Option<Cow<'a, str>>| -> Result<Key<'a>, RequestError<'a>> {
        let raw = key.ok_or_else(|| RequestError::bad("missing key"))?;
        Key::parse(raw).map_err(RequestError::bad)
    };
    let no_args = |key: &Option<Cow<'a, str>>| {
        if strict_args && key.is_some() {
            Err(RequestError::bad(format!("{} takes no argument", name.to_ascii_uppercase())))
        } else {
            Ok(())
        }
    };
    if name.eq_ignore_ascii_case("get") {
        Ok(Op::Get(takes_key(key).map_err(|e| e.for_verb("GET"))?))
    } else if name.eq_ignore_ascii_case("purge") {
        Ok(Op::Purge(takes_key(key).map_err(|e| e.for_verb("PURGE"))?))
    } else if name.eq_ignore_ascii_case("metrics") {
        no_args(&key).map_err(|e| e.for_verb("METRICS"))?;
        Ok(Op::Metrics)
    } else if name.eq_ignore_ascii_case("health") {
        no_args(&key).map_err(|e| e.for_verb("HEALTH"))?;
        Ok(Op::Health)
    } else {
        Err(RequestError {
            status: Status::WrongMethod,
            message: format!("unknown method '{}'", truncate_for_echo(name)),
            id: None,
            verb: None,
        })
    }
}

/// Shortens client input before it is echoed in a message, on a character boundary.
fn truncate_for_echo(s: &str) -> Cow<'_, str> {
    if s.len() <= ECHO_LIMIT {
        return Cow::Borrowed(s);
    }
    let mut end = ECHO_LIMIT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}...", &s[..end]))
}

/// The `data` of an answer.
#[derive(Clone, Copy, Debug)]
pub enum Data<'a> {
    Null,
    /// Already-encoded JSON (one line, no newline), spliced in as is.
    Json(&'a [u8]),
    /// A human-readable message, encoded as a JSON string.
    Message(&'a str),
}

/// One answer line. Built on the stack and encoded straight into an output buffer, so a
/// cache hit costs a few `memcpy`s.
#[derive(Clone, Copy, Debug)]
pub struct Reply<'a> {
    pub status: Status,
    pub data: Data<'a>,
    pub id: Option<Id<'a>>,
    /// Proxy GET answers: whether the cache answered.
    pub cache_hit: Option<bool>,
    /// Proxy GET answers: the proxy's listening port.
    pub node: Option<u16>,
    /// Proxy GET answers: an expired entry served because the origin failed.
    pub stale: bool,
}

impl<'a> Reply<'a> {
    pub fn new(status: Status, data: Data<'a>) -> Self {
        Reply { status, data, id: None, cache_hit: None, node: None, stale: false }
    }

    pub fn ok(json: &'a [u8]) -> Self {
        Reply::new(Status::Ok, Data::Json(json))
    }

    pub fn error(status: Status, message: &'a str) -> Self {
        Reply::new(status, Data::Message(message))
    }

    pub fn id(mut self, id: Option<Id<'a>>) -> Self {
        self.id = id;
        self
    }

    /// Appends the answer and its `\n` to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"status\":\"");
        out.extend_from_slice(self.status.as_str().as_bytes());
        out.extend_from_slice(b"\",\"data\":");
        match self.data {
            Data::Null => out.extend_from_slice(b"null"),
            Data::Json(json) => out.extend_from_slice(json),
            Data::Message(text) => write_json_string(out, text),
        }
        if let Some(hit) = self.cache_hit {
            out.extend_from_slice(if hit { b",\"cache_hit\":true" } else { b",\"cache_hit\":false" });
        }
        if let Some(node) = self.node {
            out.extend_from_slice(b",\"node\":");
            out.extend_from_slice(itoa::Buffer::new().format(node).as_bytes());
        }
        if self.stale {
            out.extend_from_slice(b",\"stale\":true");
        }
        if let Some(id) = self.id {
            out.extend_from_slice(b",\"id\":");
            out.extend_from_slice(id.as_json().as_bytes());
        }
        out.extend_from_slice(b"}\n");
    }
}

/// Appends `text` as a JSON string literal.
pub fn write_json_string(out: &mut Vec<u8>, text: &str) {
    // Writing into a Vec cannot fail, and a &str always serializes.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// Appends `value` as one line of JSON (a METRICS or HEALTH `data` object, say) to `out`.
pub fn write_json_value<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Serializing plain data structures into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

/// Encodes an `OK` answer whose data is a serializable value (METRICS, HEALTH, PURGE).
pub fn encode_ok_value<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, id: Option<Id<'_>>, value: &T) {
    let start = out.len();
    write_json_value(out, value);
    // The value was written where `data` goes; move it behind the prefix.
    let data = out.split_off(start);
    Reply::ok(&data).id(id).encode(out);
}

/// Writes a text-form request line (what one tier sends the next, SPEC 2.1).
pub fn write_text_request(out: &mut Vec<u8>, verb: &str, key: Option<&str>) {
    out.extend_from_slice(verb.as_bytes());
    if let Some(key) = key {
        out.push(b' ');
        out.extend_from_slice(key.as_bytes());
    }
    out.push(b'\n');
}

/// Formats into a Vec without allocating a String first.
pub fn write_fmt(out: &mut Vec<u8>, args: fmt::Arguments<'_>) {
    let _ = out.write_fmt(args);
}

// ---- What one tier sends the next, and how an answer from it is read (balancer → proxy) ----

/// Writes a JSON-form GET tagged with the sender's own numeric `id` (SPEC 2.1: what the
/// balancer multiplexes toward a proxy that answered its HEALTH probe with a role).
pub fn write_tagged_get(out: &mut Vec<u8>, key: &KeyBuf, id: u64) {
    // A valid key (SPEC 2.2) has nothing to escape, and a KeyBuf holds only valid keys.
    out.extend_from_slice(b"{\"op\":\"get\",\"key\":\"");
    out.extend_from_slice(key.as_str().as_bytes());
    out.extend_from_slice(b"\",\"id\":");
    out.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
    out.extend_from_slice(b"}\n");
}

mod answer;
pub use answer::{parse_answer, parse_answer_with_serde, trailing_tag, write_answer_tail, Answer, AnswerError};

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// The GET fast path agrees with the general parser on every line it accepts, and
        /// accepts every valid text-form GET.
        #[test]
        fn the_get_fast_path_agrees_with_the_general_parser(line in "[ \t]{0,2}(GET|get|Get|GETx|PURGE)?[ \t]{0,2}/?[a-z.~_/-]{0,6}[ \t]{0,2}[a.]{0,2}") {
            let fast = text_get_fast(line.as_bytes());
            let general = std::str::from_utf8(line.as_bytes()).ok().map(|t| parse_text(t.trim_matches(|c| c == ' ' || c == '\t')));
            match (&fast, general) {
                (Some(f), Some(Ok(g))) => proptest::prop_assert_eq!(f, &g),
                (Some(f), other) => proptest::prop_assert!(false, "{line:?}: fast {f:?}, general {other:?}"),
                (None, Some(Ok(Request { op: Op::Get(_), .. }))) => proptest::prop_assert!(false, "{line:?}: a valid GET missed"),
                (None, _) => {}
            }
        }
    }

    fn ok(line: &str) -> Request<'_> {
        parse_request(line.as_bytes()).unwrap_or_else(|e| panic!("{line:?}: {e:?}"))
    }

    fn err(line: &[u8]) -> RequestError<'_> {
        match parse_request(line) {
            Ok(req) => panic!("{:?} parsed as {req:?}", String::from_utf8_lossy(line)),
            Err(e) => e,
        }
    }

    fn get(key: &str) -> Op<'_> {
        Op::Get(Key(Cow::Borrowed(key)))
    }

    #[test]
    fn text_form_table() {
        let table: &[(&str, Op)] = &[
            ("GET article/1", get("article/1")),
            ("get article/1", get("article/1")),
            ("GeT    article/1", get("article/1")),
            ("GET /article/1", get("article/1")),
            ("  GET article/1  ", get("article/1")),
            ("GET\tarticle/1", get("article/1")),
            ("GET a.b-c_d~e/F9", get("a.b-c_d~e/F9")),
            ("GET ...", get("...")),
            ("METRICS", Op::Metrics),
            ("metrics", Op::Metrics),
            ("HEALTH", Op::Health),
            ("PURGE article/1", Op::Purge(Key(Cow::Borrowed("article/1")))),
        ];
        for (line, op) in table {
            let req = ok(line);
            assert_eq!(&req.op, op, "{line:?}");
            assert_eq!(req.id, None);
        }
    }

    #[test]
    fn json_form_table() {
        let table: &[(&str, Op, Option<&str>)] = &[
            (r#"{"op":"get","key":"article/1","id":7}"#, get("article/1"), Some("7")),
            (r#"{"op":"GET","key":"/article/1"}"#, get("article/1"), None),
            (r#"{"op":"get","key":"a","id":"x-1"}"#, get("a"), Some("\"x-1\"")),
            (r#"{"op":"get","key":"a","id":null}"#, get("a"), None),
            (r#"{"op":"get","key":"a","id":-1.5e3}"#, get("a"), Some("-1.5e3")),
            (
                r#"{"op":"get","key":"a","id":123456789012345678901234567890}"#,
                get("a"),
                Some("123456789012345678901234567890"),
            ),
            (r#"{"op":"metrics"}"#, Op::Metrics, None),
            (r#"{"op":"health","key":"ignored","extra":[1,{"a":2}]}"#, Op::Health, None),
            (r#"{"op":"purge","key":"article/1"}"#, Op::Purge(Key(Cow::Borrowed("article/1"))), None),
            (r#"  { "op" : "get" , "key" : "a\/b" }"#, Op::Get(Key(Cow::Owned("a/b".into()))), None),
            (r#"{"op":"g\u0065t","key":"\u0061"}"#, get("a"), None),
        ];
        for (line, op, id) in table {
            let req = ok(line);
            assert_eq!(&req.op, op, "{line:?}");
            assert_eq!(req.id.map(|i| i.as_json()), *id, "{line:?}");
        }
    }

    #[test]
    fn json_strings_without_escapes_are_borrowed_from_the_line() {
        let req = ok(r#"{"op":"get","key":"article/1","id":7}"#);
        let Op::Get(Key(key)) = req.op else { panic!() };
        assert!(matches!(key, Cow::Borrowed(_)), "the key was copied");
    }

    #[test]
    fn bad_requests_table() {
        let table: &[(&[u8], Status)] = &[
            (b"GET", Status::BadRequest),
            (b"GET a b", Status::BadRequest),
            (b"HEALTH x", Status::BadRequest),
            (b"METRICS x", Status::BadRequest),
            (b"FOO", Status::WrongMethod),
            (b"DELETE a", Status::WrongMethod),
            (b"\xff\xfe", Status::BadRequest),
            (b"GET caf\xc3", Status::BadRequest),
            (b"{", Status::BadRequest),
            (b"{\"op\":\"get\",\"key\":\"a\"} trailing", Status::BadRequest),
            (b"{\"key\":\"a\"}", Status::BadRequest),
            (b"{\"op\":\"fetch\",\"key\":\"a\"}", Status::WrongMethod),
            (b"{\"op\":7}", Status::BadRequest),
            (b"{\"op\":\"get\"}", Status::BadRequest),
            (b"{\"op\":\"get\",\"key\":5}", Status::BadRequest),
            (b"{\"op\":\"get\",\"key\":\"a\",\"id\":true}", Status::BadRequest),
            (b"{\"op\":\"get\",\"key\":\"a\",\"id\":[1]}", Status::BadRequest),
            (b"{\"op\":\"get\",\"key\":\"a\",\"id\":{}}", Status::BadRequest),
            (b"{\"op\":\"get\",\"op\":\"get\",\"key\":\"a\"}", Status::BadRequest),
            (b"[\"get\"]", Status::WrongMethod),
        ];
        for (line, status) in table {
            assert_eq!(err(line).status, *status, "{:?}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn bad_keys_table() {
        let long = "a".repeat(257);
        let max = "a".repeat(256);
        let bad = [
            "..",
            ".",
            "../secret",
            "a/../../secret",
            "a/./b",
            "/../x",
            "//etc/passwd",
            "a//b",
            "a/",
            "%2e%2e/x",
            "a\\b",
            "..\\x",
            "a b",
            "a?b",
            "a#b",
            "a:b",
            "a\u{0}b",
            "é",
            long.as_str(),
        ];
        for key in bad {
            let line = format!("{{\"op\":\"get\",\"key\":{}}}", serde_json::to_string(key).unwrap());
            assert_eq!(err(line.as_bytes()).status, Status::BadRequest, "{key:?}");
        }
        assert_eq!(ok(&format!("GET {max}")).op, get(&max));
        assert_eq!(err(b"GET /").status, Status::BadRequest);
    }

    #[test]
    fn deep_nesting_never_overflows_the_stack() {
        // serde_json skips unknown fields without recursing, so a deep one is simply ignored.
        let ignored = format!("{{\"op\":\"get\",\"key\":\"a\",\"x\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(parse_request(ignored.as_bytes()).map(|r| r.op).ok(), Some(get("a")));
        // In a field that is read, the recursion limit turns it into a BAD_REQUEST.
        let used = format!("{{\"op\":\"get\",\"key\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(parse_request(used.as_bytes()).err().map(|e| e.status), Some(Status::BadRequest));
    }

    #[test]
    fn errors_echo_the_id_when_it_can_be_read() {
        assert_eq!(err(br#"{"op":"fetch","id":9}"#).id.map(|i| i.as_json()), Some("9"));
        assert_eq!(err(br#"{"op":"get","key":"../x","id":"q"}"#).id.map(|i| i.as_json()), Some("\"q\""));
        assert_eq!(err(br#"{"op":"get","key":5,"id":3}"#).id.map(|i| i.as_json()), Some("3"));
    }

    #[test]
    fn errors_remember_a_recognised_verb() {
        assert!(err(b"GET ../x").is_get());
        assert!(err(br#"{"op":"get"}"#).is_get());
        assert!(!err(b"HEALTH x").is_get());
        assert!(!err(b"FOO x").is_get());
    }

    #[test]
    fn long_unknown_verbs_are_truncated_in_the_message() {
        let verb = "X".repeat(10_000);
        let e = err(verb.as_bytes());
        assert_eq!(e.status, Status::WrongMethod);
        assert!(e.message.len() < 100, "{}", e.message);
    }

    #[test]
    fn reply_encoding() {
        let mut out = Vec::new();
        Reply::ok(br#"{"a":1}"#).id(Id::from_raw_json("7")).encode(&mut out);
        assert_eq!(out, b"{\"status\":\"OK\",\"data\":{\"a\":1},\"id\":7}\n");

        out.clear();
        let mut reply = Reply::ok(b"[1]");
        reply.cache_hit = Some(true);
        reply.node = Some(8001);
        reply.stale = true;
        reply.encode(&mut out);
        assert_eq!(out, b"{\"status\":\"OK\",\"data\":[1],\"cache_hit\":true,\"node\":8001,\"stale\":true}\n");

        out.clear();
        Reply::error(Status::BadRequest, "quote \" and \n newline").encode(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["status"], "BAD_REQUEST");
        assert_eq!(v["data"], "quote \" and \n newline");
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);

        out.clear();
        Reply::new(Status::NotFound, Data::Null).id(Id::from_raw_json("\"k\"")).encode(&mut out);
        assert_eq!(out, b"{\"status\":\"NOT_FOUND\",\"data\":null,\"id\":\"k\"}\n");

        out.clear();
        encode_ok_value(&mut out, None, &serde_json::json!({"purged": true}));
        assert_eq!(out, b"{\"status\":\"OK\",\"data\":{\"purged\":true}}\n");
    }

    #[test]
    fn status_names_round_trip() {
        for status in Status::ALL {
            assert_eq!(Status::parse(status.as_str()), Some(status));
        }
        assert_eq!(Status::parse("ok"), None);
    }
}
