//! `[kafka]` and `[topics]`: how to reach the brokers, how the consumers behave, and the topic
//! names inferflow reads and writes. Every key is documented in `config/default.toml`.

use std::collections::BTreeMap;
use std::num::{NonZeroU64, NonZeroUsize};

use serde::{Deserialize, Serialize};

use crate::secret::Secret;
use crate::section::{Problems, Section, check_host_port};

/// `[kafka]`: how to reach the brokers and how the processor's consumer behaves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// Consumer group of the request processor.
    pub group_id: String,
    /// Client id reported to the brokers.
    pub client_id: String,
    /// Where a new group starts reading.
    pub auto_offset_reset: OffsetReset,
    /// librdkafka `session.timeout.ms`.
    pub session_timeout_ms: NonZeroU64,
    /// librdkafka `group.instance.id` (static membership).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_instance_id: Option<String>,
    /// librdkafka `max.poll.interval.ms`.
    pub max_poll_interval_ms: NonZeroU64,
    /// librdkafka `security.protocol`.
    pub security_protocol: SecurityProtocol,
    /// SASL mechanism, required with the `sasl_*` protocols.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_username: Option<String>,
    /// SASL password (redacted when printed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_password: Option<Secret>,
    /// CA certificate file used to verify the brokers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_ca_location: Option<String>,
    /// librdkafka `queued.max.messages.kbytes` of the request consumer.
    pub consumer_queue_kbytes: NonZeroUsize,
    /// librdkafka `statistics.interval.ms`; 0 disables statistics.
    pub statistics_interval_ms: u64,
    /// librdkafka `auto.commit.interval.ms`.
    pub commit_interval_ms: NonZeroU64,
    /// Time given to in-flight work of revoked partitions.
    pub rebalance_drain_timeout_ms: u64,
    /// librdkafka `linger.ms` of every producer (results, dead letters, transactions).
    pub producer_linger_ms: u64,
    /// Further librdkafka properties, passed through.
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

/// librdkafka `auto.offset.reset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetReset {
    /// Start from the oldest retained message.
    Earliest,
    /// Start from the next message produced.
    Latest,
}

impl OffsetReset {
    /// The librdkafka spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
        }
    }
}

/// librdkafka `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// No TLS, no authentication.
    Plaintext,
    /// TLS without SASL.
    Ssl,
    /// SASL without TLS.
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// The librdkafka spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// librdkafka `sasl.mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SaslMechanism {
    /// User name and password in clear (use with TLS).
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM with SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM with SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The librdkafka spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// librdkafka properties that `kafka.extra` may not set: inferflow sets them itself, either from
/// its own keys or because the at-least-once guarantee depends on them.
pub const RESERVED_KAFKA_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "group.instance.id",
    "client.id",
    "enable.auto.offset.store",
    "enable.auto.commit",
    "auto.offset.reset",
    "session.timeout.ms",
    "max.poll.interval.ms",
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "enable.partition.eof",
    "queued.max.messages.kbytes",
    "statistics.interval.ms",
    "partition.assignment.strategy",
    "auto.commit.interval.ms",
    "transactional.id",
    "transaction.timeout.ms",
    "isolation.level",
    "linger.ms",
    "queue.buffering.max.ms",
];

/// librdkafka's largest `linger.ms`.
const MAX_LINGER_MS: u64 = 900_000;

