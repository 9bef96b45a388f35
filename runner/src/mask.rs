//! Masking secrets before any guest output leaves the host: the GitLab job log (streamed) and
//! the GitHub check-run texts (whole strings). One scan for both: an Aho-Corasick automaton
//! over the secrets and token prefixes, leftmost-longest (so a secret containing another is
//! masked whole). A log arrives in chunks cut anywhere, so a secret can be split across two
//! (or many) chunks: the streaming [`Masker`] holds back the shortest tail that could still
//! become a secret and decides once it knows; its output equals masking the whole log at once.

use aho_corasick::{AhoCorasick, Input, MatchKind};

/// What a secret is replaced with (GitLab's own marker).
pub const MASK: &[u8] = b"[MASKED]";

/// Secrets shorter than this are ignored (masking "a" would mask every "a"; GitLab refuses
/// such masked variables too).
const MIN_SECRET: usize = 4;
/// Characters a token after a known prefix (`glpat-…`) is made of.
fn token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}
/// A prefix followed by fewer token characters is left alone (e.g. "glpat-" in prose).
const MIN_TOKEN_BODY: usize = 8;
/// Longest token body held back waiting for its end.
const MAX_TOKEN_BODY: usize = 4096;

/// `text` with every secret (of at least 4 bytes) replaced by `[MASKED]`.
pub fn mask(text: &str, secrets: &[String]) -> String {
    let mut m = Masker::new(secrets.iter().cloned());
    let mut out = m.feed(text.as_bytes());
    out.extend(m.flush());
    // Only whole secrets (valid UTF-8 themselves) are replaced, so the text stays UTF-8.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A streaming replacer of secrets (a clone shares the automaton).
#[derive(Debug, Clone)]
pub struct Masker {
    /// Secrets first, then token prefixes (GitLab's `token_mask_prefixes`, e.g. `glpat-`): a
    /// prefix followed by token characters is masked whatever the token is, keeping the
    /// prefix. Pattern ids below `secrets` are secrets.
    patterns: Vec<Vec<u8>>,
    secrets: usize,
    /// `None` when there is nothing to mask.
    finder: Option<AhoCorasick>,
    pending: Vec<u8>,
}

impl Masker {
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<Vec<u8>> = secrets
            .into_iter()
            .filter(|s| s.len() >= MIN_SECRET)
            .map(String::into_bytes)
            .collect();
        secrets.sort();
        secrets.dedup();
        Masker::build(secrets, Vec::new())
    }

    /// Also masks tokens that start with one of `prefixes`.
    pub fn with_prefixes(self, prefixes: impl IntoIterator<Item = String>) -> Self {
        let mut secrets = self.patterns;
        secrets.truncate(self.secrets);
        let prefixes = prefixes
            .into_iter()
            .filter(|p| !p.is_empty())
            .map(String::into_bytes)
            .collect();
        Masker::build(secrets, prefixes)
    }

    fn build(secrets: Vec<Vec<u8>>, prefixes: Vec<Vec<u8>>) -> Self {
        let count = secrets.len();
        let patterns: Vec<Vec<u8>> = secrets.into_iter().chain(prefixes).collect();
        let finder = (!patterns.is_empty()).then(|| {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&patterns)
                .expect("a few literal patterns always build")
        });
        Masker {
            patterns,
            secrets: count,
            finder,
            pending: Vec::new(),
        }
    }

    /// Feeds a chunk; returns what is certainly safe to send.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.finder.is_none() {
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

    /// Positions where the rest of `pending` is a proper start of a pattern: from there on,
    /// more input could still make a match. Ascending; only the tail can qualify.
    fn could_become(&self) -> Vec<usize> {
        let p = &self.pending;
        let longest = self.patterns.iter().map(Vec::len).max().unwrap_or(0);
        (p.len().saturating_sub(longest)..p.len())
            .filter(|&i| {
                let rest = &p[i..];
                self.patterns
                    .iter()
                    .any(|s| s.len() > rest.len() && s.starts_with(rest))
            })
            .collect()
    }

    /// Masks `pending`; stops before anything that could still become a secret unless `last`.
    /// Returns the output and how much of `pending` it covers.
    fn scan(&self, last: bool) -> (Vec<u8>, usize) {
        let p = &self.pending;
        let Some(finder) = &self.finder else {
            return (p.clone(), p.len());
        };
        let holds = if last {
            Vec::new()
        } else {
            self.could_become()
        };
        let mut out = Vec::with_capacity(p.len());
        let mut at = 0;
        loop {
            let found = finder.find(Input::new(p).range(at..));
            // A partial match starting before (or where) the found one might, once complete,
            // be the leftmost (or the longer) match: wait for more input.
            let hold = holds.iter().copied().find(|&h| h >= at);
            match (found, hold) {
                (Some(m), Some(h)) if h <= m.start() => {
                    out.extend_from_slice(&p[at..h]);
                    return (out, h);
                }
                (None, Some(h)) => {
                    out.extend_from_slice(&p[at..h]);
                    return (out, h);
                }
                (None, None) => {
                    out.extend_from_slice(&p[at..]);
                    return (out, p.len());
                }
                (Some(m), _) if m.pattern().as_usize() < self.secrets => {
                    out.extend_from_slice(&p[at..m.start()]);
                    out.extend_from_slice(MASK);
                    at = m.end();
                }
                (Some(m), _) => {
                    // A token prefix: mask the token after it.
                    let body = p[m.end()..].iter().take_while(|b| token_char(**b)).count();
                    out.extend_from_slice(&p[at..m.start()]);
                    // (Bounded: a run longer than any token is masked as it stands.)
                    if !last && m.end() + body == p.len() && body < MAX_TOKEN_BODY {
                        // The token may go on in the next chunk.
                        return (out, m.start());
                    }
                    if body >= MIN_TOKEN_BODY {
                        out.extend_from_slice(&p[m.start()..m.end()]);
                        out.extend_from_slice(MASK);
                        at = m.end() + body;
                    } else {
                        // Prose, not a token: look again from the next byte.
                        out.push(p[m.start()]);
                        at = m.start() + 1;
                    }
                }
            }
        }
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
        // (secrets, token prefixes, alphabet)
        let sets: [(&[&str], &[&str], &[u8]); 3] = [
            // overlapping secrets
            (&["abcab", "bcabca", "cccc"], &[], b"abc"),
            // one secret the start of another: the longer must win even when cut between
            (&["abca", "abcabcb", "bcbc"], &[], b"abc"),
            // token prefixes among secrets (a space ends a token)
            (&["abcab", "cccc"], &["ca"], b"abc "),
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (secrets, prefixes, alphabet) in sets {
            let masker = Masker::new(secrets.iter().map(|s| s.to_string()))
                .with_prefixes(prefixes.iter().map(|s| s.to_string()));
            let run = |chunks: &[&[u8]]| {
                let mut m = masker.clone();
                let mut out = Vec::new();
                for c in chunks {
                    out.extend(m.feed(c));
                }
                out.extend(m.flush());
                String::from_utf8(out).unwrap()
            };
            for _ in 0..2000 {
                let len = rng.gen_range(0..60);
                let log: Vec<u8> = (0..len)
                    .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                    .collect();
                let whole = run(&[&log]);
                let mut chunks = Vec::new();
                let mut rest = &log[..];
                while !rest.is_empty() {
                    let n = rng.gen_range(1..=rest.len().min(7));
                    chunks.push(&rest[..n]);
                    rest = &rest[n..];
                }
                assert_eq!(
                    run(&chunks),
                    whole,
                    "{secrets:?} {:?}",
                    String::from_utf8_lossy(&log)
                );
                for s in secrets {
                    assert!(!whole.contains(s), "{s} in {whole}");
                }
            }
        }
    }

    #[test]
    fn whole_strings_mask_the_longest_secret() {
        // (secrets, text, expected)
        let cases: [(&[&str], &str, &str); 4] = [
            // a shorter secret inside a longer one: the longer is masked whole, whatever the order
            (
                &["pass", "password1"],
                "x password1 pass",
                "x [MASKED] [MASKED]",
            ),
            (
                &["password1", "pass"],
                "x password1 pass",
                "x [MASKED] [MASKED]",
            ),
            // too short to mask
            (&["ab"], "abab", "abab"),
            // non-ASCII text around a secret stays intact
            (&["s3cr3t"], "é s3cr3t ü", "é [MASKED] ü"),
        ];
        for (secrets, text, want) in cases {
            let secrets: Vec<String> = secrets.iter().map(|s| s.to_string()).collect();
            assert_eq!(mask(text, &secrets), want, "{secrets:?}");
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
