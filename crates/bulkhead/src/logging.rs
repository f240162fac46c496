//! Logs go to stdout, one line per event, flushed as written: JSON lines
//! for machines, text for people. A log line that cannot be written is
//! dropped: stdout is often a pipe (`| tee`, a log shipper) that may close
//! before the server does, and losing the rest of the log must not cost a
//! run, a drain or the exit code.

use bulkhead_server::config::LogFormat;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// `level` is a tracing filter (`info`, `info,bulkhead_agent=debug`); with
/// `span_timing`, every request and run also logs its duration when it ends.
pub fn init(level: &str, format: LogFormat, span_timing: bool) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let spans = if span_timing {
        FmtSpan::CLOSE
    } else {
        FmtSpan::NONE
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| Lossy(std::io::stdout()))
        // Its report of a failed write goes to stderr with `eprintln!`,
        // which panics when stderr is the same closed pipe.
        .log_internal_errors(false)
        .with_span_events(spans)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
        LogFormat::Text => builder.with_target(false).try_init(),
    };
    // Only fails if a subscriber is already set, which is then kept.
    let _ = result;
}

/// Stdout that reports every write as done. Rust ignores SIGPIPE, so a
/// closed pipe shows up as EPIPE on each write, and nothing the server
/// could do about it would help.
struct Lossy(std::io::Stdout);

impl std::io::Write for Lossy {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}
