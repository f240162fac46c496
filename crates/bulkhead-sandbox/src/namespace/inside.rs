//! What runs inside the namespaces: the child that unshares them, the init
//! (PID 1) that builds the filesystem view and reaps, and the program's own
//! last steps before `execve` (or the file operation it performs instead).
//!
//! Everything here runs in processes forked from the single-threaded helper;
//! a failure is reported on the status pipe as `SetupFailed` and the process
//! exits, so the helper refuses the operation instead of running it with
//! less isolation.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::Signal;
use nix::sys::statvfs::{FsFlags, statvfs};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork};
use serde::{Deserialize, Serialize};

use super::helper::{ChildFds, MountSource, Mounts, owned};
use super::{HelperRequest, SANDBOX_UID, Task, seccomp};
use crate::Operation;
use crate::paths::{WORKSPACE, workspace_path};

/// What init tells the helper, one JSON line each.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub(crate) enum InitStatus {
    /// From a hosted program, confined and about to be executed.
    Started,
    Exited {
        code: i32,
        tmp_full: bool,
    },
    Signaled {
        signal: i32,
        tmp_full: bool,
    },
    SetupFailed {
        reason: String,
    },
}

const PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin";
/// Host system folders shown read-only (those that exist).
const SYSTEM_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// Host files and folders of /etc shown read-only: what dynamic linking,
/// Debian's alternatives, TLS and time zones need; not passwd, not shadow.
const ETC_ENTRIES: &[&str] = &[
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "ssl",
    "ca-certificates",
    "localtime",
    "protocols",
    "services",
    "mime.types",
];
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom"];

fn report(fd: RawFd, status: &InitStatus) {
    if let Ok(mut line) = serde_json::to_vec(status) {
        line.push(b'\n');
        // SAFETY: borrowing an fd this process owns for one write.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let _ = nix::unistd::write(fd, &line);
    }
}

fn fail(fd: RawFd, reason: String) -> ! {
    report(fd, &InitStatus::SetupFailed { reason });
    // SAFETY: _exit is always sound; it skips destructors on purpose.
    unsafe { libc::_exit(125) }
}

fn die_with_parent() -> Result<(), String> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| format!("prctl(PDEATHSIG): {e}"))
}

/// The helper's direct child: unshares, waits to be mapped, forks init.
pub(crate) fn child_main(request: &HelperRequest, mounts: &Mounts, fds: &ChildFds) -> ! {
    let helper = nix::unistd::getppid();
    // A hosting helper turns SIGTERM into its stop; here, and in init and
    // the program, the signal means what it always does.
    // SAFETY: restoring the default disposition installs no handler.
    let _ =
        unsafe { nix::sys::signal::signal(Signal::SIGTERM, nix::sys::signal::SigHandler::SigDfl) };
    let result = (|| -> Result<Pid, String> {
        die_with_parent()?;
        if nix::unistd::getppid() != helper {
            return Err("the helper went away".into());
        }
        // The new root is named relative to the state folder, entered now,
        // while the path to it may lead through folders the sandbox's uid
        // cannot pass.
        nix::unistd::chdir(&request.state_dir)
            .map_err(|e| format!("cannot enter {}: {e}", request.state_dir.display()))?;
        unshare(
            CloneFlags::CLONE_NEWUSER
                | CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWPID
                | CloneFlags::CLONE_NEWNET
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWUTS,
        )
        .map_err(|e| {
            let remedy = if nix::unistd::geteuid().is_root() {
                ""
            } else {
                ": this kernel does not let unprivileged users create user namespaces \
                 (kernel.unprivileged_userns_clone, kernel.apparmor_restrict_unprivileged_userns); \
                 run bulkhead as root, or set SANDBOX_BACKEND=docker"
            };
            format!("cannot create namespaces (unshare): {e}{remedy}")
        })?;
        let unshared = owned(fds.unshared);
        nix::unistd::write(&unshared, b"u").map_err(|e| e.to_string())?;
        drop(unshared);
        let mapped = owned(fds.mapped);
        let mut byte = [0u8; 1];
        if nix::unistd::read(&mapped, &mut byte).map_err(|e| e.to_string())? != 1 {
            return Err("the helper did not map the sandbox ids".into());
        }
        drop(mapped);
        // Become root of the new namespace (mapped to the sandbox's host
        // uid), so that what init creates has an owner there.
        let _ = nix::unistd::setgroups(&[]);
        let root_gid = Gid::from_raw(0);
        nix::unistd::setresgid(root_gid, root_gid, root_gid)
            .map_err(|e| format!("setresgid: {e}"))?;
        let root_uid = Uid::from_raw(0);
        nix::unistd::setresuid(root_uid, root_uid, root_uid)
            .map_err(|e| format!("setresuid: {e}"))?;
        // SAFETY: this process is single-threaded (forked from the
        // single-threaded helper).
        match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
            ForkResult::Child => init_main(request, mounts, fds),
            ForkResult::Parent { child } => Ok(child),
        }
    })();
    match result {
        Ok(init) => {
            // Only init and the program may hold the pipes open.
            for fd in [fds.stdout, fds.stderr, fds.status]
                .into_iter()
                .chain(fds.stdin)
            {
                let _ = nix::unistd::close(fd);
            }
            let code = match waitpid(init, None) {
                Ok(WaitStatus::Exited(_, code)) => code,
                _ => 1,
            };
            // SAFETY: _exit is always sound.
            unsafe { libc::_exit(code) }
        }
        Err(reason) => fail(fds.status, reason),
    }
}

