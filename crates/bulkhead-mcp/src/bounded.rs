//! Caps on what a server may make us buffer: one JSON-RPC message (a stdio
//! line, an SSE event, a JSON body) is at most [`MAX_MESSAGE_BYTES`], and a
//! larger one fails the connection instead of being skipped, so a server
//! that floods is stopped rather than read forever.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, ReadBuf};

/// The largest single message read from a server.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Set once a server has sent a message over the cap: the connection's
/// failure is then reported as that, not as the closed transport it causes.
#[derive(Clone, Default, Debug)]
pub(crate) struct Overflow(Arc<AtomicBool>);

impl Overflow {
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

fn too_large(limit: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("a message larger than {limit} bytes"),
    )
}

/// A server's stdout that fails once a line grows past the cap.
///
/// rmcp's own line limit drops an oversized line and keeps reading, which
/// would leave a flooding server running until the call times out; an I/O
/// error instead ends rmcp's transport at once.
pub(crate) struct BoundedLines<R> {
    inner: R,
    since_newline: usize,
    limit: usize,
    overflow: Overflow,
}

impl<R> BoundedLines<R> {
    pub(crate) fn new(inner: R, limit: usize, overflow: Overflow) -> BoundedLines<R> {
        BoundedLines {
            inner,
            since_newline: 0,
            limit,
            overflow,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for BoundedLines<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.overflow.is_set() {
            return Poll::Ready(Err(too_large(this.limit)));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        let over = match (
            read.iter().position(|b| *b == b'\n'),
            read.iter().rposition(|b| *b == b'\n'),
        ) {
            (Some(first), Some(last)) => {
                // Lines wholly inside one read are shorter than the read.
                let over = this.since_newline + first > this.limit;
                this.since_newline = read.len() - last - 1;
                over || this.since_newline > this.limit
            }
            _ => {
                this.since_newline += read.len();
                this.since_newline > this.limit
            }
        };
        if over {
            this.overflow.set();
            return Poll::Ready(Err(too_large(this.limit)));
        }
        Poll::Ready(Ok(()))
    }
}

/// A response body that fails once one SSE event (the bytes between two
/// blank lines) grows past the cap.
pub(crate) fn bounded_events<S, E>(
    body: S,
    limit: usize,
    overflow: Overflow,
) -> impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut in_event = 0usize;
    // Whether the last byte seen ended a line (a `\r` before `\n` is
    // skipped), so that a blank line split across two chunks is still seen.
    let mut at_line_start = true;
    body.map(move |chunk| {
        if overflow.is_set() {
            return Err(too_large(limit));
        }
        let chunk = chunk.map_err(io::Error::other)?;
        for byte in chunk.iter() {
            match byte {
                b'\n' if at_line_start => in_event = 0,
                b'\n' => at_line_start = true,
                b'\r' => {}
                _ => at_line_start = false,
            }
            in_event += 1;
            if in_event > limit {
                overflow.set();
                return Err(too_large(limit));
            }
        }
        Ok(chunk)
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    async fn read_all(input: &[u8], limit: usize) -> (io::Result<Vec<u8>>, bool) {
        let overflow = Overflow::default();
        let mut reader = BoundedLines::new(input, limit, overflow.clone());
        let mut out = Vec::new();
        let mut chunk = [0u8; 3];
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) => return (Ok(out), overflow.is_set()),
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) => return (Err(e), overflow.is_set()),
            }
        }
    }

    #[tokio::test]
    async fn lines_up_to_the_cap_pass_and_a_longer_one_fails() {
        let (ok, flag) = read_all(b"12345\n1234567\n\n12", 7).await;
        assert_eq!(ok.unwrap(), b"12345\n1234567\n\n12");
        assert!(!flag);
        let (err, flag) = read_all(b"12345\n12345678\n", 7).await;
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert!(flag);
        // No newline at all.
        let (err, _) = read_all(&[b'x'; 100], 7).await;
        assert!(err.is_err());
    }

    async fn events(chunks: &[&'static [u8]], limit: usize) -> Result<usize, io::Error> {
        let body = futures_util::stream::iter(
            chunks
                .iter()
                .map(|c| Ok::<_, io::Error>(Bytes::from_static(c)))
                .collect::<Vec<_>>(),
        );
        let mut stream = Box::pin(bounded_events(body, limit, Overflow::default()));
        let mut total = 0;
        while let Some(chunk) = stream.next().await {
            total += chunk?.len();
        }
        Ok(total)
    }

    #[tokio::test]
    async fn events_are_capped_each_not_in_total() {
        // Two events of 9 bytes each ("data: ab\n" then the blank line).
        assert!(events(&[b"data: ab\n\ndata: cd\n\n"], 12).await.is_ok());
        // A blank line split across chunks, and CRLF.
        assert!(
            events(&[b"data: ab\r\n", b"\r\ndata: cd\r\n\r\n"], 12)
                .await
                .is_ok()
        );
        // One event of many short lines is still one event.
        assert!(
            events(&[b"data: a\ndata: b\ndata: c\n\n"], 12)
                .await
                .is_err()
        );
    }
}
