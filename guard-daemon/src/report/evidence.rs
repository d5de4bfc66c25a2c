//! Ways around the DNS hooks in a run's report: what the kernel's
//! evidence records say (escapes from the cgroup, packet and raw sockets,
//! `bpf()` changes, refused resolver sockets), guard's own programs found
//! detached, and whether each fails the run.
use std::path::{Path, PathBuf};

use guard_common::{
    event::{EvidenceKind, ACTION_KILLED, ACTION_REFUSED},
    evidence::{SEEN_CLONE3_CHILD, SEEN_FORKING, SEEN_MOVED_BY_ANOTHER, SEEN_MOVED_ITSELF},
};
use serde::{Deserialize, Serialize};

use super::{chains::ChainLink, Clock};
use crate::kernel::evidence::{within, Evidence, EvidenceCounts};

/// One piece of evidence, as the report lists it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvidenceEntry {
    pub time: String,
    /// `left-cgroup`, `packet-socket`, `raw-socket`, `bpf`,
    /// `resolver-socket`, `handoff-socket`, `untracked`, `detached`.
    pub kind: String,
    /// `fails-run` (enforce mode), `reported` (audit mode), `allowed` (the
    /// policy allows it), `noted` (never fails a run).
    pub verdict: String,
    /// What the kernel did: `killed`, `refused` or `recorded`.
    pub action: String,
    /// The process that acted (0: guard itself found it).
    pub pid: u32,
    pub comm: String,
    /// The task concerned (the one that moved), when not the actor.
    pub subject: u32,
    pub detail: String,
    /// Where it went: a cgroup path or a socket path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// Occurrences merged into this entry (noted kinds only).
    pub count: u64,
    pub process_chain: Vec<ChainLink>,
}

pub const FAILS_RUN: &str = "fails-run";
pub const REPORTED: &str = "reported";
const ALLOWED: &str = "allowed";
const NOTED: &str = "noted";

impl EvidenceEntry {
    /// Whether it fails the run (with `--fail-on-block`, reported ones do
    /// too).
    pub fn fails(&self, fail_on_block: bool) -> bool {
        self.verdict == FAILS_RUN || (fail_on_block && self.verdict == REPORTED)
    }

    /// An escape that fails the run and that the kernel could not stop
    /// (another process moved the task): guard kills it.
    pub fn escaped_alive(&self) -> bool {
        self.kind == "left-cgroup" && self.action == "recorded" && self.fails(false)
    }

    /// The live line printed when it arrives.
    pub fn line(&self) -> String {
        let chain = self
            .process_chain
            .iter()
            .map(ChainLink::short)
            .collect::<Vec<_>>()
            .join(" → ");
        let who = if chain.is_empty() {
            format!("{} [{}]", self.comm, self.pid)
        } else {
            chain
        };
        format!(
            "guard: {}: {} ({}, {}) from {who}",
            self.kind, self.detail, self.action, self.verdict
        )
    }

    /// guard's own program found detached or replaced.
    pub fn detached(detail: String, enforce: bool, clock_now: String) -> EvidenceEntry {
        EvidenceEntry {
            time: clock_now,
            kind: "detached".into(),
            verdict: if enforce { FAILS_RUN } else { REPORTED }.into(),
            action: "recorded".into(),
            pid: 0,
            comm: String::new(),
            subject: 0,
            detail,
            destination: None,
            count: 1,
            process_chain: Vec::new(),
        }
    }
}

/// What deciding a record needs to know about the run.
pub struct EvidencePolicy {
    pub enforce: bool,
    pub allow_raw_sockets: bool,
    /// The guarded cgroup's path in the hierarchy: a task moved anywhere
    /// below it has not left.
    pub guarded_path: Option<String>,
    /// This guard binary: `bpf()` calls by a nested `guard run` are its
    /// own set-up, not tampering.
    pub own_executable: Option<PathBuf>,
}

