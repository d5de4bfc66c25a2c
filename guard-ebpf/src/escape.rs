//! Escape and tamper evidence (tracepoints): tasks leaving the cgroup that
//! guards them, packet and raw sockets, and `bpf()` calls that could
//! detach or change guard.
//!
//! Tracking: a task is remembered with the cgroup that guards it
//! ([`TRACKED`]) when a guarded task forks it or when it enters a guarded
//! cgroup. At each checkpoint in the task's own context (it moves itself,
//! forks, returns from `clone3`), the cgroup guarding it now is compared
//! with the remembered one: a change that no binding explains is an
//! escape. In enforce mode the escaping task is killed there, before it
//! runs a single instruction outside. A task moved by another process is
//! judged in userspace from the destination's path (the kernel cannot
//! tell whether an unbound cgroup lies below the guarded one), and again
//! at its next checkpoint.
use aya_ebpf::{
    helpers::generated::{bpf_get_current_cgroup_id, bpf_probe_read_kernel_str},
    macros::tracepoint,
    programs::TracePointContext,
    EbpfContext as _,
};
use guard_common::{
    event::{EvidenceKind, ACTION_RECORDED, PATH_CAP},
    evidence::{SEEN_CLONE3_CHILD, SEEN_FORKING, SEEN_MOVED_BY_ANOTHER, SEEN_MOVED_ITSELF},
    maps::Binding,
};

use crate::{
    evidence::{
        current_tid, guard_count_evidence, kill_current, settings, write_record, Evidence, TRACKED,
    },
    maps::{fork_child_pid_offset, guard_of_current, BINDINGS},
};

// cgroup:cgroup_attach_task
const ATTACH_DST_ROOT: usize = 8;
const ATTACH_DST_LEVEL: usize = 12;
const ATTACH_DST_ID: usize = 16;
const ATTACH_PID: usize = 24;
const ATTACH_DST_PATH: usize = 28;
// syscalls:sys_enter_* and sys_exit_*
const SYSCALL_ARG0: usize = 16;
const SYSCALL_ARG1: usize = 24;
const SYSCALL_ARG2: usize = 32;
const SYSCALL_RET: usize = 16;

/// cgroup v2's hierarchy (v1 hierarchies of a hybrid host do not decide
/// which programs apply).
const DEFAULT_HIERARCHY: i32 = 0;

const AF_INET: u64 = 2;
const AF_INET6: u64 = 10;
const AF_PACKET: u64 = 17;
const AF_XDP: u64 = 44;
const SOCK_RAW: u64 = 3;
const SOCK_PACKET: u64 = 10;
const SOCK_TYPE_MASK: u64 = 0xf;

/// `bpf()` commands that change what is attached or what maps hold:
/// MAP_UPDATE_ELEM, MAP_DELETE_ELEM, PROG_ATTACH, PROG_DETACH,
/// MAP_LOOKUP_AND_DELETE_ELEM, MAP_FREEZE, MAP_LOOKUP_AND_DELETE_BATCH,
/// MAP_UPDATE_BATCH, MAP_DELETE_BATCH, LINK_CREATE, LINK_UPDATE,
/// LINK_DETACH.
const BPF_CHANGES: u64 = (1 << 2)
    | (1 << 3)
    | (1 << 8)
    | (1 << 9)
    | (1 << 21)
    | (1 << 22)
    | (1 << 25)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 29)
    | (1 << 34);

/// Counts the evidence (through the global function) and writes its record.
#[inline(always)]
fn report(evidence: &Evidence, path: impl FnOnce(&mut [u8; PATH_CAP])) {
    guard_count_evidence(evidence.policy_id, evidence.what as u32);
    write_record(evidence, path);
}

/// Where the task is now, as far as the checkpoint knows it.
struct Destination<'a> {
    guard: Option<(u64, Binding)>,
    cgroup: u64,
    level: u32,
    /// Which checkpoint saw it (`guard_common::evidence::SEEN_*`).
    seen_at: u64,
    /// The tracepoint record and the offset of its `__data_loc` path.
    path: Option<(&'a TracePointContext, usize)>,
}

