//! The store against real SQLite and real PostgreSQL.

use bulkhead_store::{
    ApiKey, ApprovalDecision, BeginRun, BeginRunError, DeleteOutcome, FinishRun, NewEvent,
    NewMessage, NewToolExecution, RevokeOutcome, RunProgress, RunStatus, SessionRef, Store,
    StoreOptions, ToolExecutionEnd,
};
use bulkhead_testing::{DbKind, TestDb, on_both_databases};

async fn open(db: &TestDb) -> Store {
    let store = Store::connect(&db.url, &StoreOptions::default())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    store
}

fn started(now: i64) -> NewEvent {
    NewEvent {
        seq: 1,
        kind: "run_started",
        data: "{}".into(),
        created_at: now,
    }
}

fn begin<'a>(
    session: SessionRef<'a>,
    run_id: &'a str,
    now: i64,
    stale_before: i64,
) -> BeginRun<'a> {
    BeginRun {
        session,
        owner: None,
        agent: match session {
            SessionRef::New(_) | SessionRef::Named(_) => Some("default"),
            SessionRef::Existing(_) => None,
        },
        run_id,
        input: "hello",
        history: &[],
        unbound_agent: "default",
        dequeue: false,
        kwargs: None,
        now,
        lock_stale_before: stale_before,
        first_event: started(now),
    }
}

/// Records the start of a tool call, as the engine does before running it.
async fn call_started(store: &Store, id: &str, session_id: &str, run_id: &str, at: i64) {
    store
        .start_tool_execution(&NewToolExecution {
            id,
            session_id,
            run_id,
            call_id: &format!("call_{id}"),
            tool: "shell",
            arguments: "{}",
            backend: "namespace",
            limits: None,
            started_at: at,
            approval_expires_at: None,
        })
        .await
        .unwrap();
}

/// (status, error) of each audited call of a session.
async fn audited(store: &Store, session_id: &str) -> Vec<(String, Option<String>)> {
    store
        .tool_executions(session_id)
        .await
        .unwrap()
        .into_iter()
        .map(|call| (call.status, call.error))
        .collect()
}

async fn finish(store: &Store, session_id: &str, run_id: &str, now: i64) {
    let messages = [NewMessage {
        role: "assistant",
        content: Some("hi".into()),
        tool_calls: None,
        tool_call_id: None,
    }];
    let events = [NewEvent {
        seq: 2,
        kind: "run_completed",
        data: "{}".into(),
        created_at: now,
    }];
    store
        .finish_run(&FinishRun {
            progress: RunProgress {
                run_id,
                session_id,
                messages: &messages,
                events: &events,
                tokens_used: 3,
                steps: 1,
                now,
            },
            status: RunStatus::Completed,
            output: Some("hi"),
            error: None,
            usage: Some((2, 1)),
        })
        .await
        .unwrap();
}

async fn migrations_apply_once_and_are_idempotent(kind: DbKind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    assert_eq!(store.migrate().await.unwrap(), 8);
    store.ping().await.unwrap();
    if kind == DbKind::Sqlite {
        assert!(
            db.dir.path().join("bulkhead.db").exists(),
            "the SQLite file is created"
        );
    }
}

async fn keys_are_kept_revoked_and_touched(kind: DbKind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    let key = ApiKey {
        id: "0123456789abcdef".into(),
        name: "ci".into(),
        tenant: "team-a".into(),
        digest: "d".repeat(64),
        created_at: 1_000,
        last_used_at: None,
        revoked_at: None,
        requests_per_minute: Some(60),
        max_concurrent_runs: None,
        tokens_per_day: Some(1_000_000),
    };
    store.insert_api_key(&key).await.unwrap();
    assert!(store.insert_api_key(&key).await.is_err(), "ids are unique");
    assert_eq!(store.api_key(&key.id).await.unwrap().as_ref(), Some(&key));
    assert_eq!(store.api_keys().await.unwrap(), vec![key.clone()]);
    assert_eq!(store.api_key("ffffffffffffffff").await.unwrap(), None);

    store.touch_api_key(&key.id, 2_000).await.unwrap();
    assert_eq!(
        store.api_key(&key.id).await.unwrap().unwrap().last_used_at,
        Some(2_000)
    );
    assert_eq!(
        store.revoke_api_key(&key.id, 3_000).await.unwrap(),
        RevokeOutcome::Revoked
    );
    assert_eq!(
        store.revoke_api_key(&key.id, 4_000).await.unwrap(),
        RevokeOutcome::AlreadyRevoked
    );
    assert_eq!(
        store.api_key(&key.id).await.unwrap().unwrap().revoked_at,
        Some(3_000),
        "the first revocation's time is kept"
    );
    assert_eq!(
        store.revoke_api_key("nope", 5_000).await.unwrap(),
        RevokeOutcome::NotFound
    );
}

