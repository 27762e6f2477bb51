//! policy::compile::fetch: a route's fetches and the graph between them: each fetch's parents
//! and wave, cycles, which answers are personal, and which fetches may cache on their own.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

use super::diagnostics::Diagnostics;
use super::names::is_section_name;
use super::scope::{compile_fields, compile_template, TemplateScope};
use super::upstream::FindUpstream;
use crate::policy::raw;
use crate::policy::template::{Template, Var};
use crate::policy::{Fetch, FetchCache, Upstream};
use crate::projection;

/// The fetch, and what the route's dependency checks need to know of it even when something
/// else in it is wrong.
pub(super) fn compile_fetch(
    name: &Spanned<String>,
    spec: Spanned<raw::RawFetch>,
    scope: &TemplateScope,
    find_upstream: FindUpstream,
    diags: &mut Diagnostics,
) -> (FetchNode, Option<Fetch>) {
    let at = spec.referenced;
    let spec = spec.value;
    let (name_at, name) = (name.referenced, name.value.as_str());
    if !is_section_name(name) {
        diags.at(
            &name_at,
            format!("fetch name `{name}` must be letters, digits or `_`, starting with a letter"),
        );
    }
    let upstream = find_upstream(diags, &spec.upstream);
    let path = compile_template(&spec.path, scope, diags);
    let fields = compile_fields(spec.fields, &at, &format!("fetch `{name}`"), diags);
    let select = spec.select.and_then(|s| {
        diags
            .check(&s.referenced, projection::validate_select(&s.value))
            .map(|()| s.value)
    });
    match (spec.critical, &spec.fallback) {
        (true, Some(fallback)) => diags.at(
            &fallback.referenced,
            format!("fetch `{name}` is critical: its `fallback` would never be used"),
        ),
        (false, None) => diags.at(
            &at,
            format!(
                "fetch `{name}` must say `critical: true`, or be optional and give a `fallback`"
            ),
        ),
        _ => {}
    }
    let cache_at = spec.cache.as_ref().map(|c| c.referenced);
    let cache = spec.cache.map(|c| {
        let c = c.value;
        if c.ttl.value.0.is_zero() {
            diags.at(&c.ttl.referenced, "cache `ttl` must be longer than zero");
        }
        FetchCache {
            ttl: c.ttl.value.0,
            jitter: c.jitter.map_or(Duration::ZERO, |j| j.0),
        }
    });
    let node = FetchNode {
        name: name.to_string(),
        cache_at,
        path_at: spec.path.referenced,
        critical: spec.critical,
        path: path.clone(),
        upstream: upstream.clone(),
    };
    let fetch = match (upstream, path, fields) {
        (Some(upstream), Some(path), Some(fields)) => Some(Fetch {
            name: name.to_string(),
            upstream,
            path,
            critical: spec.critical,
            select,
            fields,
            fallback: spec.fallback.map(|f| f.value),
            // Filled in by `link_fetches`, once every fetch of the route is known.
            parents: Vec::new(),
            wave: 0,
            cache,
        }),
        _ => None,
    };
    (node, fetch)
}

/// What the dependency checks need to know of one fetch, valid or not.
pub(super) struct FetchNode {
    pub(super) name: String,
    /// Where its own `cache` is, if it has one.
    pub(super) cache_at: Option<Location>,
    pub(super) path_at: Location,
    pub(super) critical: bool,
    pub(super) path: Option<Template>,
    pub(super) upstream: Option<Arc<Upstream>>,
}

/// Where a fetch stands among the route's fetches.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Link {
    /// Indexes of the fetches its path uses, in file order, once each.
    pub(super) parents: Vec<usize>,
    pub(super) wave: usize,
    /// False for a fetch that is in a cycle or waits on one (reported).
    pub(super) ordered: bool,
}