/// PID 1 of the sandbox: builds the filesystem, starts the program, reaps
/// every process, reports the program's status, and exits (which ends
/// every process left in the namespace).
fn init_main(request: &HelperRequest, mounts: &Mounts, fds: &ChildFds) -> ! {
    let status_fd = fds.status;
    // Not dumpable: the program (same host uid) may not read or write
    // init's memory through /proc.
    let setup = die_with_parent()
        .and_then(|()| {
            nix::sys::prctl::set_dumpable(false).map_err(|e| format!("prctl(DUMPABLE): {e}"))
        })
        .and_then(|()| setup_filesystem(request, mounts));
    if let Err(reason) = setup {
        fail(status_fd, reason);
    }
    // Attached: the program must not hold a handle on host mounts.
    for fd in [&mounts.workspace]
        .into_iter()
        .chain(&mounts.egress)
        .filter_map(MountSource::fd)
    {
        let _ = nix::unistd::close(fd);
    }
    let _ = nix::unistd::sethostname("sandbox");
    // SAFETY: single-threaded process.
    let program = match unsafe { fork() } {
        Ok(ForkResult::Child) => program_main(request, fds),
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => fail(status_fd, format!("fork: {e}")),
    };
    for fd in [fds.stdout, fds.stderr].into_iter().chain(fds.stdin) {
        let _ = nix::unistd::close(fd);
    }
    let status = loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == program => break Ok(code),
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == program => break Err(signal as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break Err(libc::SIGKILL),
        }
    };
    let tmp_full = statvfs("/tmp")
        .map(|s| crate::nearly_full(s.blocks_available() * s.fragment_size()))
        .unwrap_or(false);
    report(
        status_fd,
        &match status {
            Ok(code) => InitStatus::Exited { code, tmp_full },
            Err(signal) => InitStatus::Signaled { signal, tmp_full },
        },
    );
    // SAFETY: _exit is always sound.
    unsafe { libc::_exit(0) }
}

fn mount_err(what: &str, target: &Path, e: nix::Error) -> String {
    format!("cannot mount {what} at {}: {e}", target.display())
}

