//! Talking to models: an OpenAI-compatible chat-completions client with
//! retries and timeouts, and the mock model that stands in for a real one in
//! development, tests and benchmarks.

mod client;
pub mod history;
pub mod mock;
pub mod telemetry;
pub mod types;

use std::borrow::Cow;
use std::time::{Duration, Instant};

pub use client::{ModelSettings, OpenAiClient, redact_secret};
pub use mock::MockModel;
pub use types::*;

/// Receives each piece of streamed text as it arrives.
pub type DeltaSink<'a> = dyn FnMut(&str) + Send + 'a;

/// Why a model call failed. The text is safe to log: upstream bodies are
/// summarised and the API key is redacted from them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("the model did not answer within {}s", .0.as_secs_f64())]
    Timeout(Duration),
    #[error("the model endpoint answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("could not reach the model endpoint: {0}")]
    Connect(String),
    #[error("the model endpoint sent an invalid response: {0}")]
    Protocol(String),
}

impl ModelError {
    /// 429, 5xx and connection failures are worth another attempt.
    pub fn is_retryable(&self) -> bool {
        match self {
            ModelError::Status { status, .. } => *status == 429 || *status >= 500,
            ModelError::Connect(_) => true,
            ModelError::Timeout(_) | ModelError::Protocol(_) => false,
        }
    }

    /// What kind of failure, for metrics and spans (`error.type`):
    /// `timeout`, `connect`, `protocol`, or the HTTP status (`429`).
    pub fn kind(&self) -> Cow<'static, str> {
        match self {
            ModelError::Timeout(_) => "timeout".into(),
            ModelError::Connect(_) => "connect".into(),
            ModelError::Protocol(_) => "protocol".into(),
            ModelError::Status { status, .. } => status.to_string().into(),
        }
    }
}

/// The model a server talks to: a real endpoint or the in-process mock.
#[derive(Debug)]
pub enum Model {
    Remote(OpenAiClient),
    Mock(MockModel),
}

impl Model {
    /// One chat completion, with its metrics recorded (see [`telemetry`]).
    pub async fn complete(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        deltas: Option<&mut DeltaSink<'_>>,
    ) -> Result<Completion, ModelError> {
        let started = Instant::now();
        let mut first_byte = None;
        let result = match self {
            Model::Remote(client) => {
                client
                    .complete_timed(messages, tools, deltas, &mut first_byte)
                    .await
            }
            Model::Mock(mock) => {
                let result = match deltas {
                    Some(sink) => {
                        // In process there is no body: the first piece of
                        // text is the first byte.
                        let mut timed = |text: &str| {
                            first_byte.get_or_insert_with(Instant::now);
                            sink(text);
                        };
                        mock.complete(messages, tools, Some(&mut timed)).await
                    }
                    None => mock.complete(messages, tools, None).await,
                };
                if let Err(error) = &result {
                    telemetry::attempt_failed(self.name(), error);
                }
                result
            }
        };
        let elapsed = started.elapsed();
        // An answer without a first byte of its own (the mock, not
        // streaming) arrived whole: its first byte came with its end.
        let first_byte = result
            .is_ok()
            .then(|| first_byte.map_or(elapsed, |at| at.duration_since(started)));
        telemetry::call_ended(
            self.name(),
            result.is_ok(),
            elapsed,
            first_byte,
            result.as_ref().ok().and_then(|c| c.usage.as_ref()),
        );
        result
    }

    /// The model asked for: `MODEL_NAME`, or the mock's own name.
    pub fn name(&self) -> &str {
        match self {
            Model::Remote(client) => &client.settings().model,
            Model::Mock(_) => mock::MOCK_MODEL_NAME,
        }
    }

    /// `gen_ai.provider.name`: `openai` for any OpenAI-compatible endpoint
    /// (the wire format is OpenAI's whoever serves it), `bulkhead.mock`
    /// for the in-process mock.
    pub fn provider(&self) -> &'static str {
        match self {
            Model::Remote(_) => "openai",
            Model::Mock(_) => "bulkhead.mock",
        }
    }

    /// The temperature and token limit sent with each request, if any.
    pub fn request_parameters(&self) -> Option<(f32, u32)> {
        match self {
            Model::Remote(client) => {
                Some((client.settings().temperature, client.settings().max_tokens))
            }
            Model::Mock(_) => None,
        }
    }

    pub fn is_mock(&self) -> bool {
        matches!(self, Model::Mock(_))
    }
}
