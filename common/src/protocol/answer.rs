//! Reading a peer's answer line (what the balancer gets from a proxy, SPEC 2.3): checked to be
//! one JSON object with a string `status` and a `data`, and cut so that it can be passed on
//! with another `id` by copying bytes.
//!
//! This is on the hit path (every answer a client gets through the balancer goes through it),
//! so the check reads the grammar of RFC 8259 in one scan, with nesting tracked on a bit stack
//! rather than by recursion, so that any depth passes that the line length (`--max-line`, the
//! balancer's answer limit) allows. Inside strings (the only place a byte ≥ 0x80 may appear),
//! a run up to the next `"` or `\` is read a word at a time when short; a long one is found
//! with SIMD `memchr` and then checked whole: printable ASCII in one vectorized pass, anything
//! else by a DFA for UTF-8 without control bytes (`cargo bench -p common --bench answer_scan`
//! measures it on answers as a proxy sends them). Lone surrogate escapes (`"\ud800"`) pass,
//! as they do in serde and so at the origin: they are the grammar's, and the balancer passes a
//! value on as it was stored. The serde reference below
//! (`parse_answer_with_serde`) is what the balancer's relay tests check it against.

use std::fmt;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::Status;

/// Why a peer's answer line is not a well-formed answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnswerError {
    /// Not one JSON object (or not UTF-8).
    NotJson,
    /// No `status` member, or one that is not a string.
    NoStatus,
    /// No `data` member: SPEC 2.3 says every answer has both.
    NoData,
    /// A member (`id`, `status`, `data`) more than once: which one counts is ambiguous.
    Duplicate,
}

/// A peer's answer line, checked to be one JSON object with a string `status`, a `data` and
/// at most one `id`, and cut so that it can be passed on without its `id` (and with another)
/// by copying bytes: the object without its `id` member is `head` + `rest` + `}`. Nothing is
/// re-encoded, so every other member (numbers like `1.10`, strings with escapes) stays byte
/// for byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer<'a> {
    /// The raw JSON text of its `id`, if it had one (`null` counts as none).
    id: Option<&'a [u8]>,
    /// The raw JSON text of `status` (a JSON string, quotes included).
    status: &'a [u8],
    /// The raw JSON text of `data` (valid JSON).
    pub data: &'a [u8],
    head: &'a [u8],
    rest: &'a [u8],
    /// Whether there are members other than `id`: an `id` added after `rest` then needs a
    /// comma.
    has_members: bool,
}

impl<'a> Answer<'a> {
    /// The peer's id as one of our own tags (a plain non-negative integer), if it is one.
    pub fn tag(&self) -> Option<u64> {
        self.id.and_then(parse_tag)
    }

    /// The raw JSON text of its `id`, if it had one (`null` counts as none).
    pub fn id(&self) -> Option<&'a str> {
        self.id.and_then(|id| std::str::from_utf8(id).ok())
    }

    pub fn status_is(&self, status: Status) -> bool {
        self.status.strip_prefix(b"\"").and_then(|s| s.strip_suffix(b"\"")) == Some(status.as_str().as_bytes())
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
        write_answer_tail(out, self.has_members, id);
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
        self.has_members
    }
}