/// Flags a remount must keep: in a user namespace the kernel refuses to
/// clear flags the parent namespace set.
fn locked_flags(source: &Path) -> MsFlags {
    let Ok(stat) = statvfs(source) else {
        return MsFlags::empty();
    };
    let flags = stat.flags();
    let mut locked = MsFlags::empty();
    for (fs, ms) in [
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
    ] {
        if flags.contains(fs) {
            locked |= ms;
        }
    }
    // ST_RELATIME (statvfs(3)); nix names it for glibc targets only.
    const ST_RELATIME: libc::c_ulong = 0x1000;
    if flags.bits() & ST_RELATIME != 0 {
        locked |= MsFlags::MS_RELATIME;
    }
    locked
}

fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), String> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| mount_err(&source.display().to_string(), target, e))?;
    remount(source, target, read_only)
}

/// Makes a fresh bind mount nosuid, nodev and, if asked, read-only.
fn remount(source: &Path, target: &Path, read_only: bool) -> Result<(), String> {
    let mut flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | locked_flags(source);
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
        .map_err(|e| mount_err("a read-only remount", target, e))
}

fn tmpfs(target: &Path, options: &str, extra: MsFlags) -> Result<(), String> {
    mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | extra,
        Some(options),
    )
    .map_err(|e| mount_err("a tmpfs", target, e))
}

fn mkdir(path: &Path) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| format!("cannot create {}: {e}", path.display()))
}

fn write_file(path: &Path, content: &str) -> Result<(), String> {
    std::fs::write(path, content).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// `bind` for what the helper took hold of on the host (see
/// [`MountSource`]).
fn attach(source: &MountSource, target: &Path, read_only: bool) -> Result<(), String> {
    let fd = match source {
        MountSource::Path(path) => return bind(path, target, read_only),
        MountSource::Tree(fd) => fd.as_raw_fd(),
    };
    let shown = || "a host mount".to_string();
    let c_target = CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: a path with a NUL byte", target.display()))?;
    // SAFETY: a plain syscall with valid C strings and a descriptor this
    // process holds.
    let moved = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd,
            c"".as_ptr(),
            libc::AT_FDCWD,
            c_target.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if moved < 0 {
        return Err(mount_err(&shown(), target, nix::Error::last()));
    }
    remount(
        &PathBuf::from(format!("/proc/self/fd/{fd}")),
        target,
        read_only,
    )
}

fn setup_filesystem(request: &HelperRequest, mounts: &Mounts) -> Result<(), String> {
    let root = mounts.root.as_path();
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("cannot make mounts private: {e}"))?;
    tmpfs(root, "size=8m,mode=0755", MsFlags::empty())?;

    for dir in SYSTEM_DIRS {
        let host = Path::new("/").join(dir);
        let inside = root.join(dir);
        match std::fs::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = std::fs::read_link(&host).map_err(|e| e.to_string())?;
                std::os::unix::fs::symlink(target, &inside).map_err(|e| e.to_string())?;
            }
            Ok(meta) if meta.is_dir() => {
                mkdir(&inside)?;
                bind(&host, &inside, true)?;
            }
            _ => {}
        }
    }

    let etc = root.join("etc");
    mkdir(&etc)?;
    write_file(
        &etc.join("passwd"),
        &format!(
            "root:x:0:0:root:/root:/usr/sbin/nologin\nsandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:sandbox:{WORKSPACE}:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
    )?;
    write_file(
        &etc.join("group"),
        &format!("root:x:0:\nsandbox:x:{SANDBOX_UID}:\nnogroup:x:65534:\n"),
    )?;
    write_file(&etc.join("hostname"), "sandbox\n")?;
    write_file(
        &etc.join("hosts"),
        "127.0.0.1 localhost sandbox\n::1 localhost\n",
    )?;
    write_file(&etc.join("resolv.conf"), "")?;
    write_file(
        &etc.join("nsswitch.conf"),
        "passwd: files\ngroup: files\nhosts: files dns\n",
    )?;
    for entry in ETC_ENTRIES {
        let host = Path::new("/etc").join(entry);
        let inside = etc.join(entry);
        match std::fs::metadata(&host) {
            Ok(meta) if meta.is_dir() => mkdir(&inside)?,
            Ok(_) => write_file(&inside, "")?,
            Err(_) => continue,
        }
        bind(&host, &inside, true)?;
    }

    let dev = root.join("dev");
    mkdir(&dev)?;
    tmpfs(&dev, "size=64k,mode=0755", MsFlags::MS_NOEXEC)?;
    for device in DEVICES {
        let inside = dev.join(device);
        write_file(&inside, "")?;
        let host = Path::new("/dev").join(device);
        mount(
            Some(&host),
            &inside,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| mount_err(device, &inside, e))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link)).map_err(|e| e.to_string())?;
    }
    let shm = dev.join("shm");
    mkdir(&shm)?;
    tmpfs(&shm, "size=1m,mode=1777", MsFlags::MS_NOEXEC)?;

    let proc = root.join("proc");
    mkdir(&proc)?;
    mount(
        Some("proc"),
        &proc,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| mount_err("proc", &proc, e))?;

    if let Some(socket) = &mounts.egress {
        let run = root.join("run/bulkhead");
        mkdir(&run)?;
        let inside = root.join(crate::egress::SANDBOX_SOCKET.trim_start_matches('/'));
        write_file(&inside, "")?;
        attach(socket, &inside, true)?;
    }

    let tmp = root.join("tmp");
    mkdir(&tmp)?;
    tmpfs(
        &tmp,
        &format!("size={},mode=1777", request.limits.disk_bytes),
        MsFlags::empty(),
    )?;

    let workspace = root.join(WORKSPACE.trim_start_matches('/'));
    mkdir(&workspace)?;
    attach(&mounts.workspace, &workspace, false)?;

    nix::unistd::chdir(root).map_err(|e| format!("chdir: {e}"))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("cannot detach the host root: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir: {e}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| format!("cannot make the root read-only: {e}"))?;
    Ok(())
}

