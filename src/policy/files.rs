//! Reading the files a policy names (the policy itself, secrets, TLS files, key files) while the
//! sidecar runs: bounded in size, and given up after `READ_TIMEOUT`, so that a file that blocks
//! (a FIFO, a hung NFS or CSI mount) delays only its own reading, never the policy watch.
//!
//! A read runs on a thread of its own. One that does not finish in time is left to finish
//! whenever it can, and the file is not read again before it has: one parked thread per stuck
//! file, however often the file is polled.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

/// How long one file read may take before it is reported as hanging.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Files whose read is under way past its time limit.
static HANGING: LazyLock<Mutex<HashSet<PathBuf>>> = LazyLock::new(Mutex::default);

/// The content last read from each secret or TLS file (see `read_remembered`).
static REMEMBERED: LazyLock<Mutex<HashMap<PathBuf, Arc<[u8]>>>> = LazyLock::new(Mutex::default);

/// Why a file could not be read; the messages name no file (the caller does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    Unreadable(String),
    TooLarge(u64),
    /// The read did not finish within `READ_TIMEOUT`, now or at an earlier try.
    Hanging,
}

impl ReadError {
    /// A short fixed name for metrics labels.
    pub fn label(&self) -> &'static str {
        match self {
            ReadError::Unreadable(_) => "unreadable",
            ReadError::TooLarge(_) => "too_large",
            ReadError::Hanging => "hanging",
        }
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Unreadable(e) => write!(f, "cannot read: {e}"),
            ReadError::TooLarge(max) => write!(f, "larger than {max} bytes"),
            ReadError::Hanging => write!(
                f,
                "reading it did not finish within {}s (a FIFO, or a hung mount?)",
                READ_TIMEOUT.as_secs()
            ),
        }
    }
}

/// Reads at most `max` bytes of `path` (more is an error, and no more is read), waiting at
/// most `READ_TIMEOUT`. Blocks the calling thread: from async code use `read_off_loop`.
pub fn read(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let hanging = || HANGING.lock().unwrap_or_else(PoisonError::into_inner);
    if !hanging().insert(path.to_path_buf()) {
        return Err(ReadError::Hanging);
    }
    let (done, result) = mpsc::sync_channel(1);
    let owned = path.to_path_buf();
    let reader = std::thread::Builder::new()
        .name("bff-file-read".into())
        .spawn(move || {
            let read = read_bounded(&owned, max);
            hanging().remove(&owned);
            // The caller may have stopped waiting: then nobody wants the result.
            let _ = done.send(read);
        });
    if let Err(e) = reader {
        hanging().remove(path);
        return Err(ReadError::Unreadable(format!(
            "cannot start a thread to read it: {e}"
        )));
    }
    result
        .recv_timeout(READ_TIMEOUT)
        .unwrap_or(Err(ReadError::Hanging))
}

/// `read`, remembering what it read for `read_or_remembered`: for the files that are read again
/// while the sidecar runs and whose content a policy reload may need (secrets, TLS files).
pub fn read_remembered(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let bytes = read(path, max)?;
    let mut remembered = REMEMBERED.lock().unwrap_or_else(PoisonError::into_inner);
    if remembered.get(path).is_none_or(|known| **known != *bytes) {
        remembered.insert(path.to_path_buf(), Arc::from(bytes.as_slice()));
    }
    Ok(bytes)
}

/// `read_remembered` for a policy being loaded: a file that hangs gives the content last read
/// from it, if this process read it before, so that a reload is not held up (or refused) for a
/// file whose last good content is in use anyway. A file never read before is an error.
pub fn read_or_remembered(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    match read_remembered(path, max) {
        Err(ReadError::Hanging) => {
            let remembered = REMEMBERED.lock().unwrap_or_else(PoisonError::into_inner);
            let known = remembered.get(path).ok_or(ReadError::Hanging)?;
            tracing::warn!(file = %path.display(), "file hangs; the policy takes the content last read from it");
            Ok(known.to_vec())
        }
        read => read,
    }
}

/// `read` on Tokio's blocking pool: the async task waits at most `READ_TIMEOUT`, and no
/// worker thread is held meanwhile.
pub async fn read_off_loop(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || read(&owned, max))
        .await
        .unwrap_or_else(|e| Err(ReadError::Unreadable(e.to_string())))
}

fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let file = std::fs::File::open(path).map_err(|e| ReadError::Unreadable(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ReadError::Unreadable(e.to_string()))?;
    if bytes.len() as u64 > max {
        return Err(ReadError::TooLarge(max));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn reads_within_the_bound_and_refuses_beyond_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"12345").unwrap();
        assert_eq!(read(&file, 5).unwrap(), b"12345");
        assert_eq!(read(&file, 4), Err(ReadError::TooLarge(4)));
        let missing = read(&dir.path().join("nope"), 5).unwrap_err();
        assert_eq!(missing.label(), "unreadable");
    }

    #[test]
    fn a_fifo_without_a_writer_is_given_up_and_not_read_twice() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let started = Instant::now();
        assert_eq!(read(&fifo, 100), Err(ReadError::Hanging));
        assert!(started.elapsed() < READ_TIMEOUT + Duration::from_secs(5));
        // The first read still waits for a writer: the second does not wait at all.
        let again = Instant::now();
        assert_eq!(read(&fifo, 100), Err(ReadError::Hanging));
        assert!(again.elapsed() < Duration::from_secs(1));
        // A writer comes: the parked read finishes and the file is read again from then on.
        std::fs::write(&fifo, b"x").unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while HANGING.lock().unwrap().contains(&fifo) {
            assert!(Instant::now() < until);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_load_takes_the_last_content_read_from_a_file_that_hangs() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, b"one").unwrap();
        assert_eq!(read_or_remembered(&file, 10).unwrap(), b"one");
        std::fs::write(&file, b"two").unwrap();
        assert_eq!(read_remembered(&file, 10).unwrap(), b"two");
        std::fs::remove_file(&file).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(&file)
            .status()
            .unwrap();
        assert!(made.success());
        assert_eq!(read_remembered(&file, 10), Err(ReadError::Hanging));
        assert_eq!(read_or_remembered(&file, 10).unwrap(), b"two");
        let never_read = dir.path().join("other");
        std::process::Command::new("mkfifo")
            .arg(&never_read)
            .status()
            .unwrap();
        assert_eq!(read_or_remembered(&never_read, 10), Err(ReadError::Hanging));
        // Let the parked readers go.
        std::fs::write(&file, b"x").unwrap();
        std::fs::write(&never_read, b"x").unwrap();
    }
}
