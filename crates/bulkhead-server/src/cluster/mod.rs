//! The replicas of one service, linked through Redis pub/sub: a client may
//! follow a run from any replica, and cancel it from any replica.
//!
//! Events become durable in the database, a step at a time; what Redis
//! carries is only what the database does not have yet, live. A follower
//! on replica B of a run executing on A subscribes to the run's channel
//! (`bulkhead:run:<id>`), then asks on the control channel for the run
//! (`follow`); A, if it executes the run, publishes every event its feed
//! holds and each later one as it comes, then `end` once the store holds
//! them all. Nothing is published for a run nobody follows from
//! elsewhere. B numbers what it got against the store (`follow.rs`): an
//! event it already has is dropped, a gap is filled from the store, and a
//! lost message or a Redis outage costs liveness, never an event.
//!
//! Pub/sub rather than PostgreSQL's `LISTEN/NOTIFY`: a notification is
//! capped at 8000 bytes (a tool's result is not), and every notifying
//! commit takes one lock for the whole database, which would serialise the
//! writes of every replica. Rather than Redis streams: a stream would keep
//! a second copy of every event of every run, followed or not, where the
//! database keeps them already.

pub(crate) mod follow;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use bulkhead_agent::{Cluster, Engine, EventRecord};
use futures_util::StreamExt as _;
use redis::aio::PubSubSink;
use tokio::sync::mpsc;

const RUN_CHANNEL_PREFIX: &str = "bulkhead:run:";
const CONTROL_CHANNEL: &str = "bulkhead:control";
/// Messages waiting to be published; past this, events are dropped (the
/// followers read them from the store) rather than held without bound.
const OUTBOX: usize = 65_536;
/// Published together, in one round trip.
const BATCH: usize = 256;
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

fn run_channel(run_id: &str) -> String {
    format!("{RUN_CHANNEL_PREFIX}{run_id}")
}

/// What a follower hears of a run executing on another replica.
#[derive(Debug)]
pub(crate) enum Relayed {
    Event(EventRecord),
    /// Its task ended there; the store holds everything it emitted.
    End,
}

/// This replica's link to the others.
#[derive(Debug)]
pub struct RedisCluster {
    outbox: mpsc::Sender<(String, String)>,
    hub: Arc<Hub>,
}

/// The subscriptions of this replica: one connection for all of them.
struct Hub {
    client: redis::Client,
    /// Followers here of runs executing elsewhere, by channel.
    listeners: Mutex<HashMap<String, Vec<(u64, mpsc::UnboundedSender<Relayed>)>>>,
    next_listener: AtomicU64,
    /// The subscribing connection, while it is up.
    sink: Mutex<Option<PubSubSink>>,
    engine: OnceLock<Weak<Engine>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

impl RedisCluster {
    /// Starts the publisher and the subscriber; neither needs Redis to be
    /// up now, and both come back with it.
    pub fn start(client: redis::Client) -> Arc<RedisCluster> {
        let (outbox, pending) = mpsc::channel(OUTBOX);
        tokio::spawn(publish(client.clone(), pending));
        let hub = Arc::new(Hub {
            client,
            listeners: Mutex::new(HashMap::new()),
            next_listener: AtomicU64::new(0),
            sink: Mutex::new(None),
            engine: OnceLock::new(),
        });
        tokio::spawn(subscribe(Arc::downgrade(&hub)));
        Arc::new(RedisCluster { outbox, hub })
    }

    /// Links the engine: a cancel or a follow asked for elsewhere reaches
    /// its runs, and its relayed runs are published here.
    pub fn attach(self: &Arc<Self>, engine: &Arc<Engine>) {
        let _ = self.hub.engine.set(Arc::downgrade(engine));
        engine.set_cluster(Arc::clone(self) as Arc<dyn Cluster>);
    }

    fn send(&self, channel: String, payload: String) {
        // Full or closed: dropped; followers read the store instead.
        let _ = self.outbox.try_send((channel, payload));
    }

