//! Bulkhead's persistence: sessions, their messages, the runs made on them and
//! every event of every run, on SQLite (embedded default) or PostgreSQL.
//!
//! This is the only crate of the workspace that speaks SQL. Both backends use
//! the same schema shape (ids as text, timestamps as milliseconds since the
//! epoch, JSON as text), so every query is written once and run through
//! whichever driver the URL names. PostgreSQL runs on sqlx. SQLite reads
//! (and migrations) run on sqlx too; its writes go to one writer thread that
//! owns the only writing connection (rusqlite, the same SQLite library) and
//! commits queued writes together: SQLite serialises writers anyway, a single
//! writer turns lock contention (`SQLITE_BUSY`) into a plain queue, and whole
//! units of work crossing threads once beat sqlx's hand-off per statement
//! (see `sqlite_writer`).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::QueryBuilder;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

mod model;
mod sqlite_writer;
mod sqlite_writes;
pub use keys::{ApiKey, RevokeOutcome};
pub use model::*;

use sqlite_writer::Writer;
use sqlite_writes::{OwnedBeginRun, OwnedFinish, OwnedProgress, OwnedToolExecution};

/// Errors from the store. Their text never carries a connection string.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported DATABASE_URL scheme (expected sqlite:// or postgres://)")]
    UnsupportedUrl,
    #[error("invalid DATABASE_URL: {0}")]
    InvalidUrl(String),
    #[error("could not create {path}: {source}")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
    /// The database file (or its folder) refuses this process: a cause
    /// that waiting cannot heal, unlike a database server not answering.
    #[error("cannot write {path}: {source}")]
    NotWritable {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("no answer from the database server within {}s", .0.as_secs_f64())]
    ConnectTimeout(Duration),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database writer: {0}")]
    WriterFailed(String),
    #[error("the store is closed")]
    Closed,
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A write for a run that is no longer `running`: another replica
    /// ended it when this one's lease lapsed. Nothing was written.
    #[error("the run is no longer running here (its replica's lease lapsed and it was ended)")]
    RunTakenOver,
}

impl StoreError {
    /// Whether the database could not be reached (down, restarting, the
    /// pool found no connection in time): what waiting can heal, unlike a
    /// refused statement.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::ConnectTimeout(_) | StoreError::Closed => true,
            StoreError::Database(e) => database_unavailable(e),
            _ => false,
        }
    }
}

fn database_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_) => true,
        // Shutting down, starting up, or out of connections: 57P01
        // admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now,
        // 53300 too_many_connections, and class 08 (connection exceptions).
        sqlx::Error::Database(e) => e.code().is_some_and(|code| {
            matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "53300") || code.starts_with("08")
        }),
        _ => false,
    }
}

/// Which engine a [`Store`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    /// The backend a database URL names, without connecting.
    pub fn from_url(url: &str) -> Result<Backend, StoreError> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            Err(StoreError::UnsupportedUrl)
        }
    }
}

/// Pool sizing and timeouts.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Connections to PostgreSQL, or SQLite reader connections.
    pub max_connections: u32,
    pub acquire_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Clone)]
enum Pools {
    Sqlite {
        read: SqlitePool,
        writer: Arc<Writer>,
        /// How to open a connection for migrations.
        connect: Arc<SqliteConnectOptions>,
        /// Where an in-memory database lives (removed with the last handle).
        _memory: Option<Arc<tempfile::TempDir>>,
    },
    Postgres(PgPool),
}

/// A handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pools: Pools,
    /// The replica the runs this handle opens belong to (PostgreSQL only;
    /// see `leases`).
    replica: Option<Arc<str>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend())
            .finish()
    }
}

/// Runs a write: on SQLite, `$unit` on the writer thread with `$owned` (made
/// by `$make`: the thread needs data it owns) and `$c` its connection; on
/// PostgreSQL, `$body` with `$pool` bound to the pool. Both evaluate to a
/// `Result`.
macro_rules! write_with {
    (
        $self:ident,
        sqlite: ($owned:ident = $make:expr) |$c:ident| $unit:expr,
        postgres: |$pool:ident| $body:block
    ) => {
        match &$self.pools {
            Pools::Sqlite { writer, .. } => {
                let $owned = $make;
                writer.write(move |$c| $unit).await
            }
            Pools::Postgres($pool) => $body,
        }
    };
}

/// Runs `$body` with `$pool` bound to a pool for reads.
macro_rules! with_reader {
    ($self:ident, |$pool:ident| $body:block) => {
        match &$self.pools {
            Pools::Sqlite { read: $pool, .. } => $body,
            Pools::Postgres($pool) => $body,
        }
    };
}

// After the macros above, which they use.
mod approvals;
mod keys;
mod leases;
mod threads;

pub use leases::{LeaseRenewal, OrphanedRun, REPLICA_LOST_CODE, REPLICA_LOST_MESSAGE};

