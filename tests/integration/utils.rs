//! Shared helpers for the integration tests: server addresses, unique names, and readiness
//! checks that fail loudly (naming the command that starts the servers) instead of skipping.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use tokio::sync::OnceCell;

/// How to start the servers the integration tests need.
pub const START_HINT: &str = "start them with `scripts/stack up` (see README.md, Quick start)";

/// Kafka bootstrap address: `INFERFLOW_TEST_KAFKA`, default 127.0.0.1:9092.
pub fn kafka_bootstrap() -> String {
    std::env::var("INFERFLOW_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// CQL contact point: `INFERFLOW_TEST_CQL`, default 127.0.0.1:9042.
pub fn cql_contact() -> String {
    std::env::var("INFERFLOW_TEST_CQL").unwrap_or_else(|_| "127.0.0.1:9042".to_owned())
}

/// A name no other test (or earlier run) uses: `prefix` plus a random suffix. Letters, digits
/// and underscores only, at most 48 characters, so it is also a valid keyspace name.
pub fn unique_name(prefix: &str) -> String {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let mut name = format!("{prefix}_{}", &suffix[..16]);
    name.truncate(48);
    name
}

/// An address where nothing will ever answer while the returned socket lives: bound, never
/// listening, so a connection to it is refused at once. (A port from [`free_port`] is free
/// only until another test, running beside, binds it; a client that then reaches a server of
/// another protocol waits for its greeting instead of being refused.)
pub fn refusing_address() -> (socket2::Socket, std::net::SocketAddr) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("a TCP socket");
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("an address");
    socket.bind(&any.into()).expect("binding 127.0.0.1:0");
    let addr = socket
        .local_addr()
        .expect("its address")
        .as_socket()
        .expect("an IP address");
    (socket, addr)
}

/// A free loopback port, e.g. for a child process's HTTP server.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Installs a test log subscriber once (honours `RUST_LOG`).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A librdkafka config pointing at the test broker.
pub fn kafka_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", kafka_bootstrap());
    config
}

static KAFKA_READY: OnceCell<()> = OnceCell::const_new();

/// Panics with instructions unless the broker answers a metadata request.
pub async fn require_kafka() {
    KAFKA_READY
        .get_or_init(|| async {
            let bootstrap = kafka_bootstrap();
            let probe = tokio::task::spawn_blocking(move || {
                let consumer: BaseConsumer = kafka_config()
                    .set("socket.connection.setup.timeout.ms", "3000")
                    .create()
                    .map_err(|e| e.to_string())?;
                consumer
                    .fetch_metadata(None, Duration::from_secs(10))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .await
            .expect("metadata probe task");
            if let Err(err) = probe {
                panic!(
                    "Kafka is not reachable at {bootstrap} ({err}). The integration tests need a real broker: {START_HINT}, or point INFERFLOW_TEST_KAFKA at one."
                );
            }
        })
        .await;
}

/// Creates a topic with `partitions` partitions and waits until the broker has it.
pub async fn create_topic(name: &str, partitions: i32) {
    require_kafka().await;
    let admin: AdminClient<DefaultClientContext> = kafka_config().create().expect("admin client");
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics(
            [&topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .expect("create_topics request");
    for result in results {
        result.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}

/// A CQL session on the test database, or a panic with instructions.
pub async fn cql_session() -> Session {
    let contact = cql_contact();
    match SessionBuilder::new()
        .known_node(&contact)
        .connection_timeout(Duration::from_secs(5))
        .build()
        .await
    {
        Ok(session) => session,
        Err(err) => panic!(
            "the CQL database is not reachable at {contact} ({err}). The integration tests need a real one: {START_HINT}, or point INFERFLOW_TEST_CQL at one."
        ),
    }
}

/// A fresh keyspace (SimpleStrategy, replication factor 1: valid on ScyllaDB and Cassandra),
/// and the session to use it.
pub async fn cql_keyspace(prefix: &str) -> (Session, String) {
    let session = cql_session().await;
    let keyspace = unique_name(prefix);
    session
        .query_unpaged(
            format!(
                "CREATE KEYSPACE {keyspace} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
            ),
            &[],
        )
        .await
        .expect("create keyspace");
    (session, keyspace)
}

/// The SQL servers of `scripts/stack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sql {
    Postgres,
    Mysql,
}

impl Sql {
    /// The test login's DSN on database `db` (`INFERFLOW_TEST_POSTGRES_URL` /
    /// `INFERFLOW_TEST_MYSQL_URL` name another server, ending with the database name).
    pub fn url(self, db: &str) -> String {
        let (var, default) = match self {
            Sql::Postgres => (
                "INFERFLOW_TEST_POSTGRES_URL",
                "postgres://inferflow:inferflow@127.0.0.1:5432/inferflow",
            ),
            Sql::Mysql => (
                "INFERFLOW_TEST_MYSQL_URL",
                "mysql://inferflow:inferflow@127.0.0.1:3306/inferflow",
            ),
        };
        let base = std::env::var(var).unwrap_or_else(|_| default.to_owned());
        let (server, _) = base.rsplit_once('/').expect("a DSN ending with /database");
        format!("{server}/{db}")
    }

    /// Runs one statement on the test login's own database.
    pub async fn admin(self, statement: &str) {
        use sqlx::Connection as _;
        let hint = "is the server running? scripts/stack start postgres (or mariadb)";
        match self {
            Sql::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.url("inferflow"))
                    .await
                    .unwrap_or_else(|e| panic!("{e}: {hint}"));
                sqlx::raw_sql(statement)
                    .execute(&mut conn)
                    .await
                    .expect(statement);
            }
            Sql::Mysql => {
                let mut conn = sqlx::MySqlConnection::connect(&self.url("inferflow"))
                    .await
                    .unwrap_or_else(|e| panic!("{e}: {hint}"));
                sqlx::raw_sql(statement)
                    .execute(&mut conn)
                    .await
                    .expect(statement);
            }
        }
    }
}
