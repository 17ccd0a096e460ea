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
    let text = std::str::from_utf8(line).map_err(|_| RequestError::bad("request is not valid UTF-8"))?;
    let text = text.trim_matches(|c| c == ' ' || c == '\t');
    if text.starts_with('{') {
        parse_json(text)
    } else {
        parse_text(text)
    }
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
pub fn write_tagged_get(out: &mut Vec<u8>, key: &str, id: u64) {
    out.extend_from_slice(b"{\"op\":\"get\",\"key\":");
    if key.bytes().all(|b| is_unreserved(b) || b == b'/') {
        // A valid key (SPEC 2.2) has nothing to escape.
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.push(b'"');
    } else {
        write_json_string(out, key);
    }
    out.extend_from_slice(b",\"id\":");
    out.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
    out.extend_from_slice(b"}\n");
}

/// Why a peer's answer line is not a well-formed answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnswerError {
    /// Not one JSON object (or nested too deep to check).
    NotJson,
    /// No `status` member, or one that is not a string.
    NoStatus,
    /// A member (`id`, `status`) more than once: which one counts is ambiguous.
    Duplicate,
}

/// A peer's answer line, checked to be one JSON object with a string `status` and at most one
/// `id`, and cut so that it can be passed on without its `id` (and with another) by copying
/// bytes: the object without its `id` member is `head` + `rest` + `}`. Nothing is re-encoded,
/// so every other member (numbers like `1.10`, strings with escapes) stays byte for byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer<'a> {
    /// The raw JSON text of its `id`, if it had one.
    pub id: Option<&'a str>,
    /// The raw JSON text of `status` (a JSON string, quotes included).
    pub status: &'a str,
    /// The raw JSON text of `data`, if present.
    pub data: Option<&'a str>,
    head: &'a [u8],
    rest: &'a [u8],
    /// Members other than `id`: whether an `id` added after `rest` needs a comma.
    members: usize,
}

impl<'a> Answer<'a> {
    /// The peer's id as one of our own tags (a plain non-negative integer), if it is one.
    pub fn tag(&self) -> Option<u64> {
        self.id.filter(|id| id.bytes().all(|b| b.is_ascii_digit())).and_then(|id| id.parse().ok())
    }

    pub fn status_is(&self, status: Status) -> bool {
        self.status.strip_prefix('"').and_then(|s| s.strip_suffix('"')) == Some(status.as_str())
    }

    /// The object without its `id` member and without its closing brace, as two pieces.
    pub fn body(&self) -> (&'a [u8], &'a [u8]) {
        (self.head, self.rest)
    }

    /// Writes the answer line with `id` (raw JSON, as the client wrote it) in place of the
    /// peer's, and its `\n`.
    pub fn write_with_id(&self, out: &mut Vec<u8>, id: Option<&str>) {
        out.extend_from_slice(self.head);
        out.extend_from_slice(self.rest);
        write_answer_tail(out, self.members > 0, id);
    }

    /// The body as one buffer, to share between several clients' answers (each then adds its
    /// own tail with [`write_answer_tail`]).
    pub fn shared_body(&self) -> crate::framing::SharedBytes {
        let mut body = Vec::with_capacity(self.head.len() + self.rest.len());
        body.extend_from_slice(self.head);
        body.extend_from_slice(self.rest);
        body.into()
    }

    /// Whether the body holds members, for [`write_answer_tail`].
    pub fn has_members(&self) -> bool {
        self.members > 0
    }
}

/// Closes an answer body: `,"id":ID}` (or `"id":ID}` in an otherwise empty object), or just
/// `}`, then `\n`. The id goes last, where this project's answers always carry it.
pub fn write_answer_tail(out: &mut Vec<u8>, has_members: bool, id: Option<&str>) {
    if let Some(id) = id {
        out.extend_from_slice(if has_members { b",\"id\":" } else { b"\"id\":" });
        out.extend_from_slice(id.as_bytes());
    }
    out.extend_from_slice(b"}\n");
}

/// Reads one answer line from a peer (without its `\n`). Allocation-free unless a member
/// name has escapes.
pub fn parse_answer(line: &[u8]) -> Result<Answer<'_>, AnswerError> {
    parse_answer_by(line, true)
}

/// [`parse_answer`] through serde only: the reference its own checker is tested against.
#[doc(hidden)]
pub fn parse_answer_with_serde(line: &[u8]) -> Result<Answer<'_>, AnswerError> {
    parse_answer_by(line, false)
}

