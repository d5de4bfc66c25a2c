//! The stream programs: DNS over TCP judged as whole messages, whatever the
//! write pattern.
//!
//! - `dns_sock_ops` (cgroup/sock_ops): a connection of a guarded cgroup to
//!   a DNS port, once established, joins the `SOCKETS` sockhash; its
//!   socket-local state says so, and from which sequence number.
//! - `dns_stream_send` (sk_msg on `SOCKETS`): sees every `sendmsg` as
//!   written. It waits (`bpf_msg_cork_bytes`) until the length prefix and
//!   the whole message it announces are there, decides the question, and
//!   lets exactly that message through or drops it (`bpf_msg_apply_bytes`);
//!   the next message in the same write gets a run of its own. A dropped
//!   message never enters the socket: the sender gets an error at once.
//! - `dns_stream_parse`, `dns_stream_answer` (sk_skb stream parser and
//!   verdict on `SOCKETS`): the kernel's stream parser puts each answer
//!   together from the length prefix; the verdict decides it whole.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{sk_action::SK_DROP, sk_action::SK_PASS, BPF_ANY},
    helpers::generated::{
        bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_msg_apply_bytes, bpf_msg_cork_bytes,
        bpf_msg_pull_data, bpf_probe_read_kernel,
    },
    macros::{sk_msg, sock_ops, stream_parser, stream_verdict},
    programs::{SkBuffContext, SkMsgContext, SockOpsContext},
};
use guard_common::{
    event::{
        DnsEvent, Unreadable, DIRECTION_ANSWER, DIRECTION_QUERY, FAMILY_IPV4, FAMILY_IPV6,
        NAME_CAP, TRANSPORT_TCP,
    },
    maps::{Binding, Counter, SOCK_STREAM_FOLLOWED},
};

use crate::{
    ingress::{judge_answer, keep_message},
    maps::{
        binding_of_current, count, count_for, is_dns_port, sock_state, with_scratch, SocketAsker,
        StreamPosition, ASKERS, SOCKETS, STREAMS,
    },
    verdict::{settle, unreadable, Asker},
    wire::{decide_question, Outcome, Scratch, DNS_HEADER_LEN},
};

const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const AF_INET: u32 = 2;
const RCODE_REFUSED: u8 = 5;
/// A stream parser's error: the kernel stops parsing the stream.
const PARSE_ERROR: u32 = -71i32 as u32; // -EPROTO
/// Bytes of a message the question can be in: length prefix, header, the
/// longest name, type.
const QUESTION_SPAN: u32 = 2 + DNS_HEADER_LEN + NAME_CAP as u32 + 4;

#[sock_ops]
pub fn dns_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    // The remote port is kept in network byte order in the upper half.
    if !is_dns_port((ctx.remote_port() >> 16) as u16) {
        return 1;
    }
    let ops = unsafe { &mut *ctx.ops };
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    // The answer stream starts at offset 0 (before the first data).
    let _ = STREAMS.insert(cookie, StreamPosition::default(), 0);
    let followed = SOCKETS
        .update(&mut cookie, &mut *ops, BPF_ANY as u64)
        .is_ok();
    let sk = unsafe { ops.__bindgen_anon_2.sk };
    if !sk.is_null() {
        if let Some(state) = sock_state(sk, true) {
            if followed {
                state.flags |= SOCK_STREAM_FOLLOWED;
            }
            state.cookie = cookie;
        }
    }
    1
}

