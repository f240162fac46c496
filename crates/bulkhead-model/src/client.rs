//! A client for any OpenAI-compatible `POST /chat/completions`.

use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};

use crate::types::{
    ChatChunk, ChatCompletion, ChatMessage, ChatRequest, ChunkAccumulator, Completion,
    StreamOptions, ToolSpec,
};
use crate::{DeltaSink, ModelError};

/// Everything a call to the model endpoint needs.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    /// Base URL, e.g. `https://api.openai.com/v1`.
    pub endpoint: String,
    pub model: String,
    pub api_key: Option<SecretString>,
    pub temperature: f32,
    pub max_tokens: u32,
    /// Bound on one attempt, from sending the request to the last byte.
    pub timeout: Duration,
    /// Retries after the first attempt, on 429, 5xx and connection errors.
    pub max_retries: u32,
    /// First backoff; doubled each retry, jittered, capped at `retry_cap`.
    pub retry_base: Duration,
    pub retry_cap: Duration,
}

/// The longest `Retry-After` we honour; beyond it the run would rather fail.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// The most of an error body we read, log (redacted) and summarise.
const MAX_ERROR_BODY: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct OpenAiClient {
    http: reqwest::Client,
    settings: ModelSettings,
    completions_url: String,
    models_url: String,
}

/// An attempt's failure, with what decides whether to try again.
struct AttemptError {
    error: ModelError,
    retry_after: Option<Duration>,
    /// Text already reached the caller: a retry would repeat it.
    streamed: bool,
}

impl From<ModelError> for AttemptError {
    fn from(error: ModelError) -> Self {
        AttemptError {
            error,
            retry_after: None,
            streamed: false,
        }
    }
}

impl OpenAiClient {
    pub fn new(settings: ModelSettings) -> Result<OpenAiClient, ModelError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("bulkhead/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ModelError::Connect(e.without_url().to_string()))?;
        let base = settings.endpoint.trim_end_matches('/');
        Ok(OpenAiClient {
            completions_url: format!("{base}/chat/completions"),
            models_url: format!("{base}/models"),
            http,
            settings,
        })
    }

    pub fn settings(&self) -> &ModelSettings {
        &self.settings
    }

    /// One chat completion, retried on transient failures. With `deltas`,
    /// the call streams and hands each piece of text over as it arrives.
    pub async fn complete(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        deltas: Option<&mut DeltaSink<'_>>,
    ) -> Result<Completion, ModelError> {
        self.complete_timed(messages, tools, deltas, &mut None)
            .await
    }

    /// [`complete`](Self::complete), noting in `first_byte` when the body
    /// of the answer that succeeded began to arrive.
    pub(crate) async fn complete_timed(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        mut deltas: Option<&mut DeltaSink<'_>>,
        first_byte: &mut Option<Instant>,
    ) -> Result<Completion, ModelError> {
        let request = ChatRequest {
            model: self.settings.model.clone(),
            messages: messages.to_vec(),
            temperature: Some(self.settings.temperature),
            max_tokens: Some(self.settings.max_tokens),
            tools: tools.to_vec(),
            stream: deltas.is_some(),
            stream_options: deltas.is_some().then_some(StreamOptions {
                include_usage: true,
            }),
        };
        let body = serde_json::to_vec(&request)
            .map_err(|e| ModelError::Protocol(format!("could not encode the request: {e}")))?;
        let mut attempt = 0;
        loop {
            *first_byte = None;
            let outcome = tokio::time::timeout(
                self.settings.timeout,
                self.attempt(&body, deltas.as_deref_mut(), first_byte),
            )
            .await
            .unwrap_or_else(|_| Err(ModelError::Timeout(self.settings.timeout).into()));
            if let Err(failure) = &outcome {
                crate::telemetry::attempt_failed(&self.settings.model, &failure.error);
            }
            match outcome {
                Ok(completion) => return Ok(completion),
                Err(failure)
                    if failure.error.is_retryable()
                        && !failure.streamed
                        && attempt < self.settings.max_retries =>
                {
                    let wait = self.backoff(attempt, failure.retry_after);
                    tracing::warn!(
                        attempt = attempt + 1,
                        wait_ms = wait.as_millis() as u64,
                        error = %failure.error,
                        "model call failed; retrying"
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(failure) => return Err(failure.error),
            }
        }
    }

    /// Jittered exponential backoff, or the server's `Retry-After` when it
    /// asks for longer.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exponential = self
            .settings
            .retry_base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.settings.retry_cap);
        // Equal jitter: half fixed, half random, so waits never collapse to 0.
        let half = exponential / 2;
        let jittered = half + half.mul_f64(fastrand::f64());
        match retry_after {
            Some(asked) => asked.min(MAX_RETRY_AFTER).max(jittered),
            None => jittered,
        }
    }

