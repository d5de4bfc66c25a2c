//! Turning an outcome into a verdict: counted, reported to userspace
//! through the ring buffer, and the packet passed or dropped.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_skb_cgroup_id},
    },
    programs::SkBuffContext,
};
use guard_common::{
    event::{DnsEvent, EventKind, Verdict, FAMILY_IPV4, TRANSPORT_TCP, TRANSPORT_UDP},
    maps::{Binding, Counter, SeenKey},
    matching::Action,
};

use crate::{
    maps::{count_for, EVENTS, SEEN},
    packet::{load, Packet, IPPROTO_TCP},
    wire::Outcome,
};

pub const PASS: i32 = 1;
pub const DROP: i32 = 0;

/// Turns an outcome into a packet verdict, counting and reporting it.
#[inline(always)]
pub fn settle(
    ctx: &SkBuffContext,
    packet: &Packet,
    binding: &Binding,
    event: &mut DnsEvent,
    outcome: Outcome,
) -> i32 {
    let (verdict, rule_id) = match outcome {
        Outcome::Pass => return PASS,
        Outcome::Allowed { rule_id, name_hash } => {
            if binding.record != 0 && first_sighting(binding, event.qtype, name_hash) {
                report(ctx, packet, binding, event, Verdict::Allowed, rule_id);
            }
            return PASS;
        }
        Outcome::Matched {
            action: Action::Block,
            rule_id,
        } => (Verdict::Blocked, rule_id),
        Outcome::Matched { rule_id, .. } => (Verdict::Audited, rule_id),
        Outcome::Malformed if binding.audit_only != 0 => (Verdict::MalformedAudited, u32::MAX),
        Outcome::Malformed => (Verdict::MalformedBlocked, u32::MAX),
    };
    count_for(
        binding,
        match verdict {
            Verdict::Blocked => Counter::Blocked,
            Verdict::Audited => Counter::Audited,
            _ => Counter::Malformed,
        },
    );
    report(ctx, packet, binding, event, verdict, rule_id);
    if verdict.dropped() {
        DROP
    } else {
        PASS
    }
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
fn report(
    ctx: &SkBuffContext,
    packet: &Packet,
    binding: &Binding,
    event: &mut DnsEvent,
    verdict: Verdict,
    rule_id: u32,
) {
    let skb = ctx.skb.skb;
    event.kind = EventKind::Dns as u8;
    event.verdict = verdict as u8;
    event.transport = if packet.transport == IPPROTO_TCP {
        TRANSPORT_TCP
    } else {
        TRANSPORT_UDP
    };
    event.family = packet.family;
    event.rule_id = rule_id;
    event.policy_id = binding.policy_id;
    let pid_tgid = bpf_get_current_pid_tgid();
    event.pid = (pid_tgid >> 32) as u32;
    event.tid = pid_tgid as u32;
    event.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    event.cgroup_id = unsafe { bpf_skb_cgroup_id(skb) };
    event.socket_cookie = unsafe { bpf_get_socket_cookie(skb as *mut c_void) };
    event.boot_ns = unsafe { bpf_ktime_get_boot_ns() };
    let ports: [u8; 4] = load(ctx, packet.l4_offset).unwrap_or([0; 4]);
    event.src_port = u16::from_be_bytes([ports[0], ports[1]]);
    event.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    event.tcp_seq = if packet.transport == IPPROTO_TCP {
        u32::from_be(load(ctx, packet.l4_offset + 4).unwrap_or(0))
    } else {
        0
    };
    event.src_addr = [0; 16];
    event.dst_addr = [0; 16];
    if packet.family == FAMILY_IPV4 {
        let addresses: [u8; 8] = load(ctx, 12).unwrap_or([0; 8]);
        event.src_addr[..4].copy_from_slice(&addresses[..4]);
        event.dst_addr[..4].copy_from_slice(&addresses[4..]);
    } else {
        event.src_addr = load(ctx, 8).unwrap_or([0; 16]);
        event.dst_addr = load(ctx, 24).unwrap_or([0; 16]);
    }
    if EVENTS.output::<DnsEvent>(&*event, 0).is_err() {
        count_for(binding, Counter::EventsLost);
    }
}