    /// Follows a run executing elsewhere: subscribed (confirmed by Redis)
    /// before it returns, then the run is asked for. `None` when Redis
    /// cannot be reached: the follower reads the store instead.
    pub(crate) async fn follow(self: &Arc<Self>, run_id: &str) -> Option<Subscription> {
        let channel = run_channel(run_id);
        let (sender, receiver) = mpsc::unbounded_channel();
        let id = self.hub.next_listener.fetch_add(1, Ordering::Relaxed);
        self.hub
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(channel.clone())
            .or_default()
            .push((id, sender));
        let subscription = Subscription {
            hub: Arc::clone(&self.hub),
            channel: channel.clone(),
            id,
            receiver,
        };
        let sink = self.hub.sink();
        let mut sink = sink?;
        // Each follower waits for a confirmation of its own (subscribing
        // again is harmless): another follower's may still be on its way.
        match tokio::time::timeout(REDIS_TIMEOUT, sink.subscribe(&channel)).await {
            Ok(Ok(())) => {}
            _ => return None,
        }
        self.ask_for(run_id);
        Some(subscription)
    }

    /// Asks whichever replica executes `run_id` to publish its events.
    pub(crate) fn ask_for(&self, run_id: &str) {
        self.send(CONTROL_CHANNEL.into(), format!("follow\t{run_id}"));
    }
}

impl Cluster for RedisCluster {
    fn publish_event(&self, run_id: &str, event: &EventRecord) {
        self.send(
            run_channel(run_id),
            format!("{}\t{}\t{}", event.seq, event.kind, event.data),
        );
    }

    fn publish_end(&self, run_id: &str) {
        self.send(run_channel(run_id), "end".into());
    }

    fn request_cancel(&self, run_id: &str, reason: &str) {
        self.send(
            CONTROL_CHANNEL.into(),
            format!("cancel\t{run_id}\t{reason}"),
        );
    }
}

/// A follower's subscription to one run's channel; dropping it lets go.
pub(crate) struct Subscription {
    hub: Arc<Hub>,
    channel: String,
    id: u64,
    pub(crate) receiver: mpsc::UnboundedReceiver<Relayed>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let last = {
            let mut listeners = self.hub.listeners.lock().unwrap_or_else(|e| e.into_inner());
            let Some(entry) = listeners.get_mut(&self.channel) else {
                return;
            };
            entry.retain(|(id, _)| *id != self.id);
            let last = entry.is_empty();
            if last {
                listeners.remove(&self.channel);
            }
            last
        };
        if !last {
            return;
        }
        let sink = self.hub.sink();
        if let (Some(mut sink), Ok(runtime)) = (sink, tokio::runtime::Handle::try_current()) {
            let channel = std::mem::take(&mut self.channel);
            let hub = Arc::clone(&self.hub);
            runtime.spawn(async move {
                // A follower that came meanwhile keeps the subscription.
                let wanted = hub
                    .listeners
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(&channel);
                if !wanted {
                    let _ = tokio::time::timeout(REDIS_TIMEOUT, sink.unsubscribe(&channel)).await;
                }
            });
        }
    }
}

impl Hub {
    /// The subscribing connection, if it is up.
    fn sink(&self) -> Option<PubSubSink> {
        self.sink.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn deliver(&self, message: &redis::Msg) {
        let channel = message.get_channel_name();
        let Ok(payload) = std::str::from_utf8(message.get_payload_bytes()) else {
            return;
        };
        if channel == CONTROL_CHANNEL {
            self.control(payload);
            return;
        }
        let relayed = if payload == "end" {
            Relayed::End
        } else {
            let mut parts = payload.splitn(3, '\t');
            let (Some(seq), Some(kind), Some(data)) = (parts.next(), parts.next(), parts.next())
            else {
                return;
            };
            let Ok(seq) = seq.parse() else {
                return;
            };
            Relayed::Event(EventRecord {
                seq,
                kind: follow::event_kind(kind),
                data: Arc::from(data),
            })
        };
        let listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = listeners.get(channel) {
            for (_, sender) in entry {
                let _ = sender.send(match &relayed {
                    Relayed::Event(event) => Relayed::Event(event.clone()),
                    Relayed::End => Relayed::End,
                });
            }
        }
    }

    /// A request from another replica for the runs executing here.
    fn control(&self, payload: &str) {
        let Some(engine) = self.engine.get().and_then(Weak::upgrade) else {
            return;
        };
        let mut parts = payload.splitn(3, '\t');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("follow"), Some(run_id), _) => {
                engine.relay_run(run_id);
            }
            (Some("cancel"), Some(run_id), Some(reason)) => {
                if engine.cancel_run(run_id, reason) {
                    tracing::info!(run_id, "run cancelled at another replica's request");
                }
            }
            _ => {}
        }
    }
}

