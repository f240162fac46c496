//! The helper process, host side. Single-threaded by construction (it is a
//! fresh process that starts no threads), so `fork` is sound here.
//!
//! ```text
//! helper (host)                 ── cgroup, uid maps, output caps, timeout
//!   └─ child (new user/mnt/net/ipc/uts ns, root inside = an unprivileged
//!        │    host uid; in the cgroup)
//!        └─ init, PID 1 of the new pid ns  ── mounts, pivot_root, reaps
//!             └─ the program (nested user ns: uid 1000, no capabilities,
//!                  no_new_privs, seccomp, landlock)
//! ```

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, fork, pipe2};

use super::cgroup::Cgroup;
use super::hosting;
use super::inside::{self, InitStatus};
use super::process::{MAX_REQUEST, PROCESS_MARK, ProcessReport};
use super::{HelperReport, HelperRequest, Task};
use crate::output::OutputCapture;
use crate::{ExecResult, KilledReason, Operation};

/// Entry point of the helper process: reads a request on stdin and either
/// runs an operation (one report on stdout) or hosts a program (reports on
/// stderr, see `process.rs`), then exits.
pub fn helper_main() -> ! {
    match read_request() {
        Incoming::Process(Ok(request)) => hosting::host(&request),
        Incoming::Process(Err(reason)) => {
            hosting::send(&ProcessReport::Unavailable(reason));
            std::process::exit(0)
        }
        Incoming::Operation(request) => {
            let report = match request {
                Ok(request) => match run(&request) {
                    Ok(result) => HelperReport::Finished(result),
                    Err(reason) => HelperReport::Unavailable(reason),
                },
                Err(reason) => HelperReport::Unavailable(reason),
            };
            let mut stdout = std::io::stdout().lock();
            let _ = serde_json::to_writer(&mut stdout, &report);
            let _ = stdout.flush();
            std::process::exit(0)
        }
    }
}

enum Incoming {
    Operation(Result<HelperRequest, String>),
    Process(Result<HelperRequest, String>),
}

/// Reads stdin byte by byte where it matters: in process mode, what follows
/// the request is the program's input and must be left unread.
fn read_request() -> Incoming {
    let mut first = [0u8; 1];
    if let Err(e) = read_exact_unbuffered(&mut first) {
        return Incoming::Operation(Err(format!("cannot read the request: {e}")));
    }
    if first[0] != PROCESS_MARK {
        let mut body = first.to_vec();
        let request = std::io::stdin()
            .read_to_end(&mut body)
            .map_err(|e| format!("cannot read the request: {e}"))
            .and_then(|_| {
                serde_json::from_slice(&body).map_err(|e| format!("invalid request: {e}"))
            });
        return Incoming::Operation(request);
    }
    Incoming::Process(read_process_request())
}

fn read_process_request() -> Result<HelperRequest, String> {
    let mut digits = String::new();
    loop {
        let mut byte = [0u8; 1];
        read_exact_unbuffered(&mut byte).map_err(|e| format!("cannot read the request: {e}"))?;
        match byte[0] {
            b'\n' => break,
            digit @ b'0'..=b'9' if digits.len() < 10 => digits.push(digit as char),
            _ => return Err("invalid request header".into()),
        }
    }
    let length: usize = digits
        .parse()
        .map_err(|_| "invalid request header".to_string())?;
    if length > MAX_REQUEST {
        return Err(format!("the request is over {MAX_REQUEST} bytes"));
    }
    let mut body = vec![0u8; length];
    read_exact_unbuffered(&mut body).map_err(|e| format!("cannot read the request: {e}"))?;
    let request: HelperRequest =
        serde_json::from_slice(&body).map_err(|e| format!("invalid request: {e}"))?;
    if !matches!(request.task, Task::Process(_)) {
        return Err("a process request that names no program".into());
    }
    Ok(request)
}

/// `read_exact` on fd 0 itself, past std's buffered `Stdin`.
fn read_exact_unbuffered(mut buffer: &mut [u8]) -> std::io::Result<()> {
    let stdin = std::io::stdin();
    while !buffer.is_empty() {
        match nix::unistd::read(stdin.as_fd(), buffer) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buffer = &mut buffer[n..],
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

pub(super) fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))
}

/// The file descriptors the child side needs, by raw number (they are
/// inherited across fork; the child owns its copies).
pub(crate) struct ChildFds {
    /// A hosted program's input (the helper's own stdin); operations get
    /// /dev/null.
    pub stdin: Option<RawFd>,
    pub stdout: RawFd,
    pub stderr: RawFd,
    /// Init reports the program's status here.
    pub status: RawFd,
    /// The child writes one byte when it has unshared…
    pub unshared: RawFd,
    /// …and waits for one byte once its ids are mapped.
    pub mapped: RawFd,
}