/// A plain non-negative decimal integer that fits a `u64`.
fn parse_tag(text: &[u8]) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    text.iter().try_fold(0u64, |n, b| {
        let digit = char::from(*b).to_digit(10)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
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

/// The tag of a line that is not a well-formed answer, when it still reads as one of ours at
/// its end (`…,"id":123}`, where this project's answers put it): the attempt it was for can
/// then fail alone instead of waiting for its deadline.
pub fn trailing_tag(line: &[u8]) -> Option<u64> {
    let body = line.trim_ascii_end().strip_suffix(b"}")?.trim_ascii_end();
    let digits = body.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    let (before, tag) = body.split_at(body.len().checked_sub(digits)?);
    before.trim_ascii_end().strip_suffix(b":")?.trim_ascii_end().strip_suffix(b"\"id\"")?;
    parse_tag(tag)
}

/// Reads one answer line from a peer (without its `\n`). Allocation-free unless a top-level
/// member name has escapes or the value nests deeper than 1,024.
pub fn parse_answer(line: &[u8]) -> Result<Answer<'_>, AnswerError> {
    if let Some(answer) = scan::canonical(line) {
        return Ok(answer);
    }
    let members = scan::object(line).map_err(|scan::NotJson| AnswerError::NotJson)?;
    assemble(line, members)
}

/// [`parse_answer`] through serde only: the reference its own checker is tested against.
#[doc(hidden)]
pub fn parse_answer_with_serde(line: &[u8]) -> Result<Answer<'_>, AnswerError> {
    let text = std::str::from_utf8(line).map_err(|_| AnswerError::NotJson)?;
    if text.contains('\n') {
        return Err(AnswerError::NotJson); // not one line
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let members = serde::Deserializer::deserialize_map(&mut de, SerdeScan { base: text.as_ptr() as usize })
        .map_err(|_| AnswerError::NotJson)?;
    de.end().map_err(|_| AnswerError::NotJson)?;
    assemble(line, members)
}

/// The top-level members of a checked object, as byte ranges of the line.
#[derive(Default)]
struct Members {
    count: usize,
    duplicate: bool,
    /// The id's value, and the end of the value of the member before it (if any).
    id: Option<((usize, usize), Option<usize>)>,
    status: Option<(usize, usize)>,
    data: Option<(usize, usize)>,
}

#[derive(Clone, Copy)]
enum Name {
    Id,
    Status,
    Data,
    Other,
}

impl Name {
    fn of(name: &[u8]) -> Name {
        match name {
            b"id" => Name::Id,
            b"status" => Name::Status,
            b"data" => Name::Data,
            _ => Name::Other,
        }
    }
}

impl Members {
    /// Counts one member whose value is `line[value.0..value.1]`.
    fn add(&mut self, name: Name, value: (usize, usize), previous_end: Option<usize>) {
        self.count += 1;
        let slot = match name {
            Name::Id if self.id.is_none() => return self.id = Some((value, previous_end)),
            Name::Id => {
                self.duplicate = true;
                return;
            }
            Name::Status => &mut self.status,
            Name::Data => &mut self.data,
            Name::Other => return,
        };
        if slot.is_some() {
            self.duplicate = true;
        }
        *slot = Some(value);
    }
}

/// Builds the answer from a valid object's members: judges them (SPEC 2.3), then cuts.
fn assemble(line: &[u8], m: Members) -> Result<Answer<'_>, AnswerError> {
    if m.duplicate {
        return Err(AnswerError::Duplicate);
    }
    let piece = |(from, to): (usize, usize)| line.get(from..to).ok_or(AnswerError::NotJson);
    let status = m.status.ok_or(AnswerError::NoStatus).and_then(piece)?;
    if !status.starts_with(b"\"") {
        return Err(AnswerError::NoStatus);
    }
    let data = piece(m.data.ok_or(AnswerError::NoData)?)?;
    // A valid object: the first non-blank byte is `{`, the last `}`.
    let open = line.iter().position(|b| *b == b'{').ok_or(AnswerError::NotJson)?;
    let close = line.iter().rposition(|b| *b == b'}').ok_or(AnswerError::NotJson)?;
    let (head, rest, members, id) = match m.id {
        None => (piece((0, close))?, piece((close, close))?, m.count, None),
        Some(((start, end), before)) => {
            let id = piece((start, end))?;
            let (head, rest) = match before {
                // `{…,v` + ` ,"next":…` (or nothing after the id).
                Some(previous_end) => (piece((0, previous_end))?, piece((end, close))?),
                // The id came first: `{` + what followed it, without its comma.
                None => {
                    let rest = piece((end, close))?.trim_ascii_start();
                    (piece((0, open + 1))?, rest.strip_prefix(b",").unwrap_or(rest))
                }
            };
            // `"id": null` is no id (SPEC 2), but it is cut out all the same.
            (head, rest, m.count.saturating_sub(1), Some(id).filter(|id| *id != b"null"))
        }
    };
    Ok(Answer { id, status, data, head, rest, has_members: members > 0 })
}

/// The one-pass checker.
mod scan {
    use super::{Answer, Members, Name};

    /// The line is not one JSON object.
    pub struct NotJson;

    type Step<T = ()> = Result<T, NotJson>;

    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;

    /// The top bit of each byte of `w` (little-endian) that is not a plain string byte: a
    /// quote, a backslash, a control or a non-ASCII byte. Borrows can set bits above a true
    /// one, never below: the lowest set bit is always exact.
    fn specials(w: u64) -> u64 {
        let zero = |v: u64| v.wrapping_sub(ONES) & !v;
        let quote = zero(w ^ (ONES * 0x22));
        let backslash = zero(w ^ (ONES * 0x5c));
        let control = w.wrapping_sub(ONES * 0x20) & !w;
        (quote | backslash | control | w) & HIGHS
    }

    /// Where the run of string bytes that starts at `at` ends: at the next `"` or `\`, every
    /// byte before it checked to be part of a UTF-8 character other than a control. Short
    /// runs (names, statuses, keys) are read a word at a time; a longer one is found with
    /// `memchr` (SIMD) and then checked whole, since neither `"` nor `\` can be part of a
    /// multi-byte character: printable ASCII in one vectorized pass, anything else by
    /// [`utf8::printable`].
    fn string_run(b: &[u8], mut at: usize) -> Step<usize> {
        for _ in 0..2 {
            let Some(word) = b.get(at..).and_then(|rest| rest.first_chunk::<8>()) else { break };
            let special = specials(u64::from_le_bytes(*word));
            if special != 0 {
                at += (special.trailing_zeros() / 8) as usize;
                if matches!(b.get(at), Some(b'"' | b'\\')) {
                    return Ok(at);
                }
                break; // a control or a non-ASCII byte: checked below
            }
            at += 8;
        }
        let rest = b.get(at..).unwrap_or_default();
        let end = memchr::memchr2(b'"', b'\\', rest).ok_or(NotJson)?;
        let run = rest.get(..end).unwrap_or_default();
        if utf8::printable_ascii(run) || utf8::printable(run) {
            Ok(at + end)
        } else {
            Err(NotJson)
        }
    }

    /// UTF-8 without control bytes (what may stand between a string's quotes and escapes),
    /// checked by a DFA whose every transition for one byte is packed in one word: the state
    /// is a shift, and `TABLE[byte] >> state & 63` the next one (after Per Vognsen's
    /// shift-based DFA). Overlong forms (`C0 80`, `E0 80 80`, `F0 80 80 80`), UTF-16
    /// surrogates (`ED A0 80`…`ED BF BF`) and code points past U+10FFFF are errors, as in
    /// `std::str::from_utf8`.
    pub(super) mod utf8 {
        /// The error state: 0, so every byte keeps it there.
        const ERROR: u64 = 0;
        /// Between characters.
        const ACCEPT: u64 = 6;
        /// 1, 2 or 3 continuation bytes (80..BF) to go.
        const TAIL1: u64 = 12;
        const TAIL2: u64 = 18;
        const TAIL3: u64 = 24;
        /// After E0 (A0..BF next: no overlong), ED (80..9F: no surrogate), F0 (90..BF: no
        /// overlong), F4 (80..8F: nothing past U+10FFFF).
        const AFTER_E0: u64 = 30;
        const AFTER_ED: u64 = 36;
        const AFTER_F0: u64 = 42;
        const AFTER_F4: u64 = 48;

