//! Text helpers shared by every reporter: cutting text to a byte budget on a character
//! boundary, and making one line of untrusted text safe in a markdown table cell. A leaf:
//! it depends on nothing else in the crate.

/// Longest text kept in one markdown table cell or inline-code span.
pub const MAX_CELL: usize = 200;

/// Cuts `s` to at most `max` bytes, at a character boundary (keeps the start). Bytes, not
/// characters: a text within `max` bytes is within `max` characters whichever a consumer
/// (GitHub, GitLab, a JUnit viewer) counts.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Cuts `s` to at most `max` bytes, at a character boundary, keeping the end.
pub fn truncate_front(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// One line of untrusted text made safe inside a markdown table cell or inline code: control
/// characters become spaces, `|` is escaped, backticks become quotes, at most [`MAX_CELL`]
/// bytes.
pub fn cell(s: &str) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    truncate(&one_line, MAX_CELL)
        .replace('|', "\\|")
        .replace('`', "'")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_char_boundaries_and_limits() {
        // (text, max, truncate keeps, truncate_front keeps)
        let cases = [
            // "é" is two bytes: cutting inside it steps back (front: forward) to a boundary.
            ("éé", 3, "é", "é"),
            // Within the budget: unchanged.
            ("abc", 10, "abc", "abc"),
            ("abc", 3, "abc", "abc"),
            // Plain ASCII is cut exactly.
            ("abcdef", 2, "ab", "ef"),
            // A budget smaller than one character keeps nothing rather than half of it.
            ("€", 2, "", ""),
            ("", 0, "", ""),
        ];
        for (s, max, head, tail) in cases {
            assert_eq!(truncate(s, max), head, "truncate({s:?}, {max})");
            assert_eq!(truncate_front(s, max), tail, "truncate_front({s:?}, {max})");
            assert!(truncate(s, max).len() <= max);
            assert!(truncate_front(s, max).len() <= max);
        }
    }

    #[test]
    fn cells_are_one_safe_line() {
        assert_eq!(cell("a|b`c`\nd\te"), "a\\|b'c' d e");
        let long = "ü".repeat(MAX_CELL);
        assert!(cell(&long).len() <= MAX_CELL);
    }
}
