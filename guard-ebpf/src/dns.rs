//! `dns_egress`: the per-packet decision.
//!
//! Fast path first: a packet that is not UDP or TCP to a DNS port returns
//! after reading three header fields straight from the packet. Only DNS
//! packets pay for the binding lookup, the name walk and the rule lookups.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{
            bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_loop, bpf_skb_ancestor_cgroup_id,
            bpf_skb_cgroup_id, bpf_skb_load_bytes,
        },
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use guard_common::{
    event::{
        DnsEvent, EventKind, Verdict, FAMILY_IPV4, FAMILY_IPV6, NAME_CAP, TRANSPORT_TCP,
        TRANSPORT_UDP,
    },
    maps::{Binding, Counter, SeenKey},
    matching::{fold_case, label_bit, Action, RuleKey, SuffixWalk},
};

use crate::maps::{
    count, count_for, find_binding, is_dns_port, EVENTS, NESTING, RULES, SCRATCH, SEEN,
};

const PASS: i32 = 1;
const DROP: i32 = 0;

const ETH_P_IP_BE: u32 = 0x0800u16.to_be() as u32;
const ETH_P_IPV6_BE: u32 = 0x86DDu16.to_be() as u32;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// Marks a packet whose transport header could not be reached.
const OPAQUE: u8 = 0xff;
const DNS_HEADER_LEN: u32 = 12;
/// The longest name in wire format, length bytes and root label included.
const MAX_WIRE_NAME: u32 = 255;
/// DNS messages read from one TCP segment (glibc sends A and AAAA together).
const MAX_TCP_MESSAGES: u32 = 4;
/// IPv6 extension headers skipped before giving up on finding UDP/TCP.
const MAX_IPV6_EXTENSIONS: u32 = 4;
/// Header fields at offsets below this are read directly from the packet.
const DIRECT_READ_LIMIT: u32 = 256;

#[cgroup_skb(egress)]
pub fn dns_egress(ctx: SkBuffContext) -> i32 {
    match classify(&ctx) {
        // Masked so the verifier can see the return value is 0 or 1.
        Some(packet) => inspect_dns(&ctx, &packet) & 1,
        None => PASS,
    }
}

/// Where the interesting parts of a DNS-bound packet are.
struct Packet {
    family: u8,
    transport: u8,
    l4_offset: u32,
}

/// Reads a `T` at `offset` from the packet: directly when it lies in the
/// linear head (always the case for locally built headers), through
/// `bpf_skb_load_bytes` otherwise.
#[inline(always)]
fn read<T: Copy>(ctx: &SkBuffContext, offset: u32) -> Option<T> {
    if offset < DIRECT_READ_LIMIT {
        let skb = ctx.skb.skb;
        let (data, data_end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
        let at = data + offset as usize;
        // One byte of slack (`<`, not `<=`): for a 1-byte read LLVM turns
        // `at + 1 <= end` into `at < end`, from which the verifier derives
        // no readable range. The last byte of a packet takes the slow path.
        if at + core::mem::size_of::<T>() < data_end {
            return Some(unsafe { (at as *const T).read_unaligned() });
        }
    }
    ctx.load::<T>(offset as usize).ok()
}

/// Reads through `bpf_skb_load_bytes` only. Used on the DNS slow path: a
/// helper's offset argument needs no precise tracking, so the verifier can
/// merge states that differ only in offsets (with direct packet access it
/// cannot, and the name walks blow up to hundreds of thousands of
/// instructions).
#[inline(always)]
fn load<T: Copy>(ctx: &SkBuffContext, offset: u32) -> Option<T> {
    ctx.load::<T>(offset as usize).ok()
}

/// The fast path: `Some` only for UDP/TCP packets to a DNS port.
#[inline(always)]
fn classify(ctx: &SkBuffContext) -> Option<Packet> {
    let protocol = unsafe { (*ctx.skb.skb).protocol };
    let (family, transport, l4_offset) = if protocol == ETH_P_IP_BE {
        let version_ihl: u8 = read(ctx, 0)?;
        let flags_fragment: u16 = read(ctx, 6)?;
        // A non-first fragment carries no transport header. The question is
        // always in the first fragment, which is inspected.
        if u16::from_be(flags_fragment) & 0x1fff != 0 {
            return None;
        }
        let transport: u8 = read(ctx, 9)?;
        (FAMILY_IPV4, transport, ((version_ihl & 0x0f) as u32) * 4)
    } else if protocol == ETH_P_IPV6_BE {
        let (transport, offset) = skip_ipv6_extensions(ctx)?;
        (FAMILY_IPV6, transport, offset)
    } else {
        return None;
    };
    if transport != IPPROTO_UDP && transport != IPPROTO_TCP {
        if family == FAMILY_IPV6 && is_ipv6_extension(transport) {
            // More extension headers than we follow: the transport header,
            // and so whether this is DNS, cannot be seen. Fail closed.
            return Some(Packet {
                family,
                transport: OPAQUE,
                l4_offset,
            });
        }
        return None;
    }
    let dst_port: u16 = read(ctx, l4_offset + 2)?;
    if !is_dns_port(dst_port) {
        return None;
    }
    Some(Packet {
        family,
        transport,
        l4_offset,
    })
}

#[inline(always)]
fn is_ipv6_extension(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 60)
}

