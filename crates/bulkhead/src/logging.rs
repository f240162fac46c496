//! Logs go to stdout, one line per event, flushed as written: JSON lines
//! for machines, text for people. A log line that cannot be written is
//! dropped: stdout is often a pipe (`| tee`, a log shipper) that may close
//! before the server does, and losing the rest of the log must not cost a
//! run, a drain or the exit code.
//!
//! `serve` with an OTLP endpoint also exports spans: the log keeps its own
//! filter (`LOG_LEVEL`), and spans are exported whatever it says.

use bulkhead_server::config::{LogFormat, ObservabilityConfig};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// `level` as a filter, with the MCP SDK's own chatter (it logs every
/// connection's whole handshake at `info`) held to warnings unless `level`
/// names `rmcp` itself: Bulkhead logs one line per MCP server it connects.
fn log_filter(level: &str) -> EnvFilter {
    let directives = if level.contains("rmcp") || level == "off" {
        level.to_string()
    } else {
        format!("{level},rmcp=warn")
    };
    EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new("info,rmcp=warn"))
}

/// `level` is a tracing filter (`info`, `info,bulkhead_agent=debug`); with
/// `span_timing`, every request and run also logs its duration when it ends.
pub fn init(level: &str, format: LogFormat, span_timing: bool) {
    let filter = log_filter(level);
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

/// [`init`], and spans exported over OTLP when `observability` names an
/// endpoint. Without one, exactly [`init`]: the exporter costs nothing.
pub fn init_serve(
    level: &str,
    format: LogFormat,
    span_timing: bool,
    observability: &ObservabilityConfig,
) {
    let otel = match bulkhead_server::observability::traces::layer(observability) {
        Ok(Some(layer)) => layer,
        Ok(None) => return init(level, format, span_timing),
        Err(error) => {
            init(level, format, span_timing);
            tracing::warn!(error = format!("{error:#}"), "traces are not exported");
            return;
        }
    };
    let filter = log_filter(level);
    let spans = if span_timing {
        FmtSpan::CLOSE
    } else {
        FmtSpan::NONE
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(|| Lossy(std::io::stdout()))
        .log_internal_errors(false)
        .with_span_events(spans)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let logs = match format {
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => layer.with_target(false).with_filter(filter).boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(otel)
        .try_init();
    tracing::info!(
        endpoint = %observability
            .traces_endpoint()
            .as_deref()
            .map(bulkhead_server::observability::traces::shown)
            .unwrap_or_default(),
        service = %observability.service_name,
        "exporting traces over OTLP"
    );
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
