//! The listeners the HTTP server accepts on: plain TCP, or TLS (rustls, with the
//! configuration [`Reloading`] keeps current). Both give each connection a [`Peer`]: its
//! address and, over mTLS, the subject CN of its verified client certificate, which the
//! routes see as `ConnectInfo<Peer>`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::access::tls::{Reloading, common_name};

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is at the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The remote address.
    pub addr: SocketAddr,
    /// The subject CN of the client certificate, when one was verified (mTLS).
    pub client: Option<Arc<str>>,
}

impl Connected<IncomingStream<'_, Plain>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Plain>) -> Self {
        stream.remote_addr().clone()
    }
}

impl Connected<IncomingStream<'_, Tls>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Tls>) -> Self {
        stream.remote_addr().clone()
    }
}

/// Plain TCP.
pub struct Plain(pub TcpListener);

impl Listener for Plain {
    type Io = TcpStream;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, addr) = Listener::accept(&mut self.0).await;
        (stream, Peer { addr, client: None })
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.0.local_addr()?,
            client: None,
        })
    }
}

/// TLS over TCP. Handshakes run in tasks of their own, so a slow client holds up nobody; the
/// connections that complete one are handed to the server in the order they finish.
pub struct Tls {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, Peer)>,
    local: SocketAddr,
}

impl Tls {
    /// Accepts on `listener`, each handshake with the configuration `tls` holds at that moment.
    pub fn new(listener: TcpListener, tls: Arc<Reloading>) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut listener = listener;
            loop {
                let (tcp, addr) = tokio::select! {
                    () = tx.closed() => return,
                    accepted = Listener::accept(&mut listener) => accepted,
                };
                let acceptor = TlsAcceptor::from(tls.current());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let client = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|chain| chain.first())
                                .and_then(|cert| common_name(cert))
                                .map(Arc::from);
                            let _ = tx.send((stream, Peer { addr, client })).await;
                        }
                        Ok(Err(err)) => {
                            tracing::debug!(peer = %addr, error = %err, "TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(peer = %addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Tls { ready, local })
    }
}

impl Listener for Tls {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accepting task ended (the runtime is shutting down): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.local,
            client: None,
        })
    }
}
