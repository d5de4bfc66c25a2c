//! Loading the kernel object, attaching its programs and filling its maps.
//!
//! Two owners share the map code ([`KernelMaps`]): [`Programs`], the object
//! a standalone `guard run` loads and unloads, and [`Pinned`], the daemon's
//! copy, pinned under bpffs so it outlives the daemon process.
use std::{
    fs, io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        cgroup_skb::CgroupSkbLinkId,
        links::{FdLink, PinnedLink},
        trace_point::TracePointLinkId,
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, TracePoint,
    },
    Ebpf, EbpfLoader,
};
use guard_common::{
    maps::{
        Binding, Counter, PolicyCounters, SeenKey, BINDINGS, COUNTERS, COUNTER_SLOTS, EVENTS,
        GLOBAL_DNS_PORTS, GLOBAL_FORK_CHILD_PID_OFFSET, MAX_DNS_PORTS, POLICY_COUNTERS,
        PROGRAM_DNS_EGRESS, PROGRAM_EXEC_ENTER, PROGRAM_EXEC_EXIT, PROGRAM_FORK, RULES, SEEN,
    },
    matching::{RuleEntry, RuleKey},
};

use crate::{
    error::{Error, Result},
    policy::RuleSet,
};

/// The kernel object, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guard-ebpf"));

const TRACEFS: &str = "/sys/kernel/tracing";

pub struct LoadOptions<'a> {
    pub dns_ports: &'a [u16],
    pub rule_capacity: u32,
    pub ring_buffer_bytes: u32,
    /// Distinct (name, type) pairs record mode can count; 0 when no binding
    /// records (the LRU map is preallocated, so it is only made big on use).
    pub record_capacity: u32,
    /// Entries of the per-policy counter map (one per concurrent policy id).
    pub policy_capacity: u32,
}

/// Loaded, verified programs and their maps. Dropping it detaches and
/// unloads everything (nothing is pinned).
pub struct Programs {
    ebpf: Ebpf,
    tracepoint_links: Vec<(&'static str, TracePointLinkId)>,
}

impl Programs {
    pub fn load(options: &LoadOptions<'_>) -> Result<Programs> {
        if options.dns_ports.is_empty() || options.dns_ports.len() > MAX_DNS_PORTS {
            return Err(Error::Tracefs(format!(
                "between 1 and {MAX_DNS_PORTS} DNS ports are supported"
            )));
        }
        let mut ports = [0u16; MAX_DNS_PORTS];
        for (slot, port) in ports.iter_mut().zip(options.dns_ports) {
            *slot = port.to_be();
        }
        let t = std::time::Instant::now();
        ensure_tracefs()?;
        let fork_offset = fork_child_pid_offset()?;
        let mut ebpf = EbpfLoader::new()
            .override_global(GLOBAL_DNS_PORTS, &ports, true)
            .override_global(GLOBAL_FORK_CHILD_PID_OFFSET, &fork_offset, true)
            .map_max_entries(RULES, options.rule_capacity.max(1))
            .map_max_entries(EVENTS, options.ring_buffer_bytes)
            .map_max_entries(SEEN, options.record_capacity.max(1))
            .map_max_entries(POLICY_COUNTERS, options.policy_capacity.max(1))
            .map_max_entries(BINDINGS, options.policy_capacity.max(1))
            .load(OBJECT)?;
        tracing::debug!(elapsed = ?t.elapsed(), "object loaded (maps created)");
        let egress: &mut CgroupSkb = program(&mut ebpf, PROGRAM_DNS_EGRESS)?;
        egress.load().map_err(|source| Error::Program {
            name: PROGRAM_DNS_EGRESS,
            source,
        })?;
        tracing::debug!(elapsed = ?t.elapsed(), insns = ?egress.info().ok().and_then(|i| i.verified_instruction_count()), "dns_egress verified");
        for name in [PROGRAM_EXEC_ENTER, PROGRAM_EXEC_EXIT, PROGRAM_FORK] {
            let tracepoint: &mut TracePoint = program(&mut ebpf, name)?;
            tracepoint
                .load()
                .map_err(|source| Error::Program { name, source })?;
        }
        Ok(Programs {
            ebpf,
            tracepoint_links: Vec::new(),
        })
    }

