use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Map, Value, json};

use crate::app::AppState;

/// Liveness: the process answers. No dependency is checked.
pub async fn health() -> Json<Value> {
    Json(json!({"status": "healthy"}))
}

/// Readiness: one entry per dependency; 503 when any fails or the server
/// is shutting down (the tutorials' contract).
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    readiness(&state, Gate::Everything).await
}

/// Readiness for an orchestrator's probe: 503 only for what makes this
/// replica unable to serve (the database, shutting down). The model
/// endpoint, the sandbox service and Redis are reported, not gating: every
/// replica shares them, so their outage would take every replica out of the
/// Service at once and stall a rollout, and each request already answers
/// their failure clearly.
pub async fn ready_replica(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    readiness(&state, Gate::ThisReplica).await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Gate {
    Everything,
    ThisReplica,
}

async fn readiness(state: &AppState, gate: Gate) -> (StatusCode, Json<Value>) {
    let mut checks = Map::new();
    let mut ready = true;
    // `shared`: a dependency every replica shares (gating only for `/ready`).
    let mut check = |name: &str, shared: bool, result: Result<Value, String>| {
        let entry = match result {
            Ok(Value::Object(mut details)) => {
                details.insert("status".into(), "ok".into());
                Value::Object(details)
            }
            Ok(_) => json!({"status": "ok"}),
            Err(message) => {
                if !shared || gate == Gate::Everything {
                    ready = false;
                }
                json!({"status": "fail", "message": message})
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

    let model = if state.engine.model().is_mock() {
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

    if !state.engine.is_accepting() {
        check("server", false, Err("shutting down".into()));
    }
    let (status, word) = if ready {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    };
    (status, Json(json!({"status": word, "checks": checks})))
}
