//! A standalone run: its own cgroup, reaper and freshly loaded programs.
use std::{
    hash::{BuildHasher, Hasher},
    path::PathBuf,
    time::Instant,
};

use std::os::fd::AsFd as _;

use aya::maps::{MapData, RingBuf};
use guard_common::{
    evidence::EvidenceSettings,
    maps::{Binding, Counter},
};

use super::{
    reaper::{self, Reaper},
    RunOptions, RECORD_CAPACITY,
};
use crate::{
    api::RunTotals,
    error::Result,
    kernel::{
        cgroup::{run_cgroup_name, sweep_stale_runs, Hierarchy, RunCgroup},
        evidence::{Attachments, EvidenceMaps as _},
        unixhooks::socket_table,
        KernelMaps as _, LoadOptions, Programs,
    },
    policy::RuleSet,
    report::{Counters, ProgramStats},
};

/// Where the run's cgroup goes, decided (and the reaper started) while the
/// process is still single-threaded.
pub(super) struct Placement {
    pub(super) hierarchy: Hierarchy,
    pub(super) path: PathBuf,
    pub(super) reaper: Reaper,
}

impl Placement {
    pub(super) fn prepare(options: &RunOptions) -> Result<Placement> {
        let nonce = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let hierarchy = Hierarchy::find_or_mount(&format!("{}-{nonce:x}", std::process::id()))?;
        let parent = match &options.cgroup_parent {
            Some(parent) => parent.clone(),
            None => hierarchy.own_cgroup()?,
        };
        for stale in sweep_stale_runs(&parent) {
            tracing::warn!(cgroup = %stale.display(), "removed the cgroup of a guard run that died");
        }
        let path = parent.join(run_cgroup_name(std::process::id(), nonce));
        let reaper = reaper::spawn(&path, hierarchy.private_mount())?;
        Ok(Placement {
            hierarchy,
            path,
            reaper,
        })
    }
}

/// A standalone run's own programs and cgroup. Dropping it detaches the
/// programs and removes the cgroup, on every path out.
pub(super) struct Enforcement {
    pub(super) programs: Programs,
    pub(super) cgroup: Option<RunCgroup>,
    /// How guard's programs were attached to the cgroup, to notice them
    /// detached or replaced.
    attachments: Attachments,
}

/// A run that loaded its own programs.
pub(super) struct Standalone {
    pub(super) enforcement: Enforcement,
    pub(super) ring: RingBuf<MapData>,
    pub(super) reaper: Reaper,
    pub(super) hierarchy: Hierarchy,
    pub(super) path: PathBuf,
}

impl Standalone {
    pub(super) fn set_up(
        options: &RunOptions,
        rules: &RuleSet,
        placement: Placement,
    ) -> Result<Standalone> {
        let Placement {
            hierarchy,
            path,
            reaper,
        } = placement;
        let (enforcement, ring) = Enforcement::set_up(options, rules, &path)?;
        if let Err(reason) = enforcement.programs.unix_hooks() {
            // Once, plainly: this is a hole on this host, not a failure.
            eprintln!("guard: note: {reason}: lookups through nscd or systemd-resolved are not refused, and not seen");
        }
        Ok(Standalone {
            enforcement,
            ring,
            reaper,
            hierarchy,
            path,
        })
    }
}