#[sk_msg]
pub fn dns_stream_send(ctx: SkMsgContext) -> u32 {
    let msg = ctx.msg;
    let size = ctx.size();
    if size < 2 {
        unsafe { bpf_msg_cork_bytes(msg, 2) };
        return SK_PASS;
    }
    let span = if size > QUESTION_SPAN {
        QUESTION_SPAN
    } else {
        size
    };
    if unsafe { bpf_msg_pull_data(msg, 0, span, 0) } != 0 {
        return SK_DROP;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 2 > end {
        return SK_DROP;
    }
    let length = u16::from_be_bytes(unsafe { *(data as *const [u8; 2]) }) as u32;
    let need = 2 + length;
    if size < need {
        // Hold what was written until the whole message is there.
        unsafe { bpf_msg_cork_bytes(msg, need) };
        return SK_PASS;
    }
    // The verdict applies to this message only; the rest of the write (a
    // pipelined message) gets a run of its own.
    unsafe { bpf_msg_apply_bytes(msg, need) };
    let sk = unsafe { (*msg).__bindgen_anon_3.sk };
    let Some(state) = (if sk.is_null() {
        None
    } else {
        sock_state(sk, false)
    }) else {
        // Every socket in the sockhash got its state from sock_ops.
        count(Counter::Unbound);
        return SK_DROP;
    };
    let Some(binding) = binding_of_current() else {
        count(Counter::Unbound);
        return SK_DROP;
    };
    let cookie = state.cookie;
    let asker = Asker::current();
    let entry = SocketAsker { binding, asker };
    let _ = ASKERS.insert(cookie, entry, 0);
    let pass = with_scratch(|scratch| {
        let outcome = read_question(data, length, &binding, scratch);
        let event = unsafe { &mut (*scratch).event };
        event.direction = DIRECTION_QUERY;
        event.matched_len = 0;
        event.message_len = 0;
        settle(&binding, event, outcome, |event| {
            describe_msg(&ctx, event, cookie);
            event.pid = asker.pid;
            event.tid = asker.tid;
            event.comm = asker.comm;
        })
    });
    match pass {
        Some(true) => {
            // These bytes enter the stream judged.
            state.judged = state.judged.wrapping_add(need);
            SK_PASS
        }
        Some(false) => SK_DROP,
        None => {
            count_for(&binding, Counter::Unreadable);
            count_for(&binding, Counter::EventsLost);
            SK_DROP
        }
    }
}

/// Copies the header and question of the message at `data + 2` (pulled
/// into linear memory up to [`QUESTION_SPAN`]) and decides the question.
#[inline(always)]
fn read_question(data: usize, length: u32, binding: &Binding, scratch: *mut Scratch) -> Outcome {
    if length < DNS_HEADER_LEN {
        return unreadable(Unreadable::Truncated);
    }
    let mut header = [0u8; 12];
    unsafe {
        bpf_probe_read_kernel(
            header.as_mut_ptr() as *mut c_void,
            12,
            (data + 2) as *const c_void,
        )
    };
    let available = length - DNS_HEADER_LEN;
    let event = unsafe { &mut (*scratch).event };
    if available > 0 {
        let span = QUESTION_SPAN - 2 - DNS_HEADER_LEN;
        let to_load = if available > span { span } else { available };
        unsafe {
            bpf_probe_read_kernel(
                event.qname.as_mut_ptr() as *mut c_void,
                (to_load.wrapping_sub(1) & 0x1ff) + 1,
                (data + 2 + DNS_HEADER_LEN as usize) as *const c_void,
            )
        };
    }
    decide_question(&header, available, scratch, binding, event)
}

/// The transport fields of a record, from a socket's sk_msg view.
#[inline(always)]
fn describe_msg(ctx: &SkMsgContext, event: &mut DnsEvent, cookie: u64) {
    let msg = unsafe { &*ctx.msg };
    event.transport = TRANSPORT_TCP;
    event.socket_cookie = cookie;
    event.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    event.src_port = msg.local_port as u16;
    event.dst_port = u16::from_be((msg.remote_port >> 16) as u16);
    event.src_addr = [0; 16];
    event.dst_addr = [0; 16];
    if msg.family == AF_INET {
        event.family = FAMILY_IPV4;
        event.src_addr[..4].copy_from_slice(&msg.local_ip4.to_ne_bytes());
        event.dst_addr[..4].copy_from_slice(&msg.remote_ip4.to_ne_bytes());
    } else {
        event.family = FAMILY_IPV6;
        for i in 0..4 {
            event.src_addr[i * 4..i * 4 + 4].copy_from_slice(&msg.local_ip6[i].to_ne_bytes());
            event.dst_addr[i * 4..i * 4 + 4].copy_from_slice(&msg.remote_ip6[i].to_ne_bytes());
        }
    }
}

/// The stream parser: how long the next answer is. The kernel hands the
/// parser the chunk (socket buffer) the answer starts in, from the chunk's
/// start, not from the answer's (which the program cannot ask for); where
/// the answer starts in it is worked out from where the stream is, kept in
/// `STREAMS`: a chunk is handed whole, so an answer starts either at the
/// start of a fresh chunk, or in the last chunk of the answer before it,
/// whose end the verdict records.
#[stream_parser]
pub fn dns_stream_parse(ctx: SkBuffContext) -> u32 {
    let skb = ctx.skb.skb;
    let cookie = unsafe { bpf_get_socket_cookie(skb as *mut c_void) };
    let Some(position) = STREAMS.get_ptr_mut(cookie) else {
        // Where the stream is is not known (the connection was forgotten):
        // fail the parser, which ends the stream.
        return PARSE_ERROR;
    };
    let position = unsafe { &mut *position };
    let chunk = ctx.len();
    if position.parsing == 0 {
        position.base = if position.next == position.known_end {
            position.next
        } else {
            position.known_end.wrapping_sub(chunk)
        };
        position.parsing = 1;
    }
    let offset = position.next.wrapping_sub(position.base);
    if offset > chunk {
        return PARSE_ERROR;
    }
    match ctx.load::<[u8; 2]>(offset as usize) {
        Ok(prefix) => {
            let length = 2 + u16::from_be_bytes(prefix) as u32;
            position.offset = offset;
            position.length = length;
            // The kernel counts the message from where it starts.
            length
        }
        // Not even the prefix yet: wait for more.
        Err(_) => 0,
    }
}

/// The stream verdict: decides a whole answer (where the parser found it)
/// and records where the stream is now.
#[stream_verdict]
pub fn dns_stream_answer(ctx: SkBuffContext) -> u32 {
    let skb = ctx.skb.skb;
    let cookie = unsafe { bpf_get_socket_cookie(skb as *mut c_void) };
    let Some(position) = STREAMS.get_ptr_mut(cookie) else {
        count(Counter::Unbound);
        return SK_DROP;
    };
    let position = unsafe { &mut *position };
    let (offset, length) = (position.offset, position.length);
    // The chunks now put together end here; the next answer starts after
    // this one.
    position.known_end = position.base.wrapping_add(ctx.len());
    position.next = position.next.wrapping_add(length);
    position.parsing = 0;
    let Some(known) = (unsafe { ASKERS.get(cookie) }).copied() else {
        // An answer on a connection that never asked (or was forgotten):
        // nothing to decide it by. Fail closed.
        count(Counter::Unbound);
        return refuse_answer(&ctx, offset);
    };
    let binding = known.binding;
    let pass = with_scratch(|scratch| {
        unsafe { (*scratch).binding = binding };
        let event = unsafe { &mut (*scratch).event };
        event.direction = DIRECTION_ANSWER;
        event.matched_len = 0;
        event.message_len = 0;
        let message = length.saturating_sub(2);
        let outcome = if length < 2 {
            unreadable(Unreadable::Truncated)
        } else {
            judge_answer(&ctx, scratch, offset + 2, message)
        };
        settle(&binding, event, outcome, |event| {
            describe_skb(&ctx, event, cookie);
            keep_message(scratch, message);
            event.pid = known.asker.pid;
            event.tid = known.asker.tid;
            event.comm = known.asker.comm;
        })
    });
    match pass {
        Some(true) => SK_PASS,
        Some(false) => refuse_answer(&ctx, offset),
        None => {
            count_for(&binding, Counter::Unreadable);
            count_for(&binding, Counter::EventsLost);
            refuse_answer(&ctx, offset)
        }
    }
}

/// Turns a refused answer into a REFUSED answer with no records, in place:
/// a dropped message on a stream leaves its reader waiting (ending the
/// socket does not wake a reader of a followed socket), a REFUSED one makes
/// it give up at once. The length stays, so the stream stays whole; the
/// bytes after the question are left as they are and no record count
/// points at them. A message too short to have a header is dropped.
#[inline(always)]
fn refuse_answer(ctx: &SkBuffContext, offset: u32) -> u32 {
    let flags_low = (offset + 2 + 3) as usize;
    let counts = (offset + 2 + 6) as usize;
    let Ok(flags) = ctx.load::<u8>(flags_low) else {
        return SK_DROP;
    };
    if ctx.len() < offset + 2 + DNS_HEADER_LEN {
        return SK_DROP;
    }
    let refused = (flags & 0xf0) | RCODE_REFUSED;
    if ctx.store(flags_low, &refused, 0).is_err() || ctx.store(counts, &[0u8; 6], 0).is_err() {
        return SK_DROP;
    }
    SK_PASS
}

/// The transport fields of a record, from the socket of a stream skb.
#[inline(always)]
fn describe_skb(ctx: &SkBuffContext, event: &mut DnsEvent, cookie: u64) {
    let skb = unsafe { &*ctx.skb.skb };
    event.transport = TRANSPORT_TCP;
    event.socket_cookie = cookie;
    event.cgroup_id = 0;
    event.src_port = skb.local_port as u16;
    event.dst_port = u16::from_be((skb.remote_port >> 16) as u16);
    event.src_addr = [0; 16];
    event.dst_addr = [0; 16];
    if skb.family == AF_INET {
        event.family = FAMILY_IPV4;
        event.src_addr[..4].copy_from_slice(&skb.local_ip4.to_ne_bytes());
        event.dst_addr[..4].copy_from_slice(&skb.remote_ip4.to_ne_bytes());
    } else {
        event.family = FAMILY_IPV6;
        for i in 0..4 {
            event.src_addr[i * 4..i * 4 + 4].copy_from_slice(&skb.local_ip6[i].to_ne_bytes());
            event.dst_addr[i * 4..i * 4 + 4].copy_from_slice(&skb.remote_ip6[i].to_ne_bytes());
        }
    }
}
