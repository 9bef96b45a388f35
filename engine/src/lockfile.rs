//! An exclusive lock file shared by runners on one host (`flock`), taken with a deadline:
//! image builds and user mode's root unpacking happen once per image, whoever asks first.
//! The lock goes with the returned value, and with the process if it dies.

use std::path::Path;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

/// How often a held lock is tried again.
const POLL: Duration = Duration::from_millis(250);

/// Holds the lock until dropped.
#[derive(Debug)]
pub struct Held {
    _lock: Flock<std::fs::File>,
}

/// Takes the lock on `path` (created if missing), waiting at most `wait`; `on_wait` is
/// called once, when another holder makes it wait. `Ok(None)`: still held by another when
/// `wait` passed.
pub async fn take(
    path: &Path,
    wait: Duration,
    on_wait: impl FnOnce(),
) -> std::io::Result<Option<Held>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut on_wait = Some(on_wait);
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(Some(Held { _lock: l })),
            Err(_) if tokio::time::Instant::now() < deadline => {
                if let Some(f) = on_wait.take() {
                    f();
                }
                tokio::time::sleep(POLL).await;
            }
            Err(_) => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_held_lock_makes_the_next_taker_wait_and_give_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let first = take(&path, Duration::ZERO, || {}).await.unwrap();
        assert!(first.is_some());
        let mut waited = false;
        let second = take(&path, Duration::from_millis(300), || waited = true)
            .await
            .unwrap();
        assert!(second.is_none() && waited);
        drop(first);
        assert!(take(&path, Duration::ZERO, || {}).await.unwrap().is_some());
    }
}
