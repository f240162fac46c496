//! Two `bulkhead serve` replicas on one PostgreSQL, linked by one Redis, as
//! an operator runs them: a run executing on one is followed live and
//! cancelled from the other, and a run whose replica is killed is ended by
//! the other within the lease, its message kept and its session usable.
//! (Three replicas behind nginx, under load and through restarts, are
//! `replicas.rs`.)

mod support;

use std::time::{Duration, Instant};

use bulkhead_testing::{DbKind, TestDb};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use support::{Process, serve};

const LEASE_SECONDS: u64 = 3;

struct Replicas {
    _db: TestDb,
    a: Process,
    url_a: String,
    _b: Process,
    url_b: String,
}

async fn two_replicas() -> Replicas {
    let redis = std::env::var("TEST_REDIS_URL").expect(
        "TEST_REDIS_URL is not set: run the suite with scripts/test, which installs and starts Redis",
    );
    let db = TestDb::new(DbKind::Postgres).await;
    let dir = db.dir.path();
    let lease = LEASE_SECONDS.to_string();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", redis.as_str()),
        ("RUN_LEASE_SECONDS", lease.as_str()),
    ];
    let root = |name: &str| dir.join(name).display().to_string();
    let (root_a, root_b) = (root("sandboxes-a"), root("sandboxes-b"));
    let (a, url_a) = serve(
        dir,
        &[&env[..], &[("SANDBOX_ROOT", root_a.as_str())]].concat(),
    );
    let (b, url_b) = serve(
        dir,
        &[&env[..], &[("SANDBOX_ROOT", root_b.as_str())]].concat(),
    );
    Replicas {
        _db: db,
        a,
        url_a,
        _b: b,
        url_b,
    }
}

/// Starts a streaming `/agent` run on `url` and reads it up to its
/// `run_started`: answers the rest of the stream and the run's ids.
async fn start_streaming(
    url: &str,
    body: Value,
) -> (
    impl futures_util::Stream<
        Item = Result<
            eventsource_stream::Event,
            eventsource_stream::EventStreamError<reqwest::Error>,
        >,
    >,
    String,
    String,
) {
    let response = reqwest::Client::new()
        .post(format!("{url}/agent"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut events = response.bytes_stream().eventsource();
    let first = events.next().await.unwrap().unwrap();
    assert_eq!(first.event, "run_started");
    let data: Value = serde_json::from_str(&first.data).unwrap();
    (
        events,
        data["run_id"].as_str().unwrap().to_string(),
        data["session_id"].as_str().unwrap().to_string(),
    )
}

/// Follows `/runs/{id}/events` live on `url`: each event with when it came.
async fn follow(
    url: &str,
    run_id: &str,
    last_event_id: Option<i64>,
) -> Vec<(i64, String, Value, Instant)> {
    let mut request = reqwest::Client::new()
        .get(format!("{url}/runs/{run_id}/events"))
        .header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id.to_string());
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut events = response.bytes_stream().eventsource();
    let mut seen = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(30), events.next())
        .await
        .expect("the follower's stream stalled")
    {
        let event = event.unwrap();
        seen.push((
            event.id.parse().unwrap(),
            event.event,
            serde_json::from_str(&event.data).unwrap(),
            Instant::now(),
        ));
    }
    seen
}

