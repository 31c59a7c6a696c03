//! `[http]`: where the HTTP server listens, and who may use its API (tokens, client
//! certificates, TLS), as documented in `config/default.toml`.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::section::{Problems, Section};

/// `[http]`: the HTTP server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HttpConfig {
    /// Listen address of the API, `ip:port`.
    pub listen: String,
    /// Inference requests over HTTP running at once; more are answered 429 at once.
    pub max_in_flight_requests: NonZeroUsize,
    /// Serve the API without authentication on a non-loopback `listen`.
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// Where `/metrics`, `/healthz` and `/readyz` are served instead of `listen` (no auth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops_listen: Option<String>,
    /// `[[http.tokens]]`: bearer tokens.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// `[http.tls]`: TLS on `listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

/// What a principal (a token or a client certificate) may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scope {
    /// Inference: `POST /v1/predict`, `POST /v1/pipelines/{id}/execute`.
    #[serde(rename = "predict")]
    Predict,
    /// Feature reads: the `GET` feature routes.
    #[serde(rename = "features:read")]
    FeaturesRead,
    /// Feature writes: `PUT /v1/features`.
    #[serde(rename = "features:write")]
    FeaturesWrite,
    /// Model administration: `POST /v1/routes/{route}/drift/reference`.
    #[serde(rename = "models:admin")]
    ModelsAdmin,
}

impl Scope {
    /// The name used in configuration and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Predict => "predict",
            Scope::FeaturesRead => "features:read",
            Scope::FeaturesWrite => "features:write",
            Scope::ModelsAdmin => "models:admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[[http.tokens]]`: one bearer token. Exactly one of `sha256`, `file` and `env` says where
/// the token is; [`TokenConfig::source`] gives it as a [`TokenSource`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenConfig {
    /// Shown in logs and messages instead of the token.
    pub name: String,
    /// The SHA-256 digest of the token, in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// A file holding the token in clear (surrounding whitespace trimmed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// An environment variable holding the token in clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// What the token may do.
    pub scopes: Vec<Scope>,
    /// The tenant the token acts for, if bound to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Requests per second (a token bucket holding one second's worth); beyond it, 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_second: Option<NonZeroU32>,
    /// Requests of this token running at once; beyond it, 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<NonZeroUsize>,
}

/// Where a token is, from [`TokenConfig`]'s three keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource<'a> {
    /// `sha256`: the digest, hex.
    Sha256(&'a str),
    /// `file`: a file holding the token.
    File(&'a std::path::Path),
    /// `env`: a variable holding the token.
    Env(&'a str),
}

impl TokenSource<'_> {
    /// The key it comes from.
    pub fn key(&self) -> &'static str {
        match self {
            TokenSource::Sha256(_) => "sha256",
            TokenSource::File(_) => "file",
            TokenSource::Env(_) => "env",
        }
    }
}

impl TokenConfig {
    /// The token's source, or the key to report and why when not exactly one is set.
    pub fn source(&self) -> Result<TokenSource<'_>, (&'static str, String)> {
        let mut set = Vec::new();
        if let Some(d) = &self.sha256 {
            set.push(("sha256", TokenSource::Sha256(d)));
        }
        if let Some(f) = &self.file {
            set.push(("file", TokenSource::File(f)));
        }
        if let Some(e) = &self.env {
            set.push(("env", TokenSource::Env(e)));
        }
        match set.len() {
            1 => Ok(set.remove(0).1),
            0 => Err((
                "sha256",
                "no token: set exactly one of sha256 (the hex SHA-256 of the token), file or env"
                    .to_owned(),
            )),
            _ => {
                let names: Vec<&str> = set.iter().map(|(n, _)| *n).collect();
                Err((
                    set[1].0,
                    format!(
                        "{} are all set; set exactly one of sha256, file or env",
                        names.join(" and ")
                    ),
                ))
            }
        }
    }
}

/// `[http.tls]`: TLS on the API listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsConfig {
    /// The certificate chain, PEM.
    pub cert_file: PathBuf,
    /// The private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificates, PEM: when set, clients must present a certificate signed by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// `[[http.tls.clients]]`: client certificates, by subject CN, and what they may do.
    #[serde(default)]
    pub clients: Vec<ClientCertConfig>,
}

