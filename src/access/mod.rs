//! Who may use the HTTP API: the `[http]` section ([`HttpConfig`]), the principals it
//! configures (bearer tokens and client certificates, each with scopes, an optional tenant and
//! optional limits), and the TLS configuration of the listener ([`tls`]).
//!
//! Tokens are never kept in clear: each is held as its SHA-256 digest, and a presented token
//! is hashed and compared against every digest in constant time ([`Guard::by_token`]). Only a
//! token's `name` is ever printed. The axum middleware that applies this to routes is in
//! `http::auth`; this module knows nothing of HTTP, so `config` can own the section.

pub mod config;
pub mod tls;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

pub use config::{ClientCertConfig, HttpConfig, Scope, TlsConfig, TokenConfig, TokenSource};

/// A SHA-256 digest.
pub type Digest256 = [u8; 32];

/// The SHA-256 digest of `token`.
pub fn sha256(token: &[u8]) -> Digest256 {
    Sha256::digest(token).into()
}

/// The digest a token source stands for: the configured hex digest, or the hash of the token
/// read from the file or variable. Errors never quote the token.
pub fn digest_of(source: &TokenSource<'_>) -> Result<Digest256, String> {
    let from_clear = |token: &str| {
        let token = token.trim();
        if token.is_empty() {
            Err("holds an empty token".to_owned())
        } else {
            Ok(sha256(token.as_bytes()))
        }
    };
    match source {
        TokenSource::Sha256(hex) => parse_hex_digest(hex).ok_or_else(|| {
            "is not a SHA-256 digest in hex (64 hex digits; e.g. `printf %s \"$TOKEN\" | sha256sum`)".to_owned()
        }),
        TokenSource::File(path) => match std::fs::read_to_string(path) {
            Ok(text) => from_clear(&text).map_err(|e| format!("{}: {e}", path.display())),
            Err(err) => Err(format!("cannot read {}: {err}", path.display())),
        },
        TokenSource::Env(name) => match std::env::var(name) {
            Ok(text) => from_clear(&text).map_err(|e| format!("${name} {e}")),
            Err(_) => Err(format!("the environment variable {name} is not set")),
        },
    }
}

fn parse_hex_digest(hex: &str) -> Option<Digest256> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// Who made a request: a token or a client certificate, with what it may do.
#[derive(Debug)]
pub struct Principal {
    /// For people: `token scorer` or `client certificate CN=batch-scorer`.
    pub name: String,
    scopes: Vec<Scope>,
    /// The tenant it acts for, when bound to one.
    pub tenant: Option<String>,
    rate: Option<Bucket>,
    in_flight: Option<Arc<Semaphore>>,
}

/// Why a principal's request is not admitted now: retry after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    /// Which limit (`max_requests_per_second` or `max_in_flight`).
    pub limit: &'static str,
    /// When to try again.
    pub retry_after: Duration,
}

impl Principal {
    /// True when it has `scope`.
    pub fn may(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// Takes one request from its limits; the permit (if any) holds an in-flight slot until
    /// dropped.
    pub fn admit(&self) -> Result<Option<OwnedSemaphorePermit>, Throttled> {
        let permit = match &self.in_flight {
            Some(slots) => match Arc::clone(slots).try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    return Err(Throttled {
                        limit: "max_in_flight",
                        retry_after: Duration::from_secs(1),
                    });
                }
            },
            None => None,
        };
        if let Some(bucket) = &self.rate
            && let Err(wait) = bucket.try_take()
        {
            return Err(Throttled {
                limit: "max_requests_per_second",
                retry_after: wait,
            });
        }
        Ok(permit)
    }
}

/// A token bucket holding one second's worth of requests, refilled continuously.
#[derive(Debug)]
struct Bucket {
    per_sec: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(per_sec: u32) -> Self {
        let per_sec = f64::from(per_sec);
        Bucket {
            per_sec,
            state: Mutex::new((per_sec, Instant::now())),
        }
    }

    /// Takes one request, or says how long until one is available.
    fn try_take(&self) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let (tokens, since) = *state;
        let tokens = (tokens + now.duration_since(since).as_secs_f64() * self.per_sec)
            .min(self.per_sec.max(1.0));
        if tokens >= 1.0 {
            *state = (tokens - 1.0, now);
            Ok(())
        } else {
            *state = (tokens, now);
            Err(Duration::from_secs_f64((1.0 - tokens) / self.per_sec))
        }
    }
}

