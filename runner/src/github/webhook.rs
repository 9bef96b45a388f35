//! The first things a webhook delivery meets: its signature is checked over the raw body
//! (before anything parses it), and its delivery id is checked against the ones already
//! seen, because GitHub sends the same delivery again when it is redelivered.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header GitHub signs deliveries with (HMAC-SHA256 of the body, `sha256=HEX`).
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
pub const EVENT_HEADER: &str = "x-github-event";
pub const DELIVERY_HEADER: &str = "x-github-delivery";

/// Delivery ids remembered for de-duplication (a few days of a busy installation).
pub const DEDUPE_CAPACITY: usize = 10_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("no X-Hub-Signature-256 header")]
    Missing,
    #[error("X-Hub-Signature-256 is not of the form sha256=HEX")]
    Malformed,
    #[error("X-Hub-Signature-256 does not match the body")]
    Mismatch,
}

/// Checks `header` (the value of X-Hub-Signature-256, if any) against `body`.
pub fn verify_signature(
    secret: &[u8],
    body: &[u8],
    header: Option<&[u8]>,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let hex_digest = header
        .strip_prefix(b"sha256=")
        .ok_or(SignatureError::Malformed)?;
    let expected = hex::decode(hex_digest).map_err(|_| SignatureError::Malformed)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    // verify_slice compares in constant time: a timing side channel must not reveal how
    // many leading bytes of a forged signature were right.
    mac.verify_slice(&expected)
        .map_err(|_| SignatureError::Mismatch)
}

/// Remembers the last `capacity` delivery ids; memory stays bounded however many arrive.
#[derive(Debug)]
pub struct Dedupe {
    capacity: usize,
    inner: Mutex<(HashSet<String>, VecDeque<String>)>,
}

impl Dedupe {
    pub fn new(capacity: usize) -> Self {
        Dedupe {
            capacity: capacity.max(1),
            inner: Mutex::new((HashSet::new(), VecDeque::new())),
        }
    }

    /// True the first time `id` is seen, false for a repeat. The oldest id is forgotten
    /// when full.
    pub fn first_time(&self, id: &str) -> bool {
        let mut guard = self.inner.lock().expect("dedupe lock");
        let (seen, order) = &mut *guard;
        if seen.contains(id) {
            return false;
        }
        if order.len() >= self.capacity {
            if let Some(old) = order.pop_front() {
                seen.remove(&old);
            }
        }
        seen.insert(id.to_string());
        order.push_back(id.to_string());
        true
    }

    /// Forgets `id` again (a delivery that was refused, e.g. while draining, may come back).
    pub fn forget(&self, id: &str) {
        let mut guard = self.inner.lock().expect("dedupe lock");
        let (seen, order) = &mut *guard;
        if seen.remove(id) {
            order.retain(|x| x != id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"It's a Secret to Everybody";
    const BODY: &[u8] = b"Hello, World!";
    /// GitHub's published example for validating webhook deliveries.
    const GITHUB_VECTOR: &str =
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn githubs_published_vector() {
        assert_eq!(
            verify_signature(SECRET, BODY, Some(GITHUB_VECTOR.as_bytes())),
            Ok(())
        );
    }

    #[test]
    fn tampering_is_rejected() {
        // (secret, body, header, expected)
        let upper = GITHUB_VECTOR.to_uppercase().replace("SHA256=", "sha256=");
        type Case<'a> = (
            &'a [u8],
            &'a [u8],
            Option<&'a str>,
            Result<(), SignatureError>,
        );
        let cases: [Case; 8] = [
            // One byte of the body changed.
            (
                SECRET,
                b"Hello, World?",
                Some(GITHUB_VECTOR),
                Err(SignatureError::Mismatch),
            ),
            // A byte appended.
            (
                SECRET,
                b"Hello, World!\n",
                Some(GITHUB_VECTOR),
                Err(SignatureError::Mismatch),
            ),
            // Another secret.
            (
                b"It's a secret to everybody",
                BODY,
                Some(GITHUB_VECTOR),
                Err(SignatureError::Mismatch),
            ),
            // No header at all.
            (SECRET, BODY, None, Err(SignatureError::Missing)),
            // The old SHA-1 header format.
            (
                SECRET,
                BODY,
                Some("sha1=0123"),
                Err(SignatureError::Malformed),
            ),
            // Not hex.
            (
                SECRET,
                BODY,
                Some("sha256=zz"),
                Err(SignatureError::Malformed),
            ),
            // A truncated digest must not verify as a prefix.
            (
                SECRET,
                BODY,
                Some(&GITHUB_VECTOR[..GITHUB_VECTOR.len() - 2]),
                Err(SignatureError::Mismatch),
            ),
            // Hex digits are case-insensitive.
            (SECRET, BODY, Some(&upper), Ok(())),
        ];
        for (secret, body, header, want) in cases {
            assert_eq!(
                verify_signature(secret, body, header.map(str::as_bytes)),
                want,
                "{header:?} over {:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn dedupe_is_bounded() {
        let d = Dedupe::new(2);
        assert!(d.first_time("a"));
        assert!(!d.first_time("a"));
        assert!(d.first_time("b"));
        assert!(d.first_time("c")); // forgets "a"
        assert!(d.first_time("a"));
        assert!(!d.first_time("c"));
        d.forget("c");
        assert!(d.first_time("c"));
        assert!(d.inner.lock().unwrap().1.len() <= 2);
    }
}