/// `[[http.tls.clients]]`: a client certificate's subject CN mapped to scopes and a tenant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientCertConfig {
    /// The subject common name of the client certificate.
    pub common_name: String,
    /// What the client may do.
    pub scopes: Vec<Scope>,
    /// The tenant the client acts for, if bound to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl HttpConfig {
    /// True when requests must show who they are: tokens or client certificates are mapped.
    pub fn has_principals(&self) -> bool {
        !self.tokens.is_empty() || self.tls.as_ref().is_some_and(|t| !t.clients.is_empty())
    }

    /// True when `listen` is a loopback address.
    pub fn listen_is_loopback(&self) -> bool {
        self.listen
            .parse::<SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback())
    }

    /// What is allowed but deserves a warning (printed by `check-config`, logged at start).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.has_principals() && !self.listen_is_loopback() && self.allow_unauthenticated {
            out.push(format!(
                "http.allow_unauthenticated = true: the API on {} (a non-loopback address) has no authentication; anyone who reaches it can run models and write features",
                self.listen
            ));
        }
        if let Some(tls) = &self.tls
            && tls.client_ca_file.is_some()
            && self.ops_listen.is_none()
        {
            out.push(
                "http.tls.client_ca_file is set and http.ops_listen is not: /healthz, /readyz and /metrics are on the mTLS listener, so probes and scrapers need a client certificate; set http.ops_listen to serve them apart".to_owned(),
            );
        }
        for (i, t) in self.tokens.iter().enumerate() {
            if t.tenant.is_some() && t.scopes.iter().any(|s| *s != Scope::Predict) {
                out.push(format!(
                    "http.tokens[{i}] (`{}`) is bound to a tenant and has a features or models:admin scope: the feature store and the model routes are shared by every tenant, so their routes refuse tenant-bound tokens (403)",
                    t.name
                ));
            }
        }
        out
    }
}

/// Checks `scopes` and `tenant` of a token or a client certificate at `prefix`.
fn check_grant(prefix: &str, scopes: &[Scope], tenant: Option<&str>, p: &mut Problems) {
    if scopes.is_empty() {
        p.push(
            format!("{prefix}.scopes"),
            "is empty; name at least one of predict, features:read, features:write, models:admin",
        );
    }
    if tenant.is_some_and(|t| t.trim().is_empty()) {
        p.push(
            format!("{prefix}.tenant"),
            "must not be empty; remove the key for a token not bound to a tenant",
        );
    }
}

fn check_listen(key: &str, value: &str, p: &mut Problems) {
    if value.parse::<SocketAddr>().is_err() {
        p.push(
            key,
            format!("`{value}` is not an ip:port address (for example 127.0.0.1:8080)"),
        );
    }
}

