//! Sessions made before their first run (a protocol's threads), with the
//! metadata their client sets, and the run queue: runs accepted and kept
//! until their session is free. A queued run is taken by the transaction
//! that opens it (`BeginRun::dequeue`), so it starts once, whichever
//! process takes it; what is queued survives a restart.

use rusqlite::{OptionalExtension, params};
use sqlx::FromRow;

use crate::{Pools, Store, StoreError};

/// A session as a thread: its row, the status of its latest run and how
/// many runs wait in the queue for it.
#[derive(Debug, Clone, FromRow)]
pub struct ThreadRow {
    pub id: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub active_run_id: Option<String>,
    pub owner: Option<String>,
    /// `''` until the first run binds it to an agent.
    pub agent: String,
    pub metadata: Option<String>,
    /// The status of the session's latest run, if it had one.
    pub last_run_status: Option<String>,
    /// Runs of the session waiting in the queue.
    pub queued: i64,
}

/// A run in the queue.
#[derive(Debug, Clone, FromRow)]
pub struct QueuedRun {
    pub id: String,
    pub session_id: String,
    pub owner: Option<String>,
    pub agent: String,
    pub input: String,
    /// JSON array of the messages given before `input` (a thread's first
    /// run), stored with it when it starts.
    pub history: Option<String>,
    /// How the client asked for it (JSON).
    pub kwargs: String,
    /// `pending`, or `interrupted` when cancelled before it started.
    pub status: String,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone)]
pub struct NewQueuedRun<'a> {
    pub id: &'a str,
    pub session_id: &'a str,
    pub owner: Option<&'a str>,
    pub agent: &'a str,
    pub input: &'a str,
    pub history: Option<&'a str>,
    pub kwargs: &'a str,
    pub now: i64,
}

const THREAD_SELECT: &str = "SELECT s.id, s.created_at, s.updated_at, s.active_run_id, s.owner, \
    s.agent, s.metadata, \
    (SELECT r.status FROM runs r WHERE r.session_id = s.id \
     ORDER BY r.created_at DESC, r.id DESC LIMIT 1) AS last_run_status, \
    (SELECT COUNT(*) FROM queued_runs q WHERE q.session_id = s.id AND q.status = 'pending') AS queued \
    FROM sessions s";

const QUEUED_COLUMNS: &str =
    "id, session_id, owner, agent, input, history, kwargs, status, created_at, updated_at";

/// Inserts a queued run; with `exclusive`, only if its session has no run
/// in flight and none queued (one statement, so two such requests cannot
/// both get in).
const ENQUEUE_SQLITE: &str = "INSERT INTO queued_runs \
    (id, session_id, owner, agent, input, history, kwargs, status, created_at, updated_at) \
    SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', ?8, ?8 \
    WHERE NOT ?9 OR (\
      NOT EXISTS (SELECT 1 FROM queued_runs WHERE session_id = ?2 AND status = 'pending') \
      AND NOT EXISTS (SELECT 1 FROM sessions WHERE id = ?2 AND active_run_id IS NOT NULL))";
const ENQUEUE_POSTGRES: &str = "INSERT INTO queued_runs \
    (id, session_id, owner, agent, input, history, kwargs, status, created_at, updated_at) \
    SELECT $1, $2, $3, $4, $5, $6, $7, 'pending', $8, $8 \
    WHERE NOT $9 OR (\
      NOT EXISTS (SELECT 1 FROM queued_runs WHERE session_id = $2 AND status = 'pending') \
      AND NOT EXISTS (SELECT 1 FROM sessions WHERE id = $2 AND active_run_id IS NOT NULL))";

impl Store {
    /// Makes a session that belongs to no agent yet. `false`: a session
    /// with this id exists (nothing was changed).
    pub async fn create_thread(
        &self,
        id: &str,
        owner: Option<&str>,
        metadata: Option<&str>,
        now: i64,
    ) -> Result<bool, StoreError> {
        let sql = "INSERT INTO sessions (id, created_at, updated_at, owner, agent, metadata) \
                   VALUES ($1, $2, $2, $3, '', $4) ON CONFLICT (id) DO NOTHING";
        let inserted = write_with!(self, sqlite: (row = (id.to_owned(), owner.map(str::to_owned), metadata.map(str::to_owned))) |c| {
            Ok::<_, StoreError>(c.prepare_cached(&sql.replace('$', "?"))?
                .execute(params![row.0, now, row.1, row.2])?)
        }, postgres: |pool| {
            Ok(sqlx::query(sql)
                .bind(id)
                .bind(now)
                .bind(owner)
                .bind(metadata)
                .execute(pool)
                .await?
                .rows_affected() as usize)
        })?;
        Ok(inserted == 1)
    }

