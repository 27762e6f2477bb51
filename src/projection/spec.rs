//! Field specs (`a.b`, `items[].x`, `path as name`) parsed, and built into the tree of output
//! members that the projector's plan is compiled from; clashing specs are found as they join.

use std::fmt::Write as _;

use indexmap::IndexMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Segment {
    pub(super) name: String,
    pub(super) array: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FieldSpec {
    path: Vec<Segment>,
    alias: Option<String>,
}

/// Output members of one object level, keyed by output name, in fields-list order; compiled
/// into a [`Plan`] once all specs are in.
#[derive(Debug, Default)]
pub(super) struct Node {
    pub(super) members: IndexMap<String, Member>,
}

#[derive(Debug)]
pub(super) struct Member {
    /// Index of the spec that created this member, to name it in conflict errors.
    pub(super) owner: usize,
    pub(super) kind: MemberKind,
}

#[derive(Debug)]
pub(super) enum MemberKind {
    /// Read from the member of the same name; `next: None` marks a leaf.
    Path { array: bool, next: Option<Node> },
    /// Only at the top level: read from `path`, starting at the document root.
    Alias(Vec<Segment>),
}

/// Why a spec cannot join the mask: it clashes with the spec at index `owner`.
pub(super) struct Conflict {
    pub(super) owner: usize,
    /// Set when both go through this member, one as an array and one as an object;
    /// otherwise one output path equals or is a prefix of the other.
    pub(super) shape: Option<String>,
}

impl FieldSpec {
    pub(super) fn parse(raw: &str) -> Result<FieldSpec, String> {
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

    pub(super) fn render(&self, out: &mut String) {
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
    pub(super) fn insert(&mut self, spec: &FieldSpec, owner: usize) -> Result<(), Conflict> {
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

pub(super) fn check_name(name: &str) -> Result<(), String> {
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
