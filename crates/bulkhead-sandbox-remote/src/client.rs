//! The `remote` backend: sandboxes that sandboxd makes and runs.

mod process;

use std::sync::Arc;
use std::time::Duration;

use bulkhead_sandbox::egress::{EgressGate, EgressProxy, remote_gate_name};
use bulkhead_sandbox::{
    Backend, ExecResult, Limits, Operation, Probe, ProcessSpec, Sandbox, SandboxError,
    SandboxProcess,
};
use futures_util::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use url::Url;

use crate::{ErrorBody, RunRequest};

/// Room on top of an operation's own timeout for sandboxd to make a
/// container, collect the output and answer.
const SLACK: Duration = Duration::from_secs(60);
const PING_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// sandboxd's base URL, e.g. `http://sandboxd:7070`.
    pub url: Url,
    pub token: SecretString,
    /// This server's share of sandboxd (see the crate docs).
    pub scope: String,
    /// This server's egress proxy, in the volume sandboxd mounts gates
    /// from: each sandbox gets a gate named by
    /// [`bulkhead_sandbox::egress::remote_gate_name`], opened before
    /// sandboxd makes the sandbox.
    pub egress: Option<Arc<EgressProxy>>,
}

#[derive(Debug, Clone)]
pub struct RemoteBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: RemoteConfig,
    http: reqwest::Client,
}

impl RemoteBackend {
    pub fn new(config: RemoteConfig) -> Result<RemoteBackend, String> {
        if !matches!(config.url.scheme(), "http" | "https") {
            return Err(format!(
                "expected an http:// or https:// URL for sandboxd, got {}",
                config.url.scheme()
            ));
        }
        if !crate::is_valid_name(&config.scope) {
            return Err(format!(
                "invalid sandbox scope {:?}: 1 to 128 letters, digits, '-', '_' and '.'",
                config.scope
            ));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            // sandboxd sits on an internal network: a proxy set for the
            // model API must not carry sandbox traffic.
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(RemoteBackend {
            inner: Arc::new(Inner { config, http }),
        })
    }
}

impl Inner {
    /// `/v1/scopes/<scope>/<segments…>` under sandboxd's URL, each segment
    /// escaped: an id cannot climb out of its path.
    fn endpoint(&self, segments: &[&str]) -> Url {
        let mut url = self.config.url.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty()
                .extend(["v1", "scopes", self.config.scope.as_str()])
                .extend(segments);
        }
        url
    }

    /// Sends the request with the token and reads a JSON answer; errors
    /// come back as the variants a local backend would give.
    async fn call<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<Option<T>, SandboxError> {
        let response = request
            .bearer_auth(self.config.token.expose_secret())
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = response.status();
        if status == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let body = response.bytes().await.map_err(|e| {
            SandboxError::Unavailable(format!("sandboxd's answer broke off: {}", e.without_url()))
        })?;
        if status.is_success() {
            return serde_json::from_slice(&body).map(Some).map_err(|e| {
                SandboxError::Unavailable(format!("sandboxd answered something unreadable: {e}"))
            });
        }
        Err(refusal(status, &body))
    }

    fn unreachable(&self, error: reqwest::Error) -> SandboxError {
        SandboxError::Unavailable(format!(
            "cannot reach sandboxd at {}: {}",
            self.config.url,
            error.without_url()
        ))
    }
}

/// An error answer of sandboxd as the variant a local backend would give.
fn refusal(status: reqwest::StatusCode, body: &[u8]) -> SandboxError {
    let message = serde_json::from_slice::<ErrorBody>(body)
        .map(|b| b.error.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).chars().take(200).collect());
    match status.as_u16() {
        401 => SandboxError::Unavailable(
            "sandboxd refused this server's token (check SANDBOXD_TOKEN on both sides)".into(),
        ),
        400 | 422 => SandboxError::Invalid(message),
        _ => SandboxError::Unavailable(format!("sandboxd: {message}")),
    }
}

