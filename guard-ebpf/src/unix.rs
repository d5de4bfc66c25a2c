//! `unix_connect`, `unix_sendmsg` (cgroup sock_addr, Unix-socket hooks of
//! Linux 6.7+): connections from a guarded cgroup to a local resolver
//! daemon's socket (nscd, systemd-resolved's varlink) are refused, so the
//! C library falls back to sending its own DNS queries, which the egress
//! program judges. Sockets that hand work to a process outside the cgroup
//! (systemd, D-Bus) are noted. Everything else passes untouched.
//!
//! aya 0.14 has no attach type for these hooks: the programs sit in
//! sections aya can parse and userspace loads them itself with the right
//! expected attach type (`guard-daemon/src/kernel/unixhooks.rs`).
//!
//! The path is not in the program's context fields for Unix sockets; it is
//! read from the kernel's copy of the address (`struct bpf_sock_addr_kern`,
//! the real context), at offsets userspace takes from the kernel's BTF.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_probe_read_kernel, bpf_probe_read_kernel_str},
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, PerCpuArray},
    programs::SockAddrContext,
};
use guard_common::{
    event::{EvidenceKind, ACTION_RECORDED, ACTION_REFUSED},
    evidence::{UnixPath, UNIX_PATH_LEN, UNIX_REFUSE},
};

use crate::evidence::{count, current_guard, current_tid, write_record, Evidence};

const AF_UNIX: u32 = 1;
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
/// `sun_family` precedes the path in `struct sockaddr_un`.
const SUN_PATH_OFFSET: usize = 2;

/// Offsets of `uaddr` and `uaddrlen` in `struct bpf_sock_addr_kern`
/// (Linux 6.7+ layout by default); set from BTF at load time.
#[unsafe(no_mangle)]
static UNIX_UADDR_OFFSET: u32 = 8;
#[unsafe(no_mangle)]
static UNIX_UADDRLEN_OFFSET: u32 = 32;

/// The sockets acted on: path -> UNIX_REFUSE or UNIX_NOTE.
#[map]
pub static UNIX_SOCKETS: HashMap<UnixPath, u8> = HashMap::with_max_entries(64, 0);

/// The path being looked up (too big for the stack next to the rest).
#[map]
static UNIX_SCRATCH: PerCpuArray<UnixPath> = PerCpuArray::with_max_entries(1, 0);

#[cgroup_sock_addr(connect4)]
pub fn unix_connect(ctx: SockAddrContext) -> i32 {
    judge(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn unix_sendmsg(ctx: SockAddrContext) -> i32 {
    judge(&ctx)
}

#[inline(always)]
fn judge(ctx: &SockAddrContext) -> i32 {
    if unsafe { (*ctx.sock_addr).user_family } != AF_UNIX {
        return ALLOW;
    }
    let Some(key) = UNIX_SCRATCH.get_ptr_mut(0) else {
        return ALLOW;
    };
    let key = unsafe { &mut *key };
    if !read_path(ctx, key) {
        return ALLOW;
    }
    // By reference: the key stays in the scratch map instead of being
    // copied to the 512-byte stack.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let Some(action) = (unsafe { UNIX_SOCKETS.get(&*key) }).copied() else {
        return ALLOW;
    };
    let refuse = action == UNIX_REFUSE;
    let guard = current_guard();
    let evidence = Evidence {
        what: if refuse {
            EvidenceKind::ResolverRefused
        } else {
            EvidenceKind::Handoff
        },
        action: if refuse {
            ACTION_REFUSED
        } else {
            ACTION_RECORDED
        },
        policy_id: guard.map_or(u32::MAX, |(_, b)| b.policy_id),
        subject: current_tid(),
        guarded_cgroup: guard.map_or(0, |(id, _)| id),
        target_cgroup: 0,
        target_level: 0,
        args: [0; 3],
    };
    count(evidence.policy_id, evidence.what as usize);
    write_record(&evidence, |path| {
        path[..UNIX_PATH_LEN].copy_from_slice(&key.bytes[..UNIX_PATH_LEN]);
    });
    if refuse {
        REFUSE
    } else {
        ALLOW
    }
}

/// Reads the socket path into `key`, NUL-padded, stopping at the address
/// length the caller gave (the kernel ignores what lies beyond it).
#[inline(always)]
fn read_path(ctx: &SockAddrContext, key: &mut UnixPath) -> bool {
    let kernel_ctx = ctx.sock_addr as *const u8;
    let uaddr_at = unsafe { core::ptr::read_volatile(&UNIX_UADDR_OFFSET) } as usize;
    let len_at = unsafe { core::ptr::read_volatile(&UNIX_UADDRLEN_OFFSET) } as usize;
    let mut uaddr: u64 = 0;
    let mut uaddrlen: u32 = 0;
    let read = |dst: *mut c_void, size: u32, at: usize| unsafe {
        bpf_probe_read_kernel(dst, size, kernel_ctx.wrapping_add(at & 0xff).cast())
    };
    if read((&mut uaddr as *mut u64).cast(), 8, uaddr_at) != 0
        || read((&mut uaddrlen as *mut u32).cast(), 4, len_at) != 0
        || uaddr == 0
        || (uaddrlen as usize) <= SUN_PATH_OFFSET
    {
        return false;
    }
    key.bytes = [0; 112];
    let path_len = (uaddrlen as usize - SUN_PATH_OFFSET).min(UNIX_PATH_LEN);
    // With room for the NUL the helper adds; an abstract socket (leading
    // NUL) reads as empty and matches nothing.
    let copied = unsafe {
        bpf_probe_read_kernel_str(
            key.bytes.as_mut_ptr().cast(),
            (path_len as u32 + 1) & 0x7f,
            (uaddr as *const u8).wrapping_add(SUN_PATH_OFFSET).cast(),
        )
    };
    copied > 1
}
