//! Session affinity: consistent hashing with bounded loads.
//!
//! Each endpoint owns many points on a hash ring; a request's key (a header, a cookie
//! or the client IP) hashes to a point, and the request goes to the first endpoint
//! clockwise that may take it: eligible (ready, not draining, not ejected) and under its
//! bound, `load_factor x` the mean in-flight load (scaled by its slow-start weight).
//! Adding or removing one endpoint moves only the keys of its points (about 1/N), and
//! one hot key spills over to the next endpoints instead of melting one pod.

use super::{Pick, Select};
use crate::registry::EndpointState;
use ballast_api::settings::SameSite;
use cookie::Cookie;
use http::HeaderMap;
use http::header::{COOKIE, HeaderName};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// Where a request's affinity key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// A request header.
    Header(HeaderName),
    /// A cookie; the proxy sets it on the first response when the client has none.
    Cookie(String),
    /// The client IP (the first X-Forwarded-For hop when trusted).
    ClientIp,
}

/// Session-affinity settings.
#[derive(Clone, Debug, PartialEq)]
pub struct AffinityConfig {
    /// Key source.
    pub source: KeySource,
    /// An endpoint takes at most this times the mean in-flight load (> 1).
    pub load_factor: f64,
    /// Lifetime of a cookie the proxy sets.
    pub cookie_ttl: Duration,
    /// Mark that cookie `Secure`.
    pub cookie_secure: bool,
    /// Its `SameSite` attribute: `Lax`, `Strict` or `None`.
    pub cookie_same_site: SameSite,
    /// Take the client IP from the first X-Forwarded-For hop.
    pub trust_forwarded_for: bool,
}

/// A request's affinity key, and the cookie to set when the proxy made one up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    /// Position on the ring.
    pub hash: u64,
    /// `Set-Cookie` value for the response, when a new session starts.
    pub set_cookie: Option<String>,
}

