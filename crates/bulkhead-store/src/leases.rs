//! Runs owned by leases, for replicas sharing one PostgreSQL. A replica
//! renews one lease for all the runs it executes (a row in `replicas`, its
//! expiry on the database's clock); the runs name their replica. When a
//! replica stops renewing (it died, or lost the database for longer than
//! its lease), any other replica ends its `running` runs `interrupted`,
//! with a last `run_failed` event after what they recorded, and frees their
//! sessions. Nothing of this runs on SQLite: one process owns the file and
//! recovers its runs when it starts.

use crate::{Pools, Store, StoreError};

/// The database's clock in milliseconds since the epoch: leases are judged
/// on it, so replicas with skewed clocks agree on what has lapsed.
const DB_NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::bigint";

/// What the reaper says in a run it ends, and in its `run_failed` event.
pub const REPLICA_LOST_CODE: &str = "replica_lost";
pub const REPLICA_LOST_MESSAGE: &str =
    "the replica executing the run stopped (its lease lapsed); what the run recorded is kept";

/// How renewing a lease went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseRenewal {
    /// The lease was held and is renewed.
    Renewed,
    /// There was no lease: this replica is registered now. On a replica
    /// that held one before, this means another replica found it lapsed
    /// and ended its runs.
    Registered,
}

/// A run another replica was executing when its lease lapsed, as ended
/// here: its last event is `run_failed` with `seq`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OrphanedRun {
    pub run_id: String,
    pub session_id: String,
    pub seq: i64,
    pub data: String,
}

impl Store {
    /// Names the replica this handle writes for: the runs it opens or
    /// resumes are owned by it. Only on PostgreSQL; SQLite stays as it is.
    pub fn for_replica(mut self, replica_id: &str) -> Store {
        if matches!(self.pools, Pools::Postgres(_)) {
            self.replica = Some(replica_id.into());
        }
        self
    }

    /// The replica this handle writes for, if any.
    pub fn replica(&self) -> Option<&str> {
        self.replica.as_deref()
    }

    /// Renews this replica's lease for `lease_ms` from now (the database's
    /// now), registering it if it holds none.
    pub async fn renew_lease(&self, lease_ms: i64) -> Result<LeaseRenewal, StoreError> {
        let (Pools::Postgres(pool), Some(replica)) = (&self.pools, &self.replica) else {
            return Ok(LeaseRenewal::Renewed);
        };
        let renewed = sqlx::query(&format!(
            "UPDATE replicas SET lease_expires_at = {DB_NOW_MS} + $2 WHERE id = $1"
        ))
        .bind(replica.as_ref())
        .bind(lease_ms)
        .execute(pool)
        .await?
        .rows_affected();
        if renewed == 1 {
            return Ok(LeaseRenewal::Renewed);
        }
        sqlx::query(&format!(
            "INSERT INTO replicas (id, started_at, lease_expires_at) \
             VALUES ($1, {DB_NOW_MS}, {DB_NOW_MS} + $2) \
             ON CONFLICT (id) DO UPDATE SET lease_expires_at = EXCLUDED.lease_expires_at"
        ))
        .bind(replica.as_ref())
        .bind(lease_ms)
        .execute(pool)
        .await?;
        Ok(LeaseRenewal::Registered)
    }

    /// Gives up this replica's lease (at the end of a clean shutdown, when
    /// it executes nothing any more).
    pub async fn release_lease(&self) -> Result<(), StoreError> {
        let (Pools::Postgres(pool), Some(replica)) = (&self.pools, &self.replica) else {
            return Ok(());
        };
        sqlx::query("DELETE FROM replicas WHERE id = $1")
            .bind(replica.as_ref())
            .execute(pool)
            .await?;
        Ok(())
    }

    /// Ends, `interrupted`, up to `limit` runs still `running` under a
    /// replica whose lease has lapsed: their tool calls in flight are
    /// recorded interrupted, a `run_failed` event follows what they
    /// recorded, their sessions are freed. Rows another replica is ending
    /// at the same moment are skipped, so each run is ended once. Forgets
    /// replicas whose lease lapsed and that own no run any more.
    pub async fn end_orphaned_runs(
        &self,
        now: i64,
        limit: i64,
    ) -> Result<Vec<OrphanedRun>, StoreError> {
        let Pools::Postgres(pool) = &self.pools else {
            return Ok(Vec::new());
        };
        let mut tx = pool.begin().await?;
        let orphans: Vec<(String,)> = sqlx::query_as(&format!(
            "SELECT r.id FROM runs r \
             WHERE r.status = 'running' AND r.replica_id IS NOT NULL \
             AND NOT EXISTS (SELECT 1 FROM replicas p \
                             WHERE p.id = r.replica_id AND p.lease_expires_at > {DB_NOW_MS}) \
             LIMIT $1 FOR UPDATE OF r SKIP LOCKED"
        ))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let ids: Vec<String> = orphans.into_iter().map(|(id,)| id).collect();
        let mut ended = Vec::new();
        if !ids.is_empty() {
            sqlx::query(
                "UPDATE tool_executions SET status = 'interrupted', finished_at = $2, \
                 error = 'the replica executing the run stopped during the call' \
                 WHERE run_id = ANY($1) AND status = 'running'",
            )
            .bind(&ids)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            ended = sqlx::query_as::<_, OrphanedRun>(
                "WITH ended AS (\
                   UPDATE runs SET status = 'interrupted', finished_at = $2, \
                   error_code = $3, error_message = $4 \
                   WHERE id = ANY($1) RETURNING id, session_id, tokens_used), \
                 freed AS (\
                   UPDATE sessions SET active_run_id = NULL, locked_at = NULL, updated_at = $2 \
                   WHERE active_run_id = ANY($1)) \
                 INSERT INTO run_events (run_id, seq, kind, data, created_at) \
                 SELECT e.id, \
                   COALESCE((SELECT max(seq) FROM run_events x WHERE x.run_id = e.id), 0) + 1, \
                   'run_failed', \
                   json_build_object('run_id', e.id, 'session_id', e.session_id, \
                     'tokens_used', e.tokens_used, \
                     'error', json_build_object('code', $3::text, 'message', $4::text))::text, \
                   $2 \
                 FROM ended e \
                 RETURNING run_id, \
                   (SELECT session_id FROM runs WHERE id = run_id) AS session_id, seq, data",
            )
            .bind(&ids)
            .bind(now)
            .bind(REPLICA_LOST_CODE)
            .bind(REPLICA_LOST_MESSAGE)
            .fetch_all(&mut *tx)
            .await?;
        }
        sqlx::query(&format!(
            "DELETE FROM replicas p WHERE p.lease_expires_at < {DB_NOW_MS} \
             AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.status = 'running' AND r.replica_id = p.id)"
        ))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ended)
    }
}
