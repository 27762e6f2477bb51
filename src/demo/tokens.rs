//! demo::tokens: the demo's credentials. A published ES256 key pair (the JWKS mock serves its
//! public half), tokens signed with it or with the policy's `hs256_secret`, the partner API key,
//! and the values the demo gives the secrets a policy refers to.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// The demo user: the `sub` of the printed token.
pub(super) const DEMO_SUB: &str = "usr_9821";

/// A second demo user for the degradation walk-through: a cache key of its own, so a complete
/// homescreen cached for [`DEMO_SUB`] cannot hide a degraded one.
pub(super) const WALK_SUB: &str = "usr_4242";

/// How long a demo token is valid.
pub(super) const TOKEN_TTL_SECS: u64 = 3600;

/// The partner key the demo prints for a policy with `auth.api_key`. Like the signing key below
/// it is public: `policies/partner-keys.txt` lists its SHA-256 for the demo partner.
pub(super) const DEMO_API_KEY: &str = "demo-partner-key";

// THE DEMO'S SIGNING KEY. A throwaway P-256 key pair generated for `bff demo` with
//   openssl ecparam -genkey -noout -name prime256v1 | openssl pkcs8 -topk8 -nocrypt
// and published here, in the source: anyone can sign tokens with it. It is trusted only by a
// sidecar whose policy points at the demo's JWKS mock; never put it in a real key set.

/// The `kid` of the demo key, in the JWKS and in every demo token's header.
pub(super) const DEMO_KEY_ID: &str = "demo-1";

/// The demo key's private half (PKCS#8 PEM), which signs the demo tokens.
pub(super) const DEMO_PRIVATE_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgGxk5//KxKDd8otsE
dksIKwIcI0WdJpOjlrGCOorUramhRANCAAS3ehZtLZ5PgDNRym/jBCBhNLyM+5J1
gRewx5B57bRCvOvILHq+L0bqeHWzGlMYE3EoMQYfHb350JIxVXRF9lcp
-----END PRIVATE KEY-----
";

/// The demo key's public half (SPKI PEM). The JWKS serves the same key as [`DEMO_JWK_X`] and
/// [`DEMO_JWK_Y`]; only the tests read the PEM, to check the two agree.
#[cfg(test)]
pub(super) const DEMO_PUBLIC_KEY_PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEt3oWbS2eT4AzUcpv4wQgYTS8jPuS
dYEXsMeQee20QrzryCx6vi9G6nh1sxpTGBNxKDEGHx29+dCSMVV0RfZXKQ==
-----END PUBLIC KEY-----
";

/// The public point's coordinates, base64url without padding (RFC 7518 §6.2.1), as
/// `openssl ec -pubin -outform DER` gives them: the last 64 bytes of the DER are x ‖ y.
pub(super) const DEMO_JWK_X: &str = "t3oWbS2eT4AzUcpv4wQgYTS8jPuSdYEXsMeQee20Qrw";

pub(super) const DEMO_JWK_Y: &str = "68gser4vRup4dbMaUxgTcSgxBh8dvfnQkjFVdEX2Vyk";

/// The demo's value for `${env:NAME}`: `USER_SVC_TOKEN` → `demo-user-svc-token`.
pub(super) fn demo_secret(name: &str) -> String {
    format!("demo-{}", name.to_ascii_lowercase().replace('_', "-"))
}

/// The JWKS mock's document: the demo's public key.
pub(super) fn demo_jwks() -> Value {
    json!({"keys": [{
        "kty": "EC", "crv": "P-256", "x": DEMO_JWK_X, "y": DEMO_JWK_Y,
        "kid": DEMO_KEY_ID, "alg": "ES256", "use": "sig",
    }]})
}

/// The credentials the banner prints, or why there are none.
#[derive(Debug, PartialEq)]
pub(super) enum DemoAuth {
    /// The policy has no `auth.jwt`: no token needed.
    Open,
    /// One token for [`DEMO_SUB`] and one for [`WALK_SUB`], and how they are signed.
    Tokens {
        main: String,
        walk: String,
        signed: String,
    },
    /// The policy takes partner API keys: the demo's key, and the header it goes in.
    ApiKey { header: String },
    /// The demo cannot sign a token this policy accepts, for this reason.
    Unavailable(String),
}

