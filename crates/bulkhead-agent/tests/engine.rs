//! The engine against a real SQLite store and the in-process mock model.

use std::sync::Arc;
use std::time::Duration;

use bulkhead_agent::{
    Agent, Agents, ApprovalPolicy, Engine, EngineSettings, RoleKind, StartRun, ToolRegistry,
};
use bulkhead_model::{MockModel, Model};
use bulkhead_store::{Store, StoreOptions};

async fn engine(dir: &tempfile::TempDir) -> Arc<Engine> {
    let url = format!("sqlite://{}/bulkhead.db", dir.path().display());
    let store = Store::connect(&url, &StoreOptions::default())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let agent = Agent {
        id: "default".into(),
        name: "default".into(),
        description: String::new(),
        system_prompt: None,
        model: Arc::new(Model::Mock(MockModel::new(Duration::ZERO))),
        tools: ToolRegistry::with_builtins(),
        mcp_servers: Vec::new(),
        limits: Default::default(),
        max_steps: 4,
        approval: ApprovalPolicy::default(),
    };
    Arc::new(Engine::new(
        store,
        Agents::new(vec![agent]).unwrap(),
        None,
        EngineSettings {
            approval_timeout: Duration::from_secs(60),
            egress: Default::default(),
            lock_ttl: Duration::from_secs(600),
            secrets: Vec::new(),
            role: RoleKind::General,
            peers: None,
            spans: Default::default(),
        },
    ))
}

/// A client that hangs up while its run is being opened (the caller's
/// future dropped after its first poll) must not leave a run `running` and
/// its session locked: the run is opened and driven on its own task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_caller_hangs_up_while_it_opens_still_ends() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir).await;
    let first = engine
        .start_run(StartRun {
            session_id: None,
            agent: None,
            message: "first".into(),
            stream: false,
            owner: None,
            account: None,
        })
        .await
        .unwrap();
    let session_id = first.session_id.clone();
    first.outcome.await.unwrap();

    for i in 0..20 {
        let start = engine.start_run(StartRun {
            session_id: Some(session_id.clone()),
            agent: None,
            message: format!("abandoned {i}"),
            stream: false,
            owner: None,
            account: None,
        });
        // One poll: the opening is handed to the store, then the caller goes.
        let _ = tokio::time::timeout(Duration::ZERO, start).await;
        // Each run must end before the next can take the session.
        let mut ended = false;
        for _ in 0..100 {
            let session = engine.store().session(&session_id).await.unwrap().unwrap();
            let runs = engine.store().runs(&session_id).await.unwrap();
            if session.active_run_id.is_none() && runs.iter().all(|r| r.status != "running") {
                ended = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            ended,
            "attempt {i}: a run was left running with its session locked"
        );
    }
    let runs = engine.store().runs(&session_id).await.unwrap();
    assert!(runs.iter().all(|r| r.status == "completed"), "{runs:?}");
}
