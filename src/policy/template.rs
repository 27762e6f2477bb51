//! Templates of upstream paths and headers: `{jwt.sub}`, `{path.id}`, `{query.q}`,
//! `{fetch.user.tier}`. In a path each value is percent-encoded as exactly one path segment or
//! query value; in a header it is taken as it is and must make a valid header value.

use std::borrow::Cow;
use std::fmt;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Everything but RFC 3986 "unreserved" is encoded, so a value can never add a segment (`/`),
/// start a query (`?`), add a parameter (`&`, `=`) or a fragment (`#`).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Where a template variable's value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Var {
    Jwt(String),
    /// `{auth.client}`: the name of the API key the request presented.
    AuthClient,
    Path(String),
    Query(String),
    /// A value from another fetch's answer (after its `select`): `{fetch.NAME.a.b}`.
    Fetch {
        fetch: String,
        field: String,
    },
}

impl fmt::Display for Var {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Var::Jwt(n) => write!(f, "jwt.{n}"),
            Var::AuthClient => write!(f, "auth.client"),
            Var::Path(n) => write!(f, "path.{n}"),
            Var::Query(n) => write!(f, "query.{n}"),
            Var::Fetch { fetch, field } => write!(f, "fetch.{fetch}.{field}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Var(Var),
}

/// A parsed upstream path such as `/users/{jwt.sub}/orders?limit=3`, or a header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    raw: String,
    parts: Vec<Part>,
    /// Header values are substituted as they are; path values are percent-encoded.
    header: bool,
}

/// Why a template could not be rendered for one request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("no value for `{{{0}}}`")]
    Missing(Var),
    /// Empty, `.` and `..` would remove or climb a segment once an upstream normalises the path.
    #[error("value of `{{{0}}}` cannot stand as a path segment")]
    NotASegment(Var),
}

impl Template {
    /// Parses an upstream path.
    pub fn parse(raw: &str) -> Result<Template, String> {
        if !raw.starts_with('/') {
            return Err(format!("path `{raw}` must start with `/`"));
        }
        if raw.contains('#') {
            return Err(format!("path `{raw}` must not contain a fragment (`#`)"));
        }
        Self::parse_parts(raw, false)
    }

    /// Parses a header value such as `{jwt.sub}` or `tenant={jwt.tid}`.
    pub fn parse_header(raw: &str) -> Result<Template, String> {
        Self::parse_parts(raw, true)
    }

    fn parse_parts(raw: &str, header: bool) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = raw;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err(format!(
                    "{} `{raw}` has a `}}` without its `{{`",
                    kind(header)
                ));
            }
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("{} `{raw}` has a `{{` without its `}}`", kind(header)))?;
            parts.push(Part::Var(parse_var(&after[..close])?));
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Template {
            raw: raw.to_string(),
            parts,
            header,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v),
            Part::Literal(_) => None,
        })
    }

    /// Renders the template; in a path every substituted value is percent-encoded.
    pub fn render<'a>(
        &self,
        lookup: impl Fn(&Var) -> Option<Cow<'a, str>>,
    ) -> Result<String, RenderError> {
        let mut out = String::with_capacity(self.raw.len() + 16);
        let mut in_query = false;
        for part in &self.parts {
            match part {
                Part::Literal(text) => {
                    in_query |= text.contains('?');
                    out.push_str(text);
                }
                Part::Var(var) => {
                    let value = lookup(var).ok_or_else(|| RenderError::Missing(var.clone()))?;
                    if self.header {
                        out.push_str(&value);
                        continue;
                    }
                    if !in_query && matches!(&*value, "" | "." | "..") {
                        return Err(RenderError::NotASegment(var.clone()));
                    }
                    out.extend(utf8_percent_encode(&value, SEGMENT));
                }
            }
        }
        Ok(out)
    }
}

fn kind(header: bool) -> &'static str {
    if header {
        "value"
    } else {
        "path"
    }
}

const SOURCES: &str =
    "use {jwt.CLAIM}, {auth.client}, {path.NAME}, {query.NAME} or {fetch.NAME.FIELD}";