    /// Attaches the process trackers. They fire host-wide but return at once
    /// for processes outside guarded cgroups.
    pub fn attach_tracepoints(&mut self) -> Result<()> {
        for (name, category, event) in [
            (PROGRAM_EXEC_ENTER, "syscalls", "sys_enter_execve"),
            (PROGRAM_EXEC_EXIT, "syscalls", "sys_exit_execve"),
            (PROGRAM_FORK, "sched", "sched_process_fork"),
        ] {
            let tracepoint: &mut TracePoint = program(&mut self.ebpf, name)?;
            let link = tracepoint
                .attach(category, event)
                .map_err(|source| Error::Program { name, source })?;
            self.tracepoint_links.push((name, link));
        }
        Ok(())
    }

    /// Attaches the DNS egress program to a cgroup (a bpf_link: it goes away
    /// with this process unless pinned).
    pub fn attach_cgroup(&mut self, cgroup: impl AsFd) -> Result<()> {
        attach_egress(program(&mut self.ebpf, PROGRAM_DNS_EGRESS)?, cgroup)?;
        Ok(())
    }

    /// The ring buffer, taken out of the object to be read on its own.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map(EVENTS).ok_or(Error::Missing(EVENTS))?;
        RingBuf::try_from(map).map_err(|source| Error::Map {
            name: EVENTS,
            source,
        })
    }

    /// Runs and total run time of the DNS egress program (see [`egress_stats`]).
    pub fn egress_stats(&self) -> Option<(u64, u64)> {
        match self.ebpf.program(PROGRAM_DNS_EGRESS)? {
            aya::programs::Program::CgroupSkb(p) => egress_stats(p),
            _ => None,
        }
    }

    /// Pins programs, maps and the tracepoint links into `dir` (which must
    /// exist on bpffs), so that all of it outlives this process.
    fn pin_into(mut self, dir: &Path) -> Result<()> {
        let pin_error = |what: String| move |e: aya::pin::PinError| Error::Pin(what, e.to_string());
        for (name, id) in std::mem::take(&mut self.tracepoint_links) {
            let tracepoint: &mut TracePoint = program(&mut self.ebpf, name)?;
            let link = tracepoint
                .take_link(id)
                .map_err(|source| Error::Program { name, source })?;
            let link =
                FdLink::try_from(link).map_err(|e| Error::Pin(name.into(), e.to_string()))?;
            link.pin(dir.join(format!("link_{name}")))
                .map_err(pin_error(name.into()))?;
        }
        let egress: &mut CgroupSkb = program(&mut self.ebpf, PROGRAM_DNS_EGRESS)?;
        egress
            .pin(dir.join(format!("prog_{PROGRAM_DNS_EGRESS}")))
            .map_err(pin_error(PROGRAM_DNS_EGRESS.into()))?;
        for name in PINNED_MAPS {
            let map = self.ebpf.map(name).ok_or(Error::Missing(name))?;
            map.pin(dir.join(format!("map_{name}")))
                .map_err(pin_error(name.into()))?;
        }
        Ok(())
    }
}

impl KernelMaps for Programs {
    fn map(&self, name: &'static str) -> Result<&Map> {
        self.ebpf.map(name).ok_or(Error::Missing(name))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map> {
        self.ebpf.map_mut(name).ok_or(Error::Missing(name))
    }
}

/// Maps the daemon keeps pinned (the scratch maps live as long as the
/// program that uses them, which is pinned too).
const PINNED_MAPS: [&str; 6] = [BINDINGS, RULES, EVENTS, COUNTERS, POLICY_COUNTERS, SEEN];

/// Reads and writes the maps of a loaded object, whoever owns it.
pub trait KernelMaps {
    fn map(&self, name: &'static str) -> Result<&Map>;
    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map>;

    fn install_rules(&mut self, policy_id: u32, rules: &RuleSet) -> Result<()> {
        let mut map: BpfHashMap<&mut MapData, RuleKey, RuleEntry> = typed_mut(self, RULES)?;
        for (hash, entry) in rules.entries() {
            map.insert(RuleKey::new(policy_id, *hash), *entry, 0)
                .map_err(|source| Error::Map {
                    name: RULES,
                    source,
                })?;
        }
        Ok(())
    }

    /// Removes the rules of a policy id, given its rule set (no map scan).
    fn remove_rules(&mut self, policy_id: u32, rules: &RuleSet) -> Result<()> {
        let mut map: BpfHashMap<&mut MapData, RuleKey, RuleEntry> = typed_mut(self, RULES)?;
        for hash in rules.entries().keys() {
            let _ = map.remove(&RuleKey::new(policy_id, *hash));
        }
        Ok(())
    }

    /// Removes every rule whose policy id `keep` rejects (a full scan, for
    /// tidying up after a crash).
    fn retain_rules(&mut self, keep: &dyn Fn(u32) -> bool) -> Result<usize> {
        let mut map: BpfHashMap<&mut MapData, RuleKey, RuleEntry> = typed_mut(self, RULES)?;
        let stale: Vec<RuleKey> = map
            .keys()
            .flatten()
            .filter(|key| !keep(key.policy_id))
            .collect();
        for key in &stale {
            let _ = map.remove(key);
        }
        Ok(stale.len())
    }

    fn bind(&mut self, cgroup_id: u64, binding: Binding) -> Result<()> {
        let mut map: BpfHashMap<&mut MapData, u64, Binding> = typed_mut(self, BINDINGS)?;
        map.insert(cgroup_id, binding, 0)
            .map_err(|source| Error::Map {
                name: BINDINGS,
                source,
            })
    }

    fn unbind(&mut self, cgroup_id: u64) -> Result<()> {
        let mut map: BpfHashMap<&mut MapData, u64, Binding> = typed_mut(self, BINDINGS)?;
        match map.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(Error::Map {
                name: BINDINGS,
                source,
            }),
        }
    }

