//! Fan-out: a `fetch` route's calls, all at once (dependent fetches in waves after their
//! parents), each answer selected and projected as it arrives, within the route's deadline.
//! A failed critical fetch ends the route at once, cancelling the calls still running; a
//! failed optional fetch (and every fetch depending on it) is left to its fallback.

use std::time::Instant;

use futures::stream::{FuturesUnordered, StreamExt};
use http::{HeaderMap, Method};
use serde_json::Value;
use tracing::warn;

use super::inputs::Inputs;
use crate::metrics::{Metrics, Outcome};
use crate::policy::{Fetch, Route};
use crate::projection;
use crate::upstream::{Call, CallError, Caller, Failure, Upstreams};

/// How one fetch ended.
pub enum Section {
    /// The projected section, serialised.
    Ok(Vec<u8>),
    /// Failed (optional): the section holds the fallback.
    Degraded,
}

/// Why a route gets no answer.
#[derive(Debug, Clone)]
pub enum RouteFailure {
    /// A critical fetch failed.
    Critical { fetch: String, error: CallError },
    /// The route's deadline passed with a critical fetch unfinished.
    Deadline,
}

/// Per request: what the fetches need besides their own policy.
pub struct Request<'a> {
    pub route: &'a Route,
    pub inputs: &'a Inputs<'a>,
    pub caller: Caller<'a>,
    pub metrics: &'a Metrics,
    pub client: &'a str,
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
    let deadline = request.route.deadline.map(|d| Instant::now() + d);
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
    let call = Call {
        method: Method::GET,
        path,
        headers: HeaderMap::new(),
        body: bytes::Bytes::new(),
    };
    Ok(async move {
        let caller = Caller {
            dependency: &fetch.name,
            ..request.caller
        };
        let result = client
            .call(call, &caller, |answer| {
                project(fetch, &answer.body, keeps_doc)
            })
            .await;
        (index, result)
    })
}

/// `select`, then the whitelist. The selected document is kept only when children need it.
fn project(fetch: &Fetch, body: &[u8], keep_doc: bool) -> Result<Projected, String> {
    if body.is_empty() {
        return Err("answered with no body".into());
    }
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
    let selected = match &fetch.select {
        Some(path) => projection::select(&doc, path)
            .ok_or_else(|| format!("answer has no `{path}` to select"))?,
        None => &doc,
    };
    let projected = fetch
        .fields
        .project(selected)
        .ok_or("answer is neither a JSON object nor a JSON array")?;
    let bytes = serde_json::to_vec(&projected).map_err(|e| e.to_string())?;
    Ok((bytes, keep_doc.then(|| selected.clone())))
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
