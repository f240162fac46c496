//! Following a run from this replica, wherever it executes: from the
//! engine's live feed when it executes here; from the store and the
//! cluster's relay when it executes on another replica; from the store
//! alone while it is queued, or when no Redis links the replicas (polled).
//! Every event is given once, in order, with no gap: an event is given
//! only when it is the next one after the last given, and what is missing
//! is read from the store, where everything ends up.

use std::sync::Arc;
use std::time::Duration;

use bulkhead_agent::{EventRecord, FeedItem, RunFollower};
use bulkhead_store::Store;
use tokio::sync::mpsc;

use super::{Relayed, Subscription};
use crate::app::AppState;

/// How often a follower of a run elsewhere looks at the run in the store:
/// whether it ended without a word (its replica died, or Redis lost the
/// message), or moved here.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The client went away, or the store failed: following stops.
struct Stop;

/// The events of a run after `after`, wherever it executes. The channel
/// closes once the run has ended or paused (everything it emitted sent),
/// or is cancelled while queued.
pub(crate) fn run_events(
    state: AppState,
    run_id: String,
    after: i64,
) -> mpsc::Receiver<EventRecord> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        let _ = follow(&state, &run_id, after, &tx).await;
    });
    rx
}

async fn follow(
    state: &AppState,
    run_id: &str,
    mut after: i64,
    tx: &mpsc::Sender<EventRecord>,
) -> Result<(), Stop> {
    let store = state.engine.store();
    let mut idle = Duration::from_millis(10);
    loop {
        if let Some(follower) = state.engine.follow_run(run_id, after) {
            return follow_here(store, follower, run_id, &mut after, tx).await;
        }
        match store.run(run_id).await {
            Ok(Some(run)) => {
                let given = send_stored(store, run_id, &mut after, tx).await?;
                if run.status != "running" {
                    if given == 0
                        && run.error_code.as_deref() == Some(bulkhead_store::REPLICA_LOST_CODE)
                    {
                        send_lost_end(store, run_id, after, tx).await?;
                    }
                    return Ok(());
                }
                // Executing on another replica (or just starting, or just
                // ended, here).
                if let Some(cluster) = state.cluster()
                    && let Some(subscription) = cluster.follow(run_id).await
                {
                    follow_elsewhere(state, subscription, run_id, &mut after, tx).await?;
                    idle = Duration::from_millis(10);
                    continue;
                }
            }
            Ok(None) => match store.queued_run(run_id).await {
                Ok(Some(queued)) if queued.status == "pending" => {}
                Ok(_) => return Ok(()),
                Err(_) => return Err(Stop),
            },
            Err(_) => return Err(Stop),
        }
        if tx.is_closed() {
            return Err(Stop);
        }
        tokio::time::sleep(idle).await;
        idle = (idle * 2).min(Duration::from_millis(250));
    }
}

/// A run executing here: what its feed does not hold from the store, then
/// the feed until the task ends.
async fn follow_here(
    store: &Store,
    mut follower: RunFollower,
    run_id: &str,
    after: &mut i64,
    tx: &mpsc::Sender<EventRecord>,
) -> Result<(), Stop> {
    if *after + 1 < follower.first_seq() {
        let stored = store.run_events(run_id, *after).await.map_err(|_| Stop)?;
        for event in stored.into_iter().filter(|e| e.seq < follower.first_seq()) {
            *after = event.seq;
            tx.send(record(event)).await.map_err(|_| Stop)?;
        }
    }
    loop {
        match follower.next().await {
            FeedItem::Event(event) if event.seq > *after => {
                *after = event.seq;
                tx.send(event).await.map_err(|_| Stop)?;
            }
            FeedItem::Event(_) => {}
            FeedItem::Ended => return Ok(()),
        }
    }
}

