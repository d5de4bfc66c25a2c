//! Maps and globals of the object. Names are in `guard_common::maps`.
use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{__sk_buff, bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, bpf_sock, BPF_F_NO_PREALLOC},
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_smp_processor_id,
        bpf_sk_storage_get, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::map,
    maps::{
        Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf, SockHash,
    },
};
use guard_common::{
    maps::{
        Binding, Counter, PolicyCounters, SeenKey, SockState, COUNTER_SLOTS, MAX_CGROUP_DEPTH,
        MAX_DNS_PORTS,
    },
    matching::{RuleEntry, RuleKey},
};

use crate::{verdict::Asker, wire::Scratch};

#[map]
pub static BINDINGS: HashMap<u64, Binding> = HashMap::with_max_entries(4096, 0);

/// Resized by userspace to the size of the compiled policy.
#[map]
pub static RULES: HashMap<RuleKey, RuleEntry> = HashMap::with_max_entries(1, 0);

/// Resized by userspace (`--ring-buffer-size`).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// The same counters per policy id (one policy id per run or binding), for
/// reports and metrics when many bindings share one loaded object.
/// Userspace creates an entry before it binds a cgroup to the policy; a
/// policy without an entry is counted only in [`COUNTERS`].
#[map]
pub static POLICY_COUNTERS: PerCpuHashMap<u32, PolicyCounters> =
    PerCpuHashMap::with_max_entries(4096, 0);

/// Names already reported in record mode, with their query counts. Per CPU
/// so counting needs no atomic (userspace sums the CPUs). LRU: a run that
/// resolves more distinct names than this reports an evicted name again
/// (userspace merges); counting never stops.
///
/// Resized by userspace when a binding records.
#[map]
pub static SEEN: LruPerCpuHashMap<SeenKey, u64> = LruPerCpuHashMap::with_max_entries(1, 0);

/// Working memory of the DNS programs: two slots per CPU (index `2 * cpu +
/// depth`), because a softirq can run a program again on the same CPU while
/// a run in process context is in the middle of its work. Userspace sizes
/// it to twice the number of possible CPUs. Too big for a per-CPU map.
#[map]
pub static SCRATCH: Array<Scratch> = Array::with_max_entries(1, 0);
#[map]
pub static NESTING: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// TCP connections of guarded cgroups to DNS ports, keyed by socket
/// cookie; the stream programs are attached to this map.
#[map]
pub static SOCKETS: SockHash<u64> = SockHash::with_max_entries(65536, 0);

/// What the programs that do not run in the asker's context need of a
/// socket: its binding and its last asker.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SocketAsker {
    pub binding: Binding,
    pub asker: Asker,
}

/// Socket cookie -> [`SocketAsker`]. Written when a query is sent, read
/// when an answer arrives. LRU: a socket quiet for long enough is
/// forgotten, and its answers are then refused as unbound (fail closed).
#[map]
pub static ASKERS: LruHashMap<u64, SocketAsker> = LruHashMap::with_max_entries(65536, 0);

/// Where a followed connection's answer stream is, for the stream parser
/// and verdict programs (keyed by socket cookie; see `stream.rs`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct StreamPosition {
    /// Stream offset where the next answer starts.
    pub next: u32,
    /// Stream offset just past the last chunk the parser was handed.
    pub known_end: u32,
    /// Stream offset of the first byte of the chunk the current answer
    /// starts in (what the programs' offset 0 is).
    pub base: u32,
    /// Non-zero while an answer is being put together.
    pub parsing: u32,
    /// The current answer: its offset in the chunk, and its length with
    /// the prefix.
    pub offset: u32,
    pub length: u32,
}

/// Socket cookie -> [`StreamPosition`], made when sock_ops follows the
/// connection. LRU: a connection forgotten mid-stream has its answers
/// refused (the parser fails, which ends the stream).
#[map]
pub static STREAMS: LruHashMap<u64, StreamPosition> = LruHashMap::with_max_entries(65536, 0);

/// Socket-local storage ([`SockState`]). Written out by hand: socket
/// storage needs a BTF map definition, whose aya-ebpf helper macro is
/// private; this is the same layout.
#[repr(C)]
pub struct SockStorage {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const SockState,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: the fields are placeholders the loader reads as BTF; never used.
unsafe impl Sync for SockStorage {}

#[unsafe(link_section = ".maps")]
#[unsafe(export_name = "SOCK_STATE")]
pub static SOCK_STATE: SockStorage = SockStorage {
    r#type: ptr::null(),
    key: ptr::null(),
    value: ptr::null(),
    max_entries: ptr::null(),
    map_flags: ptr::null(),
};

/// The storage of a socket (`create`: make it if missing). `sk` must be a
/// full socket pointer the verifier knows as such.
#[inline(always)]
pub fn sock_state(sk: *mut bpf_sock, create: bool) -> Option<&'static mut SockState> {
    let flags = if create { 1 } else { 0 }; // BPF_SK_STORAGE_GET_F_CREATE
    let state = unsafe {
        bpf_sk_storage_get(
            &SOCK_STATE as *const SockStorage as *mut c_void,
            sk as *mut c_void,
            ptr::null_mut(),
            flags,
        )
    } as *mut SockState;
    unsafe { state.as_mut() }
}