async fn get(url: String) -> (u16, Value) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_followed_and_cancelled_from_another_replica_and_outlives_its_replica() {
    let replicas = two_replicas().await;
    let (url_a, url_b) = (replicas.url_a.clone(), replicas.url_b.clone());

    // 1. Followed live from B while it executes on A: every event, in
    // order, once; the words arrive as A produces them (A stores them
    // only when the run ends).
    let (mut on_a, run_id, session_id) = start_streaming(
        &url_a,
        json!({"message": "drip:300 one two three four five six", "stream": true}),
    )
    .await;
    let followed = follow(&url_b, &run_id, None).await;
    while on_a.next().await.is_some() {}
    let ids: Vec<i64> = followed.iter().map(|e| e.0).collect();
    assert_eq!(
        ids,
        (1..=ids.len() as i64).collect::<Vec<_>>(),
        "{followed:?}"
    );
    let kinds: Vec<&str> = followed.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"run_started"));
    assert_eq!(kinds.last(), Some(&"run_completed"));
    assert_eq!(
        kinds.iter().filter(|k| **k == "message_delta").count(),
        6,
        "{kinds:?}"
    );
    let first_word = followed.iter().find(|e| e.1 == "message_delta").unwrap().3;
    let end = followed.last().unwrap().3;
    assert!(
        end.duration_since(first_word) >= Duration::from_millis(1000),
        "the words reached B as they were produced, not all at the end: {:?}",
        end.duration_since(first_word)
    );
    let (_, stored) = get(format!("{url_b}/runs/{run_id}/events")).await;
    let stored: Vec<(i64, String, Value)> = stored["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["id"].as_i64().unwrap(),
                e["event"].as_str().unwrap().to_string(),
                e["data"].clone(),
            )
        })
        .collect();
    let live: Vec<(i64, String, Value)> = followed
        .iter()
        .map(|e| (e.0, e.1.clone(), e.2.clone()))
        .collect();
    assert_eq!(live, stored, "what B streamed is what the database holds");
    // Resumed after an event: the rest, and nothing before it.
    let resumed = follow(&url_b, &run_id, Some(3)).await;
    assert_eq!(resumed.first().map(|e| e.0), Some(4));
    assert_eq!(resumed.len(), live.len() - 3);

    // 2. Cancelled from B while it executes on A.
    let (_, thread) = post(&url_a, "/threads", json!({})).await;
    let thread_id = thread["thread_id"].as_str().unwrap().to_string();
    let (status, run) = post(
        &url_a,
        &format!("/threads/{thread_id}/runs"),
        json!({"assistant_id": "default", "input": {"messages": [{"role": "user", "content": "sleep:20000"}]}}),
    )
    .await;
    assert_eq!(status, 200, "{run}");
    let lg_run = run["run_id"].as_str().unwrap().to_string();
    wait_for_status(&url_b, &lg_run, "running", Duration::from_secs(10)).await;
    let asked = Instant::now();
    let (status, body) = post(
        &url_b,
        &format!("/threads/{thread_id}/runs/{lg_run}/cancel"),
        json!({}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let (_, cancelled) = get(format!("{url_b}/runs/{lg_run}")).await;
    assert_eq!(cancelled["status"], "interrupted", "{cancelled}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "stopped on A at once"
    );

    // 3. A dies mid-run: B ends its run within the lease, keeps the
    // user's message, and the session takes the next turn.
    let (mut dying, dying_run, dying_session) = start_streaming(
        &url_a,
        json!({"message": "sleep:30000", "session_id": session_id, "stream": true}),
    )
    .await;
    assert_eq!(dying_session, session_id);
    let follower = tokio::spawn({
        let (url_b, dying_run) = (url_b.clone(), dying_run.clone());
        async move { follow(&url_b, &dying_run, None).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    replicas.a.signal(Signal::SIGKILL);
    let killed = Instant::now();
    assert!(
        dying.next().await.is_none_or(|e| e.is_err()),
        "the stream on A broke"
    );
    let ended = wait_for_status(&url_b, &dying_run, "interrupted", Duration::from_secs(20)).await;
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_secs(LEASE_SECONDS) + Duration::from_millis(1500),
        "ended {took:?} after the kill; the lease is {LEASE_SECONDS} s"
    );
    assert_eq!(ended["error"]["code"], "replica_lost", "{ended}");
    let followed = follower.await.unwrap();
    assert_eq!(
        followed
            .last()
            .map(|e| (e.1.as_str(), e.2["error"]["code"].clone())),
        Some(("run_failed", json!("replica_lost"))),
        "B's follower heard how the run ended: {followed:?}"
    );
    let (_, session) = get(format!("{url_b}/sessions/{session_id}")).await;
    let said: Vec<&str> = session["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .filter_map(|m| m["content"].as_str())
        .collect();
    assert!(
        said.contains(&"sleep:30000"),
        "the accepted message is kept: {session}"
    );
    let (status, next) = post(
        &url_b,
        "/agent",
        json!({"message": "still here?", "session_id": session_id}),
    )
    .await;
    assert_eq!(status, 200, "the session takes the next turn: {next}");
    assert_eq!(next["response"], "echo: still here?");
}

async fn post(url: &str, path: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn wait_for_status(url: &str, run_id: &str, status: &str, within: Duration) -> Value {
    let started = Instant::now();
    loop {
        let (code, run) = get(format!("{url}/runs/{run_id}")).await;
        if code == 200 && run["status"] == status {
            return run;
        }
        assert!(
            started.elapsed() < within,
            "run {run_id} not {status}: {run}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