/// A host path a sandbox mounts, taken hold of by the helper with the
/// server's own credentials. Inside its user namespace the sandbox's root
/// is an unprivileged host uid, which may not pass through a private folder
/// above the path (a root server started in a `mktemp -d` folder, mode
/// 0700, or in a home folder of mode 0750): a detached copy of the mount,
/// made here, needs no path walk there, and the user's folders keep their
/// permissions.
pub(crate) enum MountSource {
    /// `open_tree(OPEN_TREE_CLONE)`: attached inside with `move_mount`.
    Tree(OwnedFd),
    /// Not root: the sandbox's root is the server's own uid, which can walk
    /// any path the server can; bound by its absolute path.
    Path(std::path::PathBuf),
}

impl MountSource {
    fn take(path: &std::path::Path) -> Result<MountSource, String> {
        let shown = |e: std::io::Error| format!("cannot open {}: {e}", path.display());
        if !nix::unistd::geteuid().is_root() {
            return path.canonicalize().map(MountSource::Path).map_err(shown);
        }
        let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| format!("{}: a path with a NUL byte", path.display()))?;
        // SAFETY: a plain syscall with a valid C string; the descriptor it
        // returns is owned from here on.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(shown(std::io::Error::last_os_error()));
        }
        // SAFETY: a descriptor just returned to this process.
        Ok(MountSource::Tree(unsafe {
            OwnedFd::from_raw_fd(fd as RawFd)
        }))
    }

    pub(crate) fn fd(&self) -> Option<RawFd> {
        match self {
            MountSource::Tree(fd) => Some(fd.as_raw_fd()),
            MountSource::Path(_) => None,
        }
    }
}

/// What the child mounts from the host.
pub(crate) struct Mounts {
    /// The new root's mount point, relative to the state folder, which the
    /// child makes its working directory before leaving the host's user
    /// namespace (see [`MountSource`]).
    pub root: std::path::PathBuf,
    pub workspace: MountSource,
    pub egress: Option<MountSource>,
}

fn run(request: &HelperRequest) -> Result<ExecResult, String> {
    in_sandbox(request, |cgroup, mounts| {
        run_with_root(request, cgroup, mounts)
    })
}

/// Runs `body` with the request's cgroup made and its mounts taken hold of;
/// removes them after.
pub(super) fn in_sandbox<T>(
    request: &HelperRequest,
    body: impl FnOnce(&Cgroup, &Mounts) -> Result<T, String>,
) -> Result<T, String> {
    let cgroup = Cgroup::create(&request.cgroup, &request.run_id, &request.limits)
        .map_err(|e| no_cgroup(&request.cgroup, &e))?;
    let result = with_root(request, &cgroup, body);
    cgroup.remove();
    result
}

fn with_root<T>(
    request: &HelperRequest,
    cgroup: &Cgroup,
    body: impl FnOnce(&Cgroup, &Mounts) -> Result<T, String>,
) -> Result<T, String> {
    let name = format!("root-{}", request.run_id);
    let root = request.state_dir.join(&name);
    let mounts = Mounts {
        root: name.into(),
        workspace: MountSource::take(&request.workspace)?,
        egress: request
            .egress_socket
            .as_deref()
            .map(MountSource::take)
            .transpose()?,
    };
    std::fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    let result = body(cgroup, &mounts);
    let _ = std::fs::remove_dir(&root);
    result
}

/// The helper's ends of a sandbox it has started.
pub(super) struct Launched {
    pub child: Pid,
    /// The program's stdout, for an operation (a hosted program has the
    /// helper's own).
    pub stdout: Option<OwnedFd>,
    pub stderr: OwnedFd,
    pub status: OwnedFd,
}

