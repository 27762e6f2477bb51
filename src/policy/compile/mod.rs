//! Validation: turns a `RawPolicy` into a `Policy`, collecting every rule violation with the
//! line and column of the value at fault.
//!
//! One file per part of the policy: `upstream` (with its `credential` and `oauth2` in
//! `credential`), `auth` (the policy's and each route's), `route`, the fetch graph of a route
//! (`fetch`), `cache`, `rate_limit` (and the client address it keys on), and what templates may
//! refer to (`scope`). `diagnostics` collects the violations; `names` holds the naming rules.

mod auth;
mod cache;
mod credential;
mod diagnostics;
mod fetch;
mod names;
mod rate_limit;
mod route;
mod scope;
mod upstream;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use indexmap::IndexMap;
use serde_saphyr::Spanned;

use super::route_table::RouteTable;
use crate::policy::raw::RawPolicy;
use crate::policy::{Diagnostic, Policy};
use auth::compile_auth;
use diagnostics::Diagnostics;
use names::is_identifier;
use rate_limit::{compile_client_address, compile_rate_limit};
use route::compile_route;
use scope::Identities;
use upstream::compile_upstream;

pub(super) fn compile(raw: RawPolicy, path: &Path) -> Result<Policy, Vec<Diagnostic>> {
    let base_dir = path.parent().unwrap_or(Path::new("."));
    let mut diags = Diagnostics::default();

    let client = raw.client.value.clone();
    if !is_identifier(&client) {
        diags.at(
            &raw.client.referenced,
            format!("client `{client}` must be lower-case letters, digits, `-` or `_`"),
        );
    }

    let raw_auth = raw.auth.as_ref().map(|a| Identities {
        jwt: a.value.jwt.is_some(),
        api_key: a.value.api_key.is_some(),
    });
    let auth = raw
        .auth
        .and_then(|auth| compile_auth(auth, base_dir, &mut diags));
    // What templates may refer to, judged by what the policy says even when a part of its
    // `auth` is invalid (already reported): judging them by a broken `auth` would add noise.
    let identities = raw_auth.unwrap_or(Identities::NONE);

    let defined: HashSet<String> = raw
        .upstreams
        .0
        .iter()
        .map(|(n, _)| n.value.clone())
        .collect();
    let mut upstreams = IndexMap::new();
    for (name, spec) in raw.upstreams.0 {
        if !is_identifier(&name.value) {
            diags.at(
                &name.referenced,
                format!(
                    "upstream name `{}` must be lower-case letters, digits, `-` or `_`",
                    name.value
                ),
            );
        }
        if let Some(upstream) =
            compile_upstream(&name.value, spec, base_dir, identities, &mut diags)
        {
            upstreams.insert(name.value, Arc::new(upstream));
        }
    }
    let find_upstream = |diags: &mut Diagnostics, name: &Spanned<String>| {
        let found = upstreams.get(&name.value).cloned();
        // An upstream that is defined but invalid was reported where it is defined.
        if found.is_none() && !defined.contains(&name.value) {
            diags.at(
                &name.referenced,
                format!("upstream `{}` is not defined under `upstreams`", name.value),
            );
        }
        found
    };

    let rate_limit = raw
        .rate_limit
        .and_then(|r| compile_rate_limit(r, "", "rate_limit", &mut diags));
    let client_address = raw
        .client_address
        .map(|spec| compile_client_address(spec, &mut diags))
        .unwrap_or_default();

    let mut routes = Vec::new();
    let mut names = HashSet::new();
    let mut route_locations = Vec::new();
    for spec in raw.routes {
        let location = spec.referenced;
        let name = &spec.value.name;
        if !names.insert(name.value.clone()) {
            diags.at(
                &name.referenced,
                format!("route name `{}` is used twice", name.value),
            );
        }
        if let Some(route) = compile_route(spec.value, identities, &find_upstream, &mut diags) {
            routes.push(Arc::new(route));
            route_locations.push(location);
        }
    }

    let fallthrough = raw.fallthrough.as_ref().and_then(|name| {
        let upstream = find_upstream(&mut diags, name)?;
        // Pingora proxies the fallthrough itself, and it is built without TLS.
        if upstream.tls.is_some() {
            diags.at(
                &name.referenced,
                format!(
                    "`fallthrough` upstream `{}` has an https:// url; the app beside the sidecar is reached over http://",
                    name.value
                ),
            );
            return None;
        }
        Some(upstream)
    });

    let table = match RouteTable::build(routes.iter().map(|r| (r.method.clone(), r.path.as_str())))
    {
        Ok(table) => Some(table),
        Err(collisions) => {
            for (index, message) in collisions {
                diags.at(&route_locations[index], message);
            }
            None
        }
    };

    match table {
        Some(table) if diags.0.is_empty() => Ok(Policy {
            client,
            source: path.to_path_buf(),
            auth,
            upstreams,
            rate_limit,
            client_address,
            routes,
            table,
            fallthrough,
        }),
        _ => Err(diags.0),
    }
}
