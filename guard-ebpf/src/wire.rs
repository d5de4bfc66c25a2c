//! DNS wire format, read in the kernel: deciding a name against the
//! policy, reading a query's question, and walking an answer's records.
//! Shared by every hook that reads DNS (egress, ingress, the stream
//! programs). Everything here works on buffers in the scratch map, never on
//! packet memory: each hook copies what it needs first.
//!
//! Names are compared as sequences of labels (a `.` byte inside a label is
//! a byte like any other), with the label hashes and suffix walk of
//! `guard_common::matching`, so userspace decides exactly the same way.
use core::ffi::c_void;

use aya_ebpf::helpers::generated::{bpf_loop, bpf_probe_read_kernel};
use guard_common::{
    event::{
        DnsEvent, Unreadable, NAME_CAP, SECTION_ADDITIONAL, SECTION_ANSWER, SECTION_AUTHORITY,
        SECTION_QUESTION,
    },
    maps::{Binding, Counter},
    matching::{
        extend_suffix, fold_case_word, label_bit, label_hash_start, label_hash_step, Action,
        RuleKey, RuleSlot, HASH_INIT,
    },
};

use crate::maps::{count_for, RULES};

pub const DNS_HEADER_LEN: u32 = 12;
/// The longest name in wire format, length bytes and root label included.
const MAX_WIRE_NAME: u32 = 255;
/// Labels in a name of at most 255 bytes, root label excluded.
const MAX_LABELS: u32 = 127;
/// The whole DNS message fits: answers up to the protocol's limit.
pub const MSG_CAP: u32 = 65536;
const MSG_MASK: u32 = MSG_CAP - 1;
/// Records of one answer the kernel walks; more is unreadable.
const MAX_RECORDS: u32 = 512;
/// Pointer hops in one name.
const MAX_POINTERS: u32 = 32;

const TYPE_CNAME: u16 = 5;
const TYPE_MX: u16 = 15;
const TYPE_SRV: u16 = 33;
const TYPE_DNAME: u16 = 39;
const TYPE_SVCB: u16 = 64;
const TYPE_HTTPS: u16 = 65;

/// Working memory of one program run (a slot of the scratch map).
#[repr(C)]
pub struct Scratch {
    /// The mutable state of the bpf_loop walks. It lives in map memory, not
    /// on the stack, on purpose: the verifier reads map memory as unknown
    /// values, so each loop callback is verified once for any state, where
    /// counters on the stack would be tracked value by value (range by
    /// range) through every iteration, past the verifier's limits. Only
    /// pointers, which must stay typed, are kept on the stack.
    pub loops: Loops,
    /// The packet and binding of the run (kept here so the hooks' helper
    /// functions stay within BPF's five arguments).
    pub packet: crate::packet::Packet,
    pub binding: Binding,
    /// Where global functions leave their outcome.
    pub outcome: Outcome,
    /// The record being built: `qname` holds the question name (decided in
    /// place), `matched` a refused name of an answer.
    pub event: DnsEvent,
    /// Label hashes of the name being decided, first label first.
    pub label_hashes: [u64; 128],
    /// A name of an answer being decided (decompressed, wire format), with
    /// room after it for word reads.
    pub name: [u8; NAME_CAP + 64],
    /// Answers: the whole message.
    pub message: [u8; MSG_CAP as usize + 64],
}

/// The walks' state, one slot per walk (they nest: an answer's record
/// walk reads names and decides them).
#[repr(C)]
pub struct Loops {
    pub forward: ForwardVars,
    pub backward: BackwardVars,
    pub answer: AnswerVars,
    pub name: NameVars,
    pub messages: MessageVars,
}

/// State of a walk over the messages of a packet (TCP segment, GSO send).
#[repr(C)]
pub struct MessageVars {
    /// Offset of the next message (or its length prefix).
    pub at: u32,
    pub end: u32,
    /// GSO: the datagram size.
    pub step: u32,
    /// Refuse for this [`Unreadable`] reason without reading (0: read).
    pub refuse: u32,
    pub verdict: i32,
}

