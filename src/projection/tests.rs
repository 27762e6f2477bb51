//! Tests for field masks: unit cases per rule, hostile bodies, and properties that check the
//! whitelist against an oracle derived from the spec strings alone, on documents built as
//! values and on JSON text spelt the ways servers spell it.

use proptest::prelude::*;
use serde_json::{json, Value};

use super::{select, validate_select, FieldMask, FieldSpecError, ProjectError};

impl FieldMask {
    /// The projection of a document through the byte projector; `None` for a scalar.
    fn project(&self, doc: &Value) -> Option<Value> {
        match self.project_bytes(doc.to_string().as_bytes()) {
            Ok(out) => Some(parse(&out)),
            Err(ProjectError::NotAnObjectOrArray) => None,
            Err(e) => panic!("{doc} should project: {e}"),
        }
    }
}

fn parse(out: &[u8]) -> Value {
    match serde_json::from_slice(out) {
        Ok(value) => value,
        Err(e) => panic!("output {:?} is not JSON: {e}", String::from_utf8_lossy(out)),
    }
}

fn project_text(fields: &[&str], body: &str) -> String {
    match mask(fields).project_bytes(body.as_bytes()) {
        Ok(out) => String::from_utf8(out).expect("UTF-8 output"),
        Err(e) => panic!("{body:?} should project: {e}"),
    }
}

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
fn select_picks_the_document_first() {
    let mask = mask(&["a"]);
    let body = br#"{"data": {"list": [{"a": 1, "s": 2}, 3]}, "other": {"a": 9}}"#;
    let projected = |select: &str| {
        mask.project_selected(body, Some(select))
            .map(|out| String::from_utf8_lossy(&out).into_owned())
    };
    assert_eq!(projected("data.list").expect("found"), r#"[{"a":1}]"#);
    assert_eq!(projected("other").expect("found"), r#"{"a":9}"#);
    for missing in [
        "nope",
        "data.nope",
        "data.list.a",
        "other.a.b",
        "",
        "data[]",
        "data..list",
    ] {
        match projected(missing) {
            Err(e @ ProjectError::NothingToSelect(_)) => {
                assert_eq!(
                    e.to_string(),
                    format!("answer has no `{missing}` to select")
                );
            }
            other => panic!("{missing:?}: {other:?}"),
        }
    }
    assert!(matches!(
        projected("other.a"),
        Err(ProjectError::NotAnObjectOrArray)
    ));
    // The last of repeated keys counts along the path too; the body is validated past it.
    let repeated = br#"{"d": {"a": 1}, "d": 2}"#;
    assert!(matches!(
        mask.project_selected(repeated, Some("d")),
        Err(ProjectError::NotAnObjectOrArray)
    ));
    let repeated = br#"{"d": 2, "d": {"a": 1, "b": 2}}"#;
    assert_eq!(
        mask.project_selected(repeated, Some("d")).expect("found"),
        br#"{"a":1}"#
    );
    for bad in [
        &br#"{"d": {"a": 1}} x"#[..],
        br#"{"x": [1,,2], "d": {}}"#,
        br#"{"d": {}"#,
    ] {
        assert!(matches!(
            mask.project_selected(bad, Some("d")),
            Err(ProjectError::InvalidJson(_))
        ));
        assert!(matches!(
            mask.project_selected(bad, Some("nope")),
            Err(ProjectError::InvalidJson(_))
        ));
    }
}

#[test]
fn invalid_json_anywhere_fails_the_body() {
    let mask = mask(&["a"]);
    let cases: [&[u8]; 9] = [
        br#"{"a": 1} x"#,
        br#"{"a": 1}{}"#,
        br#"{"x": [1,,2], "a": 1}"#,
        br#"{"x": {"y" 1}, "a": 1}"#,
        br#"{"x": "\q", "a": 1}"#,
        b"{\"x\": \"\xff\", \"a\": 1}",
        br#"{"a": [1, 2}"#,
        br#"{"a": 1,}"#,
        br#"[{"a": 1},]"#,
    ];
    for body in cases {
        assert!(
            matches!(mask.project_bytes(body), Err(ProjectError::InvalidJson(_))),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    assert_eq!(project_text(&["a"], " {\"a\" : 1 }\n\t "), r#"{"a":1}"#);
}

#[test]
fn leaves_are_copied_as_written() {
    let body = r#"{"n": 1.0e2, "s": "\u0041\"", "t": [1, [ 2 ], "]"], "z": -0}"#;
    assert_eq!(
        project_text(&["z", "t", "s", "n"], body),
        r#"{"z":-0,"t":[1, [ 2 ], "]"],"s":"\u0041\"","n":1.0e2}"#
    );
    // Grammatical JSON that a `Value` cannot hold is checked, not decoded, so it passes too.
    let body = r#"{"big": 1e999, "lone": "\ud800", "skipped": ["\udfff", -1e400]}"#;
    assert_eq!(
        project_text(&["big", "lone"], body),
        r#"{"big":1e999,"lone":"\ud800"}"#
    );
}

#[test]
fn keys_are_read_as_serde_reads_them() {
    let body = r#"{"us\u0065rId": 1, "s\u0065cret": 2, "\u0061": {"\u0062": 3, "c": 4}}"#;
    assert_eq!(
        project_text(&["userId", "a.b"], body),
        r#"{"userId":1,"a":{"b":3}}"#
    );
}

#[test]
fn repeated_keys_count_with_their_last_value() {
    let cases = [
        (&["a"][..], r#"{"a": 1, "a": {"secret": 1}}"#, r#"{}"#),
        (&["a"], r#"{"a": {"secret": 1}, "a": 2}"#, r#"{"a":2}"#),
        (
            &["a.b"],
            r#"{"a": {"b": 1, "c": 2}, "a": {"c": 3}}"#,
            r#"{"a":{}}"#,
        ),
        (
            &["a.b"],
            r#"{"a": {"b": 1, "b": [2]}}"#,
            r#"{"a":{"b":[2]}}"#,
        ),
        (&["a.b"], r#"{"a": {"b": 1}, "a": 5}"#, r#"{}"#),
        (
            &["a[].b"],
            r#"{"a": [{"b": 1}], "a": [{"b": 2}, {"c": 3}]}"#,
            r#"{"a":[{"b":2},{}]}"#,
        ),
        (&["a.b as x"], r#"{"a": {"b": 1}, "a": {"c": 2}}"#, r#"{}"#),
        (
            &["a.b as x"],
            r#"{"a": {"b": {"s": 1}, "b": 3}}"#,
            r#"{"x":3}"#,
        ),
        (
            &["a", "a as y"],
            r#"{"a": [1], "a": 2}"#,
            r#"{"a":2,"y":2}"#,
        ),
    ];
    for (fields, body, expected) in cases {
        assert_eq!(project_text(fields, body), expected, "{fields:?} {body}");
    }
}

#[test]
fn braces_inside_strings_do_not_make_a_leaf_an_object() {
    let body = r#"{"a": ["{", "\"{", "\\", "}"], "b": ["\\\"{", {"s": 1}], "c": "{", "d": ["\"", {"s": 1}]}"#;
    assert_eq!(
        project_text(&["a", "b", "c", "d"], body),
        r#"{"a":["{", "\"{", "\\", "}"],"c":"{"}"#
    );
}

#[test]
fn a_member_read_by_several_outputs() {
    let fields = ["a", "a.x as c", "a as d", "b[].y as ys"];
    assert_eq!(
        project_text(&fields, r#"{"a": {"x": 1}, "b": [{"y": 2}]}"#),
        r#"{"c":1,"ys":[2]}"#
    );
    assert_eq!(
        project_text(&fields, r#"{"a": [5], "b": 3}"#),
        r#"{"a":[5],"d":[5]}"#
    );
}

const DEEP: usize = 100_000;

fn deep_array(inner: &str) -> String {
    format!("{}{inner}{}", "[".repeat(DEEP), "]".repeat(DEEP))
}

fn deep_object(key: &str, inner: &str) -> String {
    format!(
        "{}{inner}{}",
        format!("{{\"{key}\":").repeat(DEEP),
        "}".repeat(DEEP)
    )
}

#[test]
fn hostile_deep_nesting_in_skipped_members() {
    let body = format!(
        r#"{{"secret": {}, "x": {}, "a": 1}}"#,
        deep_array("1"),
        deep_object("x", "2")
    );
    assert_eq!(project_text(&["a", "b.c", "d[].e"], &body), r#"{"a":1}"#);
    // Elements and members read through the mask are skipped just as deep.
    let body = format!(
        r#"{{"a": {}, "b": {}}}"#,
        deep_array("1"),
        deep_object("c", "1")
    );
    assert_eq!(
        project_text(&["a[].x", "b.c.d"], &body),
        r#"{"a":[],"b":{"c":{}}}"#
    );
    assert_eq!(project_text(&["a"], &deep_array("{}")), "[]");
    assert_eq!(project_text(&["a"], &deep_object("a", "1")), "{}");
}

#[test]
fn hostile_deep_nesting_in_kept_members() {
    let deep = deep_array("1");
    let body = format!(r#"{{"a": {deep}, "b": {}}}"#, deep_array("{}"));
    assert_eq!(
        project_text(&["a", "b", "a as c", "a[] as d"], &body),
        format!(r#"{{"a":{deep},"c":{deep},"d":{deep}}}"#)
    );
    let out = mask(&["a", "a as c"])
        .project_selected(format!(r#"{{"s": {body}}}"#).as_bytes(), Some("s"))
        .expect("valid");
    assert_eq!(out, format!(r#"{{"a":{deep},"c":{deep}}}"#).into_bytes());
    // A mask deeper than serde_json's recursion limit meets the limit, not the stack's end.
    let long = vec!["a"; 300].join(".");
    let body = deep_object("a", "1");
    assert!(matches!(
        mask(&[long.as_str()]).project_bytes(body.as_bytes()),
        Err(ProjectError::InvalidJson(_))
    ));
    assert!(matches!(
        mask(&["a"]).project_bytes(&body.as_bytes()[..body.len() - 1]),
        Err(ProjectError::InvalidJson(_))
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
        // Quotes, backslashes and brackets inside strings, which must not confuse the copying.
        r#"[a-z{}\[\]"\\]{0,3}"#.prop_map(Value::String),
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

/// JSON text as servers write it: keys from [`KEYS`], sometimes escaped (`"s\u0065cret"`) and
/// repeated in one object, whitespace, number and string spellings a `Value` would normalise,
/// braces inside strings, and nesting well past the value strategy's (kept under serde_json's
/// depth limit of 128, so that the text can also be read as a `Value`).
fn json_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        prop::sample::select(vec![
            "null",
            "true",
            "false",
            "-0",
            "1.0e2",
            "0.5",
            "-12",
            r#""\u0041""#,
            r#""{\"secret\":1}""#,
            r#""}]\\""#,
            r#""\"{""#,
        ])
        .prop_map(str::to_owned),
        (-5i64..5).prop_map(|n| n.to_string()),
        "[a-z]{0,2}".prop_map(|s| format!("\"{s}\"")),
    ];
    let value = leaf.prop_recursive(4, 64, 5, |inner| {
        prop_oneof![
            2 => (prop::collection::vec(inner.clone(), 0..4), space())
                .prop_map(|(items, space)| format!("[{space}{}]", items.join(","))),
            3 => object_text(inner.clone()),
            1 => (inner, 1usize..25, prop::sample::select(&KEYS[..])).prop_map(|(value, depth, key)| {
                // Arrays or single-member objects around a value.
                if depth % 2 == 0 {
                    format!("{}{value}{}", "[".repeat(depth), "]".repeat(depth))
                } else {
                    format!("{}{value}{}", format!("{{\"{key}\":").repeat(depth), "}".repeat(depth))
                }
            }),
        ]
    });
    prop_oneof![
        3 => object_text(value.clone()),
        1 => prop::collection::vec(value.clone(), 0..4).prop_map(|items| format!("[{}]", items.join(" , "))),
        1 => value,
    ]
}

fn space() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", "", " ", "\n\t "])
}

fn object_text(values: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    let member = (
        prop::sample::select(&KEYS[..]),
        any::<bool>(),
        space(),
        values,
    );
    prop::collection::vec(member, 0..7).prop_map(|members| {
        let members: Vec<String> = members
            .into_iter()
            .map(|(key, escape, space, value)| {
                let key = match key.split_at(1) {
                    (first, rest) if escape => {
                        format!("\\u{:04x}{rest}", u32::from(first.as_bytes()[0]))
                    }
                    _ => key.to_owned(),
                };
                format!("{space}\"{key}\"{space}:{value}")
            })
            .collect();
        format!("{{{}}}", members.join(","))
    })
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

    #[test]
    fn text_projects_as_serde_reads_it(text in json_text(), fields in field_list(true)) {
        let mask = FieldMask::compile(&fields).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let read: Value = serde_json::from_str(&text)
            .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        let raw = mask.project_bytes(text.as_bytes());
        let normalised = mask.project_bytes(read.to_string().as_bytes());
        match (raw, normalised) {
            (Ok(raw), Ok(normalised)) => {
                let out: Value = serde_json::from_slice(&raw).map_err(|e| {
                    TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(&raw)))
                })?;
                // Same members in the same order, whatever the spelling of the text.
                prop_assert_eq!(out.to_string(), parse(&normalised).to_string(), "text {}", text);
                if let Err(e) = check_output(&fields, &out) {
                    return Err(TestCaseError::fail(format!("{e}\nfields {fields:?}\ntext {text}\nout {out}")));
                }
            }
            (Err(ProjectError::NotAnObjectOrArray), Err(ProjectError::NotAnObjectOrArray)) => {
                prop_assert!(!read.is_object() && !read.is_array());
            }
            (raw, normalised) => {
                return Err(TestCaseError::fail(format!("{raw:?} vs {normalised:?} for {text}")));
            }
        }
    }

    #[test]
    fn select_projects_the_selected_member(text in json_text(), fields in field_list(true), path in prop::sample::select(vec!["a", "b.c", "secret.a.b"])) {
        let mask = FieldMask::compile(&fields).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let read: Value = serde_json::from_str(&text)
            .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        let out = mask.project_selected(text.as_bytes(), Some(path));
        match select(&read, path) {
            None => prop_assert!(matches!(out, Err(ProjectError::NothingToSelect(ref p)) if p == path)),
            Some(selected) => match mask.project(selected) {
                None => prop_assert!(matches!(out, Err(ProjectError::NotAnObjectOrArray))),
                Some(expected) => {
                    let out = out.map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
                    prop_assert_eq!(parse(&out).to_string(), expected.to_string());
                }
            },
        }
    }
}
