//! Logs go to stdout, one line per event, flushed as written: JSON lines
//! for machines, text for people.

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
        .with_writer(std::io::stdout)
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