/// Forks the child that unshares the namespaces, maps its ids, puts it in
/// the cgroup and lets it go on to start init and the program. `hosted`:
/// the program gets the helper's own stdin and stdout.
pub(super) fn launch(
    request: &HelperRequest,
    cgroup: &Cgroup,
    mounts: &Mounts,
    hosted: bool,
) -> Result<Launched, String> {
    let (stdout_r, stdout_w) = if hosted {
        (None, None)
    } else {
        let (r, w) = pipe()?;
        (Some(r), Some(w))
    };
    let (stderr_r, stderr_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    let (unshared_r, unshared_w) = pipe()?;
    let (mapped_r, mapped_w) = pipe()?;

    // SAFETY: the helper is single-threaded (no runtime, no threads), so the
    // child may do anything after fork.
    let child = match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop((stdout_r, stderr_r, status_r, unshared_r, mapped_w));
            let fds = ChildFds {
                stdin: hosted.then_some(0),
                stdout: stdout_w.as_ref().map_or(1, |fd| fd.as_raw_fd()),
                stderr: stderr_w.as_raw_fd(),
                status: status_w.as_raw_fd(),
                unshared: unshared_w.as_raw_fd(),
                mapped: mapped_r.as_raw_fd(),
            };
            inside::child_main(request, mounts, &fds)
        }
        ForkResult::Parent { child } => child,
    };
    drop((stdout_w, stderr_w, status_w, unshared_w, mapped_r));

    let setup = (|| {
        wait_byte(&unshared_r, Duration::from_secs(10))
            .map_err(|e| format!("the sandbox did not start: {e}"))?;
        map_ids(child, request.host_uid, request.host_gid)?;
        cgroup
            .add(child.as_raw())
            .map_err(|e| format!("cannot apply resource limits: {e}"))?;
        nix::unistd::write(&mapped_w, b"g")
            .map_err(|e| format!("cannot release the sandbox: {e}"))?;
        Ok::<(), String>(())
    })();
    if let Err(reason) = setup {
        let _ = kill(child, Signal::SIGKILL);
        let _ = waitpid(child, None);
        return Err(reason);
    }
    Ok(Launched {
        child,
        stdout: stdout_r,
        stderr: stderr_r,
        status: status_r,
    })
}

