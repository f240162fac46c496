//! The seccomp filter every sandboxed program runs under: the policy of
//! [`crate::seccomp_policy`] (the syscalls that change mounts, namespaces,
//! the kernel or other processes are refused), compiled for this
//! architecture; every other syscall is allowed.

use std::collections::BTreeMap;

use crate::seccomp_policy::{CLONE, NAMESPACE_FLAGS, NOT_IMPLEMENTED, REFUSED};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32) -> Result<BpfProgram, String> {
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        ARCH,
    )
    .and_then(|filter| filter.try_into())
    .map_err(|e| format!("cannot build the seccomp filter: {e}"))
}

/// x32 syscalls carry the x86_64 architecture value with bit 30 set in
/// their number, so the filters above, which match exact numbers, would let
/// `io_uring_setup | 0x40000000` through on a kernel with x32 enabled. This
/// answers every x32 syscall ENOSYS, as a kernel without x32 does.
#[cfg(target_arch = "x86_64")]
fn x32_refused() -> BpfProgram {
    use seccompiler::sock_filter;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let statement = |code: u32, k: u32| sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    vec![
        // seccomp_data.nr, at offset 0.
        statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        statement(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        ),
        statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Installs the filters on the calling thread (no_new_privs must be set).
pub(crate) fn install() -> Result<(), String> {
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> = REFUSED
        .iter()
        .filter_map(|call| call.number)
        .map(|number| (number, Vec::new()))
        .collect();
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&(_, flag)| {
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .and_then(|condition| SeccompRule::new(vec![condition]))
            .map_err(|e| format!("cannot build the seccomp filter: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(clone) = CLONE.number {
        denied.insert(clone, clone_rules);
    }
    let clone3: BTreeMap<i64, Vec<SeccompRule>> = NOT_IMPLEMENTED
        .iter()
        .filter_map(|call| call.number)
        .map(|number| (number, Vec::new()))
        .collect();
    let programs = [
        compile(denied, libc::EPERM)?,
        compile(clone3, libc::ENOSYS)?,
        #[cfg(target_arch = "x86_64")]
        x32_refused(),
    ];
    for program in &programs {
        seccompiler::apply_filter(program)
            .map_err(|e| format!("cannot install the seccomp filter: {e}"))?;
    }
    Ok(())
}