/// Follows hop-by-hop, routing, destination-options and fragment headers, so
/// an extension header cannot hide a query.
#[inline(always)]
fn skip_ipv6_extensions(ctx: &SkBuffContext) -> Option<(u8, u32)> {
    let mut next: u8 = read(ctx, 6)?;
    let mut offset: u32 = 40;
    let mut i = 0;
    while i < MAX_IPV6_EXTENSIONS {
        match next {
            0 | 43 | 60 => {
                let header: [u8; 2] = read(ctx, offset)?;
                next = header[0];
                offset += (header[1] as u32 + 1) * 8;
            }
            44 => {
                let header: [u8; 4] = read(ctx, offset)?;
                if u16::from_be_bytes([header[2], header[3]]) & 0xfff8 != 0 {
                    return None;
                }
                next = header[0];
                offset += 8;
            }
            _ => break,
        }
        i += 1;
    }
    Some((next, offset))
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

#[derive(Clone, Copy)]
enum Outcome {
    /// Nothing to decide (no question, or the root name).
    Pass,
    /// No deny rule matched (`rule_id` is an allow rule's, or `u32::MAX`).
    Allowed { rule_id: u32, name_hash: u64 },
    /// A deny rule matched; `action` is Block or Audit.
    Matched { action: Action, rule_id: u32 },
    /// The question could not be read.
    Malformed,
}

/// Reads the question of the message at `message` and decides it. The name
/// is left in `event.qname`, the type in `event.qtype`.
#[inline(always)]
fn inspect_message(
    ctx: &SkBuffContext,
    message: u32,
    packet_len: u32,
    binding: &Binding,
    event: &mut DnsEvent,
) -> Outcome {
    event.qtype = 0;
    event.qname_len = 0;
    event.qname[0] = 0;
    let Some(header) = load::<[u8; 12]>(ctx, message) else {
        return Outcome::Malformed;
    };
    let questions = u16::from_be_bytes([header[4], header[5]]);
    if questions == 0 {
        return Outcome::Pass;
    }
    if questions > 1 {
        // No server answers several questions; a second one would go unseen.
        return Outcome::Malformed;
    }
    let name_offset = message + DNS_HEADER_LEN;
    if name_offset >= packet_len {
        return Outcome::Malformed;
    }
    let available = packet_len - name_offset;
    let to_load = if available > NAME_CAP as u32 {
        NAME_CAP as u32
    } else {
        available
    };
    // `available >= 1` here. Written as ((n - 1) & 0xff) + 1 so the verifier
    // sees a length in [1, 256] by construction (a separate non-zero check
    // gets optimised into a form it cannot follow).
    let to_load = (to_load.wrapping_sub(1) & 0xff) + 1;
    let buffer = event.qname.as_mut_ptr();
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const c_void,
            name_offset,
            buffer as *mut c_void,
            to_load,
        )
    };
    if loaded != 0 {
        return Outcome::Malformed;
    }

    let mut forward = ForwardWalk {
        name: buffer,
        loaded: to_load,
        at: 0,
        wire_len: 0,
    };
    unsafe {
        bpf_loop(
            MAX_LABELS,
            walk_forward as *mut c_void,
            &mut forward as *mut ForwardWalk as *mut c_void,
            0,
        )
    };
    if forward.wire_len == 0 || forward.wire_len > MAX_WIRE_NAME {
        return Outcome::Malformed;
    }
    // The dotted name is qname[1..wire_len - 1]; keep the leading dot.
    event.qname_len = (forward.wire_len - 1) as u16;
    // Read back from map memory: the verifier then sees an unknown value
    // instead of one derived from the callback, which stops it from tracking
    // every possible length through the walk (precision backtracking).
    let wire_len = unsafe { core::ptr::read_volatile(&event.qname_len) } as u32 + 1;
    if wire_len > MAX_WIRE_NAME {
        return Outcome::Malformed;
    }
    let Some(qtype) = load::<u16>(ctx, name_offset + wire_len) else {
        return Outcome::Malformed;
    };
    event.qtype = u16::from_be(qtype);
    count_for(binding, Counter::Inspected);
    if wire_len == 1 {
        // The root name: nothing a rule can name.
        return Outcome::Pass;
    }

    let mut backward = BackwardWalk {
        name: buffer,
        last: wire_len - 2,
        policy_id: binding.policy_id,
        label_mask: binding.label_mask,
        walk: SuffixWalk::new(),
    };
    unsafe {
        bpf_loop(
            wire_len - 2,
            walk_backward as *mut c_void,
            &mut backward as *mut BackwardWalk as *mut c_void,
            0,
        )
    };
    let mut walk = backward.walk;
    if binding.label_mask & label_bit(walk.name_labels()) != 0 {
        if let Some(entry) = unsafe { RULES.get(RuleKey::new(binding.policy_id, walk.hash)) } {
            walk.consider(&entry.exact);
        }
    }
    match Action::from_u8(walk.best.action) {
        Action::Block if binding.audit_only != 0 => Outcome::Matched {
            action: Action::Audit,
            rule_id: walk.best.rule_id,
        },
        action @ (Action::Block | Action::Audit) => Outcome::Matched {
            action,
            rule_id: walk.best.rule_id,
        },
        Action::Allow => Outcome::Allowed {
            rule_id: walk.best.rule_id,
            name_hash: walk.hash,
        },
        Action::None => Outcome::Allowed {
            rule_id: u32::MAX,
            name_hash: walk.hash,
        },
    }
}

