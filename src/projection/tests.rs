//! Tests for field masks: unit cases per rule, and properties that check the whitelist
//! against an oracle derived from the spec strings alone.

use proptest::prelude::*;
use serde_json::{json, Value};

use super::{select, validate_select, FieldMask, FieldSpecError, ProjectError};

fn mask(fields: &[&str]) -> FieldMask {
    match FieldMask::compile(fields) {
        Ok(mask) => mask,
        Err(e) => panic!("{fields:?} should compile: {e}"),
    }
}

fn project(fields: &[&str], doc: Value) -> Value {
    mask(fields).project(&doc).expect("object or array")
}

fn compile_err(fields: &[&str]) -> FieldSpecError {
    match FieldMask::compile(fields) {
        Ok(mask) => panic!("{fields:?} should not compile, got {mask:?}"),
        Err(e) => e,
    }
}

#[test]
fn keeps_listed_members_in_fields_order() {
    let out = project(&["b", "a"], json!({"a": 1, "b": "x", "secret": true}));
    assert_eq!(out.to_string(), r#"{"b":"x","a":1}"#);
}

#[test]
fn missing_fields_are_omitted() {
    assert_eq!(
        project(&["a", "b.c", "d[].e"], json!({"a": null})),
        json!({"a": null})
    );
}

#[test]
fn nested_paths_keep_nesting_and_merge_siblings() {
    let doc = json!({"a": {"b": 1, "c": 2, "secret": 3}, "z": 4});
    assert_eq!(
        project(&["a.b", "a.c"], doc),
        json!({"a": {"b": 1, "c": 2}})
    );
}

#[test]
fn member_order_follows_first_mention() {
    let doc = json!({"a": {"b": 1, "d": 2}, "c": 3});
    let out = project(&["a.d", "c", "a.b"], doc);
    assert_eq!(out.to_string(), r#"{"a":{"d":2,"b":1},"c":3}"#);
}

#[test]
fn container_without_listed_members_stays_empty() {
    assert_eq!(project(&["a.b"], json!({"a": {"x": 1}})), json!({"a": {}}));
}

#[test]
fn object_at_leaf_is_omitted() {
    let doc = json!({"seller": {"name": "Bob", "taxId": 1}, "ok": 1});
    assert_eq!(project(&["seller", "ok"], doc.clone()), json!({"ok": 1}));
    assert_eq!(
        project(&["seller.name"], doc),
        json!({"seller": {"name": "Bob"}})
    );
}

#[test]
fn leaf_arrays_are_kept_only_without_objects() {
    let doc = json!({
        "tags": ["a", 1, null, true],
        "grid": [[1, 2], [], [[3]]],
        "mixed": [1, {"secret": 1}],
        "deep": [[1, [{"secret": 1}]]],
    });
    let out = project(&["tags", "grid", "mixed", "deep"], doc);
    assert_eq!(
        out,
        json!({"tags": ["a", 1, null, true], "grid": [[1, 2], [], [[3]]]})
    );
}

#[test]
fn type_mismatches_are_omitted() {
    let doc = json!({"s": 1, "t": "x", "arr": [{"b": 1}], "obj": {"b": 1}, "n": null});
    let fields = ["s.b", "arr.b", "obj[].b", "n.b", "t[]"];
    assert_eq!(project(&fields, doc), json!({}));
}

#[test]
fn array_elements_are_projected() {
    let doc =
        json!({"items": [{"x": 1, "y": 2, "secret": 3}, {"y": 4}, 5, null, [6], {"x": {"k": 1}}]});
    let out = project(&["items[].x", "items[].y"], doc);
    assert_eq!(out, json!({"items": [{"x": 1, "y": 2}, {"y": 4}, {}]}));
}

#[test]
fn array_leaf_keeps_plain_elements() {
    let doc = json!({"tags": ["a", {"secret": 1}, [1, 2], [{"secret": 2}], null]});
    assert_eq!(
        project(&["tags[]"], doc),
        json!({"tags": ["a", [1, 2], null]})
    );
}

#[test]
fn nested_arrays() {
    let doc = json!({"a": [{"b": [{"c": 1, "d": 2}, 3]}, {"b": "no"}, {"e": 1}]});
    assert_eq!(
        project(&["a[].b[].c"], doc),
        json!({"a": [{"b": [{"c": 1}]}, {}, {}]})
    );
}

#[test]
fn alias_flattens_to_top_level() {
    let doc = json!({"id": 7, "seller": {"name": "Bob", "taxId": 1}});
    let out = project(&["id", "seller.name as sellerName"], doc);
    assert_eq!(out.to_string(), r#"{"id":7,"sellerName":"Bob"}"#);
}

#[test]
fn alias_keeps_fields_order_among_members() {
    let doc = json!({"a": 1, "b": {"c": 2}, "d": 3});
    let out = project(&["d", "b.c as bc", "a"], doc);
    assert_eq!(out.to_string(), r#"{"d":3,"bc":2,"a":1}"#);
}

#[test]
fn alias_maps_through_arrays_and_skips_missing() {
    let doc =
        json!({"images": [{"url": "u1"}, {"alt": "x"}, 3, {"url": "u2"}, {"url": {"secret": 1}}]});
    assert_eq!(
        project(&["images[].url as imageUrls"], doc),
        json!({"imageUrls": ["u1", "u2"]})
    );
}

#[test]
fn alias_through_nested_arrays_nests() {
    let doc = json!({"a": [{"b": [{"c": 1}, {"c": 2}]}, {"b": []}, {"b": 1}, {"x": 1}]});
    assert_eq!(
        project(&["a[].b[].c as cs"], doc),
        json!({"cs": [[1, 2], []]})
    );
}

#[test]
fn alias_of_object_or_missing_is_omitted() {
    let doc = json!({"seller": {"name": "Bob"}, "tags": [1, {"k": 1}]});
    let out = project(
        &["seller as s", "nope.x as n", "tags as t", "tags[] as u"],
        doc,
    );
    assert_eq!(out, json!({"u": [1]}));
}

#[test]
fn alias_rename_of_top_level_member() {
    assert_eq!(
        project(&["a as b"], json!({"a": 1, "b": 2})),
        json!({"b": 1})
    );
}

#[test]
fn top_level_array_is_projected_element_wise() {
    let doc = json!([{"a": 1, "s": 2}, 3, "x", {"b": 1}, [{"a": 1}]]);
    assert_eq!(project(&["a"], doc), json!([{"a": 1}, {}]));
}

#[test]
fn top_level_scalar_projects_to_nothing() {
    let mask = mask(&["a"]);
    for doc in [json!(1), json!("a"), json!(null), json!(true)] {
        assert_eq!(mask.project(&doc), None);
    }
}

#[test]
fn project_bytes() {
    let mask = mask(&["a", "b.c as c"]);
    let out = mask
        .project_bytes(br#"{"x": 1, "b": {"c": [1]}, "a": "y"}"#)
        .expect("valid");
    assert_eq!(out, br#"{"a":"y","c":[1]}"#);
    assert!(matches!(
        mask.project_bytes(b"{\"a\": "),
        Err(ProjectError::InvalidJson(_))
    ));
    assert!(matches!(
        mask.project_bytes(b""),
        Err(ProjectError::InvalidJson(_))
    ));
    assert!(matches!(
        mask.project_bytes(b"\"a\""),
        Err(ProjectError::NotAnObjectOrArray)
    ));
}

#[test]
fn empty_mask_keeps_nothing() {
    assert_eq!(project(&[], json!({"a": 1})), json!({}));
}

#[test]
fn whitespace_is_tolerated_and_canonical_is_normalized() {
    let m = mask(&["  a.b  ", "items[].x\tas   xs ", "as"]);
    assert_eq!(m.canonical(), "a.b,items[].x as xs,as");
    assert_eq!(
        m.project(&json!({"a": {"b": 1}, "items": [{"x": 2}], "as": 3})),
        Some(json!({"a": {"b": 1}, "xs": [2], "as": 3}))
    );
    assert_eq!(mask(&[] as &[&str]).canonical(), "");
}

#[test]
fn bad_specs_are_rejected_with_the_spec_named() {
    let cases = [
        ("", "empty field spec"),
        ("   ", "empty field spec"),
        ("a.", "empty segment name"),
        (".a", "empty segment name"),
        ("a..b", "empty segment name"),
        ("[]", "empty segment name"),
        ("items[]x", "`[]` may only close a segment"),
        ("a[][]", "`[]` may only close a segment"),
        ("a[0]", "`[]` may only close a segment"),
        ("a b", "expected `path` or `path as name`"),
        ("a as", "expected `path` or `path as name`"),
        ("a as b c", "expected `path` or `path as name`"),
        ("a. b", "expected `path` or `path as name`"),
        ("a as b.c", "must be a single segment"),
        ("a as b[]", "must be a single segment"),
        ("a as b!", "invalid character '!'"),
        ("a/b", "invalid character '/'"),
        ("ä", "invalid character 'ä'"),
    ];
    for (spec, expected) in cases {
        let err = compile_err(&["ok", spec]);
        assert_eq!(err.field, spec.trim(), "{spec:?}");
        assert!(err.message.contains(expected), "{spec:?}: {err}");
    }
    assert_eq!(
        compile_err(&[" items[]x "]).to_string(),
        "field `items[]x`: `[]` may only close a segment, found `items[]x`"
    );
}

#[test]
fn allowed_segment_characters() {
    let m = mask(&["A-z_0$@9.x[]"]);
    assert_eq!(
        m.project(&json!({"A-z_0$@9": {"x": [1]}})),
        Some(json!({"A-z_0$@9": {"x": [1]}}))
    );
}

#[test]
fn conflicts_are_rejected_naming_both_specs() {
    let cases: [(&[&str], &str); 13] = [
        (&["a", "a"], "duplicate of field `a`"),
        (&["a", " a "], "duplicate of field `a`"),
        (&["a", "a.b"], "conflicts with field `a`"),
        (&["a.b", "a"], "conflicts with field `a.b`"),
        (&["a.b.c", "a.b"], "conflicts with field `a.b.c`"),
        (&["x as y", "y"], "conflicts with field `x as y`"),
        (&["y", "x as y"], "conflicts with field `y`"),
        (&["y.z", "x as y"], "conflicts with field `y.z`"),
        (&["x as y", "y.z"], "conflicts with field `x as y`"),
        (&["x as y", "z as y"], "conflicts with field `x as y`"),
        (
            &["a[].b", "a.b"],
            "`a` is used both as an array and as an object",
        ),
        (&["a[].b", "a.c"], "conflicts with field `a[].b`"),
        (&["tags[]", "tags"], "conflicts with field `tags[]`"),
    ];
    for (fields, expected) in cases {
        let err = compile_err(fields);
        assert_eq!(err.field, fields[1].trim(), "{fields:?}");
        assert!(err.message.contains(expected), "{fields:?}: {err}");
    }
    // Same input read twice under different output names is fine.
    mask(&["a", "a as b", "a as c", "x.y", "x.z", "p[].q", "p[].r.s"]);
}

#[test]
fn select_follows_member_paths() {
    let doc = json!({"data": {"orders": [1, 2], "n": null}, "list": [{"a": 1}]});
    assert_eq!(select(&doc, "data.orders"), Some(&json!([1, 2])));
    assert_eq!(select(&doc, "data"), Some(&doc["data"]));
    assert_eq!(select(&doc, "data.n"), Some(&Value::Null));
    assert_eq!(select(&doc, "data.missing"), None);
    assert_eq!(select(&doc, "data.orders.x"), None);
    assert_eq!(select(&doc, "list.a"), None);
    assert_eq!(select(&doc, "list[].a"), None);
    assert_eq!(select(&doc, ""), None);
    assert_eq!(select(&json!(3), "a"), None);
}

#[test]
fn validate_select_paths() {
    assert_eq!(validate_select("data.orders"), Ok(()));
    assert_eq!(validate_select("$meta.@id-x_1"), Ok(()));
    for bad in ["", "a.", ".a", "a..b", "a[]", "a[].b", "a b", "a/b"] {
        assert!(validate_select(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn mask_is_shareable() {
    fn check<T: Send + Sync + Clone + std::fmt::Debug + 'static>() {}
    check::<FieldMask>();
    check::<FieldSpecError>();
}

// ---- properties ----

const KEYS: [&str; 5] = ["a", "b", "c", "d", "secret"];

fn json_doc() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-5i64..5).prop_map(Value::from),
        "[a-z]{0,2}".prop_map(Value::String),
    ];
    let any_value = leaf.prop_recursive(4, 64, 5, |inner| {
        prop_oneof![
            1 => prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            2 => object_of(inner),
        ]
    });
    prop_oneof![
        3 => object_of(any_value.clone()),
        1 => prop::collection::vec(any_value.clone(), 0..4).prop_map(Value::Array),
        1 => any_value,
    ]
}

fn object_of(values: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
    prop::collection::vec((prop::sample::select(&KEYS[..]), values), 0..6).prop_map(|members| {
        Value::Object(
            members
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        )
    })
}

/// Random specs over the same keys as the documents (never `secret`), each of which
/// compiles together with the ones kept before it.
fn field_list(aliases: bool) -> impl Strategy<Value = Vec<String>> {
    let segment =
        (prop::sample::select(&KEYS[..4]), prop::bool::weighted(0.3)).prop_map(|(name, array)| {
            if array {
                format!("{name}[]")
            } else {
                name.to_owned()
            }
        });
    let alias = if aliases {
        prop::option::weighted(0.3, prop::sample::select(vec!["a", "b", "x", "y"])).boxed()
    } else {
        Just(None).boxed()
    };
    let spec = (prop::collection::vec(segment, 1..4), alias).prop_map(|(path, alias)| {
        let path = path.join(".");
        match alias {
            Some(alias) => format!("{path} as {alias}"),
            None => path,
        }
    });
    prop::collection::vec(spec, 0..8).prop_map(|candidates| {
        let mut kept: Vec<String> = Vec::new();
        for candidate in candidates {
            kept.push(candidate);
            if FieldMask::compile(&kept).is_err() {
                kept.pop();
            }
        }
        kept
    })
}

/// Output position tokens of a spec, parsed independently of the module: member names, with
/// `[]` as its own token; an alias is a single top-level name.
fn output_tokens(spec: &str) -> Vec<String> {
    if let Some((_, alias)) = spec.split_once(" as ") {
        return vec![alias.trim().to_owned()];
    }
    let mut tokens = Vec::new();
    for segment in spec.trim().split('.') {
        match segment.strip_suffix("[]") {
            Some(name) => {
                tokens.push(name.to_owned());
                tokens.push("[]".to_owned());
            }
            None => tokens.push(segment.to_owned()),
        }
    }
    tokens
}

struct Oracle {
    /// Output token paths of every spec, from which all positions derive. A path is the
    /// *leaf* of its spec: anything below it may only be arrays and scalars.
    leaves: Vec<Vec<String>>,
}

impl Oracle {
    /// Inside a leaf value: the leaf itself or any depth of array elements under it.
    fn in_leaf(&self, pos: &[String]) -> bool {
        self.leaves.iter().any(|leaf| {
            pos.len() >= leaf.len()
                && pos[..leaf.len()] == leaf[..]
                && pos[leaf.len()..].iter().all(|t| t == "[]")
        })
    }

    /// An object may appear only at the root or where some spec continues with a member name.
    fn object_allowed(&self, pos: &[String]) -> bool {
        pos.is_empty()
            || self.leaves.iter().any(|leaf| {
                leaf.len() > pos.len() && leaf[..pos.len()] == *pos && leaf[pos.len()] != "[]"
            })
    }

    fn array_allowed(&self, pos: &[String]) -> bool {
        self.in_leaf(pos)
            || self.leaves.iter().any(|leaf| {
                leaf.len() > pos.len() && leaf[..pos.len()] == *pos && leaf[pos.len()] == "[]"
            })
    }

    fn check(&self, value: &Value, pos: &mut Vec<String>) -> Result<(), String> {
        match value {
            Value::Object(members) => {
                if !self.object_allowed(pos) {
                    return Err(format!("object at {pos:?}"));
                }
                for (key, child) in members {
                    if key == "secret" {
                        return Err(format!("secret at {pos:?}"));
                    }
                    pos.push(key.clone());
                    let allowed = self.leaves.iter().any(|leaf| leaf.starts_with(pos));
                    if !allowed {
                        return Err(format!("key path {pos:?} not whitelisted"));
                    }
                    self.check(child, pos)?;
                    pos.pop();
                }
            }
            Value::Array(items) => {
                if !self.array_allowed(pos) {
                    return Err(format!("array at {pos:?}"));
                }
                pos.push("[]".to_owned());
                for item in items {
                    self.check(item, pos)?;
                }
                pos.pop();
            }
            _ if self.in_leaf(pos) => {}
            _ => return Err(format!("scalar at non-leaf {pos:?}")),
        }
        Ok(())
    }
}

fn check_output(fields: &[String], out: &Value) -> Result<(), String> {
    let oracle = Oracle {
        leaves: fields.iter().map(|f| output_tokens(f)).collect(),
    };
    match out {
        // The top-level array holds projected root objects, at the root position.
        Value::Array(items) => items.iter().try_for_each(|item| match item {
            Value::Object(_) => oracle.check(item, &mut Vec::new()),
            _ => Err("non-object top-level element".to_owned()),
        }),
        Value::Object(_) => oracle.check(out, &mut Vec::new()),
        _ => Err("scalar output".to_owned()),
    }
}

fn is_plain(value: &Value) -> bool {
    match value {
        Value::Object(_) => false,
        Value::Array(items) => items.iter().all(is_plain),
        _ => true,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn output_only_holds_whitelisted_paths(doc in json_doc(), fields in field_list(true)) {
        let mask = FieldMask::compile(&fields).map_err(|e| TestCaseError::fail(e.to_string()))?;
        match mask.project(&doc) {
            None => prop_assert!(!doc.is_object() && !doc.is_array()),
            Some(out) => {
                if let Err(e) = check_output(&fields, &out) {
                    return Err(TestCaseError::fail(format!("{e}\nfields {fields:?}\ndoc {doc}\nout {out}")));
                }
            }
        }
    }

    #[test]
    fn projection_is_idempotent_without_aliases(doc in json_doc(), fields in field_list(false)) {
        let mask = FieldMask::compile(&fields).map_err(|e| TestCaseError::fail(e.to_string()))?;
        if let Some(out) = mask.project(&doc) {
            prop_assert_eq!(mask.project(&out), Some(out));
        }
    }

    #[test]
    fn plain_values_on_member_paths_survive(doc in json_doc(), fields in field_list(true)) {
        let mask = FieldMask::compile(&fields).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let out = mask.project(&doc);
        for field in fields.iter().filter(|f| !f.contains('[')) {
            let (path, key) = match field.split_once(" as ") {
                Some((path, alias)) => (path, format!("/{alias}")),
                None => (field.as_str(), format!("/{}", field.replace('.', "/"))),
            };
            let pointer = format!("/{}", path.replace('.', "/"));
            if let Some(value) = doc.pointer(&pointer).filter(|v| is_plain(v)) {
                let out = out.as_ref().and_then(|o| o.pointer(&key));
                prop_assert_eq!(out, Some(value), "field {}", field);
            }
        }
    }
}
