//! What the evidence programs ([`crate::escape`], [`crate::unix`]) share:
//! their maps, which cgroup guards the current task, and writing an
//! [`EvidenceEvent`]. Names are in `guard_common::evidence`.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns,
            bpf_send_signal,
        },
    },
    macros::map,
    maps::{HashMap, PerCpuHashMap},
};
use guard_common::{
    event::{EventKind, EvidenceEvent, EvidenceKind, ACTION_KILLED, ACTION_RECORDED, PATH_CAP},
    evidence::{EvidenceCounters, EvidenceSettings, EVIDENCE_SLOTS, TRACKED_CAPACITY},
    maps::{Binding, MAX_CGROUP_DEPTH},
};

use crate::maps::{BINDINGS, EVENTS};

const SIGKILL: u32 = 9;

/// Task id -> id of the cgroup that guards it. Not preallocated: most hosts
/// track a handful of tasks.
#[map]
pub static TRACKED: HashMap<u32, u64> =
    HashMap::with_max_entries(TRACKED_CAPACITY, BPF_F_NO_PREALLOC);

/// Exact evidence counts per policy id, created on first use.
#[map]
pub static EVIDENCE_COUNTERS: PerCpuHashMap<u32, EvidenceCounters> =
    PerCpuHashMap::with_max_entries(4096, 0);

/// Per-policy settings, written by userspace with the policy.
#[map]
pub static EVIDENCE_SETTINGS: HashMap<u32, EvidenceSettings> = HashMap::with_max_entries(4096, 0);

/// The cgroup that guards the current task (its own cgroup if bound, else
/// its deepest bound ancestor) with its binding. Inline, for the Unix-socket
/// hooks, which are loaded without BTF function info and so cannot call
/// global functions; the tracepoints use `maps::guard_of_current`.
#[inline(always)]
pub fn current_guard() -> Option<(u64, Binding)> {
    let own = unsafe { bpf_get_current_cgroup_id() };
    if let Some(binding) = unsafe { BINDINGS.get(own) } {
        return Some((own, *binding));
    }
    let mut found = None;
    let mut level = 0;
    while level < MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            break;
        }
        if let Some(binding) = unsafe { BINDINGS.get(id) } {
            found = Some((id, *binding));
        }
        level += 1;
    }
    found
}

#[inline(always)]
pub fn current_tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

/// Whether evidence is enforced for the binding's policy (escapes and
/// packet sockets killed), and whether its policy allows packet and raw
/// sockets.
#[inline(always)]
pub fn settings(binding: &Binding) -> (bool, bool) {
    match unsafe { EVIDENCE_SETTINGS.get(binding.policy_id) } {
        Some(s) => (s.enforce != 0, s.allow_raw_sockets != 0),
        None => (binding.audit_only == 0, false),
    }
}

/// Sends SIGKILL to the current process: it dies before it returns to user
/// space.
#[inline(always)]
pub fn kill_current() -> u8 {
    if unsafe { bpf_send_signal(SIGKILL) } == 0 {
        ACTION_KILLED
    } else {
        ACTION_RECORDED
    }
}

/// What one record says, besides who acted and when.
pub struct Evidence {
    pub what: EvidenceKind,
    pub action: u8,
    pub policy_id: u32,
    pub subject: u32,
    pub guarded_cgroup: u64,
    pub target_cgroup: u64,
    pub target_level: u32,
    pub args: [u64; 3],
}

/// Writes the record (the caller has counted it); `path` fills the
/// record's path (it starts empty).
#[inline(always)]
pub fn write_record(evidence: &Evidence, path: impl FnOnce(&mut [u8; PATH_CAP])) {
    let Some(mut entry) = EVENTS.reserve::<EvidenceEvent>(0) else {
        // Counted above: userspace sees the record missing and fails closed.
        return;
    };
    let event = unsafe { &mut *entry.as_mut_ptr() };
    let pid_tgid = bpf_get_current_pid_tgid();
    event.kind = EventKind::Evidence as u8;
    event.what = evidence.what as u8;
    event.action = evidence.action;
    event._pad = 0;
    event.policy_id = evidence.policy_id;
    event.pid = (pid_tgid >> 32) as u32;
    event.tid = pid_tgid as u32;
    event.subject = evidence.subject;
    event.target_level = evidence.target_level;
    event.guarded_cgroup = evidence.guarded_cgroup;
    event.target_cgroup = evidence.target_cgroup;
    event.args = evidence.args;
    event.boot_ns = unsafe { bpf_ktime_get_boot_ns() };
    event.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    event.path[0] = 0;
    path(&mut event.path);
    entry.submit(0);
}

/// [`count`] as a global function: verified once, not at each of the
/// tracepoints' call sites.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn guard_count_evidence(policy_id: u32, what: u32) -> i32 {
    count(policy_id, what as usize);
    0
}

/// Counts one piece of evidence for its policy.
#[inline(always)]
pub fn count(policy_id: u32, index: usize) {
    if index >= EVIDENCE_SLOTS {
        return;
    }
    if EVIDENCE_COUNTERS.get_ptr_mut(policy_id).is_none() {
        // BPF_NOEXIST: of two CPUs creating it at once, one wins; both then
        // count in their own slot.
        let _ = EVIDENCE_COUNTERS.insert(
            policy_id,
            EvidenceCounters {
                values: [0; EVIDENCE_SLOTS],
            },
            1,
        );
    }
    if let Some(counters) = EVIDENCE_COUNTERS.get_ptr_mut(policy_id) {
        // Per-CPU value: a nested run on this CPU completes before we
        // resume, so a plain increment loses nothing.
        unsafe { (*counters).values[index] += 1 };
    }
}
