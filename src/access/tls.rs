//! TLS for the HTTP listener: the rustls server configuration built from `[http.tls]`
//! (certificate chain and key from PEM files; with `client_ca_file`, client certificates are
//! required and verified against it), kept current by [`Reloading`], which rebuilds it when a
//! file changes and keeps the previous one when the new files are bad. [`common_name`] reads a
//! verified client certificate's subject CN, which `[[http.tls.clients]]` maps to scopes.

use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use super::TlsConfig;

/// How often [`Reloading::watch`] looks at the files' modification times.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

/// A problem with one key of `[http.tls]`: the key (`cert_file`, `key_file`,
/// `client_ca_file`) and what is wrong.
pub type TlsProblem = (&'static str, String);

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsProblem> {
    std::fs::read(path).map_err(|e| (key, format!("cannot read {}: {e}", path.display())))
}

fn certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsProblem> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            (
                key,
                format!("{}: not PEM certificates: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err((key, format!("{}: holds no PEM certificate", path.display())));
    }
    Ok(certs)
}

/// The rustls configuration of `tls`, or the key whose file is missing or bad.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, TlsProblem> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates("cert_file", &tls.cert_file)?;
    let key_pem = read("key_file", &tls.key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        (
            "key_file",
            format!("{}: no PEM private key: {e}", tls.key_file.display()),
        )
    })?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| ("cert_file", format!("TLS set-up: {e}")))?;
    let builder = match &tls.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("client_ca_file", path)? {
                roots.add(cert).map_err(|e| {
                    (
                        "client_ca_file",
                        format!("{}: not a usable CA certificate: {e}", path.display()),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ("client_ca_file", format!("{}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        (
            "key_file",
            format!(
                "{} does not go with {}: {e}",
                tls.key_file.display(),
                tls.cert_file.display()
            ),
        )
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Checks that `tls`'s files make a server configuration.
pub fn check(tls: &TlsConfig) -> Result<(), TlsProblem> {
    server_config(tls).map(|_| ())
}

/// The current server configuration, rebuilt when its files change.
#[derive(Debug)]
pub struct Reloading {
    tls: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
}

impl Reloading {
    /// Builds the first configuration; an error names the key.
    pub fn new(tls: &TlsConfig) -> Result<Self, TlsProblem> {
        Ok(Reloading {
            current: RwLock::new(server_config(tls)?),
            tls: tls.clone(),
        })
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn stamps(&self) -> Vec<Option<SystemTime>> {
        let files = [
            Some(&self.tls.cert_file),
            Some(&self.tls.key_file),
            self.tls.client_ca_file.as_ref(),
        ];
        files
            .into_iter()
            .flatten()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }

    /// Looks at the files every `every` until `stop`; when one changed, builds a new
    /// configuration and uses it for new connections, or logs why not and keeps the old one.
    pub async fn watch(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        let mut seen = self.stamps();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let now = self.stamps();
            if now == seen {
                continue;
            }
            seen = now;
            match server_config(&self.tls) {
                Ok(config) => {
                    *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
                    tracing::info!(cert_file = %self.tls.cert_file.display(), "TLS certificate reloaded");
                }
                Err((key, message)) => tracing::error!(
                    key = format!("http.tls.{key}"),
                    error = %message,
                    "the changed TLS files are not usable; new connections keep the previous certificate"
                ),
            }
        }
    }
}

/// The subject common name of a DER certificate; `None` when it has none, or more than one.
pub fn common_name(der: &[u8]) -> Option<String> {
    use x509_cert::der::asn1::ObjectIdentifier;
    use x509_cert::der::{Decode, Tag, Tagged};
    const CN: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let mut names = cert
        .tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .filter(|atv| atv.oid == CN);
    let atv = names.next()?;
    if names.next().is_some() {
        return None;
    }
    match atv.value.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String => {
            std::str::from_utf8(atv.value.value())
                .ok()
                .map(str::to_owned)
        }
        _ => None,
    }
}