impl Enforcement {
    pub(super) fn set_up(
        options: &RunOptions,
        rules: &RuleSet,
        path: &std::path::Path,
    ) -> Result<(Enforcement, RingBuf<MapData>)> {
        let t = Instant::now();
        let cgroup = RunCgroup::create(path)?;
        tracing::debug!(elapsed = ?t.elapsed(), "cgroup created");
        let setup = || -> Result<(Programs, RingBuf<MapData>)> {
            let mut programs = Programs::load(&LoadOptions {
                dns_ports: &options.dns_ports,
                rule_capacity: rules.entries().len() as u32,
                ring_buffer_bytes: options.ring_buffer_bytes,
                record_capacity: if options.records_names() {
                    RECORD_CAPACITY
                } else {
                    0
                },
                policy_capacity: 1,
            })?;
            tracing::debug!(elapsed = ?t.elapsed(), "programs loaded");
            programs.install_rules(0, rules.entries())?;
            tracing::debug!(elapsed = ?t.elapsed(), rules = rules.entries().len(), "rules written");
            programs.bind(
                cgroup.id(),
                Binding {
                    policy_id: 0,
                    audit_only: u8::from(options.audit),
                    record: u8::from(options.records_names()),
                    _pad: [0; 2],
                    label_mask: rules.label_mask(),
                },
            )?;
            programs.set_evidence_settings(
                0,
                EvidenceSettings {
                    enforce: u8::from(super::evidence_enforced(options, rules)),
                    allow_raw_sockets: u8::from(
                        options.allow_raw_sockets || rules.allow_raw_sockets(),
                    ),
                    _pad: [0; 6],
                },
            )?;
            programs.set_unix_sockets(&socket_table(&options.resolver_sockets))?;
            programs.attach_tracepoints()?;
            tracing::debug!(elapsed = ?t.elapsed(), "tracepoints attached");
            programs.attach_cgroup(cgroup.dir())?;
            tracing::debug!(elapsed = ?t.elapsed(), "cgroup program attached");
            let events = programs.take_events()?;
            Ok((programs, events))
        };
        match setup() {
            Ok((programs, events)) => Ok((
                Enforcement {
                    attachments: Attachments::record(
                        cgroup.dir().as_fd(),
                        &programs.cgroup_programs(),
                    ),
                    programs,
                    cgroup: Some(cgroup),
                },
                events,
            )),
            Err(e) => {
                let _ = cgroup.remove();
                Err(e)
            }
        }
    }

    /// What the report needs from the kernel once the command is done.
    pub(super) fn totals(&self, record: bool) -> RunTotals {
        let read = |c| self.programs.counter(c).unwrap_or(0);
        RunTotals {
            counters: Counters::read(read),
            events_lost: read(Counter::EventsLost),
            seen: if record {
                self.programs
                    .seen_counts(0)
                    .into_iter()
                    .map(|((hash, qtype), count)| (hash, qtype, count))
                    .collect()
            } else {
                Vec::new()
            },
            program_stats: self
                .programs
                .egress_stats()
                .map(|(runs, ns)| ProgramStats::new(runs, ns)),
            evidence: self.programs.evidence_counts(0).to_vec(),
            detached: Vec::new(),
            resolver_socket_hooks: self.resolver_socket_hooks(),
        }
    }

    /// `active`, or why the Unix-socket hooks are missing.
    pub(super) fn resolver_socket_hooks(&self) -> String {
        match self.programs.unix_hooks() {
            Ok(_) => "active".into(),
            Err(reason) => format!("unavailable: {reason}"),
        }
    }

    /// Kills everything in the run's cgroup (guard's programs are gone
    /// from it: nothing may go on unguarded).
    pub(super) fn kill_processes(&self) {
        if let Some(cgroup) = &self.cgroup {
            let _ = std::fs::write(cgroup.path().join("cgroup.kill"), "1");
        }
    }

    /// guard's programs no longer attached to the run's cgroup (a detach
    /// is permanent, so this sees any that happened since the start).
    pub(super) fn detached(&self) -> Vec<String> {
        match &self.cgroup {
            Some(cgroup) => self.attachments.missing(cgroup.dir()),
            None => Vec::new(),
        }
    }

    pub(super) fn remove_cgroup(&mut self) -> Result<()> {
        match self.cgroup.take() {
            Some(cgroup) => cgroup.remove(),
            None => Ok(()),
        }
    }
}

impl Drop for Enforcement {
    fn drop(&mut self) {
        if let Err(e) = self.remove_cgroup() {
            eprintln!("guard: {e}");
        }
    }
}