/// Compares where `tid` (the current task) is guarded now with where it
/// was, records an escape and updates the tracking.
#[inline(always)]
fn checkpoint(tid: u32, destination: &Destination<'_>) {
    let tracked = unsafe { TRACKED.get(tid) }.copied();
    let now = destination.guard.map(|(id, _)| id);
    match (tracked, now) {
        (None, None) => {}
        (None, Some(id)) => track(tid, id, destination.guard),
        (Some(was), Some(id)) if was == id => {}
        (Some(was), _) => {
            if let Some(binding) = unsafe { BINDINGS.get(was) } {
                let action = if settings(binding).0 {
                    kill_current()
                } else {
                    ACTION_RECORDED
                };
                let evidence = Evidence {
                    what: EvidenceKind::LeftCgroup,
                    action,
                    policy_id: binding.policy_id,
                    subject: tid,
                    guarded_cgroup: was,
                    target_cgroup: destination.cgroup,
                    target_level: destination.level,
                    args: [destination.seen_at, 0, 0],
                };
                report(&evidence, |path| {
                    if let Some((ctx, at)) = destination.path {
                        read_data_loc(ctx, at, path);
                    }
                });
            }
            match now {
                Some(id) => track(tid, id, destination.guard),
                None => {
                    let _ = TRACKED.remove(tid);
                }
            }
        }
    }
}

#[inline(always)]
fn track(tid: u32, guarding: u64, guard: Option<(u64, Binding)>) {
    if TRACKED.insert(tid, guarding, 0).is_err() {
        if let Some((_, binding)) = guard {
            let evidence = Evidence {
                what: EvidenceKind::Untracked,
                action: ACTION_RECORDED,
                policy_id: binding.policy_id,
                subject: tid,
                guarded_cgroup: guarding,
                target_cgroup: 0,
                target_level: 0,
                args: [0; 3],
            };
            report(&evidence, |_| {});
        }
    }
}

/// Copies a `__data_loc char[]` field of a tracepoint record.
#[inline(always)]
fn read_data_loc(ctx: &TracePointContext, at: usize, out: &mut [u8; PATH_CAP]) {
    let Ok(loc) = (unsafe { ctx.read_at::<u32>(at) }) else {
        return;
    };
    let offset = (loc & 0xffff) as usize;
    unsafe {
        bpf_probe_read_kernel_str(
            out.as_mut_ptr().cast(),
            PATH_CAP as u32,
            (ctx.as_ptr() as *const u8).wrapping_add(offset).cast(),
        )
    };
}

#[tracepoint(category = "cgroup", name = "cgroup_attach_task")]
pub fn escape_attach(ctx: TracePointContext) -> u32 {
    let read = |at| unsafe { ctx.read_at::<i32>(at) }.unwrap_or(-1);
    if read(ATTACH_DST_ROOT) != DEFAULT_HIERARCHY {
        return 0;
    }
    let moved = read(ATTACH_PID) as u32;
    let level = read(ATTACH_DST_LEVEL) as u32;
    let target: u64 = unsafe { ctx.read_at(ATTACH_DST_ID) }.unwrap_or(0);
    if moved == current_tid() {
        // It moved itself: its cgroup now is the destination.
        checkpoint(
            moved,
            &Destination {
                guard: guard_of_current(),
                cgroup: unsafe { bpf_get_current_cgroup_id() },
                level,
                seen_at: SEEN_MOVED_ITSELF,
                path: Some((&ctx, ATTACH_DST_PATH)),
            },
        );
        return 0;
    }
    moved_by_another(&ctx, moved, target, level);
    0
}

/// Another process moved `moved` to `target`. Only a bound destination can
/// be judged here; anything else goes to userspace with its path.
#[inline(always)]
fn moved_by_another(ctx: &TracePointContext, moved: u32, target: u64, level: u32) {
    let bound = unsafe { BINDINGS.get(target) }.copied();
    let Some(was) = unsafe { TRACKED.get(moved) }.copied() else {
        if bound.is_some() {
            track(moved, target, bound.map(|b| (target, b)));
        }
        return;
    };
    if was == target {
        return;
    }
    let Some(binding) = (unsafe { BINDINGS.get(was) }).copied() else {
        return;
    };
    let what = if bound.is_some() {
        // Another guarded cgroup, with another policy: it left ours.
        EvidenceKind::LeftCgroup
    } else {
        EvidenceKind::Moved
    };
    let evidence = Evidence {
        what,
        action: ACTION_RECORDED,
        policy_id: binding.policy_id,
        subject: moved,
        guarded_cgroup: was,
        target_cgroup: target,
        target_level: level,
        args: [SEEN_MOVED_BY_ANOTHER, 0, 0],
    };
    report(&evidence, |path| read_data_loc(ctx, ATTACH_DST_PATH, path));
    if bound.is_some() {
        track(moved, target, bound.map(|b| (target, b)));
    }
}