    fn bindings(&self) -> Result<Vec<(u64, Binding)>> {
        let map: BpfHashMap<&MapData, u64, Binding> = typed(self, BINDINGS)?;
        Ok(map.iter().flatten().collect())
    }

    fn rule_count(&self) -> Result<usize> {
        let map: BpfHashMap<&MapData, RuleKey, RuleEntry> = typed(self, RULES)?;
        Ok(map.keys().flatten().count())
    }

    /// Starts counting for a policy id (the kernel only counts per policy
    /// for ids that have an entry).
    fn add_policy_counters(&mut self, policy_id: u32) -> Result<()> {
        let mut counters = per_cpu_mut::<_, u32, PolicyCounters>(self, POLICY_COUNTERS)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::io("counting CPUs")(e))?;
        let zero = aya::maps::PerCpuValues::try_from(vec![PolicyCounters::default(); cpus])
            .map_err(Error::io("per-CPU values"))?;
        counters
            .insert(policy_id, zero, 0)
            .map_err(|source| Error::Map {
                name: POLICY_COUNTERS,
                source,
            })
    }

    fn remove_policy_counters(&mut self, policy_id: u32) {
        if let Ok(mut counters) = per_cpu_mut::<_, u32, PolicyCounters>(self, POLICY_COUNTERS) {
            let _ = counters.remove(&policy_id);
        }
    }

    /// Counters of every policy id that has them, summed over CPUs.
    fn all_policy_counters(&self) -> Result<Vec<(u32, PolicyCounters)>> {
        let counters = per_cpu::<_, u32, PolicyCounters>(self, POLICY_COUNTERS)?;
        Ok(counters
            .iter()
            .flatten()
            .map(|(id, per_cpu)| (id, sum_counters(per_cpu.iter())))
            .collect())
    }

    fn policy_counters(&self, policy_id: u32) -> Result<PolicyCounters> {
        let counters = per_cpu::<_, u32, PolicyCounters>(self, POLICY_COUNTERS)?;
        match counters.get(&policy_id, 0) {
            Ok(per_cpu) => Ok(sum_counters(per_cpu.iter())),
            Err(source) => Err(Error::Map {
                name: POLICY_COUNTERS,
                source,
            }),
        }
    }

    /// Query counts of the names reported in record mode, by (name hash,
    /// query type), for one policy.
    fn seen_counts(&self, policy_id: u32) -> std::collections::HashMap<(u64, u16), u64> {
        let Ok(seen) = per_cpu::<_, SeenKey, u64>(self, SEEN) else {
            return Default::default();
        };
        seen.iter()
            .flatten()
            .filter(|(key, _)| key.policy_id == policy_id)
            .map(|(key, counts)| ((key.name_hash, key.qtype), counts.iter().sum()))
            .collect()
    }

    /// Forgets what record mode saw for a policy id.
    fn forget_seen(&mut self, policy_id: u32) {
        let Ok(mut seen) = per_cpu_mut::<_, SeenKey, u64>(self, SEEN) else {
            return;
        };
        let keys: Vec<SeenKey> = seen
            .keys()
            .flatten()
            .filter(|key| key.policy_id == policy_id)
            .collect();
        for key in keys {
            let _ = seen.remove(&key);
        }
    }

