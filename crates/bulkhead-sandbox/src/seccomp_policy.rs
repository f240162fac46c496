//! The one syscall policy of every backend: the syscalls a sandboxed program
//! is refused, whatever isolates it.
//!
//! The namespace backend enforces it as its own seccomp filter
//! (`namespace::seccomp`); the docker backend (and so sandboxd) as the seccomp
//! profile it passes with every container, [`docker_profile`]: the engine's
//! default profile (vendored, `seccomp/moby-default.json`) with these
//! syscalls taken out of its allow rules and refused explicitly. Both read
//! the lists below; neither keeps a list of its own.
//!
//! What differs between the two is what lies outside the lists: the
//! namespace filter allows every other syscall (it runs the host's
//! programs, whatever they need), the docker profile only those the engine's
//! default allows (so it refuses more: syscalls newer than the profile,
//! `AF_VSOCK` sockets, unusual `personality` flags, everything the default
//! keeps for capabilities the container does not have). And the namespace
//! filter kills a process that makes a syscall of another architecture
//! (32-bit x86 on x86_64), where the profile applies the same names to the
//! sub-architectures the engine maps (`archMap`).

use std::sync::LazyLock;

use serde_json::{Value, json};

/// A syscall of the policy: its name (the kernel's and libseccomp's, which
/// the Docker profile uses) and its number on the architecture this was
/// built for, where it exists there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Syscall {
    pub name: &'static str,
    pub number: Option<i64>,
    /// Why it is refused, in a few words.
    pub why: &'static str,
}

/// `SYS_mount` -> `mount`: the list names each syscall once, as libc's
/// constant, and the name is read off it.
const fn strip_sys(constant: &'static str) -> &'static str {
    match constant.as_bytes() {
        [b'S', b'Y', b'S', b'_', rest @ ..] => match std::str::from_utf8(rest) {
            Ok(name) => name,
            Err(_) => panic!("not UTF-8"),
        },
        _ => panic!("a syscall constant starts with SYS_"),
    }
}

macro_rules! number {
    ($sys:ident) => {
        Some(libc::$sys as i64)
    };
    ($sys:ident, $pred:meta) => {{
        #[cfg($pred)]
        let number = Some(libc::$sys as i64);
        #[cfg(not($pred))]
        let number = None;
        number
    }};
}

/// `"why": [SYS_a, SYS_b if target_arch = "x86_64", …], …` -> `[Syscall]`.
/// A syscall that exists on some architectures only keeps its name on the
/// others (for the profile: the engine may map sub-architectures) and has
/// no number there.
macro_rules! syscalls {
    ($($why:literal: [$($sys:ident $(if $pred:meta)?),* $(,)?]),* $(,)?) => {
        &[$($(Syscall {
            name: strip_sys(stringify!($sys)),
            number: number!($sys $(, $pred)?),
            why: $why,
        }),*),*]
    };
}

/// Refused with EPERM, whatever the arguments.
pub const REFUSED: &[Syscall] = syscalls![
    "mounts and the filesystem tree": [
        SYS_mount, SYS_umount2, SYS_pivot_root, SYS_chroot, SYS_open_tree, SYS_move_mount,
        SYS_fsopen, SYS_fsconfig, SYS_fsmount, SYS_fspick, SYS_mount_setattr,
    ],
    "namespaces": [SYS_unshare, SYS_setns],
    "other processes' memory and files": [
        SYS_ptrace, SYS_process_vm_readv, SYS_process_vm_writev, SYS_kcmp, SYS_pidfd_getfd,
    ],
    "the kernel itself": [
        SYS_kexec_load, SYS_kexec_file_load, SYS_init_module, SYS_finit_module,
        SYS_delete_module, SYS_reboot, SYS_swapon, SYS_swapoff, SYS_acct, SYS_syslog,
        SYS_quotactl, SYS_lookup_dcookie, SYS_vhangup,
        SYS_iopl if target_arch = "x86_64", SYS_ioperm if target_arch = "x86_64",
    ],
    "large kernel attack surface, rarely needed": [
        SYS_bpf, SYS_perf_event_open, SYS_userfaultfd, SYS_io_uring_setup,
        SYS_io_uring_enter, SYS_io_uring_register,
    ],
    "kernel keyrings (shared beyond the sandbox)": [SYS_keyctl, SYS_add_key, SYS_request_key],
    "files by handle, bypassing paths": [SYS_open_by_handle_at, SYS_name_to_handle_at],
    "watching the whole filesystem": [SYS_fanotify_init],
    "the clock and host names": [
        SYS_settimeofday, SYS_clock_settime, SYS_clock_adjtime, SYS_adjtimex,
        SYS_sethostname, SYS_setdomainname,
    ],
];

/// Answered ENOSYS: `clone3` passes its flags in memory a seccomp filter
/// cannot read, so it cannot be refused only when it makes namespaces;
/// "not implemented" makes the C library fall back to `clone`, which
/// [`NAMESPACE_FLAGS`] governs.
pub const NOT_IMPLEMENTED: &[Syscall] =
    syscalls!["flags in memory a filter cannot read": [SYS_clone3]];

/// Refused (EPERM) when its flags include any of [`NAMESPACE_FLAGS`];
/// threads and `fork` stay allowed.
pub const CLONE: Syscall = syscalls!["with namespace flags: new namespaces": [SYS_clone]][0];

/// The flags of [`CLONE`] that make a new namespace.
pub const NAMESPACE_FLAGS: &[(&str, u64)] = &[
    ("CLONE_NEWUSER", libc::CLONE_NEWUSER as u64),
    ("CLONE_NEWNS", libc::CLONE_NEWNS as u64),
    ("CLONE_NEWPID", libc::CLONE_NEWPID as u64),
    ("CLONE_NEWNET", libc::CLONE_NEWNET as u64),
    ("CLONE_NEWIPC", libc::CLONE_NEWIPC as u64),
    ("CLONE_NEWUTS", libc::CLONE_NEWUTS as u64),
    ("CLONE_NEWCGROUP", libc::CLONE_NEWCGROUP as u64),
];

/// The engine's default profile, vendored: see `seccomp/README.md`.
const MOBY_DEFAULT: &str = include_str!("../seccomp/moby-default.json");

/// Where [`MOBY_DEFAULT`] comes from, for probes and logs.
pub const MOBY_DEFAULT_SOURCE: &str = "moby/profiles seccomp v0.1.0 (moby v28.5.2)";

/// The profile the docker backend passes with every container
/// (`--security-opt seccomp=<this>`), as compact JSON.
pub fn docker_profile() -> &'static str {
    static PROFILE: LazyLock<String> = LazyLock::new(|| {
        let default: Value = serde_json::from_str(MOBY_DEFAULT)
            .unwrap_or_else(|e| panic!("the vendored seccomp profile is not JSON: {e}"));
        derive_profile(default).to_string()
    });
    &PROFILE
}

