//! Line framing: the same bytes delivered in arbitrary pieces give the same lines as delivered
//! whole, and a too-long line is reported the same way.
#![no_main]

use common::framing::{next_frame, Frame};
use libfuzzer_sys::fuzz_target;

const MAX_LINE: usize = 64;

/// Lines of `input` fed in pieces of the given sizes, the way the services carry partial lines.
fn split(input: &[u8], pieces: &[u8]) -> (Vec<Vec<u8>>, bool) {
    let mut carry = Vec::new();
    let mut lines = Vec::new();
    let mut rest = input;
    let mut sizes = pieces.iter().map(|s| usize::from(*s % 16) + 1).cycle();
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(1).min(rest.len());
        carry.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        let mut used = 0;
        loop {
            match next_frame(&carry[used..], MAX_LINE) {
                Frame::Line(line, n) => {
                    lines.push(line.to_vec());
                    used += n;
                }
                Frame::Incomplete => break,
                Frame::TooLong => return (lines, true),
            }
        }
        carry.drain(..used);
    }
    (lines, false)
}

fuzz_target!(|data: &[u8]| {
    let (pieces, input) = data.split_at(data.len().min(8));
    let whole = split(input, &[255]);
    let chunked = split(input, if pieces.is_empty() { &[0] } else { pieces });
    assert_eq!(whole, chunked);
});
