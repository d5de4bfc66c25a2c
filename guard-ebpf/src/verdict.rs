//! Turning an outcome into a verdict: counted, reported to userspace
//! through the ring buffer (one record per refused message), and the
//! message passed or dropped.
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, generated::bpf_ktime_get_boot_ns,
};
use guard_common::{
    event::{DnsEvent, EventKind, Unreadable, Verdict},
    maps::{Binding, Counter, SeenKey},
    matching::Action,
};

use crate::{
    maps::{count_for, EVENTS, SEEN},
    wire::{Outcome, OUTCOME_ALLOWED, OUTCOME_MATCHED, OUTCOME_UNREADABLE},
};

/// Who asked, for the record: the current task for a query sent in process
/// context; the socket's remembered asker for an answer.
#[derive(Clone, Copy)]
pub struct Asker {
    pub pid: u32,
    pub tid: u32,
    pub comm: [u8; 16],
}

impl Asker {
    #[inline(always)]
    pub fn current() -> Asker {
        let pid_tgid = bpf_get_current_pid_tgid();
        Asker {
            pid: (pid_tgid >> 32) as u32,
            tid: pid_tgid as u32,
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
        }
    }
}

/// Decides what happens to the message, counts it, and reports it when it
/// is refused, audited, unreadable or (in record mode) a first sighting.
/// `describe` fills the transport fields of the record (called only when a
/// record is sent). Returns true to let the message through.
#[inline(always)]
pub fn settle(
    binding: &Binding,
    event: &mut DnsEvent,
    outcome: Outcome,
    describe: impl FnOnce(&mut DnsEvent),
) -> bool {
    let rule_id = outcome.rule_id;
    let (verdict, reason) = match outcome.kind {
        OUTCOME_ALLOWED => {
            if binding.record != 0 && first_sighting(binding, event.qtype, outcome.name_hash) {
                send(binding, event, Verdict::Allowed, rule_id, 0, describe);
            }
            return true;
        }
        OUTCOME_MATCHED if outcome.detail == Action::Block as u32 => (Verdict::Blocked, 0),
        OUTCOME_MATCHED => (Verdict::Audited, 0),
        OUTCOME_UNREADABLE if binding.audit_only != 0 => {
            (Verdict::UnreadableAudited, outcome.detail as u8)
        }
        OUTCOME_UNREADABLE => (Verdict::UnreadableBlocked, outcome.detail as u8),
        _ => return true,
    };
    count_for(
        binding,
        match verdict {
            Verdict::Blocked => Counter::Blocked,
            Verdict::Audited => Counter::Audited,
            _ => Counter::Unreadable,
        },
    );
    send(binding, event, verdict, rule_id, reason, describe);
    !verdict.dropped()
}

/// The outcome for a message that cannot be read (no name in the record).
#[inline(always)]
pub fn unreadable(reason: Unreadable) -> Outcome {
    Outcome::unreadable(reason)
}

/// Counts the query in SEEN; true only for the first query of this (name,
/// type) in this binding, which is the one reported.
#[inline(always)]
fn first_sighting(binding: &Binding, qtype: u16, name_hash: u64) -> bool {
    let key = SeenKey {
        policy_id: binding.policy_id,
        qtype,
        _pad: 0,
        name_hash,
    };
    if let Some(count) = SEEN.get_ptr_mut(key) {
        // This CPU's slot: a nested run on this CPU completes before we
        // resume, so a plain increment loses nothing.
        unsafe { *count += 1 };
        return false;
    }
    // BPF_NOEXIST: of two CPUs seeing the name at once, one reports it.
    SEEN.insert(key, 1u64, 1).is_ok()
}

#[inline(always)]
fn send(
    binding: &Binding,
    event: &mut DnsEvent,
    verdict: Verdict,
    rule_id: u32,
    reason: u8,
    describe: impl FnOnce(&mut DnsEvent),
) {
    event.kind = EventKind::Dns as u8;
    event.verdict = verdict as u8;
    event.reason = reason;
    event.rule_id = rule_id;
    event.policy_id = binding.policy_id;
    event.boot_ns = unsafe { bpf_ktime_get_boot_ns() };
    describe(event);
    if EVENTS.output::<DnsEvent>(&*event, 0).is_err() {
        count_for(binding, Counter::EventsLost);
    }
}