    /// Sum over CPUs of one global counter.
    fn counter(&self, counter: Counter) -> Result<u64> {
        let map = self.map(COUNTERS)?;
        let array: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| Error::Map {
                name: COUNTERS,
                source,
            })?;
        debug_assert!((counter as u32) < COUNTER_SLOTS);
        let values = array
            .get(&(counter as u32), 0)
            .map_err(|source| Error::Map {
                name: COUNTERS,
                source,
            })?;
        Ok(values.iter().sum())
    }
}

fn sum_counters<'a>(per_cpu: impl Iterator<Item = &'a PolicyCounters>) -> PolicyCounters {
    let mut total = PolicyCounters::default();
    for cpu in per_cpu {
        for (sum, value) in total.values.iter_mut().zip(cpu.values) {
            *sum += value;
        }
    }
    total
}

fn typed<'a, M: KernelMaps + ?Sized, K: aya::Pod, V: aya::Pod>(
    maps: &'a M,
    name: &'static str,
) -> Result<BpfHashMap<&'a MapData, K, V>> {
    BpfHashMap::try_from(maps.map(name)?).map_err(|source| Error::Map { name, source })
}

fn typed_mut<'a, M: KernelMaps + ?Sized, K: aya::Pod, V: aya::Pod>(
    maps: &'a mut M,
    name: &'static str,
) -> Result<BpfHashMap<&'a mut MapData, K, V>> {
    BpfHashMap::try_from(maps.map_mut(name)?).map_err(|source| Error::Map { name, source })
}

fn per_cpu<'a, M: KernelMaps + ?Sized, K: aya::Pod, V: aya::Pod>(
    maps: &'a M,
    name: &'static str,
) -> Result<PerCpuHashMap<&'a MapData, K, V>> {
    PerCpuHashMap::try_from(maps.map(name)?).map_err(|source| Error::Map { name, source })
}

fn per_cpu_mut<'a, M: KernelMaps + ?Sized, K: aya::Pod, V: aya::Pod>(
    maps: &'a mut M,
    name: &'static str,
) -> Result<PerCpuHashMap<&'a mut MapData, K, V>> {
    PerCpuHashMap::try_from(maps.map_mut(name)?).map_err(|source| Error::Map { name, source })
}

/// Attaches the DNS program to a cgroup's egress (a bpf_link). aya 0.14
/// uses bpf_link_create on >= 5.7, where only Single is accepted; links
/// still allow other programs below and beside.
fn attach_egress(egress: &mut CgroupSkb, cgroup: impl AsFd) -> Result<CgroupSkbLinkId> {
    egress
        .attach(
            cgroup,
            CgroupSkbAttachType::Egress,
            CgroupAttachMode::Single,
        )
        .map_err(|source| Error::Program {
            name: PROGRAM_DNS_EGRESS,
            source,
        })
}

/// Runs and total run time of the DNS egress program, as the kernel
/// accounts them while `kernel.bpf_stats_enabled` is 1 (None otherwise).
fn egress_stats(program: &CgroupSkb) -> Option<(u64, u64)> {
    let enabled = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").ok()?;
    if enabled.trim() != "1" {
        return None;
    }
    let info = program.info().ok()?;
    Some((info.run_count(), info.run_time().as_nanos() as u64))
}

