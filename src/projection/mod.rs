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
mod spec;
#[cfg(test)]
mod tests;

use serde_json::Value;

use project::Plan;
pub use project::ProjectError;
pub use spec::validate_select;
use spec::{FieldSpec, Node};

/// A `fields` entry that does not parse or that clashes with an earlier entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct FieldSpecError {
    /// The offending spec, trimmed.
    pub field: String,
    pub message: String,
}

/// A compiled, immutable field whitelist.
#[derive(Debug, Clone)]
pub struct FieldMask {
    specs: Vec<FieldSpec>,
    plan: Plan,
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

/// Follows a dotted member path (`data.orders`); `None` if a step is missing, is not an
/// object, or the path is invalid.
pub fn select<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    validate_select(path).ok()?;
    path.split('.')
        .try_fold(doc, |value, name| value.as_object()?.get(name))
}
