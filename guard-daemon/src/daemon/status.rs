//! Answers about the daemon's state: `guard status` and the metrics.
//! Read-only: nothing here changes the kernel or the daemon.
use guard_common::maps::{Counter, PROGRAM_DNS_EGRESS};

use super::{metrics, Daemon};
use crate::{
    api::{BindingStatus, ProgramStatus, Status},
    kernel::KernelMaps as _,
    report::Counters,
};

impl Daemon {
    pub(super) fn status(&self) -> Status {
        let counters_of = |id: u32| {
            self.kernel
                .policy_counters(id)
                .map(|c| {
                    (
                        Counters::from_kernel(&c),
                        c.values[Counter::EventsLost as usize],
                    )
                })
                .unwrap_or_default()
        };
        let mut bindings: Vec<BindingStatus> = self
            .bindings
            .iter()
            .map(|b| {
                let (counters, events_lost) = counters_of(b.policy_id);
                BindingStatus {
                    kind: b.config.target.kind().into(),
                    target: b.config.target.name(),
                    cgroup: b.cgroup.as_ref().map(|(p, _)| p.clone()),
                    policies: b.config.policies.clone(),
                    mode: b.config.mode,
                    policy_id: b.policy_id,
                    counters,
                    events_lost,
                }
            })
            .collect();
        for (id, run) in self.runs.sorted() {
            let (counters, events_lost) = counters_of(id);
            let info = self.policies.get(id);
            bindings.push(BindingStatus {
                kind: "run".into(),
                target: info.map(|i| i.target.clone()).unwrap_or_default(),
                cgroup: Some(run.cgroup().to_owned()),
                policies: info
                    .map(|i| i.label.split(',').map(str::to_owned).collect())
                    .unwrap_or_default(),
                mode: info.map(|i| i.mode).unwrap_or_default(),
                policy_id: id,
                counters,
                events_lost,
            });
        }
        let global = |c| self.kernel.counter(c).unwrap_or(0);
        let mut programs = vec![ProgramStatus {
            name: PROGRAM_DNS_EGRESS.into(),
            attached_to: format!("{} cgroup(s)", self.kernel.attached_cgroups().len()),
            verified_instructions: self.kernel.egress_instructions(),
        }];
        for (name, category, event) in crate::kernel::programs::tracepoints() {
            programs.push(ProgramStatus {
                name: name.into(),
                attached_to: format!("tracepoint {category}/{event}"),
                verified_instructions: None,
            });
        }
        for (name, _) in crate::kernel::unixhooks::UNIX_HOOKS {
            programs.push(ProgramStatus {
                name: name.into(),
                attached_to: if self.kernel.has_unix_hooks() {
                    format!("{} cgroup(s)", self.kernel.attached_cgroups().len())
                } else {
                    "unavailable: this kernel has no Unix-socket hooks (Linux 6.7+)".into()
                },
                verified_instructions: None,
            });
        }
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            object: crate::kernel::object_fingerprint(),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs(),
            generation: self.generation.clone(),
            pin_dir: self.kernel.dir().to_owned(),
            config: self.config.path.clone(),
            runs_cgroup: self.tree.runs_root.clone(),
            programs,
            bindings,
            totals: Counters::read(global),
            events_lost: global(Counter::EventsLost),
            rules_loaded: self.kernel.rule_count().unwrap_or(0),
            skipped_policy_files: self.config.skipped_policy_files.clone(),
        }
    }

    pub(super) fn metrics(&self) -> String {
        let global = |c| self.kernel.counter(c).unwrap_or(0);
        metrics::render(&metrics::Snapshot {
            by_policy: self.policies.counts_by_label(&self.kernel),
            unbound: global(Counter::Unbound),
            events_lost: global(Counter::EventsLost),
            runs: self.runs.len(),
            bindings: self.bindings.cgroup_ids().count(),
            rules: self.kernel.rule_count().unwrap_or(0),
        })
    }
}
