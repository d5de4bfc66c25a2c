//! Loading the kernel object, attaching its programs and filling its maps.
use std::{fs, os::fd::AsFd, path::Path};

use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        trace_point::TracePointLinkId, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, TracePoint,
    },
    Ebpf, EbpfLoader,
};
use guard_common::{
    maps::{
        Binding, Counter, SeenKey, BINDINGS, COUNTERS, COUNTER_SLOTS, EVENTS, GLOBAL_DNS_PORTS,
        GLOBAL_FORK_CHILD_PID_OFFSET, MAX_DNS_PORTS, PROGRAM_DNS_EGRESS, PROGRAM_EXEC_ENTER,
        PROGRAM_EXEC_EXIT, PROGRAM_FORK, RULES, SEEN,
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
        let egress: &mut CgroupSkb = program(&mut self.ebpf, PROGRAM_DNS_EGRESS)?;
        // aya 0.14 uses bpf_link_create on >= 5.7, where only Single is
        // accepted; links still allow other programs below and beside.
        egress
            .attach(
                cgroup,
                CgroupSkbAttachType::Egress,
                CgroupAttachMode::Single,
            )
            .map_err(|source| Error::Program {
                name: PROGRAM_DNS_EGRESS,
                source,
            })?;
        Ok(())
    }

    pub fn install_rules(&mut self, policy_id: u32, rules: &RuleSet) -> Result<()> {
        let mut map: BpfHashMap<&mut MapData, RuleKey, RuleEntry> = map_mut(&mut self.ebpf, RULES)?;
        for (hash, entry) in rules.entries() {
            map.insert(RuleKey::new(policy_id, *hash), *entry, 0)
                .map_err(|source| Error::Map {
                    name: RULES,
                    source,
                })?;
        }
        Ok(())
    }

    pub fn bind(&mut self, cgroup_id: u64, binding: Binding) -> Result<()> {
        let mut map: BpfHashMap<&mut MapData, u64, Binding> = map_mut(&mut self.ebpf, BINDINGS)?;
        map.insert(cgroup_id, binding, 0)
            .map_err(|source| Error::Map {
                name: BINDINGS,
                source,
            })
    }

    /// The ring buffer, taken out of the object to be read on its own.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map(EVENTS).ok_or(Error::Missing(EVENTS))?;
        RingBuf::try_from(map).map_err(|source| Error::Map {
            name: EVENTS,
            source,
        })
    }

    /// Query counts of the names reported in record mode, by (name hash,
    /// query type), for one policy.
    pub fn seen_counts(&self, policy_id: u32) -> std::collections::HashMap<(u64, u16), u64> {
        let Some(map) = self.ebpf.map(SEEN) else {
            return Default::default();
        };
        let Ok(seen) = aya::maps::PerCpuHashMap::<&MapData, SeenKey, u64>::try_from(map) else {
            return Default::default();
        };
        seen.iter()
            .flatten()
            .filter(|(key, _)| key.policy_id == policy_id)
            .map(|(key, counts)| ((key.name_hash, key.qtype), counts.iter().sum()))
            .collect()
    }

    /// Runs and total run time of the DNS egress program, as the kernel
    /// accounts them while `kernel.bpf_stats_enabled` is 1 (None otherwise).
    pub fn egress_stats(&self) -> Option<(u64, u64)> {
        let enabled = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").ok()?;
        if enabled.trim() != "1" {
            return None;
        }
        let program = self.ebpf.program(PROGRAM_DNS_EGRESS)?;
        let info = match program {
            aya::programs::Program::CgroupSkb(p) => p.info().ok()?,
            _ => return None,
        };
        Some((info.run_count(), info.run_time().as_nanos() as u64))
    }

    /// Sum over CPUs of one counter.
    pub fn counter(&self, counter: Counter) -> Result<u64> {
        let map = self.ebpf.map(COUNTERS).ok_or(Error::Missing(COUNTERS))?;
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

fn map_mut<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<BpfHashMap<&'a mut MapData, K, V>> {
    let map = ebpf.map_mut(name).ok_or(Error::Missing(name))?;
    BpfHashMap::try_from(map).map_err(|source| Error::Map { name, source })
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
