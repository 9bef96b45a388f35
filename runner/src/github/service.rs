//! The webhook server (axum). A delivery is answered within milliseconds — GitHub gives up
//! after 10 s — and its work runs in a background task:
//!
//! 1. body larger than `max_body_size` → 413 (an announced length is refused before a byte
//!    of the body is read; a chunked body is read up to the cap);
//! 2. signature missing or wrong → 401, and nothing else happens;
//! 3. draining (SIGQUIT or SIGTERM) → 503: the delivery shows as failed in the App's
//!    "Recent deliveries" and can be redelivered once a service runs again — better than
//!    accepting work this process will never do;
//! 4. a delivery id seen before → 200, ignored (GitHub redelivers with the same id);
//! 5. known events → 202 and a job; `ping` → 200; anything else → 200, ignored, logged.
//!
//! With `failure_snapshots` set it also serves the kept failed VMs (`snapshots`):
//! `GET /snapshots/<64 hex>.tar.gz`, streamed from the file; anything else there is 404.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header as h, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::job::{self, Shared};
use super::payload::{self, Trigger};
use super::snapshots;
use super::webhook::{self, Dedupe, DEDUPE_CAPACITY};

/// Longest a delivery's body may take to arrive (GitHub sends it at once; 25 MB takes well
/// under a second on any link GitHub would use).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Counts jobs that have not finished reporting, so the server can stop only when they did.
#[derive(Debug, Clone)]
pub struct Tracker {
    active: Arc<watch::Sender<usize>>,
}

/// Held by a running job; dropping it counts the job as done.
#[derive(Debug)]
pub struct JobGuard {
    active: Arc<watch::Sender<usize>>,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.active.send_modify(|n| *n -= 1);
    }
}

impl Tracker {
    pub fn new() -> Self {
        Tracker {
            active: Arc::new(watch::channel(0).0),
        }
    }

    pub fn start(&self) -> JobGuard {
        self.active.send_modify(|n| *n += 1);
        JobGuard {
            active: self.active.clone(),
        }
    }

    /// Resolves once no job is running.
    pub async fn idle(&self) {
        let mut rx = self.active.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new()
    }
}

/// The server's state.
#[derive(Debug)]
struct Server {
    secret: Vec<u8>,
    max_body: usize,
    dedupe: Dedupe,
    tracker: Tracker,
    shared: Arc<Shared>,
}

/// Serves webhooks on `listener` until the service drains and every job has reported.
pub async fn serve(
    listener: TcpListener,
    webhook_path: &str,
    max_body: usize,
    secret: Vec<u8>,
    shared: Arc<Shared>,
) -> std::io::Result<()> {
    let tracker = Tracker::new();
    let shutdown = shared.ctx.shutdown.clone();
    let server = Arc::new(Server {
        secret,
        max_body,
        dedupe: Dedupe::new(DEDUPE_CAPACITY),
        tracker: tracker.clone(),
        shared,
    });
    let serves_snapshots = server.shared.snapshots.is_some();
    let app = Router::new()
        .route(webhook_path, post(delivery))
        .route("/healthz", get(health))
        .route(
            &format!("{}{{name}}", snapshots::ROUTE_PREFIX),
            get(snapshot),
        )
        .with_state(server);
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, path = webhook_path, "GitHub webhook server listening");
    // Not axum::serve: it has no header read timeout and no connection cap.
    let mut limits = crate::serve::http::ConnectionLimits::default();
    if serves_snapshots {
        // A download of tens of MiB over a slow link outlives a webhook's minute; the
        // webhook's own body deadline still bounds deliveries.
        limits.lifetime = SNAPSHOT_DOWNLOAD_LIFETIME;
    }
    crate::serve::http::serve(listener, app, limits, async move {
        shutdown.draining().await;
        tracing::info!("draining: new deliveries get 503; waiting for running jobs to report");
        tracker.idle().await;
    })
    .await
}

async fn health(State(s): State<Arc<Server>>) -> (StatusCode, &'static str) {
    if s.shared.ctx.shutdown.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}

