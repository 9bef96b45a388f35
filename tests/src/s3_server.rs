//! A real S3-compatible server for the shared-cache tests: `s3s-fs` (crates.io, installed by
//! scripts/setup-host) on a free loopback port, storing objects as files in a temporary
//! directory, checking every request's SigV4 signature against one access/secret key pair.
//! Killed when dropped.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "runner-test-access";
pub const SECRET_KEY: &str = "runner-test-secret-d0n0tl0g";

#[derive(Debug)]
pub struct S3Server {
    child: Child,
    /// `127.0.0.1:PORT`: the `ServerAddress` of `[runners.cache.s3]`.
    pub address: String,
    /// Where the objects are (`<root>/<bucket>/<key>`).
    pub root: PathBuf,
    _dir: tempfile::TempDir,
}

impl S3Server {
    /// Starts the server and waits (bounded) until it accepts connections.
    pub fn start() -> S3Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("data");
        std::fs::create_dir(&root).expect("data dir");
        // A free port: bound, read and let go (the server binds it right after).
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = std::fs::File::create(dir.path().join("s3s-fs.log")).expect("log");
        let mut child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("s3s-fs not found: run scripts/setup-host (it installs it from crates.io)");
        let address = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&address).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                let log =
                    std::fs::read_to_string(dir.path().join("s3s-fs.log")).unwrap_or_default();
                panic!("s3s-fs exited ({status}): {log}");
            }
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not listen on {address} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        S3Server {
            child,
            address,
            root,
            _dir: dir,
        }
    }

    /// Creates the bucket (a directory of the server's store).
    pub fn bucket(&self, name: &str) {
        std::fs::create_dir_all(self.root.join(name)).expect("bucket dir");
    }

    /// The `[runners.cache]` section for this server (`extra` goes into `[runners.cache]`).
    pub fn runners_cache(&self, bucket: &str, secret: &str, extra: &str) -> String {
        format!(
            "[runners.cache]\nType = \"s3\"\n{extra}\n[runners.cache.s3]\nServerAddress = \"{}\"\nAccessKey = \"{ACCESS_KEY}\"\nSecretKey = \"{secret}\"\nBucketName = \"{bucket}\"\nInsecure = true\n",
            self.address
        )
    }

    /// The objects stored, as paths relative to the server's root (`bucket/key`), sorted.
    pub fn objects(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut dirs = vec![self.root.clone()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else {
                    let rel = p.strip_prefix(&self.root).unwrap().display().to_string();
                    // s3s-fs keeps its own metadata beside objects.
                    if !rel.contains(".s3s") {
                        out.push(rel);
                    }
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