/// State of the first pass: hops from length byte to length byte, checking
/// each and turning it into `.`. Letters are left as they are: the second
/// pass folds case as it hashes, and userspace lower-cases reported names.
/// One iteration per label, not per byte.
#[repr(C)]
struct ForwardWalk {
    name: *mut u8,
    loaded: u32,
    /// Offset of the next length byte.
    at: u32,
    /// Set when the root label is reached; 0 = not (yet) a valid name.
    wire_len: u32,
}

/// Labels in a name of at most 255 bytes, root label included.
const MAX_LABELS: u32 = 128;

extern "C" fn walk_forward(_index: u64, state: *mut c_void) -> i64 {
    let state = unsafe { &mut *(state as *mut ForwardWalk) };
    let at = state.at;
    if at >= state.loaded || at >= NAME_CAP as u32 {
        return 1; // truncated: wire_len stays 0
    }
    let byte = unsafe { state.name.add((at & 0xff) as usize) };
    let length = unsafe { *byte };
    if length == 0 {
        state.wire_len = at + 1;
        return 1;
    }
    if length > 63 {
        // A compression pointer (0xC0) or a reserved label type: a query
        // never needs either in its question.
        return 1;
    }
    unsafe { *byte = b'.' };
    state.at = at + 1 + length as u32;
    0
}

/// State of the second pass: hashes the dotted name from its last byte and
/// looks up every label-boundary suffix.
#[repr(C)]
struct BackwardWalk {
    name: *const u8,
    /// Index of the last name byte (the name is `name[1..=last]`).
    last: u32,
    policy_id: u32,
    /// Label counts the policy has rules for; other suffixes are skipped.
    label_mask: u64,
    walk: SuffixWalk,
}

extern "C" fn walk_backward(index: u64, state: *mut c_void) -> i64 {
    let state = unsafe { &mut *(state as *mut BackwardWalk) };
    let k = index as u32;
    if k >= state.last {
        return 1;
    }
    let i = (state.last - k) & 0xff;
    let value = fold_case(unsafe { *state.name.add(i as usize) });
    if let Some(suffix) = state.walk.step(value) {
        if state.label_mask & label_bit(state.walk.labels) != 0 {
            if let Some(entry) = unsafe { RULES.get(RuleKey::new(state.policy_id, suffix)) } {
                state.walk.consider(&entry.wildcard);
            }
        }
    }
    0
}

/// Turns an outcome into a packet verdict, counting and reporting it.
#[inline(always)]
fn settle(
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