fn run_with_root(
    request: &HelperRequest,
    cgroup: &Cgroup,
    mounts: &Mounts,
) -> Result<ExecResult, String> {
    let started = Instant::now();
    let timeout = match &request.task {
        Task::Operation(Operation::Exec {
            timeout: Some(t), ..
        }) => (*t).min(request.limits.timeout),
        _ => request.limits.timeout,
    };
    let Launched {
        child,
        stdout: stdout_r,
        stderr: stderr_r,
        status: status_r,
    } = launch(request, cgroup, mounts, false)?;
    let stdout_r = stdout_r.expect("an operation's stdout pipe");

    let mut stdout = OutputCapture::new(request.limits.output_bytes);
    let mut stderr = OutputCapture::new(request.limits.output_bytes);
    let mut status_bytes = Vec::new();
    let flood = request.limits.output_flood_bytes();
    let deadline = started + timeout;
    let mut killed = None;
    let mut open = [Some(stdout_r), Some(stderr_r), Some(status_r)];
    let mut buffer = vec![0u8; 64 << 10];
    while open.iter().any(Option::is_some) {
        let now = Instant::now();
        if now >= deadline && killed.is_none() {
            killed = Some(KilledReason::Timeout);
            kill_everything(child, cgroup);
        }
        let wait = if killed.is_some() {
            // Killed: the pipes close as the processes die.
            Duration::from_millis(100)
        } else {
            deadline - now
        };
        let mut fds: Vec<PollFd> = open
            .iter()
            .flatten()
            .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
            .collect();
        let ready = poll(
            &mut fds,
            PollTimeout::try_from(wait.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX),
        );
        let revents: Vec<bool> = fds
            .iter()
            .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        match ready {
            Ok(0) => {
                if killed.is_some() {
                    // Whatever still holds a pipe is gone or going; stop.
                    break;
                }
                continue;
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
        let mut slot_of_ready = open
            .iter()
            .enumerate()
            .filter(|(_, fd)| fd.is_some())
            .map(|(slot, _)| slot)
            .zip(revents)
            .filter(|(_, ready)| *ready)
            .map(|(slot, _)| slot)
            .collect::<Vec<_>>();
        for slot in slot_of_ready.drain(..) {
            let fd = open[slot].as_ref().expect("open slot");
            match nix::unistd::read(fd, &mut buffer) {
                Ok(0) => open[slot] = None,
                Ok(n) => match slot {
                    0 => stdout.push(&buffer[..n]),
                    1 => stderr.push(&buffer[..n]),
                    _ => status_bytes.extend_from_slice(&buffer[..n.min(4096)]),
                },
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                Err(_) => open[slot] = None,
            }
        }
        if killed.is_none() && stdout.total() + stderr.total() > flood {
            killed = Some(KilledReason::OutputLimit);
            kill_everything(child, cgroup);
        }
    }
    let _ = waitpid(child, None);
    let duration_ms = started.elapsed().as_millis() as u64;

    let mut status = None;
    for line in status_bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
    {
        match serde_json::from_slice::<InitStatus>(line) {
            Ok(InitStatus::SetupFailed { reason }) => return Err(reason),
            Ok(InitStatus::Started) | Err(_) => {}
            Ok(other) => status = Some(other),
        }
    }
    let (exit_code, signal, tmp_full) = ending(status, killed.is_some(), cgroup)?;
    let limits_hit = limits_hit(request, killed, cgroup, tmp_full, signal);
    // What stopped it: our kill, else the first limit that struck.
    let killed_reason = limits_hit.first().copied();
    Ok(ExecResult {
        exit_code,
        signal,
        killed_reason,
        limits_hit,
        stdout: stdout.finish(),
        stderr: stderr.finish(),
        duration_ms,
        egress_refusals: Vec::new(),
    })
}

/// Exit code, signal and whether /tmp was full, from init's last word.
pub(super) fn ending(
    status: Option<InitStatus>,
    killed: bool,
    cgroup: &Cgroup,
) -> Result<(Option<i32>, Option<i32>, bool), String> {
    match status {
        Some(InitStatus::Exited { code, tmp_full }) => Ok((Some(code), None, tmp_full)),
        Some(InitStatus::Signaled { signal, tmp_full }) => Ok((None, Some(signal), tmp_full)),
        // Killed (by us or by the OOM killer) before init could report.
        _ if killed || cgroup.strikes().oom_kills > 0 => Ok((None, Some(libc::SIGKILL), false)),
        _ => Err("the sandbox ended before reporting (its setup was killed or crashed)".into()),
    }
}

/// Our own kill first, then every limit the cgroup and the filesystems say
/// struck.
pub(super) fn limits_hit(
    request: &HelperRequest,
    killed: Option<KilledReason>,
    cgroup: &Cgroup,
    tmp_full: bool,
    signal: Option<i32>,
) -> Vec<KilledReason> {
    let strikes = cgroup.strikes();
    let workspace_full = nix::sys::statvfs::statvfs(&request.workspace)
        .map(|s| crate::nearly_full(s.blocks_available() * s.fragment_size()))
        .unwrap_or(false);
    let mut limits_hit: Vec<KilledReason> = killed.into_iter().collect();
    if strikes.oom_kills > 0 {
        limits_hit.push(KilledReason::Oom);
    }
    if strikes.pids_refusals > 0 {
        limits_hit.push(KilledReason::Pids);
    }
    if tmp_full || workspace_full || signal == Some(libc::SIGXFSZ) {
        limits_hit.push(KilledReason::Disk);
    }
    limits_hit
}

pub(super) fn kill_everything(child: Pid, cgroup: &Cgroup) {
    // The child's death takes init (parent-death signal), and init's death
    // takes every process of its pid namespace; the cgroup sweep is for
    // anything in between.
    let _ = kill(child, Signal::SIGKILL);
    cgroup.kill_all();
}

pub(super) fn wait_byte(fd: &OwnedFd, within: Duration) -> Result<(), String> {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    match poll(
        &mut fds,
        PollTimeout::try_from(within.as_millis() as i32).unwrap_or(PollTimeout::MAX),
    ) {
        Ok(0) => return Err("timed out".into()),
        Ok(_) => {}
        Err(e) => return Err(e.to_string()),
    }
    let mut byte = [0u8; 1];
    match nix::unistd::read(fd, &mut byte) {
        Ok(1) => Ok(()),
        Ok(_) => Err("it exited during setup".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Why no call can run, and what to do, in one line: the limits are never
/// dropped instead.
fn no_cgroup(group: &str, error: &std::io::Error) -> String {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        format!(
            "the namespace sandbox cannot create its cgroup ({error}): give the server a \
             writable cgroup hierarchy (in a container: cgroup delegation, or --privileged), \
             or set SANDBOX_BACKEND=docker"
        )
    } else {
        format!(
            "the namespace sandbox cannot create its cgroup as uid {uid}, not root ({error}): \
             run bulkhead as root, or have root delegate a cgroup to uid {uid} and name it \
             in SANDBOX_CGROUP (now {group:?}; see the README), or set SANDBOX_BACKEND=docker"
        )
    }
}

/// Maps root of the sandbox's user namespace to the host ids chosen for
/// it (an unprivileged uid when the server is root, else the server's own).
/// Only the parent namespace may write these maps. The program later drops
/// to uid 1000 in a nested user namespace of its own.
fn map_ids(child: Pid, host_uid: u32, host_gid: u32) -> Result<(), String> {
    let proc = format!("/proc/{}", child.as_raw());
    let write = |file: &str, content: &str| {
        std::fs::write(format!("{proc}/{file}"), content)
            .map_err(|e| format!("cannot write {file} of the sandbox: {e}"))
    };
    write("uid_map", &format!("0 {host_uid} 1\n"))?;
    if !nix::unistd::geteuid().is_root() {
        // Unprivileged: the kernel requires setgroups to be denied first.
        write("setgroups", "deny")?;
    }
    write("gid_map", &format!("0 {host_gid} 1\n"))?;
    Ok(())
}

/// Turns a raw descriptor inherited across fork into an owned one.
pub(crate) fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller owns `fd` (inherited across fork, not otherwise
    // wrapped in this process image).
    unsafe { OwnedFd::from_raw_fd(fd) }
}
