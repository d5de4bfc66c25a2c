//! Test-only fault injection, for the fault suite (`tests/faults.rs`).
//!
//! `GUARD_FAULT_AT=<step>` makes the process kill itself with SIGKILL, as
//! `kill -9` would, when it reaches the named step; the steps are the
//! [`point`] calls (the daemon's run set-up and tear-down). A few waits can
//! be shortened the same way ([`duration`]), so a test of "the daemon does
//! not come back" does not wait half a minute. Both are honoured only in
//! debug builds: a release build never reads these variables.
use std::time::Duration;

/// The variable naming the step to die at.
pub const FAULT_AT: &str = "GUARD_FAULT_AT";

/// Dies here (SIGKILL) if this is the step `GUARD_FAULT_AT` names.
pub fn point(step: &str) {
    if cfg!(debug_assertions) && std::env::var(FAULT_AT).is_ok_and(|at| at == step) {
        tracing::warn!(step, "{FAULT_AT}: killing myself here");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Whether the variable `name` is set to `1` (debug builds only): a fault a
/// test asks for that is not a crash (counters that cannot be read, ...).
pub fn asked(name: &str) -> bool {
    cfg!(debug_assertions) && std::env::var(name).is_ok_and(|v| v == "1")
}

/// `default`, or in debug builds the milliseconds the variable `name` gives.
pub fn duration(name: &str, default: Duration) -> Duration {
    if !cfg!(debug_assertions) {
        return default;
    }
    std::env::var(name)
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(default, Duration::from_millis)
}