fn parse_answer_by(line: &[u8], fast: bool) -> Result<Answer<'_>, AnswerError> {
    // One UTF-8 check of the whole line; the scans then work on a `str`.
    let text = std::str::from_utf8(line).map_err(|_| AnswerError::NotJson)?;
    let scan = match answer_scan::scan(text) {
        _ if !fast => serde_scan(text)?,
        Ok(scan) => scan,
        Err(answer_scan::Unsure::Invalid) => return Err(AnswerError::NotJson),
        // A member name with escapes (serde decodes it), or blanks that are control bytes.
        Err(answer_scan::Unsure::Unusual) => serde_scan(text)?,
    };
    if scan.duplicate {
        return Err(AnswerError::Duplicate);
    }
    let status = scan.status.filter(|s| s.starts_with('"')).ok_or(AnswerError::NoStatus)?;
    // Validated JSON: the first non-blank byte is `{`, the last `}`.
    let open = line.iter().position(|b| *b == b'{').ok_or(AnswerError::NotJson)?;
    let close = line.iter().rposition(|b| *b == b'}').ok_or(AnswerError::NotJson)?;
    let piece = |from: usize, to: usize| line.get(from..to).ok_or(AnswerError::NotJson);
    let (head, rest, members, id) = match scan.id {
        None => (piece(0, close)?, piece(close, close)?, scan.members, None),
        Some(IdMember { value: (start, end), before }) => {
            let id = std::str::from_utf8(piece(start, end)?).map_err(|_| AnswerError::NotJson)?;
            let members = scan.members.saturating_sub(1);
            let (head, rest) = match before {
                // `{…,v` + ` ,"next":…` (or nothing after the id).
                Some(previous_end) => (piece(0, previous_end)?, piece(end, close)?),
                // The id came first: `{` + what followed it, without its comma.
                None => {
                    let rest = piece(end, close)?.trim_ascii_start();
                    (piece(0, open + 1)?, rest.strip_prefix(b",").unwrap_or(rest))
                }
            };
            // `"id": null` is no id (SPEC 2), but it is cut out all the same.
            (head, rest, members, Some(id).filter(|id| *id != "null"))
        }
    };
    Ok(Answer { id, status, data: scan.data, head, rest, members })
}

#[derive(Clone, Copy)]
struct IdMember {
    /// Byte range of the id's value.
    value: (usize, usize),
    /// End of the value of the member before the id, if any.
    before: Option<usize>,
}

/// The general (slower) scan, through serde.
fn serde_scan(text: &str) -> Result<ScanResult<'_>, AnswerError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let scan = serde::Deserializer::deserialize_map(&mut de, AnswerScan { base: text.as_ptr() as usize })
        .map_err(|_| AnswerError::NotJson)?;
    de.end().map_err(|_| AnswerError::NotJson)?;
    Ok(scan)
}

impl<'a> ScanResult<'a> {
    /// Counts one top-level member whose value is `text[start..end]`.
    fn member(&mut self, name: MemberName, text: &'a str, (start, end): (usize, usize), previous_end: Option<usize>) {
        self.members += 1;
        let raw = text.get(start..end).unwrap_or("");
        match name {
            MemberName::Id if self.id.is_some() => self.duplicate = true,
            MemberName::Id => self.id = Some(IdMember { value: (start, end), before: previous_end }),
            MemberName::Status if self.status.is_some() => self.duplicate = true,
            MemberName::Status => self.status = Some(raw),
            MemberName::Data if self.data.is_some() => self.duplicate = true,
            MemberName::Data => self.data = Some(raw),
            MemberName::Other => {}
        }
    }
}

/// A JSON checker for answer lines, a few times cheaper than serde's (it is on the hit path:
/// every answer a client gets from a proxy goes through it). It checks the grammar of RFC
/// 8259 over text already known to be UTF-8, nesting at most [`answer_scan::MAX_DEPTH`] deep,
/// and records the top-level members. Lone surrogate escapes are refused (a client could not
/// decode them). A member name with escapes, or a control byte anywhere, is left to serde.
/// The balancer's relay tests check it against serde (`parse_answer_with_serde`).
mod answer_scan {
    use super::{MemberName, ScanResult};

    pub const MAX_DEPTH: usize = 128;

    #[derive(Debug, PartialEq, Eq)]
    pub enum Unsure {
        Invalid,
        /// A member name with escapes, or a tab or CR somewhere: for serde to decide.
        Unusual,
    }

