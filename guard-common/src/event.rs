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

/// What the kernel did with a DNS message it reported.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// A deny rule matched in enforce mode: the message was dropped.
    Blocked = 1,
    /// A deny rule matched in audit mode: the message went through.
    Audited = 2,
    /// The message went to (or came from) a DNS port but could not be read
    /// with certainty (see [`Unreadable`]). Dropped in enforce mode.
    UnreadableBlocked = 3,
    /// As above in audit mode: let through, reported.
    UnreadableAudited = 4,
    /// Let through (no rule, or an allow rule); reported only for bindings
    /// in record mode, and only the first time a (name, type) is seen.
    Allowed = 5,
}

impl Verdict {
    pub const fn from_u8(value: u8) -> Option<Verdict> {
        match value {
            1 => Some(Verdict::Blocked),
            2 => Some(Verdict::Audited),
            3 => Some(Verdict::UnreadableBlocked),
            4 => Some(Verdict::UnreadableAudited),
            5 => Some(Verdict::Allowed),
            _ => None,
        }
    }

    pub const fn dropped(self) -> bool {
        matches!(self, Verdict::Blocked | Verdict::UnreadableBlocked)
    }
}

/// Why a message was unreadable: fail closed, and say why.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unreadable {
    None = 0,
    /// Shorter than a DNS header, or a record or name runs past its end.
    Truncated = 1,
    /// Not exactly one question.
    QuestionCount = 2,
    /// A compression pointer in a query's question.
    CompressedQuestion = 3,
    /// A label type other than a plain label or pointer (length byte 0x40
    /// to 0xbf).
    BadLabel = 4,
    /// A name over 255 bytes, or over 127 labels.
    NameTooLong = 5,
    /// A compression pointer that does not point back into the message, or
    /// too many of them.
    BadPointer = 6,
    /// More records than the kernel walks.
    TooManyRecords = 7,
    /// More IPv6 extension headers than the kernel follows: whether the
    /// packet is DNS cannot be seen.
    ExtensionHeaders = 8,
    /// TCP urgent data on a DNS connection (it would shift the stream the
    /// server reads).
    UrgentData = 9,
    /// TCP data on a DNS connection the stream inspection does not follow
    /// (not a whole message in one segment).
    UnfollowedStream = 10,
    /// A UDP GSO send with more datagrams than the kernel judges.
    TooManySegments = 11,
    /// The program's working memory was in use on this CPU (nested runs).
    Busy = 12,
}

impl Unreadable {
    pub const fn from_u8(value: u8) -> Unreadable {
        match value {
            1 => Unreadable::Truncated,
            2 => Unreadable::QuestionCount,
            3 => Unreadable::CompressedQuestion,
            4 => Unreadable::BadLabel,
            5 => Unreadable::NameTooLong,
            6 => Unreadable::BadPointer,
            7 => Unreadable::TooManyRecords,
            8 => Unreadable::ExtensionHeaders,
            9 => Unreadable::UrgentData,
            10 => Unreadable::UnfollowedStream,
            11 => Unreadable::TooManySegments,
            12 => Unreadable::Busy,
            _ => Unreadable::None,
        }
    }
}

pub const TRANSPORT_UDP: u8 = 17;
pub const TRANSPORT_TCP: u8 = 6;
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// A query leaving the cgroup.
pub const DIRECTION_QUERY: u8 = 1;
/// An answer arriving in the cgroup.
pub const DIRECTION_ANSWER: u8 = 2;

/// Where in an answer a refused name was found.
pub const SECTION_QUESTION: u8 = 0;
pub const SECTION_ANSWER: u8 = 1;
pub const SECTION_AUTHORITY: u8 = 2;
pub const SECTION_ADDITIONAL: u8 = 3;

/// Bytes of a refused answer kept in its event, so userspace can show the
/// alias chain that led to the refused name.
pub const MESSAGE_CAP: usize = 512;

/// A reported DNS message: a query (question decided) or an answer (every
/// name it would make the client use decided).
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
    /// [`DIRECTION_QUERY`] or [`DIRECTION_ANSWER`].
    pub direction: u8,
    /// An [`Unreadable`] reason (0 when the message was read).
    pub reason: u8,
    /// Query type (1 = A, 28 = AAAA, ...); 0 when the question was unreadable.
    pub qtype: u16,
    /// Rule table index of the deciding rule; `u32::MAX` when none.
    pub rule_id: u32,
    pub policy_id: u32,
    /// Thread group id (the process id userspace knows) of the asker: the
    /// sender of a query, the last sender of a query on the socket an
    /// answer arrived on.
    pub pid: u32,
    /// Thread id of the asker.
    pub tid: u32,
    /// The asker's port and the resolver's, host byte order.
    pub src_port: u16,
    pub dst_port: u16,
    /// Answers: the type of the record that carried the refused name (5 =
    /// CNAME, 33 = SRV, ...), and its section (`SECTION_*`).
    pub matched_type: u16,
    pub matched_section: u8,
    pub _pad: u8,
    pub cgroup_id: u64,
    /// Kernel socket cookie, used to end the asker's socket.
    pub socket_cookie: u64,
    /// `bpf_ktime_get_boot_ns` at the decision.
    pub boot_ns: u64,
    /// The asker's address and the resolver's; IPv4 uses the first four bytes.
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub comm: [u8; COMM_LEN],
    /// Bytes of `qname`, `matched` and `message` used.
    pub qname_len: u16,
    pub matched_len: u16,
    pub message_len: u16,
    pub _pad2: u16,
    /// The question name in wire format (length-prefixed labels), letter
    /// case as sent.
    pub qname: [u8; NAME_CAP],
    /// Answers: the refused name, decompressed, in wire format.
    pub matched: [u8; NAME_CAP],
    /// Answers: the first [`MESSAGE_CAP`] bytes of the message.
    pub message: [u8; MESSAGE_CAP],
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
const _: () = assert!(core::mem::size_of::<DnsEvent>() == 112 + 2 * NAME_CAP + MESSAGE_CAP);
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
