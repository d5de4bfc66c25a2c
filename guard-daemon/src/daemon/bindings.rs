//! Configured bindings: units and cgroups guarded by policies from the
//! daemon's configuration.
//!
//! Owns: the active bindings and the cgroup each guards now. Every change
//! goes the same three steps: the new policies are installed under fresh ids
//! ([`Bindings::prepare`]), then each cgroup's binding is switched to its new
//! id with one map update ([`Bindings::switch`]), then the old ids are
//! retired. Follows units that start, stop or restart ([`Bindings::refresh`]).
use std::{
    fs,
    path::{Path, PathBuf},
};

use guard_common::maps::Binding;

use super::{
    config::BindingConfig,
    policies::{PolicyIds, PolicyInfo},
    tree::CgroupTree,
};
use crate::{
    error::{Error, Result},
    kernel::{evidence::EvidenceMaps as _, KernelMaps as _, Pinned},
    policy::Mode,
};

pub(super) struct ActiveBinding {
    pub config: BindingConfig,
    pub policy_id: u32,
    /// The cgroup guarded now (path, id); None while the unit is not running.
    pub cgroup: Option<(PathBuf, u64)>,
}

impl ActiveBinding {
    fn kernel_binding(&self) -> Binding {
        Binding {
            policy_id: self.policy_id,
            audit_only: u8::from(self.config.mode == Mode::Audit),
            record: 0,
            _pad: [0; 2],
            label_mask: self.config.rules.label_mask(),
        }
    }
}

#[derive(Default)]
pub(super) struct Bindings {
    active: Vec<ActiveBinding>,
}

impl Bindings {
    /// Step one: installs each configuration's policy under a fresh id.
    /// Nothing is bound yet; on failure nothing stays installed.
    pub fn prepare(
        configs: Vec<BindingConfig>,
        kernel: &mut Pinned,
        policies: &mut PolicyIds,
    ) -> Result<Vec<ActiveBinding>> {
        let mut prepared = Vec::new();
        for config in configs {
            let info = PolicyInfo {
                kind: config.target.kind(),
                label: config.policies.join(","),
                target: config.target.name(),
                mode: config.mode,
                rules: Some(config.rules.clone()),
            };
            match policies.install(kernel, info) {
                Ok(policy_id) => prepared.push(ActiveBinding {
                    config,
                    policy_id,
                    cgroup: None,
                }),
                Err(e) => {
                    for binding in prepared {
                        policies.retire(kernel, binding.policy_id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(prepared)
    }

    /// Steps two and three: points every bound cgroup at its new policy id,
    /// then retires the old ids and unbinds cgroups no longer configured.
    pub fn switch(
        &mut self,
        mut prepared: Vec<ActiveBinding>,
        kernel: &mut Pinned,
        policies: &mut PolicyIds,
        tree: &CgroupTree,
    ) {
        for binding in &mut prepared {
            binding.cgroup = tree.resolve(&binding.config.target);
            if let Some((path, id)) = binding.cgroup.clone() {
                if let Err(e) = guard_cgroup(kernel, &path, id, binding.kernel_binding()) {
                    tracing::error!(cgroup = %path.display(), error = %e, "cannot guard a bound cgroup");
                    binding.cgroup = None;
                }
            }
        }
        let old = std::mem::replace(&mut self.active, prepared);
        let still_bound: Vec<u64> = self.cgroup_ids().collect();
        for binding in old {
            if let Some((path, id)) = &binding.cgroup {
                if !still_bound.contains(id) {
                    tracing::info!(cgroup = %path.display(), "no longer bound");
                    let _ = kernel.unbind(*id);
                    kernel.detach_cgroup(*id);
                    kernel.untrack_cgroup(*id);
                }
            }
            policies.retire(kernel, binding.policy_id);
        }
    }

    /// Follows bound units and cgroups that started, stopped or restarted.
    pub fn refresh(&mut self, kernel: &mut Pinned, tree: &CgroupTree) {
        for binding in &mut self.active {
            let now = tree.resolve(&binding.config.target);
            let before = binding.cgroup.clone();
            if now.as_ref().map(|(_, id)| *id) == before.as_ref().map(|(_, id)| *id) {
                continue;
            }
            if let Some((path, id)) = &before {
                tracing::info!(cgroup = %path.display(), "bound cgroup is gone");
                let _ = kernel.unbind(*id);
                kernel.detach_cgroup(*id);
                kernel.untrack_cgroup(*id);
            }
            binding.cgroup = None;
            if let Some((path, id)) = now {
                match guard_cgroup(kernel, &path, id, binding.kernel_binding()) {
                    Ok(()) => {
                        tracing::info!(cgroup = %path.display(), target = %binding.config.target.name(), "guarding");
                        binding.cgroup = Some((path, id));
                    }
                    Err(e) => {
                        tracing::error!(cgroup = %path.display(), error = %e, "cannot guard a bound cgroup")
                    }
                }
            }
        }
    }

    /// The binding that guards `cgroup` (it or an ancestor), if any.
    pub fn guarding(&self, cgroup: &Path) -> Option<&ActiveBinding> {
        self.active.iter().find(|b| {
            b.cgroup
                .as_ref()
                .is_some_and(|(path, _)| cgroup.starts_with(path))
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &ActiveBinding> {
        self.active.iter()
    }

    pub fn len(&self) -> usize {
        self.active.len()
    }

    pub fn policy_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.active.iter().map(|b| b.policy_id)
    }

    /// The cgroup a binding's policy id guards now.
    pub fn cgroup_of_policy(&self, policy_id: u32) -> Option<&Path> {
        self.active
            .iter()
            .find(|b| b.policy_id == policy_id)
            .and_then(|b| b.cgroup.as_ref().map(|(path, _)| path.as_path()))
    }

    /// Ids of the cgroups guarded now.
    pub fn cgroup_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.active
            .iter()
            .filter_map(|b| b.cgroup.as_ref().map(|(_, id)| *id))
    }
}

/// Labels the policy ids a previous daemon bound to the cgroups that this
/// configuration binds (rules unknown: its records name no rule).
pub(super) fn remember_previous(
    configs: &[BindingConfig],
    bound: &[(u64, Binding)],
    tree: &CgroupTree,
    policies: &mut PolicyIds,
) {
    for config in configs {
        let Some((_, id)) = tree.resolve(&config.target) else {
            continue;
        };
        if let Some((_, binding)) = bound.iter().find(|(cgroup, _)| *cgroup == id) {
            policies.remember_previous(
                binding.policy_id,
                PolicyInfo {
                    kind: config.target.kind(),
                    label: config.policies.join(","),
                    target: config.target.name(),
                    mode: config.mode,
                    rules: None,
                },
            );
        }
    }
}

/// Attaches the program to a bound cgroup (if not yet) and binds it.
fn guard_cgroup(kernel: &mut Pinned, path: &Path, id: u64, binding: Binding) -> Result<()> {
    let dir = fs::File::open(path).map_err(|source| Error::Cgroup {
        action: "opening",
        path: path.to_owned(),
        source,
    })?;
    // Bind before attaching: the program must never see the cgroup
    // without a binding (it would fail closed and drop all its DNS).
    kernel.bind(id, binding)?;
    kernel.attach_cgroup(&dir, id)?;
    // Tasks already running in it (a unit bound while it runs) are watched
    // for escapes from now on; those it starts later are tracked as born.
    kernel.track_present_tasks(path, id)?;
    Ok(())
}
