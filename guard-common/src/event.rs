//! Records the kernel programs send to userspace through the ring buffer.
//!
//! Every record starts with a one-byte [`EventKind`], so userspace can tell
//! them apart before interpreting the rest.

/// Capacity of a query name in an event: the longest wire-format name (255)
/// plus room for the terminating byte.
pub const NAME_CAP: usize = 256;
/// Bytes of argument text kept per exec (NUL-separated arguments).
pub const ARGS_CAP: usize = 1024;
/// Arguments read per exec.
pub const MAX_ARGS: usize = 20;
/// Bytes of the executable path kept per exec.
pub const PATH_CAP: usize = 256;
pub const COMM_LEN: usize = 16;

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Dns = 1,
    Exec = 2,
    ExecResult = 3,
    Fork = 4,
    // Kinds from 16 on are the evidence records ([`EvidenceEvent`]),
    // numbered apart from the DNS records so both families can grow.
    Evidence = 16,
}

/// What the kernel did with a DNS query it reported.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// A deny rule matched in enforce mode: the packet was dropped.
    Blocked = 1,
    /// A deny rule matched in audit mode: the packet went through.
    Audited = 2,
    /// The packet was sent to a DNS port but its question could not be read
    /// (compression pointer in the question, over-long label or name,
    /// truncated, several questions). Dropped in enforce mode.
    MalformedBlocked = 3,
    /// As above in audit mode: let through, reported.
    MalformedAudited = 4,
    /// Let through (no rule, or an allow rule); reported only for bindings
    /// in record mode, and only the first time a (name, type) is seen.
    Allowed = 5,
}

impl Verdict {
    pub const fn from_u8(value: u8) -> Option<Verdict> {
        match value {
            1 => Some(Verdict::Blocked),
            2 => Some(Verdict::Audited),
            3 => Some(Verdict::MalformedBlocked),
            4 => Some(Verdict::MalformedAudited),
            5 => Some(Verdict::Allowed),
            _ => None,
        }
    }

    pub const fn dropped(self) -> bool {
        matches!(self, Verdict::Blocked | Verdict::MalformedBlocked)
    }
}

pub const TRANSPORT_UDP: u8 = 17;
pub const TRANSPORT_TCP: u8 = 6;
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// A reported DNS query.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DnsEvent {
    /// [`EventKind::Dns`].
    pub kind: u8,
    /// A [`Verdict`].
    pub verdict: u8,
    /// [`TRANSPORT_UDP`] or [`TRANSPORT_TCP`].
    pub transport: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Query type (1 = A, 28 = AAAA, ...); 0 when the question was unreadable.
    pub qtype: u16,
    /// Bytes of `qname` that hold the name, leading dot included.
    pub qname_len: u16,
    /// Rule table index of the matching rule; `u32::MAX` when none.
    pub rule_id: u32,
    pub policy_id: u32,
    /// Thread group id (the process id userspace knows) of the sender.
    pub pid: u32,
    /// Thread id of the sender.
    pub tid: u32,
    /// Source and destination ports, host byte order.
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP sequence number of the segment (retransmits repeat it).
    pub tcp_seq: u32,
    pub cgroup_id: u64,
    /// Kernel socket cookie, used to end a blocked TCP connection.
    pub socket_cookie: u64,
    /// `bpf_ktime_get_boot_ns` at the decision.
    pub boot_ns: u64,
    /// IPv4 addresses use the first four bytes.
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub comm: [u8; COMM_LEN],
    /// The question name as sent (letter case untouched), in wire order with
    /// every length byte replaced by `.`: `.api.Frontend.internal`. Byte 0 is
    /// always the dot that stood for the first length byte.
    pub qname: [u8; NAME_CAP],
}

/// Sent when a process in a guarded cgroup calls execve (before the kernel
/// knows whether it will succeed; see [`ExecResultEvent`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecEvent {
    pub kind: u8,
    pub _pad: [u8; 3],
    pub pid: u32,
    pub tid: u32,
    /// Number of arguments captured (at most [`MAX_ARGS`]).
    pub argc: u32,
    /// Bytes of `args` used, NULs included.
    pub args_len: u32,
    /// Non-zero when argv had more than [`MAX_ARGS`] entries or did not fit.
    pub args_truncated: u32,
    /// Policy of the binding that guards the process (routes the record).
    pub policy_id: u32,
    pub path: [u8; PATH_CAP],
    /// NUL-separated arguments. Sized to let the kernel write a whole
    /// argument at any offset below [`ARGS_CAP`] without a bounds failure.
    pub args: [u8; ARGS_CAP + PATH_CAP],
}

/// Outcome of an execve reported by [`ExecEvent`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecResultEvent {
    pub kind: u8,
    pub _pad: [u8; 3],
    pub pid: u32,
    pub tid: u32,
    /// 0 on success, `-errno` otherwise.
    pub ret: i32,
    pub policy_id: u32,
}