/// Resolves `{fetch.NAME.FIELD}` between the fetches of route `route`, giving each fetch its
/// parents and wave; reports unknown names, self-references, cycles, and critical fetches that
/// wait on optional ones.
pub(super) fn link_fetches(route: &str, nodes: &[FetchNode], diags: &mut Diagnostics) -> Vec<Link> {
    let index_of = |name: &str| nodes.iter().position(|n| n.name == name);
    let mut links = vec![Link::default(); nodes.len()];
    for (i, node) in nodes.iter().enumerate() {
        let Some(path) = &node.path else { continue };
        let mut reported = HashSet::new();
        for var in path.vars() {
            let Var::Fetch { fetch, .. } = var else {
                continue;
            };
            match index_of(fetch) {
                Some(j) if j == i => {
                    if reported.insert(fetch) {
                        diags.at(
                            &node.path_at,
                            format!(
                                "fetch `{}` uses `{{{var}}}`: a fetch cannot wait for its own answer",
                                node.name
                            ),
                        );
                    }
                }
                Some(j) => links[i].parents.push(j),
                None => {
                    if reported.insert(fetch) {
                        let known: Vec<String> =
                            nodes.iter().map(|n| format!("`{}`", n.name)).collect();
                        diags.at(
                            &node.path_at,
                            format!(
                                "fetch `{}` uses `{{{var}}}`, but route `{route}` has no fetch `{fetch}` (its fetches: {})",
                                node.name,
                                known.join(", ")
                            ),
                        );
                    }
                }
            }
        }
        links[i].parents.sort_unstable();
        links[i].parents.dedup();
        for &j in &links[i].parents {
            if node.critical && !nodes[j].critical {
                diags.at(
                    &node.path_at,
                    format!(
                        "critical fetch `{}` uses the answer of optional fetch `{}`: when `{}` fails, `{}` cannot run; make `{}` critical or `{}` optional",
                        node.name, nodes[j].name, nodes[j].name, node.name, nodes[j].name, node.name
                    ),
                );
            }
        }
    }

    // Waves, in topological order (Kahn): a fetch is ready once all its parents are.
    let mut waiting: Vec<usize> = links.iter().map(|l| l.parents.len()).collect();
    let mut children = vec![Vec::new(); nodes.len()];
    for (i, link) in links.iter().enumerate() {
        for &j in &link.parents {
            children[j].push(i);
        }
    }
    let mut ready: VecDeque<usize> = (0..nodes.len()).filter(|&i| waiting[i] == 0).collect();
    while let Some(i) = ready.pop_front() {
        links[i].ordered = true;
        links[i].wave = links[i]
            .parents
            .iter()
            .map(|&j| links[j].wave + 1)
            .max()
            .unwrap_or(0);
        for &child in &children[i] {
            waiting[child] -= 1;
            if waiting[child] == 0 {
                ready.push_back(child);
            }
        }
    }

    // Every fetch left has a parent left, so following those parents must come round: report
    // each circle once, starting from its first fetch in the file.
    let mut walked = vec![false; nodes.len()];
    for start in 0..nodes.len() {
        if links[start].ordered || walked[start] {
            continue;
        }
        let mut trail = vec![start];
        walked[start] = true;
        let parents_left = |i: usize| {
            links[i]
                .parents
                .iter()
                .copied()
                .find(|&j| !links[j].ordered)
        };
        let closed_at = loop {
            match parents_left(trail[trail.len() - 1]) {
                Some(j) if walked[j] => break trail.iter().position(|&i| i == j),
                Some(j) => {
                    walked[j] = true;
                    trail.push(j);
                }
                None => break None,
            }
        };
        // `None`: ran into a circle reported already.
        let Some(from) = closed_at else { continue };
        let mut circle = trail[from..].to_vec();
        let first = (0..circle.len())
            .min_by_key(|&k| circle[k])
            .unwrap_or_default();
        circle.rotate_left(first);
        let names: Vec<String> = circle
            .iter()
            .chain(circle.first())
            .map(|&i| format!("`{}`", nodes[i].name))
            .collect();
        diags.at(
            &nodes[circle[0]].path_at,
            format!(
                "route `{route}`: fetches {} form a cycle (each uses the next one's answer), so none of them can start",
                names.join(" → ")
            ),
        );
    }
    links
}

/// A fetch's own `cache` holds its projected answer for everyone: never a personal one, and
/// never one whose answer another fetch reads (that needs the answer before projection).
pub(super) fn check_fetch_caches(
    nodes: &[FetchNode],
    links: &[Link],
    personal: &[(String, String)],
    diags: &mut Diagnostics,
) {
    for (index, node) in nodes.iter().enumerate() {
        let Some(at) = &node.cache_at else { continue };
        if let Some((_, reason)) = personal.iter().find(|(name, _)| *name == node.name) {
            diags.at(
                at,
                format!("fetch `{}` {reason}: its own `cache` is shared by everyone, so it is only for data that is the same for every user", node.name),
            );
        }
        if let Some(child) = links.iter().position(|l| l.parents.contains(&index)) {
            diags.at(
                at,
                format!(
                    "fetch `{}` cannot have its own `cache`: fetch `{}` uses its answer, which the cache does not keep (only the projected section)",
                    node.name, nodes[child].name
                ),
            );
        }
    }
}

