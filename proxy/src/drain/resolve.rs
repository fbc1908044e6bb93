//! Finding the proxy replicas: DNS lookups of the admin Service, and telling "no such
//! name" (no proxies, nothing to drain) from a lookup that may pass.

use std::io;
use std::net::SocketAddr;

/// Why looking up the proxies gave no address.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// DNS answered that the name does not exist (NXDOMAIN) or has no address (NODATA).
    #[error("{target}: no such name, or no address ({source})")]
    NameNotFound {
        /// The `host:port` looked up.
        target: String,
        /// The resolver's answer.
        #[source]
        source: io::Error,
    },
    /// The lookup failed in a way that may pass (resolver timeout, SERVFAIL, refused
    /// query), or the target is not `host:port`.
    #[error("looking up {target} failed: {source}")]
    Lookup {
        /// The `host:port` looked up.
        target: String,
        /// The resolver's error.
        #[source]
        source: io::Error,
    },
}

/// The texts `getaddrinfo` gives for "no such name" (`EAI_NONAME`) and "no address"
/// (`EAI_NODATA`) in glibc and musl. std keeps only `gai_strerror`'s text of the error,
/// not its code, so the text is all there is to tell them from `EAI_AGAIN` ("Temporary
/// failure in name resolution", "Try again") and `EAI_FAIL`. An unlisted text counts
/// as a failure that may pass: the safe side, it keeps the pod waiting.
const NOT_FOUND_TEXTS: [&str; 4] = [
    "Name or service not known",
    "No address associated with hostname",
    "Name does not resolve",
    "Name has no usable address",
];

/// What one lookup said, as the drain loop needs it.
pub(super) enum Lookup {
    Found(Vec<SocketAddr>),
    Absent(String),
    Failed(String),
}

impl From<Result<Vec<SocketAddr>, ResolveError>> for Lookup {
    fn from(result: Result<Vec<SocketAddr>, ResolveError>) -> Self {
        match result {
            Ok(found) if found.is_empty() => Self::Absent("resolved to no address".to_owned()),
            Ok(found) => Self::Found(found),
            Err(e @ ResolveError::NameNotFound { .. }) => Self::Absent(e.to_string()),
            Err(e @ ResolveError::Lookup { .. }) => Self::Failed(e.to_string()),
        }
    }
}

/// Resolves `host:port` (a DNS name or an IP) to every address, as the headless proxy
/// admin Service publishes one record per replica. `target` may list several
/// `host:port`s separated by commas; the result is their union.
///
/// # Errors
/// [`ResolveError::NameNotFound`] when no target has an address and DNS said so for
/// each (no proxies); [`ResolveError::Lookup`] when any lookup failed otherwise (no
/// replica is silently left out), or `target` lists no `host:port`.
pub async fn resolve(target: &str) -> Result<Vec<SocketAddr>, ResolveError> {
    let mut addresses = Vec::new();
    let mut absent = None;
    let mut any = false;
    for one in target.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        any = true;
        match tokio::net::lookup_host(one).await {
            Ok(found) => addresses.extend(found),
            Err(source) if is_name_not_found(&source) => {
                absent.get_or_insert(ResolveError::NameNotFound {
                    target: one.to_owned(),
                    source,
                });
            }
            Err(source) => {
                return Err(ResolveError::Lookup {
                    target: one.to_owned(),
                    source,
                });
            }
        }
    }
    if !any {
        return Err(ResolveError::Lookup {
            target: target.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "no host:port given"),
        });
    }
    if addresses.is_empty()
        && let Some(absent) = absent
    {
        return Err(absent);
    }
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

/// True when `error` (from `getaddrinfo` through std) says the name does not exist or
/// has no address, in glibc's or musl's words.
pub(super) fn is_name_not_found(error: &io::Error) -> bool {
    let text = error.to_string();
    NOT_FOUND_TEXTS.iter().any(|t| text.contains(t))
}

/// Makes the Kubernetes Service names in `target` (`host:port`s separated by commas)
/// absolute: `<svc>.<ns>.svc:9901` becomes `<svc>.<ns>.svc.<cluster_domain>.:9901`, so
/// the resolver asks one name instead of walking the pod's search list first (with
/// `ndots:5` about six names per lookup). IPs, names that already end in a dot and
/// other names are kept as given: a dot added to a name meant for the search list would
/// make it not exist, and a name that does not exist means "no proxies, nothing to
/// drain". Without a cluster domain, `target` is returned unchanged.
pub fn qualify(target: &str, cluster_domain: Option<&str>) -> String {
    let Some(domain) = cluster_domain
        .map(|d| d.trim().trim_matches('.'))
        .filter(|d| !d.is_empty())
    else {
        return target.to_owned();
    };
    target
        .split(',')
        .map(|one| {
            let trimmed = one.trim();
            match trimmed.rsplit_once(':') {
                Some((host, port)) if host.ends_with(".svc") => {
                    format!("{host}.{domain}.:{port}")
                }
                _ => trimmed.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The cluster domain from a pod's `resolv.conf`: kubelet writes `search
/// <ns>.svc.<domain> svc.<domain> <domain>` for the `ClusterFirst` DNS policy. None
/// when no search domain starts with `svc.` (another DNS policy).
pub fn cluster_domain(resolv_conf: &str) -> Option<String> {
    // The resolver uses the last `search` line.
    let search = resolv_conf.lines().rev().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("search")).then_some(words)
    })?;
    search
        .filter_map(|d| d.strip_prefix("svc."))
        .map(|d| d.trim_end_matches('.'))
        .find(|d| !d.is_empty())
        .map(str::to_owned)
}
