//! The projector: one pass of serde_json's parser over the body's bytes, copying kept values as
//! written and skipping the rest, so no document tree is built and nothing is re-encoded.
//!
//! A compiled [`Plan`] drives serde's visitors. A listed leaf is taken as a [`RawValue`] (its
//! bytes, validated) and copied if plain; a listed object or array is walked in place by the same
//! parser; every other value is skipped with [`IgnoredAny`], which serde_json still validates, so
//! a bad body fails as a whole. Recursion follows the plan, never the document: skipped and
//! copied values are consumed by serde_json's iterative skipping, so however deep a document
//! nests, the stack only grows with the mask (and serde_json's own depth limit stays in force).
//!
//! Output goes to one buffer. Members must come out in fields order, not document order, so an
//! object's kept members are only noted while it is read (a slice of the body, or a range
//! already written for a nested value) and the object is assembled at its end, then moved back
//! over the scratch bytes its nested values used: every value is written in place, where its
//! enclosing array or the answer needs it.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize as _;
use serde_json::value::RawValue;

use super::spec::{validate_select, MemberKind, Node, Segment};

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

/// How a value read from the document becomes output; compiled once per mask.
#[derive(Debug, Clone)]
pub(super) enum Plan {
    /// Copied as written if plain (see [`is_plain`]).
    Leaf,
    /// An array: each element through the inner plan, elements that give nothing dropped.
    Each(Box<Plan>),
    /// An object: its listed members.
    Object(Level),
    /// An object: the value of one member, through the inner plan (the rest of an alias path).
    Member(Box<str>, Box<Plan>),
    /// The top level: an object through the inner plan, or an array of them.
    Document(Box<Plan>),
}

/// One object level of the mask.
#[derive(Debug, Clone, Default)]
pub(super) struct Level {
    /// `"name":` of each output member, in fields order. Names are restricted to
    /// `[A-Za-z0-9_$@-]` at compile time, so they need no escaping.
    keys: Vec<Box<[u8]>>,
    /// The document members read at this level, each with the output members it feeds.
    reads: Vec<Read>,
}

#[derive(Debug, Clone)]
struct Read {
    name: Box<str>,
    /// (output index, plan). More than one only at the top level, where aliases can read a
    /// member that a path or another alias reads too.
    feeds: Vec<(usize, Plan)>,
}

impl Plan {
    pub(super) fn document(root: &Node) -> Plan {
        Plan::Document(Box::new(Plan::Object(Level::of(root))))
    }
}

impl Level {
    fn of(node: &Node) -> Level {
        let mut level = Level::default();
        for (index, (name, member)) in node.members.iter().enumerate() {
            level.keys.push(format!("\"{name}\":").into_bytes().into());
            let (read, plan) = match &member.kind {
                MemberKind::Path { array, next } => {
                    let step = next
                        .as_ref()
                        .map_or(Plan::Leaf, |node| Plan::Object(Level::of(node)));
                    (name.as_str(), each_if(*array, step))
                }
                MemberKind::Alias(path) => match path.split_first() {
                    Some((first, rest)) => (first.name.as_str(), alias(first.array, rest)),
                    None => continue,
                },
            };
            match level.reads.iter_mut().find(|r| *r.name == *read) {
                Some(existing) => existing.feeds.push((index, plan)),
                None => level.reads.push(Read {
                    name: read.into(),
                    feeds: vec![(index, plan)],
                }),
            }
        }
        level
    }
}

/// The plan for a value an alias reaches, `rest` being the path still to follow below it.
fn alias(array: bool, rest: &[Segment]) -> Plan {
    let step = match rest.split_first() {
        None => Plan::Leaf,
        Some((next, rest)) => {
            Plan::Member(next.name.as_str().into(), Box::new(alias(next.array, rest)))
        }
    };
    each_if(array, step)
}

fn each_if(array: bool, plan: Plan) -> Plan {
    if array {
        Plan::Each(Box::new(plan))
    } else {
        plan
    }
}

