//! A hosted program's stdio between the remote backend and sandboxd: one
//! HTTP/1.1 connection, upgraded to `bulkhead-stdio` once sandboxd has
//! started the program, then frames both ways: a kind byte, a 32-bit
//! big-endian length, the payload.
//!
//! Framing rather than the raw byte stream, because each side must tell
//! the other more than bytes: the client that it closed stdin (a half-close
//! would look the same as a client that went away, which must kill the
//! program), sandboxd how the program ended ([`ProcessExit`]: exit code or
//! signal, limits hit, stderr), so that a remote program ends the way a
//! local one does for its caller.

use bulkhead_sandbox::{Limits, ProcessExit, ProcessSpec};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The value of the `Upgrade` header.
pub const PROTOCOL: &str = "bulkhead-stdio";

/// The body of `POST …/processes`: the program, and the limits of the
/// sandbox it runs in (made again if sandboxd restarted).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessRequest {
    pub limits: Limits,
    pub spec: ProcessSpec,
}

/// Client to sandboxd: bytes for the program's stdin.
pub(crate) const STDIN: u8 = 1;
/// Client to sandboxd: stdin is closed (no payload).
pub(crate) const CLOSE_STDIN: u8 = 2;
/// sandboxd to client: bytes the program wrote to stdout.
pub(crate) const STDOUT: u8 = 1;
/// sandboxd to client: an [`Ending`] as JSON; nothing follows.
pub(crate) const EXIT: u8 = 3;

/// Bytes carried per data frame.
pub(crate) const CHUNK: usize = 64 << 10;

/// Larger frames are a broken peer, not data.
const MAX_FRAME: usize = 16 << 20;

/// How a hosted program ended, as sandboxd tells it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Ending {
    Exited(ProcessExit),
    /// sandboxd could not learn it (the backend's error).
    Unknown(String),
}

pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    kind: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let length =
        u32::try_from(payload.len()).map_err(|_| std::io::Error::other("a frame over 4 GiB"))?;
    let mut header = [kind, 0, 0, 0, 0];
    header[1..].copy_from_slice(&length.to_be_bytes());
    writer.write_all(&header).await?;
    writer.write_all(payload).await?;
    writer.flush().await
}

/// The next frame; `None` at a clean end of the stream.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut header = [0u8; 5];
    if reader.read(&mut header[..1]).await? == 0 {
        return Ok(None);
    }
    reader.read_exact(&mut header[1..]).await?;
    let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if length > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {length} bytes"),
        ));
    }
    let mut payload = vec![0u8; length];
    reader.read_exact(&mut payload).await?;
    Ok(Some((header[0], payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_a_clean_end_is_none() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, STDIN, b"hello").await.unwrap();
        write_frame(&mut a, CLOSE_STDIN, b"").await.unwrap();
        drop(a);
        assert_eq!(
            read_frame(&mut b).await.unwrap(),
            Some((STDIN, b"hello".to_vec()))
        );
        assert_eq!(
            read_frame(&mut b).await.unwrap(),
            Some((CLOSE_STDIN, vec![]))
        );
        assert_eq!(read_frame(&mut b).await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_oversized_or_cut_frame_is_an_error() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&[STDOUT, 0xff, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        assert!(read_frame(&mut b).await.is_err());
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&[STDOUT, 0, 0, 0, 9, b'x']).await.unwrap();
        drop(a);
        assert!(read_frame(&mut b).await.is_err());
    }
}