/// What deciding a message came to. A plain struct with every field set,
/// not an enum: outcomes pass through memory (the scratch map, the stack),
/// and an enum's unused fields would be uninitialised bytes the verifier
/// refuses to copy.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Outcome {
    /// One of the `OUTCOME_*` kinds.
    pub kind: u32,
    /// The deciding rule's id (`u32::MAX` when none).
    pub rule_id: u32,
    /// `Matched`: the [`Action`]; `Unreadable`: the [`Unreadable`] reason.
    pub detail: u32,
    pub _pad: u32,
    /// `Allowed`: the name's hash (record mode counts names by it).
    pub name_hash: u64,
}

/// Nothing to decide (no question, the root name, not an answer).
pub const OUTCOME_PASS: u32 = 0;
/// No deny rule matched (`rule_id` is an allow rule's, or `u32::MAX`).
pub const OUTCOME_ALLOWED: u32 = 1;
/// A deny rule matched; `detail` is Block or Audit.
pub const OUTCOME_MATCHED: u32 = 2;
/// The message could not be read with certainty.
pub const OUTCOME_UNREADABLE: u32 = 3;

impl Outcome {
    pub const PASS: Outcome = Outcome {
        kind: OUTCOME_PASS,
        rule_id: u32::MAX,
        detail: 0,
        _pad: 0,
        name_hash: 0,
    };

    #[inline(always)]
    pub const fn allowed(rule_id: u32, name_hash: u64) -> Outcome {
        Outcome {
            kind: OUTCOME_ALLOWED,
            rule_id,
            detail: 0,
            _pad: 0,
            name_hash,
        }
    }

    #[inline(always)]
    pub const fn matched(action: Action, rule_id: u32) -> Outcome {
        Outcome {
            kind: OUTCOME_MATCHED,
            rule_id,
            detail: action as u32,
            _pad: 0,
            name_hash: 0,
        }
    }

    #[inline(always)]
    pub const fn unreadable(reason: Unreadable) -> Outcome {
        Outcome {
            kind: OUTCOME_UNREADABLE,
            rule_id: u32::MAX,
            detail: reason as u32,
            _pad: 0,
            name_hash: 0,
        }
    }
}

/// The decision on one name: the deciding rule, and the name's hash.
#[derive(Clone, Copy)]
struct NameDecision {
    best: RuleSlot,
    hash: u64,
}

/// Decides the wire-format name at `name` (in map memory, with at least 64
/// readable bytes after the name's 255): first walks it label by label,
/// checking each length and hashing each label, then walks the label
/// hashes from the last to the first, looking up every label-boundary
/// suffix the policy has rules for. `loaded` bounds what may be read.
#[inline(never)]
fn decide_name(
    name: *const u8,
    loaded: u32,
    scratch: *mut Scratch,
    binding: &Binding,
) -> Result<(NameDecision, u32), Unreadable> {
    let hashes = unsafe { (*scratch).label_hashes.as_mut_ptr() };
    let vars = unsafe { &mut (*scratch).loops.forward };
    vars.loaded = loaded;
    vars.at = 0;
    vars.labels = 0;
    vars.wire_len = 0;
    vars.error = Unreadable::Truncated as u32;
    let mut forward = ForwardWalk {
        name,
        hashes,
        vars: vars as *mut ForwardVars,
    };
    unsafe {
        bpf_loop(
            MAX_LABELS + 1,
            walk_labels as *mut c_void,
            &mut forward as *mut ForwardWalk as *mut c_void,
            0,
        )
    };
    let vars = unsafe { &*forward.vars };
    let (wire_len, labels) = (vars.wire_len, vars.labels);
    if wire_len == 0 {
        return Err(Unreadable::from_u8(vars.error as u8));
    }
    let back = unsafe { &mut (*scratch).loops.backward };
    back.last = labels;
    back.policy_id = binding.policy_id;
    back.label_mask = binding.label_mask;
    back.hash = HASH_INIT;
    back.count = 0;
    back.best = RuleSlot::EMPTY;
    if labels > 0 {
        let mut backward = BackwardWalk {
            hashes,
            vars: back as *mut BackwardVars,
        };
        unsafe {
            bpf_loop(
                labels & 0x7f,
                walk_suffixes as *mut c_void,
                &mut backward as *mut BackwardWalk as *mut c_void,
                0,
            )
        };
    }
    let back = unsafe { &mut (*scratch).loops.backward };
    if labels > 0 && binding.label_mask & label_bit(back.count) != 0 {
        if let Some(entry) = unsafe { RULES.get(RuleKey::new(binding.policy_id, back.hash)) } {
            if entry.exact.is_set() {
                back.best = entry.exact;
            }
        }
    }
    Ok((
        NameDecision {
            best: back.best,
            hash: back.hash,
        },
        wire_len,
    ))
}