/// A process or thread created by a process in a guarded cgroup.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ForkEvent {
    pub kind: u8,
    pub _pad: [u8; 3],
    /// Process id of the creator.
    pub parent_pid: u32,
    /// Task id of the new task (its process id unless it is a thread).
    pub child_pid: u32,
    pub policy_id: u32,
    pub comm: [u8; COMM_LEN],
}

// Layouts are part of the kernel/userspace contract; a change must be
// deliberate.
const _: () = assert!(core::mem::size_of::<DnsEvent>() == 104 + NAME_CAP);
const _: () = assert!(core::mem::size_of::<ExecEvent>() == 28 + PATH_CAP + ARGS_CAP + PATH_CAP);
const _: () = assert!(core::mem::size_of::<ExecResultEvent>() == 20);
const _: () = assert!(core::mem::size_of::<ForkEvent>() == 32);

/// What an [`EvidenceEvent`] reports: a way around the DNS hooks that a
/// process of a guarded cgroup took or tried.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EvidenceKind {
    /// A task left the cgroup that guarded it (seen in its own context:
    /// certain). `target_cgroup` is where it is now (0: unknown).
    LeftCgroup = 1,
    /// Another process moved a guarded task to a cgroup that is not itself
    /// bound. Whether that is still inside the guarded tree is decided in
    /// userspace from `path` (the destination's path in the hierarchy).
    Moved = 2,
    /// `socket()` of a packet socket (`AF_PACKET`, `SOCK_PACKET`, `AF_XDP`):
    /// it sends below the cgroup hooks. `args`: family, type, protocol.
    PacketSocket = 3,
    /// `socket()` of a raw IP socket: its packets are inspected, but it can
    /// forge any transport header. `args`: family, type, protocol.
    RawSocket = 4,
    /// `bpf()` with a command that changes programs, links or maps (detach,
    /// replace, map writes). `args[0]`: the command.
    Bpf = 5,
    /// A connection to (or datagram for) a local resolver daemon's socket
    /// was refused, so the lookup goes back on the wire. `path`: the socket.
    ResolverRefused = 6,
    /// A connection to a socket that hands work to a process outside the
    /// cgroup (systemd, D-Bus): noted, not refused. `path`: the socket.
    Handoff = 7,
    /// A task of a guarded cgroup could not be tracked (map full): its
    /// escapes would go unseen.
    Untracked = 8,
}

impl EvidenceKind {
    pub const fn from_u8(value: u8) -> Option<EvidenceKind> {
        match value {
            1 => Some(EvidenceKind::LeftCgroup),
            2 => Some(EvidenceKind::Moved),
            3 => Some(EvidenceKind::PacketSocket),
            4 => Some(EvidenceKind::RawSocket),
            5 => Some(EvidenceKind::Bpf),
            6 => Some(EvidenceKind::ResolverRefused),
            7 => Some(EvidenceKind::Handoff),
            8 => Some(EvidenceKind::Untracked),
            _ => None,
        }
    }
}

/// [`EvidenceEvent::action`]: only recorded.
pub const ACTION_RECORDED: u8 = 0;
/// [`EvidenceEvent::action`]: the kernel sent SIGKILL to the acting process.
pub const ACTION_KILLED: u8 = 1;
/// [`EvidenceEvent::action`]: the call was refused (EPERM).
pub const ACTION_REFUSED: u8 = 2;

/// A way around the DNS hooks, seen by the kernel.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EvidenceEvent {
    /// [`EventKind::Evidence`].
    pub kind: u8,
    /// An [`EvidenceKind`].
    pub what: u8,
    /// [`ACTION_RECORDED`], [`ACTION_KILLED`] or [`ACTION_REFUSED`].
    pub action: u8,
    pub _pad: u8,
    /// Policy of the binding concerned (routes the record); `u32::MAX`
    /// when none is known.
    pub policy_id: u32,
    /// Process and thread that acted (the writer of `cgroup.procs`, the
    /// caller of `socket()`, ...).
    pub pid: u32,
    pub tid: u32,
    /// The task concerned: the one that moved, else the acting thread.
    pub subject: u32,
    /// Level of `target_cgroup` in the hierarchy.
    pub target_level: u32,
    /// The cgroup that guarded the task.
    pub guarded_cgroup: u64,
    /// Where the task went.
    pub target_cgroup: u64,
    pub args: [u64; 3],
    /// `bpf_ktime_get_boot_ns`.
    pub boot_ns: u64,
    pub comm: [u8; COMM_LEN],
    /// NUL-terminated: the destination cgroup's path in the hierarchy, or
    /// the Unix socket's path.
    pub path: [u8; PATH_CAP],
}

const _: () = assert!(core::mem::size_of::<EvidenceEvent>() == 88 + PATH_CAP);