/// Destination ports treated as DNS (network byte order, 0 = unused). Set at
/// load time; read with `read_volatile` so the compiler cannot fold it.
#[unsafe(no_mangle)]
static DNS_PORTS: [u16; MAX_DNS_PORTS] = [53u16.to_be(), 0, 0, 0];

/// Offset of `child_pid` in the sched_process_fork record (kernel-specific).
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: u32 = 20;

#[inline(always)]
pub fn is_dns_port(port_be: u16) -> bool {
    let ports = unsafe { core::ptr::read_volatile(&DNS_PORTS) };
    port_be != 0
        && (port_be == ports[0]
            || port_be == ports[1]
            || port_be == ports[2]
            || port_be == ports[3])
}

#[inline(always)]
pub fn fork_child_pid_offset() -> usize {
    unsafe { core::ptr::read_volatile(&FORK_CHILD_PID_OFFSET) as usize }
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: a nested run on this CPU completes before we resume,
        // so a plain increment loses nothing.
        unsafe { *slot += 1 };
    }
}

/// Counts globally and for the binding's policy.
#[inline(always)]
pub fn count_for(binding: &Binding, counter: Counter) {
    count(counter);
    if let Some(counters) = POLICY_COUNTERS.get_ptr_mut(binding.policy_id) {
        let index = counter as usize;
        if index < COUNTER_SLOTS as usize {
            // Per-CPU value, same argument as above.
            unsafe { (*counters).values[index] += 1 };
        }
    }
}

/// The binding of the cgroup a packet belongs to (see [`find_binding`]).
#[inline(always)]
pub fn binding_of_skb(skb: *mut __sk_buff) -> Option<Binding> {
    let mut binding = NO_BINDING;
    (guard_binding_of_skb(skb, &mut binding) != 0).then_some(binding)
}

/// The binding of the current task's cgroup (see [`find_binding`]).
#[inline(always)]
pub fn binding_of_current() -> Option<Binding> {
    guard_of_current().map(|(_, binding)| binding)
}

/// The cgroup that guards the current task (its own if bound, else its
/// deepest bound ancestor) and its binding, through the global function.
#[inline(always)]
pub fn guard_of_current() -> Option<(u64, Binding)> {
    let mut id = 0u64;
    let mut binding = NO_BINDING;
    (guard_binding_of_current(&mut id, &mut binding) != 0).then_some((id, binding))
}

const NO_BINDING: Binding = Binding {
    policy_id: 0,
    audit_only: 0,
    record: 0,
    _pad: [0; 2],
    label_mask: 0,
};

/// [`find_binding`] for a packet's cgroup, as a global function: the
/// verifier checks the ancestor walk once, and its caller goes on from one
/// return instead of one per level the walk can return at.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn guard_binding_of_skb(skb: *mut __sk_buff, out: *mut Binding) -> i32 {
    if skb.is_null() || out.is_null() {
        return 0;
    }
    let found = find_binding(unsafe { bpf_skb_cgroup_id(skb) }, |level| unsafe {
        bpf_skb_ancestor_cgroup_id(skb, level as i32)
    });
    match found {
        Some((_, binding)) => {
            unsafe { *out = binding };
            1
        }
        None => 0,
    }
}

/// [`find_binding`] for the current task's cgroup, as a global function;
/// `out_id` receives the id of the bound cgroup.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn guard_binding_of_current(out_id: *mut u64, out: *mut Binding) -> i32 {
    if out_id.is_null() || out.is_null() {
        return 0;
    }
    let found = find_binding(unsafe { bpf_get_current_cgroup_id() }, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level as i32)
    });
    match found {
        Some((id, binding)) => {
            unsafe {
                *out_id = id;
                *out = binding;
            }
            1
        }
        None => 0,
    }
}

/// Finds the binding of a cgroup: the cgroup itself, else the deepest bound
/// ancestor (a guarded command may create child cgroups). The ancestors are
/// tried from the deepest level up and the first bound one returns.
#[inline(always)]
fn find_binding(own_id: u64, ancestor: impl Fn(u32) -> u64) -> Option<(u64, Binding)> {
    if let Some(binding) = unsafe { BINDINGS.get(own_id) } {
        return Some((own_id, *binding));
    }
    let mut level = MAX_CGROUP_DEPTH;
    while level > 0 {
        level -= 1;
        // 0 for levels below the cgroup's own.
        let id = ancestor(level);
        if id != 0 {
            if let Some(binding) = unsafe { BINDINGS.get(id) } {
                return Some((id, *binding));
            }
        }
    }
    None
}

/// A slot of working memory, held while `with` runs; None when both of this
/// CPU's slots are taken (the caller fails closed).
#[inline(always)]
pub fn with_scratch<R>(with: impl FnOnce(*mut Scratch) -> R) -> Option<R> {
    let depth = NESTING.get_ptr_mut(0)?;
    let level = unsafe { *depth };
    if level >= 2 {
        return None;
    }
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let scratch = SCRATCH.get_ptr_mut(cpu * 2 + level)?;
    unsafe { *depth = level + 1 };
    let result = with(scratch);
    unsafe { *depth = level };
    Some(result)
}