#[repr(C)]
struct ForwardWalk {
    name: *const u8,
    hashes: *mut u64,
    vars: *mut ForwardVars,
}

/// State of the first walk over a name: label by label, checking each
/// length and hashing each label.
#[repr(C)]
pub struct ForwardVars {
    loaded: u32,
    /// Offset of the next length byte.
    at: u32,
    labels: u32,
    /// Set when the root label is reached; 0 = not (yet) a valid name.
    wire_len: u32,
    /// An [`Unreadable`] reason, for when `wire_len` stays 0.
    error: u32,
}

extern "C" fn walk_labels(_index: u64, state: *mut c_void) -> i64 {
    let walk = unsafe { &mut *(state as *mut ForwardWalk) };
    let state = unsafe { &mut *walk.vars };
    let at = state.at;
    if at >= state.loaded || at >= MAX_WIRE_NAME {
        state.error = if at >= MAX_WIRE_NAME {
            Unreadable::NameTooLong
        } else {
            Unreadable::Truncated
        } as u32;
        return 1;
    }
    let len = unsafe { *walk.name.add((at & 0xff) as usize) } as u32;
    if len == 0 {
        state.wire_len = at + 1;
        return 1;
    }
    if len > 63 {
        state.error = if len >= 0xc0 {
            Unreadable::CompressedQuestion
        } else {
            Unreadable::BadLabel
        } as u32;
        return 1;
    }
    let next = at + 1 + len;
    if next >= MAX_WIRE_NAME || state.labels >= MAX_LABELS {
        state.error = Unreadable::NameTooLong as u32;
        return 1;
    }
    if next >= state.loaded {
        state.error = Unreadable::Truncated as u32;
        return 1;
    }
    let mut hash = label_hash_start(len);
    let first = at + 1;
    let mut word = 0;
    // Eight bytes at a time; a label is at most 63 bytes, eight words.
    while word < 8 {
        let done = word * 8;
        if done >= len {
            break;
        }
        let offset = (first + done) & 0xff;
        let mut value = unsafe { (walk.name.add(offset as usize) as *const u64).read_unaligned() };
        let left = len - done;
        if left < 8 {
            value &= (1u64 << (left * 8)) - 1;
        }
        hash = label_hash_step(hash, fold_case_word(value));
        word += 1;
    }
    unsafe { *walk.hashes.add((state.labels & 127) as usize) = hash };
    state.labels += 1;
    state.at = next;
    0
}

#[repr(C)]
struct BackwardWalk {
    hashes: *const u64,
    vars: *mut BackwardVars,
}

/// State of the second walk: the label hashes from the last label to the
/// first, each suffix looked up.
#[repr(C)]
pub struct BackwardVars {
    last: u32,
    policy_id: u32,
    label_mask: u64,
    /// Hash of the suffix walked so far.
    hash: u64,
    /// Labels in it.
    count: u32,
    best: RuleSlot,
}

extern "C" fn walk_suffixes(index: u64, state: *mut c_void) -> i64 {
    let walk = unsafe { &mut *(state as *mut BackwardWalk) };
    let state = unsafe { &mut *walk.vars };
    let k = index as u32;
    if k >= state.last {
        return 1;
    }
    let label = unsafe {
        *walk
            .hashes
            .add((state.last.wrapping_sub(1 + k) & 127) as usize)
    };
    if state.count > 0 && state.label_mask & label_bit(state.count) != 0 {
        // The suffix walked so far now has a label in front: a `*.` rule
        // keyed by it applies.
        if let Some(entry) = unsafe { RULES.get(RuleKey::new(state.policy_id, state.hash)) } {
            if entry.wildcard.is_set() {
                state.best = entry.wildcard;
            }
        }
    }
    state.hash = extend_suffix(state.hash, label);
    state.count += 1;
    0
}