    struct Cursor<'a> {
        bytes: &'a [u8],
        at: usize,
    }

    type Step = Result<(), Unsure>;

    impl Cursor<'_> {
        fn peek(&self) -> Option<u8> {
            self.bytes.get(self.at).copied()
        }

        fn blank(&mut self) {
            while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
                self.at += 1;
            }
        }

        fn eat(&mut self, b: u8) -> Step {
            if self.peek() == Some(b) {
                self.at += 1;
                Ok(())
            } else {
                Err(Unsure::Invalid)
            }
        }

        /// A string, the cursor on its opening quote; returns whether it had escapes.
        fn string(&mut self) -> Result<bool, Unsure> {
            self.eat(b'"')?;
            let mut escaped = false;
            loop {
                // No control bytes anywhere in the line (checked once in `scan`): only a quote
                // or a backslash ends a run of plain characters.
                let rest = self.bytes.get(self.at..).unwrap_or_default();
                let run = memchr::memchr2(b'"', b'\\', rest).ok_or(Unsure::Invalid)?;
                self.at += run;
                match self.peek().ok_or(Unsure::Invalid)? {
                    b'"' => {
                        self.at += 1;
                        return Ok(escaped);
                    }
                    _ => {
                        escaped = true;
                        self.at += 1;
                        self.escape()?;
                    }
                }
            }
        }

        fn escape(&mut self) -> Step {
            match self.peek().ok_or(Unsure::Invalid)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                    self.at += 1;
                    Ok(())
                }
                b'u' => {
                    self.at += 1;
                    let unit = self.hex4()?;
                    if (0xDC00..0xE000).contains(&unit) {
                        return Err(Unsure::Invalid); // a lone trailing surrogate
                    }
                    if (0xD800..0xDC00).contains(&unit) {
                        self.eat(b'\\')?;
                        self.eat(b'u')?;
                        if !(0xDC00..0xE000).contains(&self.hex4()?) {
                            return Err(Unsure::Invalid);
                        }
                    }
                    Ok(())
                }
                _ => Err(Unsure::Invalid),
            }
        }

        fn hex4(&mut self) -> Result<u32, Unsure> {
            let digits = self.bytes.get(self.at..self.at + 4).ok_or(Unsure::Invalid)?;
            let text = std::str::from_utf8(digits).map_err(|_| Unsure::Invalid)?;
            if !digits.iter().all(u8::is_ascii_hexdigit) {
                return Err(Unsure::Invalid);
            }
            self.at += 4;
            u32::from_str_radix(text, 16).map_err(|_| Unsure::Invalid)
        }

        fn digits(&mut self) -> Step {
            let start = self.at;
            while self.peek().is_some_and(|b| b.is_ascii_digit()) {
                self.at += 1;
            }
            if self.at == start {
                Err(Unsure::Invalid)
            } else {
                Ok(())
            }
        }

        fn number(&mut self) -> Step {
            if self.peek() == Some(b'-') {
                self.at += 1;
            }
            match self.peek() {
                Some(b'0') => self.at += 1,
                Some(b'1'..=b'9') => self.digits()?,
                _ => return Err(Unsure::Invalid),
            }
            if self.peek() == Some(b'.') {
                self.at += 1;
                self.digits()?;
            }
            if matches!(self.peek(), Some(b'e' | b'E')) {
                self.at += 1;
                if matches!(self.peek(), Some(b'+' | b'-')) {
                    self.at += 1;
                }
                self.digits()?;
            }
            Ok(())
        }

        fn literal(&mut self, word: &[u8]) -> Step {
            if self.bytes.get(self.at..self.at + word.len()) == Some(word) {
                self.at += word.len();
                Ok(())
            } else {
                Err(Unsure::Invalid)
            }
        }

        /// Any value, the cursor on its first byte.
        fn value(&mut self, depth: usize) -> Step {
            match self.peek().ok_or(Unsure::Invalid)? {
                b'"' => self.string().map(|_| ()),
                b'{' | b'[' if depth >= MAX_DEPTH => Err(Unsure::Invalid),
                b'{' => {
                    self.at += 1;
                    self.blank();
                    if self.peek() == Some(b'}') {
                        self.at += 1;
                        return Ok(());
                    }
                    loop {
                        self.string()?;
                        self.blank();
                        self.eat(b':')?;
                        self.blank();
                        self.value(depth + 1)?;
                        self.blank();
                        match self.peek() {
                            Some(b',') => self.at += 1,
                            Some(b'}') => {
                                self.at += 1;
                                return Ok(());
                            }
                            _ => return Err(Unsure::Invalid),
                        }
                        self.blank();
                    }
                }
                b'[' => {
                    self.at += 1;
                    self.blank();
                    if self.peek() == Some(b']') {
                        self.at += 1;
                        return Ok(());
                    }
                    loop {
                        self.value(depth + 1)?;
                        self.blank();
                        match self.peek() {
                            Some(b',') => self.at += 1,
                            Some(b']') => {
                                self.at += 1;
                                return Ok(());
                            }
                            _ => return Err(Unsure::Invalid),
                        }
                        self.blank();
                    }
                }
                b't' => self.literal(b"true"),
                b'f' => self.literal(b"false"),
                b'n' => self.literal(b"null"),
                _ => self.number(),
            }
        }
    }

    /// Checks `text` is one JSON object (blanks around it allowed) and records its members.
    pub fn scan(text: &str) -> Result<ScanResult<'_>, Unsure> {
        // Control bytes are legal only as blanks (tab, CR) outside strings; this project's
        // answers have none, so their rare presence is left to serde and strings need no
        // per-byte check. (A fold without early exit: it vectorizes.)
        if text.bytes().fold(false, |any, b| any | (b < 0x20)) {
            return Err(Unsure::Unusual);
        }
        let mut c = Cursor { bytes: text.as_bytes(), at: 0 };
        let mut result = ScanResult::default();
        c.blank();
        c.eat(b'{')?;
        c.blank();
        if c.peek() == Some(b'}') {
            c.at += 1;
        } else {
            let mut previous_end = None;
            loop {
                let name_start = c.at + 1;
                let escaped = c.string()?;
                let name = match text.get(name_start..c.at.saturating_sub(1)) {
                    _ if escaped => return Err(Unsure::Unusual),
                    Some("id") => MemberName::Id,
                    Some("status") => MemberName::Status,
                    Some("data") => MemberName::Data,
                    _ => MemberName::Other,
                };
                c.blank();
                c.eat(b':')?;
                c.blank();
                let start = c.at;
                c.value(1)?;
                result.member(name, text, (start, c.at), previous_end);
                previous_end = Some(c.at);
                c.blank();
                match c.peek() {
                    Some(b',') => c.at += 1,
                    Some(b'}') => {
                        c.at += 1;
                        break;
                    }
                    _ => return Err(Unsure::Invalid),
                }
                c.blank();
            }
        }
        c.blank();
        if c.at == c.bytes.len() {
            Ok(result)
        } else {
            Err(Unsure::Invalid)
        }
    }
}

