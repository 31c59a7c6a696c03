//! Stopping and starting the shared test servers through `scripts/stack`.

use std::path::PathBuf;
use std::process::Command;

/// A server of `scripts/stack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Kafka,
    Cassandra,
    Postgres,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Kafka => "kafka",
            Server::Cassandra => "cassandra",
            Server::Postgres => "postgres",
        }
    }
}

fn stack(args: &[&str]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/stack");
    let status = Command::new(&script)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("running {} {args:?}: {e}", script.display()));
    assert!(
        status.success(),
        "`scripts/stack {}` failed ({status}); the fault suite needs the servers started by `scripts/stack up`",
        args.join(" ")
    );
}

/// A stopped server, started again (on its data) when this is dropped, even if the test
/// panicked, so later tests find the stack up.
pub struct Outage {
    server: Server,
    restarted: bool,
}

impl Outage {
    /// Stops `server` (SIGTERM; it keeps its data).
    pub fn begin(server: Server) -> Outage {
        stack(&["stop", server.name()]);
        Outage {
            server,
            restarted: false,
        }
    }

    /// Starts the server again and waits until it is ready.
    pub fn end(mut self) {
        self.restarted = true;
        stack(&["start", self.server.name()]);
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if !self.restarted {
            stack(&["start", self.server.name()]);
        }
    }
}
