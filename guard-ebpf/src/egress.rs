//! `dns_egress` (cgroup_skb/egress): the decision on every packet a guarded
//! cgroup sends.
//!
//! Fast path first: a packet that is not UDP or TCP to a DNS port returns
//! after reading three header fields straight from the packet. Only DNS
//! packets pay for the binding lookup and the question walk.
//!
//! UDP: every datagram is judged, each datagram of a GSO send too. TCP: the
//! stream programs (`stream.rs`) judge whole messages as they are written;
//! this program judges on its own only what they cannot see (data of a
//! connection they do not follow, such as a TCP Fast Open SYN), and only
//! when a segment holds whole messages. Urgent data on a DNS connection is
//! refused: it shifts the stream the server reads.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::generated::{bpf_loop, bpf_sk_fullsock, bpf_skb_load_bytes},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use guard_common::{
    event::{Unreadable, DIRECTION_QUERY, NAME_CAP},
    maps::{Binding, Counter, SockState, SOCK_SYN_SEEN},
};

use crate::{
    maps::{binding_of_skb, count, count_for, sock_state, with_scratch, SocketAsker, ASKERS},
    packet::{
        classify, describe, load, Direction, Packet, IPPROTO_TCP, OPAQUE, TCP_FLAG_SYN,
        TCP_FLAG_URG,
    },
    verdict::{settle, unreadable, Asker},
    wire::{decide_question, Outcome, Scratch, DNS_HEADER_LEN},
};

const PASS: i32 = 1;
const DROP: i32 = 0;
/// Datagrams of one UDP GSO send judged; more is refused.
const MAX_GSO_SEGMENTS: u32 = 64;
/// Whole messages judged in one TCP segment of a connection the stream
/// programs do not follow (more is refused).
const MAX_SEGMENT_MESSAGES: u32 = 8;

#[cgroup_skb(egress)]
pub fn dns_egress(ctx: SkBuffContext) -> i32 {
    match classify(&ctx, Direction::Egress) {
        // Masked so the verifier can see the return value is 0 or 1 (read
        // back through a volatile so the compiler keeps the mask: it knows
        // the value is 0 or 1, the verifier does not).
        Some(packet) => {
            let verdict = inspect(&ctx, &packet);
            unsafe { core::ptr::read_volatile(&verdict) & 1 }
        }
        None => PASS,
    }
}

/// The slow path, for packets to a DNS port.
#[inline(never)]
fn inspect(ctx: &SkBuffContext, packet: &Packet) -> i32 {
    let skb = ctx.skb.skb;
    let Some(binding) = binding_of_skb(skb) else {
        // The program only runs for cgroups it was attached to; a cgroup
        // without a binding is an inconsistency: fail closed.
        count(Counter::Unbound);
        return DROP;
    };
    let verdict = with_scratch(|scratch| {
        unsafe {
            (*scratch).packet = *packet;
            (*scratch).binding = binding;
        }
        inspect_in(ctx, scratch)
    });
    match verdict {
        Some(pass) => pass,
        None => {
            // No working memory for a record: counted, and lost.
            count_for(&binding, Counter::Unreadable);
            count_for(&binding, Counter::EventsLost);
            DROP
        }
    }
}

/// Decides the packet: every message in it is judged by one walk
/// ([`walk_messages`]), so the question's reader and the verdict's writer
/// each have one call site for the verifier to check.
#[inline(always)]
fn inspect_in(ctx: &SkBuffContext, scratch: *mut Scratch) -> i32 {
    let event = unsafe { &mut (*scratch).event };
    event.direction = DIRECTION_QUERY;
    event.matched_len = 0;
    event.message_len = 0;
    event.qname_len = 0;
    event.qtype = 0;
    let packet = unsafe { (*scratch).packet };
    let packet_len = ctx.len();
    if packet.transport == OPAQUE {
        return walk_messages(ctx, scratch, Walk::refuse(Unreadable::ExtensionHeaders));
    }
    if packet.transport != IPPROTO_TCP {
        let start = packet.l4_offset + 8;
        if start > packet_len {
            return walk_messages(ctx, scratch, Walk::refuse(Unreadable::Truncated));
        }
        let payload = packet_len - start;
        remember_asker(ctx, unsafe { &(*scratch).binding });
        // A GSO send carries several datagrams of `gso_size` bytes.
        let gso_size = unsafe { (*ctx.skb.skb).gso_size };
        let step = if gso_size != 0 && payload > gso_size {
            if payload.div_ceil(gso_size) > MAX_GSO_SEGMENTS {
                return walk_messages(ctx, scratch, Walk::refuse(Unreadable::TooManySegments));
            }
            gso_size
        } else {
            payload
        };
        return walk_messages(ctx, scratch, Walk::datagrams(start, packet_len, step));
    }

    let Some(header) = load::<[u8; 14]>(ctx, packet.l4_offset) else {
        return walk_messages(ctx, scratch, Walk::refuse(Unreadable::Truncated));
    };
    let payload = packet.l4_offset + ((header[12] >> 4) as u32) * 4;
    if header[13] & TCP_FLAG_URG != 0 {
        return walk_messages(ctx, scratch, Walk::refuse(Unreadable::UrgentData));
    }
    let seq = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let syn = header[13] & TCP_FLAG_SYN != 0;
    if payload >= packet_len && !syn {
        // ACK or FIN: no data.
        return PASS;
    }
    let state = sock_state_of(ctx, seq, syn);
    if payload >= packet_len {
        // A SYN without data: it has told us where the stream starts.
        return PASS;
    }
    // Where the segment's data is in the stream (the SYN takes one number).
    let (offset, end) = match &state {
        Some(state) if state.flags & SOCK_SYN_SEEN != 0 => {
            let offset = seq.wrapping_sub(state.isn.wrapping_add(1));
            (offset, offset.wrapping_add(packet_len - payload))
        }
        _ => (u32::MAX, u32::MAX),
    };
    if let Some(state) = &state {
        if offset != u32::MAX && end <= state.judged && offset <= end {
            // Judged as it was written, by the stream programs (or here,
            // when it first left).
            return PASS;
        }
    }
    // The answers on this connection are attributed to this sender (the
    // stream programs remember the senders of what they judge).
    remember_asker(ctx, unsafe { &(*scratch).binding });
    let verdict = walk_messages(ctx, scratch, Walk::segment(payload, packet_len));
    if let Some(state) = state {
        if verdict == PASS && offset == state.judged {
            // Whole messages right after what was judged: the stream is
            // judged up to here (a TCP Fast Open SYN's data, or data written
            // before the connection was followed).
            state.judged = end;
        }
    }
    verdict
}

