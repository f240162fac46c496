//! What `bulkhead config` shows: every setting of the table, its effective
//! value typed (numbers as numbers, flags as booleans, unset as null),
//! where it came from, and secrets redacted.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use super::settings::{self, Setting};
use super::{Config, LogFormat, Source};

/// One setting as `bulkhead config` shows it.
#[derive(Debug, Clone)]
pub struct Described {
    pub setting: &'static Setting,
    /// Typed; `null` when unset; secrets as `"[redacted]"`.
    pub value: Value,
    pub source: Source,
}

impl Described {
    /// The value as one line of text: strings bare, unset as the table's
    /// note on its default (`(not set)` when it has none).
    pub fn text(&self) -> String {
        match &self.value {
            Value::String(text) => text.clone(),
            Value::Null => match self.setting.default {
                settings::Default::Note(note) => format!("({})", note.replace('`', "")),
                _ => "(not set)".into(),
            },
            other => other.to_string(),
        }
    }
}

fn seconds(duration: Duration) -> Value {
    let seconds = duration.as_secs_f64();
    if seconds.fract() == 0.0 {
        json!(seconds as u64)
    } else {
        json!(seconds)
    }
}

fn secret(value: &Option<SecretString>) -> Value {
    match value {
        Some(_) => json!("[redacted]"),
        None => Value::Null,
    }
}

fn optional<T: ToString>(value: Option<T>) -> Value {
    value.map_or(Value::Null, |v| json!(v.to_string()))
}

impl Config {
    /// Every setting of the table, in its order, with secrets redacted.
    pub fn describe(&self) -> Vec<Described> {
        settings::SETTINGS
            .iter()
            .map(|setting| Described {
                setting,
                value: self.value_of(setting.name),
                source: self
                    .sources
                    .get(setting.name)
                    .cloned()
                    .unwrap_or(Source::Default),
            })
            .collect()
    }

