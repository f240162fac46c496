//! What links this engine to the other replicas of one service: the events
//! of a run it executes go out, as they happen, once a follower on another
//! replica asks for them (`relay_run`; nothing is published for a run
//! nobody follows from elsewhere), and a cancel asked for on another
//! replica reaches the run here. The engine knows only this trait; the
//! server implements it (over Redis).

use super::*;

/// The link between replicas, as the engine uses it.
pub trait Cluster: Send + Sync + std::fmt::Debug + 'static {
    /// An event of a relayed run executing here (every one, in order).
    fn publish_event(&self, run_id: &str, event: &EventRecord);
    /// A relayed run's task here ended: everything it emitted is in the
    /// store.
    fn publish_end(&self, run_id: &str);
    /// Asks whichever replica executes `run_id` to cancel it.
    fn request_cancel(&self, run_id: &str, reason: &str);
}

impl Engine {
    /// Links the engine to the other replicas; set once, before serving.
    pub fn set_cluster(&self, cluster: Arc<dyn Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// The ids of the runs whose task is alive in this process.
    pub fn local_run_ids(&self) -> Vec<String> {
        self.feeds.run_ids()
    }
}