pub use threads::{NewQueuedRun, QueuedRun, ThreadRow};

/// SQLite caps bound parameters per statement; stay well under it.
const ROWS_PER_INSERT: usize = 500;

/// Inserts `$events` for run `$run_id` inside transaction `$tx`, batched.
macro_rules! insert_events {
    ($tx:ident, $run_id:expr, $events:expr) => {
        for chunk in $events.chunks(ROWS_PER_INSERT) {
            let mut insert =
                QueryBuilder::new("INSERT INTO run_events (run_id, seq, kind, data, created_at) ");
            insert.push_values(chunk, |mut row, event| {
                row.push_bind($run_id)
                    .push_bind(event.seq)
                    .push_bind(event.kind)
                    .push_bind(&event.data)
                    .push_bind(event.created_at);
            });
            insert
                .build()
                .execute(&mut *$tx)
                .await
                .map_err(StoreError::from)?;
        }
    };
}

/// Inserts `$messages` into the conversation inside transaction `$tx`.
macro_rules! insert_messages {
    ($tx:ident, $session_id:expr, $run_id:expr, $messages:expr, $now:expr) => {
        for chunk in $messages.chunks(ROWS_PER_INSERT) {
            let mut insert = QueryBuilder::new(
                "INSERT INTO messages (session_id, run_id, role, content, tool_calls, tool_call_id, created_at) ",
            );
            insert.push_values(chunk, |mut row, message| {
                row.push_bind($session_id)
                    .push_bind($run_id)
                    .push_bind(message.role)
                    .push_bind(message.content.as_deref())
                    .push_bind(message.tool_calls.as_deref())
                    .push_bind(message.tool_call_id.as_deref())
                    .push_bind($now);
            });
            insert.build().execute(&mut *$tx).await?;
        }
    };
}