impl AffinityConfig {
    /// The key of a request, or `None` when it has none (then it is balanced normally).
    pub fn key(&self, headers: &HeaderMap, client: SocketAddr) -> Option<Key> {
        match &self.source {
            KeySource::Header(name) => headers.get(name).map(|v| Key {
                hash: hash(v.as_bytes()),
                set_cookie: None,
            }),
            KeySource::Cookie(name) => match cookie(headers, name) {
                Some(value) => Some(Key {
                    hash: hash(value.as_bytes()),
                    set_cookie: None,
                }),
                None => {
                    let token = format!("{:032x}", fastrand::u128(..));
                    let set = Cookie::build((name.as_str(), token.as_str()))
                        .path("/")
                        .max_age(cookie::time::Duration::seconds(
                            i64::try_from(self.cookie_ttl.as_secs()).unwrap_or(i64::MAX),
                        ))
                        .http_only(true)
                        .same_site(match self.cookie_same_site {
                            SameSite::Lax => cookie::SameSite::Lax,
                            SameSite::Strict => cookie::SameSite::Strict,
                            SameSite::None => cookie::SameSite::None,
                        })
                        .secure(self.cookie_secure)
                        .build()
                        .to_string();
                    Some(Key {
                        hash: hash(token.as_bytes()),
                        set_cookie: Some(set),
                    })
                }
            },
            KeySource::ClientIp => {
                let forwarded = self
                    .trust_forwarded_for
                    .then(|| headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()))
                    .flatten()
                    .and_then(|v| v.split(',').next())
                    .map(str::trim)
                    .filter(|v| !v.is_empty());
                let ip =
                    forwarded.map_or_else(|| client.ip().to_canonical().to_string(), str::to_owned);
                Some(Key {
                    hash: hash(ip.as_bytes()),
                    set_cookie: None,
                })
            }
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers, without the quotes
/// RFC 6265 allows around it.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .and_then(|c| c.value_raw())
        .map(|raw| {
            raw.strip_prefix('"')
                .and_then(|r| r.strip_suffix('"'))
                .unwrap_or(raw)
        })
}

/// Ring points per endpoint: enough that keys spread within a few percent.
const POINTS_PER_ENDPOINT: u32 = 160;

/// A consistent-hash ring over endpoint indices.
#[derive(Clone, Debug, Default)]
pub struct Ring {
    points: Vec<(u64, u32)>,
}

/// 64-bit FNV-1a followed by a splitmix64 finaliser: stable across processes and
/// releases (every proxy replica maps a key to the same endpoint).
pub fn hash(bytes: &[u8]) -> u64 {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Ring {
    /// A ring over `addresses`; point positions depend only on each address, so an
    /// endpoint keeps its points when others come and go.
    pub fn new(addresses: &[SocketAddr]) -> Self {
        let mut points = Vec::with_capacity(addresses.len() * POINTS_PER_ENDPOINT as usize);
        for (index, address) in addresses.iter().enumerate() {
            let name = address.to_string();
            for replica in 0..POINTS_PER_ENDPOINT {
                points.push((hash(format!("{name}#{replica}").as_bytes()), index as u32));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    /// Endpoint indices in ring order from `key`, each once.
    pub fn walk(&self, key: u64) -> impl Iterator<Item = usize> + '_ {
        let start = self.points.partition_point(|(h, _)| *h < key);
        let mut seen: Vec<u32> = Vec::new();
        self.points[start..]
            .iter()
            .chain(&self.points[..start])
            .map(|(_, index)| *index)
            .filter(move |index| {
                if seen.contains(index) {
                    false
                } else {
                    seen.push(*index);
                    true
                }
            })
            .map(|index| index as usize)
    }

    /// True when the ring has no endpoint.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

/// The in-flight bound of one endpoint: `load_factor x` the mean load after this
/// request, scaled by its slow-start weight, at least 1.
pub fn bound(total_in_flight: u64, eligible: usize, load_factor: f64, weight: f64) -> u64 {
    if eligible == 0 {
        return 0;
    }
    let mean = (total_in_flight + 1) as f64 / eligible as f64;
    ((load_factor * mean * weight).ceil() as u64).max(1)
}

/// Consistent hashing with bounded loads as a selection algorithm: the first
/// candidate clockwise from the key that is under its bound, else `otherwise` over the
/// same candidates (balance as without affinity).
#[derive(Debug)]
pub struct BoundedLoadHash<'s, S> {
    /// The ring over `listed`.
    pub ring: &'s Ring,
    /// The endpoints the ring's indices refer to.
    pub listed: &'s [Arc<EndpointState>],
    /// The request's key.
    pub key: u64,
    /// An endpoint takes at most this times the mean in-flight load.
    pub load_factor: f64,
    /// The algorithm when no candidate on the ring is under its bound.
    pub otherwise: &'s S,
}

impl<S: Select> Select for BoundedLoadHash<'_, S> {
    fn select<'a>(
        &self,
        candidates: &[&'a Arc<EndpointState>],
        pick: &mut Pick,
    ) -> &'a Arc<EndpointState> {
        let total: u64 = candidates.iter().map(|c| c.in_flight.load(Relaxed)).sum();
        for index in self.ring.walk(self.key) {
            let Some(listed) = self.listed.get(index) else {
                continue;
            };
            let Some(candidate) = candidates.iter().find(|c| Arc::ptr_eq(c, listed)) else {
                continue;
            };
            let limit = bound(
                total,
                candidates.len(),
                self.load_factor,
                candidate.weight(pick.now, pick.warmup),
            );
            if candidate.in_flight.load(Relaxed) < limit {
                return candidate;
            }
        }
        self.otherwise.select(candidates, pick)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses(n: u8) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 2 + i], 8080)))
            .collect()
    }

    fn owner(ring: &Ring, addresses: &[SocketAddr], key: u64) -> SocketAddr {
        addresses[ring.walk(key).next().unwrap()]
    }

    #[test]
    fn the_same_key_always_lands_on_the_same_endpoint() {
        let a = addresses(8);
        let ring = Ring::new(&a);
        for key in 0..1000u64 {
            let k = hash(&key.to_le_bytes());
            assert_eq!(owner(&ring, &a, k), owner(&Ring::new(&a), &a, k));
        }
    }

    #[test]
    fn keys_spread_evenly_and_adding_or_removing_one_endpoint_moves_about_one_nth() {
        let keys: Vec<u64> = (0..20_000u64)
            .map(|k| hash(format!("user-{k}").as_bytes()))
            .collect();
        let ten = addresses(10);
        let ring = Ring::new(&ten);
        let mut per_endpoint = std::collections::HashMap::new();
        for k in &keys {
            *per_endpoint.entry(owner(&ring, &ten, *k)).or_insert(0) += 1;
        }
        let max = *per_endpoint.values().max().unwrap() as f64;
        assert!(max / 2000.0 < 1.25, "spread max/mean {}", max / 2000.0);

        let eleven = addresses(11);
        let grown = Ring::new(&eleven);
        let moved = keys
            .iter()
            .filter(|k| owner(&ring, &ten, **k) != owner(&grown, &eleven, **k))
            .count();
        let share = moved as f64 / keys.len() as f64;
        assert!(
            (0.05..0.14).contains(&share),
            "adding one of 11 moved {share:.3} of the keys"
        );
        // Every key that moved went to the new endpoint.
        assert!(
            keys.iter()
                .all(|k| owner(&ring, &ten, *k) == owner(&grown, &eleven, *k)
                    || owner(&grown, &eleven, *k) == eleven[10])
        );

        let nine: Vec<SocketAddr> = ten[1..].to_vec();
        let shrunk = Ring::new(&nine);
        let moved: Vec<&u64> = keys
            .iter()
            .filter(|k| owner(&ring, &ten, **k) != owner(&shrunk, &nine, **k))
            .collect();
        assert!(
            moved.iter().all(|k| owner(&ring, &ten, **k) == ten[0]),
            "only the removed endpoint's keys move"
        );
        let share = moved.len() as f64 / keys.len() as f64;
        assert!(
            (0.05..0.15).contains(&share),
            "removing one of 10 moved {share:.3}"
        );
    }

    #[test]
    fn keys_from_headers_cookies_and_client_ips() {
        let client: SocketAddr = "10.0.0.9:4000".parse().unwrap();
        let config = |source| AffinityConfig {
            source,
            load_factor: 1.25,
            cookie_ttl: Duration::from_secs(3600),
            cookie_secure: true,
            cookie_same_site: ballast_api::settings::SameSite::Lax,
            trust_forwarded_for: true,
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-user", "alice".parse().unwrap());
        headers.insert(COOKIE, "a=1; session=s-42".parse().unwrap());
        headers.insert("x-forwarded-for", "203.0.113.7, 10.0.0.1".parse().unwrap());
        let by_header = config(KeySource::Header(HeaderName::from_static("x-user")))
            .key(&headers, client)
            .unwrap();
        assert_eq!(by_header.hash, hash(b"alice"));
        let by_cookie = config(KeySource::Cookie("session".into()))
            .key(&headers, client)
            .unwrap();
        assert_eq!(
            (by_cookie.hash, by_cookie.set_cookie),
            (hash(b"s-42"), None)
        );
        let fresh = config(KeySource::Cookie("other".into()))
            .key(&headers, client)
            .unwrap();
        let set = fresh.set_cookie.unwrap();
        let parsed = Cookie::parse(set.as_str()).unwrap();
        assert_eq!(parsed.name(), "other");
        assert_eq!(parsed.value().len(), 32, "{set}");
        assert_eq!(parsed.path(), Some("/"));
        assert_eq!(
            parsed.max_age(),
            Some(cookie::time::Duration::seconds(3600))
        );
        assert_eq!(parsed.http_only(), Some(true));
        assert_eq!(parsed.same_site(), Some(cookie::SameSite::Lax));
        assert_eq!(parsed.secure(), Some(true));
        headers.insert(COOKIE, "a=1; session=\"s-42\"".parse().unwrap());
        assert_eq!(
            config(KeySource::Cookie("session".into()))
                .key(&headers, client)
                .unwrap()
                .hash,
            hash(b"s-42"),
            "quotes are not part of the value"
        );
        let by_ip = config(KeySource::ClientIp).key(&headers, client).unwrap();
        assert_eq!(
            by_ip.hash,
            hash(b"203.0.113.7"),
            "first X-Forwarded-For hop when trusted"
        );
        let mut untrusting = config(KeySource::ClientIp);
        untrusting.trust_forwarded_for = false;
        assert_eq!(
            untrusting.key(&headers, client).unwrap().hash,
            hash(b"10.0.0.9")
        );
        assert!(
            config(KeySource::Header(HeaderName::from_static("x-none")))
                .key(&headers, client)
                .is_none()
        );
    }

    #[test]
    fn bounds_follow_the_mean_load_and_slow_start() {
        assert_eq!(bound(0, 4, 1.25, 1.0), 1);
        assert_eq!(bound(39, 4, 1.25, 1.0), 13);
        assert_eq!(bound(39, 4, 1.25, 0.1), 2);
        assert_eq!(bound(5, 0, 1.25, 1.0), 0);
    }
}
