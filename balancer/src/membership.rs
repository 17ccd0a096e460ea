//! The proxy set as configured (SPEC 7): `HOST:PORT` specs from `--proxies` and
//! `--proxies-file`, and what changes when a new set replaces the current one.
//!
//! Plain functions over text and addresses, no sockets and no clock: parsing a file either
//! gives the whole new set or names the first line at fault (so a reload that fails changes
//! nothing), and [`plan`] says which proxies stay, which are new and which drain.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Longest host name accepted (RFC 1035: 253 characters in text form).
const MAX_HOST: usize = 253;
/// Longest `HOST:PORT` entry: a longest name, or a bracketed IPv6 address, and a port. Longer
/// ones are refused before they are quoted in an error, so a bad line logs a short message.
const MAX_SPEC: usize = MAX_HOST + 1 + 5;
/// Longest proxies file read; a file larger than this is refused, not read whole.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// One configured proxy: an IP address, or a DNS name to resolve (possibly to several
/// addresses, one proxy each), and a port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProxySpec {
    pub host: Host,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

impl ProxySpec {
    /// Parses `HOST:PORT`: `10.0.0.5:8001`, `[::1]:8001`, `cache-0.proxies.svc:8001`.
    pub fn parse(text: &str) -> Result<ProxySpec, String> {
        let text = text.trim();
        if text.len() > MAX_SPEC {
            return Err(format!("an entry of {} bytes is longer than any HOST:PORT", text.len()));
        }
        if text.chars().any(char::is_control) {
            return Err(format!("{:?} holds a control character", text));
        }
        let (host, port) = text.rsplit_once(':').ok_or_else(|| format!("'{text}' is not HOST:PORT"))?;
        let port: u16 = port.parse().map_err(|_| format!("'{text}': '{port}' is not a port number"))?;
        if port == 0 {
            return Err(format!("'{text}': port 0 cannot be connected to"));
        }
        let host = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            let ip: IpAddr = inner.parse().map_err(|_| format!("'{text}': '{inner}' is not an IPv6 address"))?;
            Host::Ip(ip)
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            if ip.is_ipv6() {
                return Err(format!("'{text}': write an IPv6 address in brackets, [{host}]:{port}"));
            }
            Host::Ip(ip)
        } else {
            check_host_name(host).map_err(|why| format!("'{text}': {why}"))?;
            Host::Name(host.to_ascii_lowercase())
        };
        Ok(ProxySpec { host, port })
    }

    /// The address, when the host is one already.
    pub fn addr(&self) -> Option<SocketAddr> {
        match &self.host {
            Host::Ip(ip) => Some(SocketAddr::new(*ip, self.port)),
            Host::Name(_) => None,
        }
    }

    /// The DNS name, when the host is one.
    pub fn name(&self) -> Option<&str> {
        match &self.host {
            Host::Name(name) => Some(name),
            Host::Ip(_) => None,
        }
    }
}

impl fmt::Display for ProxySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(ip) => write!(f, "{}", SocketAddr::new(*ip, self.port)),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

/// RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens, each
/// 1–63 characters; a trailing dot (fully qualified) is allowed.
fn check_host_name(host: &str) -> Result<(), &'static str> {
    let bare = host.strip_suffix('.').unwrap_or(host);
    if bare.is_empty() {
        return Err("the host is empty");
    }
    if host.len() > MAX_HOST {
        return Err("the host name is longer than 253 characters");
    }
    for label in bare.split('.') {
        let bytes = label.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= 63
            && bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            && bytes.first() != Some(&b'-')
            && bytes.last() != Some(&b'-');
        if !ok {
            return Err("the host is neither an IP address nor a valid DNS name");
        }
    }
    Ok(())
}

/// A proxies file that cannot be used, and the line at fault (1-based; 0 when the file as a
/// whole is the problem, e.g. unreadable or not UTF-8).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.message)
        } else {
            write!(f, "line {}: {}", self.line, self.message)
        }
    }
}

