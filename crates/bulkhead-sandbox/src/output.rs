//! Output capped while it streams: the first and last bytes are kept, the
//! middle is counted and hashed but dropped, so a flood costs no memory.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One stream's output as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapturedOutput {
    /// What was kept, as UTF-8 (invalid bytes replaced); when truncated,
    /// head and tail with a marker between them.
    pub text: String,
    /// Bytes the program wrote in all.
    pub total_bytes: u64,
    pub truncated: bool,
    /// Of every byte written, kept or not.
    pub sha256: String,
}

impl CapturedOutput {
    pub fn empty() -> CapturedOutput {
        OutputCapture::new(0).finish()
    }
}

pub(crate) struct OutputCapture {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    head_cap: usize,
    tail_cap: usize,
    total: u64,
    hasher: Sha256,
}

impl OutputCapture {
    pub(crate) fn new(limit: usize) -> OutputCapture {
        let head_cap = limit / 2;
        OutputCapture {
            head: Vec::with_capacity(head_cap.min(64 << 10)),
            tail: VecDeque::new(),
            head_cap,
            tail_cap: limit - head_cap,
            total: 0,
            hasher: Sha256::new(),
        }
    }

    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    pub(crate) fn push(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        self.hasher.update(bytes);
        let room = self.head_cap - self.head.len();
        if room > 0 {
            let take = room.min(bytes.len());
            self.head.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
        }
        if self.tail_cap == 0 || bytes.is_empty() {
            return;
        }
        if bytes.len() >= self.tail_cap {
            self.tail.clear();
            self.tail.extend(&bytes[bytes.len() - self.tail_cap..]);
        } else {
            let overflow = (self.tail.len() + bytes.len()).saturating_sub(self.tail_cap);
            self.tail.drain(..overflow);
            self.tail.extend(bytes);
        }
    }

    pub(crate) fn finish(self) -> CapturedOutput {
        let kept = self.head.len() as u64 + self.tail.len() as u64;
        let truncated = kept < self.total;
        let mut text = String::from_utf8_lossy(&self.head).into_owned();
        if truncated {
            text.push_str(&format!("\n[… {} bytes omitted …]\n", self.total - kept));
        }
        let tail: Vec<u8> = self.tail.into_iter().collect();
        text.push_str(&String::from_utf8_lossy(&tail));
        CapturedOutput {
            text,
            total_bytes: self.total,
            truncated,
            sha256: hex::encode(self.hasher.finalize()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_everything_under_the_limit() {
        let mut capture = OutputCapture::new(16);
        capture.push(b"hello ");
        capture.push(b"world");
        let output = capture.finish();
        assert_eq!(output.text, "hello world");
        assert!(!output.truncated);
        assert_eq!(output.total_bytes, 11);
        assert_eq!(
            output.sha256,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
    }

    #[test]
    fn keeps_head_and_tail_of_a_flood() {
        let mut capture = OutputCapture::new(8);
        for chunk in [&b"0123"[..], b"456789", b"abcdefgh", b"XYZ"] {
            capture.push(chunk);
        }
        let output = capture.finish();
        assert!(output.truncated);
        assert_eq!(output.total_bytes, 21);
        assert!(output.text.starts_with("0123"), "{}", output.text);
        assert!(output.text.ends_with("hXYZ"), "{}", output.text);
        assert!(output.text.contains("13 bytes omitted"), "{}", output.text);
    }
}