impl DemoAuth {
    pub(super) fn for_policy(policy: &Value, now: u64) -> DemoAuth {
        if let Some(header) = policy
            .pointer("/auth/api_key/header")
            .and_then(Value::as_str)
        {
            return DemoAuth::ApiKey {
                header: header.to_string(),
            };
        }
        let Some(jwt) = policy.pointer("/auth/jwt") else {
            return DemoAuth::Open;
        };
        let tokens = demo_token(jwt, DEMO_SUB, now)
            .and_then(|(main, signed)| Ok((main, demo_token(jwt, WALK_SUB, now)?.0, signed)));
        match tokens {
            Ok((main, walk, signed)) => DemoAuth::Tokens { main, walk, signed },
            Err(why) => DemoAuth::Unavailable(why),
        }
    }
}

/// A token for `sub` that the policy's `auth.jwt` accepts: ES256 with the demo key when the keys
/// come from `jwks_url` (the demo's JWKS mock), HS256 when the policy has `hs256_secret`. Also
/// says how it is signed.
pub(super) fn demo_token(jwt: &Value, sub: &str, now: u64) -> Result<(String, String), String> {
    let mut claims = json!({
        "sub": sub, "iat": now, "exp": now + TOKEN_TTL_SECS, "scope": "profile orders",
    });
    for (claim, setting) in [("iss", "issuer"), ("aud", "audience")] {
        if let Some(value) = jwt.get(setting) {
            claims[claim] = value.clone();
        }
    }
    let allows = |alg: &str| {
        jwt.get("algorithms")
            .and_then(Value::as_array)
            .is_none_or(|algs| algs.iter().any(|a| a.as_str() == Some(alg)))
    };
    let (header, key, signed) = if let Some(secret) = jwt.get("hs256_secret") {
        let secret = secret.as_str().unwrap_or("");
        let secret = match secret
            .strip_prefix("${env:")
            .and_then(|s| s.strip_suffix('}'))
        {
            Some(name) => demo_secret(name),
            None if secret.contains("${") => {
                return Err(format!(
                    "`hs256_secret: {secret}` is not a value the demo sets"
                ))
            }
            None => secret.to_string(),
        };
        (
            Header::new(Algorithm::HS256),
            EncodingKey::from_secret(secret.as_bytes()),
            "HS256 with the policy's hs256_secret".to_string(),
        )
    } else if jwt.get("jwks_url").is_some() {
        if !allows("ES256") {
            return Err(
                "the policy's `auth.jwt.algorithms` does not allow ES256, the demo key's algorithm"
                    .into(),
            );
        }
        let key = EncodingKey::from_ec_pem(DEMO_PRIVATE_KEY_PEM.as_bytes())
            .map_err(|e| format!("the demo key does not load: {e}"))?;
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(DEMO_KEY_ID.to_string());
        (
            header,
            key,
            format!("ES256 with the demo key `{DEMO_KEY_ID}` the JWKS mock serves"),
        )
    } else {
        return Err(
            "the policy's keys are not served by the demo (only `jwks_url` and `hs256_secret` are)"
                .into(),
        );
    };
    let token = jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|e| format!("cannot sign the demo token: {e}"))?;
    Ok((token, signed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet};
    use jsonwebtoken::{DecodingKey, Validation};
    use std::path::Path;

    fn mobile_policy() -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/mobile.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        serde_saphyr::from_str(&text).unwrap()
    }

    fn validation(algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&["https://id.example.com/"]);
        validation.set_audience(&["mobile-app"]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation
    }

    #[test]
    fn served_jwk_verifies_a_token_signed_by_the_demo_key() {
        let jwks: JwkSet = serde_json::from_value(demo_jwks()).unwrap();
        let jwk = jwks.find(DEMO_KEY_ID).unwrap();
        let key = DecodingKey::from_jwk(jwk).unwrap();
        let now = jsonwebtoken::get_current_timestamp();
        let policy = mobile_policy();
        let DemoAuth::Tokens { main, walk, .. } = DemoAuth::for_policy(&policy, now) else {
            panic!("no demo token for policies/mobile.yaml");
        };
        for (token, sub) in [(main, DEMO_SUB), (walk, WALK_SUB)] {
            let data =
                jsonwebtoken::decode::<Value>(&token, &key, &validation(Algorithm::ES256)).unwrap();
            assert_eq!(data.header.alg, Algorithm::ES256);
            assert_eq!(data.header.kid.as_deref(), Some(DEMO_KEY_ID));
            let claims = data.claims;
            assert_eq!(claims["sub"], sub);
            assert_eq!(claims["iss"], "https://id.example.com/");
            assert_eq!(claims["aud"], "mobile-app");
            assert_eq!(claims["scope"], "profile orders");
            assert_eq!(claims["iat"], now);
            assert_eq!(claims["exp"], now + 3600);
        }
    }

    #[test]
    fn served_jwk_is_the_demo_key_pair() {
        let served = &demo_jwks()["keys"][0];
        for (field, value) in [
            ("kty", "EC"),
            ("crv", "P-256"),
            ("kid", "demo-1"),
            ("alg", "ES256"),
            ("use", "sig"),
        ] {
            assert_eq!(served[field], value, "{field}");
        }
        // The coordinates jsonwebtoken derives from the private key are the hard-coded ones.
        let private = EncodingKey::from_ec_pem(DEMO_PRIVATE_KEY_PEM.as_bytes()).unwrap();
        let derived = Jwk::from_encoding_key(&private, Algorithm::ES256).unwrap();
        let AlgorithmParameters::EllipticCurve(ec) = derived.algorithm else {
            panic!("not an EC key: {derived:?}");
        };
        assert_eq!((ec.x.as_str(), ec.y.as_str()), (DEMO_JWK_X, DEMO_JWK_Y));
        // And the public PEM is the same key: it verifies what the private key signs.
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &json!({"iss": "https://id.example.com/", "aud": "mobile-app", "sub": "s", "exp": u64::MAX / 2}),
            &private,
        )
        .unwrap();
        let public = DecodingKey::from_ec_pem(DEMO_PUBLIC_KEY_PEM.as_bytes()).unwrap();
        jsonwebtoken::decode::<Value>(&token, &public, &validation(Algorithm::ES256)).unwrap();
    }

    #[test]
    fn no_token_for_a_policy_the_demo_key_cannot_satisfy() {
        let rs256_only = json!({"auth": {"jwt": {
            "issuer": "https://id.example.com/", "audience": "partner-api",
            "algorithms": ["RS256"], "jwks_url": "http://127.0.0.1:9100/jwks.json",
        }}});
        assert!(matches!(
            DemoAuth::for_policy(&rs256_only, 0),
            DemoAuth::Unavailable(why) if why.contains("ES256")
        ));
        let jwks_file = json!({"auth": {"jwt": {"jwks_file": "/etc/keys.json"}}});
        assert!(matches!(
            DemoAuth::for_policy(&jwks_file, 0),
            DemoAuth::Unavailable(_)
        ));
        assert!(matches!(
            DemoAuth::for_policy(&json!({}), 0),
            DemoAuth::Open
        ));
    }

    #[test]
    fn the_partner_policy_takes_the_demo_key() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let text = std::fs::read_to_string(dir.join("partner.yaml")).unwrap();
        let policy: Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(
            DemoAuth::for_policy(&policy, 0),
            DemoAuth::ApiKey {
                header: "X-Api-Key".into()
            }
        );
        let keys = crate::policy::api_keys::ApiKeySet::read(&dir.join("partner-keys.txt")).unwrap();
        assert_eq!(keys.find(DEMO_API_KEY.as_bytes()).as_deref(), Some("demo"));
    }

    #[test]
    fn hs256_tokens_use_the_demo_secret() {
        let policy = json!({"auth": {"jwt": {
            "issuer": "https://id.example.com/", "audience": "mobile-app",
            "algorithms": ["HS256"], "hs256_secret": "${env:JWT_SECRET}",
        }}});
        let now = jsonwebtoken::get_current_timestamp();
        let DemoAuth::Tokens { main, .. } = DemoAuth::for_policy(&policy, now) else {
            panic!("no HS256 token");
        };
        let key = DecodingKey::from_secret(b"demo-jwt-secret");
        let data = jsonwebtoken::decode::<Value>(&main, &key, &validation(Algorithm::HS256));
        assert_eq!(data.unwrap().claims["sub"], DEMO_SUB);
    }
}
