//! Walking documents through a compiled mask; recursion follows the mask, not the document.

use serde_json::{Map, Value};

use super::{MemberKind, Node, Segment};

impl Node {
    pub(super) fn project_object(&self, object: &Map<String, Value>) -> Map<String, Value> {
        let mut out = Map::with_capacity(self.members.len());
        for (key, member) in &self.members {
            let value = match &member.kind {
                MemberKind::Path { array, next } => object
                    .get(key)
                    .and_then(|value| project_member(*array, next.as_ref(), value)),
                MemberKind::Alias(path) => extract(path, object),
            };
            if let Some(value) = value {
                out.insert(key.clone(), value);
            }
        }
        out
    }
}

fn project_member(array: bool, next: Option<&Node>, value: &Value) -> Option<Value> {
    if !array {
        return project_step(next, value);
    }
    let items = value.as_array()?;
    Some(Value::Array(
        items
            .iter()
            .filter_map(|item| project_step(next, item))
            .collect(),
    ))
}

fn project_step(next: Option<&Node>, value: &Value) -> Option<Value> {
    match next {
        None => is_plain(value).then(|| value.clone()),
        Some(node) => Some(Value::Object(node.project_object(value.as_object()?))),
    }
}

fn extract(path: &[Segment], object: &Map<String, Value>) -> Option<Value> {
    let (segment, rest) = path.split_first()?;
    let value = object.get(&segment.name)?;
    if !segment.array {
        return extract_step(rest, value);
    }
    let items = value.as_array()?;
    Some(Value::Array(
        items
            .iter()
            .filter_map(|item| extract_step(rest, item))
            .collect(),
    ))
}

fn extract_step(rest: &[Segment], value: &Value) -> Option<Value> {
    if rest.is_empty() {
        is_plain(value).then(|| value.clone())
    } else {
        extract(rest, value.as_object()?)
    }
}

/// Scalar, or arrays of plain values. Iterative because leaf values can nest arbitrarily deep.
fn is_plain(value: &Value) -> bool {
    match value {
        Value::Object(_) => return false,
        Value::Array(_) => {}
        _ => return true,
    }
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        match value {
            Value::Object(_) => return false,
            Value::Array(items) => pending.extend(items),
            _ => {}
        }
    }
    true
}
