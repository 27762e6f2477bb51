//! `${env:NAME}` and `${file:PATH}` references in policy values, resolved at load time (and
//! again when a secret file rotates: see `upstream::credential`).

use std::path::{Path, PathBuf};

use http::HeaderValue;

use super::files;

/// Largest `${file:}` secret. A credential or a client secret is a few hundred bytes; a larger
/// file is a mistake (as a header it would make every call fail), and it is read every second.
pub const MAX_SECRET_FILE: u64 = 64 << 10;

/// Why a secret cannot be read: `reason` is a fixed label (`unreadable`, `too_large`,
/// `hanging`, `invalid`, `env`), `message` says which file and what, and holds no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretError {
    pub reason: &'static str,
    pub message: String,
}

/// Replaces every `${env:NAME}` and `${file:PATH}` in `value`. Relative file paths are taken
/// from `base_dir` (the policy file's directory). File contents lose one trailing newline, the
/// way `echo secret > file` leaves them.
///
/// A file that hangs (see `files`) gives the content last read from it, if this process read
/// it before (`files::read_or_remembered`).
pub fn resolve(value: &str, base_dir: &Path) -> Result<String, String> {
    resolve_with(value, base_dir, Mode::Load).map_err(|e| e.message)
}

/// `resolve` for a secret read again while the sidecar runs: a referenced file that is empty
/// is an error rather than an empty value, because a writer that truncates and then writes
/// leaves it empty for a moment, and the last good value is better than none. A file that
/// hangs is an error too: the caller keeps its last good value.
pub fn reread(value: &str, base_dir: &Path) -> Result<String, SecretError> {
    resolve_with(value, base_dir, Mode::Reread)
}

/// The files `value` refers to, as the paths they are read from.
pub fn files(value: &str, base_dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else { break };
        if let Some(("file", path)) = after[..end].split_once(':') {
            if !path.is_empty() {
                files.push(base_dir.join(path));
            }
        }
        rest = &after[end + 1..];
    }
    files
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Load,
    Reread,
}

fn resolve_with(value: &str, base_dir: &Path, mode: Mode) -> Result<String, SecretError> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| SecretError {
            reason: "invalid",
            message: format!("`${{` without its `}}` in `{value}`"),
        })?;
        let reference = &after[..end];
        out.push_str(&lookup(reference, base_dir, mode)?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn lookup(reference: &str, base_dir: &Path, mode: Mode) -> Result<String, SecretError> {
    match reference.split_once(':') {
        Some(("env", name)) if !name.is_empty() => std::env::var(name).map_err(|_| SecretError {
            reason: "env",
            message: format!(
                "environment variable `{name}` is not set (referenced as `${{env:{name}}}`)"
            ),
        }),
        Some(("file", path)) if !path.is_empty() => read_file(&base_dir.join(path), path, mode),
        _ => Err(SecretError {
            reason: "invalid",
            message: format!(
                "`${{{reference}}}` is not a reference; use `${{env:NAME}}` or `${{file:PATH}}`"
            ),
        }),
    }
}

fn read_file(full: &Path, written: &str, mode: Mode) -> Result<String, SecretError> {
    let fail = |reason: &'static str, what: String| SecretError {
        reason,
        message: format!(
            "`{}` (referenced as `${{file:{written}}}`): {what}",
            full.display()
        ),
    };
    let read = match mode {
        Mode::Load => files::read_or_remembered(full, MAX_SECRET_FILE),
        Mode::Reread => files::read_remembered(full, MAX_SECRET_FILE),
    };
    let bytes = read.map_err(|e| fail(e.label(), e.to_string()))?;
    let mut text =
        String::from_utf8(bytes).map_err(|_| fail("invalid", "not UTF-8 text".into()))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() && mode == Mode::Reread {
        return Err(fail("invalid", "is empty".into()));
    }
    Ok(text)
}

/// A credential header's value (the message names no part of it): printable ASCII, spaces
/// and tabs only. `HeaderValue` would also take bytes above 127, which servers read in
/// different ways or refuse.
pub fn header_value(text: String) -> Result<HeaderValue, String> {
    let printable = text
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
    let value = HeaderValue::from_str(&text).ok().filter(|_| printable);
    let mut value = value.ok_or_else(|| {
        "the value read is not a valid header value (printable ASCII only: no control characters or newlines)"
            .to_string()
    })?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_env_and_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "s3cret\n").unwrap();
        // PATH is set in every environment the tests run in; no test mutates the environment.
        let path = std::env::var("PATH").unwrap();
        assert_eq!(
            resolve("Bearer ${file:token}", dir.path()).unwrap(),
            "Bearer s3cret"
        );
        assert_eq!(
            resolve("${env:PATH}!", dir.path()).unwrap(),
            format!("{path}!")
        );
        assert_eq!(resolve("plain", dir.path()).unwrap(), "plain");
    }

    #[test]
    fn missing_references_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve("${env:BFF_TEST_SURELY_UNSET_1234}", dir.path()).unwrap_err();
        assert!(
            err.contains("BFF_TEST_SURELY_UNSET_1234` is not set"),
            "{err}"
        );
        let err = resolve("${file:nope}", dir.path()).unwrap_err();
        assert!(err.contains("cannot read"), "{err}");
        assert!(err.contains("nope"), "{err}");
        assert!(resolve("${vault:x}", dir.path()).is_err());
        assert!(resolve("${env:X", dir.path()).is_err());
    }

    #[test]
    fn a_reread_refuses_an_empty_file_and_lists_the_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "\n").unwrap();
        assert_eq!(resolve("a${file:token}", dir.path()).unwrap(), "a");
        let err = reread("a${file:token}", dir.path()).unwrap_err();
        assert!(err.message.contains("is empty"), "{err:?}");
        assert_eq!(err.reason, "invalid");
        assert_eq!(
            files("${env:X}${file:token}-${file:/abs/key}${file:", dir.path()),
            [dir.path().join("token"), PathBuf::from("/abs/key")]
        );
    }

    #[test]
    fn an_oversized_secret_file_is_refused_without_reading_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let big = "x".repeat(MAX_SECRET_FILE as usize + 1);
        std::fs::write(dir.path().join("big"), &big).unwrap();
        let err = reread("${file:big}", dir.path()).unwrap_err();
        assert_eq!(err.reason, "too_large");
        assert!(err.message.contains("larger than 65536 bytes"), "{err:?}");
        assert!(resolve("${file:big}", dir.path()).is_err());
        // A value of the bound itself is fine (and a trailing newline is not counted twice).
        std::fs::write(dir.path().join("max"), &big[1..]).unwrap();
        assert_eq!(
            reread("${file:max}", dir.path()).unwrap().len(),
            big.len() - 1
        );
    }
}
