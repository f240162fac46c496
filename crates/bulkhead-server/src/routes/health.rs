use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use crate::app::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    #[schema(inline)]
    status: Healthy,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum Healthy {
    Healthy,
}

/// `ready` with 200, `not ready` with 503.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    #[schema(inline)]
    status: ReadyWord,
    /// One entry per dependency: `database`, `redis` (when configured),
    /// `model`, `sandbox` (for roles that run tools), and `server` while it
    /// shuts down.
    checks: BTreeMap<String, Check>,
}

#[derive(Debug, Serialize, ToSchema)]
enum ReadyWord {
    #[serde(rename = "ready")]
    Ready,
    #[serde(rename = "not ready")]
    NotReady,
}

/// One dependency's state, with what was found (`backend`, `kind`) or
/// what failed (`message`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Check {
    #[schema(inline)]
    status: CheckStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(flatten)]
    #[schema(ignore)]
    details: Map<String, Value>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum CheckStatus {
    Ok,
    Fail,
}

/// Liveness: the process answers
///
/// No dependency is checked.
#[utoipa::path(get, path = "/health", tag = "probes", security(()),
    responses((status = 200, description = "The process is alive", body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health {
        status: Healthy::Healthy,
    })
}

/// Readiness: every dependency
///
/// One entry per dependency; 503 when any fails or the server is shutting
/// down (the tutorials' contract).
#[utoipa::path(get, path = "/ready", tag = "probes", security(()), responses(
    (status = 200, description = "Every dependency answers", body = Readiness),
    (status = 503, description = "A dependency fails, or the server is shutting down", body = Readiness),
))]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    readiness(&state, Gate::Everything).await
}

/// Readiness of this replica
///
/// For an orchestrator's probe: 503 only for what makes this replica
/// unable to serve (the database, shutting down). The model endpoint, the
/// sandbox service and Redis are reported, not gating.
#[utoipa::path(get, path = "/ready/replica", tag = "probes", security(()), responses(
    (status = 200, description = "This replica can serve", body = Readiness),
    (status = 503, description = "The database fails, or the server is shutting down", body = Readiness),
))]
// Every replica shares the model, the sandbox service and Redis, so their
// outage would take every replica out of the Service at once and stall a
// rollout, and each request already answers their failure clearly.
pub async fn ready_replica(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    readiness(&state, Gate::ThisReplica).await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Gate {
    Everything,
    ThisReplica,
}

async fn readiness(state: &AppState, gate: Gate) -> (StatusCode, Json<Readiness>) {
    let mut checks = BTreeMap::new();
    let mut ready = true;
    // `shared`: a dependency every replica shares (gating only for `/ready`).
    let mut check = |name: &str, shared: bool, result: Result<Value, String>| {
        let entry = match result {
            Ok(details) => Check {
                status: CheckStatus::Ok,
                message: None,
                details: match details {
                    Value::Object(details) => details,
                    _ => Map::new(),
                },
            },
            Err(message) => {
                if !shared || gate == Gate::Everything {
                    ready = false;
                }
                Check {
                    status: CheckStatus::Fail,
                    message: Some(message),
                    details: Map::new(),
                }
            }
        };
        checks.insert(name.to_string(), entry);
    };

    let store = state.engine.store();
    let database = match tokio::time::timeout(Duration::from_secs(2), store.ping()).await {
        Ok(Ok(())) => Ok(json!({"backend": store.backend().as_str()})),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: database check failed");
            Err("the database is not answering".to_string())
        }
        Err(_) => Err("the database did not answer within 2s".to_string()),
    };
    check("database", false, database);

    if let Some(redis) = state.probe_redis().await {
        check("redis", true, redis.map(|()| json!({})));
    }

    let model = if state.uses_only_mock_models() {
        Ok(json!({"kind": "mock"}))
    } else {
        state
            .probe_model()
            .await
            .map(|()| json!({"kind": "remote"}))
    };
    check("model", true, model);

    if let Some(sandboxes) = state.engine.sandboxes() {
        let sandbox = sandboxes
            .readiness()
            .await
            .map(|_| json!({"backend": sandboxes.backend_name()}));
        check("sandbox", true, sandbox);
    }

    if state.is_draining() {
        check("server", false, Err("shutting down".into()));
    }
    let (status, word) = if ready {
        (StatusCode::OK, ReadyWord::Ready)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, ReadyWord::NotReady)
    };
    (
        status,
        Json(Readiness {
            status: word,
            checks,
        }),
    )
}
