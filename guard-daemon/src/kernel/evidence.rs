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
use guard_common::event::{EvidenceEvent, EvidenceKind};
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
        bpfsys::BPF_CGROUP_INET_INGRESS => "the DNS ingress program",
        bpfsys::BPF_CGROUP_SOCK_OPS => "the DNS sock_ops program",
        bpfsys::BPF_CGROUP_UNIX_CONNECT => "the Unix connect program",
        bpfsys::BPF_CGROUP_UNIX_SENDMSG => "the Unix sendmsg program",
        _ => "a guard program",
    }
}

/// An evidence record, decoded.
#[derive(Clone, Debug)]
pub struct Evidence {
    pub kind: EvidenceKind,
    /// `ACTION_RECORDED`, `ACTION_KILLED` or `ACTION_REFUSED`.
    pub action: u8,
    pub policy_id: u32,
    /// The process that acted, and its thread.
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// The task concerned (the one that moved).
    pub subject: u32,
    pub guarded_cgroup: u64,
    pub target_cgroup: u64,
    pub args: [u64; 3],
    /// Destination cgroup path (in the hierarchy) or Unix socket path.
    pub path: String,
    pub boot_ns: u64,
}

impl Evidence {
    pub fn decode(event: &EvidenceEvent) -> Option<Evidence> {
        Some(Evidence {
            kind: EvidenceKind::from_u8(event.what)?,
            action: event.action,
            policy_id: event.policy_id,
            pid: event.pid,
            tid: event.tid,
            comm: super::records::c_string(&event.comm),
            subject: event.subject,
            guarded_cgroup: event.guarded_cgroup,
            target_cgroup: event.target_cgroup,
            args: event.args,
            path: super::records::c_string(&event.path),
            boot_ns: event.boot_ns,
        })
    }
}

/// Kills a task that escaped where the kernel could not (it was moved by
/// another process). True when the signal was sent.
pub fn kill_task(tid: u32) -> bool {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .is_ok()
}

/// A cgroup directory's path in its hierarchy, as the kernel's cgroup
/// tracepoints name it (the mount's root joined with the path below the
/// mount point).
pub fn hierarchy_path(cgroup_dir: &Path) -> Option<String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let fields: Vec<&str> = before.split_whitespace().collect();
        let (root, mount_point) = (fields.get(3)?, fields.get(4)?);
        let below = cgroup_dir.strip_prefix(mount_point).ok()?;
        let joined = Path::new(root).join(below);
        Some(joined.display().to_string())
    })
}

/// Whether a cgroup path in the hierarchy is `guarded` or below it.
pub fn within(path: &str, guarded: &str) -> bool {
    let guarded = guarded.trim_end_matches('/');
    path == guarded
        || path
            .strip_prefix(guarded)
            .is_some_and(|rest| rest.starts_with('/'))
        || guarded.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_is_label_aware_on_path_components() {
        assert!(within("/a/guard-run-1", "/a/guard-run-1"));
        assert!(within("/a/guard-run-1/nested", "/a/guard-run-1"));
        assert!(!within("/a/guard-run-10", "/a/guard-run-1"));
        assert!(!within("/", "/a/guard-run-1"));
        assert!(within("/anything", "/"));
    }
}
