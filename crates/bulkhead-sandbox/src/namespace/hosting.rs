//! Hosting a long-lived program, helper side (see `process.rs` for the
//! server side and the protocol).
//!
//! The same sandbox as an operation's (namespaces, cgroup, mounts, uid,
//! seccomp, landlock), but the program's stdin and stdout are the helper's
//! own, there is no timeout, and the helper stops on SIGTERM: it kills the
//! tree, reports how the program ended, and removes the cgroup. Its stderr
//! is captured under the output cap, and a flood of it is stopped like an
//! operation's.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use nix::sys::wait::waitpid;
use nix::unistd::pipe2;

use super::HelperRequest;
use super::cgroup::Cgroup;
use super::helper::{Launched, Mounts, ending, in_sandbox, kill_everything, launch, limits_hit};
use super::inside::InitStatus;
use super::process::ProcessReport;
use crate::output::OutputCapture;
use crate::{KilledReason, ProcessExit};

/// Hosts the program, reports, exits.
pub(super) fn host(request: &HelperRequest) -> ! {
    let report = match stop_pipe() {
        Ok(stop) => match in_sandbox(request, |cgroup, mounts| {
            host_in(request, cgroup, mounts, &stop)
        }) {
            Ok(exit) => ProcessReport::Exited(exit),
            Err(reason) => ProcessReport::Unavailable(reason),
        },
        Err(reason) => ProcessReport::Unavailable(reason),
    };
    send(&report);
    std::process::exit(0)
}

/// One report line on the helper's stderr.
pub(super) fn send(report: &ProcessReport) {
    if let Ok(mut line) = serde_json::to_vec(report) {
        line.push(b'\n');
        let mut stderr = std::io::stderr().lock();
        let _ = stderr.write_all(&line);
        let _ = stderr.flush();
    }
}

/// The write end of the pipe SIGTERM is turned into, for `poll`.
static STOP: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop(_: libc::c_int) {
    let fd = STOP.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; the byte is a static.
        unsafe {
            libc::write(fd, b"s".as_ptr().cast(), 1);
        }
    }
}

/// A pipe that becomes readable when the helper is sent SIGTERM.
fn stop_pipe() -> Result<OwnedFd, String> {
    let (read, write) =
        pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(|e| format!("pipe: {e}"))?;
    // The write end lives as long as the process; the handler writes it.
    STOP.store(write.into_raw_fd(), Ordering::Relaxed);
    // No SA_RESTART: the signal interrupts `poll`, which then sees the pipe.
    let action = SigAction::new(
        SigHandler::Handler(on_stop),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler only loads an atomic and calls write(2), both
    // async-signal-safe. The forked child restores the default at once.
    unsafe { sigaction(Signal::SIGTERM, &action) }.map_err(|e| format!("sigaction: {e}"))?;
    Ok(read)
}

/// Makes `fd` (0 or 1) /dev/null in the helper: the program holds the
/// caller's pipes, and the caller's read of stdout must end when the
/// program's tree does, not when the helper does.
fn let_go(fd: i32) {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        // SAFETY: dup2 onto a standard descriptor of this single-threaded
        // process; the source is a file it just opened.
        unsafe {
            libc::dup2(null.as_raw_fd(), fd);
        }
    }
}

fn host_in(
    request: &HelperRequest,
    cgroup: &Cgroup,
    mounts: &Mounts,
    stop: &OwnedFd,
) -> Result<ProcessExit, String> {
    let Launched {
        child,
        stderr: stderr_r,
        status: status_r,
        ..
    } = launch(request, cgroup, mounts, true)?;
    let_go(0);
    let_go(1);

    let limits = &request.limits;
    let mut stderr = OutputCapture::new(limits.output_bytes);
    let flood = limits.output_flood_bytes();
    let mut status_bytes: Vec<u8> = Vec::new();
    let mut last_status = None;
    let mut started = false;
    let mut killed: Option<KilledReason> = None;
    let mut stopped = false;
    // Slots 0 and 1: the program's stderr and init's status; slot 2, polled
    // on every round, is the stop pipe.
    let mut open = [Some(stderr_r), Some(status_r)];
    let mut buffer = vec![0u8; 64 << 10];
    let failure = loop {
        if open.iter().all(Option::is_none) {
            break None;
        }
        let dying = killed.is_some() || stopped;
        let mut slots: Vec<usize> = open
            .iter()
            .enumerate()
            .filter(|(_, fd)| fd.is_some())
            .map(|(slot, _)| slot)
            .collect();
        let mut fds: Vec<PollFd> = open
            .iter()
            .flatten()
            .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
            .collect();
        fds.push(PollFd::new(stop.as_fd(), PollFlags::POLLIN));
        slots.push(2);
        let wait = if dying {
            // Killed: the pipes close as the processes die.
            PollTimeout::from(100u8)
        } else {
            PollTimeout::NONE
        };
        let ready = poll(&mut fds, wait);
        let ready_slots: Vec<usize> = fds
            .iter()
            .zip(&slots)
            .filter(|(fd, _)| fd.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, slot)| *slot)
            .collect();
        drop(fds);
        match ready {
            Ok(0) if dying => break None,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => break Some(format!("poll: {e}")),
        }
        for slot in ready_slots {
            if slot == 2 {
                while nix::unistd::read(stop, &mut buffer).is_ok_and(|n| n > 0) {}
                if !stopped {
                    stopped = true;
                    kill_everything(child, cgroup);
                }
                continue;
            }
            let fd = open[slot].as_ref().expect("open slot");
            match nix::unistd::read(fd, &mut buffer) {
                Ok(0) => open[slot] = None,
                Ok(n) if slot == 0 => stderr.push(&buffer[..n]),
                Ok(n) => status_bytes.extend_from_slice(&buffer[..n.min(4096)]),
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                Err(_) => open[slot] = None,
            }
        }
        // Init's status lines, as they complete.
        while let Some(end) = status_bytes.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = status_bytes.drain(..=end).collect();
            match serde_json::from_slice::<InitStatus>(&line) {
                Ok(InitStatus::Started) if !started => {
                    started = true;
                    send(&ProcessReport::Started);
                }
                Ok(InitStatus::SetupFailed { reason }) => {
                    kill_everything(child, cgroup);
                    let _ = waitpid(child, None);
                    return Err(reason);
                }
                Ok(InitStatus::Started) | Err(_) => {}
                Ok(other) => last_status = Some(other),
            }
        }
        if killed.is_none() && stderr.total() > flood {
            killed = Some(KilledReason::OutputLimit);
            kill_everything(child, cgroup);
        }
    };
    if let Some(reason) = failure {
        kill_everything(child, cgroup);
        let _ = waitpid(child, None);
        return Err(reason);
    }
    let _ = waitpid(child, None);
    if !started {
        return Err(
            "the sandbox ended before the program started (its setup was killed or crashed)".into(),
        );
    }
    let (exit_code, signal, tmp_full) = ending(last_status, killed.is_some() || stopped, cgroup)?;
    let limits_hit = limits_hit(request, killed, cgroup, tmp_full, signal);
    Ok(ProcessExit {
        exit_code,
        signal,
        killed_reason: limits_hit.first().copied(),
        limits_hit,
        stderr: stderr.finish(),
    })
}
