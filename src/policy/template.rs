//! Path templates of fetches and proxy routes: `{jwt.sub}`, `{path.id}`, `{query.q}`, each value
//! percent-encoded as exactly one path segment or query value when rendered.

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
    Path(String),
    Query(String),
}

impl fmt::Display for Var {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Var::Jwt(n) => write!(f, "jwt.{n}"),
            Var::Path(n) => write!(f, "path.{n}"),
            Var::Query(n) => write!(f, "query.{n}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Var(Var),
}

/// A parsed upstream path such as `/users/{jwt.sub}/orders?limit=3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    raw: String,
    parts: Vec<Part>,
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
    pub fn parse(raw: &str) -> Result<Template, String> {
        if !raw.starts_with('/') {
            return Err(format!("path `{raw}` must start with `/`"));
        }
        if raw.contains('#') {
            return Err(format!("path `{raw}` must not contain a fragment (`#`)"));
        }
        let mut parts = Vec::new();
        let mut rest = raw;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err(format!("path `{raw}` has a `}}` without its `{{`"));
            }
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("path `{raw}` has a `{{` without its `}}`"))?;
            parts.push(Part::Var(parse_var(&after[..close])?));
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Template {
            raw: raw.to_string(),
            parts,
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

    /// Renders the template, percent-encoding every substituted value.
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

fn parse_var(text: &str) -> Result<Var, String> {
    let (namespace, name) = text
        .split_once('.')
        .ok_or_else(|| format!("`{{{text}}}` is not a template variable; use {{jwt.CLAIM}}, {{path.NAME}} or {{query.NAME}}"))?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "`{{{text}}}`: `{name}` is not a valid variable name"
        ));
    }
    let name = name.to_string();
    match namespace {
        "jwt" => Ok(Var::Jwt(name)),
        "path" => Ok(Var::Path(name)),
        "query" => Ok(Var::Query(name)),
        other => Err(format!(
            "`{{{text}}}`: unknown source `{other}`; use {{jwt.CLAIM}}, {{path.NAME}} or {{query.NAME}}"
        )),
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