/// Parses a proxies file: one `HOST:PORT` per line; blank lines and `#` comments (whole
/// lines, or after the entry) ignored; a spec given twice counts once. Any bad line fails the
/// whole file.
pub fn parse_file(bytes: &[u8]) -> Result<Vec<ProxySpec>, FileError> {
    let text = std::str::from_utf8(bytes).map_err(|e| FileError {
        line: 1 + bytes[..e.valid_up_to()].iter().filter(|b| **b == b'\n').count(),
        message: "not UTF-8 text".into(),
    })?;
    let mut specs = Vec::new();
    let mut seen = BTreeSet::new();
    for (number, line) in text.lines().enumerate() {
        let entry = line.split_once('#').map_or(line, |(before, _)| before).trim();
        if entry.is_empty() {
            continue;
        }
        let spec = ProxySpec::parse(entry).map_err(|message| FileError { line: number + 1, message })?;
        if seen.insert(spec.clone()) {
            specs.push(spec);
        }
    }
    Ok(specs)
}

/// Reads and parses a proxies file, at start-up and on SIGHUP, on the loop: it must never
/// block. The file is opened non-blocking (a FIFO put in its place does not wait for a writer)
/// and the opened file is the one checked — a path checked first and opened after could be
/// swapped for a FIFO in between. At most [`MAX_FILE_BYTES`] are read, whatever the size said
/// (a file that grows while read, or a /proc file that claims to be empty).
pub fn read_file(path: &std::path::Path) -> Result<Vec<ProxySpec>, FileError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let whole = |message: String| FileError { line: 0, message };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| whole(e.to_string()))?;
    let meta = file.metadata().map_err(|e| whole(e.to_string()))?;
    if !meta.is_file() {
        return Err(whole("not a regular file".into()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| whole(e.to_string()))?;
    if u64::try_from(bytes.len()).map_or(true, |n| n > MAX_FILE_BYTES) {
        return Err(whole(format!("larger than {MAX_FILE_BYTES} bytes")));
    }
    parse_file(&bytes)
}

/// One proxy of a resolved set: its address, and the name it came from, if any.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    pub addr: SocketAddr,
    pub name: Option<String>,
}

/// What replacing the current set with a desired one does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Addresses in both: they keep their connections, health and counters.
    pub keep: Vec<SocketAddr>,
    /// New members (they start healthy).
    pub add: Vec<Member>,
    /// Addresses no longer wanted: they drain, then leave.
    pub remove: Vec<SocketAddr>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

/// Compares the current addresses with the desired members (one proxy per address: a name
/// and an IP that give the same address are one proxy, the first one listed wins).
pub fn plan(current: &[SocketAddr], desired: &[Member]) -> Plan {
    let current_set: BTreeSet<SocketAddr> = current.iter().copied().collect();
    let mut wanted = BTreeSet::new();
    let mut plan = Plan::default();
    for member in desired {
        if !wanted.insert(member.addr) {
            continue;
        }
        if current_set.contains(&member.addr) {
            plan.keep.push(member.addr);
        } else {
            plan.add.push(member.clone());
        }
    }
    plan.remove = current.iter().copied().filter(|addr| !wanted.contains(addr)).collect();
    plan
}