async fn a_session_is_reached_only_by_its_tenant(kind: DbKind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    let owned = |session, run, owner| BeginRun {
        owner,
        ..begin(session, run, 1_000, 0)
    };
    store
        .begin_run(&owned(SessionRef::New("s1"), "r1", Some("team-a")))
        .await
        .unwrap();
    assert_eq!(
        store.session("s1").await.unwrap().unwrap().owner.as_deref(),
        Some("team-a")
    );
    finish(&store, "s1", "r1", 1_100).await;
    // Another tenant is told the session does not exist, even while it is
    // idle, and nothing is written for it.
    let foreign = store
        .begin_run(&owned(SessionRef::Existing("s1"), "r2", Some("team-b")))
        .await;
    assert!(
        matches!(foreign, Err(BeginRunError::SessionNotFound)),
        "{foreign:?}"
    );
    assert!(store.run("r2").await.unwrap().is_none());
    assert_eq!(
        store.session("s1").await.unwrap().unwrap().active_run_id,
        None
    );
    store
        .begin_run(&owned(SessionRef::Existing("s1"), "r3", Some("team-a")))
        .await
        .unwrap();
    // While busy, too: a foreign caller learns nothing of the run.
    let foreign = store
        .begin_run(&owned(SessionRef::Existing("s1"), "r4", Some("team-b")))
        .await;
    assert!(
        matches!(foreign, Err(BeginRunError::SessionNotFound)),
        "{foreign:?}"
    );
    finish(&store, "s1", "r3", 1_200).await;
    // With authentication off, any session is reachable; the one it makes
    // has no owner, so no key reaches it.
    store
        .begin_run(&owned(SessionRef::Existing("s1"), "r5", None))
        .await
        .unwrap();
    store
        .begin_run(&owned(SessionRef::New("s2"), "r6", None))
        .await
        .unwrap();
    assert_eq!(store.session("s2").await.unwrap().unwrap().owner, None);
    assert!(bulkhead_store::reaches(None, Some("team-a")));
    assert!(!bulkhead_store::reaches(Some("team-a"), None));
    assert!(!bulkhead_store::reaches(Some("team-a"), Some("team-b")));
}

async fn a_session_holds_one_run_at_a_time(kind: DbKind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    store
        .begin_run(&begin(SessionRef::New("s1"), "r1", 1_000, 0))
        .await
        .unwrap();
    let busy = store
        .begin_run(&begin(SessionRef::Existing("s1"), "r2", 1_001, 0))
        .await;
    assert!(
        matches!(busy, Err(BeginRunError::SessionBusy { ref active_run_id }) if active_run_id == "r1"),
        "{busy:?}"
    );
    assert_eq!(
        store.delete_session("s1").await.unwrap(),
        DeleteOutcome::Busy
    );
    // The refused run left nothing behind.
    assert!(store.run("r2").await.unwrap().is_none());
    assert_eq!(store.messages("s1").await.unwrap().len(), 1);

    finish(&store, "s1", "r1", 1_002).await;
    store
        .begin_run(&begin(SessionRef::Existing("s1"), "r2", 1_003, 0))
        .await
        .unwrap();
    let roles: Vec<String> = store
        .messages("s1")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.role)
        .collect();
    assert_eq!(roles, ["user", "assistant", "user"]);
    let run = store.run("r1").await.unwrap().unwrap();
    assert_eq!(
        (run.status.as_str(), run.output.as_deref(), run.tokens_used),
        ("completed", Some("hi"), 3)
    );
    let events = store.run_events("r1", 0).await.unwrap();
    assert_eq!(
        events
            .iter()
            .map(|e| (e.seq, e.kind.as_str()))
            .collect::<Vec<_>>(),
        [(1, "run_started"), (2, "run_completed")]
    );
    assert_eq!(store.run_events("r1", 1).await.unwrap().len(), 1);
}

