//! Kafka clients built from configuration.
//!
//! Every librdkafka client inferflow creates starts from [`base_client_config`], so connection,
//! security and client id settings are set in one place. Secrets go into the `ClientConfig`
//! here and nowhere else; rdkafka 0.39 and later redact them in `ClientConfig`'s `Debug`, and
//! inferflow never logs a `ClientConfig` anyway.

pub mod commit;
mod config;
pub mod offsets;
pub mod preflight;
pub mod sink;
pub mod source;
pub mod transactional;

use rdkafka::ClientConfig;

pub use self::config::{
    KafkaConfig, OffsetReset, RESERVED_KAFKA_PROPERTIES, SaslMechanism, SecurityProtocol,
    TopicsConfig, check_topic_name,
};

/// Connection, security and pass-through settings shared by every client (consumer, producer,
/// admin). Role-specific settings (group, offsets, acks) are added by the caller.
pub fn base_client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("client.id", &cfg.client_id)
        .set("security.protocol", cfg.security_protocol.as_str());
    if let Some(mechanism) = cfg.sasl_mechanism {
        client.set("sasl.mechanism", mechanism.as_str());
    }
    if let Some(user) = &cfg.sasl_username {
        client.set("sasl.username", user);
    }
    if let Some(password) = &cfg.sasl_password {
        client.set("sasl.password", password.expose());
    }
    if let Some(ca) = &cfg.ssl_ca_location {
        client.set("ssl.ca.location", ca);
    }
    for (key, value) in &cfg.extra {
        client.set(key, value);
    }
    client
}

/// Settings for a consumer in `group_id` that stores offsets only when told to (at-least-once):
/// auto-commit stays on, but `enable.auto.offset.store` is off, so nothing is committed that the
/// processor has not explicitly marked as done.
pub fn consumer_config(cfg: &KafkaConfig, group_id: &str) -> ClientConfig {
    let mut client = base_client_config(cfg);
    client
        .set("group.id", group_id)
        .set("enable.auto.commit", "true")
        .set(
            "auto.commit.interval.ms",
            cfg.commit_interval_ms.to_string(),
        )
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", cfg.auto_offset_reset.as_str())
        .set("session.timeout.ms", cfg.session_timeout_ms.to_string())
        .set("max.poll.interval.ms", cfg.max_poll_interval_ms.to_string());
    if let Some(id) = &cfg.group_instance_id {
        client.set("group.instance.id", id);
    }
    client
}

/// Settings for an idempotent producer that waits for all in-sync replicas, with
/// `kafka.producer_linger_ms`: every producer inferflow creates starts from these.
pub fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut client = base_client_config(cfg);
    client
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", cfg.producer_linger_ms.to_string());
    client
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::section::defaults_with;

    #[test]
    fn consumer_never_auto_stores_offsets_and_extra_settings_pass_through() {
        let kafka: KafkaConfig =
            defaults_with("kafka", "[kafka.extra]\n\"fetch.wait.max.ms\" = \"100\"\n");
        let client = consumer_config(&kafka, "g");
        assert_eq!(client.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(client.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(client.get("group.id"), Some("g"));
        assert_eq!(client.get("fetch.wait.max.ms"), Some("100"));
    }

    #[test]
    fn every_producer_lingers_as_configured() {
        let kafka: KafkaConfig = defaults_with("kafka", "");
        assert_eq!(producer_config(&kafka).get("linger.ms"), Some("5"));
        let kafka: KafkaConfig = defaults_with("kafka", "[kafka]\nproducer_linger_ms = 0\n");
        let client = producer_config(&kafka);
        assert_eq!(client.get("linger.ms"), Some("0"));
        assert_eq!(client.get("acks"), Some("all"));
        // Consumers are not given a producer property (librdkafka would warn about it).
        assert_eq!(consumer_config(&kafka, "g").get("linger.ms"), None);
    }

    #[test]
    fn sasl_settings_reach_librdkafka_but_not_debug_output() {
        let kafka: KafkaConfig = defaults_with(
            "kafka",
            r#"
            [kafka]
            security_protocol = "sasl_ssl"
            sasl_mechanism = "SCRAM-SHA-256"
            sasl_username = "svc"
            sasl_password = "pa55word"
            "#,
        );
        let client = producer_config(&kafka);
        assert_eq!(client.get("sasl.password"), Some("pa55word"));
        assert_eq!(client.get("sasl.mechanism"), Some("SCRAM-SHA-256"));
        assert!(!format!("{client:?}").contains("pa55word"));
    }
}