        const fn on(from: u64, to: u64) -> u64 {
            to << from
        }

        static TABLE: [u64; 256] = {
            let mut table = [0; 256];
            let mut b = 0;
            while b < 256 {
                table[b] = match b {
                    0x20..=0x7f => on(ACCEPT, ACCEPT),
                    0x80..=0xbf => {
                        let any = on(TAIL1, ACCEPT) | on(TAIL2, TAIL1) | on(TAIL3, TAIL2);
                        let e = if b < 0xa0 { on(AFTER_ED, TAIL1) } else { on(AFTER_E0, TAIL1) };
                        let f = if b < 0x90 { on(AFTER_F4, TAIL2) } else { on(AFTER_F0, TAIL2) };
                        any | e | f
                    }
                    0xc2..=0xdf => on(ACCEPT, TAIL1),
                    0xe0 => on(ACCEPT, AFTER_E0),
                    0xed => on(ACCEPT, AFTER_ED),
                    0xe1..=0xec | 0xee | 0xef => on(ACCEPT, TAIL2),
                    0xf0 => on(ACCEPT, AFTER_F0),
                    0xf4 => on(ACCEPT, AFTER_F4),
                    0xf1..=0xf3 => on(ACCEPT, TAIL3),
                    // Controls, C0 and C1 (always overlong), F5..FF (past U+10FFFF).
                    _ => 0,
                };
                b += 1;
            }
            table
        };

        fn step(state: u64, byte: u8) -> u64 {
            TABLE[usize::from(byte)] >> state & 63
        }

        fn run(state: u64, bytes: &[u8]) -> u64 {
            bytes.iter().fold(state, |state, b| step(state, *b))
        }

        /// Whether every byte is printable ASCII (0x20..=0x7f), in one pass that LLVM
        /// vectorizes: `b ^ 0x80` puts those bytes, and only those, at 0xa0 and above.
        pub fn printable_ascii(bytes: &[u8]) -> bool {
            bytes.iter().fold(u8::MAX, |low, b| low.min(b ^ 0x80)) >= 0xa0
        }

        /// Whether `bytes` are whole UTF-8 characters without a control byte. Blocks of
        /// printable ASCII between characters are skipped a block at a time. A long run is
        /// checked as two halves side by side, cut where a character starts: each step of the
        /// DFA waits for the one before it, so two independent chains run in the time of one.
        pub fn printable(bytes: &[u8]) -> bool {
            let cut = match bytes.len() / 2 {
                half if half < BLOCK => bytes.len(),
                // Neither half is then cut inside a character; four continuation bytes in a
                // row are no UTF-8 at all.
                half => match bytes.iter().skip(half).take(4).position(|b| b & 0xc0 != 0x80) {
                    Some(at) => half + at,
                    None => return false,
                },
            };
            let (first, second) = bytes.split_at(cut);
            let (mut a, mut b) = (first.chunks(BLOCK), second.chunks(BLOCK));
            let mut states = (ACCEPT, ACCEPT);
            loop {
                states = match (a.next(), b.next()) {
                    (None, None) => return states == (ACCEPT, ACCEPT),
                    (x, y) => blocks(states, x.unwrap_or_default(), y.unwrap_or_default()),
                }
            }
        }

        const BLOCK: usize = 64;

        /// The states after block `x` of the first half and block `y` of the second.
        fn blocks((a, b): (u64, u64), x: &[u8], y: &[u8]) -> (u64, u64) {
            let skip_x = a == ACCEPT && printable_ascii(x);
            let skip_y = b == ACCEPT && printable_ascii(y);
            match (skip_x, skip_y) {
                (false, false) if x.len() == y.len() => {
                    x.iter().zip(y).fold((a, b), |(a, b), (p, q)| (step(a, *p), step(b, *q)))
                }
                _ => (if skip_x { a } else { run(a, x) }, if skip_y { b } else { run(b, y) }),
            }
        }

        #[cfg(test)]
        pub(crate) fn printable_bytewise(bytes: &[u8]) -> bool {
            run(ACCEPT, bytes) == ACCEPT
        }

        const _: () = assert!(ERROR == 0 && AFTER_F4 + 6 <= 64);
    }

    /// Containers open around the cursor, one bit each (set: object): 1,024 levels inline,
    /// deeper ones on the heap, so depth is bounded only by the line.
    struct Nesting {
        depth: usize,
        inline: [u64; 16],
        deeper: Vec<u64>,
    }

    const INLINE_BITS: usize = 16 * 64;

    impl Nesting {
        fn new() -> Self {
            Nesting { depth: 0, inline: [0; 16], deeper: Vec::new() }
        }

        fn push(&mut self, object: bool) {
            let (word, bit) = (self.depth / 64, self.depth % 64);
            let words = match self.inline.get_mut(word) {
                Some(w) => w,
                None => {
                    let at = word - self.inline.len();
                    if self.deeper.len() <= at {
                        self.deeper.push(0);
                    }
                    match self.deeper.get_mut(at) {
                        Some(w) => w,
                        None => return, // unreachable: pushed just above
                    }
                }
            };
            *words = (*words & !(1 << bit)) | (u64::from(object) << bit);
            self.depth += 1;
        }

        /// Whether the innermost open container is an object; `None` at the top.
        fn top(&self) -> Option<bool> {
            let at = self.depth.checked_sub(1)?;
            let word = if at < INLINE_BITS { self.inline.get(at / 64) } else { self.deeper.get(at / 64 - 16) };
            word.map(|w| w >> (at % 64) & 1 == 1)
        }

