//! Talking to models: an OpenAI-compatible chat-completions client with
//! retries and timeouts, and the mock model that stands in for a real one in
//! development, tests and benchmarks.

mod client;
pub mod history;
pub mod mock;
pub mod types;

use std::time::Duration;

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
}

/// The model a server talks to: a real endpoint or the in-process mock.
#[derive(Debug)]
pub enum Model {
    Remote(OpenAiClient),
    Mock(MockModel),
}

impl Model {
    pub async fn complete(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        deltas: Option<&mut DeltaSink<'_>>,
    ) -> Result<Completion, ModelError> {
        match self {
            Model::Remote(client) => client.complete(messages, tools, deltas).await,
            Model::Mock(mock) => mock.complete(messages, deltas).await,
        }
    }

    pub fn is_mock(&self) -> bool {
        matches!(self, Model::Mock(_))
    }
}