    async fn attempt(
        &self,
        body: &[u8],
        deltas: Option<&mut DeltaSink<'_>>,
        first_byte: &mut Option<Instant>,
    ) -> Result<Completion, AttemptError> {
        let mut request = self
            .http
            .post(&self.completions_url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some(key) = &self.settings.api_key {
            request = request.bearer_auth(key.expose_secret());
        }
        let response = request.send().await.map_err(|e| self.transport_error(e))?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = retry_after(response.headers());
            let error = self.status_error(status, response).await;
            return Err(AttemptError {
                error,
                retry_after,
                streamed: false,
            });
        }
        match deltas {
            None => {
                let mut response = response;
                let mut bytes = Vec::new();
                while let Some(piece) = response
                    .chunk()
                    .await
                    .map_err(|e| self.transport_error(e))?
                {
                    first_byte.get_or_insert_with(Instant::now);
                    bytes.extend_from_slice(&piece);
                }
                let completion: ChatCompletion = serde_json::from_slice(&bytes).map_err(|e| {
                    ModelError::Protocol(format!("the completion is not valid JSON: {e}"))
                })?;
                let usage = completion.usage;
                let choice =
                    completion.choices.into_iter().next().ok_or_else(|| {
                        ModelError::Protocol("the completion has no choices".into())
                    })?;
                Ok(Completion {
                    content: choice.message.content.unwrap_or_default(),
                    tool_calls: choice.message.tool_calls.unwrap_or_default(),
                    usage,
                    finish_reason: choice.finish_reason,
                    model: Some(completion.model).filter(|m| !m.is_empty()),
                })
            }
            Some(sink) => {
                let mut events = response.bytes_stream().eventsource();
                let mut accumulator = ChunkAccumulator::default();
                let mut streamed = false;
                while let Some(event) = events.next().await {
                    first_byte.get_or_insert_with(Instant::now);
                    let event = event.map_err(|e| AttemptError {
                        error: ModelError::Protocol(format!("the event stream broke: {e}")),
                        retry_after: None,
                        streamed,
                    })?;
                    let data = event.data.trim();
                    if data == "[DONE]" {
                        break;
                    }
                    if data.is_empty() {
                        continue;
                    }
                    let chunk: ChatChunk =
                        serde_json::from_str(data).map_err(|e| AttemptError {
                            error: ModelError::Protocol(format!(
                                "a streamed chunk is not valid JSON: {e}"
                            )),
                            retry_after: None,
                            streamed,
                        })?;
                    if let Some(text) = accumulator.push(chunk) {
                        streamed = true;
                        sink(&text);
                    }
                }
                Ok(accumulator.finish())
            }
        }
    }

    fn transport_error(&self, error: reqwest::Error) -> AttemptError {
        let error = error.without_url();
        let mut text = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        let error = if error.is_timeout() {
            ModelError::Timeout(self.settings.timeout)
        } else if error.is_body() || error.is_decode() {
            ModelError::Protocol(self.redact(&text))
        } else {
            ModelError::Connect(self.redact(&text))
        };
        error.into()
    }

    async fn status_error(&self, status: StatusCode, response: reqwest::Response) -> ModelError {
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(Ok(piece)) = stream.next().await {
            body.extend_from_slice(&piece);
            if body.len() >= MAX_ERROR_BODY {
                body.truncate(MAX_ERROR_BODY);
                break;
            }
        }
        let text = String::from_utf8_lossy(&body);
        let detail = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| {
                v.pointer("/error/message")
                    .and_then(|m| m.as_str())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| text.chars().take(300).collect());
        ModelError::Status {
            status: status.as_u16(),
            message: self.redact(&detail),
        }
    }

    /// Upstream text may quote the key back (OpenAI's 401 quotes part of
    /// it); nothing of it leaves this client.
    fn redact(&self, text: &str) -> String {
        match &self.settings.api_key {
            Some(key) => redact_secret(text, key.expose_secret()),
            None => text.to_string(),
        }
    }

    /// Whether the endpoint answers, for `/ready`: `GET {endpoint}/models`.
    pub async fn probe(&self, timeout: Duration) -> Result<(), ModelError> {
        let mut request = self.http.get(&self.models_url).timeout(timeout);
        if let Some(key) = &self.settings.api_key {
            request = request.bearer_auth(key.expose_secret());
        }
        let response = request
            .send()
            .await
            .map_err(|e| self.transport_error(e).error)?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(ModelError::Status {
                status: status.as_u16(),
                message: "the model endpoint rejected the API key".into(),
            });
        }
        if status.is_server_error() {
            return Err(ModelError::Status {
                status: status.as_u16(),
                message: "the model endpoint is failing".into(),
            });
        }
        // Every OpenAI-compatible API serves `/models` under its base: a 404
        // there means the base is not the API's (a `/chat/completions` URL,
        // a missing `/v1`), and every call would 404 too.
        if status == StatusCode::NOT_FOUND {
            return Err(ModelError::Status {
                status: status.as_u16(),
                message: format!(
                    "the model endpoint answered 404 at {}: check that MODEL_ENDPOINT ends at the API base (e.g. https://api.openai.com/v1)",
                    without_userinfo(&self.models_url)
                ),
            });
        }
        Ok(())
    }
}

/// The URL without any `user:password@`.
fn without_userinfo(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Err(_) => "the configured URL".into(),
    }
}

/// Replaces the secret, and any run of 8 or more of its characters quoted
/// on their own (such as OpenAI's `sk-abc...xyz`), with `[REDACTED]`.
pub fn redact_secret(text: &str, secret: &str) -> String {
    if secret.is_empty() {
        return text.to_string();
    }
    let mut redacted = text.replace(secret, "[REDACTED]");
    const WINDOW: usize = 8;
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() > WINDOW {
        for window in chars.windows(WINDOW) {
            let piece: String = window.iter().collect();
            if redacted.contains(&piece) {
                redacted = redacted.replace(&piece, "[REDACTED]");
            }
        }
    }
    redacted
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<f64>()
        && seconds.is_finite()
        && seconds >= 0.0
    {
        return Some(Duration::from_secs_f64(
            seconds.min(MAX_RETRY_AFTER.as_secs_f64()),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_whole_and_partial_keys() {
        let key = "sk-canary-0123456789abcdef";
        let text =
            format!("Incorrect API key provided: {key}; also sk-canary-01...cdef and 3456789abc");
        let redacted = redact_secret(&text, key);
        assert!(!redacted.contains(key));
        assert!(!redacted.contains("3456789abc"));
        assert!(redacted.contains("Incorrect API key provided"));
    }

    #[test]
    fn retry_after_reads_seconds_and_ignores_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), None);
    }
}