/// Turns a name's decision into an outcome, applying the binding's mode.
#[inline(always)]
fn outcome_of(decision: NameDecision, binding: &Binding) -> Outcome {
    match Action::from_u8(decision.best.action) {
        Action::Block if binding.audit_only != 0 => {
            Outcome::matched(Action::Audit, decision.best.rule_id)
        }
        action @ (Action::Block | Action::Audit) => Outcome::matched(action, decision.best.rule_id),
        Action::Allow => Outcome::allowed(decision.best.rule_id, decision.hash),
        Action::None => Outcome::allowed(u32::MAX, decision.hash),
    }
}

/// Decides a query's question. The caller has put the message's header in
/// `header` and the bytes after it (up to 256 + 4) in `event.qname`;
/// `available` is how many bytes of the message follow the header. Leaves
/// the type in `event.qtype` and the name's length in `event.qname_len`.
#[inline(always)]
pub fn decide_question(
    header: &[u8; 12],
    available: u32,
    scratch: *mut Scratch,
    binding: &Binding,
    event: &mut DnsEvent,
) -> Outcome {
    event.qtype = 0;
    event.qname_len = 0;
    let questions = u16::from_be_bytes([header[4], header[5]]);
    if questions == 0 {
        return Outcome::PASS;
    }
    if questions > 1 {
        // No server answers several questions; a second one would go unseen.
        return Outcome::unreadable(Unreadable::QuestionCount);
    }
    let loaded = if available > NAME_CAP as u32 {
        NAME_CAP as u32
    } else {
        available
    };
    let (decision, wire_len) = match decide_name(event.qname.as_ptr(), loaded, scratch, binding) {
        Ok(decided) => decided,
        Err(reason) => return Outcome::unreadable(reason),
    };
    // Read back from map memory: the verifier then sees a bounded unknown
    // value instead of one derived from the walk.
    event.qname_len = wire_len as u16;
    let wire_len = unsafe { core::ptr::read_volatile(&event.qname_len) } as u32 & 0xff;
    if wire_len + 2 > available {
        return Outcome::unreadable(Unreadable::Truncated);
    }
    let qtype = unsafe { event.qname.as_ptr().add(wire_len as usize) as *const [u8; 2] };
    event.qtype = u16::from_be_bytes(unsafe { *qtype });
    count_for(binding, Counter::Inspected);
    if wire_len == 1 {
        // The root name: nothing a rule can name.
        return Outcome::PASS;
    }
    outcome_of(decision, binding)
}

