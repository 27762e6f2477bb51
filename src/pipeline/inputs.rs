//! Template inputs: the values `{path.*}`, `{query.*}`, `{jwt.*}`, `{auth.client}` and
//! `{fetch.*}` stand for in one request, and rendering an upstream path from them.

use std::borrow::Cow;

use serde_json::Value;

use super::ctx::RequestCtx;
use crate::caller::{claim_value, scalar, Claims};
use crate::envelope::ErrorCode;
use crate::policy::{RenderError, Template, Upstream, Var};

/// What one request offers its templates.
pub struct Inputs<'a> {
    pub params: &'a [(String, String)],
    pub query: &'a str,
    pub claims: Option<&'a Claims>,
    pub api_client: Option<&'a str>,
}

impl<'a> Inputs<'a> {
    pub fn of(ctx: &'a RequestCtx, query: &'a str) -> Self {
        Inputs {
            params: &ctx.params,
            query,
            claims: ctx.claims.as_deref(),
            api_client: ctx.api_client.as_deref(),
        }
    }

    /// The request's value for a variable; `{fetch.*}` values come from `parent`.
    pub fn value(
        &self,
        var: &Var,
        parent: impl Fn(&str) -> Option<&'a Value>,
    ) -> Option<Cow<'a, str>> {
        match var {
            Var::Path(name) => self
                .params
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| Cow::Borrowed(v.as_str())),
            Var::Query(name) => query_value(self.query, name),
            Var::Jwt(claim) => self.claims.and_then(|c| claim_value(c, claim)),
            Var::AuthClient => self.api_client.map(Cow::Borrowed),
            Var::Fetch { fetch, field } => {
                let doc = parent(fetch)?;
                let found = field.split('.').try_fold(doc, |v, key| v.get(key))?;
                scalar(found)
            }
        }
    }

    /// Renders `template`, mapping a value the request lacks to the client's error.
    pub fn render(
        &self,
        template: &Template,
        parent: impl Fn(&str) -> Option<&'a Value>,
    ) -> Result<String, RenderError> {
        template.render(|var| self.value(var, &parent))
    }

    /// Checks that every value the request itself must supply for a call to `upstream` (not
    /// those from other fetches) is there: the path's and the upstream's `headers`'.
    pub fn check(&self, path: &Template, upstream: &Upstream) -> Result<(), ErrorCode> {
        path.render(|var| match var {
            Var::Fetch { .. } => Some(Cow::Borrowed("x")),
            _ => self.value(var, |_| None),
        })
        .map_err(|e| code_for(&e))?;
        self.check_headers(upstream)
    }

    /// Checks that the upstream's `headers` have the claims they use.
    pub fn check_headers(&self, upstream: &Upstream) -> Result<(), ErrorCode> {
        for (_, template) in &upstream.headers {
            template
                .render(|var| self.value(var, |_| None))
                .map_err(|e| code_for(&e))?;
        }
        Ok(())
    }
}

/// The client-facing code for an input the request cannot supply.
pub fn code_for(error: &RenderError) -> ErrorCode {
    match error {
        // No verified identity: the route cannot be personalised.
        RenderError::Missing(Var::Jwt(_) | Var::AuthClient) => ErrorCode::Unauthenticated,
        RenderError::Missing(_) | RenderError::NotASegment(_) => ErrorCode::BadRequest,
    }
}

/// The first value of `name` in a query string, `+` and percent-escapes decoded.
pub fn query_value<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| -> Option<String> {
            let spaced = s.replace('+', " ");
            percent_encoding::percent_decode_str(&spaced)
                .decode_utf8()
                .ok()
                .map(|v| v.into_owned())
        };
        (decode(key)? == name)
            .then(|| decode(value).map(Cow::Owned))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(query_value("a=1&q=x%2Fy+z", "q").as_deref(), Some("x/y z"));
        assert_eq!(query_value("a=1", "q"), None);
        assert_eq!(query_value("q", "q").as_deref(), Some(""));
    }

    #[test]
    fn claims_and_parent_values_are_strings_or_numbers() {
        let Value::Object(claims) = json!({"sub": "u1", "n": 7, "roles": ["a"], "o": {}}) else {
            unreachable!()
        };
        let inputs = Inputs {
            params: &[],
            query: "",
            claims: Some(&claims),
            api_client: None,
        };
        let none = |_: &str| None;
        assert_eq!(
            inputs.value(&Var::Jwt("sub".into()), none).as_deref(),
            Some("u1")
        );
        assert_eq!(
            inputs.value(&Var::Jwt("n".into()), none).as_deref(),
            Some("7")
        );
        assert_eq!(inputs.value(&Var::Jwt("roles".into()), none), None);
        assert_eq!(inputs.value(&Var::Jwt("o".into()), none), None);

        let user = json!({"loyalty": {"tier": "gold"}, "ids": [1]});
        let parent = |name: &str| (name == "user").then_some(&user);
        let var = |field: &str| Var::Fetch {
            fetch: "user".into(),
            field: field.into(),
        };
        assert_eq!(
            inputs.value(&var("loyalty.tier"), parent).as_deref(),
            Some("gold")
        );
        assert_eq!(inputs.value(&var("loyalty"), parent), None);
        assert_eq!(inputs.value(&var("ids"), parent), None);
        assert_eq!(inputs.value(&var("missing.x"), parent), None);
    }
}