async fn unknown_sessions_are_reported(kind: DbKind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    let missing = store
        .begin_run(&begin(SessionRef::Existing("nope"), "r1", 1, 0))
        .await;
    assert!(
        matches!(missing, Err(BeginRunError::SessionNotFound)),
        "{missing:?}"
    );
    assert_eq!(
        store.delete_session("nope").await.unwrap(),
        DeleteOutcome::NotFound
    );
}

async fn an_abandoned_lock_is_taken_over(kind: DbKind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    store
        .begin_run(&begin(SessionRef::New("s1"), "r1", 1_000, 0))
        .await
        .unwrap();
    // The dead run died in the middle of a tool call.
    call_started(&store, "t1", "s1", "r1", 1_100).await;
    // The lock was taken at 1000; a run at 5000 treating locks older than
    // 2000 as abandoned takes it over and closes the dead run.
    store
        .begin_run(&begin(SessionRef::Existing("s1"), "r2", 5_000, 2_000))
        .await
        .unwrap();
    let dead = store.run("r1").await.unwrap().unwrap();
    assert_eq!(dead.status, "interrupted");
    assert_eq!(dead.error_code.as_deref(), Some("lock_expired"));
    assert_eq!(store.run("r2").await.unwrap().unwrap().status, "running");
    assert_eq!(
        audited(&store, "s1").await,
        [(
            "interrupted".to_string(),
            Some("the run stopped reporting progress and its session was taken over".into())
        )],
        "the dead run's call is not left running for ever"
    );
}

async fn deleting_a_session_removes_its_history(kind: DbKind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    store
        .begin_run(&begin(SessionRef::New("s1"), "r1", 1_000, 0))
        .await
        .unwrap();
    finish(&store, "s1", "r1", 1_001).await;
    assert_eq!(
        store.delete_session("s1").await.unwrap(),
        DeleteOutcome::Deleted
    );
    assert!(store.session("s1").await.unwrap().is_none());
    assert!(store.messages("s1").await.unwrap().is_empty());
    assert!(store.run("r1").await.unwrap().is_none());
    assert!(store.run_events("r1", 0).await.unwrap().is_empty());
}

async fn runs_left_running_are_recovered(kind: DbKind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    store
        .begin_run(&begin(SessionRef::New("s1"), "r1", 1_000, 0))
        .await
        .unwrap();
    call_started(&store, "t1", "s1", "r1", 1_100).await;
    // A call of a run that did finish stays as it was recorded.
    store
        .begin_run(&begin(SessionRef::New("s2"), "r2", 1_000, 0))
        .await
        .unwrap();
    call_started(&store, "t2", "s2", "r2", 1_100).await;
    store
        .finish_tool_execution(
            "t2",
            &ToolExecutionEnd {
                status: "completed",
                finished_at: 1_200,
                ..ToolExecutionEnd::default()
            },
        )
        .await
        .unwrap();
    finish(&store, "s2", "r2", 1_300).await;
    assert_eq!(store.recover_abandoned_runs(2_000).await.unwrap(), 1);
    assert_eq!(
        audited(&store, "s1").await,
        [(
            "interrupted".to_string(),
            Some("the server stopped during the call".into())
        )]
    );
    assert_eq!(
        audited(&store, "s2").await,
        [("completed".to_string(), None)]
    );
    assert_eq!(
        store.run("r1").await.unwrap().unwrap().status,
        "interrupted"
    );
    assert_eq!(
        store.session("s1").await.unwrap().unwrap().active_run_id,
        None
    );
}

