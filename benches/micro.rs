//! Criterion micro-benchmarks of the per-request decisions, each beside a baseline measured in
//! the same run (the ratio, not the times, is what compares across machines):
//! - projection: the byte projector against a `serde_json::Value` round trip of the same body
//!   through the same whitelist (parse, filter, serialise), on a 40-field user keeping 4 and on
//!   a 1 MiB array of orders; issue 8 asks for `value_round_trip` / `projection` ≥ 3 on both;
//! - cache key: deriving a per-user key with a plain and with a hashed input, against a bare
//!   `format!` of the same parts;
//! - XFetch: an entry's freshness with a random draw, against a plain `now >= expiry` check.
//!
//! `cargo bench --bench micro`.

use std::hint::black_box;
use std::time::Duration;

use std::borrow::Cow;

use bff::cache::entry::now_ms;
use bff::cache::Sections;
use bff::cache::{key, Entry};
use bff::policy::CacheScope;
use bff::projection::FieldMask;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::{json, Map, Value};

fn user_document() -> Vec<u8> {
    let mut user = Map::new();
    for i in 0..36 {
        user.insert(format!("field{i}"), json!(format!("value number {i}")));
    }
    user.insert("userId".into(), json!("u-1"));
    user.insert("displayName".into(), json!("Ada Lovelace"));
    user.insert("avatarUrl".into(), json!("https://cdn.example.com/a.png"));
    user.insert("loyaltyTier".into(), json!("gold"));
    serde_json::to_vec(&Value::Object(user)).unwrap_or_default()
}

fn orders_document() -> Vec<u8> {
    let order = |i: usize| {
        json!({"orderId": format!("o-{i}"), "status": "shipped", "estimatedDelivery": "2026-12-01",
               "itemCount": 3, "warehouseId": "w-7", "internal": {"cost": 12.5, "margin": 0.3},
               "items": [{"title": "Lamp", "sku": "L-1"}, {"title": "Desk", "sku": "D-9"}]})
    };
    let mut orders = Vec::new();
    let mut size = 0;
    let mut i = 0;
    while size < 1 << 20 {
        let o = order(i);
        size += o.to_string().len() + 1;
        orders.push(o);
        i += 1;
    }
    serde_json::to_vec(&orders).unwrap_or_default()
}

/// The baseline's whitelist: the same fields as a tree of member names (`[]` marks an array),
/// without aliases, which these fields do not use.
#[derive(Default)]
struct Filter(Vec<(String, bool, Option<Filter>)>);

impl Filter {
    fn new(fields: &[&str]) -> Filter {
        let mut root = Filter::default();
        for field in fields {
            let mut node = &mut root;
            let mut segments = field.split('.').peekable();
            while let Some(segment) = segments.next() {
                let (name, array) = match segment.strip_suffix("[]") {
                    Some(name) => (name, true),
                    None => (segment, false),
                };
                let last = segments.peek().is_none();
                let at = match node.0.iter().position(|(n, ..)| n == name) {
                    Some(at) => at,
                    None => {
                        let next = (!last).then(Filter::default);
                        node.0.push((name.to_owned(), array, next));
                        node.0.len() - 1
                    }
                };
                match &mut node.0[at].2 {
                    Some(next) => node = next,
                    None => break,
                }
            }
        }
        root
    }

    /// Moves the listed members out of `object`, in fields order.
    fn object(&self, object: &mut Map<String, Value>) -> Value {
        let mut out = Map::with_capacity(self.0.len());
        for (name, array, next) in &self.0 {
            let Some(value) = object.get_mut(name) else {
                continue;
            };
            let kept = match value {
                Value::Array(items) if *array => Some(Value::Array(
                    items
                        .iter_mut()
                        .filter_map(|item| step(next, item))
                        .collect(),
                )),
                _ if *array => None,
                value => step(next, value),
            };
            if let Some(kept) = kept {
                out.insert(name.clone(), kept);
            }
        }
        Value::Object(out)
    }
}

fn step(next: &Option<Filter>, value: &mut Value) -> Option<Value> {
    match next {
        None => is_plain(value).then(|| value.take()),
        Some(filter) => Some(filter.object(value.as_object_mut()?)),
    }
}

fn is_plain(value: &Value) -> bool {
    match value {
        Value::Object(_) => false,
        Value::Array(items) => items.iter().all(is_plain),
        _ => true,
    }
}

/// Parse into a `Value`, filter by moving kept values out (no clones), serialise.
fn value_round_trip(filter: &Filter, body: &[u8]) -> Option<Vec<u8>> {
    let projected = match serde_json::from_slice(body).ok()? {
        Value::Object(mut object) => filter.object(&mut object),
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .filter_map(|mut item| Some(filter.object(item.as_object_mut()?)))
                .collect(),
        ),
        _ => return None,
    };
    serde_json::to_vec(&projected).ok()
}

fn projection(c: &mut Criterion) {
    let cases = [
        (
            "user_40_fields_keep_4",
            user_document(),
            vec!["userId", "displayName", "avatarUrl", "loyaltyTier"],
        ),
        (
            "orders_1MiB",
            orders_document(),
            vec!["orderId", "status", "estimatedDelivery", "items[].title"],
        ),
    ];
    for (name, body, fields) in cases {
        let mask = match FieldMask::compile(&fields) {
            Ok(mask) => mask,
            Err(e) => panic!("bench fields: {e}"),
        };
        let filter = Filter::new(&fields);
        // Both sides must produce the same answer, or the comparison means nothing.
        let projected = mask.project_bytes(&body).ok();
        assert!(projected.is_some(), "{name}: projection failed");
        assert_eq!(projected, value_round_trip(&filter, &body), "{name}");

        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function("projection", |b| {
            b.iter(|| mask.project_bytes(black_box(&body)).ok())
        });
        group.bench_function("value_round_trip", |b| {
            b.iter(|| value_round_trip(&filter, black_box(&body)))
        });
        group.finish();
    }
}

fn cache_key(c: &mut Criterion) {
    let prefix = "mobile:product-page:v2:3f9a1c2e:";
    let mut group = c.benchmark_group("cache_key");
    for (name, input) in [
        ("plain_input", "p-1001"),
        ("hashed_input", "x?role=admin/../"),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                key::key(
                    black_box(prefix),
                    CacheScope::User,
                    Some(black_box("usr_9821")),
                    [Some(Cow::Borrowed(black_box(input)))],
                )
            })
        });
    }
    group.bench_function("format_baseline", |b| {
        b.iter(|| {
            format!(
                "{}{}:{}",
                black_box(prefix),
                black_box("usr_9821"),
                black_box("p-1001")
            )
        })
    });
    group.finish();
}

fn xfetch(c: &mut Criterion) {
    let sections = Sections {
        json: br#""user":{"id":1}"#.as_slice().into(),
        degraded: Vec::new(),
    };
    let now = now_ms();
    let ttl = Duration::from_secs(60);
    let entry = Entry::new(2, "3f9a1c2e", sections, now, ttl, Duration::from_millis(40));
    let stale = Duration::from_secs(30);
    // Halfway through the TTL, where a real decision is made on nearly every hit.
    let at = now + 30_000;
    let mut group = c.benchmark_group("xfetch");
    group.bench_function("decision", |b| {
        b.iter(|| entry.freshness(black_box(at), black_box(1.0), stale, rand::random::<f64>()))
    });
    group.bench_function("ttl_check_baseline", |b| {
        b.iter(|| black_box(at) >= black_box(entry.expires_ms))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = projection, cache_key, xfetch
}
criterion_main!(benches);
