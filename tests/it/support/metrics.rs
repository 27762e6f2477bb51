//! Reading the sidecar's Prometheus text in tests.

use std::time::{Duration, Instant};

use super::{http, Bff};

/// One sample of the Prometheus text: the series `name` whose labels are exactly `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, inner) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let found: Vec<(&str, &str)> = inner
                .split(',')
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    Some((k, v.trim_matches('"')))
                })
                .collect();
            let same = found.len() == labels.len() && labels.iter().all(|l| found.contains(l));
            same.then(|| value.parse().ok()).flatten()
        })
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