/// Many writes at once, as under load, where SQLite's writer commits them
/// together: one that fails (a duplicate run id) and one that is refused (a
/// busy session) cost nothing to the others, and each caller hears its own
/// outcome.
async fn writes_made_together_succeed_or_fail_alone(kind: DbKind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    store
        .begin_run(&begin(SessionRef::New("busy"), "holder", 1_000, 0))
        .await
        .unwrap();
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..40 {
        let store = store.clone();
        writes.spawn(async move {
            let (session, run) = match i {
                // The run id "holder" exists already: a constraint error.
                7 => (format!("s{i}"), "holder".to_string()),
                _ => (format!("s{i}"), format!("r{i}")),
            };
            let outcome = if i == 13 {
                store
                    .begin_run(&begin(SessionRef::Existing("busy"), &run, 1_001, 0))
                    .await
            } else {
                store
                    .begin_run(&begin(SessionRef::New(&session), &run, 1_001, 0))
                    .await
            };
            if outcome.is_ok() {
                finish(&store, &session, &run, 1_002).await;
            }
            (i, outcome)
        });
    }
    let mut succeeded = 0;
    while let Some(joined) = writes.join_next().await {
        let (i, outcome) = joined.unwrap();
        match i {
            7 => assert!(
                matches!(outcome, Err(BeginRunError::Store(_))),
                "{outcome:?}"
            ),
            13 => assert!(
                matches!(outcome, Err(BeginRunError::SessionBusy { .. })),
                "{outcome:?}"
            ),
            _ => {
                assert!(outcome.is_ok(), "write {i}: {outcome:?}");
                succeeded += 1;
            }
        }
    }
    assert_eq!(succeeded, 38);
    for i in (0..40).filter(|i| ![7, 13].contains(i)) {
        let run = store.run(&format!("r{i}")).await.unwrap().unwrap();
        assert_eq!(run.status, "completed", "run r{i}");
        assert_eq!(store.messages(&format!("s{i}")).await.unwrap().len(), 2);
    }
    assert!(
        store.session("s7").await.unwrap().is_none(),
        "the failed write left nothing"
    );
    assert_eq!(
        store.run("holder").await.unwrap().unwrap().session_id,
        "busy"
    );
}

