//! `dns_egress` (cgroup_skb/egress): the decision on every packet a guarded
//! cgroup sends.
//!
//! Fast path first: a packet that is not UDP or TCP to a DNS port returns
//! after reading three header fields straight from the packet. Only DNS
//! packets pay for the binding lookup, the name walk and the rule lookups.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::generated::{bpf_loop, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use guard_common::{
    event::DnsEvent,
    maps::{Binding, Counter},
};

use crate::{
    maps::{count, find_binding, NESTING, SCRATCH},
    packet::{classify, load, Packet, IPPROTO_TCP, IPPROTO_UDP, OPAQUE},
    verdict::{settle, DROP, PASS},
    wire::{inspect_message, Outcome},
};

/// DNS messages read from one TCP segment (glibc sends A and AAAA together).
const MAX_TCP_MESSAGES: u32 = 4;

#[cgroup_skb(egress)]
pub fn dns_egress(ctx: SkBuffContext) -> i32 {
    match classify(&ctx) {
        // Masked so the verifier can see the return value is 0 or 1.
        Some(packet) => inspect_dns(&ctx, &packet) & 1,
        None => PASS,
    }
}

/// The slow path, for packets to a DNS port.
#[inline(never)]
fn inspect_dns(ctx: &SkBuffContext, packet: &Packet) -> i32 {
    let skb = ctx.skb.skb;
    let binding = match find_binding(unsafe { bpf_skb_cgroup_id(skb) }, |level| unsafe {
        bpf_skb_ancestor_cgroup_id(skb, level as i32)
    }) {
        Some(binding) => binding,
        None => {
            // The program only runs for cgroups it was attached to; a cgroup
            // without a binding is an inconsistency: fail closed.
            count(Counter::Unbound);
            return DROP;
        }
    };
    let Some(depth) = NESTING.get_ptr_mut(0) else {
        return DROP;
    };
    let level = unsafe { *depth };
    if level >= 2 {
        return DROP;
    }
    let Some(event) = SCRATCH.get_ptr_mut(level) else {
        return DROP;
    };
    unsafe { *depth = level + 1 };
    let verdict = inspect_payload(ctx, packet, &binding, unsafe { &mut *event });
    unsafe { *depth = level };
    verdict
}

#[inline(always)]
fn inspect_payload(
    ctx: &SkBuffContext,
    packet: &Packet,
    binding: &Binding,
    event: &mut DnsEvent,
) -> i32 {
    let packet_len = ctx.len();
    if packet.transport == OPAQUE {
        event.qname_len = 0;
        event.qtype = 0;
        return settle(ctx, packet, binding, event, Outcome::Malformed);
    }
    if packet.transport == IPPROTO_UDP {
        let message = packet.l4_offset + 8;
        let outcome = inspect_message(ctx, message, packet_len, binding, event);
        return settle(ctx, packet, binding, event, outcome);
    }

    // TCP: the payload is a run of messages, each behind a two-byte length.
    let Some(data_offset) = load::<u8>(ctx, packet.l4_offset + 12) else {
        return PASS;
    };
    let offset = packet.l4_offset + ((data_offset >> 4) as u32) * 4;
    if offset >= packet_len || packet_len - offset == 2 {
        // Handshake, ACK or FIN; or a length prefix sent on its own, which
        // carries no name. The message itself is inspected when it comes.
        return PASS;
    }
    // The message loop runs under bpf_loop so the verifier checks its body
    // once rather than once per message.
    let mut walk = TcpWalk {
        skb: ctx.skb.skb,
        event,
        binding: *binding,
        l4_offset: packet.l4_offset,
        family: packet.family,
        packet_len,
        offset,
        verdict: PASS,
        finished: 0,
    };
    unsafe {
        bpf_loop(
            MAX_TCP_MESSAGES,
            walk_tcp_messages as *mut c_void,
            &mut walk as *mut TcpWalk as *mut c_void,
            0,
        )
    };
    if walk.finished == 0 && walk.offset < packet_len {
        // More messages than we read: do not let the rest through unseen.
        return settle(ctx, packet, binding, event, Outcome::Malformed);
    }
    walk.verdict
}

#[repr(C)]
struct TcpWalk {
    skb: *mut __sk_buff,
    event: *mut DnsEvent,
    binding: Binding,
    l4_offset: u32,
    family: u8,
    packet_len: u32,
    /// Offset of the next message's length prefix.
    offset: u32,
    verdict: i32,
    finished: u32,
}

extern "C" fn walk_tcp_messages(index: u64, state: *mut c_void) -> i64 {
    let state = unsafe { &mut *(state as *mut TcpWalk) };
    let ctx = SkBuffContext::new(state.skb);
    let packet = Packet {
        family: state.family,
        transport: IPPROTO_TCP,
        l4_offset: state.l4_offset,
    };
    let event = unsafe { &mut *state.event };
    let binding = state.binding;
    if state.offset >= state.packet_len {
        state.finished = 1;
        return 1;
    }
    let Some(length) = load::<u16>(&ctx, state.offset) else {
        state.verdict = settle(&ctx, &packet, &binding, event, Outcome::Malformed);
        state.finished = 1;
        return 1;
    };
    let outcome = inspect_message(&ctx, state.offset + 2, state.packet_len, &binding, event);
    if index == 0 && matches!(outcome, Outcome::Malformed) {
        // A message whose length prefix went in an earlier segment starts
        // right at the payload.
        let bare = inspect_message(&ctx, state.offset, state.packet_len, &binding, event);
        if !matches!(bare, Outcome::Malformed) {
            state.verdict = settle(&ctx, &packet, &binding, event, bare);
            state.finished = 1;
            return 1;
        }
    }
    if settle(&ctx, &packet, &binding, event, outcome) == DROP {
        state.verdict = DROP;
    }
    state.offset += 2 + u16::from_be(length) as u32;
    0
}