/// The members for `specs`, given what each name resolved to (`resolve` returns `None` for a
/// name with no answer yet, which then contributes nothing; the caller keeps a failed name's
/// last addresses by returning those).
pub fn members(specs: &[ProxySpec], mut resolve: impl FnMut(&str, u16) -> Option<Vec<SocketAddr>>) -> Vec<Member> {
    let mut out = Vec::new();
    for spec in specs {
        match (&spec.host, spec.addr()) {
            (_, Some(addr)) => out.push(Member { addr, name: None }),
            (Host::Name(name), None) => {
                let mut addrs = resolve(name, spec.port).unwrap_or_default();
                addrs.sort();
                addrs.dedup();
                out.extend(addrs.into_iter().map(|addr| Member { addr, name: Some(name.clone()) }));
            }
            (Host::Ip(_), None) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| panic!("bad test address {s}"))
    }

    #[test]
    fn specs_of_every_form() {
        assert_eq!(ProxySpec::parse("10.0.0.5:8001").map(|s| s.addr()), Ok(Some(addr("10.0.0.5:8001"))));
        assert_eq!(ProxySpec::parse("[::1]:8001").map(|s| s.addr()), Ok(Some(addr("[::1]:8001"))));
        let named = ProxySpec::parse(" Cache-0.Proxies.svc.cluster.local.:8001 ");
        assert_eq!(named.as_ref().map(|s| s.name()), Ok(Some("cache-0.proxies.svc.cluster.local.")));
        assert_eq!(named.map(|s| s.to_string()), Ok("cache-0.proxies.svc.cluster.local.:8001".into()));
        for bad in [
            "",
            "8001",
            "host",
            "host:",
            "host:0",
            "host:65536",
            "host:-1",
            "::1:8001",
            "[zz]:80",
            "-bad.example:80",
            "a..b:80",
            "under_score:80",
            "sp ace:80",
            "ünï:80",
            ":80",
        ] {
            assert!(ProxySpec::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let long = format!("{}:80", vec!["a".repeat(63); 5].join("."));
        assert!(ProxySpec::parse(&long).is_err(), "a 319-character name was accepted");
    }

    #[test]
    fn a_file_with_comments_blanks_and_repeats() {
        let file =
            b"# the cache nodes\n\n127.0.0.1:8001\n  127.0.0.1:8002  # second\n127.0.0.1:8001\r\nproxies.local:8003\n";
        let specs = parse_file(file).unwrap_or_default();
        let shown: Vec<String> = specs.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["127.0.0.1:8001", "127.0.0.1:8002", "proxies.local:8003"]);
        assert_eq!(parse_file(b"# nothing here\n\n"), Ok(vec![]));
    }

    #[test]
    fn a_bad_line_fails_the_whole_file_and_is_named() {
        let err = parse_file(b"127.0.0.1:8001\n\n127.0.0.1:80x1\n127.0.0.1:8003\n");
        assert_eq!(err.as_ref().map_err(|e| e.line), Err(3));
        assert!(err.map_err(|e| e.to_string()).unwrap_err().starts_with("line 3: "));
        let not_utf8 = parse_file(b"127.0.0.1:8001\n\xff\xfe:80\n");
        assert_eq!(not_utf8.map_err(|e| e.line), Err(2));
    }

    #[test]
    fn an_unreadable_or_odd_file_is_refused_before_reading() {
        let dir = std::env::temp_dir().join(format!("membership-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        assert_eq!(read_file(&dir).map_err(|e| e.line), Err(0), "a directory was read");
        assert_eq!(read_file(&dir.join("missing")).map_err(|e| e.line), Err(0));
        let file = dir.join("proxies");
        let _ = std::fs::write(&file, "127.0.0.1:8001\n");
        assert_eq!(read_file(&file).map(|s| s.len()), Ok(1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A reload reads on the loop: a FIFO swapped in for the file after any check must not
    /// block it (the open would wait for a writer), and a file is never read past the bound.
    #[test]
    fn a_fifo_swapped_in_is_not_waited_on_and_no_file_is_read_past_the_bound() {
        let dir = std::env::temp_dir().join(format!("membership-fifo-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("proxies");
        let mkfifo = |p: &std::path::Path| {
            let made = std::process::Command::new("mkfifo").arg(p).status();
            assert!(made.is_ok_and(|s| s.success()), "mkfifo {}", p.display());
        };
        mkfifo(&path);
        assert_eq!(read_file(&path).map_err(|e| e.line), Err(0), "a FIFO was read");
        // The file and a FIFO swap places as fast as they can while reads go on.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let (dir, path, stop) = (dir.clone(), path.clone(), stop.clone());
            let fifo = dir.join("fifo");
            mkfifo(&fifo);
            std::thread::spawn(move || {
                let (reg, link) = (dir.join("reg"), dir.join("link"));
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = std::fs::write(&reg, "127.0.0.1:8001\n");
                    let _ = std::fs::rename(&reg, &path);
                    let _ = std::fs::hard_link(&fifo, &link);
                    let _ = std::fs::rename(&link, &path);
                }
            })
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let reader = {
            let path = path.clone();
            std::thread::spawn(move || {
                let began = std::time::Instant::now();
                let mut reads = 0u32;
                while began.elapsed() < std::time::Duration::from_secs(2) && reads < 200_000 {
                    let _ = read_file(&path);
                    reads += 1;
                }
                let _ = done_tx.send(reads);
            })
        };
        let outcome = done_rx.recv_timeout(std::time::Duration::from_secs(10));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = swapper.join();
        if outcome.is_err() {
            // Free the blocked reader (a writer opens the FIFO) before failing.
            let _ = std::fs::OpenOptions::new().write(true).open(&path);
        }
        let _ = reader.join();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(outcome.is_ok(), "read_file blocked opening a FIFO swapped in for the file");
        // /proc files claim a size of 0; kallsyms holds megabytes. Refused, not read whole.
        let kallsyms = std::path::Path::new("/proc/kallsyms");
        if std::fs::metadata(kallsyms).is_ok() {
            let got = read_file(kallsyms).map_err(|e| e.to_string());
            assert!(matches!(&got, Err(e) if e.contains("larger than")), "{got:?}");
        }
    }

    /// A bad line is quoted in the log: a 900 KB line or terminal escapes must not be.
    #[test]
    fn a_long_or_odd_line_gives_a_short_error() {
        let long = format!("{}:80\n", "1".repeat(900_000));
        let err = parse_file(long.as_bytes()).map_err(|e| e.to_string());
        assert!(matches!(&err, Err(e) if e.len() < 200), "{:?}", err.map_err(|e| e.len()));
        let escape = parse_file(b"\x1b[2Jhost:80\n").map_err(|e| e.to_string());
        assert!(matches!(&escape, Err(e) if !e.contains('\x1b')), "{escape:?}");
    }

    #[test]
    fn a_plan_keeps_adds_and_removes() {
        let current = [addr("10.0.0.1:80"), addr("10.0.0.2:80"), addr("10.0.0.3:80")];
        let desired = [
            Member { addr: addr("10.0.0.2:80"), name: None },
            Member { addr: addr("10.0.0.4:80"), name: Some("p".into()) },
            Member { addr: addr("10.0.0.1:80"), name: None },
            Member { addr: addr("10.0.0.4:80"), name: None },
        ];
        let p = plan(&current, &desired);
        assert_eq!(p.keep, [addr("10.0.0.2:80"), addr("10.0.0.1:80")]);
        assert_eq!(p.add, [Member { addr: addr("10.0.0.4:80"), name: Some("p".into()) }]);
        assert_eq!(p.remove, [addr("10.0.0.3:80")]);
        assert!(plan(
            &current,
            &members(&parse_file(b"10.0.0.3:80\n10.0.0.1:80\n10.0.0.2:80").unwrap_or_default(), |_, _| None)
        )
        .is_empty());
    }

    #[test]
    fn a_name_gives_one_member_per_address() {
        let specs = parse_file(b"proxies.local:8001\n10.0.0.9:8001\nunknown.local:8001\n").unwrap_or_default();
        let got = members(&specs, |name, port| match name {
            "proxies.local" => Some(vec![
                SocketAddr::new([10, 0, 0, 2].into(), port),
                SocketAddr::new([10, 0, 0, 1].into(), port),
                SocketAddr::new([10, 0, 0, 2].into(), port),
            ]),
            _ => None,
        });
        let shown: Vec<(String, Option<&str>)> = got.iter().map(|m| (m.addr.to_string(), m.name.as_deref())).collect();
        assert_eq!(
            shown,
            [
                ("10.0.0.1:8001".into(), Some("proxies.local")),
                ("10.0.0.2:8001".into(), Some("proxies.local")),
                ("10.0.0.9:8001".into(), None),
            ]
        );
    }
}
