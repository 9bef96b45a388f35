//! The agent client against a scripted fake agent over `tokio::io::duplex`.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::*;

const T: Duration = Duration::from_secs(5);

/// Starts a fake agent that answers each request line with whatever `reply` returns
/// (raw bytes, so tests can send garbage). Sync requests get the real agent's behaviour:
/// a stray parse error for the 0xFF byte, then 0xFF and the id.
fn fake_agent<F>(mut reply: F) -> DuplexStream
where
    F: FnMut(&Value) -> Vec<u8> + Send + 'static,
{
    let (client, server) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        let (r, mut w) = tokio::io::split(server);
        let mut r = BufReader::new(r);
        let mut line = Vec::new();
        loop {
            line.clear();
            if r.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let had_delimiter = line.first() == Some(&0xFF);
            let body = if had_delimiter { &line[1..] } else { &line[..] };
            let req: Value = serde_json::from_slice(body).unwrap();
            let out = if req["execute"] == "guest-sync-delimited" {
                let mut out = Vec::new();
                if had_delimiter {
                    out.extend_from_slice(
                        b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n",
                    );
                }
                out.push(0xFF);
                out.extend_from_slice(
                    format!("{{\"return\": {}}}\n", req["arguments"]["id"]).as_bytes(),
                );
                out
            } else {
                reply(&req)
            };
            if w.write_all(&out).await.is_err() {
                return;
            }
        }
    });
    client
}

fn ret(v: Value) -> Vec<u8> {
    let mut b = serde_json::to_vec(&json!({ "return": v })).unwrap();
    b.push(b'\n');
    b
}

#[tokio::test]
async fn sync_skips_the_stray_error_and_commands_work() {
    let stream = fake_agent(|req| match req["execute"].as_str().unwrap() {
        "guest-info" => ret(json!({"version": "10.0.2", "supported_commands": []})),
        other => panic!("unexpected {other}"),
    });
    let mut agent = AgentClient::new(stream);
    agent.sync(Instant::now() + T).await.unwrap();
    assert_eq!(agent.version(T).await.unwrap(), "10.0.2");
}