impl Drop for Programs {
    /// Detaching a tracepoint waits for an RCU grace period (about 70 ms
    /// here) when it is the tracepoint's last perf user. Detaching the three
    /// side by side overlaps part of the waits (measured: 214 ms -> 178 ms;
    /// the kernel serialises the rest). A daemon that keeps them attached
    /// avoids the cost entirely.
    fn drop(&mut self) {
        let mut links = Vec::new();
        for (name, id) in self.tracepoint_links.drain(..) {
            if let Ok(tracepoint) = program::<TracePoint>(&mut self.ebpf, name) {
                if let Ok(link) = tracepoint.take_link(id) {
                    links.push(link);
                }
            }
        }
        std::thread::scope(|scope| {
            for link in links {
                scope.spawn(move || drop(link));
            }
        });
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(Error::Missing(name))?;
    program
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

/// Prefix of the pin of a cgroup's program link; the cgroup id follows.
const CGROUP_LINK_PREFIX: &str = "link_cgroup_";

/// The daemon's copy of the object, pinned in `<root>/<generation>/`. The
/// generation names the object and its load options, so a daemon adopts
/// only what it would have loaded itself; anything else is an older
/// version, replaced once the new one is in place.
pub struct Pinned {
    dir: PathBuf,
    maps: std::collections::HashMap<&'static str, Map>,
    egress: CgroupSkb,
}

impl Pinned {
    /// Adopts the pinned generation that matches `options`, or loads,
    /// attaches and pins a new one. Returns whether it was adopted.
    pub fn open_or_create(root: &Path, options: &LoadOptions<'_>) -> Result<(Pinned, bool)> {
        let dir = root.join(generation(options));
        if dir.join(format!("map_{EVENTS}")).exists() {
            return Ok((Pinned::open(&dir)?, true));
        }
        fs::create_dir_all(root).map_err(Error::io(format!("creating {}", root.display())))?;
        // A daemon that died while pinning leaves a partial directory whose
        // links keep the tracepoints attached: remove it first.
        for partial in list_dirs(root).into_iter().filter(|d| is_partial(d)) {
            remove_pins(&partial);
        }
        // (bpffs refuses names with dots, so no hidden names.)
        let partial = root.join(format!(
            "{PARTIAL_PREFIX}{}-{}",
            generation(options),
            std::process::id()
        ));
        fs::create_dir(&partial).map_err(Error::io(format!("creating {}", partial.display())))?;
        let pinned = Programs::load(options).and_then(|mut programs| {
            programs.attach_tracepoints()?;
            programs.pin_into(&partial)
        });
        if let Err(e) = pinned {
            remove_pins(&partial);
            return Err(e);
        }
        // Rename is atomic: a crash leaves either the partial
        // directory or the complete generation, never half of one.
        fs::rename(&partial, &dir).map_err(Error::io(format!("renaming {}", partial.display())))?;
        Ok((Pinned::open(&dir)?, false))
    }

    pub fn open(dir: &Path) -> Result<Pinned> {
        let mut maps = std::collections::HashMap::new();
        for name in PINNED_MAPS {
            let data = MapData::from_pin(dir.join(format!("map_{name}")))
                .map_err(|source| Error::Map { name, source })?;
            let map = Map::from_map_data(data).map_err(|source| Error::Map { name, source })?;
            maps.insert(name, map);
        }
        let egress = CgroupSkb::from_pin(
            dir.join(format!("prog_{PROGRAM_DNS_EGRESS}")),
            CgroupSkbAttachType::Egress,
        )
        .map_err(|source| Error::Program {
            name: PROGRAM_DNS_EGRESS,
            source,
        })?;
        Ok(Pinned {
            dir: dir.to_owned(),
            maps,
            egress,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Pinned generations under `root` other than this one.
    pub fn other_generations(&self, root: &Path) -> Vec<PathBuf> {
        list_dirs(root)
            .into_iter()
            .filter(|d| *d != self.dir && !is_partial(d))
            .collect()
    }

    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.maps.remove(EVENTS).ok_or(Error::Missing(EVENTS))?;
        RingBuf::try_from(map).map_err(|source| Error::Map {
            name: EVENTS,
            source,
        })
    }

    /// Attaches the DNS program to a cgroup with a pinned link, unless one
    /// is pinned for it already.
    pub fn attach_cgroup(&mut self, cgroup: &fs::File, cgroup_id: u64) -> Result<()> {
        let path = self.dir.join(format!("{CGROUP_LINK_PREFIX}{cgroup_id}"));
        if path.exists() {
            return Ok(());
        }
        let id = attach_egress(&mut self.egress, cgroup)?;
        let link = self.egress.take_link(id).map_err(|source| Error::Program {
            name: PROGRAM_DNS_EGRESS,
            source,
        })?;
        let link = FdLink::try_from(link)
            .map_err(|e| Error::Pin(PROGRAM_DNS_EGRESS.into(), e.to_string()))?;
        link.pin(&path)
            .map_err(|e| Error::Pin(path.display().to_string(), e.to_string()))?;
        Ok(())
    }

    /// Detaches the DNS program from a cgroup (removing the pin is the
    /// detach: nothing else holds the link).
    pub fn detach_cgroup(&self, cgroup_id: u64) {
        let path = self.dir.join(format!("{CGROUP_LINK_PREFIX}{cgroup_id}"));
        if let Ok(link) = PinnedLink::from_pin(&path) {
            let _ = link.unpin();
        }
    }

    /// Ids of the cgroups with a pinned link.
    pub fn attached_cgroups(&self) -> Vec<u64> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix(CGROUP_LINK_PREFIX)?
                    .parse()
                    .ok()
            })
            .collect()
    }

    pub fn egress_stats(&self) -> Option<(u64, u64)> {
        egress_stats(&self.egress)
    }

    /// Verified instructions of the DNS program.
    pub fn egress_instructions(&self) -> Option<u32> {
        self.egress
            .info()
            .ok()
            .and_then(|i| i.verified_instruction_count())
    }
}

impl KernelMaps for Pinned {
    fn map(&self, name: &'static str) -> Result<&Map> {
        self.maps.get(name).ok_or(Error::Missing(name))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map> {
        self.maps.get_mut(name).ok_or(Error::Missing(name))
    }
}

/// Unpins everything under `dir` and removes it: links go (detaching their
/// programs), and maps and programs are freed once nothing else holds them.
pub fn remove_pins(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_pins(&path);
        } else {
            let _ = fs::remove_file(&path);
        }
    }
    let _ = fs::remove_dir(dir);
}