/// The state of a TCP socket to a DNS port; on its SYN (`syn`, sequence
/// number `seq`) made, and given the initial sequence number.
#[inline(always)]
fn sock_state_of(ctx: &SkBuffContext, seq: u32, syn: bool) -> Option<&'static mut SockState> {
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return None;
    }
    let state = sock_state(full, syn)?;
    if syn && state.flags & SOCK_SYN_SEEN == 0 {
        state.isn = seq;
        state.judged = 0;
        state.flags |= SOCK_SYN_SEEN;
    }
    Some(state)
}

/// Reads the question of the message at `start` (`len` bytes) and decides
/// it.
#[inline(always)]
fn judge_message(ctx: &SkBuffContext, scratch: *mut Scratch, start: u32, len: u32) -> Outcome {
    guard_egress_judge(ctx.skb.skb, scratch, start, len);
    unsafe { (*scratch).outcome }
}

/// [`judge_message`] as a global function: the verifier checks it once, on
/// its own, instead of once per caller state. Leaves the outcome in
/// `scratch.outcome`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn guard_egress_judge(
    skb: *mut __sk_buff,
    scratch: *mut Scratch,
    start: u32,
    len: u32,
) -> u32 {
    if skb.is_null() || scratch.is_null() {
        return 0;
    }
    let ctx = SkBuffContext::new(skb);
    let outcome = judge_message_in(&ctx, scratch, start, len);
    unsafe { (*scratch).outcome = outcome };
    0
}

#[inline(always)]
fn judge_message_in(ctx: &SkBuffContext, scratch: *mut Scratch, start: u32, len: u32) -> Outcome {
    let binding = unsafe { &(*scratch).binding };
    if len < DNS_HEADER_LEN {
        return unreadable(Unreadable::Truncated);
    }
    let Some(header) = load::<[u8; 12]>(ctx, start) else {
        return unreadable(Unreadable::Truncated);
    };
    let available = len - DNS_HEADER_LEN;
    let event = unsafe { &mut (*scratch).event };
    if available > 0 {
        let to_load = if available > NAME_CAP as u32 + 4 {
            NAME_CAP as u32 + 4
        } else {
            available
        };
        // Written as ((n - 1) & 0x1ff) + 1 so the verifier sees a length in
        // [1, 512] by construction; the name buffer is followed by more
        // event memory.
        let to_load = (to_load.wrapping_sub(1) & 0x1ff) + 1;
        let loaded = unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb as *const c_void,
                start + DNS_HEADER_LEN,
                event.qname.as_mut_ptr() as *mut c_void,
                to_load,
            )
        };
        if loaded != 0 {
            return unreadable(Unreadable::Truncated);
        }
    }
    decide_question(&header, available, scratch, binding, event)
}

/// Remembers the sender of a query on its socket, for the answer.
#[inline(always)]
pub fn remember_asker(ctx: &SkBuffContext, binding: &Binding) {
    let cookie =
        unsafe { aya_ebpf::helpers::generated::bpf_get_socket_cookie(ctx.skb.skb as *mut c_void) };
    let entry = SocketAsker {
        binding: *binding,
        asker: Asker::current(),
    };
    match ASKERS.get_ptr_mut(cookie) {
        // In place: cheaper than an update of the hash.
        Some(known) => unsafe { *known = entry },
        None => {
            let _ = ASKERS.insert(cookie, entry, 0);
        }
    }
}

#[inline(always)]
fn finish(ctx: &SkBuffContext, scratch: *mut Scratch, outcome: &Outcome) -> i32 {
    unsafe { (*scratch).outcome = *outcome };
    guard_egress_finish(ctx.skb.skb, scratch)
}