/// The engine's default with the policy's syscalls (and `clone`, `clone3`)
/// out of every rule, then the policy's own rules for them. Taking them out
/// matters: runc cannot load a profile that both allows and refuses a
/// syscall, and the default allows several of them, some outright
/// (`name_to_handle_at`, `adjtimex`, `ptrace` on kernels since 4.8), some
/// for a capability the container does not have (kept out all the same, so
/// that adding a capability some day does not reopen them).
fn derive_profile(mut profile: Value) -> Value {
    let ours: Vec<&str> = REFUSED
        .iter()
        .chain(NOT_IMPLEMENTED)
        .chain([&CLONE])
        .map(|call| call.name)
        .collect();
    let rules = profile["syscalls"]
        .as_array_mut()
        .map(std::mem::take)
        .unwrap_or_default();
    let mut kept: Vec<Value> = rules
        .into_iter()
        .filter_map(|mut rule| {
            let names = rule["names"].as_array_mut()?;
            names.retain(|name| name.as_str().is_some_and(|name| !ours.contains(&name)));
            (!names.is_empty()).then_some(rule)
        })
        .collect();
    let mask = NAMESPACE_FLAGS
        .iter()
        .fold(0, |mask, (_, flag)| mask | flag);
    kept.extend([
        json!({
            "names": REFUSED.iter().map(|call| call.name).collect::<Vec<_>>(),
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": libc::EPERM,
            "comment": "bulkhead: refused by every sandbox backend (seccomp_policy::REFUSED)",
        }),
        json!({
            "names": NOT_IMPLEMENTED.iter().map(|call| call.name).collect::<Vec<_>>(),
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": libc::ENOSYS,
            "comment": "bulkhead: not implemented, so that the C library falls back to clone",
        }),
        // The engine is on this machine (a unix socket), so it has this
        // build's architecture, where clone's flags are its first argument.
        json!({
            "names": [CLONE.name],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": mask, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
            "comment": "bulkhead: clone without namespace flags (seccomp_policy::NAMESPACE_FLAGS)",
        }),
    ]);
    profile["syscalls"] = Value::Array(kept);
    profile
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Value {
        serde_json::from_str(docker_profile()).unwrap()
    }

    fn rules_naming(profile: &Value, name: &str) -> Vec<Value> {
        profile["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|rule| rule["names"].as_array().unwrap().iter().any(|n| n == name))
            .cloned()
            .collect()
    }

    #[test]
    fn every_refused_syscall_has_one_rule_and_it_refuses_with_eperm() {
        let profile = profile();
        for call in REFUSED {
            let rules = rules_naming(&profile, call.name);
            assert_eq!(rules.len(), 1, "{}: {rules:?}", call.name);
            assert_eq!(rules[0]["action"], "SCMP_ACT_ERRNO", "{}", call.name);
            assert_eq!(rules[0]["errnoRet"], libc::EPERM, "{}", call.name);
            assert!(
                rules[0].get("includes").is_none() && rules[0].get("excludes").is_none(),
                "unconditional: {}",
                call.name
            );
        }
        let clone3 = rules_naming(&profile, "clone3");
        assert_eq!(clone3.len(), 1, "{clone3:?}");
        assert_eq!(clone3[0]["errnoRet"], libc::ENOSYS);
        assert!(clone3[0].get("excludes").is_none(), "whatever the caps");
    }

    #[test]
    fn clone_is_allowed_only_without_namespace_flags_whatever_the_caps() {
        let profile = profile();
        let clone = rules_naming(&profile, "clone");
        assert_eq!(
            clone.len(),
            1,
            "the default's cap-gated clone is gone: {clone:?}"
        );
        let arg = &clone[0]["args"][0];
        assert_eq!(arg["op"], "SCMP_CMP_MASKED_EQ");
        assert_eq!(arg["valueTwo"], 0);
        // The default's own mask, which these flags must cover.
        assert_eq!(arg["value"], 0x7E02_0000_u64);
        assert!(clone[0].get("excludes").is_none());
    }

    #[test]
    fn the_rest_is_the_engine_default() {
        let default: Value = serde_json::from_str(MOBY_DEFAULT).unwrap();
        let profile = profile();
        assert_eq!(profile["defaultAction"], default["defaultAction"]);
        assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(profile["archMap"], default["archMap"]);
        let ours = |name: &str| {
            REFUSED
                .iter()
                .chain(NOT_IMPLEMENTED)
                .any(|c| c.name == name)
                || name == CLONE.name
        };
        // Every rule of the default is there, conditions intact, less ours.
        let derived = profile["syscalls"].as_array().unwrap();
        let mut matched = 0;
        for rule in default["syscalls"].as_array().unwrap() {
            let names: Vec<&str> = rule["names"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap())
                .filter(|n| !ours(n))
                .collect();
            if names.is_empty() {
                continue;
            }
            let mut expected = rule.clone();
            expected["names"] = json!(names);
            assert!(derived.contains(&expected), "{expected}");
            matched += 1;
        }
        assert_eq!(matched + 3, derived.len(), "plus the three of the policy");
        // Everyday syscalls are still allowed outright.
        for name in [
            "read", "write", "openat", "execve", "fork", "wait4", "socket",
        ] {
            let rules = rules_naming(&profile, name);
            assert!(
                rules.iter().any(|r| r["action"] == "SCMP_ACT_ALLOW"),
                "{name}: {rules:?}"
            );
        }
    }

    #[test]
    fn the_vendored_default_is_the_pinned_release() {
        use sha2::Digest;
        assert_eq!(
            hex::encode(sha2::Sha256::digest(MOBY_DEFAULT.as_bytes())),
            "01536f1d1df938ae611eba20d6349e0de7a99b6ecdee1549427a0b01b8301e28",
            "seccomp/moby-default.json changed: update seccomp/README.md's provenance"
        );
    }

    #[test]
    fn the_readme_lists_what_is_refused() {
        let readme = include_str!("../../../README.md");
        let missing: Vec<&str> = REFUSED
            .iter()
            .chain(NOT_IMPLEMENTED)
            .map(|call| call.name)
            .filter(|name| !readme.contains(&format!("`{name}`")))
            .collect();
        assert!(missing.is_empty(), "README's sandbox section: {missing:?}");
    }

    #[test]
    fn names_and_numbers_agree() {
        let names: Vec<&str> = REFUSED.iter().map(|c| c.name).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "no syscall twice");
        let by_name = |name: &str| REFUSED.iter().find(|c| c.name == name).unwrap().number;
        assert_eq!(by_name("mount"), Some(libc::SYS_mount));
        assert_eq!(by_name("io_uring_setup"), Some(libc::SYS_io_uring_setup));
        #[cfg(not(target_arch = "x86_64"))]
        assert_eq!(by_name("iopl"), None);
        assert_eq!(NOT_IMPLEMENTED[0].number, Some(libc::SYS_clone3));
        assert_eq!((CLONE.name, CLONE.number), ("clone", Some(libc::SYS_clone)));
    }
}
