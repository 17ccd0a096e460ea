//! Line framing: the same bytes delivered in arbitrary pieces give the same lines as delivered
//! whole, and a too-long line is reported the same way.
#![no_main]

use common::framing::lines_in_pieces;
use libfuzzer_sys::fuzz_target;

const MAX_LINE: usize = 64;

fuzz_target!(|data: &[u8]| {
    let (sizes, input) = data.split_at(data.len().min(8));
    let whole = lines_in_pieces(input, || input.len(), MAX_LINE);
    let mut next = sizes.iter().map(|s| usize::from(*s % 16) + 1).cycle();
    let pieces = lines_in_pieces(input, || next.next().unwrap_or(1), MAX_LINE);
    assert_eq!(whole, pieces);
});
