//! The QMP client against a scripted fake QMP server over `tokio::io::duplex`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};
use tokio::time::Instant;

use super::*;

const T: Duration = Duration::from_secs(5);

/// QEMU's greeting, as QEMU 10 sends it.
const GREETING: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\n";

/// Starts a fake QMP server: it sends `greeting`, then answers each request line with
/// whatever `reply` returns (raw bytes, so tests can send events, garbage or nothing).
/// Every request is recorded so that tests can check what the client sent.
fn fake_qmp<F>(greeting: &'static [u8], mut reply: F) -> (DuplexStream, Arc<Mutex<Vec<Value>>>)
where
    F: FnMut(&Value) -> Vec<u8> + Send + 'static,
{
    let (client, server) = tokio::io::duplex(1 << 16);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        let (r, mut w) = tokio::io::split(server);
        if w.write_all(greeting).await.is_err() {
            return;
        }
        let mut r = BufReader::new(r);
        let mut line = Vec::new();
        loop {
            line.clear();
            if r.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let req: Value = serde_json::from_slice(&line).expect("the client sends JSON");
            log.lock().unwrap().push(req.clone());
            let out = if req["execute"] == "qmp_capabilities" {
                ret(&req, json!({}))
            } else {
                reply(&req)
            };
            if w.write_all(&out).await.is_err() {
                return;
            }
        }
    });
    (client, seen)
}

/// A successful reply to `req`.
fn ret(req: &Value, v: Value) -> Vec<u8> {
    line(json!({ "return": v, "id": req["id"] }))
}

fn line(v: Value) -> Vec<u8> {
    let mut b = serde_json::to_vec(&v).unwrap();
    b.push(b'\n');
    b
}

