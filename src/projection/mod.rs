//! Field whitelists: compiles `fields` specs into a mask and projects JSON bodies through it.
//!
//! The projection is the sidecar's data-leak barrier: a member that no spec lists never leaves
//! it, at any depth. Everything here is total over untrusted input: documents and specs are
//! never a reason to panic, and a field missing from a document is simply omitted.
//!
//! # Spec grammar
//!
//! - `a` keeps member `a`; `a.b` keeps member `b` of object `a`, keeping the nesting.
//! - `items[].x` keeps `x` in each element of array `items`. `[]` may close any segment,
//!   including the last one (`tags[]`: an array whose scalar elements are kept).
//! - `path as name` places the value found at `path` at top-level key `name` (a single
//!   segment). Through `[]` it maps: `images[].url as imageUrls` yields `["u1", "u2"]`, and
//!   nested `[]` yield nested arrays.
//! - Segment names are non-empty and made of `[A-Za-z0-9_$@-]`. Whitespace around the spec
//!   and around `as` is ignored.
//!
//! # Semantics (strict whitelist)
//!
//! - A leaf is copied only if its value is *plain*: a scalar, or an array of plain values
//!   (so arrays of arrays of scalars too). An object, or an array holding an object anywhere,
//!   is omitted: listing `seller` must not leak `seller.taxId`; list `seller.name` instead.
//! - Type mismatches omit the member: `a.b` when `a` is not an object, `a[].b` when `a` is
//!   not an array. A container of the expected type is kept even when none of its listed
//!   members exist (`{"a":{}}`), so the output shape does not depend on which members were
//!   present.
//! - Inside `a[].b`, elements that are not objects are dropped, and object elements are kept
//!   (possibly as `{}`) so indexes line up across `a[].b` and `a[].c`. Inside a `tags[]` leaf,
//!   non-plain elements are dropped. Through an alias, elements whose path is missing or not
//!   plain are skipped, since there is no element object left to keep the index.
//! - The top-level document: an object is projected; an array is projected element-wise with
//!   non-object elements dropped; a scalar projects to nothing
//!   ([`ProjectError::NotAnObjectOrArray`]). Optionally a `select` path (dotted member names)
//!   first picks the document out of the body ([`FieldMask::project_selected`]).
//! - Document keys are compared as serde_json reads them (`"us\u0065rId"` is `userId`), and a
//!   key repeated in one object counts with its last value only, as `serde_json::Value` does.
//! - Kept leaves are copied as written (`1.0e2` stays `1.0e2`): the body is never re-encoded.
//!   A body that is not valid JSON (syntax, UTF-8, trailing bytes) fails as a whole, even where
//!   the bad part would have been dropped. Skipped and copied values are checked against the
//!   JSON grammar, not decoded, so what the grammar allows but a `serde_json::Value` cannot
//!   hold passes there: nesting deeper than serde_json's limit of 128, numbers beyond `f64`,
//!   lone surrogate escapes (`"\ud800"`).
//! - Output members appear in the order their first spec appears in the fields list.
//! - Specs whose output paths are equal, or where one is a prefix of the other (`a` and
//!   `a.b`, `x as y` and `y`, `a[].b` and `a.b`), or that disagree on whether a segment is an
//!   array (`a[].b` and `a.c`), are rejected at compile time, naming both specs.

mod project;
#[cfg(test)]
mod tests;

use std::fmt::Write as _;

use indexmap::IndexMap;
use serde_json::Value;

use project::Plan;

/// A `fields` entry that does not parse or that clashes with an earlier entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct FieldSpecError {
    /// The offending spec, trimmed.
    pub field: String,
    pub message: String,
}

/// Why a response body could not be projected.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    #[error("response body is not valid JSON: {0}")]
    InvalidJson(#[from] serde_json::Error),
    #[error("response body is neither a JSON object nor a JSON array")]
    NotAnObjectOrArray,
    /// The `select` path leads nowhere: a step is missing or is not an object.
    #[error("answer has no `{0}` to select")]
    NothingToSelect(String),
}

/// A compiled, immutable field whitelist.
#[derive(Debug, Clone)]
pub struct FieldMask {
    specs: Vec<FieldSpec>,
    plan: Plan,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    name: String,
    array: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldSpec {
    path: Vec<Segment>,
    alias: Option<String>,
}

/// Output members of one object level, keyed by output name, in fields-list order; compiled
/// into a [`Plan`] once all specs are in.
#[derive(Debug, Default)]
struct Node {
    members: IndexMap<String, Member>,
}

#[derive(Debug)]
struct Member {
    /// Index of the spec that created this member, to name it in conflict errors.
    owner: usize,
    kind: MemberKind,
}

#[derive(Debug)]
enum MemberKind {
    /// Read from the member of the same name; `next: None` marks a leaf.
    Path { array: bool, next: Option<Node> },
    /// Only at the top level: read from `path`, starting at the document root.
    Alias(Vec<Segment>),
}

/// Why a spec cannot join the mask: it clashes with the spec at index `owner`.
struct Conflict {
    owner: usize,
    /// Set when both go through this member, one as an array and one as an object;
    /// otherwise one output path equals or is a prefix of the other.
    shape: Option<String>,
}

impl FieldMask {
    /// Compiles a `fields` list; the first bad or conflicting spec is reported.
    pub fn compile<S: AsRef<str>>(fields: &[S]) -> Result<FieldMask, FieldSpecError> {
        let mut specs = Vec::with_capacity(fields.len());
        let mut root = Node::default();
        for (index, raw) in fields.iter().enumerate() {
            let raw = raw.as_ref().trim();
            let error = |message: String| FieldSpecError {
                field: raw.to_owned(),
                message,
            };
            let spec = FieldSpec::parse(raw).map_err(error)?;
            if let Err(conflict) = root.insert(&spec, index) {
                let other = fields.get(conflict.owner).map_or("", |f| f.as_ref().trim());
                let message = match conflict.shape {
                    _ if specs.get(conflict.owner) == Some(&spec) => format!("duplicate of field `{other}`"),
                    Some(name) => format!(
                        "conflicts with field `{other}`: `{name}` is used both as an array and as an object"
                    ),
                    None => format!(
                        "conflicts with field `{other}`: one output path contains the other"
                    ),
                };
                return Err(error(message));
            }
            specs.push(spec);
        }
        let plan = Plan::document(&root);
        Ok(FieldMask { specs, plan })
    }

