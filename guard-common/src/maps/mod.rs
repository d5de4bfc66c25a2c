//! Names and value types of the maps and globals of the kernel object. The
//! kernel side declares them; userspace finds them by these names.

#[cfg(feature = "user")]
mod user;

/// cgroup id -> [`Binding`]: which policy guards which cgroup.
pub const BINDINGS: &str = "BINDINGS";
/// [`crate::matching::RuleKey`] -> [`crate::matching::RuleEntry`].
pub const RULES: &str = "RULES";
/// Ring buffer of [`crate::event`] records.
pub const EVENTS: &str = "EVENTS";
/// Per-CPU `u64` counters indexed by [`Counter`].
pub const COUNTERS: &str = "COUNTERS";
/// Per-CPU hash policy id -> [`PolicyCounters`].
pub const POLICY_COUNTERS: &str = "POLICY_COUNTERS";
/// LRU map [`SeenKey`] -> `u64` query count, for bindings in record mode:
/// each distinct (name, type) is reported once, later queries only counted.
pub const SEEN: &str = "SEEN";

/// Global: destination ports treated as DNS, network byte order, 0 = unused.
pub const GLOBAL_DNS_PORTS: &str = "DNS_PORTS";
/// Global: offset of `child_pid` in the `sched_process_fork` record, which
/// differs between kernel versions; read from tracefs by userspace.
pub const GLOBAL_FORK_CHILD_PID_OFFSET: &str = "FORK_CHILD_PID_OFFSET";

pub const MAX_DNS_PORTS: usize = 4;
/// How deep below a guarded cgroup a process may sit and still be found by
/// the ancestor walk.
pub const MAX_CGROUP_DEPTH: u32 = 32;

pub const PROGRAM_DNS_EGRESS: &str = "dns_egress";
pub const PROGRAM_EXEC_ENTER: &str = "exec_enter";
pub const PROGRAM_EXEC_EXIT: &str = "exec_exit";
pub const PROGRAM_FORK: &str = "process_fork";

/// Binding of a cgroup to a policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    pub policy_id: u32,
    /// Non-zero: report instead of dropping, whatever the rules say.
    pub audit_only: u8,
    /// Non-zero: also report allowed names, once per (name, type).
    pub record: u8,
    pub _pad: [u8; 2],
    /// [`crate::matching::label_bit`] of every label count the policy's
    /// names have: lookups for other suffixes are skipped.
    pub label_mask: u64,
}

/// Key of [`SEEN`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeenKey {
    pub policy_id: u32,
    pub qtype: u16,
    pub _pad: u16,
    /// [`crate::matching::name_hash`] of the whole name.
    pub name_hash: u64,
}

/// Indices of the per-CPU counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// DNS queries whose question was inspected.
    Inspected = 0,
    Blocked = 1,
    Audited = 2,
    Malformed = 3,
    /// Records that did not fit in the ring buffer.
    EventsLost = 4,
    /// DNS packets from a cgroup with no binding (dropped: fail closed).
    Unbound = 5,
}

pub const COUNTER_SLOTS: u32 = 8;

/// Value of [`POLICY_COUNTERS`]: the [`Counter`]s of one policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyCounters {
    pub values: [u64; COUNTER_SLOTS as usize],
}