/// Projects `body` (or its member at `select`) through `plan`, a [`Plan::Document`].
pub(super) fn project(
    plan: &Plan,
    body: &[u8],
    select: Option<&str>,
) -> Result<Vec<u8>, ProjectError> {
    // Checked up front so that skipped strings are valid UTF-8 too, as a `Value` parse demands.
    let text = std::str::from_utf8(body).map_err(|e| {
        let at = e.valid_up_to();
        ProjectError::InvalidJson(de::Error::custom(format_args!(
            "invalid UTF-8 at byte {at}"
        )))
    })?;
    let mut de = serde_json::Deserializer::from_str(text);
    let mut writer = Writer {
        out: Vec::with_capacity(text.len() / 2),
        slots: Vec::new(),
    };
    let writer_ref = &mut writer;
    let found = match select {
        None => Ok(Apply {
            writer: writer_ref,
            plan,
        }
        .deserialize(&mut de)?),
        Some(path) if validate_select(path).is_ok() => Select {
            writer: writer_ref,
            path,
            plan,
        }
        .deserialize(&mut de)?
        .ok_or(path),
        Some(path) => {
            IgnoredAny::deserialize(&mut de)?;
            Err(path)
        }
    };
    // Trailing bytes make the body invalid whatever was found before them.
    de.end()?;
    let piece = found
        .map_err(|path| ProjectError::NothingToSelect(path.to_owned()))?
        .ok_or(ProjectError::NotAnObjectOrArray)?;
    let mut out = writer.out;
    Ok(match piece {
        Piece::Raw(raw) => raw.as_bytes().to_vec(),
        Piece::Written(from, to) => {
            out.truncate(to);
            out.drain(..from);
            out
        }
    })
}

/// A projected value: where its output bytes are.
#[derive(Debug, Clone, Copy)]
enum Piece<'de> {
    /// A slice of the body, to copy.
    Raw(&'de str),
    /// Already written to the output, at this range, which ends where the output ends.
    Written(usize, usize),
}

struct Writer<'de> {
    out: Vec<u8>,
    /// The kept members of the objects being read, a stack: each open object owns one slot per
    /// output member above the slots of the objects enclosing it.
    slots: Vec<Option<Piece<'de>>>,
}

/// Reads one value through a plan; `None` when it gives nothing (missing, wrong type, not
/// plain), having written nothing.
struct Apply<'a, 'de> {
    writer: &'a mut Writer<'de>,
    plan: &'a Plan,
}

impl<'de> DeserializeSeed<'de> for Apply<'_, 'de> {
    type Value = Option<Piece<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        if let Plan::Leaf = self.plan {
            let raw = <&RawValue>::deserialize(deserializer)?.get();
            return Ok(is_plain(raw).then_some(Piece::Raw(raw)));
        }
        deserializer.deserialize_any(self)
    }
}

/// A scalar where a container was expected gives nothing.
macro_rules! scalars_give_nothing {
    () => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    };
}

impl<'de> Visitor<'de> for Apply<'_, 'de> {
    type Value = Option<Piece<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        match self.plan {
            Plan::Object(level) => object(self.writer, level, map),
            Plan::Member(name, plan) => member(self.writer, name, plan, map),
            Plan::Document(plan) => Apply {
                writer: self.writer,
                plan,
            }
            .visit_map(map),
            Plan::Leaf | Plan::Each(_) => skip_map(map),
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        match self.plan {
            Plan::Each(plan) | Plan::Document(plan) => each(self.writer, plan, seq),
            Plan::Leaf | Plan::Object(_) | Plan::Member(..) => skip_seq(seq),
        }
    }

    scalars_give_nothing!();
}

fn object<'de, A: MapAccess<'de>>(
    writer: &mut Writer<'de>,
    level: &Level,
    mut map: A,
) -> Result<Option<Piece<'de>>, A::Error> {
    let start = writer.out.len();
    let base = writer.slots.len();
    writer.slots.resize(base + level.keys.len(), None);
    let read_of = |key: &str| level.reads.iter().find(|r| *r.name == *key);
    while let Some(read) = map.next_key_seed(Key(read_of))? {
        let Some(read) = read else {
            map.next_value::<IgnoredAny>()?;
            continue;
        };
        // A repeated key overwrites its slot: the last value counts.
        if let [(slot, plan)] = &read.feeds[..] {
            let piece = map.next_value_seed(Apply { writer, plan })?;
            writer.slots[base + slot] = piece;
            continue;
        }
        // Several outputs read this member: keep its text and read it once for each.
        let raw = map.next_value::<&RawValue>()?.get();
        for (slot, plan) in &read.feeds {
            let mut de = serde_json::Deserializer::from_str(raw);
            let piece = Apply { writer, plan }
                .deserialize(&mut de)
                .and_then(|piece| de.end().map(|()| piece))
                .map_err(de::Error::custom)?;
            writer.slots[base + slot] = piece;
        }
    }
    let Writer { out, slots } = writer;
    let at = out.len();
    out.push(b'{');
    for (key, slot) in level.keys.iter().zip(&slots[base..]) {
        let Some(piece) = *slot else { continue };
        if out.len() > at + 1 {
            out.push(b',');
        }
        out.extend_from_slice(key);
        match piece {
            Piece::Raw(raw) => out.extend_from_slice(raw.as_bytes()),
            Piece::Written(from, to) => out.extend_from_within(from..to),
        }
    }
    out.push(b'}');
    slots.truncate(base);
    if at > start {
        out.copy_within(at.., start);
        out.truncate(out.len() - (at - start));
    }
    Ok(Some(Piece::Written(start, out.len())))
}

