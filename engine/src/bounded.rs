//! Bounded readers for untrusted byte streams: a line reader with a length cap and a ring
//! buffer that keeps only the tail of a stream (the guest console, QEMU's stderr); and
//! [`deadline_in`], deadline arithmetic that cannot overflow.

use std::collections::VecDeque;
use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Far enough to mean "never" and near enough to add to any clock (tokio's own choice).
const FAR_FUTURE: std::time::Duration = std::time::Duration::from_secs(86_400 * 365 * 30);

/// The instant `d` from now. `Instant + Duration` panics on overflow, and durations come
/// from files and payloads ("100y"); a duration too large for the clock means "never".
pub fn deadline_in(d: std::time::Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// Keeps the last `cap` bytes written to it.
#[derive(Debug)]
pub struct TailBuffer {
    cap: usize,
    buf: VecDeque<u8>,
}

impl TailBuffer {
    pub fn new(cap: usize) -> Self {
        TailBuffer {
            cap,
            buf: VecDeque::with_capacity(cap.min(64 * 1024)),
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        let data = if data.len() > self.cap {
            &data[data.len() - self.cap..]
        } else {
            data
        };
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.cap);
        self.buf.drain(..overflow);
        self.buf.extend(data);
    }

    /// The kept tail as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        let (a, b) = self.buf.as_slices();
        let mut v = Vec::with_capacity(a.len() + b.len());
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }

    /// The last `lines` lines of the kept tail.
    pub fn last_lines(&self, lines: usize) -> String {
        let text = self.text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Reads one `\n`-terminated line of at most `max` bytes (the newline excluded) and returns
/// it without the line ending. Returns `Ok(None)` at end of stream. A longer line is an error
/// of kind `InvalidData`, and the reader is left mid-line: callers drop the connection.
pub async fn read_line_capped<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return if line.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "stream ended mid-line",
                ))
            };
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        if line.len() + chunk.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("line longer than {max} bytes"),
            ));
        }
        line.extend_from_slice(chunk);
        let consumed = done.unwrap_or(available.len());
        reader.consume(consumed);
        if done.is_some() {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Some(line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    #[tokio::test]
    async fn deadlines_never_overflow() {
        use std::time::Duration;
        let now = tokio::time::Instant::now();
        // (duration, at least this far away): a normal one exactly; absurd ones "never".
        let d = deadline_in(Duration::from_secs(60));
        assert!(d >= now + Duration::from_secs(60) && d < now + Duration::from_secs(61));
        for huge in [Duration::MAX, Duration::from_secs(100 * 365 * 86_400)] {
            assert!(
                deadline_in(huge) >= now + Duration::from_secs(86_400 * 365),
                "{huge:?}"
            );
        }
    }

    #[test]
    fn tail_buffer_keeps_only_the_tail() {
        let mut t = TailBuffer::new(5);
        t.push(b"abc");
        t.push(b"defg");
        assert_eq!(t.text(), "cdefg");
        t.push(b"0123456789");
        assert_eq!(t.text(), "56789");
    }

    #[test]
    fn last_lines_of_tail() {
        let mut t = TailBuffer::new(100);
        t.push(b"one\ntwo\nthree\n");
        assert_eq!(t.last_lines(2), "two\nthree");
    }

    #[tokio::test]
    async fn capped_line_reader() {
        let data: &[u8] = b"short\r\nexactly10!\n0123456789X\n";
        let mut r = BufReader::with_capacity(4, data);
        assert_eq!(
            read_line_capped(&mut r, 10).await.unwrap().unwrap(),
            b"short"
        );
        assert_eq!(
            read_line_capped(&mut r, 10).await.unwrap().unwrap(),
            b"exactly10!"
        );
        let err = read_line_capped(&mut r, 10).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn end_of_stream_is_none() {
        let mut r = BufReader::new(&b""[..]);
        assert!(read_line_capped(&mut r, 10).await.unwrap().is_none());
    }
}
