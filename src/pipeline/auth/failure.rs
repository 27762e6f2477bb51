//! Why a presented credential was refused: the reasons the credential checks (`jwt`,
//! `api_key`) give, which are the `reason` label of `bff_auth_failures_total`.

/// Why a presented credential was refused (the `reason` label of `bff_auth_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("no credential")]
    Missing,
    #[error("malformed credential")]
    Malformed,
    #[error("bad token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("wrong token issuer")]
    WrongIssuer,
    #[error("wrong token audience")]
    WrongAudience,
    #[error("unknown signing key")]
    UnknownKey,
    #[error("token algorithm not allowed")]
    DisallowedAlg,
    #[error("unknown API key")]
    UnknownApiKey,
}

impl AuthFailure {
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed => "malformed",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::Expired => "expired",
            AuthFailure::NotYetValid => "not_yet_valid",
            AuthFailure::WrongIssuer => "wrong_issuer",
            AuthFailure::WrongAudience => "wrong_audience",
            AuthFailure::UnknownKey => "unknown_key",
            AuthFailure::DisallowedAlg => "disallowed_alg",
            AuthFailure::UnknownApiKey => "unknown_api_key",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_the_metric_labels() {
        let all = [
            (AuthFailure::Missing, "missing"),
            (AuthFailure::Malformed, "malformed"),
            (AuthFailure::BadSignature, "bad_signature"),
            (AuthFailure::Expired, "expired"),
            (AuthFailure::NotYetValid, "not_yet_valid"),
            (AuthFailure::WrongIssuer, "wrong_issuer"),
            (AuthFailure::WrongAudience, "wrong_audience"),
            (AuthFailure::UnknownKey, "unknown_key"),
            (AuthFailure::DisallowedAlg, "disallowed_alg"),
            (AuthFailure::UnknownApiKey, "unknown_api_key"),
        ];
        for (failure, reason) in all {
            assert_eq!(failure.reason(), reason);
        }
    }
}
