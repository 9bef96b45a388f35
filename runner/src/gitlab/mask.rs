//! Masking secrets in the job log before any of it leaves the host. The log arrives in
//! chunks cut anywhere, so a secret can be split across two (or many) chunks: the masker holds
//! back the shortest tail that could still become a secret and decides once it knows.

/// What a secret is replaced with (GitLab's own marker).
pub const MASK: &[u8] = b"[MASKED]";

/// A streaming replacer of secrets.
#[derive(Debug)]
pub struct Masker {
    /// Longest first, so that a secret containing another is masked whole.
    secrets: Vec<Vec<u8>>,
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
            pending: Vec::new(),
        }
    }

    /// Feeds a chunk; returns what is certainly safe to send.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.secrets.is_empty() {
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
            if !last && self.secrets.iter().any(|s| s.starts_with(rest)) {
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
}
