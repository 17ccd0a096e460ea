//! Where the origin's values come from: JSON files under the data directory, read when asked
//! (so edits show up at once), and generated synthetic values for benchmarks.
//!
//! Kept apart from the event loop: a lookup is a plain function of the key.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::de::IgnoredAny;

/// The result of looking a key up. `Found` means the value was appended to the caller's
/// buffer as one line of JSON.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Found,
    NotFound,
    /// The file exists but cannot be served; the message says why.
    Error(String),
}

/// Synthetic keys `synthetic/0` … `synthetic/{count-1}` with values of about `value_bytes`.
#[derive(Clone, Copy, Debug)]
pub struct Synthetic {
    pub count: u64,
    pub value_bytes: usize,
}

const SYNTHETIC_PREFIX: &str = "synthetic/";

/// Values served instead of files: what the simulator gives its origin (values that change
/// over time, spells of failure), looked up like a file would be.
pub trait Values: Send + std::fmt::Debug {
    fn lookup(&self, key: &str, out: &mut Vec<u8>) -> Lookup;
}

#[derive(Debug)]
pub struct Store {
    /// When set, every lookup is answered from it (no files are read).
    values: Option<Box<dyn Values>>,
    data_dir: PathBuf,
    /// `data_dir` with every symlink resolved: a data file must resolve to a path under it.
    real_dir: PathBuf,
    max_file_bytes: u64,
    synthetic: Option<Synthetic>,
}

impl Store {
    /// Fails with a clear message when `data_dir` is missing or not a directory.
    pub fn open(data_dir: &Path, max_file_bytes: u64, synthetic: Option<Synthetic>) -> io::Result<Store> {
        let meta = std::fs::metadata(data_dir).map_err(|e| {
            io::Error::new(e.kind(), format!("data directory {} is not usable: {e}", data_dir.display()))
        })?;
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("data directory {} is not a directory", data_dir.display()),
            ));
        }
        let real_dir = std::fs::canonicalize(data_dir)?;
        Ok(Store { values: None, data_dir: data_dir.to_path_buf(), real_dir, max_file_bytes, synthetic })
    }

    /// A store that serves `values` and reads no file.
    pub fn from_values(values: Box<dyn Values>) -> Store {
        Store {
            values: Some(values),
            data_dir: PathBuf::new(),
            real_dir: PathBuf::new(),
            max_file_bytes: 0,
            synthetic: None,
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Looks up a key that has already passed `protocol::validate_key`. That validation is
    /// what keeps the path inside the data directory: segments are never `.`, `..` or empty,
    /// and hold no separators.
    pub fn lookup(&self, key: &str, out: &mut Vec<u8>) -> Lookup {
        if let Some(values) = &self.values {
            return values.lookup(key, out);
        }
        if let Some(synthetic) = self.synthetic {
            if let Some(n) = synthetic_index(key).filter(|n| *n < synthetic.count) {
                write_synthetic(out, n, synthetic.value_bytes);
                return Lookup::Found;
            }
        }
        self.read_file(key, out)
    }

    /// Serves only regular files inside the data directory (SPEC 3.8): a symlink leading
    /// outside it is NOT_FOUND, and a FIFO, device or socket is refused before anything opens
    /// it (opening a FIFO for reading blocks until a writer comes: the whole loop would stop).
    fn read_file(&self, key: &str, out: &mut Vec<u8>) -> Lookup {
        let mut path = self.data_dir.join(key);
        path.as_mut_os_string().push(".json");
        let missing = |e: &io::Error| matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory);
        let real = match std::fs::canonicalize(&path) {
            Ok(real) => real,
            Err(e) if missing(&e) => return Lookup::NotFound,
            Err(e) => return Lookup::Error(format!("cannot read data file: {e}")),
        };
        if !real.starts_with(&self.real_dir) {
            return Lookup::NotFound;
        }
        match std::fs::metadata(&real) {
            Ok(meta) if meta.is_dir() => return Lookup::NotFound,
            Ok(meta) if !meta.is_file() => return Lookup::Error("data file is not a regular file".into()),
            Ok(_) => {}
            Err(e) if missing(&e) => return Lookup::NotFound,
            Err(e) => return Lookup::Error(format!("cannot read data file: {e}")),
        }
        // Non-blocking and not following a symlink: if the path was swapped for a FIFO or a
        // link since the checks above, the open fails or returns at once instead of blocking.
        let file = match OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW).open(&real) {
            Ok(file) => file,
            Err(e) if missing(&e) => return Lookup::NotFound,
            Err(e) => return Lookup::Error(format!("cannot read data file: {e}")),
        };
        match file.metadata() {
            Ok(meta) if meta.is_dir() => return Lookup::NotFound,
            Ok(meta) if !meta.is_file() => return Lookup::Error("data file is not a regular file".into()),
            Ok(meta) if meta.len() > self.max_file_bytes => return self.too_large(),
            Ok(_) => {}
            Err(e) => return Lookup::Error(format!("cannot read data file: {e}")),
        }
        let start = out.len();
        // Read at most one byte past the limit, in case the file grew since the stat.
        if let Err(e) = file.take(self.max_file_bytes.saturating_add(1)).read_to_end(out) {
            out.truncate(start);
            return Lookup::Error(format!("cannot read data file: {e}"));
        }
        if u64::try_from(out.len() - start).unwrap_or(u64::MAX) > self.max_file_bytes {
            out.truncate(start);
            return self.too_large();
        }
        if serde_json::from_slice::<IgnoredAny>(&out[start..]).is_err() {
            out.truncate(start);
            return Lookup::Error("data file is not valid JSON".into());
        }
        compact_to_one_line(out, start);
        Lookup::Found
    }

    fn too_large(&self) -> Lookup {
        Lookup::Error(format!("data file is larger than {} bytes", self.max_file_bytes))
    }
}

