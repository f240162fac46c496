//! The engine against a real SQLite store and the in-process mock model.

use std::sync::Arc;
use std::time::Duration;

use bulkhead_agent::{
    Agent, Agents, ApprovalPolicy, Engine, EngineSettings, RoleKind, StartRun, ToolRegistry,
};
use bulkhead_agent::{RunOutcome, named_session_id};
use bulkhead_model::{MockModel, Model};
use bulkhead_store::{NewMessage, Store, StoreOptions};

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
            lease: Duration::from_secs(10),
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
            create_if_missing: false,
            history: Vec::new(),
            agent: None,
            message: "first".into(),
            stream: false,
            owner: None,
            account: None,
            queued: None,
        })
        .await
        .unwrap();
    let session_id = first.session_id.clone();
    first.outcome.await.unwrap();

    for i in 0..20 {
        let start = engine.start_run(StartRun {
            session_id: Some(session_id.clone()),
            create_if_missing: false,
            history: Vec::new(),
            agent: None,
            message: format!("abandoned {i}"),
            stream: false,
            owner: None,
            account: None,
            queued: None,
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

fn said(role: &'static str, content: &str) -> NewMessage {
    NewMessage {
        role,
        content: Some(content.into()),
        tool_calls: None,
        tool_call_id: None,
    }
}

async fn tokens(engine: &Arc<Engine>, start: StartRun) -> (String, i64) {
    let handle = engine.start_run(start).await.unwrap();
    let session_id = handle.session_id.clone();
    match handle.outcome.await.unwrap() {
        RunOutcome::Completed { tokens_used, .. } => (session_id, tokens_used),
        other => panic!("{other:?}"),
    }
}

/// A client that keeps the conversation itself: its history goes to the
/// model with the message (the mock counts every word it is sent) and
/// into the session, once; a name finds the session it made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_carries_the_history_it_is_given_and_a_name_finds_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir).await;
    let start = |session_id: Option<String>, named: bool, history: Vec<NewMessage>| StartRun {
        session_id,
        create_if_missing: named,
        history,
        agent: None,
        message: "hello".into(),
        stream: false,
        owner: Some("team-a".into()),
        account: None,
        queued: None,
    };
    let (_, bare) = tokens(&engine, start(None, false, Vec::new())).await;
    let history = || {
        vec![
            said("user", "one two three"),
            said("assistant", "four five"),
        ]
    };
    let (seeded, with_history) = tokens(&engine, start(None, false, history())).await;
    assert_eq!(with_history, bare + 5, "the model was sent the history");
    let roles: Vec<String> = engine
        .store()
        .messages(&seeded)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.role)
        .collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);

    let name = named_session_id(Some("team-a"), "default", "chat-42");
    assert_ne!(name, named_session_id(Some("team-b"), "default", "chat-42"));
    assert_ne!(name, named_session_id(None, "default", "chat-42"));
    let (first, _) = tokens(&engine, start(Some(name.clone()), true, history())).await;
    let (second, _) = tokens(&engine, start(Some(name.clone()), true, history())).await;
    assert_eq!(
        (first.as_str(), second.as_str()),
        (name.as_str(), name.as_str())
    );
    // The history once, then two turns of user and assistant.
    assert_eq!(engine.store().messages(&name).await.unwrap().len(), 6);
}