/// Decides an answer: the message (`len` bytes) is in `scratch.message`.
/// Every name it would have the client use, beyond the question it was
/// asked (decided when it was sent), is decided: the owners of answer and
/// additional records, and the names CNAME, DNAME, MX, SRV, SVCB and HTTPS
/// records point to. The first refused name is left in
/// `event.matched` (with its record's type and section); the question name
/// in `event.qname`.
#[inline(always)]
pub fn decide_answer(scratch: *mut Scratch, len: u32, binding: &Binding) -> Outcome {
    let event = unsafe { &mut (*scratch).event };
    event.qtype = 0;
    event.qname_len = 0;
    event.matched_len = 0;
    event.matched_type = 0;
    event.matched_section = SECTION_QUESTION;
    if len < DNS_HEADER_LEN {
        return Outcome::unreadable(Unreadable::Truncated);
    }
    let message = unsafe { (*scratch).message.as_ptr() };
    let header = unsafe { *(message as *const [u8; 12]) };
    if header[2] & 0x80 == 0 {
        // A query arriving from a DNS port: not an answer to decide.
        return Outcome::PASS;
    }
    let count = |at: usize| u16::from_be_bytes([header[at], header[at + 1]]) as u32;
    let (questions, answers, authority, additional) = (count(4), count(6), count(8), count(10));
    if questions > 1 {
        return Outcome::unreadable(Unreadable::QuestionCount);
    }
    count_for(binding, Counter::AnswersInspected);
    let records = answers + authority + additional;
    if records > MAX_RECORDS {
        return Outcome::unreadable(Unreadable::TooManyRecords);
    }
    let vars = unsafe { &mut (*scratch).loops.answer };
    vars.binding = *binding;
    vars.len = len;
    vars.at = DNS_HEADER_LEN;
    vars.answers = answers;
    vars.authority = authority;
    vars.records = records;
    vars.question_known = 0;
    vars.worst = Worst::Nothing as u32;
    vars.rule_id = u32::MAX;
    vars.error = 0;
    if questions == 1 {
        let question = unsafe { (*scratch).event.qname.as_mut_ptr() };
        let (end, wire_len) = match read_name(scratch, len, DNS_HEADER_LEN, question) {
            Ok(read) => read,
            Err(reason) => return Outcome::unreadable(reason),
        };
        event.qname_len = wire_len as u16;
        if end + 4 > len {
            return Outcome::unreadable(Unreadable::Truncated);
        }
        event.qtype = u16::from_be_bytes(read_pair(message, end));
        // The question itself was decided when it was asked (a refused one
        // gets no answer); what is new in an answer is where it leads.
        let vars = unsafe { &mut (*scratch).loops.answer };
        vars.question_known = 1;
        vars.at = end + 4;
    }
    let vars = unsafe { &mut (*scratch).loops.answer };
    if vars.worst != Worst::Blocked as u32 && records > 0 {
        let mut walk = AnswerWalk { scratch };
        unsafe {
            bpf_loop(
                records,
                walk_record as *mut c_void,
                &mut walk as *mut AnswerWalk as *mut c_void,
                0,
            )
        };
    }
    let vars = unsafe { &(*scratch).loops.answer };
    if vars.error != 0 {
        return Outcome::unreadable(Unreadable::from_u8(vars.error as u8));
    }
    let action = if vars.worst == Worst::Blocked as u32 && binding.audit_only == 0 {
        Action::Block
    } else if vars.worst != Worst::Nothing as u32 {
        Action::Audit
    } else {
        return Outcome::PASS;
    };
    Outcome::matched(action, vars.rule_id)
}

#[repr(u32)]
enum Worst {
    Nothing = 0,
    Audited = 1,
    Blocked = 2,
}

#[repr(C)]
struct AnswerWalk {
    scratch: *mut Scratch,
}

/// State of the walk over an answer's records.
#[repr(C)]
pub struct AnswerVars {
    binding: Binding,
    len: u32,
    /// Offset of the next record.
    at: u32,
    answers: u32,
    authority: u32,
    records: u32,
    /// The answer has a question: owners that point at it are its name,
    /// decided when it was asked.
    question_known: u32,
    worst: u32,
    rule_id: u32,
    /// An [`Unreadable`] reason; 0 while the message reads fine.
    error: u32,
}

/// Keeps the most severe decision (a block over an audit). A refused name
/// found in a record (`name` set: its length in the scratch name buffer) is
/// copied to the event, with the record's type and section.
#[inline(always)]
fn consider(scratch: *mut Scratch, rule: RuleSlot, section: u8, rtype: u16, name: Option<u32>) {
    let severity = match Action::from_u8(rule.action) {
        Action::Block => Worst::Blocked as u32,
        Action::Audit => Worst::Audited as u32,
        _ => return,
    };
    let vars = unsafe { &mut (*scratch).loops.answer };
    if severity <= vars.worst {
        return;
    }
    vars.worst = severity;
    vars.rule_id = rule.rule_id;
    let event = unsafe { &mut (*scratch).event };
    event.matched_type = rtype;
    event.matched_section = section;
    match name {
        Some(wire_len) => {
            event.matched_len = wire_len as u16;
            unsafe {
                bpf_probe_read_kernel(
                    event.matched.as_mut_ptr() as *mut c_void,
                    (wire_len & 0xff) + 1,
                    (*scratch).name.as_ptr() as *const c_void,
                )
            };
        }
        None => event.matched_len = 0,
    }
}

