//! Fan-out: a `fetch` route's calls, all at once (dependent fetches in waves after their
//! parents), each answer selected and projected as it arrives, within the route's deadline.
//! A failed critical fetch ends the route at once, cancelling the calls still running; a
//! failed optional fetch (and every fetch depending on it) is left to its fallback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use futures::stream::{FuturesUnordered, StreamExt};
use http::{HeaderMap, Method};
use serde_json::Value;
use tracing::warn;

use super::inputs::Inputs;
use crate::cache::entry::now_ms;
use crate::cache::{jittered, key, Cache, Entry, Layer, RouteFailure, Section, Sections};
use crate::metrics::{Metrics, Outcome};
use crate::policy::{CacheScope, Fetch, Route, Var};
use crate::projection;
use crate::upstream::{Call, CallError, Caller, Failure, Upstreams};

/// Per request: what the fetches need besides their own policy.
pub struct Request<'a> {
    pub route: &'a Route,
    pub inputs: &'a Inputs<'a>,
    pub caller: Caller<'a>,
    pub metrics: &'a Metrics,
    pub client: &'a str,
    /// Where fetches with a `cache` of their own keep their answers.
    pub cache: Option<&'a Arc<Cache>>,
    /// When the route's `deadline` passes: counted from the request's start, so time spent
    /// waiting for another instance's recompute is part of it.
    pub deadline: Option<Instant>,
}

/// A finished fetch: its section, and the selected answer its children read `{fetch.*}` from.
struct Done {
    section: Section,
    doc: Option<Value>,
}

/// Runs every fetch; sections come back in the route's fetch order.
pub async fn run(
    fetches: &[Fetch],
    upstreams: &Upstreams,
    request: &Request<'_>,
) -> Result<Vec<Section>, RouteFailure> {
    let deadline = request.deadline;
    let mut done: Vec<Option<Done>> = (0..fetches.len()).map(|_| None).collect();
    let waves = fetches.iter().map(|f| f.wave).max().unwrap_or(0);
    for wave in 0..=waves {
        let mut running = FuturesUnordered::new();
        for (index, fetch) in fetches.iter().enumerate().filter(|(_, f)| f.wave == wave) {
            match start(index, fetch, fetches, &done, upstreams, request) {
                Ok(call) => running.push(call),
                Err(error) => done[index] = Some(failed(fetch, error, request)?),
            }
        }
        loop {
            let next = match deadline {
                Some(at) => match tokio::time::timeout_at(at.into(), running.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        drop(running);
                        return overrun(fetches, done, wave, request);
                    }
                },
                None => running.next().await,
            };
            let Some((index, result)) = next else { break };
            let fetch = &fetches[index];
            done[index] = Some(match result {
                Ok((section, doc)) => Done {
                    section: Section::Ok(section),
                    doc,
                },
                Err(error) => failed(fetch, error, request)?,
            });
        }
    }
    Ok(sections(done))
}

/// The sections in fetch order; a fetch that never finished holds its fallback.
fn sections(done: Vec<Option<Done>>) -> Vec<Section> {
    done.into_iter()
        .map(|d| d.map_or(Section::Degraded, |d| d.section))
        .collect()
}

type Projected = (Vec<u8>, Option<Value>);

/// Renders a fetch's path from the request and its parents' answers, and starts its call.
fn start<'a>(
    index: usize,
    fetch: &'a Fetch,
    fetches: &'a [Fetch],
    done: &[Option<Done>],
    upstreams: &'a Upstreams,
    request: &'a Request<'a>,
) -> Result<impl std::future::Future<Output = (usize, Result<Projected, CallError>)> + 'a, CallError>
{
    let fail = |reason: String| CallError {
        upstream: fetch.upstream.name.clone(),
        failure: Failure::Request(reason),
    };
    if let Some(parent) = fetch
        .parents
        .iter()
        .find(|p| !matches!(done[**p].as_ref(), Some(d) if matches!(d.section, Section::Ok(_))))
    {
        return Err(fail(format!("fetch `{}` failed", fetches[*parent].name)));
    }
    let parent = |name: &str| {
        fetches
            .iter()
            .position(|f| f.name == name)
            .and_then(|i| done[i].as_ref())
            .and_then(|d| d.doc.as_ref())
    };
    let path = request
        .inputs
        .render(&fetch.path, parent)
        .map_err(|e| fail(e.to_string()))?;
    let client = upstreams.client(&fetch.upstream)?;
    let keeps_doc = fetches.iter().any(|f| f.parents.contains(&index));
    let cached = fetch
        .cache
        .as_ref()
        .zip(request.cache)
        .map(|(policy, cache)| (cache, fetch_key(fetch, request), policy));
    let call = Call {
        method: Method::GET,
        path,
        headers: HeaderMap::new(),
        body: bytes::Bytes::new(),
    };
    Ok(async move {
        if let Some((cache, key, _)) = &cached {
            if let Some(section) = cached_section(cache, key, fetch, request).await {
                return (index, Ok((section, None)));
            }
        }
        let caller = Caller {
            dependency: &fetch.name,
            ..request.caller
        };
        let started = Instant::now();
        let result = client
            .call(call, &caller, |answer| {
                project(fetch, &answer.body, keeps_doc)
            })
            .await;
        if let (Ok((section, _)), Some((cache, key, policy))) = (&result, &cached) {
            let ttl = jittered(policy.ttl, policy.jitter);
            let sections = Sections {
                json: Bytes::from(section.clone()),
                degraded: Vec::new(),
            };
            let route = request.route;
            let entry = Entry::new(
                route.version,
                &route.shape,
                sections,
                now_ms(),
                ttl,
                started.elapsed(),
            );
            cache.put(key, Arc::new(entry), ttl).await;
        }
        (index, result)
    })
}

