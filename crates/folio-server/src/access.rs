//! Who may talk to the aggregator: the join token (clients), the admin token
//! (anything that changes or exports the server's state), the WebSocket's
//! `Origin`, and a penalty that makes token guessing slow: a wrong token is
//! answered only after a delay that doubles with each wrong guess from the same
//! address. The delay holds the failing attempt alone: a right token from the
//! same address (everyone else behind its NAT) is served at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};

use folio_engine::sessions::constant_time_eq;

/// Addresses remembered for lockouts at most (the oldest are dropped first).
const MAX_LOCKOUTS: usize = 10_000;

#[derive(Debug, Clone)]
pub struct AccessConfig {
    /// Clients must present this token to join.
    pub join_token: Option<String>,
    /// Guards the admin API; without it the admin API is off.
    pub admin_token: Option<String>,
    /// Origins (`scheme://host[:port]`) allowed to open the WebSocket besides the
    /// page's own. Clients that send no `Origin` (native ones) are not browsers
    /// and are not subject to it.
    pub allowed_origins: Vec<String>,
    /// Each device answers a known-answer probe when it joins (and when its
    /// backend changes) before it may be selected.
    pub check_devices: bool,
    /// Reverse proxies whose word on a device's address is taken: caps,
    /// fairness, lockouts and logs then see the devices behind them.
    pub trusted_proxies: crate::proxy::TrustedProxies,
    /// The most proof-of-work bits a new session is asked for when the server
    /// is busy (0: none, ever); see [`crate::work`].
    pub join_work_bits: u8,
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            join_token: None,
            admin_token: None,
            allowed_origins: Vec::new(),
            check_devices: true,
            trusted_proxies: Default::default(),
            join_work_bits: folio_proto::work::MAX_BITS,
        }
    }
}

#[derive(Debug)]
struct Lockout {
    until: Instant,
    failures: u32,
}

pub struct Access {
    pub config: AccessConfig,
    lockouts: Mutex<HashMap<IpAddr, Lockout>>,
    first: Duration,
    max: Duration,
    /// A cluster's edges (`host:port`): a page any of them served may fail over
    /// to this one.
    peers: Mutex<Vec<String>>,
}

impl Access {
    pub fn new(config: AccessConfig, first: Duration, max: Duration) -> Self {
        Self {
            config,
            lockouts: Mutex::new(HashMap::new()),
            first,
            max,
            peers: Mutex::new(Vec::new()),
        }
    }

    /// The most work bits a new session is asked for (0: none).
    pub fn join_work_bits(&self) -> u8 {
        self.config.join_work_bits
    }

    /// The cluster's edges, by their WebSocket URLs (`ws://host:port/ws`).
    pub fn set_peers(&self, urls: &[String]) {
        let authorities = urls
            .iter()
            .filter_map(|url| {
                let rest = url
                    .strip_prefix("ws://")
                    .or_else(|| url.strip_prefix("wss://"))?;
                Some(rest.split('/').next()?.to_owned())
            })
            .collect();
        *self.peers.lock().unwrap_or_else(|p| p.into_inner()) = authorities;
    }

