//! Maps and globals of the object. Names are in `guard_common::maps`.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use guard_common::{
    event::DnsEvent,
    maps::{
        Binding, Counter, PolicyCounters, SeenKey, COUNTER_SLOTS, MAX_CGROUP_DEPTH, MAX_DNS_PORTS,
    },
    matching::{RuleEntry, RuleKey},
};

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

/// Working memory of `dns_egress`: the event being built, whose `qname`
/// doubles as the parse buffer. Two slots per CPU plus a nesting depth,
/// because a softirq can run the program again on the same CPU while a
/// process-context run is in the middle of its work.
#[map]
pub static SCRATCH: PerCpuArray<DnsEvent> = PerCpuArray::with_max_entries(2, 0);
#[map]
pub static NESTING: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

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

/// Finds the binding of a cgroup: the cgroup itself, else the deepest bound
/// ancestor (a guarded command may create child cgroups).
#[inline(always)]
pub fn find_binding(own_id: u64, ancestor: impl Fn(u32) -> u64) -> Option<Binding> {
    if let Some(binding) = unsafe { BINDINGS.get(own_id) } {
        return Some(*binding);
    }
    let mut found = None;
    let mut level = 0;
    while level < MAX_CGROUP_DEPTH {
        let id = ancestor(level);
        if id == 0 {
            break;
        }
        if let Some(binding) = unsafe { BINDINGS.get(id) } {
            found = Some(*binding);
        }
        level += 1;
    }
    found
}