/// The program's process: its own stdio, limits, identity and filters,
/// then `execve` (or the file operation).
fn program_main(request: &HelperRequest, fds: &ChildFds) -> ! {
    let status_fd = fds.status;
    if let Err(reason) = confine(request, fds) {
        fail(status_fd, reason);
    }
    let code = match &request.task {
        Task::Operation(Operation::Exec { argv, .. }) => exec(argv, &[]),
        Task::Operation(Operation::ReadFile { path }) => file_result(read_file(path)),
        Task::Operation(Operation::WriteFile { path, content }) => {
            file_result(write_workspace_file(path, content))
        }
        Task::Operation(Operation::ListDir { path }) => file_result(list_dir(path)),
        Task::Process(spec) => {
            // The status pipe closes on exec; this is the helper's cue that
            // the program's stdio is live.
            report(status_fd, &InitStatus::Started);
            exec(&spec.argv, &spec.env)
        }
    };
    // `_exit` skips the buffered stdout's flush.
    let _ = std::io::stdout().flush();
    // SAFETY: _exit is always sound.
    unsafe { libc::_exit(code) }
}

fn confine(request: &HelperRequest, fds: &ChildFds) -> Result<(), String> {
    // SAFETY: dup2 onto the standard descriptors of this single-threaded
    // process; the sources are valid inherited pipe ends.
    unsafe {
        if libc::dup2(fds.stdout, 1) < 0 || libc::dup2(fds.stderr, 2) < 0 {
            return Err("cannot set up the program's output".into());
        }
    }
    let null = File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
    let input = fds.stdin.unwrap_or(null.as_raw_fd());
    // SAFETY: as above.
    unsafe {
        if libc::dup2(input, 0) < 0 {
            return Err("cannot set up the program's input".into());
        }
        // Nothing else this process holds may reach the program.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
    }
    drop(null);

    let limits = &request.limits;
    let set = |resource, soft: u64, hard: u64| {
        setrlimit(resource, soft, hard).map_err(|e| format!("setrlimit({resource:?}): {e}"))
    };
    set(Resource::RLIMIT_CORE, 0, 0)?;
    set(Resource::RLIMIT_NOFILE, 1024, 1024)?;
    set(Resource::RLIMIT_FSIZE, limits.disk_bytes, limits.disk_bytes)?;
    // CPU time follows from an operation's timeout; a hosted program has
    // none, and the cgroup's quota bounds its rate.
    if let Task::Operation(_) = &request.task {
        let cpu_seconds = limits
            .timeout
            .as_secs()
            .saturating_mul(limits.cpus.ceil().max(1.0) as u64)
            + 2;
        set(Resource::RLIMIT_CPU, cpu_seconds, cpu_seconds + 1)?;
    }

    nix::unistd::chdir(WORKSPACE).map_err(|e| format!("chdir {WORKSPACE}: {e}"))?;
    become_sandbox_user()?;
    drop_capabilities()?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    restrict_filesystem();
    seccomp::install()
}

