//! Routing: method + path → the policy route that owns the request, with its path parameters.
//! Paths arrive normalised (`pipeline::path`); a trailing slash does not change the route, and
//! `HEAD` is served by the `GET` route of a path that has no `HEAD` route of its own.

use http::Method;
use indexmap::IndexMap;
use percent_encoding::percent_decode_str;

/// Route lookup for one policy, built once at load time.
#[derive(Debug)]
pub struct RouteTable {
    /// Each distinct path maps to the methods it serves and the index of their route.
    router: matchit::Router<Vec<(Method, usize)>>,
}

/// The outcome of routing one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Found {
        route: usize,
        /// Parameter names with their percent-decoded values.
        params: Vec<(String, String)>,
    },
    /// The path exists, not for this method: `allow` lists the methods that it has.
    WrongMethod {
        allow: Vec<Method>,
    },
    NotFound,
    /// A parameter is not valid UTF-8 once percent-decoded.
    BadPath,
}

impl RouteTable {
    /// Builds the table; on collisions returns, per offending route index, what it collides with.
    pub fn build<'a>(
        routes: impl Iterator<Item = (Method, &'a str)>,
    ) -> Result<RouteTable, Vec<(usize, String)>> {
        let mut by_path: IndexMap<&str, Vec<(Method, usize)>> = IndexMap::new();
        let mut errors = Vec::new();
        for (index, (method, path)) in routes.enumerate() {
            let entry = by_path.entry(without_trailing_slash(path)).or_default();
            if entry.iter().any(|(m, _)| *m == method) {
                errors.push((
                    index,
                    format!("another route already serves {method} {path}"),
                ));
            } else {
                entry.push((method, index));
            }
        }
        let mut router = matchit::Router::new();
        for (path, methods) in by_path {
            let first = methods.first().map_or(0, |(_, i)| *i);
            if let Err(e) = router.insert(path, methods) {
                let message = match e {
                    matchit::InsertError::Conflict { with } => {
                        format!("path `{path}` collides with the path `{with}` of another route")
                    }
                    other => format!("path `{path}`: {other}"),
                };
                errors.push((first, message));
            }
        }
        if errors.is_empty() {
            Ok(RouteTable { router })
        } else {
            Err(errors)
        }
    }

    /// `path` must be normalised (`pipeline::path::normalize`).
    pub fn lookup(&self, method: &Method, path: &str) -> Lookup {
        let Ok(found) = self.router.at(without_trailing_slash(path)) else {
            return Lookup::NotFound;
        };
        let serving = |method: &Method| found.value.iter().find(|(m, _)| m == method);
        let chosen = match serving(method) {
            None if *method == Method::HEAD => serving(&Method::GET),
            chosen => chosen,
        };
        let Some((_, route)) = chosen else {
            let mut allow: Vec<Method> = found.value.iter().map(|(m, _)| m.clone()).collect();
            if allow.contains(&Method::GET) && !allow.contains(&Method::HEAD) {
                allow.push(Method::HEAD);
            }
            return Lookup::WrongMethod { allow };
        };
        let mut params = Vec::with_capacity(found.params.len());
        for (name, raw) in found.params.iter() {
            match percent_decode_str(raw).decode_utf8() {
                Ok(value) => params.push((name.to_string(), value.into_owned())),
                Err(_) => return Lookup::BadPath,
            }
        }
        Lookup::Found {
            route: *route,
            params,
        }
    }
}

/// `/a/` and `/a` are one route (and so one collision); `/` stays itself.
fn without_trailing_slash(path: &str) -> &str {
    match path.strip_suffix('/') {
        Some(stripped) if !stripped.is_empty() => stripped,
        _ => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &[(&str, &str)]) -> Result<RouteTable, Vec<(usize, String)>> {
        RouteTable::build(
            routes
                .iter()
                .map(|(m, p)| (Method::from_bytes(m.as_bytes()).unwrap(), *p)),
        )
    }

    #[test]
    fn finds_routes_with_decoded_params() {
        let t = table(&[("GET", "/a/{id}"), ("POST", "/a/{id}"), ("GET", "/a/me")]).unwrap();
        assert_eq!(
            t.lookup(&Method::GET, "/a/x%2Fy"),
            Lookup::Found {
                route: 0,
                params: vec![("id".into(), "x/y".into())]
            }
        );
        assert_eq!(
            t.lookup(&Method::POST, "/a/1"),
            Lookup::Found {
                route: 1,
                params: vec![("id".into(), "1".into())]
            }
        );
        // A static segment wins over a parameter.
        assert_eq!(
            t.lookup(&Method::GET, "/a/me"),
            Lookup::Found {
                route: 2,
                params: vec![]
            }
        );
        assert_eq!(
            t.lookup(&Method::DELETE, "/a/1"),
            Lookup::WrongMethod {
                allow: vec![Method::GET, Method::POST, Method::HEAD]
            }
        );
        assert_eq!(t.lookup(&Method::GET, "/b"), Lookup::NotFound);
        assert_eq!(t.lookup(&Method::GET, "/a/%FF"), Lookup::BadPath);
    }

    #[test]
    fn trailing_slash_and_head_find_the_route() {
        let t = table(&[("GET", "/a/{id}"), ("POST", "/b/"), ("GET", "/")]).unwrap();
        let found = |route, params: &[(&str, &str)]| Lookup::Found {
            route,
            params: params
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        };
        assert_eq!(t.lookup(&Method::GET, "/a/1/"), found(0, &[("id", "1")]));
        assert_eq!(t.lookup(&Method::HEAD, "/a/1"), found(0, &[("id", "1")]));
        assert_eq!(t.lookup(&Method::POST, "/b"), found(1, &[]));
        assert_eq!(t.lookup(&Method::POST, "/b/"), found(1, &[]));
        assert_eq!(t.lookup(&Method::GET, "/"), found(2, &[]));
        assert_eq!(
            t.lookup(&Method::HEAD, "/b"),
            Lookup::WrongMethod {
                allow: vec![Method::POST]
            }
        );
        // A route of its own for HEAD wins over GET's.
        let t = table(&[("GET", "/a"), ("HEAD", "/a")]).unwrap();
        assert_eq!(t.lookup(&Method::HEAD, "/a"), found(1, &[]));
        // `/a` and `/a/` are the same route.
        assert!(table(&[("GET", "/a"), ("GET", "/a/")]).is_err());
    }

    #[test]
    fn collisions_are_reported_per_route() {
        let errors = table(&[("GET", "/a/{id}"), ("GET", "/a/{id}")]).unwrap_err();
        assert_eq!(errors[0].0, 1);
        let errors = table(&[("GET", "/a/{id}"), ("GET", "/a/{name}")]).unwrap_err();
        assert_eq!(errors[0].0, 1);
        assert!(errors[0].1.contains("collides"), "{errors:?}");
    }
}
