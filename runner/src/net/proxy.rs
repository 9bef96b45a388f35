//! The job's HTTP(S) proxy: the only way out of a `network = "proxy"` guest.
//!
//! Built on hyper's server (already in the tree through reqwest and axum): hyper parses the
//! requests; this module only decides. `CONNECT host:port` (HTTPS and anything else over
//! TLS) is answered 200 and the upgraded connection is joined to a TCP connection to the
//! host; an absolute-form request (`GET http://host/path`, what `http_proxy` makes clients
//! send) is forwarded with hyper's client half, in origin form. Both only to hosts in the
//! [`Allowlist`]; anything else gets 403, and every denied host is recorded once for the
//! job log ([`Proxy::take_denials`]).
//!
//! Listens on a UNIX socket in a directory of its own (QEMU reaches it through the relay,
//! see `engine::net`), one per job. Bounded: connections at once, request header size,
//! connect and idle timeouts ([`Bounds`]). Dropping the [`Proxy`] stops it and every
//! connection it carries.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::allow::Allowlist;

/// How much one job's proxy takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Client connections (and tunnels) open at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// Largest request head (request line and headers) read from the guest; hyper answers
    /// a larger one with 431. hyper's minimum is 8 KiB.
    pub max_header_bytes: usize,
    /// Longest wait for a TCP connection to an allowed host.
    pub connect_timeout: Duration,
    /// A request head, an upstream response head, or a tunnel with no traffic either way
    /// for this long ends the connection.
    pub idle_timeout: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            max_connections: 64,
            max_header_bytes: 16 * 1024,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// How long the accept loop rests after a failed accept (e.g. out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Most distinct denied hosts remembered for the job log (a guest probing many hosts must
/// not grow the runner's memory).
const MAX_DENIALS: usize = 100;

/// A running proxy; dropping it stops it.
#[derive(Debug)]
pub struct Proxy {
    socket: PathBuf,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    allow: Allowlist,
    bounds: Bounds,
    /// Denied `host:port`s not yet taken for the log, and how many more were dropped.
    denials: Mutex<(BTreeSet<String>, usize)>,
    /// Every connection, tunnel and upstream task: aborted together when the proxy stops.
    tasks: Mutex<JoinSet<()>>,
}