    /// A session with what a thread shows of it.
    pub async fn thread(&self, id: &str) -> Result<Option<ThreadRow>, StoreError> {
        with_reader!(self, |pool| {
            Ok(
                sqlx::query_as::<_, ThreadRow>(&format!("{THREAD_SELECT} WHERE s.id = $1"))
                    .bind(id)
                    .fetch_optional(pool)
                    .await?,
            )
        })
    }

    /// The sessions a tenant reaches (`None`: every session), most
    /// recently updated first.
    pub async fn threads(&self, owner: Option<&str>) -> Result<Vec<ThreadRow>, StoreError> {
        with_reader!(self, |pool| {
            Ok(sqlx::query_as::<_, ThreadRow>(&format!(
                "{THREAD_SELECT} WHERE (CAST($1 AS TEXT) IS NULL OR s.owner = $1) \
                 ORDER BY s.updated_at DESC, s.created_at DESC, s.id"
            ))
            .bind(owner)
            .fetch_all(pool)
            .await?)
        })
    }

    /// Replaces a session's metadata. `false`: no such session.
    pub async fn set_thread_metadata(
        &self,
        id: &str,
        metadata: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let sql = "UPDATE sessions SET metadata = $1, updated_at = $2 WHERE id = $3";
        let updated = write_with!(self, sqlite: (row = (id.to_owned(), metadata.to_owned())) |c| {
            Ok::<_, StoreError>(c.prepare_cached(&sql.replace('$', "?"))?.execute(params![row.1, now, row.0])?)
        }, postgres: |pool| {
            Ok(sqlx::query(sql)
                .bind(metadata)
                .bind(now)
                .bind(id)
                .execute(pool)
                .await?
                .rows_affected() as usize)
        })?;
        Ok(updated == 1)
    }

    /// Queues a run. With `exclusive`, only if its session has nothing in
    /// flight or queued: `false` then means it was busy.
    pub async fn enqueue_run(
        &self,
        run: &NewQueuedRun<'_>,
        exclusive: bool,
    ) -> Result<bool, StoreError> {
        let inserted = match &self.pools {
            Pools::Sqlite { writer, .. } => {
                let owned = (
                    run.id.to_owned(),
                    run.session_id.to_owned(),
                    run.owner.map(str::to_owned),
                    run.agent.to_owned(),
                    run.input.to_owned(),
                    run.history.map(str::to_owned),
                    run.kwargs.to_owned(),
                    run.now,
                );
                writer
                    .write(move |c| {
                        let (id, session, owner, agent, input, history, kwargs, now) = &owned;
                        let inserted = c.prepare_cached(ENQUEUE_SQLITE)?.execute(params![
                            id, session, owner, agent, input, history, kwargs, now, exclusive
                        ])?;
                        c.prepare_cached("UPDATE sessions SET updated_at = ?1 WHERE id = ?2")?
                            .execute(params![now, session])?;
                        Ok::<_, StoreError>(inserted)
                    })
                    .await?
            }
            Pools::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                let inserted = sqlx::query(ENQUEUE_POSTGRES)
                    .bind(run.id)
                    .bind(run.session_id)
                    .bind(run.owner)
                    .bind(run.agent)
                    .bind(run.input)
                    .bind(run.history)
                    .bind(run.kwargs)
                    .bind(run.now)
                    .bind(exclusive)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected() as usize;
                sqlx::query("UPDATE sessions SET updated_at = $1 WHERE id = $2")
                    .bind(run.now)
                    .bind(run.session_id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                inserted
            }
        };
        Ok(inserted == 1)
    }

    /// The session's oldest run still waiting in the queue.
    pub async fn next_queued_run(&self, session_id: &str) -> Result<Option<QueuedRun>, StoreError> {
        with_reader!(self, |pool| {
            Ok(sqlx::query_as::<_, QueuedRun>(&format!(
                "SELECT {QUEUED_COLUMNS} FROM queued_runs \
                 WHERE session_id = $1 AND status = 'pending' ORDER BY created_at, id LIMIT 1"
            ))
            .bind(session_id)
            .fetch_optional(pool)
            .await?)
        })
    }

