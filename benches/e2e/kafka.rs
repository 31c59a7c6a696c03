//! Kafka clients of the driver: client settings, and the admin client that creates (and, even
//! when a run fails, deletes) each run's topics.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::settings::Settings;
use super::{START_HINT, lock};

pub(crate) fn client(s: &Settings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &s.bootstrap);
    c
}

pub(crate) struct Admin {
    admin: AdminClient<DefaultClientContext>,
    runtime: tokio::runtime::Runtime,
    /// Topics created and not deleted yet, deleted by [`Admin::clean_up`] if a run fails.
    created: Mutex<Vec<String>>,
}

impl Admin {
    pub(crate) fn new(s: &Settings) -> Admin {
        let probe: BaseConsumer = client(s)
            .set("socket.connection.setup.timeout.ms", "3000")
            .create()
            .expect("a metadata client");
        if let Err(err) = probe.fetch_metadata(None, Duration::from_secs(10)) {
            panic!(
                "Kafka is not reachable at {} ({err}): {START_HINT}",
                s.bootstrap
            );
        }
        Admin {
            admin: client(s).create().expect("an admin client"),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
            created: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn clean_up(&self) {
        let left = std::mem::take(&mut *lock(&self.created));
        if !left.is_empty() {
            let names: Vec<&str> = left.iter().map(String::as_str).collect();
            self.delete(&names, None);
        }
    }

    pub(crate) fn create(&self, name: &str, partitions: i32) {
        self.create_with(name, partitions, &[]);
    }

    /// Creates a topic with topic-level settings (`message.timestamp.type`, …).
    pub(crate) fn create_with(&self, name: &str, partitions: i32, config: &[(&str, &str)]) {
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for (key, value) in config {
            topic = topic.set(key, value);
        }
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
        let results = self
            .runtime
            .block_on(self.admin.create_topics([&topic], &opts))
            .expect("create_topics");
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
        }
        lock(&self.created).push(name.to_owned());
        // A client subscribing before the broker's metadata has the topic would wait for its
        // next metadata refresh (minutes): wait until every partition has a leader.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self
                .admin
                .inner()
                .fetch_metadata(Some(name), Duration::from_secs(5))
                .ok()
                .is_some_and(|m| {
                    m.topics().first().is_some_and(|t| {
                        t.error().is_none()
                            && t.partitions().len() == partitions as usize
                            && t.partitions().iter().all(|p| p.leader() >= 0)
                    })
                });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "topic {name} not visible within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn delete(&self, topics: &[&str], group: Option<&str>) {
        lock(&self.created).retain(|t| !topics.contains(&t.as_str()));
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
        if let Err(err) = self
            .runtime
            .block_on(self.admin.delete_topics(topics, &opts))
        {
            eprintln!("[e2e] deleting topics {topics:?}: {err}");
        }
        if let Some(group) = group {
            let _ = self
                .runtime
                .block_on(self.admin.delete_groups(&[group], &opts));
        }
    }
}

pub(crate) fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("bench_e2e_{prefix}_{}", &id[..10])
}