impl Section for KafkaConfig {
    fn validate(&self, p: &mut Problems) {
        let servers: Vec<&str> = self.bootstrap_servers.split(',').map(str::trim).collect();
        if servers.iter().all(|s| s.is_empty()) {
            p.push(
                "kafka.bootstrap_servers",
                "must name at least one broker as host:port",
            );
        }
        for server in servers.iter().filter(|s| !s.is_empty()) {
            if let Err(why) = check_host_port(server) {
                p.push("kafka.bootstrap_servers", format!("`{server}`: {why}"));
            }
        }
        if self.group_id.trim().is_empty() {
            p.push("kafka.group_id", "must not be empty");
        }
        if self.client_id.trim().is_empty() {
            p.push("kafka.client_id", "must not be empty");
        }
        if let Some(id) = &self.group_instance_id
            && id.trim().is_empty()
        {
            p.push(
                "kafka.group_instance_id",
                "must not be empty; remove the key for dynamic membership",
            );
        }
        if self.session_timeout_ms.get() < 6000 {
            p.push(
                "kafka.session_timeout_ms",
                format!(
                    "{} is below the brokers' default group.min.session.timeout.ms (6000); the group coordinator would refuse to join",
                    self.session_timeout_ms
                ),
            );
        }
        if self.session_timeout_ms >= self.max_poll_interval_ms {
            p.push(
                "kafka.session_timeout_ms",
                format!(
                    "{} must be lower than kafka.max_poll_interval_ms ({})",
                    self.session_timeout_ms, self.max_poll_interval_ms
                ),
            );
        }
        if self.security_protocol.uses_sasl() {
            if self.sasl_mechanism.is_none() {
                p.push(
                    "kafka.sasl_mechanism",
                    format!(
                        "required when kafka.security_protocol is \"{}\"",
                        self.security_protocol.as_str()
                    ),
                );
            }
            if self.sasl_username.as_deref().is_none_or(str::is_empty) {
                p.push(
                    "kafka.sasl_username",
                    "required with a SASL security_protocol",
                );
            }
            if self.sasl_password.as_ref().is_none_or(Secret::is_empty) {
                p.push(
                    "kafka.sasl_password",
                    "required with a SASL security_protocol (set INFERFLOW__KAFKA__SASL_PASSWORD)",
                );
            }
        } else if self.sasl_mechanism.is_some()
            || self.sasl_username.is_some()
            || self.sasl_password.is_some()
        {
            p.push(
                "kafka.security_protocol",
                "SASL settings are given but the protocol is not sasl_plaintext or sasl_ssl",
            );
        }
        if self.producer_linger_ms > MAX_LINGER_MS {
            p.push(
                "kafka.producer_linger_ms",
                format!(
                    "{} is above librdkafka's largest linger.ms ({MAX_LINGER_MS})",
                    self.producer_linger_ms
                ),
            );
        }
        for key in self.extra.keys() {
            if RESERVED_KAFKA_PROPERTIES.contains(&key.as_str()) {
                let instead = match key.as_str() {
                    "linger.ms" | "queue.buffering.max.ms" => "; set kafka.producer_linger_ms",
                    _ => "",
                };
                p.push(
                    format!("kafka.extra.\"{key}\""),
                    format!("is set by inferflow itself and cannot be overridden here{instead}"),
                );
            }
        }
    }
}

/// `[topics]`: the topic names inferflow reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicsConfig {
    /// Inference requests.
    pub requests: String,
    /// Feature updates.
    pub features: String,
    /// Default results topic.
    pub results: String,
    /// Dead-letter topic.
    pub dlq: String,
    /// Cache invalidations between instances; empty turns them off.
    pub feature_invalidations: String,
    /// Comparisons of routes' shadow versions with the primary, keyed by request id; empty
    /// turns publishing them off (shadows are still counted).
    pub shadow_results: String,
    /// Topics a request may name in `reply_to`.
    #[serde(default)]
    pub reply_to_allowed: Vec<String>,
    /// Create missing topics at start-up.
    pub create_missing: bool,
    /// Partitions of created topics.
    pub create_partitions: NonZeroUsize,
    /// Replication factor of created topics.
    pub create_replication_factor: NonZeroUsize,
}

impl Section for TopicsConfig {
    fn validate(&self, p: &mut Problems) {
        for (key, name) in [
            ("topics.requests", &self.requests),
            ("topics.features", &self.features),
            ("topics.results", &self.results),
            ("topics.dlq", &self.dlq),
        ] {
            if let Err(why) = check_topic_name(name) {
                p.push(key, why);
            }
        }
        if !self.feature_invalidations.is_empty()
            && let Err(why) = check_topic_name(&self.feature_invalidations)
        {
            p.push("topics.feature_invalidations", why);
        }
        if !self.shadow_results.is_empty()
            && let Err(why) = check_topic_name(&self.shadow_results)
        {
            p.push("topics.shadow_results", why);
        }
        if self.features == self.requests {
            p.push(
                "topics.features",
                "must differ from topics.requests: feature updates and requests are consumed by different groups",
            );
        }
        for (i, name) in self.reply_to_allowed.iter().enumerate() {
            if let Err(why) = check_topic_name(name) {
                p.push(format!("topics.reply_to_allowed[{i}]"), why);
            }
        }
        if i32::try_from(self.create_partitions.get()).is_err() {
            p.push("topics.create_partitions", "is too large");
        }
        if self.requests == self.results || self.requests == self.dlq {
            p.push(
                "topics.requests",
                "must differ from topics.results and topics.dlq, or inferflow would consume its own output",
            );
        }
    }
}

/// Checks a Kafka topic name: 1 to 249 characters from `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn check_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a topic name must not be empty".to_owned());
    }
    if name.len() > 249 {
        return Err(format!(
            "a topic name has at most 249 characters, this one has {}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("`{name}` is not a valid topic name"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "`{name}` contains `{bad}`; topic names use only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}