/// A fetch's own cache key: the route's prefix, `~fetch.NAME:` (no route key has `~` there
/// but a hashed one, which `~f` cannot be), then the fetch's inputs.
fn fetch_key(fetch: &Fetch, request: &Request<'_>) -> String {
    let prefix = format!(
        "{}~fetch.{}:",
        request.route.key_prefix(request.client),
        fetch.name
    );
    let headers = fetch.upstream.headers.iter().map(|(_, t)| t);
    let mut vars: Vec<&Var> = Vec::new();
    for var in std::iter::once(&fetch.path)
        .chain(headers)
        .flat_map(|t| t.vars())
    {
        if !matches!(var, Var::Fetch { .. }) && !vars.contains(&var) {
            vars.push(var);
        }
    }
    key::key(
        &prefix,
        CacheScope::Shared,
        None,
        vars.into_iter().map(|v| request.inputs.value(v, |_| None)),
    )
}

/// A fetch's answer from its own cache, while it is fresh; counted as a lookup of
/// `route.fetch`.
async fn cached_section(
    cache: &Arc<Cache>,
    key: &str,
    fetch: &Fetch,
    request: &Request<'_>,
) -> Option<Vec<u8>> {
    let now = now_ms();
    let route = request.route;
    let usable =
        |e: &Entry| e.version == route.version && e.shape == route.shape && now < e.expires_ms;
    let label = format!("{}.{}", route.name, fetch.name);
    let count = |layer: Layer, result: &str| {
        request
            .metrics
            .cache_lookups_total
            .with_label_values(&[request.client, &label, layer.label(), result])
            .inc();
    };
    if let Some(entry) = cache.l1_get(key).filter(|e| usable(e)) {
        count(Layer::L1, "hit");
        return Some(entry.sections.json.to_vec());
    }
    count(Layer::L1, "miss");
    cache.l2()?;
    let found = cache
        .l2_get(key, |e| {
            Duration::from_millis(e.expires_ms.saturating_sub(now))
        })
        .await
        .filter(|e| usable(e));
    count(Layer::L2, if found.is_some() { "hit" } else { "miss" });
    found.map(|e| e.sections.json.to_vec())
}

/// `select`, then the whitelist, straight from the body's bytes. Only when children read
/// `{fetch.*}` from this answer is the selected document also parsed into a `Value` for them.
fn project(fetch: &Fetch, body: &[u8], keep_doc: bool) -> Result<Projected, String> {
    if body.is_empty() {
        return Err("answered with no body".into());
    }
    let select = fetch.select.as_deref();
    let section = fetch
        .fields
        .project_selected(body, select)
        .map_err(|e| e.to_string())?;
    if !keep_doc {
        return Ok((section, None));
    }
    // The projector accepts a little more than a `Value` does (nesting past serde_json's depth
    // limit inside skipped or copied values, lone surrogate escapes), so this can still fail.
    let doc: Value = serde_json::from_slice(body)
        .map_err(|e| format!("body cannot be read for dependent fetches: {e}"))?;
    let doc = match select {
        Some(path) => projection::select(&doc, path)
            .ok_or_else(|| format!("answer has no `{path}` to select"))?
            .clone(),
        None => doc,
    };
    Ok((section, Some(doc)))
}

/// Logs a failed fetch once; a critical one fails the route, an optional one degrades.
fn failed(fetch: &Fetch, error: CallError, request: &Request<'_>) -> Result<Done, RouteFailure> {
    warn!(
        trace_id = %request.caller.trace_id,
        route = %request.route.name,
        dependency = %fetch.name,
        critical = fetch.critical,
        error = %error,
        "dependency failed"
    );
    if fetch.critical {
        return Err(RouteFailure::Critical {
            fetch: fetch.name.clone(),
            error,
        });
    }
    Ok(Done {
        section: Section::Degraded,
        doc: None,
    })
}

/// The deadline passed: unless a critical fetch is unfinished, the rest are degraded.
fn overrun(
    fetches: &[Fetch],
    done: Vec<Option<Done>>,
    wave: usize,
    request: &Request<'_>,
) -> Result<Vec<Section>, RouteFailure> {
    let unfinished = || {
        fetches
            .iter()
            .zip(&done)
            .filter(|(_, d)| d.is_none())
            .map(|(f, _)| f)
    };
    let critical = unfinished().any(|f| f.critical);
    for fetch in unfinished() {
        warn!(
            trace_id = %request.caller.trace_id,
            route = %request.route.name,
            dependency = %fetch.name,
            critical = fetch.critical,
            "dependency unfinished at the route's deadline"
        );
        if fetch.wave != wave {
            continue;
        }
        // Its call was cancelled before `UpstreamClient::call` could count it.
        request
            .metrics
            .dependency_requests_total
            .with_label_values(&[
                request.client,
                &request.route.name,
                &fetch.name,
                Outcome::Timeout.label(),
            ])
            .inc();
    }
    if critical {
        return Err(RouteFailure::Deadline);
    }
    Ok(sections(done))
}