#[derive(Default)]
struct ScanResult<'a> {
    members: usize,
    duplicate: bool,
    id: Option<IdMember>,
    status: Option<&'a str>,
    data: Option<&'a str>,
}

struct AnswerScan {
    base: usize,
}

enum MemberName {
    Id,
    Status,
    Data,
    Other,
}

impl<'de> Deserialize<'de> for MemberName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Name;
        impl serde::de::Visitor<'_> for Name {
            type Value = MemberName;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E>(self, name: &str) -> Result<MemberName, E> {
                Ok(match name {
                    "id" => MemberName::Id,
                    "status" => MemberName::Status,
                    "data" => MemberName::Data,
                    _ => MemberName::Other,
                })
            }
        }
        d.deserialize_str(Name)
    }
}

impl<'de> serde::de::Visitor<'de> for AnswerScan {
    type Value = ScanResult<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an answer object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<ScanResult<'de>, A::Error> {
        let mut scan = ScanResult::default();
        let mut previous_end = None;
        while let Some(name) = map.next_key::<MemberName>()? {
            let value: &'de RawValue = map.next_value()?;
            let raw = value.get();
            let start = (raw.as_ptr() as usize).saturating_sub(self.base);
            let end = start.saturating_add(raw.len());
            scan.members += 1;
            match name {
                MemberName::Id if scan.id.is_some() => scan.duplicate = true,
                MemberName::Id => scan.id = Some(IdMember { value: (start, end), before: previous_end }),
                MemberName::Status if scan.status.is_some() => scan.duplicate = true,
                MemberName::Status => scan.status = Some(raw),
                MemberName::Data if scan.data.is_some() => scan.duplicate = true,
                MemberName::Data => scan.data = Some(raw),
                MemberName::Other => {}
            }
            previous_end = Some(end);
        }
        Ok(scan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

#[cfg(test)]
mod answer_tests {
    use super::*;

    fn relayed(line: &str, id: Option<&str>) -> String {
        let answer = parse_answer(line.as_bytes()).unwrap_or_else(|e| panic!("{line}: {e:?}"));
        let mut out = Vec::new();
        answer.write_with_id(&mut out, id);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_id_is_the_last_member_of_an_encoded_answer() {
        // The balancer's relay relies on nothing but parse_answer, but this project's answers
        // put the id last, which keeps the relay to two copies.
        let mut out = Vec::new();
        let mut reply = Reply::ok(br#"{"id":1}"#).id(Id::from_raw_json("77"));
        reply.cache_hit = Some(false);
        reply.node = Some(9);
        reply.stale = true;
        reply.encode(&mut out);
        assert!(out.ends_with(b",\"id\":77}\n"), "{}", String::from_utf8_lossy(&out));
        let answer = parse_answer(&out[..out.len() - 1]).unwrap();
        assert_eq!((answer.tag(), answer.id), (Some(77), Some("77")));
        assert_eq!(answer.rest, b"");
    }

    #[test]
    fn the_id_is_replaced_wherever_the_peer_put_it() {
        let table = [
            (r#"{"status":"OK","data":1,"id":5}"#, Some("5"), r#"{"status":"OK","data":1,"id":"c"}"#),
            (r#"{"id":5,"status":"OK","data":1.10}"#, Some("5"), r#"{"status":"OK","data":1.10,"id":"c"}"#),
            (
                r#" { "status" : "OK" , "id" : 5 , "data" : "a\"b" } "#,
                Some("5"),
                r#" { "status" : "OK" , "data" : "a\"b" ,"id":"c"}"#,
            ),
            (r#"{"status":"OK","data":{"id":9}}"#, None, r#"{"status":"OK","data":{"id":9},"id":"c"}"#),
            (r#"{"status":"OK","id":null}"#, None, r#"{"status":"OK","id":"c"}"#),
        ];
        for (line, id, expected) in table {
            assert_eq!(parse_answer(line.as_bytes()).unwrap().id, id, "{line}");
            let out = relayed(line, Some("\"c\""));
            assert_eq!(out, format!("{expected}\n"), "{line}");
            let value: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(value["id"], "c");
        }
        let big = "123456789012345678901234567890";
        assert!(relayed(r#"{"id":1,"status":"OK","data":null}"#, Some(big)).ends_with(&format!(",\"id\":{big}}}\n")));
        assert_eq!(relayed(r#"{"id":1,"status":"OK"}"#, None), "{\"status\":\"OK\"}\n");
    }

    #[test]
    fn what_is_not_a_well_formed_answer() {
        let table: &[(&[u8], AnswerError)] = &[
            (b"garbage,\"id\":5}", AnswerError::NotJson),
            (b"", AnswerError::NotJson),
            (b"[1]", AnswerError::NotJson),
            (b"{\"status\":\"OK\"} x", AnswerError::NotJson),
            (b"{\"status\":\"OK\",\"id\":1,\"id\":2}", AnswerError::Duplicate),
            (b"{\"status\":\"OK\",\"status\":\"OK\"}", AnswerError::Duplicate),
            (b"{\"data\":1}", AnswerError::NoStatus),
            (b"{\"status\":7}", AnswerError::NoStatus),
            (b"{\"status\":\"OK\",\"data\":\xff}", AnswerError::NotJson),
        ];
        for (line, error) in table {
            assert_eq!(parse_answer(line).err(), Some(*error), "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn tags_are_plain_integers() {
        for (line, tag) in [
            (r#"{"status":"OK","id":12}"#, Some(12)),
            (r#"{"status":"OK","id":-1}"#, None),
            (r#"{"status":"OK","id":1.0}"#, None),
            (r#"{"status":"OK","id":"12"}"#, None),
            (r#"{"status":"OK","id":99999999999999999999}"#, None),
        ] {
            assert_eq!(parse_answer(line.as_bytes()).unwrap().tag(), tag, "{line}");
        }
    }

    #[test]
    fn tagged_gets_are_json_requests_with_the_id_last() {
        let mut out = Vec::new();
        write_tagged_get(&mut out, "a/b", 42);
        assert_eq!(out, b"{\"op\":\"get\",\"key\":\"a/b\",\"id\":42}\n");
        let request = parse_request(&out[..out.len() - 1]).unwrap();
        assert_eq!(request.id.map(|id| id.as_json()), Some("42"));
    }

    #[test]
    fn a_shared_body_takes_each_clients_tail() {
        let answer = parse_answer(br#"{"status":"OK","data":[1],"id":3}"#).unwrap();
        let body = answer.shared_body();
        let mut out = body.to_vec();
        write_answer_tail(&mut out, answer.has_members(), Some("\"x\""));
        assert_eq!(out, b"{\"status\":\"OK\",\"data\":[1],\"id\":\"x\"}\n");
        assert!(answer.status_is(Status::Ok));
        assert_eq!(answer.data, Some("[1]"));
    }
}
