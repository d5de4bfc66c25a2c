//! `dns_ingress` (cgroup_skb/ingress): the decision on every DNS answer a
//! guarded cgroup receives. An answer that would have the client use a
//! denied name (an alias to it, a service record naming it, an address
//! record owned by it) is dropped, and reported with the asker.
//!
//! Fast path first: a packet not from a DNS port returns after reading the
//! source port. UDP answers are judged here; TCP answers of a followed
//! connection by the stream programs, as whole messages; TCP data of a
//! connection they do not follow only when a segment holds whole messages.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::generated::{
        bpf_get_socket_cookie, bpf_loop, bpf_probe_read_kernel, bpf_sk_fullsock, bpf_skb_load_bytes,
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use guard_common::{
    event::{Unreadable, DIRECTION_ANSWER, MESSAGE_CAP},
    maps::{Counter, SOCK_STREAM_FOLLOWED},
};

use crate::{
    maps::{binding_of_skb, count, count_for, sock_state, with_scratch, ASKERS},
    packet::{classify, describe, load, Direction, Packet, IPPROTO_TCP, OPAQUE, TCP_FLAG_URG},
    verdict::{settle, unreadable},
    wire::{decide_answer, Outcome, Scratch, MSG_CAP},
};

const PASS: i32 = 1;
const DROP: i32 = 0;
/// Whole answers judged in one TCP segment of an unfollowed connection.
const MAX_SEGMENT_MESSAGES: u32 = 4;

#[cgroup_skb(ingress)]
pub fn dns_ingress(ctx: SkBuffContext) -> i32 {
    match classify(&ctx, Direction::Ingress) {
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

#[inline(never)]
fn inspect(ctx: &SkBuffContext, packet: &Packet) -> i32 {
    let skb = ctx.skb.skb;
    let Some(binding) = binding_of_skb(skb) else {
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
        Some(verdict) => verdict,
        None => {
            count_for(&binding, Counter::Unreadable);
            count_for(&binding, Counter::EventsLost);
            DROP
        }
    }
}

#[inline(always)]
fn inspect_in(ctx: &SkBuffContext, scratch: *mut Scratch) -> i32 {
    let packet = unsafe { &(*scratch).packet };
    let event = unsafe { &mut (*scratch).event };
    event.direction = DIRECTION_ANSWER;
    event.matched_len = 0;
    event.message_len = 0;
    event.qname_len = 0;
    event.qtype = 0;
    if packet.transport == OPAQUE {
        return finish(ctx, scratch, 0, &unreadable(Unreadable::ExtensionHeaders));
    }
    let packet_len = ctx.len();
    if packet.transport != IPPROTO_TCP {
        let start = packet.l4_offset + 8;
        if start > packet_len {
            return finish(ctx, scratch, 0, &unreadable(Unreadable::Truncated));
        }
        let len = packet_len - start;
        let outcome = judge_answer(ctx, scratch, start, len);
        return finish(ctx, scratch, len, &outcome);
    }
    let Some(header) = load::<[u8; 14]>(ctx, packet.l4_offset) else {
        return finish(ctx, scratch, 0, &unreadable(Unreadable::Truncated));
    };
    let payload = packet.l4_offset + ((header[12] >> 4) as u32) * 4;
    if header[13] & TCP_FLAG_URG != 0 {
        return finish(ctx, scratch, 0, &unreadable(Unreadable::UrgentData));
    }
    if payload >= packet_len || followed(ctx) {
        return PASS;
    }
    let vars = unsafe { &mut (*scratch).loops.messages };
    vars.at = payload;
    vars.end = packet_len;
    vars.step = 0;
    vars.verdict = PASS;
    let mut walk = AnswerSegment {
        skb: ctx.skb.skb,
        scratch,
    };
    unsafe {
        bpf_loop(
            MAX_SEGMENT_MESSAGES,
            walk_segment as *mut c_void,
            &mut walk as *mut AnswerSegment as *mut c_void,
            0,
        )
    };
    let vars = unsafe { &(*scratch).loops.messages };
    if vars.at < vars.end {
        return finish(ctx, scratch, 0, &unreadable(Unreadable::UnfollowedStream));
    }
    vars.verdict
}

/// Whether the stream programs follow this connection (they judge its
/// answers as whole messages once the stream parser has put them together).
#[inline(always)]
fn followed(ctx: &SkBuffContext) -> bool {
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return false;
    }
    sock_state(full, false).is_some_and(|state| state.flags & SOCK_STREAM_FOLLOWED != 0)
}

/// Copies the answer at `start` (`len` bytes) into the scratch buffer and
/// decides it.
#[inline(never)]
pub fn judge_answer(ctx: &SkBuffContext, scratch: *mut Scratch, start: u32, len: u32) -> Outcome {
    let binding = unsafe { &(*scratch).binding };
    if len == 0 || len > MSG_CAP {
        return unreadable(Unreadable::Truncated);
    }
    let to_load = (len.wrapping_sub(1) & (MSG_CAP - 1)) + 1;
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const c_void,
            start,
            (*scratch).message.as_mut_ptr() as *mut c_void,
            to_load,
        )
    };
    if loaded != 0 {
        return unreadable(Unreadable::Truncated);
    }
    decide_answer(scratch, len, binding)
}

