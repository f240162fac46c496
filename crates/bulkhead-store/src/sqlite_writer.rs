//! SQLite's single writer: one thread that owns the only writing connection
//! and commits whatever writes are queued when it wakes in one transaction.
//!
//! Why not sqlx for writes: sqlx runs each SQLite connection on a worker
//! thread of its own and hands every *statement* across a channel, so a run's
//! ten or so statements cost ten or so thread rendezvous, and profiles of
//! `/agent` showed the server spending most of its time switching threads
//! rather than in SQLite. Here a whole unit of work (a closure) crosses once,
//! runs against kept prepared statements, and the units queued meanwhile
//! share one `COMMIT` (group commit). A unit that fails (an error, not a
//! refusal such as a busy session, which writes nothing) makes the writer roll
//! the batch back and run each of its units again in a transaction of its
//! own, so one failure costs its batch time, never its writes. (Savepoints
//! per unit would do the same, but copy every page a unit touches into a
//! sub-journal first; that was a quarter of the writer's time.) A caller
//! hears back only once the transaction holding its unit has committed:
//! nothing is acknowledged before it is stored.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::{Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use crate::StoreError;

/// Most units committed together; bounds the latency one batch adds.
const MAX_BATCH: usize = 256;

/// A unit of work: run inside the batch, answered after the commit. It may
/// run twice (after a batch rolled back), so it only reads what it captured.
trait Unit: Send {
    /// Runs the unit; `false` when it failed and what it wrote must go.
    fn run(&mut self, connection: &Connection) -> bool;
    /// Sends the outcome: the unit's own result if the batch committed.
    fn answer(self: Box<Self>, committed: Result<(), &BatchError>);
}

struct Task<F, R, E> {
    work: F,
    result: Option<Result<R, E>>,
    reply: oneshot::Sender<Result<R, E>>,
}

impl<F, R, E> Unit for Task<F, R, E>
where
    F: Fn(&Connection) -> Result<R, E> + Send,
    R: Send,
    E: From<StoreError> + Send,
{
    fn run(&mut self, connection: &Connection) -> bool {
        // A panicking unit must not take the writer, and with it every later
        // write, down with it.
        match catch_unwind(AssertUnwindSafe(|| (self.work)(connection))) {
            Ok(result) => {
                let ok = result.is_ok();
                self.result = Some(result);
                ok
            }
            Err(_) => {
                tracing::error!("a database write panicked; it was rolled back");
                self.result = Some(Err(StoreError::WriterFailed(
                    "a database write failed unexpectedly".into(),
                )
                .into()));
                false
            }
        }
    }

    fn answer(self: Box<Self>, committed: Result<(), &BatchError>) {
        let result = match (committed, self.result) {
            (Ok(()), Some(result)) => result,
            // A failed unit's own error says more than the batch's.
            (Err(_), Some(Err(e))) => Err(e),
            (Err(e), _) => Err(StoreError::WriterFailed(format!("commit failed: {e}")).into()),
            (Ok(()), None) => Err(StoreError::WriterFailed("the write did not run".into()).into()),
        };
        // The caller may have gone away (its request was dropped); the write
        // stands regardless.
        let _ = self.reply.send(result);
    }
}

/// The handle callers hold; the thread stops once it is closed.
pub(crate) struct Writer {
    units: Mutex<Option<mpsc::Sender<Box<dyn Unit>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Writer {
    /// Opens the database file for writing and starts the writer thread.
    pub(crate) fn open(path: &Path) -> Result<Writer, StoreError> {
        let connection = open_connection(path)?;
        let (sender, receiver) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || serve(connection, receiver))
            .map_err(|e| StoreError::WriterFailed(format!("could not start the writer: {e}")))?;
        Ok(Writer {
            units: Mutex::new(Some(sender)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Runs `work` in the writer's next batch; resolves once it committed.
    pub(crate) async fn write<F, R, E>(&self, work: F) -> Result<R, E>
    where
        F: Fn(&Connection) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let unit: Box<dyn Unit> = Box::new(Task {
            work,
            result: None,
            reply,
        });
        let sent = match &*self.units.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(units) => units.send(unit).is_ok(),
            None => false,
        };
        if !sent {
            return Err(StoreError::Closed.into());
        }
        answer
            .await
            .unwrap_or_else(|_| Err(StoreError::WriterFailed("the writer stopped".into()).into()))
    }

    /// Lets the writer finish what is queued, then stops it.
    pub(crate) async fn close(&self) {
        self.units.lock().unwrap_or_else(|e| e.into_inner()).take();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    connection.busy_timeout(Duration::from_secs(10))?;
    // Same settings as the readers: WAL, and NORMAL so that a commit is a
    // write to the log, not an fsync (a process crash loses nothing
    // committed; see README).
    connection.pragma_update(None, "journal_mode", "wal")?;
    connection.pragma_update(None, "synchronous", "normal")?;
    connection.pragma_update(None, "foreign_keys", "on")?;
    // Statement journals (kept while a statement may still abort) in memory,
    // not in temporary files.
    connection.pragma_update(None, "temp_store", "memory")?;
    connection.set_prepared_statement_cache_capacity(64);
    Ok(connection)
}

fn serve(connection: Connection, units: mpsc::Receiver<Box<dyn Unit>>) {
    let mut batch: Vec<Box<dyn Unit>> = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = units.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match units.try_recv() {
                Ok(unit) => batch.push(unit),
                Err(_) => break,
            }
        }
        match run_together(&connection, &mut batch) {
            Ok(()) => {
                for unit in batch.drain(..) {
                    unit.answer(Ok(()));
                }
            }
            // The database itself refused (the write lock not had within the
            // busy timeout, a full disk at commit): running the units one by
            // one would meet the same refusal once per unit.
            Err(e @ BatchError::Sqlite(_)) => {
                tracing::error!(error = %e, units = batch.len(), "database writes could not be committed");
                for unit in batch.drain(..) {
                    unit.answer(Err(&e));
                }
            }
            Err(BatchError::UnitFailed) => {
                if batch.len() > 1 {
                    tracing::debug!("a write failed; the others of its batch run one by one");
                }
                for mut unit in batch.drain(..) {
                    let committed = run_together(&connection, std::slice::from_mut(&mut unit));
                    if let Err(e) = &committed
                        && !matches!(e, BatchError::UnitFailed)
                    {
                        tracing::error!(error = %e, "a database write could not be committed");
                    }
                    unit.answer(committed.as_ref().map(|_| ()));
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error("a write failed")]
    UnitFailed,
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

/// Runs `units` in one transaction; rolls all of them back if one fails.
fn run_together(connection: &Connection, units: &mut [Box<dyn Unit>]) -> Result<(), BatchError> {
    connection.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    let outcome = (|| {
        for unit in units.iter_mut() {
            if !unit.run(connection) {
                return Err(BatchError::UnitFailed);
            }
        }
        connection.prepare_cached("COMMIT")?.execute([])?;
        Ok(())
    })();
    if outcome.is_err() && !connection.is_autocommit() {
        let _ = connection.execute_batch("ROLLBACK");
    }
    outcome
}