/// A run executing on another replica, through the relay, until its task
/// there ends (or stops being heard of): then the caller looks again.
async fn follow_elsewhere(
    state: &AppState,
    mut subscription: Subscription,
    run_id: &str,
    after: &mut i64,
    tx: &mpsc::Sender<EventRecord>,
) -> Result<(), Stop> {
    let store = state.engine.store();
    // What was committed while the subscription was made.
    send_stored(store, run_id, after, tx).await?;
    let mut heard = false;
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.tick().await;
    loop {
        tokio::select! {
            relayed = subscription.receiver.recv() => match relayed {
                Some(Relayed::Event(event)) => {
                    heard = true;
                    if event.seq > *after + 1 {
                        // Published while this replica was not listening
                        // (a Redis hiccup): the store will have it.
                        fill_gap(store, run_id, after, event.seq, tx).await?;
                    }
                    if event.seq == *after + 1 {
                        *after = event.seq;
                        tx.send(event).await.map_err(|_| Stop)?;
                    }
                }
                Some(Relayed::End) | None => return Ok(()),
            },
            _ = check.tick() => {
                if tx.is_closed() {
                    return Err(Stop);
                }
                match store.run(run_id).await {
                    Ok(Some(run)) if run.status == "running" => {
                        if state.engine.follow_run(run_id, *after).is_some() {
                            return Ok(());
                        }
                        if !heard {
                            // Asked before its replica opened its feed, or
                            // the request was lost: ask again.
                            if let Some(cluster) = state.cluster() {
                                cluster.ask_for(run_id);
                            }
                        }
                    }
                    Ok(_) => return Ok(()),
                    Err(_) => return Err(Stop),
                }
            }
        }
    }
}

/// Gives what the store holds before `next`, waiting for the step that
/// holds it to be committed, unless the run ends first.
async fn fill_gap(
    store: &Store,
    run_id: &str,
    after: &mut i64,
    next: i64,
    tx: &mpsc::Sender<EventRecord>,
) -> Result<(), Stop> {
    let mut wait = Duration::from_millis(10);
    loop {
        let stored = store.run_events(run_id, *after).await.map_err(|_| Stop)?;
        for event in stored.into_iter().filter(|e| e.seq < next) {
            if event.seq != *after + 1 {
                break;
            }
            *after = event.seq;
            tx.send(record(event)).await.map_err(|_| Stop)?;
        }
        if *after + 1 >= next {
            return Ok(());
        }
        match store.run(run_id).await {
            Ok(Some(run)) if run.status == "running" => {}
            Ok(_) => return Ok(()),
            Err(_) => return Err(Stop),
        }
        if tx.is_closed() {
            return Err(Stop);
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(200));
    }
}

/// Gives the stored events after `after`; answers how many.
async fn send_stored(
    store: &Store,
    run_id: &str,
    after: &mut i64,
    tx: &mpsc::Sender<EventRecord>,
) -> Result<usize, Stop> {
    let stored = store.run_events(run_id, *after).await.map_err(|_| Stop)?;
    let given = stored.len();
    for event in stored {
        *after = event.seq;
        tx.send(record(event)).await.map_err(|_| Stop)?;
    }
    Ok(given)
}

/// A run whose replica died: the events of its last step were heard live
/// but never stored, and the `run_failed` another replica recorded for it
/// follows what was stored, so its number is one already given. It is
/// given all the same: it is how the run ended.
async fn send_lost_end(
    store: &Store,
    run_id: &str,
    after: i64,
    tx: &mpsc::Sender<EventRecord>,
) -> Result<(), Stop> {
    let stored = store.run_events(run_id, 0).await.map_err(|_| Stop)?;
    if let Some(last) = stored.into_iter().last()
        && last.kind == "run_failed"
        && last.seq <= after
    {
        tx.send(record(last)).await.map_err(|_| Stop)?;
    }
    Ok(())
}

/// A stored event's kind as the engine names it.
pub(crate) fn event_kind(kind: &str) -> &'static str {
    match kind {
        "run_started" => "run_started",
        "message_delta" => "message_delta",
        "tool_call" => "tool_call",
        "tool_result" => "tool_result",
        "run_completed" => "run_completed",
        "run_failed" => "run_failed",
        "approval_requested" => "approval_requested",
        "approval_decided" => "approval_decided",
        "plan" => "plan",
        "delegated" => "delegated",
        "delegate_result" => "delegate_result",
        _ => "other",
    }
}

fn record(event: bulkhead_store::RunEvent) -> EventRecord {
    EventRecord {
        seq: event.seq,
        kind: event_kind(&event.kind),
        data: Arc::from(event.data),
    }
}
