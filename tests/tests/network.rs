//! Guest network against real VMs: `proxy` reaches an allowed host through the job's proxy
//! and nothing else, `none` has no interface but `lo`, and a suite asking for more than
//! allowed is refused before anything boots. The only servers reached are ones this test
//! starts on the host's loopback.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::{in_guest, runner, workspace_root};

const BODY: &str = "served by the network test";

/// A loopback HTTP server answering every request with [`BODY`]; counts the connections.
fn serve() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            counted.fetch_add(1, Ordering::SeqCst);
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            // Read the request head (bounded), answer, close.
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
                BODY.len()
            );
        }
    });
    (port, hits)
}

#[test]
fn a_proxy_guest_reaches_an_allowed_host_and_nothing_else() {
    let (allowed, allowed_hits) = serve();
    let (denied, denied_hits) = serve();
    // no_proxy (localhost, 127.0.0.1) is for the guest's own loopback: cleared here so
    // that 127.0.0.1 means the host's, through the proxy.
    let script = format!(
        "no_proxy= busybox wget -q -O - http://127.0.0.1:{allowed}/file; echo; echo allowed-rc=$?\n\
         no_proxy= busybox wget -q -O - http://127.0.0.1:{denied}/file; echo denied-rc=$?\n\
         env -u http_proxy busybox wget -q -T 10 -O - http://10.0.2.2:{allowed}/file; echo direct-rc=$?\n\
         ls /sys/class/net | tr '\\n' ' '; echo"
    );
    let allow = format!("127.0.0.1:{allowed}");
    let r = runner(
        &workspace_root(),
        &[
            "test",
            "--arch",
            "riscv64",
            "--network",
            "proxy",
            "--allow-host",
            &allow,
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    assert_eq!(r.code, 0, "{r}");
    assert!(r.stdout.contains(BODY), "{r}");
    assert!(r.stdout.contains("allowed-rc=0"), "{r}");
    assert!(r.stdout.contains("denied-rc=1"), "{r}");
    assert!(r.stdout.contains("direct-rc=1"), "{r}");
    assert!(r.stdout.contains("eth0"), "{r}");
    // The denial is in the job's live output, naming the host, under the request that was
    // denied: after the allowed fetch, before the denied fetch's exit status. The denied
    // server saw nothing, and the allowed one only the proxied request (not the direct
    // attempt).
    let line = format!(
        "runner: network: the proxy denied 127.0.0.1:{denied} (not in this runner's allowlist)"
    );
    let at = |needle: &str| {
        r.stdout
            .find(needle)
            .unwrap_or_else(|| panic!("no {needle:?}: {r}"))
    };
    assert!(at("allowed-rc=0") < at(&line), "{r}");
    assert!(at(&line) < at("denied-rc=1"), "{r}");
    assert_eq!(r.stdout.matches(&line).count(), 1, "once: {r}");
    assert_eq!(denied_hits.load(Ordering::SeqCst), 0, "{r}");
    assert_eq!(allowed_hits.load(Ordering::SeqCst), 1, "{r}");
}

#[test]
fn a_full_guest_resolves_the_debian_mirror_and_has_a_default_route() {
    // Only the mirror the images are built from is looked up.
    let r = runner(
        &workspace_root(),
        &[
            "test",
            "--arch",
            "riscv64",
            "--network",
            "full",
            "--",
            "sh",
            "-c",
            "getent ahostsv4 deb.debian.org >/dev/null && echo resolved; busybox ip route | grep -c '^default via 10.0.2.2'; env | grep -ci '^https*_proxy=' || true",
        ],
    );
    assert_eq!(r.code, 0, "{r}");
    let lines: Vec<&str> = r.stdout.lines().map(str::trim).collect();
    assert_eq!(lines, ["resolved", "1", "0"], "{r}");
}

#[test]
fn apt_installs_a_package_from_the_images_mirror_through_the_proxy() {
    // The default allowlist: the image recipe's mirror host, nothing else. The image's own
    // sources.list and keyring; apt's proxy comes from the runner.
    let r = runner(
        &workspace_root(),
        &[
            "test",
            "--arch",
            "riscv64",
            "--network",
            "proxy",
            "--",
            "sh",
            "-c",
            "apt-get update -q && apt-get install -y -q hello && hello",
        ],
    );
    assert_eq!(r.code, 0, "{r}");
    assert!(r.stdout.contains("Hello, world!"), "{r}");
    assert!(!r.stderr.contains("the proxy denied"), "{r}");
}

#[test]
fn a_guest_without_network_has_only_loopback() {
    let r = in_guest(
        "riscv64",
        &[
            "sh",
            "-c",
            "ls /sys/class/net; env | grep -ci '^https*_proxy=' || true",
        ],
    );
    assert_eq!(r.code, 0, "{r}");
    let lines: Vec<&str> = r.stdout.lines().map(str::trim).collect();
    assert_eq!(lines, ["lo", "0"], "{r}");
}

#[test]
fn a_suite_asking_for_more_network_than_allowed_is_refused_before_boot() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("runner.toml"),
        "[defaults]\narch = [\"riscv64\"]\n\n[[suite]]\nname = \"fetch\"\nnetwork = \"full\"\n\
         [[suite.step]]\nname = \"s\"\nrun = \"true\"\n",
    )
    .unwrap();
    // (extra args, the ceiling named)
    let cases: [(&[&str], &str); 2] = [(&[], "\"none\""), (&["--network", "proxy"], "\"proxy\"")];
    for (extra, ceiling) in cases {
        let mut args = vec!["test"];
        args.extend_from_slice(extra);
        let r = runner(dir.path(), &args);
        assert_eq!(r.code, runner::exit::CONFIG, "{r}");
        let line = format!(
            "suite 'fetch' asks for network = \"full\", over the limit --network = {ceiling}"
        );
        assert!(r.stderr.contains(&line), "{r}");
        assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {r}");
        assert!(!r.stderr.contains("booting"), "{r}");
    }
}