/// Two bytes of the message at `at` (masked: the buffer has room past it).
#[inline(always)]
fn read_pair(message: *const u8, at: u32) -> [u8; 2] {
    let at = (at & MSG_MASK) as usize;
    unsafe { *(message.add(at) as *const [u8; 2]) }
}

/// Records an unreadable reason and ends the walk.
#[inline(always)]
fn stop(scratch: *mut Scratch, reason: Unreadable) -> i64 {
    unsafe { (*scratch).loops.answer.error = reason as u32 };
    1
}

extern "C" fn walk_record(index: u64, state: *mut c_void) -> i64 {
    let scratch = unsafe { (*(state as *mut AnswerWalk)).scratch };
    let vars = unsafe { &mut (*scratch).loops.answer };
    let index = index as u32;
    if index >= vars.records {
        return 1;
    }
    let message = unsafe { (*scratch).message.as_ptr() };
    let section = if index < vars.answers {
        SECTION_ANSWER
    } else if index < vars.answers + vars.authority {
        SECTION_AUTHORITY
    } else {
        SECTION_ADDITIONAL
    };
    let (owner_at, len, binding) = (vars.at, vars.len, vars.binding);
    let question_known = vars.question_known != 0;
    if owner_at + 1 >= len {
        return stop(scratch, Unreadable::Truncated);
    }
    // An owner that points at the question is the question's name, decided
    // when it was asked: nothing to read (most records of most answers).
    let owner_is_question = question_known && read_pair(message, owner_at) == [0xc0, 0x0c];
    let name = unsafe { (*scratch).name.as_mut_ptr() };
    let (end, owner_len) = if owner_is_question {
        (owner_at + 2, 0)
    } else {
        match read_name(scratch, len, owner_at, name) {
            Ok(read) => read,
            Err(reason) => return stop(scratch, reason),
        }
    };
    if end + 10 > len {
        return stop(scratch, Unreadable::Truncated);
    }
    let rtype = u16::from_be_bytes(read_pair(message, end));
    let rdlength = u16::from_be_bytes(read_pair(message, end + 8)) as u32;
    let rdata = end + 10;
    let next = rdata + rdlength;
    if next > len {
        return stop(scratch, Unreadable::Truncated);
    }
    if section != SECTION_AUTHORITY {
        if !owner_is_question {
            match decide_name(name, NAME_CAP as u32, scratch, &binding) {
                Ok((decision, _)) => {
                    consider(scratch, decision.best, section, rtype, Some(owner_len))
                }
                Err(reason) => return stop(scratch, reason),
            }
        }
        let target = match rtype {
            TYPE_CNAME | TYPE_DNAME => Some(rdata),
            TYPE_MX | TYPE_SVCB | TYPE_HTTPS => Some(rdata + 2),
            TYPE_SRV => Some(rdata + 6),
            _ => None,
        };
        if let Some(target) = target {
            if target >= next {
                return stop(scratch, Unreadable::Truncated);
            }
            let (target_end, target_len) = match read_name(scratch, len, target, name) {
                Ok(read) => read,
                Err(reason) => return stop(scratch, reason),
            };
            if target_end > next {
                return stop(scratch, Unreadable::Truncated);
            }
            match decide_name(name, NAME_CAP as u32, scratch, &binding) {
                Ok((decision, _)) => {
                    consider(scratch, decision.best, section, rtype, Some(target_len))
                }
                Err(reason) => return stop(scratch, reason),
            }
        }
    }
    let vars = unsafe { &mut (*scratch).loops.answer };
    vars.at = next;
    if vars.worst == Worst::Blocked as u32 {
        // The answer is refused: the rest cannot change that.
        return 1;
    }
    0
}

