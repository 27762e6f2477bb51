//! Reading the sidecar's Prometheus text in tests.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{http, Bff};

/// One sample of the Prometheus text format.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text exposition format (comments skipped, label values unescaped).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("metric line without a value: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|e| panic!("metric value of {line:?}: {e}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unterminated labels: {line:?}"));
                (name.to_string(), parse_labels(body, line))
            }
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

fn parse_labels(body: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = body.chars().peekable();
    loop {
        while chars.peek() == Some(&',') || chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek().is_none() {
            return labels;
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert_eq!(chars.next(), Some('"'), "label value not quoted: {line:?}");
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => panic!("dangling escape: {line:?}"),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => panic!("unterminated label value: {line:?}"),
            }
        }
        labels.insert(key.trim().to_string(), value);
    }
}

/// The value of the series `name` whose label set is exactly `labels`.
pub fn series(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    let found: Vec<_> = samples
        .iter()
        .filter(|s| s.name == name && s.labels == want)
        .collect();
    assert!(found.len() <= 1, "duplicate series {name}{want:?}");
    found.first().map(|s| s.value)
}

/// The series `name` whose labels are exactly `labels`, read from Prometheus text.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    series(&parse_metrics(text), name, labels)
}

pub async fn metrics_text(bff: &Bff) -> String {
    let reply = http::get(&bff.admin_url("/metrics")).await;
    assert_eq!(reply.status, 200, "GET /metrics: {}", reply.text());
    reply.text()
}

/// A sample read now; 0 when the series does not exist (a counter never incremented).
pub async fn metric(bff: &Bff, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(&metrics_text(bff).await, name, labels).unwrap_or(0.0)
}

/// For samples written in the logging phase, after the client already has its answer.
pub async fn metric_eventually(bff: &Bff, name: &str, labels: &[(&str, &str)], want: f64) -> f64 {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let got = metric(bff, name, labels).await;
        if got == want || Instant::now() >= until {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