/// Valid JSON holds no raw line breaks inside strings, so every `\r` or `\n` is whitespace
/// between tokens and may become a space; then the surrounding whitespace is trimmed. The
/// value keeps its bytes otherwise (key order, number spelling) and fits on one line.
fn compact_to_one_line(out: &mut Vec<u8>, start: usize) {
    for b in &mut out[start..] {
        if *b == b'\n' || *b == b'\r' {
            *b = b' ';
        }
    }
    let value = &out[start..];
    let lead = value.iter().take_while(|b| b.is_ascii_whitespace()).count();
    let trail = value.iter().rev().take_while(|b| b.is_ascii_whitespace()).count();
    out.truncate(out.len() - trail);
    out.drain(start..start + lead);
}

/// `synthetic/N` with N in canonical decimal (no sign, no leading zeros).
fn synthetic_index(key: &str) -> Option<u64> {
    let digits = key.strip_prefix(SYNTHETIC_PREFIX)?;
    let canonical =
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && (digits == "0" || !digits.starts_with('0'));
    if canonical {
        digits.parse().ok()
    } else {
        None
    }
}

/// `{"key":"synthetic/N","value":"xxx…"}`, padded so the whole encoding is `value_bytes` long
/// (or as short as it can be when `value_bytes` is smaller than the fixed part).
pub fn write_synthetic(out: &mut Vec<u8>, n: u64, value_bytes: usize) {
    const HEAD: &[u8] = b"{\"key\":\"synthetic/";
    const MIDDLE: &[u8] = b"\",\"value\":\"";
    const TAIL: &[u8] = b"\"}";
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(n);
    let fixed = HEAD.len() + digits.len() + MIDDLE.len() + TAIL.len();
    out.extend_from_slice(HEAD);
    out.extend_from_slice(digits.as_bytes());
    out.extend_from_slice(MIDDLE);
    out.resize(out.len() + value_bytes.saturating_sub(fixed), b'x');
    out.extend_from_slice(TAIL);
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::temp_dir;

    fn lookup(store: &Store, key: &str) -> (Lookup, String) {
        let mut out = b"prefix".to_vec();
        let result = store.lookup(key, &mut out);
        (result, String::from_utf8(out[6..].to_vec()).unwrap())
    }

    #[test]
    fn files_are_read_validated_and_put_on_one_line() {
        let dir = temp_dir("files");
        std::fs::create_dir_all(dir.join("a")).unwrap();
        std::fs::write(dir.join("a/pretty.json"), "\n{\r\n  \"b\": [1,\n 2],\n  \"a\": \"x y\"\n}\n\n").unwrap();
        std::fs::write(dir.join("a/bad.json"), "{\"a\":").unwrap();
        std::fs::write(dir.join("a/empty.json"), "").unwrap();
        std::fs::write(dir.join("a/big.json"), format!("\"{}\"", "z".repeat(100))).unwrap();
        std::fs::create_dir_all(dir.join("a/dir.json")).unwrap();
        let store = Store::open(&dir, 64, None).unwrap();

        let (result, value) = lookup(&store, "a/pretty");
        assert_eq!(result, Lookup::Found);
        assert_eq!(value, "{    \"b\": [1,  2],   \"a\": \"x y\" }");
        assert!(serde_json::from_str::<serde_json::Value>(&value).is_ok());

        assert!(matches!(lookup(&store, "a/bad").0, Lookup::Error(_)));
        assert!(matches!(lookup(&store, "a/empty").0, Lookup::Error(_)));
        assert!(matches!(lookup(&store, "a/big").0, Lookup::Error(m) if m.contains("larger")));
        assert_eq!(lookup(&store, "a/missing").0, Lookup::NotFound);
        assert_eq!(lookup(&store, "a/pretty/deeper").0, Lookup::NotFound);
        assert_eq!(lookup(&store, "a/dir").0, Lookup::NotFound);
        assert_eq!(lookup(&store, "a").0, Lookup::NotFound);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_data_dir_is_a_clear_error() {
        let err = Store::open(Path::new("/nonexistent/origin-data"), 1, None).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/origin-data"), "{err}");
    }

    #[test]
    fn synthetic_values_have_the_requested_size() {
        let dir = temp_dir("synthetic");
        let store = Store::open(&dir, 1 << 20, Some(Synthetic { count: 1000, value_bytes: 200 })).unwrap();
        for key in ["synthetic/0", "synthetic/7", "synthetic/999"] {
            let (result, value) = lookup(&store, key);
            assert_eq!(result, Lookup::Found, "{key}");
            assert_eq!(value.len(), 200, "{key}: {value}");
            let v: serde_json::Value = serde_json::from_str(&value).unwrap();
            assert_eq!(v["key"], key);
        }
        for key in ["synthetic/1000", "synthetic/07", "synthetic/-1", "synthetic/", "synthetic/x"] {
            assert_eq!(lookup(&store, key).0, Lookup::NotFound, "{key}");
        }
        let mut tiny = Vec::new();
        write_synthetic(&mut tiny, 5, 1);
        assert_eq!(tiny, b"{\"key\":\"synthetic/5\",\"value\":\"\"}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
