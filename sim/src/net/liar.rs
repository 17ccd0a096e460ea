//! The lying peer (SPEC 3.6: any bytes from a proxy): on connections to a node set to lie,
//! answers are held back to whole lines and now and then one gets an id that its connection
//! is not waiting for — another connection's waiting id, or an unknown one. The network sees
//! every connection, so it can pick lies a correct peer is never fooled by and a wrong one is.

use std::collections::{BTreeMap, BTreeSet};

use super::{whole_lines, EndId, Net, NodeId};

/// A node that answers with ids it was never sent on that connection (SPEC 3.6: any bytes
/// from a proxy). Now and then an answer line's numeric `id` is replaced: by an id that is
/// waiting for its answer on another connection from the same peer and that this connection
/// never asked (an answer for another proxy's request), or, when there is none, by one far
/// beyond anything asked (an unknown id). The network sees every connection, so it can pick
/// lies a correct peer would never be fooled by, and that a wrong one would.
#[derive(Debug, Default)]
pub(super) struct Liar {
    /// Per connection: bytes of an unfinished answer line.
    pub(super) lines: BTreeMap<usize, Vec<u8>>,
    /// One answer in this many is lied about.
    pub(super) every: usize,
}

/// The ids asked and not yet answered on a connection to a node that may lie.
#[derive(Debug, Default)]
pub(super) struct Ids {
    asked: BTreeSet<u64>,
    waiting: BTreeSet<u64>,
    /// The connecting side's node.
    from: NodeId,
    /// The unfinished request line, and the unfinished answer line (while truthful).
    partial: Vec<u8>,
    answers: Vec<u8>,
}

/// The number after the first `"id":` in `line`, and where its digits are.
fn numeric_id(line: &[u8]) -> Option<(u64, usize, usize)> {
    let at = line.windows(5).position(|w| w == b"\"id\":")? + 5;
    let digits = line[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    let text = std::str::from_utf8(&line[at..at + digits]).ok()?;
    Some((text.parse().ok()?, at, at + digits))
}

impl Net {
    /// What goes on the wire for `bytes` written at `end`: the bytes themselves, except on a
    /// connection to a liar, whose answers are held back to whole lines and some of their ids
    /// changed (see [`Liar`]).
    pub(super) fn tamper(&mut self, end: EndId, bytes: &[u8]) -> Vec<u8> {
        let Some(c) = self.conns.get(&end.conn) else { return bytes.to_vec() };
        let (from, to) = (c.ends[0].owner, c.ends[1].owner);
        if !self.id_nodes.contains(&to) {
            return bytes.to_vec();
        }
        let ids = self.ids.entry(end.conn).or_insert_with(|| Ids { from, ..Ids::default() });
        if end.side == 0 {
            // Requests, read whole: a write may end in the middle of one.
            for line in whole_lines(&mut ids.partial, bytes).split(|b| *b == b'\n') {
                if let Some((id, _, _)) = numeric_id(line) {
                    ids.asked.insert(id);
                    ids.waiting.insert(id);
                }
            }
            return bytes.to_vec();
        }
        let Some(liar) = self.liars.get_mut(&to) else {
            for line in whole_lines(&mut ids.answers, bytes).split(|b| *b == b'\n') {
                if let Some((id, _, _)) = numeric_id(line) {
                    ids.waiting.remove(&id);
                }
            }
            return bytes.to_vec();
        };
        let every = liar.every.max(1);
        let whole = whole_lines(liar.lines.entry(end.conn).or_default(), bytes);
        let mut out = Vec::with_capacity(whole.len());
        for line in whole.split_inclusive(|b| *b == b'\n') {
            let lie = self.rng.below(every) == 0;
            let forged = numeric_id(line).and_then(|(id, from, to)| {
                if !lie {
                    if let Some(ids) = self.ids.get_mut(&end.conn) {
                        ids.waiting.remove(&id);
                    }
                    return None;
                }
                // The true id stays waiting: its answer never arrives (it times out).
                let forged_id = self.foreign_id(end.conn).unwrap_or(id.wrapping_add(1_000_000));
                let mut forged = line[..from].to_vec();
                forged.extend_from_slice(forged_id.to_string().as_bytes());
                forged.extend_from_slice(&line[to..]);
                Some(forged)
            });
            out.extend_from_slice(forged.as_deref().unwrap_or(line));
        }
        out
    }

    /// An id waiting for its answer on another connection from the same node, that `conn`
    /// is not waiting for and never will be: below what `conn` asked last (a connection's
    /// ids only grow), and either never asked on `conn` or answered there already. To a
    /// correct peer that is an unknown or late id; a wrong one delivers it to another
    /// connection's request.
    fn foreign_id(&self, conn: usize) -> Option<u64> {
        let here = self.ids.get(&conn)?;
        let newest = *here.asked.last()?;
        self.ids
            .iter()
            .filter(|(c, ids)| **c != conn && ids.from == here.from)
            .flat_map(|(_, ids)| ids.waiting.iter())
            .find(|id| **id < newest && !here.waiting.contains(id))
            .copied()
    }
}