/// The fetches whose answer depends on who asks, each with the reason: a `{jwt.*}` in its path
/// or in its upstream's headers, or a parent that is personal.
pub(super) fn personal_fetches(nodes: &[FetchNode], links: &[Link]) -> Vec<(String, String)> {
    let direct = |node: &FetchNode| -> Option<String> {
        let jwt = |t: &Template| {
            t.vars()
                .find(|v| matches!(v, Var::Jwt(_) | Var::AuthClient))
                .cloned()
        };
        if let Some(var) = node.path.as_ref().and_then(jwt) {
            return Some(format!("uses `{{{var}}}`"));
        }
        let upstream = node.upstream.as_ref()?;
        upstream.headers.iter().find_map(|(header, value)| {
            jwt(value).map(|var| {
                format!(
                    "calls upstream `{}`, whose header `{header}` uses `{{{var}}}`",
                    upstream.name
                )
            })
        })
    };
    let reasons: Vec<Option<String>> = nodes.iter().map(direct).collect();
    // The personal fetch each fetch's answer comes from (itself first), in dependency order.
    let mut root: Vec<Option<usize>> = reasons
        .iter()
        .enumerate()
        .map(|(i, r)| r.as_ref().map(|_| i))
        .collect();
    let mut order: Vec<usize> = (0..nodes.len()).filter(|&i| links[i].ordered).collect();
    order.sort_by_key(|&i| links[i].wave);
    for i in order {
        if root[i].is_none() {
            root[i] = links[i].parents.iter().find_map(|&j| root[j]);
        }
    }
    root.iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let r = (*r)?;
            let reason = reasons[r].clone()?;
            let reason = if r == i {
                reason
            } else {
                format!("depends on fetch `{}`, which {reason}", nodes[r].name)
            };
            Some((nodes[i].name.clone(), reason))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::policy::{Action, Policy};
    use std::path::Path;

    const HEAD: &str = "client: t
upstreams:
  svc:
    url: http://127.0.0.1:9
routes:
  - name: r
    method: GET
    path: /r
    fetch:
";

    /// `(name, parents, wave)` of each fetch of the one route of a policy with these fetches.
    fn links(fetches: &str) -> Vec<(String, Vec<usize>, usize)> {
        let policy = Policy::from_yaml(&format!("{HEAD}{fetches}"), Path::new("t.yaml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let Action::Fetch(fetches) = &policy.routes[0].action else {
            panic!("a fetch route")
        };
        fetches
            .iter()
            .map(|f| (f.name.clone(), f.parents.clone(), f.wave))
            .collect()
    }

    fn fetch(name: &str, path: &str) -> String {
        format!(
            "      {name}: {{ upstream: svc, path: \"{path}\", critical: true, fields: [a] }}\n"
        )
    }

    #[test]
    fn a_chain_runs_in_successive_waves_in_file_order() {
        // Written child first: the list keeps file order, indexes point into it.
        let got = links(
            &[
                fetch("c", "/c/{fetch.b.id}"),
                fetch("b", "/b/{fetch.a.id}"),
                fetch("a", "/a"),
            ]
            .concat(),
        );
        assert_eq!(
            got,
            [
                ("c".to_string(), vec![1], 2),
                ("b".to_string(), vec![2], 1),
                ("a".to_string(), vec![], 0),
            ]
        );
    }

    #[test]
    fn parents_are_sorted_and_unique_and_the_wave_follows_the_latest() {
        let got = links(
            &[
                fetch("a", "/a"),
                fetch("b", "/b/{fetch.a.id}"),
                fetch("c", "/c"),
                fetch(
                    "d",
                    "/d/{fetch.c.x}/{fetch.b.y}?again={fetch.c.z}&a={fetch.a.w}",
                ),
            ]
            .concat(),
        );
        let waves: Vec<_> = got.iter().map(|(_, _, w)| *w).collect();
        assert_eq!(waves, [0, 1, 0, 2]);
        assert_eq!(got[3].1, [0, 1, 2]);
    }
}
