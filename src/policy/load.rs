//! Loading a policy: reading the file (bounded), parsing the YAML and compiling it, with every
//! problem reported as `file:line:col: message`.

use std::fmt;
use std::path::{Path, PathBuf};

use super::{compile, files, raw, Diagnostic, Policy, MAX_POLICY_FILE};

/// Every problem found in one policy file.
#[derive(Debug)]
pub struct PolicyError {
    pub file: PathBuf,
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                d.line,
                d.column,
                d.message
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyError {}

impl Policy {
    /// Reads, parses, resolves and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let fail = |message: String| PolicyError {
            file: path.to_path_buf(),
            diagnostics: vec![Diagnostic {
                line: 1,
                column: 1,
                message,
            }],
        };
        let bytes = files::read(path, MAX_POLICY_FILE).map_err(|e| fail(e.to_string()))?;
        let text = String::from_utf8(bytes).map_err(|_| fail("not UTF-8 text".into()))?;
        Policy::from_yaml(&text, path)
    }

    /// `load` on Tokio's blocking pool, for the policy watch: the files a policy names are
    /// read with blocking calls, each bounded by `files::READ_TIMEOUT`.
    pub async fn load_off_loop(path: &Path) -> Result<Policy, PolicyError> {
        let owned = path.to_path_buf();
        tokio::task::spawn_blocking(move || Policy::load(&owned))
            .await
            .unwrap_or_else(|e| {
                Err(PolicyError {
                    file: path.to_path_buf(),
                    diagnostics: vec![Diagnostic {
                        line: 1,
                        column: 1,
                        message: format!("loading it failed: {e}"),
                    }],
                })
            })
    }

    /// Parses and validates policy text; `path` names it in errors and anchors relative paths.
    pub fn from_yaml(text: &str, path: &Path) -> Result<Policy, PolicyError> {
        let raw: raw::RawPolicy = serde_saphyr::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            let message = parser_message(&e.without_snippet().to_string());
            PolicyError {
                file: path.to_path_buf(),
                diagnostics: vec![Diagnostic {
                    line,
                    column,
                    message,
                }],
            }
        })?;
        compile::compile(raw, path).map_err(|diagnostics| PolicyError {
            file: path.to_path_buf(),
            diagnostics,
        })
    }
}

/// The YAML parser's message without what we print ourselves (the trailing `at line L, column
/// C`) or what speaks to the programmer rather than the policy's author.
fn parser_message(message: &str) -> String {
    let message = match message.rsplit_once(" at line ") {
        Some((head, tail))
            if tail
                .split_once(", column ")
                .is_some_and(|(l, c)| l.parse::<u64>().is_ok() && c.parse::<u64>().is_ok()) =>
        {
            head
        }
        _ => message,
    };
    message
        .replace(", set DuplicateKeyPolicy in Options if acceptable", "")
        .replace("budget breached", "too large or too deeply nested")
}