fn parse_var(text: &str) -> Result<Var, String> {
    let (namespace, name) = text
        .split_once('.')
        .ok_or_else(|| format!("`{{{text}}}` is not a template variable; {SOURCES}"))?;
    let valid = |name: &str| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if namespace == "fetch" {
        // `fetch.NAME.a.b`: a fetch's name, then a dotted path into its answer.
        return match name.split_once('.') {
            Some((fetch, field)) if valid(fetch) && field.split('.').all(valid) => Ok(Var::Fetch {
                fetch: fetch.to_string(),
                field: field.to_string(),
            }),
            _ => Err(format!(
                "`{{{text}}}`: write `{{fetch.NAME.FIELD}}`, where FIELD may be a dotted path"
            )),
        };
    }
    if !valid(name) {
        return Err(format!(
            "`{{{text}}}`: `{name}` is not a valid variable name"
        ));
    }
    let name = name.to_string();
    match namespace {
        "jwt" => Ok(Var::Jwt(name)),
        "auth" if name == "client" => Ok(Var::AuthClient),
        "auth" => Err(format!(
            "`{{{text}}}`: `auth` offers only `{{auth.client}}`, the API key's name"
        )),
        "path" => Ok(Var::Path(name)),
        "query" => Ok(Var::Query(name)),
        other => Err(format!("`{{{text}}}`: unknown source `{other}`; {SOURCES}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(t: &str, value: &str) -> Result<String, RenderError> {
        Template::parse(t)
            .unwrap()
            .render(|_| Some(Cow::Owned(value.to_string())))
    }

    #[test]
    fn substitutes_and_encodes_one_segment() {
        assert_eq!(
            render("/users/{jwt.sub}/orders?limit=3", "u1").unwrap(),
            "/users/u1/orders?limit=3"
        );
        assert_eq!(
            render("/users/{jwt.sub}", "../admin").unwrap(),
            "/users/..%2Fadmin"
        );
        assert_eq!(
            render("/users/{jwt.sub}", "x?role=admin").unwrap(),
            "/users/x%3Frole%3Dadmin"
        );
        assert_eq!(
            render("/s?q={query.q}", "a&b=c#d").unwrap(),
            "/s?q=a%26b%3Dc%23d"
        );
        assert_eq!(render("/u/{path.id}", "é").unwrap(), "/u/%C3%A9");
    }

    #[test]
    fn dot_segments_and_empty_values_are_refused_in_the_path() {
        for v in ["", ".", ".."] {
            assert!(matches!(
                render("/users/{jwt.sub}", v),
                Err(RenderError::NotASegment(_))
            ));
        }
        assert_eq!(render("/s?q={query.q}", "").unwrap(), "/s?q=");
    }

    #[test]
    fn missing_values_are_named() {
        let t = Template::parse("/u/{path.id}").unwrap();
        assert_eq!(
            t.render(|_| None).unwrap_err().to_string(),
            "no value for `{path.id}`"
        );
    }

    #[test]
    fn fetch_variables_name_a_fetch_and_a_path() {
        let t = Template::parse("/tiers/{fetch.user.loyalty.tier}").unwrap();
        assert_eq!(
            t.vars().collect::<Vec<_>>(),
            [&Var::Fetch {
                fetch: "user".into(),
                field: "loyalty.tier".into()
            }]
        );
        for bad in ["/t/{fetch.user}", "/t/{fetch.user.}", "/t/{fetch.user..a}"] {
            assert!(Template::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn header_values_are_not_encoded() {
        let t = Template::parse_header("user {jwt.sub}").unwrap();
        assert_eq!(
            t.render(|_| Some(Cow::Borrowed("a/b c"))).unwrap(),
            "user a/b c"
        );
    }

    #[test]
    fn malformed_templates_are_rejected() {
        for bad in [
            "users/{jwt.sub}",
            "/u/{jwt.sub",
            "/u/jwt.sub}",
            "/u/{sub}",
            "/u/{env.HOME}",
            "/u/{jwt.}",
            "/u/{jwt.a/b}",
            "/u#frag",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad} should be rejected");
        }
    }
}