#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn escape_fork(ctx: TracePointContext) -> u32 {
    // The parent's context: check the parent, then track the child with
    // the cgroup that guards the parent (a child starts in its parent's
    // cgroup unless clone3 put it elsewhere; see escape_clone3).
    let guard = guard_of_current();
    checkpoint(
        current_tid(),
        &Destination {
            guard,
            cgroup: unsafe { bpf_get_current_cgroup_id() },
            level: 0,
            seen_at: SEEN_FORKING,
            path: None,
        },
    );
    if let Some((id, _)) = guard {
        let child: i32 = unsafe { ctx.read_at(fork_child_pid_offset()) }.unwrap_or(0);
        if child > 0 {
            track(child as u32, id, guard);
        }
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_clone3")]
pub fn escape_clone3(ctx: TracePointContext) -> u32 {
    // Only the child returns 0: this is its first moment in user context,
    // in the cgroup clone3 may have put it in (CLONE_INTO_CGROUP).
    let ret: i64 = unsafe { ctx.read_at(SYSCALL_RET) }.unwrap_or(-1);
    if ret != 0 {
        return 0;
    }
    checkpoint(
        current_tid(),
        &Destination {
            guard: guard_of_current(),
            cgroup: unsafe { bpf_get_current_cgroup_id() },
            level: 0,
            seen_at: SEEN_CLONE3_CHILD,
            path: None,
        },
    );
    0
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn escape_exit(_ctx: TracePointContext) -> u32 {
    let _ = TRACKED.remove(current_tid());
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_socket")]
pub fn escape_socket(ctx: TracePointContext) -> u32 {
    let arg = |at| unsafe { ctx.read_at::<u64>(at) }.unwrap_or(0);
    let family = arg(SYSCALL_ARG0) & 0xffff;
    let kind = arg(SYSCALL_ARG1) & SOCK_TYPE_MASK;
    let packet = family == AF_PACKET || family == AF_XDP || kind == SOCK_PACKET;
    let raw = (family == AF_INET || family == AF_INET6) && kind == SOCK_RAW;
    if !packet && !raw {
        return 0;
    }
    let Some((guarded, binding)) = guard_of_current() else {
        return 0;
    };
    // A packet socket sends below every cgroup hook: in enforce mode its
    // creator dies before it can use it. A raw IP socket's packets still
    // pass the egress program; it is recorded only.
    let (enforce, allow_raw_sockets) = settings(&binding);
    let action = if packet && enforce && !allow_raw_sockets {
        kill_current()
    } else {
        ACTION_RECORDED
    };
    let evidence = Evidence {
        what: if packet {
            EvidenceKind::PacketSocket
        } else {
            EvidenceKind::RawSocket
        },
        action,
        policy_id: binding.policy_id,
        subject: current_tid(),
        guarded_cgroup: guarded,
        target_cgroup: 0,
        target_level: 0,
        args: [family, arg(SYSCALL_ARG1), arg(SYSCALL_ARG2)],
    };
    report(&evidence, |_| {});
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_bpf")]
pub fn escape_bpf(ctx: TracePointContext) -> u32 {
    let command = unsafe { ctx.read_at::<u64>(SYSCALL_ARG0) }.unwrap_or(0) & 0xffff_ffff;
    if command >= 64 || BPF_CHANGES & (1 << command) == 0 {
        return 0;
    }
    let Some((guarded, binding)) = guard_of_current() else {
        return 0;
    };
    let evidence = Evidence {
        what: EvidenceKind::Bpf,
        action: ACTION_RECORDED,
        policy_id: binding.policy_id,
        subject: current_tid(),
        guarded_cgroup: guarded,
        target_cgroup: 0,
        target_level: 0,
        args: [command, 0, 0],
    };
    report(&evidence, |_| {});
    0
}
