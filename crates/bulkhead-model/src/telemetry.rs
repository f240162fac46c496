//! The model's metrics, recorded through the `metrics` facade (a no-op
//! until the server installs a recorder). Labelled by the model's name as
//! configured, never by anything a request carries.

use std::time::Duration;

use crate::{ModelError, Usage};

pub const CALLS: &str = "bulkhead_model_calls_total";
pub const ERRORS: &str = "bulkhead_model_errors_total";
pub const CALL_DURATION: &str = "bulkhead_model_call_duration_seconds";
pub const TIME_TO_FIRST_TOKEN: &str = "bulkhead_model_time_to_first_token_seconds";
pub const TOKENS: &str = "bulkhead_model_tokens_total";

/// Describes the model's metrics to the recorder (once, at start).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(
        CALLS,
        "Model calls by model and outcome (ok, error), each counted once whatever its retries"
    );
    describe_counter!(
        ERRORS,
        "Failed model attempts by model and kind (timeout, connect, protocol, or the HTTP status), retried ones included"
    );
    describe_histogram!(
        CALL_DURATION,
        Unit::Seconds,
        "Duration of model calls, retries and backoff included"
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "From the start of a model call to the first byte of the answer's body (streamed: the first chunk)"
    );
    describe_counter!(
        TOKENS,
        "Tokens the model reported by model and type (input, output)"
    );
}

/// A failed attempt, retried or not.
pub(crate) fn attempt_failed(model: &str, error: &ModelError) {
    metrics::counter!(ERRORS, "model" => model.to_string(), "kind" => error.kind()).increment(1);
}

/// A call's end, after its retries.
pub(crate) fn call_ended(
    model: &str,
    ok: bool,
    duration: Duration,
    first_byte: Option<Duration>,
    usage: Option<&Usage>,
) {
    let outcome = if ok { "ok" } else { "error" };
    metrics::counter!(CALLS, "model" => model.to_string(), "outcome" => outcome).increment(1);
    metrics::histogram!(CALL_DURATION, "model" => model.to_string()).record(duration);
    if let Some(first_byte) = first_byte {
        metrics::histogram!(TIME_TO_FIRST_TOKEN, "model" => model.to_string()).record(first_byte);
    }
    if let Some(usage) = usage {
        metrics::counter!(TOKENS, "model" => model.to_string(), "type" => "input")
            .increment(usage.prompt_tokens);
        metrics::counter!(TOKENS, "model" => model.to_string(), "type" => "output")
            .increment(usage.completion_tokens);
    }
}