impl Backend for RemoteBackend {
    fn name(&self) -> &'static str {
        "remote"
    }

    fn probe(&self) -> BoxFuture<'_, Result<Probe, SandboxError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let probe: Probe = inner
                .call(inner.http.get(inner.endpoint(&["probe"])), SLACK)
                .await?
                .ok_or_else(|| SandboxError::Unavailable("sandboxd sent no probe".into()))?;
            let mut details = vec![
                format!("sandboxd {}", inner.config.url),
                format!("backend {}", probe.backend),
            ];
            details.extend(probe.details);
            Ok(Probe {
                backend: "remote".into(),
                details,
            })
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<(), SandboxError>> {
        Box::pin(async move {
            let inner = &self.inner;
            inner
                .call::<serde_json::Value>(inner.http.get(inner.endpoint(&["ping"])), PING_TIMEOUT)
                .await
                .map(|_| ())
        })
    }

    fn create<'a>(
        &'a self,
        id: &'a str,
        limits: &'a Limits,
    ) -> BoxFuture<'a, Result<Arc<dyn Sandbox>, SandboxError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let gate = match &inner.config.egress {
                Some(proxy) if crate::is_valid_name(id) => Some(
                    proxy
                        .open_gate(&remote_gate_name(&inner.config.scope, id))
                        .map_err(|e| {
                            SandboxError::Unavailable(format!(
                                "cannot open an egress socket in {}: {e}",
                                proxy.folder().display()
                            ))
                        })?,
                ),
                _ => None,
            };
            let applied: Limits = inner
                .call(
                    inner
                        .http
                        .put(inner.endpoint(&["sandboxes", id]))
                        .json(limits),
                    SLACK,
                )
                .await?
                .ok_or_else(|| SandboxError::Unavailable("sandboxd sent no limits".into()))?;
            Ok(Arc::new_cyclic(|me| RemoteSandbox {
                inner: Arc::clone(&self.inner),
                id: id.to_string(),
                limits: applied,
                gate,
                me: me.clone(),
            }) as Arc<dyn Sandbox>)
        })
    }

    fn remove_orphans(&self) -> BoxFuture<'_, Result<usize, SandboxError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let answer: Option<serde_json::Value> = inner
                .call(inner.http.delete(inner.endpoint(&["sandboxes"])), SLACK)
                .await?;
            Ok(answer
                .and_then(|a| a.get("removed").and_then(|n| n.as_u64()))
                .unwrap_or(0) as usize)
        })
    }
}

#[derive(Debug)]
struct RemoteSandbox {
    inner: Arc<Inner>,
    id: String,
    /// The limits sandboxd applied: the asked ones, capped by its own.
    limits: Limits,
    gate: Option<EgressGate>,
    /// Itself, for the hosted programs that hold it while they run.
    me: std::sync::Weak<RemoteSandbox>,
}

impl Sandbox for RemoteSandbox {
    fn backend(&self) -> &'static str {
        "remote"
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn run<'a>(
        &'a self,
        operation: &'a Operation,
    ) -> BoxFuture<'a, Result<ExecResult, SandboxError>> {
        Box::pin(bulkhead_sandbox::egress::attributed(
            self.gate.as_ref(),
            async move {
                operation.validate()?;
                let inner = &self.inner;
                let body = RunRequest {
                    limits: self.limits.clone(),
                    operation: operation.clone(),
                };
                inner
                    .call(
                        inner
                            .http
                            .post(inner.endpoint(&["sandboxes", &self.id, "run"]))
                            .json(&body),
                        self.limits.timeout + SLACK,
                    )
                    .await?
                    .ok_or_else(|| SandboxError::Unavailable("sandboxd sent no result".into()))
            },
        ))
    }

    fn spawn<'a>(
        &'a self,
        spec: &'a ProcessSpec,
    ) -> BoxFuture<'a, Result<SandboxProcess, SandboxError>> {
        Box::pin(async move {
            let sandbox = self
                .me
                .upgrade()
                .ok_or_else(|| SandboxError::Unavailable("the sandbox is being dropped".into()))?;
            process::spawn(sandbox, spec).await
        })
    }

    fn destroy(&self) -> BoxFuture<'_, Result<(), SandboxError>> {
        Box::pin(async move {
            let inner = &self.inner;
            inner
                .call::<serde_json::Value>(
                    inner.http.delete(inner.endpoint(&["sandboxes", &self.id])),
                    SLACK,
                )
                .await?;
            Ok(())
        })
    }
}