/// A run paused for a person keeps its session through a restart's
/// recovery and past the lock's staleness while its wait lasts; exactly one
/// decision is taken; the expiry finds what waits too long.
async fn a_paused_run_waits_for_one_decision(kind: DbKind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    let agent = store
        .begin_run(&begin(SessionRef::New("s1"), "r1", 1_000, 0))
        .await
        .unwrap();
    assert_eq!(agent.agent, "default");
    store
        .start_tool_execution(&NewToolExecution {
            id: "a1",
            session_id: "s1",
            run_id: "r1",
            call_id: "call_1",
            tool: "shell",
            arguments: "{}",
            backend: "namespace",
            limits: None,
            started_at: 1_100,
            approval_expires_at: Some(50_000),
        })
        .await
        .unwrap();
    let events = [NewEvent {
        seq: 2,
        kind: "approval_requested",
        data: "{}".into(),
        created_at: 1_100,
    }];
    store
        .pause_run(
            &RunProgress {
                run_id: "r1",
                session_id: "s1",
                messages: &[],
                events: &events,
                tokens_used: 5,
                steps: 1,
                now: 1_100,
            },
            50_000,
        )
        .await
        .unwrap();
    assert_eq!(
        store.run("r1").await.unwrap().unwrap().status,
        "awaiting_approval"
    );
    assert_eq!(store.last_event_seq("r1").await.unwrap(), 2);
    if kind == DbKind::Sqlite {
        assert_eq!(store.recover_abandoned_runs(2_000).await.unwrap(), 0);
    }
    // Held: a new run is refused even where a running run's lock (taken at
    // 1 100) would be stale by now.
    let busy = store
        .begin_run(&begin(SessionRef::Existing("s1"), "r2", 3_000, 2_000))
        .await;
    assert!(
        matches!(busy, Err(BeginRunError::SessionBusy { .. })),
        "{busy:?}"
    );
    assert!(
        store
            .expired_approvals(49_999, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let expired = store.expired_approvals(50_000, 10).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(
        store
            .awaiting_approval("r1")
            .await
            .unwrap()
            .unwrap()
            .call_id,
        "call_1"
    );
    let decision = |decision: &'static str, by: &'static str| ApprovalDecision {
        audit_id: "a1",
        run_id: "r1",
        approve: decision == "approve",
        decision,
        decided_by: by,
        comment: Some("looks fine"),
        now: 4_000,
    };
    assert!(
        store
            .decide_approval(&decision("approve", "key-1"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .decide_approval(&decision("deny", "key-2"))
            .await
            .unwrap()
    );
    assert!(
        store
            .expired_approvals(60_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let run = store.run("r1").await.unwrap().unwrap();
    assert_eq!(run.status, "running");
    let call = &store.tool_executions("s1").await.unwrap()[0];
    assert_eq!(
        (
            call.status.as_str(),
            call.approval_decision.as_deref(),
            call.approval_decided_by.as_deref(),
            call.approval_decided_at,
            call.approval_comment.as_deref(),
        ),
        (
            "running",
            Some("approve"),
            Some("key-1"),
            Some(4_000),
            Some("looks fine")
        )
    );
}

/// A session belongs to the agent it was opened for: continuing it under
/// another is refused, under its own (or none named) is not.
async fn a_session_stays_with_its_agent(kind: DbKind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    let as_agent = |session, run, agent| BeginRun {
        agent,
        ..begin(session, run, 1_000, 0)
    };
    store
        .begin_run(&as_agent(SessionRef::New("s1"), "r1", Some("support")))
        .await
        .unwrap();
    assert_eq!(store.session("s1").await.unwrap().unwrap().agent, "support");
    finish(&store, "s1", "r1", 1_100).await;
    let other = store
        .begin_run(&as_agent(SessionRef::Existing("s1"), "r2", Some("coder")))
        .await;
    assert!(
        matches!(&other, Err(BeginRunError::WrongAgent { agent }) if agent == "support"),
        "{other:?}"
    );
    assert!(store.run("r2").await.unwrap().is_none());
    let agent = store
        .begin_run(&as_agent(SessionRef::Existing("s1"), "r3", None))
        .await
        .unwrap();
    assert_eq!(agent.agent, "support");
}

fn said(role: &'static str, content: &str) -> NewMessage {
    NewMessage {
        role,
        content: Some(content.into()),
        tool_calls: None,
        tool_call_id: None,
    }
}

/// What the session holds, as (role, content) pairs in order.
async fn conversation(store: &Store, session_id: &str) -> Vec<(String, String)> {
    store
        .messages(session_id)
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.role, m.content.unwrap_or_default()))
        .collect()
}

/// A client that keeps its own history hands it over with the run that
/// opens the session: stored before the user's message, in one opening,
/// and only then (a continued session already holds it).
async fn a_new_session_can_be_opened_with_history(kind: DbKind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    let history = [
        said("system", "be brief"),
        said("user", "hi"),
        said("assistant", "hello"),
    ];
    let begun = store
        .begin_run(&BeginRun {
            history: &history,
            unbound_agent: "default",
            dequeue: false,
            kwargs: None,
            ..begin(SessionRef::New("s1"), "r1", 1_000, 0)
        })
        .await
        .unwrap();
    assert!(begun.created);
    let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(r, c)| (r.to_string(), c.to_string()))
            .collect()
    };
    assert_eq!(
        conversation(&store, "s1").await,
        pairs(&[
            ("system", "be brief"),
            ("user", "hi"),
            ("assistant", "hello"),
            ("user", "hello")
        ])
    );
    let messages = store.messages("s1").await.unwrap();
    assert!(messages.iter().all(|m| m.run_id.as_deref() == Some("r1")));
    finish(&store, "s1", "r1", 1_100).await;
    let begun = store
        .begin_run(&BeginRun {
            history: &history,
            unbound_agent: "default",
            dequeue: false,
            kwargs: None,
            ..begin(SessionRef::Existing("s1"), "r2", 1_200, 0)
        })
        .await
        .unwrap();
    assert!(!begun.created);
    // An existing session is given history only by a caller that knows it
    // holds no conversation yet (a thread's first run): it is stored.
    assert_eq!(
        conversation(&store, "s1").await.len(),
        5 + 4,
        "the first run's five, then the history and the message of the existing session's run"
    );
}

/// A session named before it exists: made by its first run (with the
/// history), continued by the next, held to its owner and agent as any.
async fn a_named_session_is_made_once_then_continued(kind: DbKind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    let history = [said("user", "earlier"), said("assistant", "noted")];
    let named = |run, owner, agent, now| BeginRun {
        owner,
        agent,
        history: &history,
        unbound_agent: "default",
        dequeue: false,
        kwargs: None,
        ..begin(SessionRef::Named("n1"), run, now, 0)
    };
    let first = store
        .begin_run(&named("r1", Some("team-a"), Some("support"), 1_000))
        .await
        .unwrap();
    assert_eq!(
        first,
        bulkhead_store::Begun {
            agent: "support".into(),
            created: true
        }
    );
    let session = store.session("n1").await.unwrap().unwrap();
    assert_eq!(
        (session.owner.as_deref(), session.agent.as_str()),
        (Some("team-a"), "support")
    );
    assert_eq!(conversation(&store, "n1").await.len(), 3);
    // While its first run holds it, the name finds it busy.
    let busy = store
        .begin_run(&named("r2", Some("team-a"), Some("support"), 1_001))
        .await;
    assert!(
        matches!(&busy, Err(BeginRunError::SessionBusy { active_run_id }) if active_run_id == "r1"),
        "{busy:?}"
    );
    finish(&store, "n1", "r1", 1_100).await;
    let second = store
        .begin_run(&named("r3", Some("team-a"), Some("support"), 1_200))
        .await
        .unwrap();
    assert!(!second.created);
    // The user's message only: the session holds the history already.
    assert_eq!(conversation(&store, "n1").await.len(), 5);
    finish(&store, "n1", "r3", 1_300).await;
    // Another tenant and another agent are refused as for any session,
    // and nothing is written for them.
    let foreign = store
        .begin_run(&named("r4", Some("team-b"), Some("support"), 1_400))
        .await;
    assert!(
        matches!(foreign, Err(BeginRunError::SessionNotFound)),
        "{foreign:?}"
    );
    let other_agent = store
        .begin_run(&named("r5", Some("team-a"), Some("coder"), 1_500))
        .await;
    assert!(
        matches!(&other_agent, Err(BeginRunError::WrongAgent { agent }) if agent == "support"),
        "{other_agent:?}"
    );
    assert!(store.run("r4").await.unwrap().is_none());
    assert!(store.run("r5").await.unwrap().is_none());
    assert_eq!(conversation(&store, "n1").await.len(), 6);
}

on_both_databases!(
    a_new_session_can_be_opened_with_history,
    a_named_session_is_made_once_then_continued,
    migrations_apply_once_and_are_idempotent,
    keys_are_kept_revoked_and_touched,
    a_session_is_reached_only_by_its_tenant,
    a_session_holds_one_run_at_a_time,
    unknown_sessions_are_reported,
    an_abandoned_lock_is_taken_over,
    deleting_a_session_removes_its_history,
    runs_left_running_are_recovered,
    writes_made_together_succeed_or_fail_alone,
    a_paused_run_waits_for_one_decision,
    a_session_stays_with_its_agent,
);

/// Another process holding SQLite's write lock past the busy timeout (10 s):
/// the writes waiting on it fail with an error rather than hang, nothing of
/// them is kept, and writing works again once the lock is let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_writes_fail_cleanly_while_another_process_holds_the_lock() {
    use sqlx::Connection as _;
    let db = TestDb::new(DbKind::Sqlite).await;
    let store = open(&db).await;
    let mut other = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();

    let mut blocked = tokio::task::JoinSet::new();
    for i in 0..3 {
        let store = store.clone();
        blocked.spawn(async move {
            let (session, run) = (format!("s{i}"), format!("r{i}"));
            store
                .begin_run(&begin(SessionRef::New(&session), &run, 1_000, 0))
                .await
        });
    }
    while let Some(outcome) = blocked.join_next().await {
        let outcome = outcome.unwrap();
        assert!(
            matches!(outcome, Err(BeginRunError::Store(_))),
            "{outcome:?}"
        );
    }

    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    store
        .begin_run(&begin(SessionRef::New("after"), "r-after", 1_000, 0))
        .await
        .unwrap();
    assert!(store.run("r0").await.unwrap().is_none());
    assert!(store.run("r-after").await.unwrap().is_some());
}

/// Two replicas on one PostgreSQL: a run whose replica stops renewing its
/// lease is ended `interrupted` by the other, once, with a `run_failed`
/// event after what it recorded and its session freed; the replica that
/// lost it can write nothing more for it, and hears that it lost its lease.
/// A run under a lease still held is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_replica_stops_renewing_is_ended_by_another() {
    use bulkhead_store::{LeaseRenewal, REPLICA_LOST_CODE, StoreError};
    let db = TestDb::new(DbKind::Postgres).await;
    let plain = open(&db).await;
    let dying = plain.clone().for_replica("replica-a");
    let alive = plain.clone().for_replica("replica-b");
    assert_eq!(
        dying.renew_lease(300).await.unwrap(),
        LeaseRenewal::Registered
    );
    assert_eq!(
        alive.renew_lease(60_000).await.unwrap(),
        LeaseRenewal::Registered
    );
    assert_eq!(
        alive.renew_lease(60_000).await.unwrap(),
        LeaseRenewal::Renewed
    );
    dying
        .begin_run(&begin(SessionRef::New("s-dying"), "r-dying", 1, 0))
        .await
        .unwrap();
    dying
        .record_step(&RunProgress {
            run_id: "r-dying",
            session_id: "s-dying",
            messages: &[],
            events: &[NewEvent {
                seq: 2,
                kind: "tool_call",
                data: "{}".into(),
                created_at: 2,
            }],
            tokens_used: 7,
            steps: 1,
            now: 2,
        })
        .await
        .unwrap();
    alive
        .begin_run(&begin(SessionRef::New("s-alive"), "r-alive", 1, 0))
        .await
        .unwrap();

    // Its lease still runs: nothing is ended.
    assert!(alive.end_orphaned_runs(3, 100).await.unwrap().is_empty());
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let ended = alive.end_orphaned_runs(4, 100).await.unwrap();
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(
        (
            ended[0].run_id.as_str(),
            ended[0].session_id.as_str(),
            ended[0].seq
        ),
        ("r-dying", "s-dying", 3)
    );
    let data: serde_json::Value = serde_json::from_str(&ended[0].data).unwrap();
    assert_eq!(data["error"]["code"], REPLICA_LOST_CODE);
    assert_eq!(data["tokens_used"], 7);
    // Once.
    assert!(alive.end_orphaned_runs(5, 100).await.unwrap().is_empty());

    let run = plain.run("r-dying").await.unwrap().unwrap();
    assert_eq!(
        (run.status.as_str(), run.error_code.as_deref()),
        ("interrupted", Some(REPLICA_LOST_CODE))
    );
    let events = plain.run_events("r-dying", 0).await.unwrap();
    assert_eq!(
        events
            .iter()
            .map(|e| (e.seq, e.kind.as_str()))
            .collect::<Vec<_>>(),
        [(1, "run_started"), (2, "tool_call"), (3, "run_failed")]
    );
    assert_eq!(
        conversation(&plain, "s-dying").await.len(),
        1,
        "the user's message stays"
    );
    assert_eq!(
        plain.run("r-alive").await.unwrap().unwrap().status,
        "running"
    );

    // The replica that lost it writes nothing more for it.
    let late = dying
        .finish_run(&FinishRun {
            progress: RunProgress {
                run_id: "r-dying",
                session_id: "s-dying",
                messages: &[said("assistant", "too late")],
                events: &[NewEvent {
                    seq: 3,
                    kind: "run_completed",
                    data: "{}".into(),
                    created_at: 6,
                }],
                tokens_used: 9,
                steps: 2,
                now: 6,
            },
            status: RunStatus::Completed,
            output: Some("too late"),
            error: None,
            usage: None,
        })
        .await;
    assert!(matches!(late, Err(StoreError::RunTakenOver)), "{late:?}");
    assert_eq!(conversation(&plain, "s-dying").await.len(), 1);
    assert_eq!(
        plain.run("r-dying").await.unwrap().unwrap().status,
        "interrupted"
    );

    // Its session is free for the next run, on any replica.
    alive
        .begin_run(&begin(SessionRef::Existing("s-dying"), "r-next", 7, 0))
        .await
        .unwrap();
    // The lapsed replica was forgotten: its next renewal registers anew,
    // which is how it learns that its runs were ended.
    assert_eq!(
        dying.renew_lease(300).await.unwrap(),
        LeaseRenewal::Registered
    );
    finish(&alive, "s-alive", "r-alive", 8).await;
}
