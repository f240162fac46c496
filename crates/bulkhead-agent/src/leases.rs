//! This replica's lease on the runs it executes, and the recovery of the
//! runs of replicas whose lease lapsed (PostgreSQL; see the store's
//! `leases`). One lease covers every run of the replica, so keeping it
//! costs one write per renewal, not one per run.
//!
//! A lapsed lease is judged only by a replica that has itself renewed its
//! lease without a failure for a whole lease: after an outage of the
//! database, which every replica lives through alike, the live ones renew
//! before anyone may judge them, and only the dead stay lapsed.

use std::sync::Mutex;

use super::*;

/// Runs ended per pass; the next pass, a tick later, takes the rest.
const ORPHANS_PER_PASS: i64 = 100;

#[derive(Debug, Default)]
pub(crate) struct LeaseState {
    /// Since when the lease has been renewed with no failure in between.
    healthy_since: Option<Instant>,
    /// The lease was held once: finding it gone means it was lost.
    registered: bool,
}

impl Engine {
    /// How often the lease is looked after: renewed every third of it,
    /// lapsed leases looked for every second (more often for short ones).
    fn lease_tick(&self) -> Duration {
        (self.settings.lease / 4).min(Duration::from_secs(1))
    }

    /// Keeps this replica's lease and ends the runs of lapsed replicas,
    /// for as long as the engine lives. Nothing to do on SQLite.
    pub fn spawn_lease_keeper(self: &Arc<Self>) {
        if self.store.replica().is_none() {
            return;
        }
        let engine = Arc::downgrade(self);
        let tick = self.lease_tick();
        let renew_every = self.settings.lease / 3;
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(tick);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut renewed_at: Option<Instant> = None;
            loop {
                ticks.tick().await;
                let Some(engine) = engine.upgrade() else {
                    break;
                };
                if renewed_at.is_none_or(|at| at.elapsed() >= renew_every)
                    || engine.lease_unhealthy()
                {
                    if engine.renew_lease().await {
                        renewed_at = Some(Instant::now());
                    }
                }
                if engine.is_accepting() {
                    engine.end_orphaned_runs().await;
                }
            }
        });
    }

    fn lease_unhealthy(&self) -> bool {
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .healthy_since
            .is_none()
    }

    /// Renews the lease; `false` when the database could not be reached.
    async fn renew_lease(&self) -> bool {
        // Stored shorter than the setting by one tick: a lapse is seen at
        // the next tick at the latest, so a dead replica's runs are ended
        // within the lease of its last renewal.
        let lease_ms = (self.settings.lease - self.lease_tick()).as_millis() as i64;
        let renewal = self.store.renew_lease(lease_ms).await;
        let mut state = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        match renewal {
            Ok(renewal) => {
                if state.healthy_since.is_none() {
                    if state.registered {
                        tracing::info!("the lease is renewed again");
                    }
                    state.healthy_since = Some(Instant::now());
                }
                let lost = renewal == bulkhead_store::LeaseRenewal::Registered && state.registered;
                state.registered = true;
                drop(state);
                if lost {
                    self.lease_lost();
                }
                true
            }
            Err(e) => {
                if state.healthy_since.take().is_some() {
                    tracing::warn!(error = %e, "could not renew this replica's lease; retrying");
                }
                false
            }
        }
    }

    /// Another replica found this one's lease lapsed and ended its runs:
    /// stop them here too (nothing more of them can be written).
    fn lease_lost(&self) {
        let runs = self.feeds.run_ids();
        metrics::counter!(telemetry::LEASE_LOSSES).increment(1);
        tracing::error!(
            runs = runs.len(),
            "this replica's lease lapsed and another replica ended its runs; stopping them here"
        );
        for run_id in runs {
            self.cancel_run(&run_id, bulkhead_store::REPLICA_LOST_MESSAGE);
        }
    }

    /// Ends the runs of replicas whose lease lapsed, tells their followers,
    /// and starts what was queued behind them.
    async fn end_orphaned_runs(self: &Arc<Self>) {
        let judged = self
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .healthy_since
            .is_some_and(|since| since.elapsed() >= self.settings.lease);
        if !judged {
            return;
        }
        let ended = match self
            .store
            .end_orphaned_runs(now_ms(), ORPHANS_PER_PASS)
            .await
        {
            Ok(ended) => ended,
            Err(e) => {
                tracing::warn!(error = %e, "could not look for runs of lapsed replicas");
                return;
            }
        };
        for run in ended {
            metrics::counter!(telemetry::ORPHANED_RUNS).increment(1);
            tracing::warn!(
                run_id = %run.run_id,
                session_id = %run.session_id,
                "ended a run whose replica's lease lapsed (interrupted, replica_lost)"
            );
            if let Some(cluster) = self.cluster.get() {
                cluster.publish_event(
                    &run.run_id,
                    &EventRecord {
                        seq: run.seq,
                        kind: "run_failed",
                        data: Arc::from(run.data.as_str()),
                    },
                );
                cluster.publish_end(&run.run_id);
            }
            let engine = Arc::clone(self);
            tokio::spawn(async move { engine.dispatch(&run.session_id).await });
        }
    }

    /// Gives up the lease at the end of a clean shutdown: nothing runs
    /// here any more, and nobody need wait for it to lapse.
    pub async fn release_lease(&self) {
        if self.store.replica().is_some()
            && let Err(e) = self.store.release_lease().await
        {
            tracing::debug!(error = %e, "could not give up the lease; it lapses by itself");
        }
    }
}

pub(crate) type Leases = Mutex<LeaseState>;
