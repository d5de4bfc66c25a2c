//! The maps, globals and programs that watch for ways around the DNS hooks
//! (issue 11): tasks leaving their guarded cgroup, packet and raw sockets,
//! `bpf()` calls that could detach or change guard, and Unix-socket
//! connections to local resolver daemons. Records are
//! [`crate::event::EvidenceEvent`]s in the shared ring buffer.

/// Task id -> id of the cgroup that guards it (its bound cgroup or bound
/// ancestor). Filled when a guarded task forks or a task enters a guarded
/// cgroup; a task whose guarding cgroup changes without a binding to go
/// with it has escaped.
pub const TRACKED: &str = "TRACKED";
/// Per-CPU hash policy id -> [`EvidenceCounters`]: exact counts, so a record
/// lost from a full ring buffer still fails the run.
pub const EVIDENCE_COUNTERS: &str = "EVIDENCE_COUNTERS";
/// Policy id -> [`EvidenceSettings`].
pub const EVIDENCE_SETTINGS: &str = "EVIDENCE_SETTINGS";
/// [`UnixPath`] -> [`UNIX_REFUSE`] or [`UNIX_NOTE`]: the Unix sockets the
/// `connect_unix`/`sendmsg_unix` programs act on.
pub const UNIX_SOCKETS: &str = "UNIX_SOCKETS";

/// Globals: offsets of `uaddr` and `uaddrlen` in the kernel's `struct
/// bpf_sock_addr_kern` (the real context of sock_addr programs), read from
/// the kernel's BTF by userspace.
pub const GLOBAL_UNIX_UADDR_OFFSET: &str = "UNIX_UADDR_OFFSET";
pub const GLOBAL_UNIX_UADDRLEN_OFFSET: &str = "UNIX_UADDRLEN_OFFSET";

pub const PROGRAM_ESCAPE_ATTACH: &str = "escape_attach";
pub const PROGRAM_ESCAPE_FORK: &str = "escape_fork";
pub const PROGRAM_ESCAPE_CLONE3: &str = "escape_clone3";
pub const PROGRAM_ESCAPE_EXIT: &str = "escape_exit";
pub const PROGRAM_ESCAPE_SOCKET: &str = "escape_socket";
pub const PROGRAM_ESCAPE_BPF: &str = "escape_bpf";
pub const PROGRAM_UNIX_CONNECT: &str = "unix_connect";
pub const PROGRAM_UNIX_SENDMSG: &str = "unix_sendmsg";

/// The escape tracepoints: (program, category, event).
pub const ESCAPE_TRACEPOINTS: [(&str, &str, &str); 6] = [
    (PROGRAM_ESCAPE_ATTACH, "cgroup", "cgroup_attach_task"),
    (PROGRAM_ESCAPE_FORK, "sched", "sched_process_fork"),
    (PROGRAM_ESCAPE_CLONE3, "syscalls", "sys_exit_clone3"),
    (PROGRAM_ESCAPE_EXIT, "sched", "sched_process_exit"),
    (PROGRAM_ESCAPE_SOCKET, "syscalls", "sys_enter_socket"),
    (PROGRAM_ESCAPE_BPF, "syscalls", "sys_enter_bpf"),
];

/// `args[0]` of a `LeftCgroup` or `Moved` record: where it was seen.
pub const SEEN_MOVED_ITSELF: u64 = 1;
pub const SEEN_MOVED_BY_ANOTHER: u64 = 2;
pub const SEEN_FORKING: u64 = 3;
/// The child of a clone3 found itself elsewhere (`CLONE_INTO_CGROUP`).
pub const SEEN_CLONE3_CHILD: u64 = 4;

/// Tasks tracked at once (per loaded object).
pub const TRACKED_CAPACITY: u32 = 65_536;
/// Bytes of a Unix socket path (`sun_path`).
pub const UNIX_PATH_LEN: usize = 108;

/// Refuse the connection (EPERM): the caller falls back to DNS.
pub const UNIX_REFUSE: u8 = 1;
/// Let it through and note it.
pub const UNIX_NOTE: u8 = 2;

/// Key of [`UNIX_SOCKETS`]: a socket path, NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnixPath {
    /// [`UNIX_PATH_LEN`] bytes of path, then padding, all zero after the
    /// path.
    pub bytes: [u8; 112],
}

impl UnixPath {
    /// None when the path does not fit in `sun_path` with its NUL.
    pub fn new(path: &[u8]) -> Option<UnixPath> {
        if path.is_empty() || path.len() >= UNIX_PATH_LEN {
            return None;
        }
        let mut bytes = [0u8; 112];
        bytes[..path.len()].copy_from_slice(path);
        Some(UnixPath { bytes })
    }
}

/// Value of [`EVIDENCE_SETTINGS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvidenceSettings {
    /// Non-zero: escapes and packet sockets are killed (enforce mode). A
    /// policy without settings follows its binding's mode.
    pub enforce: u8,
    /// Non-zero: packet and raw sockets are allowed (recorded, not killed,
    /// and they do not fail the run).
    pub allow_raw_sockets: u8,
    pub _pad: [u8; 6],
}

/// Slots of [`EvidenceCounters`], indexed by
/// [`crate::event::EvidenceKind`].
pub const EVIDENCE_SLOTS: usize = 16;

/// Value of [`EVIDENCE_COUNTERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvidenceCounters {
    pub values: [u64; EVIDENCE_SLOTS],
}

#[cfg(feature = "user")]
mod user {
    use super::{EvidenceCounters, EvidenceSettings, UnixPath};
    // SAFETY: repr(C) structs of integers and byte arrays, no implicit padding.
    unsafe impl aya::Pod for UnixPath {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EvidenceSettings {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EvidenceCounters {}
}

const _: () = assert!(core::mem::size_of::<UnixPath>() == 112);
const _: () = assert!(core::mem::size_of::<EvidenceSettings>() == 8);