fn event(name: &str) -> Vec<u8> {
    line(json!({"event": name, "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}))
}

#[tokio::test]
async fn negotiates_then_runs_commands_with_fresh_ids() {
    let (stream, seen) = fake_qmp(GREETING, |req| match req["execute"].as_str().unwrap() {
        "query-status" => ret(req, json!({"status": "running", "running": true})),
        other => panic!("unexpected {other}"),
    });
    let mut qmp = QmpClient::negotiate(stream, T).await.unwrap();
    let status = qmp.execute("query-status", None, T).await.unwrap();
    assert_eq!(status["status"], "running");
    qmp.execute("query-status", None, T).await.unwrap();
    let seen = seen.lock().unwrap();
    // Capabilities first, then the commands; every one with an id of its own.
    let names: Vec<_> = seen.iter().map(|r| r["execute"].clone()).collect();
    assert_eq!(
        names,
        [
            json!("qmp_capabilities"),
            json!("query-status"),
            json!("query-status")
        ]
    );
    let ids: Vec<_> = seen.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert!(ids[0] < ids[1] && ids[1] < ids[2], "{ids:?}");
    assert!(seen.iter().all(|r| r.get("arguments").is_none()));
}

#[tokio::test]
async fn arguments_are_sent_as_given() {
    let (stream, seen) = fake_qmp(GREETING, |req| ret(req, json!({})));
    let mut qmp = QmpClient::negotiate(stream, T).await.unwrap();
    qmp.execute("migrate", Some(json!({"uri": "file:/x"})), T)
        .await
        .unwrap();
    assert_eq!(
        seen.lock().unwrap()[1]["arguments"],
        json!({"uri": "file:/x"})
    );
}

#[tokio::test]
async fn events_before_the_reply_are_kept_in_order() {
    let (stream, _) = fake_qmp(GREETING, |req| {
        let mut out = event("STOP");
        out.extend(event("MIGRATION"));
        out.extend(ret(req, json!({})));
        out
    });
    let mut qmp = QmpClient::negotiate(stream, T).await.unwrap();
    qmp.execute("stop", None, T).await.unwrap();
    let names: Vec<_> = qmp.events.iter().map(|e| e["event"].clone()).collect();
    assert_eq!(names, [json!("STOP"), json!("MIGRATION")]);
}

#[tokio::test]
async fn kept_events_are_bounded() {
    let (stream, _) = fake_qmp(GREETING, |req| {
        let mut out = Vec::new();
        for _ in 0..300 {
            out.extend(event("RTC_CHANGE"));
        }
        out.extend(event("LAST"));
        out.extend(ret(req, json!({})));
        out
    });
    let mut qmp = QmpClient::negotiate(stream, T).await.unwrap();
    qmp.execute("cont", None, T).await.unwrap();
    assert_eq!(qmp.events.len(), 256);
    assert_eq!(qmp.events.last().unwrap()["event"], "LAST");
}

#[tokio::test]
async fn a_reply_to_another_id_is_not_taken_for_ours() {
    // The late reply to an earlier, timed-out command arrives first.
    let (stream, _) = fake_qmp(GREETING, |req| {
        let mut out = line(json!({"return": {"status": "stale"}, "id": 999_999}));
        out.extend(ret(req, json!({"status": "ours"})));
        out
    });
    let mut qmp = QmpClient::negotiate(stream, T).await.unwrap();
    let r = qmp.execute("query-status", None, T).await.unwrap();
    assert_eq!(r["status"], "ours");
}

#[tokio::test]
async fn an_error_reply_names_the_command_and_qemus_reason() {
    let (stream, _) = fake_qmp(GREETING, |req| {
        line(json!({"error": {"class": "GenericError", "desc": "no such device"}, "id": req["id"]}))
    });
    let mut qmp = QmpClient::negotiate(stream, T).await.unwrap();
    let err = qmp.execute("device_del", None, T).await.unwrap_err();
    match err {
        QmpError::Command { command, desc } => {
            assert_eq!(command, "device_del");
            assert_eq!(desc, "no such device");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_reply_without_return_or_error_is_a_protocol_error() {
    let (stream, _) = fake_qmp(GREETING, |req| line(json!({"id": req["id"]})));
    let mut qmp = QmpClient::negotiate(stream, T).await.unwrap();
    let err = qmp.execute("stop", None, T).await.unwrap_err();
    assert!(matches!(err, QmpError::Protocol(_)), "{err:?}");
}

#[tokio::test]
async fn something_else_than_a_greeting_is_refused() {
    let (stream, _) = fake_qmp(b"{\"hello\": 1}\n", |_| Vec::new());
    let err = QmpClient::negotiate(stream, T).await.unwrap_err();
    assert!(matches!(err, QmpError::Protocol(_)), "{err:?}");
    let (stream, _) = fake_qmp(b"not json\n", |_| Vec::new());
    let err = QmpClient::negotiate(stream, T).await.unwrap_err();
    assert!(matches!(err, QmpError::Protocol(_)), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn a_silent_server_times_out_the_greeting() {
    let (client, _server) = tokio::io::duplex(4096);
    let start = Instant::now();
    let err = QmpClient::negotiate(client, T).await.unwrap_err();
    match err {
        QmpError::Timeout { command, timeout } => {
            assert_eq!(command, "greeting");
            assert_eq!(timeout, T);
        }
        other => panic!("{other:?}"),
    }
    assert!(start.elapsed() >= T && start.elapsed() < T * 2);
}

#[tokio::test(start_paused = true)]
async fn a_command_without_a_reply_times_out_at_its_deadline() {
    // Events keep coming, but no reply: the deadline holds all the same.
    let (stream, _) = fake_qmp(GREETING, |_| event("RTC_CHANGE"));
    let mut qmp = QmpClient::negotiate(stream, T).await.unwrap();
    let start = Instant::now();
    let wait = Duration::from_secs(3);
    let err = qmp.execute("query-migrate", None, wait).await.unwrap_err();
    match err {
        QmpError::Timeout { command, timeout } => {
            assert_eq!(command, "query-migrate");
            assert_eq!(timeout, wait);
        }
        other => panic!("{other:?}"),
    }
    assert!(start.elapsed() >= wait && start.elapsed() < wait * 2);
    assert_eq!(qmp.events.len(), 1);
}

#[tokio::test]
async fn an_oversized_reply_is_an_error_not_a_growing_buffer() {
    // More than MAX_QMP_LINE without a newline, and the server keeps the connection open.
    let (stream, _) = fake_qmp(GREETING, |_| vec![b'x'; MAX_QMP_LINE + 1024]);
    let mut qmp = QmpClient::negotiate(stream, T).await.unwrap();
    let err = qmp.execute("query-status", None, T).await.unwrap_err();
    match err {
        QmpError::Io(e) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn end_of_stream_is_closed() {
    // The server goes away without answering (QEMU exited).
    let (client, server) = tokio::io::duplex(4096);
    tokio::spawn(async move {
        let (r, mut w) = tokio::io::split(server);
        w.write_all(GREETING).await.unwrap();
        let mut r = BufReader::new(r);
        let req = req_line(&mut r).await;
        w.write_all(&ret(&req, json!({}))).await.unwrap();
        // Reads the next command, then hangs up.
        req_line(&mut r).await;
    });
    let mut qmp = QmpClient::negotiate(client, T).await.unwrap();
    let err = qmp.execute("query-status", None, T).await.unwrap_err();
    assert!(matches!(err, QmpError::Closed), "{err:?}");
}

#[tokio::test]
async fn quit_is_done_when_qemu_hangs_up_without_a_reply() {
    let (client, server) = tokio::io::duplex(4096);
    tokio::spawn(async move {
        let (r, mut w) = tokio::io::split(server);
        w.write_all(GREETING).await.unwrap();
        let mut r = BufReader::new(r);
        let req = req_line(&mut r).await;
        w.write_all(&ret(&req, json!({}))).await.unwrap();
        assert_eq!(req_line(&mut r).await["execute"], "quit");
    });
    let mut qmp = QmpClient::negotiate(client, T).await.unwrap();
    qmp.quit(T).await.unwrap();
}

async fn req_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Value {
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line).await.unwrap();
    serde_json::from_slice(&line).unwrap()
}
