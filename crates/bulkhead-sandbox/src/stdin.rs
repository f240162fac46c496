//! A hosted program's stdin as the caller gets it: closed when dropped.
//!
//! The writers the backends hold do not all close on drop: the input half
//! of a Docker exec's connection lives as long as its output half, and a
//! pipe's `shutdown` flushes without closing. Callers should not have to
//! know which: they write into an in-memory pipe, and a task copies it to
//! the real writer and closes that once the caller's end is gone or shut
//! down.

use std::pin::Pin;

use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Bytes written but not yet copied to the program.
const BUFFER: usize = 64 << 10;

/// `writer`, closed (shut down, then dropped) once the returned end is
/// dropped or shut down. Writes fail once the program stops reading for
/// good (it exited).
pub(crate) fn closing_on_drop<W>(writer: W) -> Pin<Box<dyn AsyncWrite + Send>>
where
    W: AsyncWrite + Send + 'static,
{
    let (caller, mut pump) = tokio::io::duplex(BUFFER);
    tokio::spawn(async move {
        let mut writer = Box::pin(writer);
        // An error means the program is gone; the caller's next write
        // fails once this end is dropped.
        let _ = tokio::io::copy(&mut pump, &mut writer).await;
        let _ = writer.shutdown().await;
    });
    Box::pin(caller)
}