/// Longest a connection lives when snapshots are served (a 25 MiB download at 20 KiB/s).
pub const SNAPSHOT_DOWNLOAD_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// `GET /snapshots/NAME`: the kept snapshot NAME names, streamed; 404 for anything else.
async fn snapshot(State(s): State<Arc<Server>>, Path(name): Path<String>) -> Response {
    let not_found = || (StatusCode::NOT_FOUND, "no such snapshot (expired?)\n").into_response();
    let Some(store) = s.shared.snapshots.clone() else {
        return not_found();
    };
    let found = tokio::task::spawn_blocking(move || store.get(&name))
        .await
        .ok()
        .flatten();
    let Some((file, len)) = found else {
        tracing::info!("snapshot download refused: unknown or expired id");
        return not_found();
    };
    tracing::info!(bytes = len, "serving a failure snapshot");
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(
        tokio::fs::File::from_std(file),
    ));
    let headers = [
        (h::CONTENT_TYPE, "application/gzip".to_string()),
        (h::CONTENT_LENGTH, len.to_string()),
        (
            h::CONTENT_DISPOSITION,
            format!(
                "attachment; filename=\"{}\"",
                crate::snapshot_archive::ARCHIVE_NAME
            ),
        ),
        (h::CACHE_CONTROL, "no-store".to_string()),
        (h::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
    ];
    (StatusCode::OK, headers, body).into_response()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn delivery(
    State(s): State<Arc<Server>>,
    headers: HeaderMap,
    body: Body,
) -> (StatusCode, &'static str) {
    const TOO_LARGE: (StatusCode, &str) = (StatusCode::PAYLOAD_TOO_LARGE, "payload too large\n");
    let announced = header(&headers, "content-length").and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > s.max_body as u64) {
        tracing::warn!(
            announced,
            max = s.max_body,
            "webhook refused: body too large"
        );
        return TOO_LARGE;
    }
    let read = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, s.max_body));
    let body: Bytes = match read.await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, max = s.max_body, "webhook refused: body too large or cut off");
            return TOO_LARGE;
        }
        Err(_) => {
            // A sender trickling bytes must not hold a connection (and its memory) forever.
            tracing::warn!(timeout = ?BODY_TIMEOUT, "webhook refused: body not received in time");
            return (StatusCode::REQUEST_TIMEOUT, "body not received in time\n");
        }
    };
    accept(&s, &headers, &body)
}

/// Everything a delivery gets before its answer; synchronous, so it cannot be slow.
fn accept(s: &Server, headers: &HeaderMap, body: &[u8]) -> (StatusCode, &'static str) {
    // Authenticate before looking at anything the sender controls.
    let signature = headers.get(webhook::SIGNATURE_HEADER).map(|v| v.as_bytes());
    if let Err(e) = webhook::verify_signature(&s.secret, body, signature) {
        tracing::warn!(reason = %e, bytes = body.len(), "webhook refused: bad signature");
        return (StatusCode::UNAUTHORIZED, "bad signature\n");
    }
    let event = header(headers, webhook::EVENT_HEADER).unwrap_or_default();
    let delivery = header(headers, webhook::DELIVERY_HEADER).unwrap_or_default();
    let span = tracing::info_span!("delivery", delivery, event);
    let _enter = span.enter();
    if s.shared.ctx.shutdown.is_draining() {
        tracing::warn!("delivery refused: the service is shutting down (redeliver it later)");
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    if event.is_empty() || delivery.is_empty() {
        tracing::warn!("delivery without X-GitHub-Event or X-GitHub-Delivery");
        return (
            StatusCode::BAD_REQUEST,
            "X-GitHub-Event and X-GitHub-Delivery are required\n",
        );
    }
    if !s.dedupe.first_time(delivery) {
        tracing::info!("duplicate delivery ignored");
        return (StatusCode::OK, "duplicate delivery ignored\n");
    }
    let trigger = match payload::parse(event, body) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %super::chain(&e), "delivery refused: invalid payload");
            // Not taken: a redelivery of it deserves a fresh look.
            s.dedupe.forget(delivery);
            return (StatusCode::BAD_REQUEST, "invalid payload\n");
        }
    };
    let (target, only) = match trigger {
        Trigger::Ping => {
            tracing::info!("ping: the webhook is set up");
            return (StatusCode::OK, "pong\n");
        }
        Trigger::Ignore(why) => {
            tracing::info!(why, "event ignored");
            return (StatusCode::OK, "ignored\n");
        }
        Trigger::RunAll(t) => (t, None),
        Trigger::RunOne {
            target,
            external_id,
        } => (target, Some(external_id)),
    };
    tracing::info!(repo = %target.full_name, sha = %target.sha, only = ?only, "delivery accepted");
    let guard = s.tracker.start();
    let shared = s.shared.clone();
    let job_span = tracing::info_span!(parent: &span, "work");
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            job::run(shared, target, only).await;
            drop(guard);
        },
        job_span,
    ));
    (StatusCode::ACCEPTED, "accepted\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tracker_is_idle_only_when_every_job_is_done() {
        let t = Tracker::new();
        t.idle().await; // no jobs: at once
        let a = t.start();
        let b = t.start();
        drop(a);
        let waiting = tokio::spawn({
            let t = t.clone();
            async move { t.idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("idle after the last job")
            .unwrap();
    }
}