/// A nested user namespace in which this process is uid/gid 1000 (the same
/// host ids as init): not root, and without any power over the mounts and
/// namespaces init set up, which belong to the outer user namespace.
fn become_sandbox_user() -> Result<(), String> {
    // Init made itself non-dumpable and fork inherited it; the program must
    // own its /proc entries to write its own id maps.
    nix::sys::prctl::set_dumpable(true).map_err(|e| format!("prctl(DUMPABLE): {e}"))?;
    unshare(CloneFlags::CLONE_NEWUSER)
        .map_err(|e| format!("cannot create the user namespace: {e}"))?;
    let write = |file: &str, content: String| {
        std::fs::write(format!("/proc/self/{file}"), content)
            .map_err(|e| format!("cannot write /proc/self/{file}: {e}"))
    };
    write("uid_map", format!("{SANDBOX_UID} 0 1\n"))?;
    write("setgroups", "deny".into())?;
    write("gid_map", format!("{SANDBOX_UID} 0 1\n"))?;
    if nix::unistd::getuid().as_raw() != SANDBOX_UID {
        return Err("the sandbox user is not in place".into());
    }
    Ok(())
}

fn drop_capabilities() -> Result<(), String> {
    use caps::CapSet;
    for cap in caps::all() {
        // Dropping from the bounding set needs CAP_SETPCAP, still held here.
        let _ = caps::drop(None, CapSet::Bounding, cap);
    }
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(|e| format!("cannot drop capabilities: {e}"))?;
    }
    let left = caps::read(None, CapSet::Bounding).map_err(|e| e.to_string())?;
    if !left.is_empty() {
        return Err(format!("capabilities left in the bounding set: {left:?}"));
    }
    Ok(())
}

/// Landlock, where the kernel has it: reads anywhere in the sandbox's view,
/// writes only in the workspace, /tmp, /dev/shm and the harmless devices.
fn restrict_filesystem() {
    use landlock::{
        ABI, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, path_beneath_rules,
    };
    let abi = ABI::V5;
    let _ = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi))))
        .and_then(|r| {
            r.add_rules(path_beneath_rules(
                [WORKSPACE, "/tmp", "/dev/shm"],
                AccessFs::from_all(abi),
            ))
        })
        .and_then(|r| {
            r.add_rules(path_beneath_rules(
                DEVICES.iter().map(|d| format!("/dev/{d}")),
                AccessFs::from_read(abi) | AccessFs::WriteFile,
            ))
        })
        .and_then(|r| r.restrict_self());
}

/// The landlock ABI version the kernel offers (0: none).
pub(crate) fn landlock_abi() -> i64 {
    // SAFETY: the version query takes no pointers that are dereferenced.
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32,
        )
    };
    version.max(0)
}