    /// The effective value of the setting `name`, typed.
    fn value_of(&self, name: &str) -> Value {
        let sandbox = &self.sandbox;
        let limits = &sandbox.limits;
        match name {
            "AGENT_MODE" => json!(self.mode.as_str()),
            "MODEL_ENDPOINT" => optional(self.model.endpoint.as_deref().map(redact_url_password)),
            "MODEL_NAME" => json!(self.model.name),
            "OPENAI_API_KEY" => secret(&self.model.api_key),
            // As written (0.3), not as the f32 widens (0.30000001192092896).
            "TEMPERATURE" => self
                .model
                .temperature
                .to_string()
                .parse::<f64>()
                .map_or(Value::Null, |t| json!(t)),
            "MAX_TOKENS" => json!(self.model.max_tokens),
            "MAX_STEPS" => json!(self.max_steps),
            "MODEL_TIMEOUT_SECONDS" => seconds(self.model.timeout),
            "MODEL_MAX_RETRIES" => json!(self.model.max_retries),
            "SYSTEM_PROMPT" => optional(self.system_prompt.as_ref()),
            "AGENTS_FILE" => optional(
                self.agents_file
                    .as_ref()
                    .map(|path| path.display().to_string())
                    .as_ref(),
            ),
            "APPROVAL_TIMEOUT_SECONDS" => seconds(self.approval_timeout),
            "AUTH_MODE" => json!(self.auth_mode.as_str()),
            "ADMIN_TOKEN" => secret(&self.admin_token),
            "HOST" => json!(self.host.to_string()),
            "PORT" => json!(self.port),
            "DATABASE_URL" => json!(redact_url_password(self.database_url.expose_secret())),
            // Put into DATABASE_URL, whose password shows as [redacted].
            "DATABASE_PASSWORD" => match self.sources.get("DATABASE_PASSWORD") {
                Some(Source::Default) | None => Value::Null,
                Some(_) => json!("[redacted]"),
            },
            "DATABASE_MAX_CONNECTIONS" => json!(self.database_max_connections),
            "DATABASE_CONNECT_TIMEOUT_SECONDS" => seconds(self.database_connect_timeout),
            "ENABLE_STREAMING" => json!(self.enable_streaming),
            "ENABLE_TRACING" => json!(self.enable_tracing),
            "CORS_ALLOWED_ORIGINS" => json!(self.cors_allowed_origins),
            "MAX_BODY_BYTES" => json!(self.max_body_bytes),
            "SHUTDOWN_GRACE_SECONDS" => seconds(self.shutdown_grace),
            "RUN_LEASE_SECONDS" => seconds(self.run_lease),
            "LOG_LEVEL" => json!(self.log_level),
            "LOG_FORMAT" => json!(match self.log_format {
                LogFormat::Json => "json",
                LogFormat::Text => "text",
            }),
            "AGENT_ROLE" => json!(self.role.as_str()),
            "EXECUTOR_URL" => optional(self.team.executor_url.as_ref()),
            "CRITIC_URL" => optional(self.team.critic_url.as_ref()),
            "EXECUTOR_API_KEY" => secret(&self.team.executor_key),
            "CRITIC_API_KEY" => secret(&self.team.critic_key),
            "DELEGATE_TIMEOUT_SECONDS" => seconds(self.team.delegate_timeout),
            "MAX_PLAN_STEPS" => json!(self.team.max_plan_steps),
            "MOCK_MODEL_LATENCY_MS" => json!(self.model.mock_latency.as_millis() as u64),
            "REDIS_URL" => optional(
                self.redis_url
                    .as_ref()
                    .map(|u| redact_url_password(u.expose_secret())),
            ),
            "SECRETS_DIR" => json!(self.secrets_dir.display().to_string()),
            "SANDBOX_BACKEND" => json!(sandbox.backend.as_str()),
            "SANDBOX_MEMORY" => json!(limits.memory_bytes),
            "SANDBOX_CPUS" => json!(limits.cpus),
            "SANDBOX_PIDS" => json!(limits.pids),
            "SANDBOX_TIMEOUT_SECONDS" => seconds(limits.timeout),
            "SANDBOX_OUTPUT_LIMIT" => json!(limits.output_bytes),
            "SANDBOX_DISK" => json!(limits.disk_bytes),
            "SANDBOX_IDLE_SECONDS" => seconds(sandbox.idle),
            "SANDBOX_ROOT" => json!(sandbox.root.display().to_string()),
            "SANDBOX_HOST_UID" => json!(sandbox.host_uid),
            "SANDBOX_CGROUP" => json!(sandbox.cgroup),
            "SANDBOX_HELPER" => optional(sandbox.helper.as_ref().map(|p| p.display())),
            "SANDBOX_IMAGE" => json!(sandbox.image),
            "SANDBOX_RUNTIME" => optional(sandbox.runtime.as_ref()),
            "SANDBOX_SCOPE" => json!(sandbox.scope),
            "DOCKER_HOST" => json!(
                sandbox
                    .docker_host
                    .as_deref()
                    .unwrap_or(super::reader::literal_default("DOCKER_HOST"))
            ),
            "SANDBOX_EGRESS_ALLOW" => {
                optional((!sandbox.egress.is_empty()).then(|| sandbox.egress.to_string()))
            }
            "SANDBOX_EGRESS_DIR" => optional(sandbox.egress_dir.as_ref().map(|p| p.display())),
            "SANDBOX_EGRESS_VOLUME" => optional(sandbox.egress_volume.as_ref()),
            "SANDBOX_REMOTE_URL" => optional(
                sandbox
                    .remote_url
                    .as_ref()
                    .map(|u| redact_url_password(u.as_str())),
            ),
            "SANDBOXD_TOKEN" => secret(&sandbox.sandboxd_token),
            "SANDBOXD_HOST" => json!(self.sandboxd_listen.0.to_string()),
            "SANDBOXD_PORT" => json!(self.sandboxd_listen.1),
            "ENABLE_METRICS" => json!(self.observability.enable_metrics),
            "METRICS_TOKEN" => secret(&self.observability.metrics_token),
            "OTEL_EXPORTER_OTLP_ENDPOINT" => optional(
                self.observability
                    .otlp_endpoint
                    .as_ref()
                    .map(|u| redact_url_password(u.as_str())),
            ),
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" => optional(
                self.observability
                    .otlp_traces_endpoint
                    .as_ref()
                    .map(|u| redact_url_password(u.as_str())),
            ),
            "OTEL_SERVICE_NAME" => json!(self.observability.service_name),
            "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT" => {
                json!(self.observability.capture_content)
            }
            other => {
                panic!("{other} is in the settings table but `bulkhead config` cannot show it")
            }
        }
    }
}

/// `scheme://user:password@host/…` → `scheme://user:[redacted]@host/…`.
pub fn redact_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let authority_start = scheme_end + 3;
    let authority_end = url[authority_start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| authority_start + i);
    let authority = &url[authority_start..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    let user = userinfo.split(':').next().unwrap_or_default();
    let shown = if userinfo.contains(':') {
        format!("{user}:[redacted]")
    } else {
        "[redacted]".to_string()
    };
    format!(
        "{}{}{}",
        &url[..authority_start],
        shown,
        &url[authority_start + at..]
    )
}
