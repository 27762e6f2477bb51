//! Projection cost against a `serde_json::Value` parse + serialize round trip of the same body,
//! measured in the same run (the ratio is what to compare across machines). `cargo bench`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bff::projection::FieldMask;
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

/// Median time of one call over `rounds` rounds of `iterations` calls.
fn measure(rounds: usize, iterations: usize, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iterations {
                f();
            }
            start.elapsed() / iterations as u32
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn main() {
    // `cargo test --benches` runs this once as a smoke test; `cargo bench` passes `--bench`.
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, scale) = if full { (9, 1) } else { (1, 0) };
    let cases = [
        (
            "user (40 fields → 4)",
            user_document(),
            vec!["userId", "displayName", "avatarUrl", "loyaltyTier"],
            2000,
        ),
        (
            "orders (1 MiB array)",
            orders_document(),
            vec!["orderId", "status", "estimatedDelivery", "items[].title"],
            10,
        ),
    ];
    println!(
        "{:<24} {:>14} {:>14} {:>8}",
        "document", "projection", "Value trip", "ratio"
    );
    for (name, body, fields, iterations) in cases {
        let mask = match FieldMask::compile(&fields) {
            Ok(mask) => mask,
            Err(e) => panic!("bench fields: {e}"),
        };
        let iterations = (iterations * scale).max(1);
        let projected = measure(rounds, iterations, || {
            black_box(mask.project_bytes(black_box(&body)).ok());
        });
        let baseline = measure(rounds, iterations, || {
            let value: Option<Value> = serde_json::from_slice(black_box(&body)).ok();
            black_box(value.map(|v| serde_json::to_vec(&v)));
        });
        println!(
            "{name:<24} {projected:>14.2?} {baseline:>14.2?} {:>7.2}x",
            baseline.as_secs_f64() / projected.as_secs_f64()
        );
    }
}