/// Executes `argv` with the sandbox's environment, `extra` set over it.
fn exec(argv: &[String], extra: &[(String, String)]) -> i32 {
    let program = if argv[0].contains('/') {
        Some(PathBuf::from(&argv[0]))
    } else {
        PATH.split(':')
            .map(|dir| Path::new(dir).join(&argv[0]))
            .find(|candidate| {
                candidate
                    .metadata()
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    };
    let Some(program) = program else {
        let _ = writeln!(std::io::stderr(), "sandbox: {}: command not found", argv[0]);
        return 127;
    };
    let to_c = |s: &str| CString::new(s).unwrap_or_default();
    let path = to_c(&program.to_string_lossy());
    let args: Vec<CString> = argv.iter().map(|a| to_c(a)).collect();
    let mut env: Vec<(String, String)> = [
        ("PATH", PATH),
        ("HOME", WORKSPACE),
        ("USER", "sandbox"),
        ("LOGNAME", "sandbox"),
        ("LANG", "C.UTF-8"),
        ("TERM", "dumb"),
        ("TMPDIR", "/tmp"),
    ]
    .iter()
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .collect();
    for (name, value) in extra {
        env.retain(|(own, _)| own != name);
        env.push((name.clone(), value.clone()));
    }
    let env: Vec<CString> = env
        .iter()
        .map(|(name, value)| to_c(&format!("{name}={value}")))
        .collect();
    let error = nix::unistd::execve(&path, &args, &env).unwrap_err();
    let _ = writeln!(
        std::io::stderr(),
        "sandbox: cannot execute {}: {error}",
        argv[0]
    );
    126
}

fn file_result(result: Result<(), String>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(message) => {
            let _ = writeln!(std::io::stderr(), "{message}");
            1
        }
    }
}

/// The same path with every symlink followed; it must still be inside.
fn inside_workspace(path: &Path, shown: &str) -> Result<PathBuf, String> {
    let real = path.canonicalize().map_err(|e| format!("{shown}: {e}"))?;
    if real.starts_with(WORKSPACE) {
        Ok(real)
    } else {
        Err(format!("{shown}: resolves outside the workspace"))
    }
}

fn read_file(path: &str) -> Result<(), String> {
    let real = inside_workspace(&workspace_path(path)?, path)?;
    let mut file = File::open(&real).map_err(|e| format!("{path}: {e}"))?;
    std::io::copy(&mut file, &mut std::io::stdout().lock()).map_err(|e| format!("{path}: {e}"))?;
    Ok(())
}

fn write_workspace_file(path: &str, content: &str) -> Result<(), String> {
    let target = workspace_path(path)?;
    let parent = target
        .parent()
        .filter(|p| p.starts_with(WORKSPACE))
        .ok_or_else(|| format!("{path}: not a file path in the workspace"))?;
    if target == Path::new(WORKSPACE) {
        return Err(format!("{path}: is the workspace itself"));
    }
    std::fs::create_dir_all(parent).map_err(|e| format!("{path}: {e}"))?;
    inside_workspace(parent, path)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&target)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => {
                format!("{path}: is a symbolic link; refusing to write through it")
            }
            _ => format!("{path}: {e}"),
        })?;
    file.write_all(content.as_bytes())
        .map_err(|e| format!("{path}: {e}"))?;
    println!("wrote {} bytes to {}", content.len(), target.display());
    Ok(())
}

fn list_dir(path: &str) -> Result<(), String> {
    let real = inside_workspace(&workspace_path(path)?, path)?;
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(&real).map_err(|e| format!("{path}: {e}"))? {
        let entry = entry.map_err(|e| format!("{path}: {e}"))?;
        let meta = entry.path().symlink_metadata().map_err(|e| e.to_string())?;
        let kind = if meta.file_type().is_symlink() {
            "symlink"
        } else if meta.is_dir() {
            "dir"
        } else if meta.is_file() {
            "file"
        } else {
            "other"
        };
        entries.push(serde_json::json!({
            "name": entry.file_name().to_string_lossy(),
            "type": kind,
            "size": meta.len(),
        }));
    }
    entries.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    println!("{}", serde_json::Value::Array(entries));
    Ok(())
}