impl Shared {
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().expect("proxy tasks lock");
        // Reap what has finished, so a long job does not collect finished tasks.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    fn deny(&self, target: String) {
        let mut d = self.denials.lock().expect("proxy denials lock");
        if d.0.len() < MAX_DENIALS || d.0.contains(&target) {
            d.0.insert(target);
        } else {
            d.1 += 1;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        if let Ok(mut tasks) = self.shared.tasks.lock() {
            tasks.abort_all();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Proxy {
    /// Starts a proxy listening on `socket` (which must not exist; its directory should be
    /// the job's own and private: whoever reaches the socket can use the proxy).
    pub fn start(socket: &Path, allow: Allowlist, bounds: Bounds) -> io::Result<Proxy> {
        let listener = UnixListener::bind(socket)?;
        let shared = Arc::new(Shared {
            allow,
            bounds,
            denials: Mutex::new((BTreeSet::new(), 0)),
            tasks: Mutex::new(JoinSet::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Proxy {
            socket: socket.to_path_buf(),
            shared,
            accept,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn allowlist(&self) -> &Allowlist {
        &self.shared.allow
    }

    /// The denied hosts (`host:port`) since the last call, sorted, and a line for those
    /// beyond [`MAX_DENIALS`].
    pub fn take_denials(&self) -> Vec<String> {
        self.denials().take()
    }

    /// A handle on the denials, for the step loop to log them as they happen.
    pub fn denials(&self) -> Denials {
        Denials(self.shared.clone())
    }
}

/// What the proxy denied, taken while the job runs so that each denial lands in the log
/// under the step that asked for it.
#[derive(Debug, Clone)]
pub struct Denials(Arc<Shared>);

impl Denials {
    /// The denied hosts (`host:port`) not taken yet, sorted, and a line for those beyond
    /// [`MAX_DENIALS`]. A host is reported once per take: asked again later, it is again.
    pub fn take(&self) -> Vec<String> {
        let mut d = self.0.denials.lock().expect("proxy denials lock");
        let mut out: Vec<String> = std::mem::take(&mut d.0).into_iter().collect();
        if d.1 > 0 {
            out.push(format!("{} more requests for other hosts", d.1));
            d.1 = 0;
        }
        out
    }
}

async fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(shared.bounds.max_connections));
    loop {
        // A slot first: beyond the bound, connections wait in the listen queue.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors or similar: do not spin on it.
            tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            continue;
        };
        let s = shared.clone();
        shared.spawn(serve_connection(stream, s, Arc::new(permit)));
    }
}

async fn serve_connection<S>(stream: S, shared: Arc<Shared>, permit: Arc<OwnedSemaphorePermit>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let bounds = shared.bounds;
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let permit = permit.clone();
        async move { Ok::<_, Infallible>(handle(req, shared, permit).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.idle_timeout)
        .max_buf_size(bounds.max_header_bytes)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let _ = conn.await;
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    permit: Arc<OwnedSemaphorePermit>,
) -> Response<Body> {
    if req.method() == Method::CONNECT {
        return connect(req, shared, permit).await;
    }
    forward(req, shared).await
}

fn reply(status: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(Body::from(format!("runner proxy: {text}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // The runner's own answers are refusals and failures: end the connection with them
    // (a refused CONNECT would otherwise leave it open for nothing).
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn denied(shared: &Shared, host: &str, port: u16) -> Response<Body> {
    let target = format!("{host}:{port}");
    shared.deny(target.clone());
    reply(
        StatusCode::FORBIDDEN,
        format!("{target} is not in this runner's network allowlist"),
    )
}

/// Opens a TCP connection to an allowed host within the connect timeout.
async fn open(shared: &Shared, host: &str, port: u16) -> Result<TcpStream, Response<Body>> {
    match tokio::time::timeout(
        shared.bounds.connect_timeout,
        TcpStream::connect((host, port)),
    )
    .await
    {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(reply(
            StatusCode::BAD_GATEWAY,
            format!("cannot connect to {host}:{port}: {e}"),
        )),
        Err(_) => Err(reply(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "no connection to {host}:{port} within {:?}",
                shared.bounds.connect_timeout
            ),
        )),
    }
}

/// `CONNECT host:port`: 200, then the upgraded connection is joined to the host.
async fn connect(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    permit: Arc<OwnedSemaphorePermit>,
) -> Response<Body> {
    let Some((host, port)) = req
        .uri()
        .authority()
        .and_then(|a| Some((a.host().to_string(), a.port_u16()?)))
    else {
        return reply(StatusCode::BAD_REQUEST, "CONNECT needs host:port".into());
    };
    if !shared.allow.allows(&host, port) {
        return denied(&shared, &host, port);
    }
    let upstream = match open(&shared, &host, port).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let idle = shared.bounds.idle_timeout;
    shared.spawn(async move {
        // Held until the tunnel ends: a tunnel counts as a connection.
        let _permit = permit;
        if let Ok(upgraded) = hyper::upgrade::on(req).await {
            let _ = tunnel(TokioIo::new(upgraded), upstream, idle).await;
        }
    });
    Response::new(Body::empty())
}

/// Copies both ways until both sides are done, or nothing moved either way for `idle`.
async fn tunnel<A, B>(a: A, b: B, idle: Duration) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let (mut a_open, mut b_open) = (true, true);
    let mut abuf = vec![0u8; 16 * 1024];
    let mut bbuf = vec![0u8; 16 * 1024];
    while a_open || b_open {
        let step = tokio::time::timeout(idle, async {
            tokio::select! {
                n = ar.read(&mut abuf), if a_open => match n? {
                    0 => { a_open = false; bw.shutdown().await }
                    n => bw.write_all(&abuf[..n]).await,
                },
                n = br.read(&mut bbuf), if b_open => match n? {
                    0 => { b_open = false; aw.shutdown().await }
                    n => aw.write_all(&bbuf[..n]).await,
                },
            }
        })
        .await;
        match step {
            Ok(r) => r?,
            Err(_) => return Ok(()), // idle: drop both
        }
    }
    Ok(())
}

/// Headers that belong to one hop and are not passed on (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Names listed in Connection are hop-by-hop too.
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(listed.iter().map(String::as_str))
    {
        headers.remove(name);
    }
}

/// An absolute-form `http://` request: sent on to the host in origin form.
async fn forward(req: Request<Incoming>, shared: Arc<Shared>) -> Response<Body> {
    let uri = req.uri().clone();
    if uri.scheme_str() != Some("http") {
        return reply(
            StatusCode::BAD_REQUEST,
            "send http://host/path URLs or CONNECT host:port to this proxy".into(),
        );
    }
    let Some(authority) = uri.authority().cloned() else {
        return reply(StatusCode::BAD_REQUEST, "the URL has no host".into());
    };
    let (host, port) = (
        authority.host().to_string(),
        authority.port_u16().unwrap_or(80),
    );
    if !shared.allow.allows(&host, port) {
        return denied(&shared, &host, port);
    }
    let upstream = match open(&shared, &host, port).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
            Ok(pair) => pair,
            Err(e) => return reply(StatusCode::BAD_GATEWAY, format!("{host}:{port}: {e}")),
        };
    // Drives the upstream connection while the response body streams to the guest.
    shared.spawn(async move {
        let _ = conn.await;
    });
    let (mut parts, body) = req.into_parts();
    parts.uri = match parts.uri.path_and_query() {
        Some(pq) => pq
            .as_str()
            .parse()
            .expect("a path and query is a valid URI"),
        None => hyper::Uri::from_static("/"),
    };
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(value) = HeaderValue::from_str(authority.as_str()) {
        parts.headers.insert(header::HOST, value);
    }
    let sent = tokio::time::timeout(
        shared.bounds.idle_timeout,
        sender.send_request(Request::from_parts(parts, body)),
    )
    .await;
    match sent {
        Ok(Ok(response)) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
        Ok(Err(e)) => reply(StatusCode::BAD_GATEWAY, format!("{host}:{port}: {e}")),
        Err(_) => reply(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "{host}:{port} sent no response head within {:?}",
                shared.bounds.idle_timeout
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::allow::HostRule;
    use tokio::net::{TcpListener, UnixStream};

    /// Most a test waits for anything (a bound, not a synchronisation).
    const WAIT: Duration = Duration::from_secs(10);

    /// A local HTTP server (axum) answering `/file` with "hello from upstream".
    async fn upstream() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new().route(
            "/file",
            axum::routing::get(|| async { "hello from upstream" }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        port
    }

    fn start(dir: &tempfile::TempDir, allow: &[String], bounds: Bounds) -> Proxy {
        let rules = allow
            .iter()
            .map(|r| r.parse::<HostRule>().unwrap())
            .collect();
        Proxy::start(&dir.path().join("p.sock"), Allowlist::new(rules), bounds).unwrap()
    }

    /// Sends `request` and reads until the proxy closes the connection.
    async fn exchange(proxy: &Proxy, request: &str) -> String {
        let mut s = UnixStream::connect(proxy.socket()).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut out))
            .await
            .expect("the proxy answers and closes")
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Reads a response head (up to the blank line).
    async fn read_head(s: &mut UnixStream) -> String {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(WAIT, s.read(&mut byte))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed before the end of the head: {head:?}");
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).into_owned()
    }

    fn get(target: &str) -> String {
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    }

    #[tokio::test]
    async fn an_allowed_plain_http_request_is_forwarded_and_a_denied_one_is_403_and_logged() {
        let port = upstream().await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = start(&dir, &[format!("127.0.0.1:{port}")], Bounds::default());
        let ok = exchange(&proxy, &get(&format!("http://127.0.0.1:{port}/file"))).await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.ends_with("hello from upstream"), "{ok}");
        // Another port of the same host, and another host: both denied.
        let other = port.wrapping_add(1).max(1);
        let no = exchange(&proxy, &get(&format!("http://127.0.0.1:{other}/file"))).await;
        assert!(no.starts_with("HTTP/1.1 403"), "{no}");
        assert!(
            no.contains("not in this runner's network allowlist"),
            "{no}"
        );
        let no = exchange(&proxy, &get("http://localhost/file")).await;
        assert!(no.starts_with("HTTP/1.1 403"), "{no}");
        assert_eq!(
            proxy.take_denials(),
            vec![format!("127.0.0.1:{other}"), "localhost:80".to_string()]
        );
        assert!(proxy.take_denials().is_empty(), "taken once");
        // Not a proxy request at all (origin form) or https in absolute form: refused.
        let bad = exchange(&proxy, &get("/file")).await;
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    }

    #[tokio::test]
    async fn connect_tunnels_to_an_allowed_host_only() {
        let port = upstream().await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = start(&dir, &[format!("127.0.0.1:{port}")], Bounds::default());
        let mut s = UnixStream::connect(proxy.socket()).await.unwrap();
        let connect =
            format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        s.write_all(connect.as_bytes()).await.unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        // Whatever goes through the tunnel reaches the host as it is.
        s.write_all(get("/file").as_bytes()).await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        let rest = String::from_utf8_lossy(&rest);
        assert!(rest.ends_with("hello from upstream"), "{rest}");

        let no = exchange(
            &proxy,
            "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
        )
        .await;
        assert!(no.starts_with("HTTP/1.1 403"), "{no}");
        assert_eq!(proxy.take_denials(), vec!["127.0.0.1:22".to_string()]);
    }

    #[tokio::test]
    async fn an_oversized_request_head_is_refused() {
        let port = upstream().await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = start(&dir, &[format!("127.0.0.1:{port}")], Bounds::default());
        let big = format!(
            "GET http://127.0.0.1:{port}/file HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        let mut s = UnixStream::connect(proxy.socket()).await.unwrap();
        // The proxy may close while we still write: only its answer matters.
        let _ = s.write_all(big.as_bytes()).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out))
            .await
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 431"), "{out}");
        assert!(!out.contains("hello from upstream"), "{out}");
    }

    #[tokio::test]
    async fn connections_beyond_the_bound_wait_for_a_slot() {
        let port = upstream().await;
        let dir = tempfile::tempdir().unwrap();
        let bounds = Bounds {
            max_connections: 1,
            ..Bounds::default()
        };
        let proxy = start(&dir, &[format!("127.0.0.1:{port}")], bounds);
        // The first connection holds the only slot (it sends nothing yet).
        let first = UnixStream::connect(proxy.socket()).await.unwrap();
        let mut second = UnixStream::connect(proxy.socket()).await.unwrap();
        second
            .write_all(get(&format!("http://127.0.0.1:{port}/file")).as_bytes())
            .await
            .unwrap();
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(300), second.read(&mut byte)).await;
        assert!(early.is_err(), "served while the only slot was taken");
        drop(first);
        let mut out = Vec::new();
        tokio::time::timeout(WAIT, second.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&out).ends_with("hello from upstream"));
    }

    #[tokio::test]
    async fn an_idle_tunnel_is_closed_and_a_stopped_proxy_takes_its_socket_away() {
        // A host that accepts and then says nothing.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let (s, _) = silent.accept().await.unwrap();
            tokio::time::sleep(WAIT * 2).await;
            drop(s);
        });
        let dir = tempfile::tempdir().unwrap();
        let bounds = Bounds {
            idle_timeout: Duration::from_millis(200),
            ..Bounds::default()
        };
        let proxy = start(&dir, &[format!("127.0.0.1:{port}")], bounds);
        let mut s = UnixStream::connect(proxy.socket()).await.unwrap();
        let connect =
            format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        s.write_all(connect.as_bytes()).await.unwrap();
        assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("the idle tunnel is closed well before the host hangs up")
            .unwrap();
        assert_eq!(n, 0);
        held.abort();
        let socket = proxy.socket().to_path_buf();
        drop(proxy);
        assert!(!socket.exists());
    }
}