fn member<'de, A: MapAccess<'de>>(
    writer: &mut Writer<'de>,
    name: &str,
    plan: &Plan,
    map: A,
) -> Result<Option<Piece<'de>>, A::Error> {
    let found = last_member(writer, name, map, |map, writer| {
        map.next_value_seed(Apply { writer, plan })
    })?;
    Ok(found.flatten())
}

/// What `take` makes of the last member called `name` in `map`, `None` without one; the other
/// members are skipped. What an earlier duplicate wrote is dropped: the last one wins, as in a
/// `serde_json::Value`.
fn last_member<'de, A: MapAccess<'de>, T>(
    writer: &mut Writer<'de>,
    name: &str,
    mut map: A,
    mut take: impl FnMut(&mut A, &mut Writer<'de>) -> Result<T, A::Error>,
) -> Result<Option<T>, A::Error> {
    let start = writer.out.len();
    let mut found = None;
    while let Some(hit) = map.next_key_seed(Key(|key: &str| key == name))? {
        if !hit {
            map.next_value::<IgnoredAny>()?;
            continue;
        }
        writer.out.truncate(start);
        found = Some(take(&mut map, writer)?);
    }
    Ok(found)
}

fn each<'de, A: SeqAccess<'de>>(
    writer: &mut Writer<'de>,
    plan: &Plan,
    mut seq: A,
) -> Result<Option<Piece<'de>>, A::Error> {
    let start = writer.out.len();
    writer.out.push(b'[');
    loop {
        let before = writer.out.len();
        if before > start + 1 {
            writer.out.push(b',');
        }
        match seq.next_element_seed(Apply {
            writer: &mut *writer,
            plan,
        })? {
            None => {
                writer.out.truncate(before);
                break;
            }
            Some(None) => writer.out.truncate(before),
            Some(Some(Piece::Raw(raw))) => writer.out.extend_from_slice(raw.as_bytes()),
            Some(Some(Piece::Written(..))) => {}
        }
    }
    writer.out.push(b']');
    Ok(Some(Piece::Written(start, writer.out.len())))
}

fn skip_map<'de, A: MapAccess<'de>, T>(mut map: A) -> Result<Option<T>, A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(None)
}

fn skip_seq<'de, A: SeqAccess<'de>, T>(mut seq: A) -> Result<Option<T>, A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(None)
}

/// Reads an object key (unescaped only if it has escapes) and hands it to the closure.
struct Key<F>(F);

impl<'de, F: FnOnce(&str) -> T, T> DeserializeSeed<'de> for Key<F> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<T, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de, F: FnOnce(&str) -> T, T> Visitor<'de> for Key<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<T, E> {
        Ok((self.0)(key))
    }
}

/// Follows a `select` path, then reads the value there through the plan. `None` when a step is
/// missing or not an object.
struct Select<'a, 'de> {
    writer: &'a mut Writer<'de>,
    path: &'a str,
    plan: &'a Plan,
}

impl<'de> DeserializeSeed<'de> for Select<'_, 'de> {
    type Value = Option<Option<Piece<'de>>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Select<'_, 'de> {
    type Value = Option<Option<Piece<'de>>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let Select { writer, path, plan } = self;
        let (name, rest) = match path.split_once('.') {
            Some((name, rest)) => (name, Some(rest)),
            None => (path, None),
        };
        let found = last_member(writer, name, map, |map, writer| match rest {
            None => map.next_value_seed(Apply { writer, plan }).map(Some),
            Some(path) => map.next_value_seed(Select { writer, path, plan }),
        })?;
        Ok(found.flatten())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq)
    }

    scalars_give_nothing!();
}

/// A leaf is plain when no object appears anywhere in it: `{` outside strings. The text was
/// validated as it was read, so tracking strings and escapes is enough.
fn is_plain(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    match bytes.first() {
        Some(b'{') => return false,
        Some(b'[') if bytes.contains(&b'{') => {}
        _ => return true,
    }
    let mut in_string = false;
    let mut escaped = false;
    for &byte in bytes {
        match (in_string, byte) {
            (true, _) if escaped => escaped = false,
            (true, b'\\') => escaped = true,
            (true, b'"') | (false, b'"') => in_string = !in_string,
            (false, b'{') => return false,
            _ => {}
        }
    }
    true
}
