//! POSIX shell quoting: the one place a string becomes a single shell word.

/// Single-quotes `s` for sh/bash: inside single quotes no character is special but `'` itself,
/// which is closed, escaped and reopened (`'\''`). The result is always one word, even for an
/// empty string.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_cases() {
        // (input, quoted)
        #[rustfmt::skip]
        let cases = [
            ("", "''"),                            // empty is still one (empty) word
            ("plain", "'plain'"),
            ("it's", "'it'\\''s'"),                // a quote closes, escapes, reopens
            ("''", "''\\'''\\'''"),                // only quotes
            ("a b;$(x) `y` \"z\" \\", "'a b;$(x) `y` \"z\" \\'"), // nothing else is special
            ("line1\nline2", "'line1\nline2'"),    // newlines stay inside the word
            ("grüße ✓", "'grüße ✓'"),              // non-ASCII passes through
        ];
        for (input, want) in cases {
            assert_eq!(quote(input), want, "{input:?}");
        }
    }

    #[test]
    fn the_shell_reads_back_the_input() {
        // The real test of quoting: sh prints exactly what went in.
        for input in ["", "it's", "a b;$(x)", "x\ny'z'", "grüße"] {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", quote(input)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), input);
        }
    }
}
