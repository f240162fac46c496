//! The runs executing in this process, each with its live feed of events
//! and the token that cancels it alone. Anyone may follow a run while it
//! executes (a protocol's join, a reconnecting stream): the feed keeps
//! every event the run's task has emitted since it began, so a follower
//! that arrives late, or resumes after an event id, misses nothing and
//! sees nothing twice. Events are written to the store a step at a time,
//! so the store alone would lag behind the run; the feed closes the gap.
//! A feed ends when its task does (the run finished, failed or paused),
//! after the store holds everything it emitted.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

use super::*;

/// What a follower reads of a run.
#[derive(Debug, Clone)]
pub enum FeedItem {
    Event(EventRecord),
    /// The run's task ended; everything it emitted has been given, and the
    /// store holds it.
    Ended,
}

#[derive(Debug)]
pub(crate) struct RunFeed {
    /// The seq of the first event this feed holds: a resumed run's task
    /// starts after what the store holds already.
    first_seq: i64,
    events: Mutex<FeedEvents>,
    /// How many events `events` holds, and whether the task ended.
    progress: watch::Sender<(usize, bool)>,
    pub(crate) cancel: CancellationToken,
    cancelled_by: Mutex<Option<Arc<str>>>,
    /// Where its events go once a follower on another replica asks.
    cluster: Option<(Arc<str>, Arc<dyn Cluster>)>,
}

#[derive(Debug, Default)]
struct FeedEvents {
    list: Vec<EventRecord>,
    /// A follower on another replica asked for the run: every event is
    /// published to the cluster as well (those before, when it asked).
    relayed: bool,
}

impl RunFeed {
    pub(crate) fn push(&self, event: EventRecord) {
        let len = {
            let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
            // Under the lock: published in the order they are numbered.
            if events.relayed
                && let Some((run_id, cluster)) = &self.cluster
            {
                cluster.publish_event(run_id, &event);
            }
            events.list.push(event);
            events.list.len()
        };
        self.progress.send_replace((len, false));
    }

    /// Publishes every event so far (again, for a follower that came
    /// after others: they drop what they have), and from now on each as
    /// it comes.
    fn relay(&self) {
        let Some((run_id, cluster)) = &self.cluster else {
            return;
        };
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.relayed = true;
        for event in &events.list {
            cluster.publish_event(run_id, event);
        }
    }

    pub(crate) fn mark_cancelled(&self, reason: &str) {
        *self.cancelled_by.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.into());
    }

    /// Why the run was cancelled, if a client cancelled it.
    pub(crate) fn cancel_reason(&self) -> Option<Arc<str>> {
        self.cancelled_by
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The runs whose task is alive in this process.
#[derive(Debug, Default)]
pub(crate) struct RunFeeds {
    live: Mutex<HashMap<String, Arc<RunFeed>>>,
}

impl RunFeeds {
    /// Registers a run's task, whose first event will be `first_seq`.
    pub(crate) fn open(
        &self,
        run_id: &str,
        first_seq: i64,
        parent: &CancellationToken,
        cluster: Option<&Arc<dyn Cluster>>,
    ) -> Arc<RunFeed> {
        let feed = Arc::new(RunFeed {
            first_seq,
            events: Mutex::new(FeedEvents::default()),
            progress: watch::channel((0, false)).0,
            cancel: parent.child_token(),
            cancelled_by: Mutex::new(None),
            cluster: cluster.map(|cluster| (Arc::from(run_id), Arc::clone(cluster))),
        });
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(run_id.to_string(), Arc::clone(&feed));
        feed
    }

    /// Ends the run's feed: called once the store holds what it emitted.
    pub(crate) fn close(&self, run_id: &str, feed: &Arc<RunFeed>) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.get(run_id).is_some_and(|f| Arc::ptr_eq(f, feed)) {
            live.remove(run_id);
        }
        drop(live);
        feed.progress.send_modify(|(_, ended)| *ended = true);
        let relayed = feed
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .relayed;
        if relayed && let Some((run_id, cluster)) = &feed.cluster {
            cluster.publish_end(run_id);
        }
    }

    /// The ids of the runs whose task is alive here.
    pub(crate) fn run_ids(&self) -> Vec<String> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub(crate) fn get(&self, run_id: &str) -> Option<Arc<RunFeed>> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(run_id)
            .cloned()
    }
}

/// A follower of one run's live feed, from a given event on.
pub struct RunFollower {
    feed: Arc<RunFeed>,
    progress: watch::Receiver<(usize, bool)>,
    /// The index in the feed's events of the next event to give.
    next: usize,
}

impl RunFollower {
    /// The seq of the first event the live feed holds; anything before it
    /// is in the store.
    pub fn first_seq(&self) -> i64 {
        self.feed.first_seq
    }

    /// The next event after those given, waiting for it; `Ended` once the
    /// run's task has ended and everything was given.
    pub async fn next(&mut self) -> FeedItem {
        loop {
            let (len, ended) = *self.progress.borrow_and_update();
            if self.next < len {
                let events = self.feed.events.lock().unwrap_or_else(|e| e.into_inner());
                let event = events.list[self.next].clone();
                self.next += 1;
                return FeedItem::Event(event);
            }
            if ended {
                return FeedItem::Ended;
            }
            if self.progress.changed().await.is_err() {
                return FeedItem::Ended;
            }
        }
    }
}

impl Engine {
    /// Follows a run executing in this process, from the event after
    /// `after` (0: from its first). `None` when no task of this process
    /// runs it now (it is queued, paused, finished, or on another replica):
    /// then the store has what it emitted.
    pub fn follow_run(&self, run_id: &str, after: i64) -> Option<RunFollower> {
        let feed = self.feeds.get(run_id)?;
        let progress = feed.progress.subscribe();
        let next = (after - feed.first_seq + 1).max(0) as usize;
        Some(RunFollower {
            feed,
            progress,
            next,
        })
    }

    /// A follower on another replica asks for a run: if it executes here,
    /// its events are published to the cluster from its first on.
    pub fn relay_run(&self, run_id: &str) -> bool {
        let Some(feed) = self.feeds.get(run_id) else {
            return false;
        };
        feed.relay();
        true
    }

    /// Cancels a run executing in this process: it stops at once (a model
    /// call or a tool call in progress is abandoned, as at shutdown) and
    /// ends `interrupted` with `reason`. `false` when no task of this
    /// process runs it.
    pub fn cancel_run(&self, run_id: &str, reason: &str) -> bool {
        let Some(feed) = self.feeds.get(run_id) else {
            return false;
        };
        feed.mark_cancelled(reason);
        feed.cancel.cancel();
        true
    }
}