/// How requests are let in, from [`HttpConfig`].
#[derive(Debug)]
pub enum Access {
    /// No tokens and no client certificates are configured: every request is let in
    /// (`check-config` allows this only on loopback or with `http.allow_unauthenticated`).
    Open,
    /// Requests must show a configured token or client certificate.
    Guarded(Guard),
}

/// The configured principals.
#[derive(Debug, Default)]
pub struct Guard {
    tokens: Vec<(Digest256, Arc<Principal>)>,
    clients: HashMap<String, Arc<Principal>>,
}

impl Access {
    /// Reads the tokens (files and variables are read now) and the client mappings. Errors
    /// name the key, never the token.
    pub fn from_config(http: &HttpConfig) -> Result<Access, String> {
        if !http.has_principals() {
            return Ok(Access::Open);
        }
        let mut guard = Guard::default();
        for (i, token) in http.tokens.iter().enumerate() {
            let (key, message) = match token.source() {
                Ok(source) => match digest_of(&source) {
                    Ok(digest) => {
                        let principal = Principal {
                            name: format!("token {}", token.name),
                            scopes: token.scopes.clone(),
                            tenant: token.tenant.clone(),
                            rate: token.max_requests_per_second.map(|r| Bucket::new(r.get())),
                            in_flight: token
                                .max_in_flight
                                .map(|n| Arc::new(Semaphore::new(n.get()))),
                        };
                        guard.tokens.push((digest, Arc::new(principal)));
                        continue;
                    }
                    Err(message) => (source.key(), message),
                },
                Err(problem) => problem,
            };
            return Err(format!("http.tokens[{i}].{key}: {message}"));
        }
        for client in http.tls.iter().flat_map(|t| &t.clients) {
            let principal = Principal {
                name: format!("client certificate CN={}", client.common_name),
                scopes: client.scopes.clone(),
                tenant: client.tenant.clone(),
                rate: None,
                in_flight: None,
            };
            guard
                .clients
                .insert(client.common_name.clone(), Arc::new(principal));
        }
        Ok(Access::Guarded(guard))
    }
}

impl Guard {
    /// The principal of a presented token: its digest is compared with every configured one
    /// in constant time, so neither the match nor its position shows in the timing.
    pub fn by_token(&self, token: &[u8]) -> Option<&Arc<Principal>> {
        let digest = sha256(token);
        let mut found = None;
        for (known, principal) in &self.tokens {
            if bool::from(known.ct_eq(&digest)) {
                found = Some(principal);
            }
        }
        found
    }

    /// The principal of a verified client certificate's subject CN.
    pub fn by_client(&self, common_name: &str) -> Option<&Arc<Principal>> {
        self.clients.get(common_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_digests_parse_in_either_case() {
        let d = sha256(b"test");
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(parse_hex_digest(&hex), Some(d));
        assert_eq!(parse_hex_digest(&hex.to_ascii_uppercase()), Some(d));
        assert_eq!(parse_hex_digest(&hex[..62]), None);
        assert_eq!(parse_hex_digest(&format!("{}zz", &hex[..62])), None);
    }

    #[test]
    fn tokens_are_found_by_digest_and_errors_never_quote_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "  file-secret-value\n").unwrap();
        let http: HttpConfig = crate::section::defaults_with(
            "http",
            &format!(
                "[[http.tokens]]\nname = \"f\"\nfile = \"{}\"\nscopes = [\"predict\"]\n",
                file.display()
            ),
        );
        let Ok(Access::Guarded(guard)) = Access::from_config(&http) else {
            panic!("guarded")
        };
        assert_eq!(
            guard.by_token(b"file-secret-value").unwrap().name,
            "token f"
        );
        assert!(guard.by_token(b"file-secret-valu").is_none());
        std::fs::write(&file, "   \n").unwrap();
        let err = Access::from_config(&http).unwrap_err();
        assert!(err.starts_with("http.tokens[0].file: "), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_allows_a_second_s_worth_then_says_when() {
        let principal = Principal {
            name: "t".into(),
            scopes: vec![Scope::Predict],
            tenant: None,
            rate: Some(Bucket::new(2)),
            in_flight: Some(Arc::new(Semaphore::new(1))),
        };
        let first = principal.admit().unwrap();
        assert_eq!(principal.admit().unwrap_err().limit, "max_in_flight");
        drop(first);
        drop(principal.admit().unwrap());
        let throttled = principal.admit().unwrap_err();
        assert_eq!(throttled.limit, "max_requests_per_second");
        assert_eq!(throttled.retry_after, Duration::from_millis(500));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(principal.admit().is_ok());
    }
}