impl EvidencePolicy {
    /// The report entry for a record; None for a task moved within the
    /// guarded tree (no evidence at all).
    pub fn entry(
        &self,
        e: &Evidence,
        chain: Vec<ChainLink>,
        clock: &Clock,
    ) -> Option<EvidenceEntry> {
        let fails = if self.enforce { FAILS_RUN } else { REPORTED };
        let by_another = if e.subject != e.tid {
            format!(" by {} [{}]", e.comm, e.pid)
        } else {
            String::new()
        };
        let (kind, verdict, detail) = match e.kind {
            EvidenceKind::Moved => {
                let inside = self
                    .guarded_path
                    .as_deref()
                    .is_some_and(|guarded| within(&e.path, guarded));
                if inside {
                    return None;
                }
                (
                    "left-cgroup",
                    fails,
                    format!("moved to {}{by_another}", e.path),
                )
            }
            EvidenceKind::LeftCgroup => {
                let detail = match e.args[0] {
                    SEEN_MOVED_ITSELF => format!("moved itself to {}", e.path),
                    SEEN_MOVED_BY_ANOTHER => format!("moved to {}{by_another}", e.path),
                    SEEN_FORKING => format!(
                        "found outside its guarded cgroup (now cgroup {}) when it forked",
                        e.target_cgroup
                    ),
                    SEEN_CLONE3_CHILD => format!(
                        "started by clone3 in another cgroup (cgroup {}, CLONE_INTO_CGROUP)",
                        e.target_cgroup
                    ),
                    _ => "left its guarded cgroup".into(),
                };
                ("left-cgroup", fails, detail)
            }
            EvidenceKind::PacketSocket | EvidenceKind::RawSocket => {
                let kind = if e.kind == EvidenceKind::PacketSocket {
                    "packet-socket"
                } else {
                    "raw-socket"
                };
                let verdict = if self.allow_raw_sockets {
                    ALLOWED
                } else {
                    fails
                };
                (kind, verdict, socket_call(e.args))
            }
            EvidenceKind::Bpf => {
                let detail = format!("bpf({})", bpf_command(e.args[0]));
                if self.is_own_binary(e.pid) {
                    ("bpf", NOTED, format!("{detail} by a nested guard run"))
                } else {
                    ("bpf", fails, detail)
                }
            }
            EvidenceKind::ResolverRefused => (
                "resolver-socket",
                NOTED,
                format!("connection to {} refused; the lookup goes to DNS", e.path),
            ),
            EvidenceKind::Handoff => (
                "handoff-socket",
                NOTED,
                format!(
                    "talked to {}: work it asks for runs outside the guard",
                    e.path
                ),
            ),
            EvidenceKind::Untracked => (
                "untracked",
                fails,
                "could not be tracked (too many tasks): its escapes would go unseen".into(),
            ),
        };
        let destination = (!e.path.is_empty()).then(|| e.path.clone());
        Some(EvidenceEntry {
            time: clock.format(e.boot_ns),
            kind: kind.into(),
            verdict: verdict.into(),
            action: match e.action {
                ACTION_KILLED => "killed",
                ACTION_REFUSED => "refused",
                _ => "recorded",
            }
            .into(),
            pid: e.pid,
            comm: e.comm.clone(),
            subject: e.subject,
            detail,
            destination,
            count: 1,
            process_chain: chain,
        })
    }

    fn is_own_binary(&self, pid: u32) -> bool {
        let Some(own) = &self.own_executable else {
            return false;
        };
        std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| same_file(&exe, own))
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => a == b,
    }
}

/// Evidence the kernel counted that did not arrive as a record (the ring
/// buffer was full): these fail the run (fail closed), except the kinds
/// that never do.
pub fn lost_failing(counted: &EvidenceCounts, received: &EvidenceCounts) -> u64 {
    [
        EvidenceKind::LeftCgroup,
        EvidenceKind::Moved,
        EvidenceKind::PacketSocket,
        EvidenceKind::RawSocket,
        EvidenceKind::Bpf,
        EvidenceKind::Untracked,
    ]
    .iter()
    .map(|k| counted[*k as usize].saturating_sub(received[*k as usize]))
    .sum()
}