        fn pop(&mut self) {
            self.depth = self.depth.saturating_sub(1);
        }
    }

    struct Cursor<'a> {
        b: &'a [u8],
        at: usize,
    }

    impl Cursor<'_> {
        fn peek(&self) -> Option<u8> {
            self.b.get(self.at).copied()
        }

        /// JSON's blanks but `\n`: a line has none (framing ends it there), and one let through
        /// would make the relayed answer two lines.
        fn blank(&mut self) {
            while matches!(self.peek(), Some(b' ' | b'\t' | b'\r')) {
                self.at += 1;
            }
        }

        fn eat(&mut self, byte: u8) -> Step {
            if self.peek() != Some(byte) {
                return Err(NotJson);
            }
            self.at += 1;
            Ok(())
        }

        /// A string, the cursor on its opening quote; returns whether it had escapes. Most
        /// (names, short values) end within the word after their quote: those are read here,
        /// inline, the rest by [`Cursor::long_string`].
        #[inline(always)]
        fn string(&mut self) -> Step<bool> {
            let after = self.at + 1;
            if let (Some(b'"'), Some(word)) = (self.peek(), self.b.get(after..).and_then(|r| r.first_chunk::<8>())) {
                let special = specials(u64::from_le_bytes(*word));
                let end = after + (special.trailing_zeros() / 8) as usize;
                if special != 0 && self.b.get(end) == Some(&b'"') {
                    self.at = end + 1;
                    return Ok(false);
                }
            }
            self.long_string()
        }

        #[inline(never)]
        fn long_string(&mut self) -> Step<bool> {
            self.eat(b'"')?;
            let mut escaped = false;
            loop {
                let at = string_run(self.b, self.at)?;
                self.at = at + 1;
                if self.b.get(at) == Some(&b'"') {
                    return Ok(escaped);
                }
                escaped = true; // a backslash
                self.escape()?;
            }
        }

        /// The escape after a backslash.
        fn escape(&mut self) -> Step {
            let byte = self.peek().ok_or(NotJson)?;
            self.at += 1;
            match byte {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Ok(()),
                // Any four hex digits, lone surrogates included: the grammar allows them, and
                // the origin (serde) serves such values, so refusing them here would turn one
                // stored value into a failure against every proxy that relays it.
                b'u' => self.hex4().map(drop),
                _ => Err(NotJson),
            }
        }

        fn hex4(&mut self) -> Step<u32> {
            let digits = self.b.get(self.at..self.at + 4).ok_or(NotJson)?;
            let mut unit = 0;
            for d in digits {
                unit = unit << 4 | char::from(*d).to_digit(16).ok_or(NotJson)?;
            }
            self.at += 4;
            Ok(unit)
        }

        fn digits(&mut self) -> Step {
            let start = self.at;
            while self.peek().is_some_and(|b| b.is_ascii_digit()) {
                self.at += 1;
            }
            if self.at == start {
                Err(NotJson)
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
                _ => return Err(NotJson),
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
            if self.b.get(self.at..self.at + word.len()) != Some(word) {
                return Err(NotJson);
            }
            self.at += word.len();
            Ok(())
        }

        /// A member name and its colon, the cursor on the name's quote.
        fn name(&mut self) -> Step {
            self.string()?;
            self.blank();
            self.eat(b':')?;
            self.blank();
            Ok(())
        }

        /// One value of any depth, the cursor on its first byte; without recursion.
        fn value(&mut self, nesting: &mut Nesting) -> Step {
            loop {
                // A value starts here: a scalar, or a container opens (and maybe closes).
                match self.peek().ok_or(NotJson)? {
                    b'"' => self.string().map(drop)?,
                    open @ (b'{' | b'[') => {
                        self.at += 1;
                        self.blank();
                        let close = if open == b'{' { b'}' } else { b']' };
                        if self.peek() == Some(close) {
                            self.at += 1;
                        } else {
                            nesting.push(open == b'{');
                            if open == b'{' {
                                self.name()?;
                            }
                            continue;
                        }
                    }
                    b't' => self.literal(b"true")?,
                    b'f' => self.literal(b"false")?,
                    b'n' => self.literal(b"null")?,
                    _ => self.number()?,
                }
                // A value ended: close what it ends, up to the next value (or the end).
                loop {
                    let Some(object) = nesting.top() else { return Ok(()) };
                    self.blank();
                    match self.peek() {
                        Some(b',') => {
                            self.at += 1;
                            self.blank();
                            if object {
                                self.name()?;
                            }
                            break;
                        }
                        Some(b'}') if object => nesting.pop(),
                        Some(b']') if !object => nesting.pop(),
                        _ => return Err(NotJson),
                    }
                    self.at += 1;
                }
            }
        }
    }

    /// This project's own encoding (`Reply::encode`), read without the general scan:
    /// `{"status":"S","data":D` then any of `,"cache_hit":B`, `,"node":N`, `,"stale":true`
    /// and `,"id":N`, in that order, then `}`. Only `data` needs the full check. `None`: not
    /// in that shape (the general scan then decides).
    pub fn canonical(line: &[u8]) -> Option<Answer<'_>> {
        let after = line.strip_prefix(b"{\"status\":\"")?;
        let status_len = after.iter().position(|b| !(b.is_ascii_uppercase() || *b == b'_'))?;
        let data_start = STATUS_AT + status_len + DATA_KEY.len();
        if line.get(STATUS_AT + status_len..data_start)? != DATA_KEY {
            return None;
        }
        let mut c = Cursor { b: line, at: data_start };
        c.value(&mut Nesting::new()).ok()?;
        let data_end = c.at;
        let mut tail = line.get(data_end..)?;
        for (key, value) in [
            (&b",\"cache_hit\":"[..], Literal::Bool),
            (b",\"node\":", Literal::Digits),
            (b",\"stale\":", Literal::True),
        ] {
            if let Some(rest) = tail.strip_prefix(key) {
                tail = value.skip(rest)?;
            }
        }
        let body_end = line.len() - tail.len();
        let id = match tail.strip_prefix(b",\"id\":") {
            // Our tags are plain integers; any other id takes the general scan.
            Some(id) => Some(id.strip_suffix(b"}").filter(|id| Literal::Digits.skip(id) == Some(b""))?),
            None if tail == b"}" => None,
            None => return None,
        };
        Some(Answer {
            id,
            status: line.get(STATUS_AT - 1..STATUS_AT + status_len + 1)?,
            data: line.get(data_start..data_end)?,
            head: line.get(..body_end)?,
            rest: b"",
            has_members: true,
        })
    }

    /// Where the status text starts in the canonical encoding, and what follows it.
    const STATUS_AT: usize = 11;
    const DATA_KEY: &[u8] = b"\",\"data\":";

    #[derive(Clone, Copy)]
    enum Literal {
        Bool,
        True,
        Digits,
    }

    impl Literal {
        /// What follows the literal at the start of `rest`.
        fn skip(self, rest: &[u8]) -> Option<&[u8]> {
            match self {
                Literal::Bool => rest.strip_prefix(b"true").or_else(|| rest.strip_prefix(b"false")),
                Literal::True => rest.strip_prefix(b"true"),
                Literal::Digits => {
                    let n = rest.iter().take_while(|b| b.is_ascii_digit()).count();
                    // A JSON number has no leading zero.
                    if n == 0 || (n > 1 && rest.first() == Some(&b'0')) {
                        return None;
                    }
                    rest.get(n..)
                }
            }
        }
    }

    /// Checks `line` is one JSON object (blanks around it allowed) and records its members.
    pub fn object(line: &[u8]) -> Step<Members> {
        let mut c = Cursor { b: line, at: 0 };
        let mut members = Members::default();
        // Reused by every member's value: it is back at depth 0 after each.
        let mut nesting = Nesting::new();
        c.blank();
        c.eat(b'{')?;
        c.blank();
        if c.peek() == Some(b'}') {
            c.at += 1;
        } else {
            let mut previous_end = None;
            loop {
                let name_start = c.at;
                let escaped = c.string()?;
                let raw_name = line.get(name_start..c.at).ok_or(NotJson)?;
                let name = match escaped {
                    // Rare: decoded the way a client's JSON parser will read it.
                    true => Name::of(serde_json::from_slice::<String>(raw_name).map_err(|_| NotJson)?.as_bytes()),
                    false => Name::of(raw_name.get(1..raw_name.len() - 1).unwrap_or_default()),
                };
                c.blank();
                c.eat(b':')?;
                c.blank();
                let start = c.at;
                c.value(&mut nesting)?;
                members.add(name, (start, c.at), previous_end);
                previous_end = Some(c.at);
                c.blank();
                match c.peek() {
                    Some(b',') => c.at += 1,
                    Some(b'}') => {
                        c.at += 1;
                        break;
                    }
                    _ => return Err(NotJson),
                }
                c.blank();
            }
        }
        c.blank();
        if c.at == line.len() {
            Ok(members)
        } else {
            Err(NotJson)
        }
    }
}

