//! `${env:NAME}` and `${file:PATH}` references in policy values, resolved at load time (and
//! again when a secret file rotates: see `upstream::credential`).

use std::path::{Path, PathBuf};

/// Replaces every `${env:NAME}` and `${file:PATH}` in `value`. Relative file paths are taken
/// from `base_dir` (the policy file's directory). File contents lose one trailing newline, the
/// way `echo secret > file` leaves them.
pub fn resolve(value: &str, base_dir: &Path) -> Result<String, String> {
    resolve_with(value, base_dir, true)
}

/// `resolve` for a secret read again while the sidecar runs: a referenced file that is empty
/// is an error rather than an empty value, because a writer that truncates and then writes
/// leaves it empty for a moment, and the last good value is better than none.
pub fn reread(value: &str, base_dir: &Path) -> Result<String, String> {
    resolve_with(value, base_dir, false)
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

fn resolve_with(value: &str, base_dir: &Path, empty_file_ok: bool) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("`${{` without its `}}` in `{value}`"))?;
        let reference = &after[..end];
        out.push_str(&lookup(reference, base_dir, empty_file_ok)?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn lookup(reference: &str, base_dir: &Path, empty_file_ok: bool) -> Result<String, String> {
    match reference.split_once(':') {
        Some(("env", name)) if !name.is_empty() => std::env::var(name).map_err(|_| {
            format!("environment variable `{name}` is not set (referenced as `${{env:{name}}}`)")
        }),
        Some(("file", path)) if !path.is_empty() => {
            let full = base_dir.join(path);
            let mut text = std::fs::read_to_string(&full).map_err(|e| {
                format!(
                    "cannot read `{}` (referenced as `${{file:{path}}}`): {e}",
                    full.display()
                )
            })?;
            if text.ends_with('\n') {
                text.pop();
                if text.ends_with('\r') {
                    text.pop();
                }
            }
            if text.is_empty() && !empty_file_ok {
                return Err(format!(
                    "`{}` (referenced as `${{file:{path}}}`) is empty",
                    full.display()
                ));
            }
            Ok(text)
        }
        _ => Err(format!(
            "`${{{reference}}}` is not a reference; use `${{env:NAME}}` or `${{file:PATH}}`"
        )),
    }
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
        assert!(resolve("${vault:x}", dir.path()).is_err());
        assert!(resolve("${env:X", dir.path()).is_err());
    }

    #[test]
    fn a_reread_refuses_an_empty_file_and_lists_the_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "\n").unwrap();
        assert_eq!(resolve("a${file:token}", dir.path()).unwrap(), "a");
        let err = reread("a${file:token}", dir.path()).unwrap_err();
        assert!(err.contains("is empty"), "{err}");
        assert_eq!(
            files("${env:X}${file:token}-${file:/abs/key}${file:", dir.path()),
            [dir.path().join("token"), PathBuf::from("/abs/key")]
        );
    }
}