#[tokio::test]
async fn stale_sync_replies_are_skipped() {
    // A previous client left a reply for another id in the pipe.
    let (client, server) = tokio::io::duplex(4096);
    let (r, mut w) = tokio::io::split(server);
    tokio::spawn(async move {
        let mut r = BufReader::new(r);
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line).await.unwrap();
        let req: Value = serde_json::from_slice(&line[1..]).unwrap();
        w.write_all(b"garbage\xFF{\"return\": 12345}\n")
            .await
            .unwrap();
        w.write_all("\u{FF}".as_bytes()).await.unwrap(); // UTF-8 of U+00FF is not 0xFF
        let mut real = vec![0xFF];
        real.extend_from_slice(format!("{{\"return\": {}}}\n", req["arguments"]["id"]).as_bytes());
        w.write_all(&real).await.unwrap();
        // keep the connection open
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    let mut agent = AgentClient::new(client);
    agent.sync(Instant::now() + T).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn sync_gives_up_at_the_deadline_when_the_agent_is_silent() {
    let (client, _server) = tokio::io::duplex(4096);
    let mut agent = AgentClient::new(client);
    let start = Instant::now();
    let err = agent
        .sync(start + Duration::from_secs(3))
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Timeout { .. }), "{err}");
    assert!(start.elapsed() >= Duration::from_secs(3));
    assert!(start.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn exec_status_distinguishes_exit_and_signal() {
    let mut calls = 0;
    let stream = fake_agent(move |req| match req["execute"].as_str().unwrap() {
        "guest-exec" => {
            // env replaces the guest's environment, so it must be sent in full.
            assert_eq!(req["arguments"]["env"], json!(["PATH=/usr/bin:/bin"]));
            assert_eq!(req["arguments"]["capture-output"], json!(false));
            ret(json!({"pid": 42}))
        }
        "guest-exec-status" => {
            calls += 1;
            match calls {
                1 => ret(json!({"exited": false})),
                2 => ret(json!({"exited": true, "exitcode": 7})),
                _ => ret(json!({"exited": true, "signal": 9})),
            }
        }
        other => panic!("unexpected {other}"),
    });
    let mut agent = AgentClient::new(stream);
    agent.sync(Instant::now() + T).await.unwrap();
    let req = ExecRequest {
        path: "/bin/sh".into(),
        args: vec!["-c".into(), "exit 7".into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
    };
    assert_eq!(agent.exec(&req, T).await.unwrap(), 42);
    assert_eq!(agent.exec_status(42, T).await.unwrap(), ExecStatus::Running);
    assert_eq!(
        agent.exec_status(42, T).await.unwrap(),
        ExecStatus::Exited(7)
    );
    // Killed by a signal is never reported as exit 0.
    assert_eq!(
        agent.exec_status(42, T).await.unwrap(),
        ExecStatus::Signaled(9)
    );
}

#[tokio::test]
async fn agent_errors_are_typed() {
    let stream = fake_agent(|_| {
        b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"Guest agent command failed\"}}\n"
            .to_vec()
    });
    let mut agent = AgentClient::new(stream);
    agent.sync(Instant::now() + T).await.unwrap();
    let err = agent.version(T).await.unwrap_err();
    assert!(
        matches!(err, AgentError::Command { ref desc, .. } if desc.contains("failed")),
        "{err}"
    );
}

#[tokio::test]
async fn oversized_reply_is_refused_not_buffered() {
    let stream = fake_agent(|_| {
        let mut big = b"{\"return\": \"".to_vec();
        big.extend(std::iter::repeat_n(b'a', 5 * 1024 * 1024));
        big.extend_from_slice(b"\"}\n");
        big
    });
    let mut agent = AgentClient::new(stream);
    agent.sync(Instant::now() + T).await.unwrap();
    let err = agent.version(T).await.unwrap_err();
    assert!(matches!(err, AgentError::Protocol { .. }), "{err}");
}

#[tokio::test]
async fn file_round_trip_and_size_cap() {
    use base64::Engine as _;
    use std::sync::{Arc, Mutex};
    let store = Arc::new(Mutex::new(Vec::<u8>::new()));
    let pos = Arc::new(Mutex::new(0usize));
    let (s, p) = (store.clone(), pos.clone());
    let b64 = base64::engine::general_purpose::STANDARD;
    let stream = fake_agent(move |req| {
        let a = &req["arguments"];
        match req["execute"].as_str().unwrap() {
            "guest-file-open" => {
                if a["mode"] == "w" {
                    s.lock().unwrap().clear();
                }
                *p.lock().unwrap() = 0;
                ret(json!(3))
            }
            "guest-file-write" => {
                let data = b64.decode(a["buf-b64"].as_str().unwrap()).unwrap();
                s.lock().unwrap().extend_from_slice(&data);
                ret(json!({"count": data.len(), "eof": false}))
            }
            "guest-file-read" => {
                let data = s.lock().unwrap().clone();
                let mut at = p.lock().unwrap();
                let n = (data.len() - *at).min(a["count"].as_u64().unwrap() as usize);
                let chunk = &data[*at..*at + n];
                *at += n;
                ret(json!({"count": n, "buf-b64": b64.encode(chunk), "eof": *at == data.len()}))
            }
            "guest-file-close" => ret(json!({})),
            other => panic!("unexpected {other}"),
        }
    });
    let mut agent = AgentClient::new(stream);
    agent.sync(Instant::now() + T).await.unwrap();
    // Larger than one chunk, so both directions loop.
    let data: Vec<u8> = (0..(FILE_CHUNK + 1000)).map(|i| (i % 251) as u8).collect();
    agent.write_file("/tmp/x", &data, T).await.unwrap();
    assert_eq!(*store.lock().unwrap(), data);
    assert_eq!(
        agent.read_file("/tmp/x", usize::MAX, T).await.unwrap(),
        data
    );
    let err = agent.read_file("/tmp/x", 1000, T).await.unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_command_resyncs_before_the_next() {
    // The first guest-info reply never comes; the second command must not read a stale
    // reply, so the client syncs again first (the fake counts syncs).
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let infos = Arc::new(AtomicUsize::new(0));
    let n = infos.clone();
    let stream = fake_agent(move |_| {
        if n.fetch_add(1, Ordering::SeqCst) == 0 {
            Vec::new()
        } else {
            ret(json!({"version": "second"}))
        }
    });
    let mut agent = AgentClient::new(stream);
    agent.sync(Instant::now() + T).await.unwrap();
    let err = agent.version(Duration::from_millis(500)).await.unwrap_err();
    assert!(matches!(err, AgentError::Timeout { .. }));
    assert_eq!(agent.version(T).await.unwrap(), "second");
}

#[tokio::test]
async fn a_stream_is_written_through_one_handle_in_full_requests() {
    use base64::Engine as _;
    use std::sync::{Arc, Mutex};
    // (what was written, the size of each write, how many opens and closes)
    let store = Arc::new(Mutex::new((Vec::<u8>::new(), Vec::<usize>::new(), 0, 0)));
    let s = store.clone();
    let b64 = base64::engine::general_purpose::STANDARD;
    let stream = fake_agent(move |req| {
        let a = &req["arguments"];
        let mut s = s.lock().unwrap();
        match req["execute"].as_str().unwrap() {
            "guest-file-open" => {
                assert_eq!(a["mode"], "w");
                s.2 += 1;
                ret(json!(7))
            }
            "guest-file-write" => {
                assert_eq!(a["handle"], 7);
                let data = b64.decode(a["buf-b64"].as_str().unwrap()).unwrap();
                s.1.push(data.len());
                s.0.extend_from_slice(&data);
                ret(json!({"count": data.len(), "eof": false}))
            }
            "guest-file-close" => {
                s.3 += 1;
                ret(json!({}))
            }
            other => panic!("unexpected {other}"),
        }
    });
    let mut agent = AgentClient::new(stream);
    agent.sync(Instant::now() + T).await.unwrap();
    // 40 chunks of 64 KiB and an odd one (2.5 MiB and a bit, so three requests), sent
    // while the writer drains the channel.
    let (tx, rx) = mpsc::channel(4);
    let feeder = tokio::spawn(async move {
        let mut sent = Vec::new();
        for i in 0..41u32 {
            let len = if i == 40 { 1000 } else { 64 << 10 };
            let chunk: Vec<u8> = (0..len).map(|j| ((i + j) % 251) as u8).collect();
            sent.extend_from_slice(&chunk);
            tx.send(chunk).await.unwrap();
        }
        sent
    });
    let written = agent.write_stream("/tmp/ws.tar", rx, T).await.unwrap();
    let want = feeder.await.unwrap();
    let s = store.lock().unwrap();
    assert_eq!(written, want.len() as u64);
    assert!(s.0 == want, "the guest file differs from what was sent");
    assert_eq!(s.1, [FILE_CHUNK, FILE_CHUNK, want.len() - 2 * FILE_CHUNK]);
    assert_eq!((s.2, s.3), (1, 1));
}

#[tokio::test]
async fn a_failed_stream_write_lets_go_of_the_sender() {
    let stream = fake_agent(|req| match req["execute"].as_str().unwrap() {
        "guest-file-open" => ret(json!(7)),
        "guest-file-write" => {
            b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"No space left on device\"}}\n"
                .to_vec()
        }
        "guest-file-close" => ret(json!({})),
        other => panic!("unexpected {other}"),
    });
    let mut agent = AgentClient::new(stream);
    agent.sync(Instant::now() + T).await.unwrap();
    let (tx, rx) = mpsc::channel(4);
    // A producer that would send forever: it must stop when the writer gives up.
    let producer = tokio::spawn(async move {
        let mut sent = 0usize;
        while tx.send(vec![1u8; 64 << 10]).await.is_ok() {
            sent += 1;
        }
        sent
    });
    let err = agent.write_stream("/tmp/ws.tar", rx, T).await.unwrap_err();
    assert!(err.to_string().contains("failed"), "{err}");
    let sent = tokio::time::timeout(T, producer).await.unwrap().unwrap();
    // One request's worth and what the channel holds, not more.
    assert!(sent <= FILE_CHUNK / (64 << 10) + 5, "{sent}");
}