fn list_dirs(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

const PARTIAL_PREFIX: &str = "partial-";

fn is_partial(dir: &Path) -> bool {
    dir.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(PARTIAL_PREFIX))
}

/// FNV-1a over the kernel object: identifies the build of the programs and
/// the layout of their maps and records.
pub fn object_fingerprint() -> String {
    format!("{:016x}", fnv1a(FNV_OFFSET, OBJECT))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Names a pinned generation: the object and the load options that are
/// baked into it (globals, map sizes).
pub fn generation(options: &LoadOptions<'_>) -> String {
    let mut hash = fnv1a(FNV_OFFSET, OBJECT);
    let mut feed = |bytes: &[u8]| hash = fnv1a(hash, bytes);
    for port in options.dns_ports {
        feed(&port.to_le_bytes());
    }
    for value in [
        options.rule_capacity,
        options.ring_buffer_bytes,
        options.record_capacity,
        options.policy_capacity,
    ] {
        feed(&value.to_le_bytes());
    }
    format!("{hash:016x}")
}

/// Makes sure a bpf filesystem is mounted at `root`'s mount point.
pub fn ensure_bpffs(root: &Path) -> Result<()> {
    const BPFFS_MAGIC: i64 = 0xcafe_4a11;
    let base = Path::new("/sys/fs/bpf");
    let on_bpffs =
        |p: &Path| nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPFFS_MAGIC);
    let mut probe = root.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if on_bpffs(&probe) {
        return Ok(());
    }
    if root.starts_with(base) && !on_bpffs(base) {
        crate::cgroup::mount_kernel_fs("bpf", base)
            .map_err(|e| Error::io(format!("mounting bpffs on {}", base.display()))(e.into()))?;
        return Ok(());
    }
    Err(Error::io(format!(
        "{} is not on a bpf filesystem",
        root.display()
    ))(io::Error::from_raw_os_error(libc::EXDEV)))
}

/// aya finds tracepoints through tracefs; hosts without systemd may not have
/// it mounted. Mount it at its standard place (as systemd does at boot).
fn ensure_tracefs() -> Result<()> {
    let populated = |p: &str| {
        fs::read_dir(p)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    };
    if populated(TRACEFS) || populated("/sys/kernel/debug/tracing") {
        return Ok(());
    }
    crate::cgroup::mount_kernel_fs("tracefs", Path::new(TRACEFS)).map_err(|e| {
        Error::Tracefs(format!(
            "not mounted, and mounting it on {TRACEFS} failed: {e}"
        ))
    })
}

/// The `child_pid` field moved between kernel versions; read its offset from
/// the tracepoint's format description.
fn fork_child_pid_offset() -> Result<u32> {
    let root = if Path::new(TRACEFS).join("events").exists() {
        TRACEFS
    } else {
        "/sys/kernel/debug/tracing"
    };
    let path = format!("{root}/events/sched/sched_process_fork/format");
    let format =
        fs::read_to_string(&path).map_err(|e| Error::Tracefs(format!("reading {path}: {e}")))?;
    parse_field_offset(&format, "child_pid")
        .ok_or_else(|| Error::Tracefs(format!("{path} has no child_pid field")))
}

fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let declaration = parts.next()?.strip_prefix("field:")?;
        if declaration.split_whitespace().last()? != field {
            return None;
        }
        parts.find_map(|p| p.strip_prefix("offset:"))?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_field_offsets_of_old_and_new_fork_formats() {
        let new = "\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\
                   \tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\
                   \tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(new, "child_pid"), Some(20));
        let old = "\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\
                   \tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(old, "child_pid"), Some(44));
        assert_eq!(parse_field_offset(old, "parent_pid"), None);
    }
}
