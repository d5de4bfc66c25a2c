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

/// Sockhash of the TCP connections to DNS ports of guarded cgroups, keyed
/// by socket cookie: the stream programs (sk_msg for queries, sk_skb for
/// answers) are attached to it.
pub const SOCKETS: &str = "SOCKETS";
/// Socket-local storage: [`SockState`].
pub const SOCK_STATE: &str = "SOCK_STATE";
/// LRU hash socket cookie -> the binding and the last asker of the socket,
/// for the programs that run where the asker is not the current task
/// (answers arriving, stream answers).
pub const ASKERS: &str = "ASKERS";
/// Working memory of the DNS programs: two slots per CPU (a softirq can
/// interrupt a run in process context). Sized by userspace.
pub const SCRATCH: &str = "SCRATCH";

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
pub const PROGRAM_DNS_INGRESS: &str = "dns_ingress";
pub const PROGRAM_SOCK_OPS: &str = "dns_sock_ops";
pub const PROGRAM_STREAM_SEND: &str = "dns_stream_send";
pub const PROGRAM_STREAM_PARSE: &str = "dns_stream_parse";
pub const PROGRAM_STREAM_ANSWER: &str = "dns_stream_answer";
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
    /// Queries and answers refused by a deny rule (enforce mode).
    Blocked = 1,
    /// Queries and answers a deny rule matched in audit mode.
    Audited = 2,
    /// Queries and answers that could not be read with certainty.
    Unreadable = 3,
    /// Records that did not fit in the ring buffer.
    EventsLost = 4,
    /// DNS packets from a cgroup with no binding (dropped: fail closed).
    Unbound = 5,
    /// DNS answers inspected.
    AnswersInspected = 6,
}

pub const COUNTER_SLOTS: u32 = 8;

/// [`SockState::flags`]: the socket's answers are followed by the stream
/// programs (it is in [`SOCKETS`]): the stream parser puts them together.
pub const SOCK_STREAM_FOLLOWED: u32 = 1;
/// [`SockState::flags`]: the egress program saw the connection's SYN, so
/// [`SockState::isn`] is known and data can be placed in the stream.
pub const SOCK_SYN_SEEN: u32 = 2;

/// Value of [`SOCK_STATE`]: what the programs remember of a TCP connection
/// to a DNS port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    pub flags: u32,
    /// The initial sequence number (the SYN's): stream offset 0 is `isn + 1`.
    pub isn: u32,
    /// Bytes of the stream, from offset 0, already judged as whole messages
    /// (by the sk_msg program as they were written, or by the egress
    /// program): data below it leaves unjudged again, data beyond it is
    /// judged when it leaves.
    pub judged: u32,
    pub _pad: u32,
    /// The socket's cookie (the sk_msg program cannot ask for it).
    pub cookie: u64,
}

/// Value of [`POLICY_COUNTERS`]: the [`Counter`]s of one policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyCounters {
    pub values: [u64; COUNTER_SLOTS as usize],
}
