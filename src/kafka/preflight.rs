//! A first contact with the cluster before a command starts its real clients, so that a client
//! that can never work stops at once with the reason: a wrong SASL user name or password, a
//! mechanism the broker does not enable, a broker certificate the configured CA does not sign.
//!
//! librdkafka reports these only as asynchronous error events on a client's main queue, and
//! keeps retrying; rdkafka's admin client never polls that queue, so creating topics with a
//! wrong password just times out after 30 s with `OperationTimedOut`. Here a short-lived
//! producer polls the events while it asks for metadata.
//!
//! Only authentication and TLS failures fail the check: they do not heal by waiting. A broker
//! that is not up yet, refuses connections or answers slowly passes (after at most the given
//! time), and the caller's own retries and timeouts deal with it as before. The error text is
//! librdkafka's, which names the mechanism and the broker but never the password.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;

use super::KafkaConfig;

/// Why the cluster refused this client.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// The client could not even be created (an unreadable `ssl_ca_location`, for example).
    #[error("creating a Kafka client for {bootstrap}: {source}")]
    Client {
        /// `kafka.bootstrap_servers`.
        bootstrap: String,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// SASL authentication failed: check the user name, password and mechanism.
    #[error(
        "Kafka at {bootstrap} refused the credentials of kafka.sasl_username `{user}` \
         (check kafka.sasl_password and kafka.sasl_mechanism): {reason}"
    )]
    Authentication {
        /// `kafka.bootstrap_servers`.
        bootstrap: String,
        /// `kafka.sasl_username`.
        user: String,
        /// librdkafka's description.
        reason: String,
    },
    /// The TLS handshake failed: a certificate the CA does not sign, or a host name that does
    /// not match it. (TLS against a plaintext listener looks like a transport failure to
    /// librdkafka, so it is not caught here.)
    #[error(
        "TLS with Kafka at {bootstrap} failed (check kafka.ssl_ca_location and \
         kafka.security_protocol): {reason}"
    )]
    Tls {
        /// `kafka.bootstrap_servers`.
        bootstrap: String,
        /// librdkafka's description.
        reason: String,
    },
}

/// Records the first authentication or TLS error librdkafka reports.
#[derive(Default)]
struct Recorder {
    refused: Mutex<Option<(RDKafkaErrorCode, String)>>,
}

impl ClientContext for Recorder {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(code @ (RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)) =
            error.rdkafka_error_code()
        {
            let mut refused = self
                .refused
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            refused.get_or_insert((code, reason.to_owned()));
        } else {
            tracing::debug!(error = %error, reason, "Kafka preflight: client error");
        }
    }
}

impl ProducerContext for Recorder {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// Connects with `cfg` and asks for metadata, for at most `within`. Blocking: call it from a
/// thread that may block (`spawn_blocking` in async code). Returns `Ok` once metadata arrives,
/// or when `within` passes without an authentication or TLS error.
pub fn check(cfg: &KafkaConfig, within: Duration) -> Result<(), PreflightError> {
    let producer: BaseProducer<Recorder> = super::base_client_config(cfg)
        .set("socket.connection.setup.timeout.ms", "5000")
        .create_with_context(Recorder::default())
        .map_err(|source| PreflightError::Client {
            bootstrap: cfg.bootstrap_servers.clone(),
            source,
        })?;
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = left.min(Duration::from_millis(500));
        let metadata = producer.client().fetch_metadata(None, attempt);
        // Serves the error events that arrived meanwhile.
        producer.poll(Duration::from_millis(50));
        let refused = producer
            .context()
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some((code, reason)) = refused {
            let bootstrap = cfg.bootstrap_servers.clone();
            return Err(match code {
                RDKafkaErrorCode::SSL => PreflightError::Tls { bootstrap, reason },
                _ => PreflightError::Authentication {
                    bootstrap,
                    user: cfg.sasl_username.clone().unwrap_or_default(),
                    reason,
                },
            });
        }
        match metadata {
            Ok(_) => return Ok(()),
            Err(error) if Instant::now() >= deadline => {
                tracing::warn!(
                    bootstrap = %cfg.bootstrap_servers,
                    error = %error,
                    "Kafka did not answer a metadata request yet; going on"
                );
                return Ok(());
            }
            Err(_) => {}
        }
    }
}