/// Reads the (possibly compressed) name at `at` in the message into `out`,
/// in wire format. Returns where the name ends in the message (after its
/// root label or first pointer) and its decompressed length. Pointers must
/// point before the labels that refer to them, as RFC 1035 says ("a prior
/// occurrence"), which also makes every name finite.
#[inline(never)]
fn read_name(
    scratch: *mut Scratch,
    len: u32,
    at: u32,
    out: *mut u8,
) -> Result<(u32, u32), Unreadable> {
    let vars = unsafe { &mut (*scratch).loops.name };
    vars.len = len;
    vars.at = at;
    vars.segment = at;
    vars.limit = u32::MAX;
    vars.written = 0;
    vars.pointers = 0;
    vars.end = 0;
    vars.done = 0;
    vars.error = Unreadable::NameTooLong as u32;
    let mut walk = NameRead {
        message: unsafe { (*scratch).message.as_ptr() },
        out,
        vars: vars as *mut NameVars,
    };
    unsafe {
        bpf_loop(
            MAX_LABELS + MAX_POINTERS + 1,
            read_label as *mut c_void,
            &mut walk as *mut NameRead as *mut c_void,
            0,
        )
    };
    let vars = unsafe { &(*scratch).loops.name };
    if vars.done == 0 {
        return Err(Unreadable::from_u8(vars.error as u8));
    }
    Ok((vars.end, vars.written))
}

#[repr(C)]
struct NameRead {
    message: *const u8,
    out: *mut u8,
    vars: *mut NameVars,
}

/// State of reading one (compressed) name.
#[repr(C)]
pub struct NameVars {
    len: u32,
    /// Offset of the next length byte or pointer.
    at: u32,
    /// Where the labels being read now start, and the bound they must stay
    /// under (the start of the labels that pointed here).
    segment: u32,
    limit: u32,
    written: u32,
    pointers: u32,
    /// Where the name ends in the record (0 until known).
    end: u32,
    done: u32,
    error: u32,
}

extern "C" fn read_label(_index: u64, state: *mut c_void) -> i64 {
    let walk = unsafe { &mut *(state as *mut NameRead) };
    let state = unsafe { &mut *walk.vars };
    let at = state.at;
    if at >= state.limit {
        state.error = Unreadable::BadPointer as u32;
        return 1;
    }
    if at >= state.len {
        state.error = Unreadable::Truncated as u32;
        return 1;
    }
    let byte = unsafe { *walk.message.add((at & MSG_MASK) as usize) } as u32;
    if byte == 0 {
        if state.written >= MAX_WIRE_NAME {
            state.error = Unreadable::NameTooLong as u32;
            return 1;
        }
        unsafe { *walk.out.add((state.written & 0xff) as usize) = 0 };
        state.written += 1;
        if state.end == 0 {
            state.end = at + 1;
        }
        state.done = 1;
        return 1;
    }
    if byte >= 0xc0 {
        if at + 1 >= state.len {
            state.error = Unreadable::Truncated as u32;
            return 1;
        }
        let low = unsafe { *walk.message.add(((at + 1) & MSG_MASK) as usize) } as u32;
        let target = ((byte & 0x3f) << 8) | low;
        if target >= state.segment || state.pointers >= MAX_POINTERS {
            state.error = Unreadable::BadPointer as u32;
            return 1;
        }
        if state.end == 0 {
            state.end = at + 2;
        }
        state.pointers += 1;
        state.limit = state.segment;
        state.segment = target;
        state.at = target;
        return 0;
    }
    if byte > 63 {
        state.error = Unreadable::BadLabel as u32;
        return 1;
    }
    if at + 1 + byte > state.len {
        state.error = Unreadable::Truncated as u32;
        return 1;
    }
    // The label and its length byte, plus the root label after it, must
    // fit in a 255-byte name.
    if state.written + 1 + byte + 1 > MAX_WIRE_NAME {
        state.error = Unreadable::NameTooLong as u32;
        return 1;
    }
    unsafe {
        bpf_probe_read_kernel(
            walk.out.add((state.written & 0xff) as usize) as *mut c_void,
            (byte & 0x3f) + 1,
            walk.message.add((at & MSG_MASK) as usize) as *const c_void,
        )
    };
    state.written += 1 + byte;
    state.at = at + 1 + byte;
    0
}