    /// Projects a response body; see [`FieldMask::project_selected`].
    pub fn project_bytes(&self, body: &[u8]) -> Result<Vec<u8>, ProjectError> {
        self.project_selected(body, None)
    }

    /// Projects the document at `select` (dotted member names, see [`validate_select`]) in a
    /// response body, or the whole body without it. The body is read once, without building a
    /// document tree, and the whole of it is validated.
    pub fn project_selected(
        &self,
        body: &[u8],
        select: Option<&str>,
    ) -> Result<Vec<u8>, ProjectError> {
        project::project(&self.plan, body, select)
    }

    /// Normalized specs in fields-list order, comma-separated. Order is kept because it
    /// decides member order in the output, so it is part of the response shape.
    pub fn canonical(&self) -> String {
        let mut out = String::new();
        for (i, spec) in self.specs.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            spec.render(&mut out);
        }
        out
    }
}

impl FieldSpec {
    fn parse(raw: &str) -> Result<FieldSpec, String> {
        let mut tokens = raw.split_whitespace();
        let (path, alias) = match (tokens.next(), tokens.next(), tokens.next(), tokens.next()) {
            (None, ..) => return Err("empty field spec".to_owned()),
            (Some(path), None, ..) => (path, None),
            (Some(path), Some("as"), Some(alias), None) => (path, Some(alias)),
            _ => return Err("expected `path` or `path as name`".to_owned()),
        };
        let path = path
            .split('.')
            .map(|segment| match segment.strip_suffix("[]") {
                Some(name) => check_name(name).map(|()| Segment {
                    name: name.to_owned(),
                    array: true,
                }),
                None => check_name(segment).map(|()| Segment {
                    name: segment.to_owned(),
                    array: false,
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let alias = match alias {
            Some(alias) if alias.contains(['.', '[', ']']) => {
                return Err(format!(
                    "alias `{alias}` must be a single segment (no `.` or `[]`)"
                ))
            }
            Some(alias) => {
                check_name(alias).map_err(|e| format!("alias: {e}"))?;
                Some(alias.to_owned())
            }
            None => None,
        };
        Ok(FieldSpec { path, alias })
    }

    fn render(&self, out: &mut String) {
        for (i, segment) in self.path.iter().enumerate() {
            if i > 0 {
                out.push('.');
            }
            out.push_str(&segment.name);
            if segment.array {
                out.push_str("[]");
            }
        }
        if let Some(alias) = &self.alias {
            let _ = write!(out, " as {alias}");
        }
    }
}

impl Node {
    fn insert(&mut self, spec: &FieldSpec, owner: usize) -> Result<(), Conflict> {
        if let Some(alias) = &spec.alias {
            return match self.members.get(alias) {
                Some(existing) => Err(overlap(existing.owner)),
                None => {
                    let kind = MemberKind::Alias(spec.path.clone());
                    self.members.insert(alias.clone(), Member { owner, kind });
                    Ok(())
                }
            };
        }
        let Some((leaf, parents)) = spec.path.split_last() else {
            return Ok(());
        };
        let mut node = self;
        for segment in parents {
            let member = node
                .members
                .entry(segment.name.clone())
                .or_insert_with(|| Member {
                    owner,
                    kind: MemberKind::Path {
                        array: segment.array,
                        next: Some(Node::default()),
                    },
                });
            let existing = member.owner;
            match &mut member.kind {
                MemberKind::Path {
                    array,
                    next: Some(child),
                } if *array == segment.array => node = child,
                MemberKind::Path { next: Some(_), .. } => {
                    return Err(Conflict {
                        owner: existing,
                        shape: Some(segment.name.clone()),
                    })
                }
                _ => return Err(overlap(existing)),
            }
        }
        if let Some(existing) = node.members.get(&leaf.name) {
            return Err(overlap(existing.owner));
        }
        let kind = MemberKind::Path {
            array: leaf.array,
            next: None,
        };
        node.members
            .insert(leaf.name.clone(), Member { owner, kind });
        Ok(())
    }
}

fn overlap(owner: usize) -> Conflict {
    Conflict { owner, shape: None }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty segment name".to_owned());
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '@' | '-')))
    {
        None => Ok(()),
        Some('[' | ']') => Err(format!("`[]` may only close a segment, found `{name}`")),
        Some(c) => Err(format!(
            "invalid character {c:?} in `{name}` (allowed: A-Z a-z 0-9 _ $ @ -)"
        )),
    }
}

/// Follows a dotted member path (`data.orders`); `None` if a step is missing, is not an
/// object, or the path is invalid.
pub fn select<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    validate_select(path).ok()?;
    path.split('.')
        .try_fold(doc, |value, name| value.as_object()?.get(name))
}

/// Checks a `select:` path: dotted segment names, no `[]`.
pub fn validate_select(path: &str) -> Result<(), String> {
    if path.contains(['[', ']']) {
        return Err(format!(
            "select path `{path}` must not contain `[]`: it selects members only"
        ));
    }
    path.split('.')
        .try_for_each(check_name)
        .map_err(|e| format!("select path `{path}`: {e}"))
}
