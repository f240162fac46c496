//! The settings of metrics and traces: `ENABLE_METRICS`, `METRICS_TOKEN`,
//! and the OpenTelemetry variables under the names the OpenTelemetry SDKs
//! and GenAI instrumentations read.

use secrecy::SecretString;

use super::AgentMode;
use super::reader::{self, Reader, invalid};

#[derive(Debug, Clone)]
pub struct ObservabilityConfig {
    /// Record metrics and serve them at `/metrics`.
    pub enable_metrics: bool,
    /// When set, `/metrics` wants `Authorization: Bearer <token>`.
    pub metrics_token: Option<SecretString>,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: the collector's base URL.
    pub otlp_endpoint: Option<url::Url>,
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: the spans' own URL.
    pub otlp_traces_endpoint: Option<url::Url>,
    pub service_name: String,
    /// Message contents, tool arguments and results on the spans.
    pub capture_content: bool,
}

impl ObservabilityConfig {
    /// Where spans are POSTed; `None`: no span leaves the process. The
    /// signal's own URL is used as it is; the base gets the signal's path,
    /// as the OTLP exporter specification has it.
    pub fn traces_endpoint(&self) -> Option<String> {
        match (&self.otlp_traces_endpoint, &self.otlp_endpoint) {
            (Some(url), _) => Some(url.to_string()),
            (None, Some(base)) => {
                Some(format!("{}/v1/traces", base.as_str().trim_end_matches('/')))
            }
            (None, None) => None,
        }
    }
}

pub(crate) fn read(
    r: &mut Reader<'_>,
    mode: AgentMode,
) -> Result<ObservabilityConfig, super::ConfigError> {
    let enable_metrics = r.flag("ENABLE_METRICS")?;
    let metrics_token = r.secret("METRICS_TOKEN", "METRICS_TOKEN_FILE")?;
    if mode == AgentMode::Production {
        reader::refuse_placeholder("METRICS_TOKEN", metrics_token.as_ref())?;
    }
    let mut url = |name: &'static str| match r.raw(name).filter(|v| !v.is_empty()) {
        Some(text) => http_url(name, &text).map(Some),
        None => Ok(None),
    };
    let otlp_traces_endpoint = url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")?;
    let otlp_endpoint = url("OTEL_EXPORTER_OTLP_ENDPOINT")?;
    let service_name = r
        .raw("OTEL_SERVICE_NAME")
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| reader::literal_default("OTEL_SERVICE_NAME").to_string());
    Ok(ObservabilityConfig {
        enable_metrics,
        metrics_token,
        otlp_endpoint,
        otlp_traces_endpoint,
        service_name,
        capture_content: r.flag("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT")?,
    })
}

fn http_url(name: &'static str, text: &str) -> Result<url::Url, super::ConfigError> {
    let url = url::Url::parse(text)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
        .ok_or_else(|| {
            invalid(
                name,
                "expected an http:// or https:// URL such as http://otel-collector:4318",
            )
        })?;
    // The exporter's own error messages quote the URL: a credential in it
    // would end up in the log.
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            name,
            "must not hold credentials: put them in OTEL_EXPORTER_OTLP_HEADERS (authorization=Bearer …)",
        ));
    }
    Ok(url)
}
