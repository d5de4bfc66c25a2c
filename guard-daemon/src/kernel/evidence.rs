//! The evidence maps of a loaded object (see `guard_common::evidence`):
//! per-policy settings and counts, the Unix sockets acted on, the tasks
//! tracked; and [`Attachments`], which notices guard's own programs being
//! detached or replaced.
use std::{
    fs,
    os::fd::{AsFd, BorrowedFd},
    path::Path,
};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap};
use guard_common::evidence::{
    EvidenceCounters, EvidenceSettings, UnixPath, EVIDENCE_COUNTERS, EVIDENCE_SETTINGS,
    EVIDENCE_SLOTS, TRACKED, UNIX_SOCKETS,
};

use super::{bpfsys, maps::KernelMaps};
use crate::error::{Error, Result};

/// Exact evidence counts of one policy, by `EvidenceKind`.
pub type EvidenceCounts = [u64; EVIDENCE_SLOTS];

fn hash<'a, K: aya::Pod, V: aya::Pod>(
    maps: &'a mut (impl KernelMaps + ?Sized),
    name: &'static str,
) -> Result<BpfHashMap<&'a mut MapData, K, V>> {
    BpfHashMap::try_from(maps.map_mut(name)?).map_err(|source| Error::Map { name, source })
}

/// Evidence operations on any loaded object (a run's or the daemon's).
pub trait EvidenceMaps: KernelMaps {
    fn set_evidence_settings(&mut self, policy_id: u32, settings: EvidenceSettings) -> Result<()> {
        hash::<u32, EvidenceSettings>(self, EVIDENCE_SETTINGS)?
            .insert(policy_id, settings, 0)
            .map_err(|source| Error::Map {
                name: EVIDENCE_SETTINGS,
                source,
            })
    }

    /// Forgets a retired policy's settings and counts.
    fn forget_evidence(&mut self, policy_id: u32) {
        if let Ok(mut settings) = hash::<u32, EvidenceSettings>(self, EVIDENCE_SETTINGS) {
            let _ = settings.remove(&policy_id);
        }
        if let Ok(map) = self.map_mut(EVIDENCE_COUNTERS) {
            if let Ok(mut counters) = PerCpuHashMap::<_, u32, EvidenceCounters>::try_from(map) {
                let _ = counters.remove(&policy_id);
            }
        }
    }

    /// Evidence counted for a policy, summed over CPUs.
    fn evidence_counts(&self, policy_id: u32) -> EvidenceCounts {
        let mut total = [0u64; EVIDENCE_SLOTS];
        let Ok(map) = self.map(EVIDENCE_COUNTERS) else {
            return total;
        };
        let Ok(counters) = PerCpuHashMap::<_, u32, EvidenceCounters>::try_from(map) else {
            return total;
        };
        if let Ok(per_cpu) = counters.get(&policy_id, 0) {
            for cpu in per_cpu.iter() {
                for (sum, value) in total.iter_mut().zip(cpu.values) {
                    *sum += value;
                }
            }
        }
        total
    }

    /// Writes the Unix sockets to act on (path, `UNIX_REFUSE` or
    /// `UNIX_NOTE`). Paths that do not fit a socket address are skipped.
    fn set_unix_sockets(&mut self, sockets: &[(Vec<u8>, u8)]) -> Result<()> {
        let mut map = hash::<UnixPath, u8>(self, UNIX_SOCKETS)?;
        for (path, action) in sockets {
            if let Some(key) = UnixPath::new(path) {
                map.insert(key, *action, 0).map_err(|source| Error::Map {
                    name: UNIX_SOCKETS,
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// Tracks the tasks already in a cgroup tree (a unit bound while it
    /// runs) as guarded by `guarding`.
    fn track_present_tasks(&mut self, cgroup: &Path, guarding: u64) -> Result<usize> {
        let mut tids = Vec::new();
        collect_threads(cgroup, &mut tids);
        let mut map = hash::<u32, u64>(self, TRACKED)?;
        for tid in &tids {
            let _ = map.insert(*tid, guarding, 0);
        }
        Ok(tids.len())
    }

    /// Stops tracking tasks guarded by a cgroup that is no longer bound
    /// (else they would count as escaping when they next fork).
    fn untrack_cgroup(&mut self, guarding: u64) {
        let Ok(mut map) = hash::<u32, u64>(self, TRACKED) else {
            return;
        };
        let stale: Vec<u32> = map
            .iter()
            .flatten()
            .filter(|(_, cgroup)| *cgroup == guarding)
            .map(|(tid, _)| tid)
            .collect();
        for tid in stale {
            let _ = map.remove(&tid);
        }
    }
}

impl<T: KernelMaps + ?Sized> EvidenceMaps for T {}

fn collect_threads(cgroup: &Path, out: &mut Vec<u32>) {
    if let Ok(text) = fs::read_to_string(cgroup.join("cgroup.threads")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(cgroup) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_threads(&entry.path(), out);
            }
        }
    }
}

/// Guard's own attachments to one cgroup: (attach type, program id, link
/// id), as the kernel listed them right after attaching. A link that is
/// detached stays detached, so one check at the end of a run sees any
/// detach that happened during it.
#[derive(Debug, Default, Clone)]
pub struct Attachments {
    expected: Vec<(u32, u32, u32)>,
}

impl Attachments {
    /// Records how `programs` ((attach type, program id)) are attached to
    /// the cgroup now.
    pub fn record(cgroup: BorrowedFd<'_>, programs: &[(u32, u32)]) -> Attachments {
        let mut expected = Vec::new();
        for (attach_type, program) in programs {
            let link = bpfsys::attached(cgroup, *attach_type)
                .ok()
                .and_then(|all| all.into_iter().find(|(p, _)| p == program))
                .map_or(0, |(_, link)| link);
            expected.push((*attach_type, *program, link));
        }
        Attachments { expected }
    }

    /// What is missing now: descriptions of the programs no longer
    /// attached through guard's link.
    pub fn missing(&self, cgroup: impl AsFd) -> Vec<String> {
        let cgroup = cgroup.as_fd();
        let mut missing = Vec::new();
        for (attach_type, program, link) in &self.expected {
            let now = bpfsys::attached(cgroup, *attach_type).unwrap_or_default();
            let present = now
                .iter()
                .any(|(p, l)| p == program && (*link == 0 || l == link));
            if !present {
                missing.push(format!(
                    "{} (program {program}, link {link}) is no longer attached to the cgroup",
                    attach_name(*attach_type)
                ));
            }
        }
        missing
    }
}

fn attach_name(attach_type: u32) -> &'static str {
    match attach_type {
        bpfsys::BPF_CGROUP_INET_EGRESS => "the DNS egress program",
        bpfsys::BPF_CGROUP_UNIX_CONNECT => "the Unix connect program",
        bpfsys::BPF_CGROUP_UNIX_SENDMSG => "the Unix sendmsg program",
        _ => "a guard program",
    }
}