/// Keeps this replica subscribed: the control channel and every followed
/// run's channel, subscribed again after Redis comes back.
async fn subscribe(hub: Weak<Hub>) {
    let mut wait = Duration::from_millis(200);
    let mut down_since: Option<Instant> = None;
    loop {
        let Some(client) = hub.upgrade().map(|hub| hub.client.clone()) else {
            return;
        };
        let connected = tokio::time::timeout(REDIS_TIMEOUT * 5, client.get_async_pubsub()).await;
        if let Ok(Ok(pubsub)) = connected {
            let (mut sink, mut stream) = pubsub.split();
            let channels: Vec<String> = match hub.upgrade() {
                Some(hub) => std::iter::once(CONTROL_CHANNEL.to_string())
                    .chain(
                        hub.listeners
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .keys()
                            .cloned(),
                    )
                    .collect(),
                None => return,
            };
            if let Ok(Ok(())) =
                tokio::time::timeout(REDIS_TIMEOUT * 5, sink.subscribe(&channels)).await
            {
                if let Some(hub) = hub.upgrade() {
                    *hub.sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink);
                }
                if down_since.take().is_some() {
                    tracing::info!("subscribed to the other replicas through Redis again");
                }
                wait = Duration::from_millis(200);
                while let Some(message) = stream.next().await {
                    match hub.upgrade() {
                        Some(hub) => hub.deliver(&message),
                        None => return,
                    }
                }
                if let Some(hub) = hub.upgrade() {
                    *hub.sink.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
            }
        }
        if down_since.is_none() {
            down_since = Some(Instant::now());
            tracing::warn!(
                "no subscription to the other replicas through Redis: runs elsewhere are followed from the database until it comes back"
            );
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

/// Publishes what the outbox holds, a batch per round trip, in order.
async fn publish(client: redis::Client, mut pending: mpsc::Receiver<(String, String)>) {
    let mut connection: Option<redis::aio::ConnectionManager> = None;
    let mut resting_until: Option<Instant> = None;
    let mut batch = Vec::with_capacity(BATCH);
    while pending.recv_many(&mut batch, BATCH).await > 0 {
        if resting_until.is_some_and(|until| Instant::now() < until) {
            batch.clear();
            continue;
        }
        if connection.is_none() {
            connection = tokio::time::timeout(
                REDIS_TIMEOUT,
                redis::aio::ConnectionManager::new(client.clone()),
            )
            .await
            .ok()
            .and_then(Result::ok);
        }
        let sent = match connection.as_mut() {
            Some(connection) => {
                let mut pipe = redis::pipe();
                for (channel, payload) in batch.drain(..) {
                    pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
                }
                matches!(
                    tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async::<()>(connection)).await,
                    Ok(Ok(()))
                )
            }
            None => false,
        };
        batch.clear();
        if sent {
            resting_until = None;
        } else {
            if resting_until.is_none() {
                tracing::warn!(
                    "could not publish run events to Redis; followers on other replicas read the database meanwhile"
                );
            }
            // Followers fall back on the store; try again in a second
            // rather than make every event wait for a Redis that is down.
            resting_until = Some(Instant::now() + REDIS_TIMEOUT);
            connection = None;
        }
    }
}