    pub async fn queued_run(&self, id: &str) -> Result<Option<QueuedRun>, StoreError> {
        with_reader!(self, |pool| {
            Ok(sqlx::query_as::<_, QueuedRun>(&format!(
                "SELECT {QUEUED_COLUMNS} FROM queued_runs WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(pool)
            .await?)
        })
    }

    /// A session's runs in the queue (and those cancelled there), oldest
    /// first.
    pub async fn queued_runs(&self, session_id: &str) -> Result<Vec<QueuedRun>, StoreError> {
        with_reader!(self, |pool| {
            Ok(sqlx::query_as::<_, QueuedRun>(&format!(
                "SELECT {QUEUED_COLUMNS} FROM queued_runs WHERE session_id = $1 \
                 ORDER BY created_at, id"
            ))
            .bind(session_id)
            .fetch_all(pool)
            .await?)
        })
    }

    /// The sessions with runs waiting in the queue.
    pub async fn sessions_with_queued_runs(&self) -> Result<Vec<String>, StoreError> {
        with_reader!(self, |pool| {
            let rows: Vec<(String,)> = sqlx::query_as(
                "SELECT DISTINCT session_id FROM queued_runs WHERE status = 'pending'",
            )
            .fetch_all(pool)
            .await?;
            Ok(rows.into_iter().map(|(id,)| id).collect())
        })
    }

    /// Takes a run out of the queue before it started: deleted
    /// (`rollback`) or kept as `interrupted`. `false`: it was not pending.
    pub async fn cancel_queued_run(
        &self,
        id: &str,
        rollback: bool,
        now: i64,
    ) -> Result<bool, StoreError> {
        // Both statements take (id, now); the delete has no use for `now`.
        let sql = if rollback {
            "DELETE FROM queued_runs WHERE id = $1 AND status = 'pending'"
        } else {
            "UPDATE queued_runs SET status = 'interrupted', updated_at = $2 \
             WHERE id = $1 AND status = 'pending'"
        };
        let changed = write_with!(self, sqlite: (id = id.to_owned()) |c| {
            let mut statement = c.prepare_cached(&sql.replace('$', "?"))?;
            Ok::<_, StoreError>(if rollback {
                statement.execute(params![id])?
            } else {
                statement.execute(params![id, now])?
            })
        }, postgres: |pool| {
            let query = sqlx::query(sql).bind(id);
            let query = if rollback { query } else { query.bind(now) };
            Ok(query.execute(pool).await?.rows_affected() as usize)
        })?;
        Ok(changed == 1)
    }

    /// Deletes a run that is not in flight: its record and events, and
    /// with `with_messages` what it added to the conversation (a rollback).
    /// The audit trail of its tool calls stays: what ran, ran.
    /// A run still in the queue, or cancelled there, is deleted too.
    /// `false`: no such run, or it is in flight.
    pub async fn delete_run(&self, id: &str, with_messages: bool) -> Result<bool, StoreError> {
        const IN_FLIGHT: &str = "('running', 'awaiting_approval')";
        let deleted = match &self.pools {
            Pools::Sqlite { writer, .. } => {
                let id = id.to_owned();
                writer
                    .write(move |c| {
                        let finished = c
                            .prepare_cached(&format!(
                                "SELECT 1 FROM runs WHERE id = ?1 AND status NOT IN {IN_FLIGHT}"
                            ))?
                            .query_row(params![id], |_| Ok(()))
                            .optional()?
                            .is_some();
                        if finished && with_messages {
                            c.prepare_cached("DELETE FROM messages WHERE run_id = ?1")?
                                .execute(params![id])?;
                        }
                        let mut deleted = 0;
                        if finished {
                            deleted += c
                                .prepare_cached("DELETE FROM runs WHERE id = ?1")?
                                .execute(params![id])?;
                        }
                        deleted += c
                            .prepare_cached("DELETE FROM queued_runs WHERE id = ?1")?
                            .execute(params![id])?;
                        Ok::<_, StoreError>(deleted)
                    })
                    .await?
            }
            Pools::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                let finished: Option<(String,)> = sqlx::query_as(&format!(
                    "SELECT id FROM runs WHERE id = $1 AND status NOT IN {IN_FLIGHT} FOR UPDATE"
                ))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
                let mut deleted = 0;
                if finished.is_some() {
                    if with_messages {
                        sqlx::query("DELETE FROM messages WHERE run_id = $1")
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                    }
                    deleted += sqlx::query("DELETE FROM runs WHERE id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected() as usize;
                }
                deleted += sqlx::query("DELETE FROM queued_runs WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected() as usize;
                tx.commit().await?;
                deleted
            }
        };
        Ok(deleted > 0)
    }
}
