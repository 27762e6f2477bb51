//! The verified-token cache: verifying an RS256 token the verifier has not seen (signature
//! check, then remembered) against one it has (a SHA-256 and a cache lookup), measured in the
//! same run; the ratio is what to compare across machines. `cargo bench --bench jwt_cache`.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bff::pipeline::auth::Verifier;
use bff::policy::{Algorithm, JwtAuth, KeySource};
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
}

/// `Authorization` headers of `n` distinct RS256 tokens.
fn bearer_headers(n: usize) -> Vec<HeaderMap> {
    let pem = std::fs::read(fixture("rsa_private.pem")).unwrap_or_else(|e| panic!("{e}"));
    let key = EncodingKey::from_rsa_pem(&pem).unwrap_or_else(|e| panic!("RSA key: {e}"));
    let header = Header {
        kid: Some("rsa-1".into()),
        ..Header::new(jsonwebtoken::Algorithm::RS256)
    };
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    (0..n)
        .map(|i| {
            let claims = json!({"sub": "usr_9821", "iss": "https://id.example.com/",
                                "aud": "mobile-app", "exp": exp, "jti": i});
            let token = jsonwebtoken::encode(&header, &claims, &key)
                .unwrap_or_else(|e| panic!("sign: {e}"));
            let mut headers = HeaderMap::new();
            let value =
                HeaderValue::from_str(&format!("Bearer {token}")).unwrap_or_else(|e| panic!("{e}"));
            headers.insert(AUTHORIZATION, value);
            headers
        })
        .collect()
}

/// The median of `rounds` timings of one call, each round the mean over its calls.
fn median(mut rounds: Vec<Duration>) -> Duration {
    rounds.sort_unstable();
    rounds[rounds.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo test --benches` runs this once as a smoke test; `cargo bench` passes `--bench`.
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, per_round) = if full { (7, 300) } else { (1, 3) };

    let verifier = Verifier::new(&JwtAuth {
        issuer: "https://id.example.com/".into(),
        audience: "mobile-app".into(),
        algorithms: vec![Algorithm::RS256],
        keys: KeySource::JwksFile(fixture("jwks.json")),
        leeway: Duration::from_secs(30),
        cookie: None,
    });
    verifier.load_keys().await.unwrap_or_else(|e| panic!("{e}"));

    let fresh = bearer_headers(rounds * per_round);
    let mut unseen = Vec::new();
    for round in fresh.chunks(per_round) {
        let started = Instant::now();
        for headers in round {
            let claims = verifier.verify(black_box(headers)).await;
            assert!(matches!(claims, Ok(Some(_))), "{claims:?}");
        }
        unseen.push(started.elapsed() / per_round as u32);
    }
    let seen_headers = &fresh[0];
    let mut seen = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        for _ in 0..per_round {
            let claims = verifier.verify(black_box(seen_headers)).await;
            assert!(matches!(claims, Ok(Some(_))), "{claims:?}");
        }
        seen.push(started.elapsed() / per_round as u32);
    }
    let (unseen, seen) = (median(unseen), median(seen));
    println!("RS256 verify, median of {rounds} rounds of {per_round} calls:");
    println!(
        "{:<36} {:>10.2} µs",
        "token not seen before",
        unseen.as_secs_f64() * 1e6
    );
    println!(
        "{:<36} {:>10.2} µs",
        "token verified before (cached)",
        seen.as_secs_f64() * 1e6
    );
    println!(
        "not seen / cached: {:.1}x",
        unseen.as_secs_f64() / seen.as_secs_f64().max(1e-9)
    );
}
