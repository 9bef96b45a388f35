//! Masking secrets in the job log before any of it leaves the host. The log arrives in
//! chunks cut anywhere, so a secret can be split across two (or many) chunks: the masker holds
//! back the shortest tail that could still become a secret and decides once it knows.

/// What a secret is replaced with (GitLab's own marker).
pub const MASK: &[u8] = b"[MASKED]";

/// Characters a token after a known prefix (`glpat-…`) is made of.
fn token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}
/// A prefix followed by fewer token characters is left alone (e.g. "glpat-" in prose).
const MIN_TOKEN_BODY: usize = 8;
/// Longest token body held back waiting for its end.
const MAX_TOKEN_BODY: usize = 4096;

/// A streaming replacer of secrets.
#[derive(Debug)]
pub struct Masker {
    /// Longest first, so that a secret containing another is masked whole.
    secrets: Vec<Vec<u8>>,
    /// Token prefixes (GitLab's `token_mask_prefixes`, e.g. `glpat-`): a prefix followed by
    /// token characters is masked whatever the token is, keeping the prefix.
    prefixes: Vec<Vec<u8>>,
    pending: Vec<u8>,
}

impl Masker {
    /// Secrets shorter than 4 bytes are ignored (masking "a" would mask every "a"; GitLab
    /// refuses such masked variables too).
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<Vec<u8>> = secrets
            .into_iter()
            .filter(|s| s.len() >= 4)
            .map(String::into_bytes)
            .collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Masker {
            secrets,
            prefixes: Vec::new(),
            pending: Vec::new(),
        }
    }

    /// Also masks tokens that start with one of `prefixes`.
    pub fn with_prefixes(mut self, prefixes: impl IntoIterator<Item = String>) -> Self {
        self.prefixes = prefixes
            .into_iter()
            .filter(|p| !p.is_empty())
            .map(String::into_bytes)
            .collect();
        self
    }

    /// Feeds a chunk; returns what is certainly safe to send.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.secrets.is_empty() && self.prefixes.is_empty() {
            return chunk.to_vec();
        }
        self.pending.extend_from_slice(chunk);
        let (out, consumed) = self.scan(false);
        self.pending.drain(..consumed);
        out
    }

    /// Everything held back (end of the log).
    pub fn flush(&mut self) -> Vec<u8> {
        let (out, _) = self.scan(true);
        self.pending.clear();
        out
    }

    /// Masks `pending`; stops at a tail that could be the start of a secret unless `last`.
    fn scan(&self, last: bool) -> (Vec<u8>, usize) {
        let p = &self.pending;
        let mut out = Vec::with_capacity(p.len());
        let mut i = 0;
        'outer: while i < p.len() {
            let rest = &p[i..];
            for s in &self.secrets {
                if rest.starts_with(s) {
                    out.extend_from_slice(MASK);
                    i += s.len();
                    continue 'outer;
                }
            }
            for prefix in &self.prefixes {
                if rest.starts_with(prefix) {
                    let body = rest[prefix.len()..]
                        .iter()
                        .take_while(|b| token_char(**b))
                        .count();
                    // (Bounded: a run longer than any token is masked as it stands.)
                    if !last && prefix.len() + body == rest.len() && body < MAX_TOKEN_BODY {
                        // The token may go on in the next chunk.
                        break 'outer;
                    }
                    if body >= MIN_TOKEN_BODY {
                        out.extend_from_slice(prefix);
                        out.extend_from_slice(MASK);
                        i += prefix.len() + body;
                        continue 'outer;
                    }
                }
            }
            let could_become =
                |candidates: &Vec<Vec<u8>>| candidates.iter().any(|s| s.starts_with(rest));
            if !last && (could_become(&self.secrets) || could_become(&self.prefixes)) {
                // Could still become a secret: wait for more.
                break;
            }
            out.push(p[i]);
            i += 1;
        }
        (out, i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(secrets: &[&str], chunks: &[&[u8]]) -> String {
        let mut m = Masker::new(secrets.iter().map(|s| s.to_string()));
        let mut out = Vec::new();
        for c in chunks {
            out.extend(m.feed(c));
        }
        out.extend(m.flush());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn secrets_are_masked_however_the_log_is_cut() {
        let s = "hunter2-secret";
        let line = format!("pass={s}; again {s}.\n");
        // Every way of cutting the line in two, and byte by byte.
        for cut in 0..=line.len() {
            let (a, b) = line.as_bytes().split_at(cut);
            assert_eq!(
                masked(&[s], &[a, b]),
                "pass=[MASKED]; again [MASKED].\n",
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = line.as_bytes().chunks(1).collect();
        assert_eq!(masked(&[s], &bytes), "pass=[MASKED]; again [MASKED].\n");
    }

    #[test]
    fn edge_cases() {
        // (secrets, chunks, expected)
        type Case<'a> = (&'a [&'a str], Vec<&'a [u8]>, &'a str);
        let cases: Vec<Case> = vec![
            // a prefix of the secret that turns out not to be it is released
            (&["secret-1"], vec![b"secr", b"et-2"], "secret-2"),
            // the longer of two overlapping secrets wins
            (&["abcd", "abcdefgh"], vec![b"xabcdefghx"], "x[MASKED]x"),
            // a held-back prefix at the end of the log is released by flush
            (&["secret-1"], vec![b"ends with secr"], "ends with secr"),
            // too-short secrets are not masked
            (&["ab"], vec![b"abab"], "abab"),
            // no secrets: passthrough
            (&[], vec![b"plain"], "plain"),
        ];
        for (secrets, chunks, want) in cases {
            assert_eq!(masked(secrets, &chunks), want, "{secrets:?} {chunks:?}");
        }
    }

    #[test]
    fn streaming_equals_masking_the_whole_log_at_once() {
        use rand::{Rng, SeedableRng};
        // Random logs over a small alphabet (so secrets and near-misses occur often), cut at
        // random places: the stream must come out as if masked in one piece.
        let secrets = ["abcab", "bcabca", "cccc"];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..2000 {
            let len = rng.gen_range(0..60);
            let log: Vec<u8> = (0..len).map(|_| b"abc"[rng.gen_range(0..3)]).collect();
            let whole = masked(&secrets, &[&log]);
            let mut chunks = Vec::new();
            let mut rest = &log[..];
            while !rest.is_empty() {
                let n = rng.gen_range(1..=rest.len().min(7));
                chunks.push(&rest[..n]);
                rest = &rest[n..];
            }
            assert_eq!(
                masked(&secrets, &chunks),
                whole,
                "{:?}",
                String::from_utf8_lossy(&log)
            );
            assert!(
                !whole.contains("cccc") && !whole.contains("abcab"),
                "{whole}"
            );
        }
    }

    #[test]
    fn tokens_with_known_prefixes_are_masked() {
        let run = |chunks: &[&[u8]]| {
            let mut m = Masker::new(Vec::new()).with_prefixes(["glpat-".to_string()]);
            let mut out = Vec::new();
            for c in chunks {
                out.extend(m.feed(c));
            }
            out.extend(m.flush());
            String::from_utf8(out).unwrap()
        };
        // (chunks, expected)
        let cases: Vec<(Vec<&[u8]>, &str)> = vec![
            // whole token, in the middle of a line
            (vec![b"t=glpat-AbC123xyz_-9 ok"], "t=glpat-[MASKED] ok"),
            // split inside the prefix and inside the token
            (
                vec![b"t=glp", b"at-AbC1", b"23xyz ok"],
                "t=glpat-[MASKED] ok",
            ),
            // a token at the very end of the log
            (vec![b"glpat-AbC123xyz"], "glpat-[MASKED]"),
            // the prefix alone, or a too-short body, is prose
            (vec![b"use glpat- tokens"], "use glpat- tokens"),
            (vec![b"glpat-abc"], "glpat-abc"),
        ];
        for (chunks, want) in cases {
            assert_eq!(run(&chunks), want, "{chunks:?}");
        }
    }
}
