//! The options every TCP stream of every tier gets, accepted or connected, in one place.

use mio::net::TcpStream;

/// `TCP_NODELAY`: answers and requests are whole lines written at once, and waiting for an
/// ACK before sending the next small one (Nagle) only adds latency.
///
/// `SO_OOBINLINE`: no tier uses TCP urgent data, so an urgent byte a peer sends stays an
/// ordinary byte of the stream where it was sent. Without it Linux takes the last unread
/// urgent byte out of the stream (and only that one: it keeps one urgent mark), so which bytes
/// a reader saw would depend on how far it had read; an origin's value would lose a byte or
/// not by timing. With it, every byte a peer sent is a byte read, in order; where a request
/// held one, that line is answered as what it now says (usually `BAD_REQUEST`).
///
/// Both are best effort: a socket that refuses them still works.
pub fn set_stream_options(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(stream).set_out_of_band_inline(true);
}
