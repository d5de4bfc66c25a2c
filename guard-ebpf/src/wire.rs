//! Reading a DNS message's question and deciding it against the policy:
//! the wire-format walk shared by every hook that reads DNS.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_loop, bpf_skb_load_bytes},
    programs::SkBuffContext,
};
use guard_common::{
    event::{DnsEvent, NAME_CAP},
    maps::{Binding, Counter},
    matching::{fold_case, label_bit, Action, RuleKey, SuffixWalk},
};

use crate::{
    maps::{count_for, RULES},
    packet::load,
};

const DNS_HEADER_LEN: u32 = 12;
/// The longest name in wire format, length bytes and root label included.
const MAX_WIRE_NAME: u32 = 255;

#[derive(Clone, Copy)]
pub enum Outcome {
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
pub fn inspect_message(
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
