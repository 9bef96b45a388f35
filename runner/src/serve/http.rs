//! The HTTP listener of the webhook server: axum's router behind hyper's HTTP/1 connection
//! handling with the bounds `axum::serve` does not set. Anyone on the network can connect:
//! a client that sends its headers slowly is cut off after [`HEADER_READ_TIMEOUT`] (hyper
//! counts from the moment the connection is accepted, and again while a kept-alive
//! connection waits for its next request), no connection lives longer than
//! [`CONNECTION_LIFETIME`], and at most [`ConnectionLimits::max_connections`] are served at
//! once — the next ones wait in the kernel's accept queue until a place is free.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Longest a client may take to send a request's headers (GitHub sends them at once).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one connection is served: headers, the body (itself bounded by the webhook's
/// body deadline) and the answer, which is immediate.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest the server waits for open connections after it was told to stop.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// The bounds of [`serve`]; tests shorten them.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub lifetime: Duration,
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            lifetime: CONNECTION_LIFETIME,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and gives open
/// connections [`CLOSE_GRACE`] to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let places = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        // A place first, then accept: connections over the cap wait in the accept queue.
        let place = tokio::select! {
            p = places.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: pass, do not spin.
                    tracing::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _place = place;
            match tokio::time::timeout(limits.lifetime, connection).await {
                Ok(Ok(())) => {}
                // Slow or broken clients; nothing to do but to let them go.
                Ok(Err(e)) => tracing::debug!(%peer, "connection ended: {e}"),
                Err(_) => {
                    tracing::debug!(%peer, "connection closed: open longer than {:?}", limits.lifetime)
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(CLOSE_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {CLOSE_GRACE:?}; closing them");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn start(
        limits: ConnectionLimits,
    ) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, app, limits, async {
            let _ = stopped.await;
        }));
        (addr, stop)
    }

    /// Reads until the server closes the connection or `within` passes; returns the text.
    async fn read_all(stream: &mut TcpStream, within: Duration) -> Option<String> {
        let mut buf = Vec::new();
        match tokio::time::timeout(within, stream.read_to_end(&mut buf)).await {
            Ok(_) => Some(String::from_utf8_lossy(&buf).into_owned()),
            Err(_) => None,
        }
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

    #[tokio::test]
    async fn a_client_sending_headers_slowly_is_cut_off() {
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_millis(300),
            ..Default::default()
        };
        let (addr, _stop) = start(limits).await;
        // Half a request line, then nothing: the server closes the connection.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HT").await.unwrap();
        let started = std::time::Instant::now();
        let text = read_all(&mut slow, Duration::from_secs(10)).await;
        assert!(text.is_some(), "the slow client was never cut off");
        assert!(!text.unwrap().contains("200 OK"));
        assert!(started.elapsed() < Duration::from_secs(5));
        // A client that sends nothing at all is cut off too.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert!(read_all(&mut silent, Duration::from_secs(10))
            .await
            .is_some());
        // A normal request still works.
        let mut ok = TcpStream::connect(addr).await.unwrap();
        ok.write_all(GET).await.unwrap();
        let text = read_all(&mut ok, Duration::from_secs(10)).await.unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    }

    #[tokio::test]
    async fn connections_over_the_cap_wait_for_a_place() {
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_secs(3),
            max_connections: 2,
            ..Default::default()
        };
        let (addr, _stop) = start(limits).await;
        // Two idle connections take both places.
        let mut idle: Vec<TcpStream> = Vec::new();
        for _ in 0..2 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // The third is queued by the kernel, not served: no answer while the others stay.
        let mut third = TcpStream::connect(addr).await.unwrap();
        third.write_all(GET).await.unwrap();
        let mut first = [0u8; 12];
        let early = tokio::time::timeout(Duration::from_millis(1500), third.read(&mut first)).await;
        assert!(early.is_err(), "served beyond the cap: {early:?}");
        // Once the idle ones are cut off (header read timeout), it gets its answer.
        let text = read_all(&mut third, Duration::from_secs(15)).await.unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        drop(idle);
    }
}