/// Settles `scratch.outcome` for the packet: counts it, reports it, and
/// says pass (1) or drop (0). A global function, checked once.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn guard_egress_finish(skb: *mut __sk_buff, scratch: *mut Scratch) -> i32 {
    if skb.is_null() || scratch.is_null() {
        return DROP;
    }
    let ctx = &SkBuffContext::new(skb);
    let outcome = &unsafe { (*scratch).outcome };
    let packet = unsafe { &(*scratch).packet };
    let binding = unsafe { &(*scratch).binding };
    let event = unsafe { &mut (*scratch).event };
    let pass = settle(binding, event, *outcome, |event| {
        describe(ctx, packet, Direction::Egress, event);
        let asker = Asker::current();
        event.pid = asker.pid;
        event.tid = asker.tid;
        event.comm = asker.comm;
    });
    if pass {
        PASS
    } else {
        DROP
    }
}

/// What a walk over a packet's messages does.
struct Walk {
    at: u32,
    end: u32,
    /// Datagrams of this size; 0: length-prefixed messages (TCP).
    step: u32,
    /// Refuse the packet for this reason without reading it.
    refuse: u32,
}

impl Walk {
    fn refuse(reason: Unreadable) -> Walk {
        Walk {
            at: 0,
            end: 0,
            step: 0,
            refuse: reason as u32,
        }
    }

    fn datagrams(at: u32, end: u32, step: u32) -> Walk {
        Walk {
            at,
            end,
            step,
            refuse: 0,
        }
    }

    fn segment(at: u32, end: u32) -> Walk {
        Walk {
            at,
            end,
            step: 0,
            refuse: 0,
        }
    }
}

/// Judges the messages of the packet as `walk` says: datagrams of a UDP
/// send (several for GSO), or the length-prefixed messages of a TCP segment
/// the stream programs did not judge (refused when one is cut off). Any
/// refused message refuses the packet (the kernel cannot drop part of it).
#[inline(always)]
fn walk_messages(ctx: &SkBuffContext, scratch: *mut Scratch, walk: Walk) -> i32 {
    let vars = unsafe { &mut (*scratch).loops.messages };
    vars.at = walk.at;
    vars.end = walk.end;
    vars.step = walk.step;
    vars.refuse = walk.refuse;
    vars.verdict = PASS;
    guard_egress_walk(ctx.skb.skb, scratch)
}

/// The walk of [`walk_messages`], as a global function: the verifier checks
/// it (and its loop) once, not once per place that starts a walk.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn guard_egress_walk(skb: *mut __sk_buff, scratch: *mut Scratch) -> i32 {
    if skb.is_null() || scratch.is_null() {
        return DROP;
    }
    let mut state = MessageWalk { skb, scratch };
    let count = if unsafe { (*scratch).loops.messages.step } != 0 {
        MAX_GSO_SEGMENTS
    } else {
        MAX_SEGMENT_MESSAGES + 1
    };
    unsafe {
        bpf_loop(
            count,
            walk_message as *mut c_void,
            &mut state as *mut MessageWalk as *mut c_void,
            0,
        )
    };
    unsafe { (*scratch).loops.messages.verdict & 1 }
}

#[repr(C)]
struct MessageWalk {
    skb: *mut __sk_buff,
    scratch: *mut Scratch,
}

extern "C" fn walk_message(index: u64, state: *mut c_void) -> i64 {
    let walk = unsafe { &mut *(state as *mut MessageWalk) };
    let ctx = SkBuffContext::new(walk.skb);
    let vars = unsafe { &mut (*walk.scratch).loops.messages };
    let (at, end, step, refuse) = (vars.at, vars.end, vars.step, vars.refuse);
    let (outcome, next) = if refuse != 0 {
        (unreadable(Unreadable::from_u8(refuse as u8)), end)
    } else if at >= end {
        return 1;
    } else if step == 0 && index >= MAX_SEGMENT_MESSAGES as u64 {
        // More messages in one segment than are read: not passed unseen.
        (unreadable(Unreadable::UnfollowedStream), end)
    } else if step != 0 {
        let len = if end - at < step { end - at } else { step };
        (judge_message(&ctx, walk.scratch, at, len), at + len)
    } else {
        match load::<[u8; 2]>(&ctx, at) {
            Some(prefix) if at + 2 + u16::from_be_bytes(prefix) as u32 <= end => {
                let len = u16::from_be_bytes(prefix) as u32;
                (judge_message(&ctx, walk.scratch, at + 2, len), at + 2 + len)
            }
            // A message cut by the segment's end: a connection the stream
            // programs do not follow is judged on its own only when its
            // segments hold whole messages.
            _ => (unreadable(Unreadable::UnfollowedStream), end),
        }
    };
    let dropped = finish(&ctx, walk.scratch, &outcome) == DROP;
    let vars = unsafe { &mut (*walk.scratch).loops.messages };
    if dropped {
        vars.verdict = DROP;
    }
    vars.at = next;
    vars.refuse = 0;
    i64::from(next >= end)
}