impl Section for HttpConfig {
    fn validate(&self, p: &mut Problems) {
        check_listen("http.listen", &self.listen, p);
        if let Some(ops) = &self.ops_listen {
            check_listen("http.ops_listen", ops, p);
            if *ops == self.listen {
                p.push(
                    "http.ops_listen",
                    "is http.listen too; give it another port, or remove it to serve /metrics, /healthz and /readyz on http.listen",
                );
            }
        }
        let mut names = BTreeSet::new();
        let mut digests = BTreeSet::new();
        for (i, token) in self.tokens.iter().enumerate() {
            let prefix = format!("http.tokens[{i}]");
            if token.name.trim().is_empty() {
                p.push(format!("{prefix}.name"), "must not be empty");
            } else if !names.insert(token.name.as_str()) {
                p.push(
                    format!("{prefix}.name"),
                    format!("`{}` names another token too", token.name),
                );
            }
            check_grant(&prefix, &token.scopes, token.tenant.as_deref(), p);
            match token.source() {
                Err((key, message)) => p.push(format!("{prefix}.{key}"), message),
                Ok(source) => match super::digest_of(&source) {
                    Err(message) => p.push(format!("{prefix}.{}", source.key()), message),
                    Ok(digest) => {
                        if !digests.insert(digest) {
                            p.push(
                                prefix,
                                "is the same token as another entry of http.tokens; give each its own",
                            );
                        }
                    }
                },
            }
        }
        if let Some(tls) = &self.tls {
            if let Err((key, message)) = super::tls::check(tls) {
                p.push(format!("http.tls.{key}"), message);
            }
            if !tls.clients.is_empty() && tls.client_ca_file.is_none() {
                p.push(
                    "http.tls.clients",
                    "client certificates are only asked for with http.tls.client_ca_file; set it to the CA that signs them",
                );
            }
            let mut cns = BTreeSet::new();
            for (i, client) in tls.clients.iter().enumerate() {
                let prefix = format!("http.tls.clients[{i}]");
                if client.common_name.trim().is_empty() {
                    p.push(format!("{prefix}.common_name"), "must not be empty");
                } else if !cns.insert(client.common_name.as_str()) {
                    p.push(
                        format!("{prefix}.common_name"),
                        format!("`{}` is mapped twice", client.common_name),
                    );
                }
                check_grant(&prefix, &client.scopes, client.tenant.as_deref(), p);
            }
        }
        if !self.has_principals()
            && self.listen.parse::<SocketAddr>().is_ok()
            && !self.listen_is_loopback()
            && !self.allow_unauthenticated
        {
            p.push(
                "http.allow_unauthenticated",
                format!(
                    "http.listen = {} is not a loopback address and no [[http.tokens]] or [[http.tls.clients]] are configured, so anyone who reaches it could run models and write features; configure tokens (or client certificates), listen on 127.0.0.1, or set http.allow_unauthenticated = true to serve the API open",
                    self.listen
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::section::defaults_with;

    fn problems(toml: &str) -> Vec<crate::section::ConfigError> {
        let config: HttpConfig = defaults_with("http", toml);
        let mut p = Problems::default();
        config.validate(&mut p);
        p.0
    }

    fn paths(toml: &str) -> Vec<String> {
        problems(toml).into_iter().map(|e| e.path).collect()
    }

    const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn the_defaults_are_loopback_and_valid() {
        let config: HttpConfig = defaults_with("http", "");
        assert!(config.listen_is_loopback());
        assert!(problems("").is_empty());
        assert!(config.warnings().is_empty());
    }

    #[test]
    fn a_public_listener_without_tokens_needs_allow_unauthenticated() {
        let errs = problems("[http]\nlisten = \"0.0.0.0:8080\"\n");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].path, "http.allow_unauthenticated");
        assert!(errs[0].message.contains("allow_unauthenticated = true"));
        let open = "[http]\nlisten = \"0.0.0.0:8080\"\nallow_unauthenticated = true\n";
        assert!(problems(open).is_empty());
        let config: HttpConfig = defaults_with("http", open);
        assert!(config.warnings()[0].contains("http.allow_unauthenticated"));
        let guarded = format!(
            "[http]\nlisten = \"0.0.0.0:8080\"\n[[http.tokens]]\nname = \"a\"\nsha256 = \"{DIGEST}\"\nscopes = [\"predict\"]\n"
        );
        assert!(problems(&guarded).is_empty(), "{:?}", problems(&guarded));
    }

    #[test]
    fn a_token_needs_exactly_one_source_and_problems_name_the_key() {
        let toml = format!(
            r#"
            [[http.tokens]]
            name = "ok"
            sha256 = "{DIGEST}"
            scopes = ["predict"]
            [[http.tokens]]
            name = "two"
            sha256 = "{DIGEST}"
            env = "X"
            scopes = ["predict"]
            [[http.tokens]]
            name = "none"
            scopes = []
            [[http.tokens]]
            name = "short"
            sha256 = "abc"
            scopes = ["features:read"]
            tenant = ""
            [[http.tokens]]
            name = "nofile"
            file = "/nonexistent/inferflow-token"
            scopes = ["predict"]
            [[http.tokens]]
            name = "noenv"
            env = "INFERFLOW_TEST_TOKEN_THAT_IS_NOT_SET"
            scopes = ["predict"]
            "#
        );
        let p = paths(&toml);
        assert_eq!(
            p,
            [
                "http.tokens[1].env",
                "http.tokens[2].scopes",
                "http.tokens[2].sha256",
                "http.tokens[3].tenant",
                "http.tokens[3].sha256",
                "http.tokens[4].file",
                "http.tokens[5].env",
            ],
            "{:#?}",
            problems(&toml)
        );
    }

    #[test]
    fn the_same_token_twice_and_the_same_name_twice_are_refused() {
        let toml = format!(
            "[[http.tokens]]\nname = \"a\"\nsha256 = \"{DIGEST}\"\nscopes = [\"predict\"]\n[[http.tokens]]\nname = \"a\"\nsha256 = \"{}\"\nscopes = [\"predict\"]\n",
            DIGEST.to_ascii_uppercase()
        );
        assert_eq!(paths(&toml), ["http.tokens[1].name", "http.tokens[1]"]);
    }

    #[test]
    fn ops_listen_must_differ_and_tls_files_are_checked() {
        let toml = r#"
            [http]
            ops_listen = "127.0.0.1:8080"
            [http.tls]
            cert_file = "/nonexistent/tls.crt"
            key_file = "/nonexistent/tls.key"
            [[http.tls.clients]]
            common_name = "a"
            scopes = ["predict"]
        "#;
        assert_eq!(
            paths(toml),
            ["http.ops_listen", "http.tls.cert_file", "http.tls.clients"]
        );
    }
}