/// The serde reference: a map visitor recording the members' byte ranges.
struct SerdeScan {
    base: usize,
}

struct SerdeName(Name);

impl<'de> Deserialize<'de> for SerdeName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = SerdeName;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E>(self, name: &str) -> Result<SerdeName, E> {
                Ok(SerdeName(Name::of(name.as_bytes())))
            }
        }
        d.deserialize_str(Visit)
    }
}

impl<'de> serde::de::Visitor<'de> for SerdeScan {
    type Value = Members;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an answer object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
        let mut members = Members::default();
        let mut previous_end = None;
        while let Some(SerdeName(name)) = map.next_key()? {
            let value: &'de RawValue = map.next_value()?;
            let raw = value.get();
            let start = (raw.as_ptr() as usize).saturating_sub(self.base);
            let end = start.saturating_add(raw.len());
            members.add(name, (start, end), previous_end);
            previous_end = Some(end);
        }
        Ok(members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{write_tagged_get, Id, Key, KeyBuf, Reply};

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
        assert_eq!((answer.tag(), answer.id()), (Some(77), Some("77")));
        assert_eq!(answer.rest, b"");
        assert_eq!(trailing_tag(&out[..out.len() - 1]), Some(77));
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
            (r#"{"status":"OK","data":null,"id":null}"#, None, r#"{"status":"OK","data":null,"id":"c"}"#),
            (r#"{"st\u0061tus":"OK","data":[],"\u0069d":4}"#, Some("4"), r#"{"st\u0061tus":"OK","data":[],"id":"c"}"#),
        ];
        for (line, id, expected) in table {
            assert_eq!(parse_answer(line.as_bytes()).unwrap().id(), id, "{line}");
            let out = relayed(line, Some("\"c\""));
            assert_eq!(out, format!("{expected}\n"), "{line}");
            let value: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(value["id"], "c");
        }
        let big = "123456789012345678901234567890";
        assert!(relayed(r#"{"id":1,"status":"OK","data":null}"#, Some(big)).ends_with(&format!(",\"id\":{big}}}\n")));
        assert_eq!(relayed(r#"{"id":1,"status":"OK","data":0}"#, None), "{\"status\":\"OK\",\"data\":0}\n");
    }

    #[test]
    fn what_is_not_a_well_formed_answer() {
        let table: &[(&[u8], AnswerError)] = &[
            (b"garbage,\"id\":5}", AnswerError::NotJson),
            (b"", AnswerError::NotJson),
            (b"[1]", AnswerError::NotJson),
            (b"{\"status\":\"OK\",\"data\":1} x", AnswerError::NotJson),
            // A line has no `\n`; one taken for a blank would relay as two lines (found by
            // scripts/fuzz.sh, target relay).
            (b"\n{\"status\":\n\"OK\",\"data\":\"x\"\t}", AnswerError::NotJson),
            (b"{\"status\":\"OK\",\"data\":[1,\n2],\"id\":3}", AnswerError::NotJson),
            (b"{\"status\":\"OK\",\"data\":1,\"id\":1,\"id\":2}", AnswerError::Duplicate),
            (b"{\"status\":\"OK\",\"status\":\"OK\",\"data\":1}", AnswerError::Duplicate),
            (b"{\"status\":\"OK\",\"data\":1,\"data\":2}", AnswerError::Duplicate),
            (b"{\"data\":1}", AnswerError::NoStatus),
            (b"{\"status\":7,\"data\":1}", AnswerError::NoStatus),
            (b"{\"status\":\"OK\"}", AnswerError::NoData),
            (b"{\"status\":\"OK\",\"dlata\":null}", AnswerError::NoData),
            (b"{\"status\":\"OK\",\"data\":\xff}", AnswerError::NotJson),
            (b"{\"status\":\"\xc3\xa9\xa9\",\"data\":null}", AnswerError::NotJson),
            (b"{\"status\":\"\xed\xa0\x80\",\"data\":null}", AnswerError::NotJson),
            (b"{\"status\":\"a\x01\",\"data\":null}", AnswerError::NotJson),
            (b"{\"status\":\"OK\",\"data\":[1,]}", AnswerError::NotJson),
            (b"{\"status\":\"OK\",\"data\":{\"a\":1]}", AnswerError::NotJson),
            (b"{\"status\":\"OK\",\"data\":[[[]]}", AnswerError::NotJson),
            (b"{\"status\":\"OK\",\"data\":1,\"id\":05}", AnswerError::NotJson),
            (b"{\"status\":\"OK\",\"data\":1,\"node\":01,\"id\":5}", AnswerError::NotJson),
            (b"{\"status\":\"OK\",\"data\":1,\"cache_hit\":tru,\"id\":5}", AnswerError::NotJson),
            (b"{\"status\":\"OK\",\"data\":1,\"id\":5}}", AnswerError::NotJson),
            (b"{\"status\":\"OK\",\"data\":1,\"id\":5,\"id\":6}", AnswerError::Duplicate),
            (b"{\"status\":\"OK\",\"data\":1,\"data\":2,\"id\":5}", AnswerError::Duplicate),
        ];
        for (line, error) in table {
            assert_eq!(parse_answer(line).err(), Some(*error), "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn non_ascii_and_escapes_pass_byte_for_byte() {
        let line = "{\"status\":\"OK\",\"data\":\"é€😀 \\u00e9\\ud83d\\ude00 \\\" tab\\t\",\"id\":3}";
        let answer = parse_answer(line.as_bytes()).unwrap();
        assert_eq!(answer.data, "\"é€😀 \\u00e9\\ud83d\\ude00 \\\" tab\\t\"".as_bytes());
        assert_eq!(Ok(answer), parse_answer_with_serde(line.as_bytes()));
    }

    #[test]
    fn lone_surrogate_escapes_pass_as_the_origin_stored_them() {
        // The origin checks its files with serde, which takes any `\uXXXX`: refusing them
        // here made one stored value a failure against every proxy (all marked down).
        for data in [r#""\ud800""#, r#""\udfff x""#, r#""\ud800\u0041""#, r#"["\uDBFF","\uDC00\uD800"]"#] {
            let line = format!("{{\"status\":\"OK\",\"data\":{data},\"id\":4}}");
            let answer = parse_answer(line.as_bytes()).unwrap_or_else(|e| panic!("{line}: {e:?}"));
            assert_eq!((answer.data, answer.tag()), (data.as_bytes(), Some(4)));
            assert_eq!(Ok(answer), parse_answer_with_serde(line.as_bytes()));
            let general = format!("{{ \"data\":{data},\"status\":\"OK\",\"id\":4}}");
            assert_eq!(parse_answer(general.as_bytes()).map(|a| a.data), Ok(data.as_bytes()));
        }
        assert_eq!(parse_answer(br#"{"status":"OK","data":"\ud80"}"#).err(), Some(AnswerError::NotJson));
    }

    #[test]
    fn any_depth_passes_that_the_line_allows() {
        for depth in [1, 127, 128, 129, 1_000, 1_025, 100_000] {
            let data = format!("{}0{}", "[{\"a\":".repeat(depth), "}]".repeat(depth));
            let line = format!("{{\"status\":\"OK\",\"data\":{data},\"id\":1}}");
            let answer = parse_answer(line.as_bytes()).unwrap_or_else(|e| panic!("depth {depth}: {e:?}"));
            assert_eq!(answer.data, data.as_bytes());
            // One bracket short at the bottom, or one too many: not JSON.
            let short = format!("{{\"status\":\"OK\",\"data\":{}}}", &data[..data.len() - 1]);
            assert_eq!(parse_answer(short.as_bytes()).err(), Some(AnswerError::NotJson), "depth {depth}");
            let mismatched = format!("{{\"status\":\"OK\",\"data\":{}}}}}", &data[..data.len() - 1]);
            assert_eq!(parse_answer(mismatched.as_bytes()).err(), Some(AnswerError::NotJson), "depth {depth}");
        }
        let arrays = format!("{{\"status\":\"OK\",\"data\":{}{}}}", "[".repeat(50_000), "]".repeat(50_000));
        assert!(parse_answer(arrays.as_bytes()).is_ok());
    }

    #[test]
    fn tags_are_plain_integers() {
        for (line, tag) in [
            (r#"{"status":"OK","data":1,"id":12}"#, Some(12)),
            (r#"{"status":"OK","data":1,"id":-1}"#, None),
            (r#"{"status":"OK","data":1,"id":1.0}"#, None),
            (r#"{"status":"OK","data":1,"id":"12"}"#, None),
            (r#"{"status":"OK","data":1,"id":99999999999999999999}"#, None),
        ] {
            assert_eq!(parse_answer(line.as_bytes()).unwrap().tag(), tag, "{line}");
        }
    }

    #[test]
    fn a_broken_line_may_still_name_its_tag_at_the_end() {
        assert_eq!(trailing_tag(b"garbage,\"id\":5}"), Some(5));
        assert_eq!(trailing_tag(b"{\"status\":\"OK\",\"data\":[[, \"id\" : 12 } "), Some(12));
        assert_eq!(trailing_tag(b"{\"status\":\"OK\",\"xid\":5}"), None);
        assert_eq!(trailing_tag(b"{\"status\":\"OK\",\"id\":\"5\"}"), None);
        assert_eq!(trailing_tag(b"\"id\":}"), None);
        assert_eq!(trailing_tag(b""), None);
    }

    #[test]
    fn tagged_gets_are_json_requests_with_the_id_last() {
        let mut out = Vec::new();
        let key = Key::parse("/a/b".into()).unwrap();
        write_tagged_get(&mut out, &KeyBuf::copy_of(&key, String::new()), 42);
        assert_eq!(out, b"{\"op\":\"get\",\"key\":\"a/b\",\"id\":42}\n");
        let request = parse_request(&out[..out.len() - 1]).unwrap();
        assert_eq!(request.id.map(|id| id.as_json()), Some("42"));
        assert_eq!(request.op, crate::protocol::Op::Get(key));
    }

    use crate::protocol::parse_request;

    #[test]
    fn a_shared_body_takes_each_clients_tail() {
        let answer = parse_answer(br#"{"status":"OK","data":[1],"id":3}"#).unwrap();
        let body = answer.shared_body();
        let mut out = body.to_vec();
        write_answer_tail(&mut out, answer.has_members(), Some("\"x\""));
        assert_eq!(out, b"{\"status\":\"OK\",\"data\":[1],\"id\":\"x\"}\n");
        assert!(answer.status_is(Status::Ok));
        assert_eq!(answer.data, b"[1]");
    }

    /// Pieces a string's fast path must judge exactly: delimiters, escapes, controls, every
    /// length of UTF-8 character at its bounds, and the malformed ones (truncated, stray
    /// continuation, overlong, surrogate, past U+10FFFF, never-valid bytes).
    const PIECES: &[&[u8]] = &[
        b"\"",
        b"\\",
        b"\\\"",
        b"\\\\",
        b"\\u00e9",
        b"\\ud800",
        b"\\x",
        b"\x00",
        b"\x1f",
        b"\n",
        b"\t",
        b"\x7f",
        b" ",
        "é".as_bytes(),
        "€".as_bytes(),
        "😀".as_bytes(),
        b"\xc2\x80",         // U+0080
        b"\xdf\xbf",         // U+07FF
        b"\xe0\xa0\x80",     // U+0800
        b"\xed\x9f\xbf",     // U+D7FF
        b"\xee\x80\x80",     // U+E000
        b"\xef\xbf\xbf",     // U+FFFF
        b"\xf0\x90\x80\x80", // U+10000
        b"\xf4\x8f\xbf\xbf", // U+10FFFF
        b"\xed\xa0\x80",     // U+D800 encoded: a surrogate
        b"\xed\xbf\xbf",     // U+DFFF
        b"\xc0\x80",         // overlong NUL
        b"\xc1\xbf",
        b"\xe0\x80\x80",
        b"\xe0\x9f\xbf",
        b"\xf0\x80\x80\x80",
        b"\xf0\x8f\xbf\xbf",
        b"\xf4\x90\x80\x80", // U+110000
        b"\xf5\x80\x80\x80",
        b"\xf8\x88\x80\x80\x80",
        b"\xff",
        b"\x80",
        b"\xbf",
        b"\xc3",
        b"\xe2\x82",
        b"\xf0\x9f\x98",
        b"\xc3\xa9\xa9",
    ];

    /// The answer line with `text` between the quotes of `data` (and of a member name), in
    /// this project's encoding and in one the general scan reads.
    fn lines_with_string(text: &[u8]) -> [Vec<u8>; 3] {
        let canonical = [&b"{\"status\":\"OK\",\"data\":\""[..], text, b"\",\"id\":3}"].concat();
        let general = [&b" {\"data\":[\""[..], text, b"\"],\"status\":\"OK\"}"].concat();
        let name = [&b"{\"status\":\"OK\",\"data\":{\""[..], text, b"\":1}}"].concat();
        [canonical, general, name]
    }

    fn agrees_with_serde(line: &[u8]) {
        assert_eq!(parse_answer(line), parse_answer_with_serde(line), "{:?}", String::from_utf8_lossy(line));
    }

    #[test]
    fn every_piece_at_every_offset_around_the_words_and_blocks_of_the_fast_path() {
        // A run is read in two 8-byte words, then found with memchr and checked in 64-byte
        // blocks: offsets 0..=140 cross all of those edges, and what follows the piece
        // (0..=9 bytes, then the closing quote) the end of the line's last word.
        for piece in PIECES {
            for before in 0..=140 {
                for after in 0..=9 {
                    let text = [&b"x".repeat(before)[..], piece, &b"y".repeat(after)].concat();
                    for line in lines_with_string(&text) {
                        agrees_with_serde(&line);
                    }
                }
            }
        }
        // And a character split across a block edge in a run of non-ASCII text.
        for before in 0..=70 {
            let text = [&"é".repeat(before).into_bytes()[..], "😀".as_bytes(), "€".repeat(40).as_bytes()].concat();
            for line in lines_with_string(&text) {
                assert!(parse_answer(&line).is_ok());
                agrees_with_serde(&line);
            }
        }
    }

    #[test]
    fn malformed_utf8_and_controls_fail_wherever_they_are() {
        let bad: &[&[u8]] =
            &[b"\x01", b"\x1f", b"\xed\xa0\x80", b"\xc0\x80", b"\xe0\x80\x80", b"\xf4\x90\x80\x80", b"\xc3"];
        for piece in bad {
            for at in [0, 7, 8, 15, 16, 17, 63, 64, 65, 127, 128, 1000] {
                for fill in ["x", "é"] {
                    let text = [&fill.repeat(at).into_bytes()[..], piece, &fill.repeat(200).into_bytes()].concat();
                    for line in lines_with_string(&text) {
                        assert_eq!(parse_answer(&line).err(), Some(AnswerError::NotJson), "{piece:?} at {at}");
                    }
                }
            }
        }
        // A character's lead and its continuation with printable ASCII between them, so
        // that a block of it may lie between the two.
        for at in 0..=160 {
            for between in [1, 2, 63, 64, 65, 128, 129] {
                let text = [&b"x".repeat(at)[..], b"\xc3", &b"x".repeat(between), b"\xa9"].concat();
                for line in lines_with_string(&text) {
                    assert_eq!(parse_answer(&line).err(), Some(AnswerError::NotJson), "{at} {between}");
                }
            }
        }
    }

    #[test]
    fn long_runs_are_cut_in_two_where_a_character_starts() {
        // printable() checks a run of 128 bytes or more as two halves: pieces around the
        // middle, in text of 1- to 4-byte characters of every alignment.
        let text = "a日é😀".repeat(40).into_bytes();
        for len in 120..=300 {
            for offset in 0..4 {
                let base = &text[offset..offset + len];
                for at in len / 2 - 6..=len / 2 + 6 {
                    for piece in PIECES.iter().chain([&b""[..]].iter()) {
                        let bytes = [&base[..at], piece, &base[at..]].concat();
                        let expected = std::str::from_utf8(&bytes).is_ok() && bytes.iter().all(|b| *b >= 0x20);
                        assert_eq!(scan::utf8::printable(&bytes), expected, "{bytes:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_long_string_of_short_ascii_runs_is_read_in_linear_time() {
        // Each ASCII run used to be searched with memchr to the string's end: 0.78 ms per
        // 64 KiB of English with a dash every 75 bytes, and quadratic in the length. 2 MiB
        // of such runs took minutes that way; read once, it is some milliseconds (debug
        // builds included), so 10 s is a bound with a wide margin on a loaded machine.
        let text = "abcdefghijklmnopqé".repeat((2 << 20) / 19);
        let line = format!("{{\"status\":\"OK\",\"data\":\"{text}\",\"id\":3}}");
        let started = std::time::Instant::now();
        assert!(parse_answer(line.as_bytes()).is_ok());
        let general = format!(" {}", line);
        assert!(parse_answer(general.as_bytes()).is_ok());
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "{:?}", started.elapsed());
    }

    fn byte_soup() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let byte = prop_oneof![
            4 => 0x20u8..0x7f,
            2 => 0x80u8..0xc0,
            1 => 0xc0u8..0xf8,
            1 => prop::sample::select(vec![0xe0u8, 0xed, 0xf0, 0xf4, 0xc2, 0xdf, 0xf5, 0xff]),
            1 => 0u8..0x20,
        ];
        let run = prop_oneof![
            3 => prop::collection::vec(byte, 0..8),
            2 => prop::sample::select(PIECES.to_vec()).prop_map(<[u8]>::to_vec),
            2 => (0usize..80).prop_map(|n| b"a".repeat(n)),
            1 => (0usize..30).prop_map(|n| "日".repeat(n).into_bytes()),
        ];
        prop::collection::vec(run, 0..12).prop_map(|runs| runs.concat())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]

        /// The DFA is `std::str::from_utf8` without control bytes, on any bytes.
        #[test]
        fn the_utf8_check_is_std_without_controls(bytes in byte_soup()) {
            let expected = std::str::from_utf8(&bytes).is_ok() && bytes.iter().all(|b| *b >= 0x20);
            proptest::prop_assert_eq!(scan::utf8::printable(&bytes), expected);
            proptest::prop_assert_eq!(scan::utf8::printable_bytewise(&bytes), expected);
            proptest::prop_assert_eq!(scan::utf8::printable_ascii(&bytes), bytes.iter().all(|b| (0x20..0x80).contains(b)));
        }

        /// Strings of such bytes, anywhere in an answer, are judged as serde judges them.
        #[test]
        fn strings_of_any_bytes_are_judged_as_serde_does(bytes in byte_soup()) {
            for line in lines_with_string(&bytes) {
                proptest::prop_assert_eq!(parse_answer(&line), parse_answer_with_serde(&line));
            }
        }
    }
}
