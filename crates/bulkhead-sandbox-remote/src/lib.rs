//! Sandboxes over HTTP, so that the process an agent talks to never holds
//! the means to make one.
//!
//! [`server`] is `bulkhead sandboxd`: the only process given the Docker
//! Engine socket (or the privileges the namespace backend needs). It wraps a
//! local [`Backend`](bulkhead_sandbox::Backend) and serves create, run,
//! hosting a program and destroy to agent servers that present a shared
//! token. [`client`] is the `remote` backend those agent servers use: it
//! implements the same trait, so the agent loop cannot tell it from a
//! local backend.
//!
//! sandboxd treats its own limits as ceilings: a client may ask for less
//! memory, CPU, pids, time, output or disk than sandboxd is configured
//! with, never more. A compromised agent server can therefore run code in
//! sandboxes, which is its job, but cannot lift their limits or reach the
//! engine.
//!
//! The protocol is JSON over HTTP/1.1, every path but `/health` behind
//! `Authorization: Bearer <token>`:
//!
//! | request | answer |
//! |---|---|
//! | `GET /health` | `{"status":"healthy"}` |
//! | `GET /v1/scopes/{scope}/probe` | a [`Probe`](bulkhead_sandbox::Probe) |
//! | `GET /v1/scopes/{scope}/ping` | 204: sandboxd answers and takes the token |
//! | `PUT /v1/scopes/{scope}/sandboxes/{id}` with [`Limits`](bulkhead_sandbox::Limits) | the limits applied (made if not held; a held one is kept) |
//! | `POST /v1/scopes/{scope}/sandboxes/{id}/run` with a [`RunRequest`] | an [`ExecResult`](bulkhead_sandbox::ExecResult) |
//! | `POST /v1/scopes/{scope}/sandboxes/{id}/processes` with a [`ProcessRequest`](stdio::ProcessRequest), `Connection: upgrade`, `Upgrade: bulkhead-stdio` | 101 once the program has started, then the program's stdio in [`stdio`] frames; 426 without the upgrade |
//! | `DELETE /v1/scopes/{scope}/sandboxes/{id}` | 204 |
//! | `DELETE /v1/scopes/{scope}/sandboxes` | `{"removed": n}`: the scope's leftovers |
//!
//! A hosted program lives as long as its connection: stdin and a "stdin
//! closed" go one way, stdout and then how the program ended
//! ([`ProcessExit`](bulkhead_sandbox::ProcessExit), stderr included) the
//! other; a client that closes the connection has the program killed.
//!
//! A scope is one agent server's share of the engine (its `SANDBOX_SCOPE`):
//! removing leftovers at one server's start leaves the others' sandboxes
//! alone. Errors are `{"error": {"code", "message"}}`: 401 for a wrong
//! token, 422 for a request no backend can carry out, 503 when isolation
//! cannot be had.

pub mod client;
pub mod server;
pub mod stdio;

/// Whether `name` may name a scope, a sandbox on sandboxd, or the volume
/// sandboxes share: 1 to 128 letters, digits, `-`, `_` or `.`, and not dots
/// alone (`.` and `..` would be paths). The agent server's configuration,
/// the remote client and sandboxd all check names with this one rule.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.chars().all(|c| c == '.')
}

use bulkhead_sandbox::{Limits, Operation};
use serde::{Deserialize, Serialize};

/// The body of a run: the operation, and the limits of the sandbox it runs
/// in, so that a sandboxd which restarted since the sandbox was made can
/// make it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRequest {
    pub limits: Limits,
    pub operation: Operation,
}

/// The error body both sides agree on.
#[derive(Debug, Serialize, Deserialize)]
struct ErrorBody {
    error: ErrorObject,
}

#[derive(Debug, Serialize, Deserialize)]
struct ErrorObject {
    code: String,
    message: String,
}

#[cfg(test)]
mod tests {
    use super::is_valid_name;

    #[test]
    fn names_are_plain_words_never_paths() {
        for good in ["bulkhead", "team-a_1", "v1.2", ".hidden", &"a".repeat(128)] {
            assert!(is_valid_name(good), "{good:?}");
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b", "ü", &"a".repeat(129)] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
    }
}