    fn lockouts(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Lockout>> {
        self.lockouts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a wrong token from `address`; returns how long its answer waits:
    /// 1 s, then 2 s, 4 s... up to the max.
    pub fn wrong_token(&self, address: IpAddr, now: Instant) -> Duration {
        let mut lockouts = self.lockouts();
        if lockouts.len() >= MAX_LOCKOUTS {
            lockouts.retain(|_, l| l.until > now);
        }
        if lockouts.len() >= MAX_LOCKOUTS
            && let Some(oldest) = lockouts
                .iter()
                .min_by_key(|(_, l)| l.until)
                .map(|(a, _)| *a)
        {
            lockouts.remove(&oldest);
        }
        let lockout = lockouts.entry(address).or_insert(Lockout {
            until: now,
            failures: 0,
        });
        let wait = self
            .first
            .saturating_mul(1 << lockout.failures.min(20))
            .min(self.max);
        lockout.failures = lockout.failures.saturating_add(1);
        lockout.until = now + wait;
        wait
    }

    pub fn join_token_ok(&self, token: Option<&str>) -> bool {
        match (&self.config.join_token, token) {
            (None, _) => true,
            (Some(expected), Some(given)) => {
                constant_time_eq(expected.as_bytes(), given.as_bytes())
            }
            (Some(_), None) => false,
        }
    }

    /// `Ok` for a request carrying `Authorization: Bearer <admin token>`.
    pub fn admin(&self, headers: &HeaderMap) -> Result<(), AdminRefusal> {
        let Some(expected) = &self.config.admin_token else {
            return Err(AdminRefusal::Off);
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(given) if constant_time_eq(expected.as_bytes(), given.as_bytes()) => Ok(()),
            _ => Err(AdminRefusal::Wrong),
        }
    }

    /// A browser may open the WebSocket from the page's own origin or an allowed
    /// one; a request without `Origin` is not from a browser page.
    pub fn origin_ok(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
            return headers.get(header::ORIGIN).is_none();
        };
        if self
            .config
            .allowed_origins
            .iter()
            .any(|allowed| allowed.trim_end_matches('/') == origin)
        {
            return true;
        }
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        let peer = |a: &str| {
            let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            peers.iter().any(|p| p.eq_ignore_ascii_case(a))
        };
        match (authority, host) {
            (Some(a), Some(h)) if a.eq_ignore_ascii_case(h) => true,
            (Some(a), _) => peer(a),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRefusal {
    /// The server has no admin token.
    Off,
    Wrong,
}

/// A secret from a file (trailing newline dropped) or else an environment
/// variable; never from the command line, which other users can read.
pub fn secret(file: Option<&std::path::Path>, env: &str) -> anyhow::Result<Option<String>> {
    let value = match file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|err| {
                    anyhow::anyhow!("cannot read the token file {}: {err}", path.display())
                })?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        ),
        None => std::env::var(env).ok(),
    };
    match value {
        Some(token) if token.is_empty() => {
            anyhow::bail!("the token from {env} or its file is empty")
        }
        Some(token) if token.len() > crate::limits::MAX_TOKEN_BYTES => anyhow::bail!(
            "the token from {env} or its file is above {} bytes",
            crate::limits::MAX_TOKEN_BYTES
        ),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn access() -> Access {
        Access::new(
            AccessConfig {
                join_token: Some("sesame".into()),
                admin_token: Some("root".into()),
                allowed_origins: vec!["https://folio.example".into()],
                ..AccessConfig::default()
            },
            Duration::from_secs(1),
            Duration::from_secs(8),
        )
    }

    #[test]
    fn wrong_tokens_from_an_address_wait_longer_each_time() {
        let access = access();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let now = Instant::now();
        assert!(access.join_token_ok(Some("sesame")));
        assert!(!access.join_token_ok(Some("sesame!")));
        assert!(!access.join_token_ok(None));
        assert_eq!(access.wrong_token(a, now), Duration::from_secs(1));
        assert_eq!(access.wrong_token(a, now), Duration::from_secs(2));
        for _ in 0..10 {
            access.wrong_token(a, now);
        }
        assert_eq!(access.wrong_token(a, now), Duration::from_secs(8));
        assert_eq!(access.wrong_token(b, now), Duration::from_secs(1));
    }

    #[test]
    fn origins_and_admin_tokens() {
        let access = access();
        let headers = |pairs: &[(header::HeaderName, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(name, HeaderValue::from_str(value).unwrap());
            }
            map
        };
        let host = (header::HOST, "127.0.0.1:8080");
        assert!(access.origin_ok(&headers(std::slice::from_ref(&host))));
        assert!(access.origin_ok(&headers(&[
            host.clone(),
            (header::ORIGIN, "http://127.0.0.1:8080")
        ])));
        assert!(access.origin_ok(&headers(&[
            host.clone(),
            (header::ORIGIN, "https://folio.example")
        ])));
        assert!(!access.origin_ok(&headers(&[
            host.clone(),
            (header::ORIGIN, "http://evil.example")
        ])));
        assert!(!access.origin_ok(&headers(&[host.clone(), (header::ORIGIN, "null")])));
        // A cluster's edges open each other's sockets (a tab failing over).
        let from_edge = [host, (header::ORIGIN, "http://10.0.0.7:8080")];
        assert!(!access.origin_ok(&headers(&from_edge)));
        access.set_peers(&["ws://10.0.0.7:8080/ws".into()]);
        assert!(access.origin_ok(&headers(&from_edge)));
        assert_eq!(access.admin(&headers(&[])), Err(AdminRefusal::Wrong));
        assert_eq!(
            access.admin(&headers(&[(header::AUTHORIZATION, "Bearer root")])),
            Ok(())
        );
        let off = Access::new(AccessConfig::default(), Duration::ZERO, Duration::ZERO);
        assert_eq!(off.admin(&headers(&[])), Err(AdminRefusal::Off));
    }
}
