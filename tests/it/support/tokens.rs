//! Test credentials: tokens signed with an HS256 secret (the claims a policy's `auth.jwt`
//! checks, and the signature), and the keys-file form of an API key.

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The issuer every test policy names.
pub const ISSUER: &str = "https://id.example.com/";

/// Claims that pass a policy with `audience` (and [`ISSUER`]), valid for `exp_in` seconds from
/// now (negative: expired), with `extra` merged in (`null` removes a claim).
pub fn claims(audience: &str, exp_in: i64, extra: Value) -> Value {
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let mut claims = json!({"iss": ISSUER, "aud": audience, "exp": now + exp_in});
    for (name, value) in extra.as_object().expect("extra claims are an object") {
        match value {
            Value::Null => claims.as_object_mut().map(|c| c.remove(name)),
            value => claims
                .as_object_mut()
                .map(|c| c.insert(name.clone(), value.clone())),
        };
    }
    claims
}

/// `claims` signed with HS256 and `secret`.
pub fn hs256(claims: &Value, secret: &str) -> String {
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign a test token")
}

/// An API key as a keys file lists it: the SHA-256 of the key, in hex.
pub fn api_key_hash(key: &str) -> String {
    format!("{:x}", Sha256::digest(key.as_bytes()))
}
