//! Reading and writing the maps of a loaded object, whoever owns it (a
//! standalone run's [`super::Programs`] or the daemon's [`super::Pinned`]).
use std::{collections::HashMap, os::fd::AsFd as _};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use guard_common::{
    maps::{
        Binding, Counter, PolicyCounters, SeenKey, BINDINGS, COUNTERS, COUNTER_SLOTS,
        POLICY_COUNTERS, RULES, SEEN,
    },
    matching::{RuleEntry, RuleKey},
};

use crate::error::{Error, Result};

/// Reads and writes the maps of a loaded object, whoever owns it.
pub trait KernelMaps {
    fn map(&self, name: &'static str) -> Result<&Map>;
    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map>;

    /// Writes a policy's rules: in batches, or one by one on a kernel
    /// without batch operations.
    fn install_rules(&mut self, policy_id: u32, rules: &HashMap<u64, RuleEntry>) -> Result<()> {
        let (keys, values): (Vec<RuleKey>, Vec<RuleEntry>) = rules
            .iter()
            .map(|(hash, entry)| (RuleKey::new(policy_id, *hash), *entry))
            .unzip();
        let map = match self.map(RULES)? {
            Map::HashMap(data) => data,
            _ => return Err(Error::Missing(RULES)),
        };
        match super::bpfsys::update_batch(map.fd().as_fd(), &keys, &values) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {}
            Err(e) => {
                return Err(Error::io(
                    "writing the policy's rules (BPF_MAP_UPDATE_BATCH)",
                )(e))
            }
        }
        let mut map: BpfHashMap<&mut MapData, RuleKey, RuleEntry> = typed_mut(self, RULES)?;
        for (hash, entry) in rules {
            map.insert(RuleKey::new(policy_id, *hash), *entry, 0)
                .map_err(|source| Error::Map {
                    name: RULES,
                    source,
                })?;
        }
        Ok(())
    }

    /// Removes the rules of a policy id, given its rule entries (no map scan).
    fn remove_rules(&mut self, policy_id: u32, rules: &HashMap<u64, RuleEntry>) -> Result<()> {
        let mut map: BpfHashMap<&mut MapData, RuleKey, RuleEntry> = typed_mut(self, RULES)?;
        for hash in rules.keys() {
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
    fn seen_counts(&self, policy_id: u32) -> HashMap<(u64, u16), u64> {
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
