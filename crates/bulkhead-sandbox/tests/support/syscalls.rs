//! The syscall battery, shared by the backend battery and sandboxd's tests
//! (`#[path]`-included there): `syscalls.py` makes each syscall of
//! [`bulkhead_sandbox::seccomp_policy`] with arguments that would succeed
//! (or fail with another errno) if it were allowed; the numbers it uses are
//! the policy's, passed on its command line.

// Each test crate that includes this uses part of it.
#![allow(dead_code)]

use bulkhead_sandbox::seccomp_policy::{CLONE, NAMESPACE_FLAGS, NOT_IMPLEMENTED, REFUSED};
use bulkhead_sandbox::{ExecResult, Operation};

const PROGRAM: &str = include_str!("syscalls.py");

/// `python3 -c <battery> <the policy's syscalls>`.
pub fn operation() -> Operation {
    let numbers = |calls: &[bulkhead_sandbox::seccomp_policy::Syscall]| {
        calls
            .iter()
            .filter_map(|call| Some((call.name.to_string(), serde_json::json!(call.number?))))
            .collect::<serde_json::Map<_, _>>()
    };
    let spec = serde_json::json!({
        "refused": numbers(REFUSED),
        "not_implemented": numbers(NOT_IMPLEMENTED),
        "clone": CLONE.number,
        "namespace_flags": NAMESPACE_FLAGS
            .iter()
            .map(|(name, flag)| (name.to_string(), serde_json::json!(flag)))
            .collect::<serde_json::Map<_, _>>(),
    });
    Operation::Exec {
        argv: vec![
            "python3".into(),
            "-c".into(),
            PROGRAM.into(),
            spec.to_string(),
        ],
        timeout: None,
    }
}

/// What one attempt got.
#[derive(Debug)]
pub struct Outcome {
    pub call: String,
    /// `reachable` (an unfiltered process without capabilities gets
    /// something other than EPERM), `capability` (the kernel's capability
    /// check comes first: EPERM either way) or `allowed` (must work).
    pub gate: String,
    /// `ok`, an errno name, or `killed by SIG…`.
    pub answer: String,
}

/// The battery's report (its stdout), checked to cover the whole policy.
pub fn outcomes(stdout: &str) -> Vec<Outcome> {
    assert!(
        !stdout.contains("missing "),
        "syscalls.py has no attempt for some syscalls of the policy: add them\n{stdout}"
    );
    let outcomes: Vec<Outcome> = stdout
        .lines()
        .map(|line| {
            let mut fields = line.splitn(3, ' ');
            let mut field = || {
                fields
                    .next()
                    .unwrap_or_else(|| panic!("a battery line is `call gate answer`: {line:?}"))
                    .to_string()
            };
            Outcome {
                call: field(),
                gate: field(),
                answer: field(),
            }
        })
        .collect();
    let expected = REFUSED.iter().filter(|c| c.number.is_some()).count()
        + NOT_IMPLEMENTED.len()
        + NAMESPACE_FLAGS.len()
        + 1;
    assert_eq!(outcomes.len(), expected, "{stdout}");
    outcomes
}

/// Every syscall of the policy refused as the policy says, and a plain
/// `clone` (fork) still working.
pub fn assert_refused(result: &ExecResult) {
    assert_eq!(result.exit_code, Some(0), "the battery ran: {result:?}");
    let wrong: Vec<String> = outcomes(&result.stdout.text)
        .iter()
        .filter(|o| {
            let expected = match o.call.as_str() {
                "clone()" => "ok",
                call if NOT_IMPLEMENTED.iter().any(|c| c.name == call) => "ENOSYS",
                _ => "EPERM",
            };
            o.answer != expected
        })
        .map(|o| format!("{} ({}): {}", o.call, o.gate, o.answer))
        .collect();
    assert!(
        wrong.is_empty(),
        "syscalls the policy refuses got through, or were refused wrongly:\n{}",
        wrong.join("\n")
    );
}

/// Without a filter, every `reachable` attempt gets something other than
/// EPERM: the battery's arguments can tell a filter's refusal apart.
pub fn assert_unfiltered(stdout: &str) {
    let indistinct: Vec<String> = outcomes(stdout)
        .iter()
        .filter(|o| o.gate != "capability" && o.answer == "EPERM")
        .map(|o| o.call.clone())
        .collect();
    assert!(
        indistinct.is_empty(),
        "unfiltered, these still answered EPERM, so the battery cannot tell a refusal by the filter: {indistinct:?}"
    );
}