/// Keeps the first bytes of a refused answer in its record, so userspace
/// can show the alias chain.
#[inline(always)]
pub fn keep_message(scratch: *mut Scratch, len: u32) {
    let event = unsafe { &mut (*scratch).event };
    let kept = if len > MESSAGE_CAP as u32 {
        MESSAGE_CAP as u32
    } else {
        len
    };
    event.message_len = kept as u16;
    if kept > 0 {
        unsafe {
            bpf_probe_read_kernel(
                event.message.as_mut_ptr() as *mut c_void,
                (kept.wrapping_sub(1) & (MESSAGE_CAP as u32 - 1)) + 1,
                (*scratch).message.as_ptr() as *const c_void,
            )
        };
    }
}

#[inline(never)]
fn finish(ctx: &SkBuffContext, scratch: *mut Scratch, len: u32, outcome: &Outcome) -> i32 {
    let packet = unsafe { &(*scratch).packet };
    let binding = unsafe { &(*scratch).binding };
    let event = unsafe { &mut (*scratch).event };
    let pass = settle(binding, event, *outcome, |event| {
        describe(ctx, packet, Direction::Ingress, event);
        keep_message(scratch, len);
        let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut c_void) };
        match unsafe { ASKERS.get(cookie) } {
            Some(known) => {
                event.pid = known.asker.pid;
                event.tid = known.asker.tid;
                event.comm = known.asker.comm;
            }
            None => {
                event.pid = 0;
                event.tid = 0;
                event.comm = [0; 16];
            }
        }
    });
    if pass {
        PASS
    } else {
        DROP
    }
}

#[repr(C)]
struct AnswerSegment {
    skb: *mut __sk_buff,
    scratch: *mut Scratch,
}

extern "C" fn walk_segment(_index: u64, state: *mut c_void) -> i64 {
    let walk = unsafe { &mut *(state as *mut AnswerSegment) };
    let vars = unsafe { &mut (*walk.scratch).loops.messages };
    if vars.at >= vars.end {
        return 1;
    }
    let ctx = SkBuffContext::new(walk.skb);
    let (at, end) = (vars.at, vars.end);
    let Some(prefix) = load::<[u8; 2]>(&ctx, at) else {
        return 1;
    };
    let len = u16::from_be_bytes(prefix) as u32;
    if at + 2 + len > end {
        return 1;
    }
    let outcome = judge_answer(&ctx, walk.scratch, at + 2, len);
    let dropped = finish(&ctx, walk.scratch, len, &outcome) == DROP;
    let vars = unsafe { &mut (*walk.scratch).loops.messages };
    if dropped {
        vars.verdict = DROP;
    }
    vars.at = at + 2 + len;
    0
}
