//! Every way an attempt to a proxy can fail, in one enum: what the retry decision, the
//! passive health check and the client's error message are made from.

use common::peer::{PeerClosed, PeerEnd};

/// Why an attempt (a GET sent to one proxy) got no usable answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The proxy refused the connection: it is not running.
    Refused,
    /// No connection could even be started (out of descriptors, say).
    CannotConnect,
    /// The connection was reset, or a write to it failed.
    Reset,
    /// The proxy closed the connection before answering.
    Closed,
    /// An answer line that is not a well-formed answer (or not one we can attribute).
    Garbage,
    /// An answer line longer than the balancer accepts.
    TooLong,
    /// No answer within the attempt's deadline.
    TimedOut,
    /// The proxy was marked down while the attempt waited on it.
    ProxyDown,
}

impl Failure {
    /// What a failed connect means: a local shortage (descriptors, memory, ports) is not the
    /// proxy's doing; any other failure to reach it (refused, unreachable, timed out) is.
    pub fn of_connect(e: &std::io::Error) -> Failure {
        let local = [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM, libc::ENOSPC, libc::EADDRNOTAVAIL];
        if e.kind() != std::io::ErrorKind::ConnectionRefused && e.raw_os_error().is_some_and(|n| local.contains(&n)) {
            Failure::CannotConnect
        } else {
            Failure::Refused
        }
    }

    /// What the end of a connection the driver closed means for what it carried.
    pub fn of_end(closed: &PeerClosed) -> Failure {
        match &closed.end {
            PeerEnd::ConnectFailed(e) => Failure::of_connect(e),
            PeerEnd::Failed(_) if !closed.was_connected => Failure::Refused,
            PeerEnd::Failed(_) => Failure::Reset,
            PeerEnd::Closed => Failure::Closed,
            PeerEnd::LineTooLong => Failure::TooLong,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Failure::Refused => "connection refused",
            Failure::CannotConnect => "cannot connect",
            Failure::Reset => "connection reset",
            Failure::Closed => "proxy closed the connection",
            Failure::Garbage => "proxy answered garbage",
            Failure::TooLong => "proxy answer too long",
            Failure::TimedOut => "timed out",
            Failure::ProxyDown => "proxy marked down",
        }
    }

    /// Whether it counts against the proxy's passive health. A proxy marked down already
    /// counted; a local shortage of descriptors is not the proxy's fault.
    pub fn counts_against_proxy(self) -> bool {
        !matches!(self, Failure::ProxyDown | Failure::CannotConnect)
    }

    /// A refused connection marks the proxy down at once (SPEC 3.6).
    pub fn marks_down_at_once(self) -> bool {
        self == Failure::Refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_proxys_own_failures_count_against_it() {
        assert!(Failure::TimedOut.counts_against_proxy());
        assert!(Failure::Garbage.counts_against_proxy());
        assert!(!Failure::ProxyDown.counts_against_proxy());
        assert!(!Failure::CannotConnect.counts_against_proxy());
        assert!(Failure::Refused.marks_down_at_once() && !Failure::Reset.marks_down_at_once());
    }

    #[test]
    fn how_a_connection_ended_says_what_failed() {
        use std::io::{Error, ErrorKind};
        let end = |end, was_connected| Failure::of_end(&PeerClosed { end, received: 0, was_connected });
        let refused = || PeerEnd::ConnectFailed(Error::from(ErrorKind::ConnectionRefused));
        assert_eq!(end(refused(), false), Failure::Refused);
        let unreachable = PeerEnd::ConnectFailed(Error::from_raw_os_error(libc::EHOSTUNREACH));
        assert_eq!(end(unreachable, false), Failure::Refused, "the proxy cannot be reached");
        for local in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::EADDRNOTAVAIL] {
            let short = PeerEnd::ConnectFailed(Error::from_raw_os_error(local));
            assert_eq!(end(short, false), Failure::CannotConnect, "a local shortage: {local}");
        }
        assert_eq!(end(PeerEnd::Failed(Error::from(ErrorKind::ConnectionReset)), true), Failure::Reset);
        assert_eq!(end(PeerEnd::Failed(Error::from(ErrorKind::ConnectionReset)), false), Failure::Refused);
        assert_eq!(end(PeerEnd::Closed, true), Failure::Closed);
        assert_eq!(end(PeerEnd::LineTooLong, true), Failure::TooLong);
    }
}
