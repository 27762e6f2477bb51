//! cache::target: the Redis a cache lives in, parsed from `--redis` (one node or a Redis
//! Cluster's seeds), with the password masked wherever the URL is shown.

use redis::{ConnectionInfo, IntoConnectionInfo};

/// Where the cache's L2 lives (and what `bff cache audit` walks), parsed from `--redis`.
#[derive(Clone)]
pub struct RedisTarget {
    /// The URL as given, password masked: safe to print.
    pub shown: String,
    /// One entry for `redis://`, one per listed node for `redis+cluster://`.
    pub(crate) seeds: Vec<ConnectionInfo>,
    /// Given as `redis+cluster://`.
    pub(crate) cluster: bool,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisTarget({})", self.shown)
    }
}

impl RedisTarget {
    /// `redis://[user:pass@]host:port[/db]` for one node, or
    /// `redis+cluster://[user:pass@]host:port[,host:port…]` for a Redis Cluster (the listed
    /// nodes are seeds: every master the cluster reports is audited). A `redis://` URL that
    /// reaches a cluster node is audited as the whole cluster too.
    pub fn parse(url: &str) -> Result<RedisTarget, BadRedisUrl> {
        let shown = mask_password(url);
        let bad = |reason: &str| BadRedisUrl {
            url: shown.clone(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected redis://host:port or redis+cluster://host:port,…"))?;
        let seeds = match scheme {
            "redis" => {
                let info = url
                    .into_connection_info()
                    .map_err(|e| bad(&e.to_string()))?;
                vec![info]
            }
            "redis+cluster" => {
                let (authority, path) = match rest.find('/') {
                    Some(i) => rest.split_at(i),
                    None => (rest, ""),
                };
                if !matches!(path, "" | "/" | "/0") {
                    return Err(bad("a Redis Cluster has only database 0"));
                }
                let (userinfo, hosts) = match authority.rsplit_once('@') {
                    Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
                    None => (String::new(), authority),
                };
                let mut seeds = Vec::new();
                for host in hosts.split(',') {
                    if host.is_empty() {
                        return Err(bad("empty host in the node list"));
                    }
                    let node = format!("redis://{userinfo}{host}");
                    let info = node
                        .as_str()
                        .into_connection_info()
                        .map_err(|e| bad(&format!("node {host}: {e}")))?;
                    seeds.push(info);
                }
                seeds
            }
            "rediss" | "rediss+cluster" => {
                return Err(bad("TLS to Redis is not supported by this build"));
            }
            _ => {
                return Err(bad(
                    "expected redis://host:port[/db] or redis+cluster://host:port[,host:port…]",
                ))
            }
        };
        Ok(RedisTarget {
            shown,
            seeds,
            cluster: scheme == "redis+cluster",
        })
    }
}

/// A `--redis` URL that cannot be used; the password is masked.
#[derive(Debug, thiserror::Error)]
#[error("bad --redis URL {url}: {reason}")]
pub struct BadRedisUrl {
    pub url: String,
    pub reason: String,
}

/// `url` with the password (between `:` and `@` of the userinfo) replaced by `***`.
fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                // `redis://secret@host` is read as a password by some clients: mask it too.
                "***".to_string()
            };
            format!("{scheme}://{masked}@{hosts}{path}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_hide_passwords() {
        let single = RedisTarget::parse("redis://127.0.0.1:6379/2").unwrap();
        assert_eq!(single.seeds.len(), 1);
        let cluster =
            RedisTarget::parse("redis+cluster://10.0.0.1:7000,10.0.0.2:7001,[::1]:7002").unwrap();
        let addrs: Vec<String> = cluster.seeds.iter().map(|s| s.addr().to_string()).collect();
        assert_eq!(addrs, ["10.0.0.1:7000", "10.0.0.2:7001", "::1:7002"]);

        let secret = RedisTarget::parse("redis+cluster://app:s3cret@h1:7000,h2:7001").unwrap();
        assert_eq!(secret.shown, "redis+cluster://app:***@h1:7000,h2:7001");
        assert_eq!(secret.seeds[1].redis_settings().password(), Some("s3cret"));
        assert!(!format!("{secret:?}").contains("s3cret"));
        assert_eq!(
            mask_password("redis://:pw@host:1/0"),
            "redis://:***@host:1/0"
        );
        assert_eq!(mask_password("redis://pw@host:1"), "redis://***@host:1");

        for bad in [
            "127.0.0.1:6379",
            "http://h:1",
            "rediss://h:1",
            "redis+cluster://h:1/3",
            "redis+cluster://h:1,,h:2",
            "redis+cluster://a:b@h:notaport",
        ] {
            let err = RedisTarget::parse(bad).unwrap_err().to_string();
            assert!(err.starts_with("bad --redis URL"), "{bad}: {err}");
            assert!(!err.contains(":b@"), "{err}");
        }
    }
}