impl Store {
    /// Connects to `url` (`sqlite://…` or `postgres://…`). For SQLite the file
    /// and its folder are created and WAL is switched on.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Store, StoreError> {
        let pools = match Backend::from_url(url)? {
            Backend::Sqlite => connect_sqlite(url, options).await?,
            Backend::Postgres => {
                let connect = PgConnectOptions::from_str(url)
                    // sqlx's parse errors may quote the URL, password
                    // included: none of their text is passed on.
                    .map_err(|_| {
                        StoreError::InvalidUrl(
                            "could not parse the PostgreSQL URL \
                             (expected postgres://user:password@host:port/database)"
                                .into(),
                        )
                    })?;
                // One connection first, on its own: a pool that cannot
                // connect keeps trying until its acquire timeout and then
                // says only "pool timed out", hiding "connection refused" or
                // a refused password.
                use sqlx::Connection as _;
                let probe = tokio::time::timeout(
                    options.acquire_timeout,
                    sqlx::PgConnection::connect_with(&connect),
                )
                .await
                .map_err(|_| StoreError::ConnectTimeout(options.acquire_timeout))??;
                let _ = probe.close().await;
                let pool = PgPoolOptions::new()
                    .max_connections(options.max_connections)
                    .acquire_timeout(options.acquire_timeout)
                    .connect_with(connect)
                    .await?;
                Pools::Postgres(pool)
            }
        };
        Ok(Store {
            pools,
            replica: None,
        })
    }

    pub fn backend(&self) -> Backend {
        match self.pools {
            Pools::Sqlite { .. } => Backend::Sqlite,
            Pools::Postgres(_) => Backend::Postgres,
        }
    }

    /// Applies the embedded migrations that are not applied yet; returns the
    /// number of migrations the schema now has.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        match &self.pools {
            Pools::Sqlite { connect, .. } => {
                use sqlx::Connection as _;
                let migrator = sqlx::migrate!("migrations/sqlite");
                // Without foreign keys: SQLite rebuilds a table by dropping
                // it, which would otherwise cascade (see 0003), and the pragma
                // cannot change inside the transaction a migration runs in.
                let connect = connect.as_ref().clone().foreign_keys(false);
                let mut connection = sqlx::SqliteConnection::connect_with(&connect).await?;
                migrator.run(&mut connection).await?;
                connection.close().await?;
                Ok(migrator.iter().count())
            }
            Pools::Postgres(pool) => {
                let migrator = sqlx::migrate!("migrations/postgres");
                migrator.run(pool).await?;
                Ok(migrator.iter().count())
            }
        }
    }

    /// One round trip to the database.
    pub async fn ping(&self) -> Result<(), StoreError> {
        with_reader!(self, |pool| {
            sqlx::query("SELECT 1").execute(pool).await?;
        });
        Ok(())
    }

    pub async fn close(&self) {
        match &self.pools {
            Pools::Sqlite { read, writer, .. } => {
                writer.close().await;
                read.close().await;
            }
            Pools::Postgres(pool) => pool.close().await,
        }
    }

    /// Marks every run still `running` as `interrupted` and frees the
    /// sessions they held. Only sound where this process is the database's
    /// only user, which is what an SQLite file means for Bulkhead.
    pub async fn recover_abandoned_runs(&self, now: i64) -> Result<u64, StoreError> {
        write_with!(self, sqlite: (at = now) |c| sqlite_writes::recover_abandoned_runs(c, at), postgres: |pool| {
            let mut tx = pool.begin().await?;
            // The audit records of calls whose process died: without this
            // they would stay `running` for ever.
            sqlx::query(
                "UPDATE tool_executions SET status = 'interrupted', finished_at = $1, \
                 error = 'the server stopped during the call' \
                 WHERE status = 'running' \
                 AND session_id IN (SELECT session_id FROM runs WHERE status = 'running')",
            )
            .bind(now)
            .execute(&mut *tx)
            .await?;
            let runs = sqlx::query(
                "UPDATE runs SET status = 'interrupted', finished_at = $1, \
                 error_code = 'server_stopped', \
                 error_message = 'the server stopped before the run finished' \
                 WHERE status = 'running'",
            )
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            sqlx::query(RELEASE_ABANDONED_SESSIONS)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(runs)
        })
    }

    /// Opens a run: creates or locks the session, records the user's message
    /// (after the history, when this creates the session), the run and its
    /// first event, all in one transaction. A session is held by one run at a
    /// time; a lock older than `lock_stale_before` is taken over (its holder
    /// is presumed dead) and the run that held it is marked interrupted.
    ///
    /// Answers the agent the session belongs to, and whether it was made.
    pub async fn begin_run(&self, begin: &BeginRun<'_>) -> Result<Begun, BeginRunError> {
        let pool = match &self.pools {
            Pools::Sqlite { writer, .. } => {
                let owned = OwnedBeginRun::from(begin);
                // A refusal (session busy or unknown) wrote nothing: it comes
                // back as a value, so it does not roll back the writes
                // batched with it.
                return writer
                    .write(move |c| sqlite_writes::begin_run(c, &owned))
                    .await
                    .map_err(BeginRunError::Store)?;
            }
            Pools::Postgres(pool) => pool,
        };
        if let (SessionRef::New(session_id), []) = (begin.session, begin.history) {
            // A new session cannot be busy: the whole opening is one
            // statement, so one round trip instead of six. Foreign keys are
            // checked at the end of the statement, after every part of it.
            let event = &begin.first_event;
            sqlx::query(
                "WITH session AS (\
                   INSERT INTO sessions (id, created_at, updated_at, active_run_id, locked_at, owner, agent) \
                   VALUES ($1, $2, $2, $3, $2, $9, $10)), \
                 run AS (\
                   INSERT INTO runs (id, session_id, status, input, tokens_used, steps, created_at, replica_id) \
                   VALUES ($3, $1, 'running', $4, 0, 0, $2, $11)), \
                 message AS (\
                   INSERT INTO messages (session_id, run_id, role, content, created_at) \
                   VALUES ($1, $3, 'user', $4, $2)) \
                 INSERT INTO run_events (run_id, seq, kind, data, created_at) \
                 VALUES ($3, $5, $6, $7, $8)",
            )
            .bind(session_id)
            .bind(begin.now)
            .bind(begin.run_id)
            .bind(begin.input)
            .bind(event.seq)
            .bind(event.kind)
            .bind(&event.data)
            .bind(event.created_at)
            .bind(begin.owner)
            .bind(new_session_agent(begin)?)
            .bind(self.replica.as_deref())
            .execute(pool)
            .await
            .map_err(StoreError::from)?;
            return Ok(Begun {
                agent: new_session_agent(begin)?.to_owned(),
                created: true,
            });
        }
        let mut tx = pool.begin().await.map_err(StoreError::from)?;
        let (session_id, created) = match begin.session {
            SessionRef::Existing(id) => (id, false),
            SessionRef::New(id) | SessionRef::Named(id) => {
                // A named session that exists already is continued below,
                // as any existing one: locked, its owner and agent checked.
                let conflict = if matches!(begin.session, SessionRef::Named(_)) {
                    " ON CONFLICT (id) DO NOTHING"
                } else {
                    ""
                };
                let inserted = sqlx::query(&format!(
                    "INSERT INTO sessions (id, created_at, updated_at, active_run_id, locked_at, owner, agent) \
                     VALUES ($1, $2, $2, $3, $2, $4, $5){conflict}"
                ))
                .bind(id)
                .bind(begin.now)
                .bind(begin.run_id)
                .bind(begin.owner)
                .bind(new_session_agent(begin)?)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?
                .rows_affected();
                (id, inserted == 1)
            }
        };
        let agent = if created {
            new_session_agent(begin)?.to_owned()
        } else {
            let locked: Option<(String,)> = sqlx::query_as(
                "UPDATE sessions SET active_run_id = $1, locked_at = $2, updated_at = $2, \
                 agent = CASE WHEN agent = '' THEN $7 ELSE agent END \
                 WHERE id = $3 AND (active_run_id IS NULL OR locked_at < $4) \
                 AND ($5::text IS NULL OR owner = $5) \
                 AND ($6::text IS NULL OR agent = $6 OR agent = '') \
                 RETURNING agent",
            )
            .bind(begin.run_id)
            .bind(begin.now)
            .bind(session_id)
            .bind(begin.lock_stale_before)
            .bind(begin.owner)
            .bind(begin.agent)
            .bind(begin.unbound_agent)
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::from)?;
            let Some((agent,)) = locked else {
                let holder: Option<(Option<String>, Option<String>, String)> = sqlx::query_as(
                    "SELECT active_run_id, owner, agent FROM sessions WHERE id = $1",
                )
                .bind(session_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(StoreError::from)?;
                return Err(refusal(begin.owner, begin.agent, holder));
            };
            // A run that lost its lock to staleness never finished, nor
            // did the call it was making (looked for only then: this is
            // every run's path).
            let taken_over = sqlx::query(
                "UPDATE runs SET status = 'interrupted', finished_at = $1, \
                 error_code = 'lock_expired', \
                 error_message = 'the run stopped reporting progress and its session was taken over' \
                 WHERE session_id = $2 AND status IN ('running', 'awaiting_approval')",
            )
            .bind(begin.now)
            .bind(session_id)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?
            .rows_affected();
            if taken_over > 0 {
                sqlx::query(
                    "UPDATE tool_executions SET status = 'interrupted', finished_at = $1, \
                     error = 'the run stopped reporting progress and its session was taken over' \
                     WHERE session_id = $2 AND status IN ('running', 'awaiting_approval')",
                )
                .bind(begin.now)
                .bind(session_id)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
            }
            agent
        };
        if begin.dequeue {
            // Locked first, so a refusal above left the queue as it was.
            let taken = sqlx::query("DELETE FROM queued_runs WHERE id = $1 AND status = 'pending'")
                .bind(begin.run_id)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?
                .rows_affected();
            if taken == 0 {
                return Err(BeginRunError::NotQueued);
            }
        }
        sqlx::query(
            "INSERT INTO runs (id, session_id, status, input, tokens_used, steps, created_at, kwargs, replica_id) \
             VALUES ($1, $2, 'running', $3, 0, 0, $4, $5, $6)",
        )
        .bind(begin.run_id)
        .bind(session_id)
        .bind(begin.input)
        .bind(begin.now)
        .bind(begin.kwargs)
        .bind(self.replica.as_deref())
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        let history: &[NewMessage] = if created || matches!(begin.session, SessionRef::Existing(_))
        {
            begin.history
        } else {
            &[]
        };
        // The history, then the user's message: one list, so one insert
        // in their order.
        let mut messages = Vec::with_capacity(history.len() + 1);
        messages.extend_from_slice(history);
        messages.push(NewMessage {
            role: "user",
            content: Some(begin.input.to_owned()),
            tool_calls: None,
            tool_call_id: None,
        });
        insert_messages_pg(
            &mut tx,
            &RunProgress {
                run_id: begin.run_id,
                session_id,
                messages: &messages,
                events: std::slice::from_ref(&begin.first_event),
                tokens_used: 0,
                steps: 0,
                now: begin.now,
            },
        )
        .await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(Begun { agent, created })
    }

    /// Records what a step of a run produced (assistant tool calls, tool
    /// results, events) and refreshes the session lock.
    pub async fn record_step(&self, step: &RunProgress<'_>) -> Result<(), StoreError> {
        write_with!(self, sqlite: (step = OwnedProgress::from(step)) |c| sqlite_writes::record_step(c, &step), postgres: |pool| {
            let mut tx = pool.begin().await?;
            // First, and guarded: a run ended by another replica (this
            // one's lease lapsed) gets nothing more written.
            let running = sqlx::query(
                "UPDATE runs SET tokens_used = $1, steps = $2 WHERE id = $3 AND status = 'running'",
            )
            .bind(step.tokens_used)
            .bind(step.steps)
            .bind(step.run_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if running == 0 {
                return Err(StoreError::RunTakenOver);
            }
            insert_messages!(tx, step.session_id, step.run_id, step.messages, step.now);
            insert_events!(tx, step.run_id, step.events);
            sqlx::query("UPDATE sessions SET locked_at = $1 WHERE id = $2 AND active_run_id = $3")
                .bind(step.now)
                .bind(step.session_id)
                .bind(step.run_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Closes a run with its final status, records its last messages and
    /// events, and frees the session.
    pub async fn finish_run(&self, finish: &FinishRun<'_>) -> Result<(), StoreError> {
        let progress = &finish.progress;
        write_with!(self, sqlite: (finish = OwnedFinish::from(finish)) |c| sqlite_writes::finish_run(c, &finish), postgres: |pool| {
            // One statement, so one round trip instead of six: the messages
            // and events go in as arrays, kept in their order. Every part
            // hangs on the run still `running`: one ended by another
            // replica (this one's lease lapsed) gets nothing more written.
            let messages = progress.messages;
            let events = progress.events;
            let (finished,): (i64,) = sqlx::query_as(
                "WITH run AS (\
                   UPDATE runs SET status = $12, output = $13, tokens_used = $14, steps = $15, \
                   error_code = $16, error_message = $17, finished_at = $3, \
                   input_tokens = $18, output_tokens = $19 WHERE id = $2 AND status = 'running' \
                   RETURNING id), \
                 message AS (\
                   INSERT INTO messages (session_id, run_id, role, content, tool_calls, tool_call_id, created_at) \
                   SELECT $1, $2, m.role, m.content, m.tool_calls, m.tool_call_id, $3 \
                   FROM UNNEST($4::text[], $5::text[], $6::text[], $7::text[]) \
                     WITH ORDINALITY AS m(role, content, tool_calls, tool_call_id, n) \
                   WHERE EXISTS (SELECT 1 FROM run) \
                   ORDER BY m.n), \
                 event AS (\
                   INSERT INTO run_events (run_id, seq, kind, data, created_at) \
                   SELECT $2, e.seq, e.kind, e.data, e.created_at \
                   FROM UNNEST($8::bigint[], $9::text[], $10::text[], $11::bigint[]) \
                     AS e(seq, kind, data, created_at) \
                   WHERE EXISTS (SELECT 1 FROM run)), \
                 session AS (\
                   UPDATE sessions SET active_run_id = NULL, locked_at = NULL, updated_at = $3 \
                   WHERE id = $1 AND active_run_id = $2 AND EXISTS (SELECT 1 FROM run)) \
                 SELECT count(*) FROM run",
            )
            .bind(progress.session_id)
            .bind(progress.run_id)
            .bind(progress.now)
            .bind(messages.iter().map(|m| m.role).collect::<Vec<_>>())
            .bind(messages.iter().map(|m| m.content.as_deref()).collect::<Vec<_>>())
            .bind(messages.iter().map(|m| m.tool_calls.as_deref()).collect::<Vec<_>>())
            .bind(messages.iter().map(|m| m.tool_call_id.as_deref()).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.seq).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.kind).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.data.as_str()).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.created_at).collect::<Vec<_>>())
            .bind(finish.status.as_str())
            .bind(finish.output)
            .bind(progress.tokens_used)
            .bind(progress.steps)
            .bind(finish.error.map(|e| e.0))
            .bind(finish.error.map(|e| e.1))
            .bind(finish.usage.map(|u| u.0))
            .bind(finish.usage.map(|u| u.1))
            .fetch_one(pool)
            .await?;
            if finished == 0 {
                return Err(StoreError::RunTakenOver);
            }
            Ok(())
        })
    }

    /// Records a tool call before it runs.
    pub async fn start_tool_execution(
        &self,
        call: &NewToolExecution<'_>,
    ) -> Result<(), StoreError> {
        write_with!(self, sqlite: (call = OwnedToolExecution::from(call)) |c| sqlite_writes::start_tool_execution(c, &call), postgres: |pool| {
            sqlx::query(
                "INSERT INTO tool_executions \
                 (id, session_id, run_id, call_id, tool, arguments, backend, limits, status, \
                 started_at, approval_expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, \
                 CASE WHEN $10::bigint IS NULL THEN 'running' ELSE 'awaiting_approval' END, $9, $10)",
            )
            .bind(call.id)
            .bind(call.session_id)
            .bind(call.run_id)
            .bind(call.call_id)
            .bind(call.tool)
            .bind(call.arguments)
            .bind(call.backend)
            .bind(call.limits)
            .bind(call.started_at)
            .bind(call.approval_expires_at)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// Completes the record of a tool call.
    pub async fn finish_tool_execution(
        &self,
        id: &str,
        end: &ToolExecutionEnd,
    ) -> Result<(), StoreError> {
        write_with!(self, sqlite: (owned = (id.to_owned(), end.clone())) |c| sqlite_writes::finish_tool_execution(c, &owned.0, &owned.1), postgres: |pool| {
            sqlx::query(
                "UPDATE tool_executions SET status = $1, finished_at = $2, exit_code = $3, signal = $4, \
                 killed_reason = $5, limits_hit = $6, stdout_bytes = $7, stderr_bytes = $8, \
                 stdout_truncated = $9, stderr_truncated = $10, stdout_sha256 = $11, \
                 stderr_sha256 = $12, duration_ms = $13, error = $14, egress_refusals = $15 WHERE id = $16",
            )
            .bind(end.status)
            .bind(end.finished_at)
            .bind(end.exit_code)
            .bind(end.signal)
            .bind(end.killed_reason.as_deref())
            .bind(end.limits_hit.as_deref())
            .bind(end.stdout_bytes)
            .bind(end.stderr_bytes)
            .bind(end.stdout_truncated)
            .bind(end.stderr_truncated)
            .bind(end.stdout_sha256.as_deref())
            .bind(end.stderr_sha256.as_deref())
            .bind(end.duration_ms)
            .bind(end.error.as_deref())
            .bind(end.egress_refusals.as_deref())
            .bind(id)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// A session's tool calls, oldest first.
    pub async fn tool_executions(
        &self,
        session_id: &str,
    ) -> Result<Vec<ToolExecution>, StoreError> {
        with_reader!(self, |pool| {
            Ok(sqlx::query_as::<_, ToolExecution>(
                "SELECT id, session_id, run_id, call_id, tool, arguments, backend, limits, status, \
                 started_at, finished_at, exit_code, signal, killed_reason, limits_hit, stdout_bytes, \
                 stderr_bytes, stdout_truncated, stderr_truncated, stdout_sha256, stderr_sha256, \
                 duration_ms, error, egress_refusals, approval_expires_at, approval_decision, \
                 approval_decided_by, approval_decided_at, approval_comment \
                 FROM tool_executions WHERE session_id = $1 ORDER BY started_at, id",
            )
            .bind(session_id)
            .fetch_all(pool)
            .await?)
        })
    }

    pub async fn session(&self, id: &str) -> Result<Option<Session>, StoreError> {
        with_reader!(self, |pool| {
            Ok(sqlx::query_as::<_, Session>(
                "SELECT id, created_at, updated_at, active_run_id, owner, agent, metadata FROM sessions WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?)
        })
    }

    /// The conversation of a session, oldest first.
    pub async fn messages(&self, session_id: &str) -> Result<Vec<Message>, StoreError> {
        with_reader!(self, |pool| {
            Ok(sqlx::query_as::<_, Message>(
                "SELECT id, session_id, run_id, role, content, tool_calls, tool_call_id, created_at \
                 FROM messages WHERE session_id = $1 ORDER BY id",
            )
            .bind(session_id)
            .fetch_all(pool)
            .await?)
        })
    }

    /// The runs of a session, oldest first.
    pub async fn runs(&self, session_id: &str) -> Result<Vec<Run>, StoreError> {
        with_reader!(self, |pool| {
            Ok(sqlx::query_as::<_, Run>(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE session_id = $1 ORDER BY created_at, id"
            ))
            .bind(session_id)
            .fetch_all(pool)
            .await?)
        })
    }

    pub async fn run(&self, id: &str) -> Result<Option<Run>, StoreError> {
        with_reader!(self, |pool| {
            Ok(
                sqlx::query_as::<_, Run>(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(pool)
                    .await?,
            )
        })
    }

    /// The events of a run with a sequence number above `after`, in order.
    pub async fn run_events(&self, run_id: &str, after: i64) -> Result<Vec<RunEvent>, StoreError> {
        with_reader!(self, |pool| {
            Ok(sqlx::query_as::<_, RunEvent>(
                "SELECT run_id, seq, kind, data, created_at FROM run_events \
                 WHERE run_id = $1 AND seq > $2 ORDER BY seq",
            )
            .bind(run_id)
            .bind(after)
            .fetch_all(pool)
            .await?)
        })
    }

    /// Deletes a session with its messages, runs and events, unless a run
    /// holds it.
    pub async fn delete_session(&self, id: &str) -> Result<DeleteOutcome, StoreError> {
        write_with!(self, sqlite: (id = id.to_owned()) |c| sqlite_writes::delete_session(c, &id), postgres: |pool| {
            let mut tx = pool.begin().await?;
            let deleted =
                sqlx::query("DELETE FROM sessions WHERE id = $1 AND active_run_id IS NULL")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            let outcome = if deleted == 1 {
                DeleteOutcome::Deleted
            } else {
                let exists: Option<(String,)> =
                    sqlx::query_as("SELECT id FROM sessions WHERE id = $1")
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?;
                if exists.is_some() {
                    DeleteOutcome::Busy
                } else {
                    DeleteOutcome::NotFound
                }
            };
            tx.commit().await?;
            Ok(outcome)
        })
    }
}

/// Inserts a step's messages and events inside a PostgreSQL transaction.
pub(crate) async fn insert_messages_pg(
    tx: &mut sqlx::PgConnection,
    step: &RunProgress<'_>,
) -> Result<(), StoreError> {
    insert_messages!(tx, step.session_id, step.run_id, step.messages, step.now);
    insert_events!(tx, step.run_id, step.events);
    Ok(())
}

/// The agent a new session is opened for: always named by the engine.
fn new_session_agent<'a>(begin: &BeginRun<'a>) -> Result<&'a str, BeginRunError> {
    begin.agent.ok_or_else(|| {
        BeginRunError::Store(StoreError::WriterFailed(
            "a new session needs an agent".into(),
        ))
    })
}

/// Why an existing session could not be locked, from what holds it
/// (`active_run_id`, `owner`, `agent`; `None`: no such session).
pub(crate) fn refusal(
    caller: Option<&str>,
    agent: Option<&str>,
    holder: Option<(Option<String>, Option<String>, String)>,
) -> BeginRunError {
    match holder {
        None => BeginRunError::SessionNotFound,
        Some((_, owner, _)) if !reaches(caller, owner.as_deref()) => BeginRunError::SessionNotFound,
        Some((_, _, held_by)) if !held_by.is_empty() && agent.is_some_and(|a| a != held_by) => {
            BeginRunError::WrongAgent { agent: held_by }
        }
        Some((active_run_id, _, _)) => BeginRunError::SessionBusy {
            active_run_id: active_run_id.unwrap_or_default(),
        },
    }
}

/// Frees the sessions of runs a previous process left, except those held
/// by a run waiting for a person: that pause outlives restarts.
pub(crate) const RELEASE_ABANDONED_SESSIONS: &str = "UPDATE sessions SET active_run_id = NULL, locked_at = NULL \
     WHERE active_run_id IS NOT NULL \
     AND active_run_id NOT IN (SELECT id FROM runs WHERE status = 'awaiting_approval')";

/// Whether a caller of tenant `caller` (`None`: authentication off) may
/// reach a session owned by `owner`.
pub fn reaches(caller: Option<&str>, owner: Option<&str>) -> bool {
    match caller {
        None => true,
        Some(tenant) => owner == Some(tenant),
    }
}

const RUN_COLUMNS: &str = "id, session_id, status, input, output, tokens_used, steps, \
    error_code, error_message, created_at, finished_at, kwargs, input_tokens, output_tokens";

/// The file an `sqlite:` URL keeps its database in; `None` for an
/// in-memory database and for PostgreSQL. What a server locks so that one
/// process at a time owns the file.
pub fn sqlite_file(url: &str) -> Result<Option<std::path::PathBuf>, StoreError> {
    if Backend::from_url(url)? != Backend::Sqlite {
        return Ok(None);
    }
    let (_, file) = sqlite_options(url)?;
    Ok(file)
}

/// The connection options of an `sqlite:` URL and its file (`None` when in
/// memory).
fn sqlite_options(
    url: &str,
) -> Result<(SqliteConnectOptions, Option<std::path::PathBuf>), StoreError> {
    let connect = SqliteConnectOptions::from_str(url)
        .map_err(|e| StoreError::InvalidUrl(e.to_string()))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // WAL + NORMAL: a commit survives a process crash; only an OS crash
        // or power loss can drop the last transactions. Documented in README.
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
    let filename = connect.get_filename().to_string_lossy().into_owned();
    // sqlx names an in-memory database itself (`file:sqlx-in-memory-N`),
    // so the URL, not the parsed file name, says whether it is one.
    let in_memory = filename.is_empty() || url.contains(":memory:") || url.contains("mode=memory");
    let file = (!in_memory).then(|| std::path::PathBuf::from(filename));
    Ok((connect, file))
}

/// What a failure to create or open a path means: a refusal (permissions,
/// a read-only filesystem) is `NotWritable`, which no retry heals.
fn io_refusal(path: &std::path::Path, source: std::io::Error) -> StoreError {
    use std::io::ErrorKind::{PermissionDenied, ReadOnlyFilesystem};
    if matches!(source.kind(), PermissionDenied | ReadOnlyFilesystem) {
        StoreError::NotWritable {
            path: path.to_path_buf(),
            source,
        }
    } else {
        StoreError::CreateDir {
            path: path.display().to_string(),
            source,
        }
    }
}

async fn connect_sqlite(url: &str, options: &StoreOptions) -> Result<Pools, StoreError> {
    let (mut connect, file) = sqlite_options(url)?;
    let mut memory = None;
    let path = if let Some(path) = file {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|e| io_refusal(parent, e))?;
        }
        // SQLite's own answer to a file it may not write is "unable to open
        // database file", without the reason: ask the system first.
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_refusal(&path, e))?;
        path
    } else {
        // The writer and the readers are separate connections, and each
        // would see its own empty in-memory database: hold it in a file of
        // its own that goes when the store does.
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-memory-")
            .tempdir()
            .map_err(|source| StoreError::CreateDir {
                path: std::env::temp_dir().display().to_string(),
                source,
            })?;
        let path = dir.path().join("bulkhead.db");
        // Fresh options: those parsed from the URL say "in memory".
        connect = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        memory = Some(Arc::new(dir));
        path
    };
    // The writer creates the file and switches it to WAL before any reader
    // opens it read-only.
    let writer = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || Writer::open(&path))
            .await
            .map_err(|e| StoreError::WriterFailed(e.to_string()))??
    };
    let read = SqlitePoolOptions::new()
        .max_connections(options.max_connections.max(1))
        .acquire_timeout(options.acquire_timeout)
        .connect_with(connect.clone().read_only(true))
        .await?;
    Ok(Pools::Sqlite {
        read,
        writer: Arc::new(writer),
        connect: Arc::new(connect),
        _memory: memory,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sqlite::memory:` still means one database for the writer and every
    /// reader, gone with the store.
    #[tokio::test]
    async fn an_in_memory_database_is_shared_and_temporary() {
        let store = Store::connect("sqlite::memory:", &StoreOptions::default())
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let Pools::Sqlite {
            _memory: Some(dir), ..
        } = &store.pools
        else {
            panic!("an in-memory database has its own folder");
        };
        let folder = dir.path().to_path_buf();
        let event = NewEvent {
            seq: 1,
            kind: "run_started",
            data: "{}".into(),
            created_at: 1,
        };
        store
            .begin_run(&BeginRun {
                session: SessionRef::New("s1"),
                owner: None,
                agent: Some("default"),
                run_id: "r1",
                input: "hello",
                history: &[],
                unbound_agent: "default",
                dequeue: false,
                kwargs: None,
                now: 1,
                lock_stale_before: 0,
                first_event: event,
            })
            .await
            .unwrap();
        assert_eq!(store.messages("s1").await.unwrap().len(), 1);
        assert_eq!(store.run("r1").await.unwrap().unwrap().status, "running");
        store.close().await;
        drop(store);
        assert!(
            !folder.exists(),
            "the in-memory database's folder is removed"
        );
    }

    /// A database made before the tables were rebuilt keeps every row, its
    /// keys and its cascades through the rebuild.
    #[tokio::test]
    async fn sqlite_rebuild_keeps_existing_rows() {
        use sqlx::Connection as _;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/old.db", dir.path().display());
        let options = SqliteConnectOptions::from_str(&url)
            .unwrap()
            .create_if_missing(true)
            .foreign_keys(true);
        let mut old = sqlx::SqliteConnection::connect_with(&options)
            .await
            .unwrap();
        let all = sqlx::migrate!("migrations/sqlite");
        let before_rebuild = sqlx::migrate::Migrator {
            migrations: std::borrow::Cow::Owned(all.migrations[..2].to_vec()),
            ..sqlx::migrate::Migrator::DEFAULT
        };
        before_rebuild.run(&mut old).await.unwrap();
        for statement in [
            "INSERT INTO sessions VALUES ('s1', 1, 2, NULL, NULL)",
            "INSERT INTO sessions VALUES ('s2', 1, 2, 'r2', 5)",
            "INSERT INTO runs (id, session_id, status, input, output, tokens_used, steps, created_at, finished_at) \
             VALUES ('r1', 's1', 'completed', 'hi', 'hello', 3, 1, 1, 2)",
            "INSERT INTO runs (id, session_id, status, input, created_at) VALUES ('r2', 's2', 'running', 'yo', 3)",
            "INSERT INTO messages (session_id, run_id, role, content, created_at) VALUES ('s1', 'r1', 'user', 'hi', 1)",
            "INSERT INTO run_events VALUES ('r1', 1, 'run_started', '{}', 1)",
            "INSERT INTO run_events VALUES ('r1', 2, 'run_completed', '{}', 2)",
            "INSERT INTO tool_executions (id, session_id, run_id, call_id, tool, arguments, backend, status, started_at) \
             VALUES ('t1', 's1', 'r1', 'c1', 'shell', '{}', 'namespace', 'completed', 1)",
        ] {
            sqlx::query(statement).execute(&mut old).await.unwrap();
        }
        old.close().await.unwrap();

        let store = Store::connect(&url, &StoreOptions::default())
            .await
            .unwrap();
        assert_eq!(store.migrate().await.unwrap(), 8);
        let run = store.run("r1").await.unwrap().unwrap();
        // A call recorded before egress refusals were kept has none.
        let calls = store.tool_executions("s1").await.unwrap();
        assert_eq!(
            (calls.len(), calls[0].egress_refusals.as_deref()),
            (1, None)
        );
        assert_eq!(
            (run.status.as_str(), run.output.as_deref()),
            ("completed", Some("hello"))
        );
        assert_eq!(store.run_events("r1", 0).await.unwrap().len(), 2);
        assert_eq!(store.messages("s1").await.unwrap().len(), 1);
        // The running run is found through the new partial index.
        assert_eq!(store.recover_abandoned_runs(10).await.unwrap(), 1);
        // Cascades still reach the rebuilt tables.
        assert_eq!(
            store.delete_session("s1").await.unwrap(),
            DeleteOutcome::Deleted
        );
        assert!(store.run("r1").await.unwrap().is_none());
        assert!(store.run_events("r1", 0).await.unwrap().is_empty());
        assert!(store.messages("s1").await.unwrap().is_empty());
        store.close().await;
    }
}