/// Adds an entry, merging a noted one into an earlier one of the same kind,
/// destination and process.
pub fn add(entries: &mut Vec<EvidenceEntry>, entry: EvidenceEntry) {
    if entry.verdict == NOTED {
        if let Some(same) = entries.iter_mut().find(|e| {
            e.verdict == NOTED
                && e.kind == entry.kind
                && e.destination == entry.destination
                && e.pid == entry.pid
        }) {
            same.count += 1;
            return;
        }
    }
    entries.push(entry);
}

fn socket_call(args: [u64; 3]) -> String {
    let family = match args[0] {
        2 => "AF_INET".to_string(),
        10 => "AF_INET6".to_string(),
        17 => "AF_PACKET".to_string(),
        44 => "AF_XDP".to_string(),
        other => other.to_string(),
    };
    let kind = match args[1] & 0xf {
        1 => "SOCK_STREAM".to_string(),
        2 => "SOCK_DGRAM".to_string(),
        3 => "SOCK_RAW".to_string(),
        10 => "SOCK_PACKET".to_string(),
        other => other.to_string(),
    };
    format!("socket({family}, {kind}, {})", args[2] as i64)
}

fn bpf_command(command: u64) -> String {
    let name = match command {
        2 => "BPF_MAP_UPDATE_ELEM",
        3 => "BPF_MAP_DELETE_ELEM",
        8 => "BPF_PROG_ATTACH",
        9 => "BPF_PROG_DETACH",
        21 => "BPF_MAP_LOOKUP_AND_DELETE_ELEM",
        22 => "BPF_MAP_FREEZE",
        25 => "BPF_MAP_LOOKUP_AND_DELETE_BATCH",
        26 => "BPF_MAP_UPDATE_BATCH",
        27 => "BPF_MAP_DELETE_BATCH",
        28 => "BPF_LINK_CREATE",
        29 => "BPF_LINK_UPDATE",
        34 => "BPF_LINK_DETACH",
        other => return other.to_string(),
    };
    name.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evidence(kind: EvidenceKind, path: &str) -> Evidence {
        Evidence {
            kind,
            action: 0,
            policy_id: 0,
            pid: 10,
            tid: 10,
            comm: "sh".into(),
            subject: 10,
            guarded_cgroup: 5,
            target_cgroup: 1,
            args: [SEEN_MOVED_BY_ANOTHER, 0, 0],
            path: path.into(),
            boot_ns: 0,
        }
    }

    fn policy(enforce: bool) -> EvidencePolicy {
        EvidencePolicy {
            enforce,
            allow_raw_sockets: false,
            guarded_path: Some("/x/guard-run-1".into()),
            own_executable: None,
        }
    }

    #[test]
    fn a_move_inside_the_guarded_tree_is_no_evidence() {
        let clock = Clock::new();
        let inside = evidence(EvidenceKind::Moved, "/x/guard-run-1/nested");
        assert!(policy(true).entry(&inside, vec![], &clock).is_none());
        let outside = evidence(EvidenceKind::Moved, "/x");
        let entry = policy(true).entry(&outside, vec![], &clock).unwrap();
        assert_eq!(entry.kind, "left-cgroup");
        assert!(entry.fails(false));
        let audited = policy(false).entry(&outside, vec![], &clock).unwrap();
        assert!(!audited.fails(false) && audited.fails(true));
    }

    #[test]
    fn noted_entries_merge_and_never_fail() {
        let clock = Clock::new();
        let refused = evidence(EvidenceKind::ResolverRefused, "/var/run/nscd/socket");
        let mut entries = Vec::new();
        for _ in 0..3 {
            add(
                &mut entries,
                policy(true).entry(&refused, vec![], &clock).unwrap(),
            );
        }
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].count, 3);
        assert!(!entries[0].fails(true));
    }

    #[test]
    fn lost_records_of_failing_kinds_count() {
        let mut counted = [0u64; 16];
        let received = [0u64; 16];
        counted[EvidenceKind::ResolverRefused as usize] = 5;
        assert_eq!(lost_failing(&counted, &received), 0);
        counted[EvidenceKind::LeftCgroup as usize] = 1;
        assert_eq!(lost_failing(&counted, &received), 1);
    }
}
