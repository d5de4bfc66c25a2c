//! Policy ids. Every binding and every run enforces its rules under an id
//! of its own; a change of policy is a new id, never an edit in place.
//!
//! Owns: the ids in use and who they belong to, the labels of ids a
//! previous daemon left bound, and the counts of retired ids (so metrics
//! stay monotonic). Writes and removes rules and per-policy counters in the
//! kernel maps; never binds or unbinds a cgroup (that is [`super::bindings`]
//! and [`super::runs`]).
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use guard_common::{evidence::EvidenceSettings, maps::Counter};

use crate::{
    error::Result,
    kernel::{evidence::EvidenceMaps as _, KernelMaps as _, Pinned},
    policy::{Mode, RuleSet},
    report::Counters,
};

/// Who a policy id belongs to, for logs, events and metrics.
pub(super) struct PolicyInfo {
    /// "unit", "cgroup" or "run".
    pub kind: &'static str,
    /// Policy names, joined with `,`.
    pub label: String,
    /// What is guarded, for people.
    pub target: String,
    pub mode: Mode,
    /// The rules written under the id; None when they are not known (an id
    /// adopted after a restart): its records then name no rule, and its
    /// rules are found by a scan when it is retired.
    pub rules: Option<Arc<RuleSet>>,
}

/// Counters and events lost by (binding kind, policy names).
pub(super) type CountsByLabel = BTreeMap<(String, String), (Counters, u64)>;

pub(super) struct PolicyIds {
    live: HashMap<u32, PolicyInfo>,
    /// Ids a previous daemon bound to cgroups this one binds, so the records
    /// they left in the ring are logged under the right binding.
    previous: HashMap<u32, PolicyInfo>,
    retired: CountsByLabel,
    next: u32,
    empty_rules: Arc<RuleSet>,
}

impl PolicyIds {
    /// `highest_in_use`: the highest id found in the pinned maps.
    pub fn new(highest_in_use: u32) -> Result<PolicyIds> {
        Ok(PolicyIds {
            live: HashMap::new(),
            previous: HashMap::new(),
            retired: BTreeMap::new(),
            next: highest_in_use.wrapping_add(1).max(1),
            empty_rules: Arc::new(RuleSet::compile(&[], false)?),
        })
    }

    /// Rules to name events by when an id's own are unknown.
    pub fn empty_rules(&self) -> &RuleSet {
        &self.empty_rules
    }

    /// Writes an id's rules and counters (step one of every change; nothing
    /// is bound to the id yet). On failure nothing stays behind.
    pub fn install(&mut self, kernel: &mut Pinned, info: PolicyInfo) -> Result<u32> {
        let id = self.allocate();
        let rules = info.rules.clone();
        let settings = EvidenceSettings {
            enforce: u8::from(info.mode == Mode::Enforce),
            allow_raw_sockets: u8::from(rules.as_ref().is_some_and(|r| r.allow_raw_sockets())),
            _pad: [0; 6],
        };
        let installed = kernel
            .add_policy_counters(id)
            .and_then(|()| kernel.set_evidence_settings(id, settings))
            .and_then(|()| match &rules {
                Some(rules) => kernel.install_rules(id, rules.entries()),
                None => Ok(()),
            });
        if let Err(e) = installed {
            if let Some(rules) = &rules {
                let _ = kernel.remove_rules(id, rules.entries());
            }
            kernel.remove_policy_counters(id);
            kernel.forget_evidence(id);
            return Err(e);
        }
        self.live.insert(id, info);
        Ok(id)
    }

    /// Takes over an id already in the kernel maps (a run adopted after a
    /// restart).
    pub fn adopt(&mut self, id: u32, info: PolicyInfo) {
        self.live.insert(id, info);
    }

    pub fn remember_previous(&mut self, id: u32, info: PolicyInfo) {
        self.previous.insert(id, info);
    }

    /// Who an id belongs to: a live id, else one a previous daemon bound.
    pub fn get(&self, id: u32) -> Option<&PolicyInfo> {
        self.live.get(&id).or_else(|| self.previous.get(&id))
    }

    pub fn get_mut(&mut self, id: u32) -> Option<&mut PolicyInfo> {
        self.live.get_mut(&id)
    }

    /// Removes an id nothing is bound to any more, keeping its counts for
    /// the metrics.
    pub fn retire(&mut self, kernel: &mut Pinned, id: u32) {
        let info = self.live.remove(&id);
        if let (Some(info), Ok(counters)) = (&info, kernel.policy_counters(id)) {
            let entry = self
                .retired
                .entry((info.kind.to_owned(), info.label.clone()))
                .or_default();
            entry.0.add(&Counters::from_kernel(&counters));
            entry.1 += counters.values[Counter::EventsLost as usize];
        }
        match info.as_ref().and_then(|i| i.rules.as_ref()) {
            Some(rules) => {
                let _ = kernel.remove_rules(id, rules.entries());
            }
            None => {
                let _ = kernel.retain_rules(&|policy| policy != id);
            }
        }
        kernel.remove_policy_counters(id);
        kernel.forget_evidence(id);
    }

    /// Removes an id whose binding never happened (a failed start): no
    /// counts to keep.
    pub fn discard(&mut self, kernel: &mut Pinned, id: u32) {
        if let Some(rules) = self.live.remove(&id).and_then(|info| info.rules) {
            let _ = kernel.remove_rules(id, rules.entries());
        }
        kernel.remove_policy_counters(id);
        kernel.forget_evidence(id);
    }

    /// Counters of every label, live and retired, for the metrics.
    pub fn counts_by_label(&self, kernel: &Pinned) -> CountsByLabel {
        let mut by_label = self.retired.clone();
        for (id, info) in &self.live {
            if let Ok(counters) = kernel.policy_counters(*id) {
                let entry = by_label
                    .entry((info.kind.to_owned(), info.label.clone()))
                    .or_default();
                entry.0.add(&Counters::from_kernel(&counters));
                entry.1 += counters.values[Counter::EventsLost as usize];
            }
        }
        by_label
    }

    fn allocate(&mut self) -> u32 {
        loop {
            let id = self.next;
            self.next = self.next.wrapping_add(1).max(1);
            if !self.live.contains_key(&id) {
                return id;
            }
        }
    }
}
