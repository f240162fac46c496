//! One server per data. A server assumes it alone uses its SQLite file (at
//! start it marks every run still `running` as interrupted) and its local
//! sandbox root (at start it removes every sandbox there as an orphan). A
//! second server on the same data would do both to the first one's live
//! work, so each takes an advisory lock (`flock`) on a file beside its data
//! before touching anything, holds it for its whole life, and writes its
//! pid there for the message the next one gives. The kernel drops the lock
//! when the process dies, however it dies: a stale file blocks nobody.
//!
//! Taking the lock is also the server's first write to its data folders,
//! so a folder it may not write stops start-up here, with the reason.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, Write};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Held for the life of the server; dropping it releases the lock.
#[derive(Debug)]
pub struct DataLock {
    _file: Flock<File>,
}

/// Locks an SQLite database file, through a lock file beside it (so that
/// it covers the file wherever `DATABASE_URL` puts it).
pub fn lock_database(database: &Path) -> anyhow::Result<DataLock> {
    let mut name = database.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    lock(database, &database.with_file_name(name), "DATABASE_URL")
}

/// Locks a local sandbox root; the lock file's leading dot keeps it out of
/// the orphan sweep, which skips names no sandbox id can have.
pub fn lock_sandbox_root(root: &Path) -> anyhow::Result<DataLock> {
    lock(root, &root.join(".lock"), "SANDBOX_ROOT")
}

/// Locks `path` (made with its folder if missing) for this process, on
/// behalf of `data`, which `variable` chose.
fn lock(data: &Path, path: &Path, variable: &str) -> anyhow::Result<DataLock> {
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let (data, path) = (absolute(data), absolute(path));
    let folder = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    std::fs::create_dir_all(&folder).map_err(|e| {
        // What needs fixing is the deepest folder that exists.
        let existing = folder.ancestors().find(|a| a.is_dir()).unwrap_or(&folder);
        refused(&folder, existing, variable, &e)
    })?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| refused(&path, &folder, variable, &e))?;
    let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => locked,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let holder = match pid.trim() {
                "" => "another bulkhead server".to_string(),
                pid => format!("another bulkhead server (pid {pid})"),
            };
            anyhow::bail!(
                "{holder} is using {}: stop it first, or give this one its own {variable}",
                data.display()
            );
        }
        Err((_, errno)) => anyhow::bail!("{variable}: cannot lock {}: {errno}", path.display()),
    };
    let written = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()));
    if let Err(e) = written {
        return Err(refused(&path, &folder, variable, &e));
    }
    Ok(DataLock { _file: file })
}

/// One line for a path this process may not create or write: which, as
/// whom, why, and what would fix it.
pub fn refused(
    path: &Path,
    folder: &Path,
    variable: &str,
    error: &std::io::Error,
) -> anyhow::Error {
    let uid = nix::unistd::geteuid();
    let path = path.display();
    let folder = folder.display();
    match error.kind() {
        ErrorKind::PermissionDenied => anyhow::anyhow!(
            "{variable}: cannot write {path} as uid {uid}: permission denied. Make {folder} \
             writable for uid {uid} (chown -R {uid} {folder}; with `docker run --tmpfs {folder}`, \
             add :uid={uid}), or point {variable} at a folder it can write"
        ),
        ErrorKind::ReadOnlyFilesystem => anyhow::anyhow!(
            "{variable}: cannot write {path} as uid {uid}: read-only file system. Mount a \
             writable volume at {folder}, or point {variable} at a writable folder"
        ),
        _ => anyhow::anyhow!("{variable}: cannot create {path}: {error}"),
    }
}
