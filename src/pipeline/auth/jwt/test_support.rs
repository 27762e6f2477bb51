//! What the tests of `jwt` and `jwt::keys` share: the fixture keys, a policy's `jwt` block,
//! verifiers over a file or a secret, and tokens signed for them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::super::failure::AuthFailure;
use super::Verifier;
use crate::caller::Claims;
use crate::policy::{Algorithm as P, JwtAuth, KeySource};

pub(super) const ISS: &str = "https://id.example.com/";
pub(super) const AUD: &str = "mobile-app";
pub(super) const SECRET: &str = "a-test-secret-that-is-long-enough-for-hs256";

pub(super) fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
}

pub(super) fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

pub(super) fn jwt_auth(algorithms: &[P], keys: KeySource) -> JwtAuth {
    JwtAuth {
        issuer: ISS.to_owned(),
        audience: AUD.to_owned(),
        algorithms: algorithms.to_vec(),
        keys,
        leeway: Duration::from_secs(30),
        cookie: None,
    }
}

pub(super) async fn file_verifier(algorithms: &[P]) -> Verifier {
    let verifier = Verifier::new(&jwt_auth(
        algorithms,
        KeySource::JwksFile(fixture("jwks.json")),
    ));
    verifier.load_keys().await.unwrap();
    verifier
}

pub(super) fn secret_verifier() -> Verifier {
    Verifier::new(&jwt_auth(
        &[P::HS256],
        KeySource::Hs256Secret(SECRET.to_owned()),
    ))
}

pub(super) fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// Valid claims, with `changes` applied (`null` removes a claim).
pub(super) fn claims(changes: Value) -> Value {
    let mut claims =
        json!({"sub": "usr_9821", "iss": ISS, "aud": AUD, "iat": now(), "exp": now() + 600});
    for (name, value) in changes.as_object().unwrap() {
        match value {
            Value::Null => claims.as_object_mut().unwrap().remove(name),
            value => claims
                .as_object_mut()
                .unwrap()
                .insert(name.clone(), value.clone()),
        };
    }
    claims
}

pub(super) fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&read("rsa_private.pem")).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&read("ec_private.pem")).unwrap(),
        Algorithm::HS256 => EncodingKey::from_secret(SECRET.as_bytes()),
        other => panic!("no test key for {other:?}"),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

pub(super) fn bearer(value: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
    headers
}

pub(super) fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `token` with its header replaced by `header`.
pub(super) fn with_header(token: &str, header: Value) -> String {
    let (_, rest) = token.split_once('.').unwrap();
    format!("{}.{rest}", b64url(header.to_string().as_bytes()))
}

pub(super) async fn check(
    verifier: &Verifier,
    token: &str,
) -> Result<Option<Arc<Claims>>, AuthFailure> {
    verifier.verify(&bearer(&format!("Bearer {token}"))).await
}
