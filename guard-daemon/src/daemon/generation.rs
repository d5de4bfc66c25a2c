//! The pinned generation of the programs and maps the daemon works with:
//! adopting it (or loading and pinning a new one), removing older ones once
//! the new one is in place, removing what no binding or run owns after a
//! crash, and `guard daemon --uninstall`.
//!
//! Owns the pin directory. Knows which policy ids and cgroups are live only
//! through what the caller passes in.
use std::{collections::HashSet, fs, path::Path, time::Instant};

use super::{config::Config, tree::runs_root};
use crate::{
    error::Result,
    kernel::{
        self,
        cgroup::{remove_cgroup_tree, Hierarchy},
        remove_pins, KernelMaps as _, LoadOptions, Pinned,
    },
};

pub(super) fn load_options(config: &Config) -> LoadOptions<'_> {
    LoadOptions {
        dns_ports: &config.dns_ports,
        rule_capacity: config.rule_capacity,
        ring_buffer_bytes: config.ring_buffer_size,
        record_capacity: 65_536,
        policy_capacity: config.max_policies,
    }
}

/// Adopts this build's pinned generation or loads, attaches and pins a new
/// one. Returns it with its name.
pub(super) fn open(config: &Config) -> Result<(Pinned, String)> {
    kernel::ensure_bpffs(&config.pin_dir)?;
    let options = load_options(config);
    let generation = kernel::generation(&options);
    let t = Instant::now();
    let (kernel, adopted) = Pinned::open_or_create(&config.pin_dir, &options)?;
    if adopted {
        tracing::info!(pin_dir = %kernel.dir().display(), elapsed = ?t.elapsed(), "adopted the pinned programs and maps");
    } else {
        tracing::info!(pin_dir = %kernel.dir().display(), elapsed = ?t.elapsed(), "loaded, attached and pinned the programs");
    }
    Ok((kernel, generation))
}

/// Removes older builds' generations. Called once ours guards everything,
/// so removing their links opens no gap.
pub(super) fn remove_older(kernel: &Pinned, pin_dir: &Path) {
    for old in kernel.other_generations(pin_dir) {
        tracing::info!(dir = %old.display(), "removing a previous generation of pinned programs");
        remove_pins(&old);
    }
}

/// Removes whatever the kernel maps hold that no binding or run owns (left
/// by a crash between steps): bindings, rules, counters and links.
/// `live`: policy ids in use; `guarded`: cgroups guarded now;
/// `always_attached`: the runs cgroup.
pub(super) fn collect_garbage(
    kernel: &mut Pinned,
    live: &HashSet<u32>,
    guarded: &HashSet<u64>,
    always_attached: u64,
) -> Result<()> {
    for (cgroup, binding) in kernel.bindings()? {
        if !live.contains(&binding.policy_id) || !guarded.contains(&cgroup) {
            kernel.unbind(cgroup)?;
        }
    }
    let removed = kernel.retain_rules(&|id| live.contains(&id))?;
    if removed > 0 {
        tracing::info!(rules = removed, "removed rules nothing was bound to");
    }
    for (id, _) in kernel.all_policy_counters()? {
        if !live.contains(&id) {
            kernel.remove_policy_counters(id);
        }
    }
    for cgroup in kernel.attached_cgroups() {
        if cgroup != always_attached && !guarded.contains(&cgroup) {
            kernel.detach_cgroup(cgroup);
        }
    }
    Ok(())
}

/// `guard daemon --uninstall`: removes everything the daemon pinned and the
/// runs cgroup. Refused while a daemon answers on the socket.
pub fn uninstall(config_path: &Path) -> i32 {
    let config = match Config::load_or_default(config_path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("guard daemon: {e}");
            return 1;
        }
    };
    if std::os::unix::net::UnixStream::connect(&config.socket).is_ok() {
        eprintln!(
            "guard daemon: a daemon is running on {}; stop it first (systemctl stop guard)",
            config.socket.display()
        );
        return 1;
    }
    // Runs first: once the links are gone their commands would be
    // unguarded, so they are killed while still guarded.
    if let Ok(hierarchy) = Hierarchy::find_or_mount("uninstall") {
        if let Ok(runs_root) = runs_root(&config, &hierarchy) {
            if let Err(e) = remove_cgroup_tree(&runs_root) {
                eprintln!("guard daemon: {e}");
                return 1;
            }
        }
    }
    remove_pins(&config.pin_dir);
    let _ = fs::remove_file(&config.socket);
    if config.pin_dir.exists() {
        eprintln!(
            "guard daemon: could not remove everything under {}",
            config.pin_dir.display()
        );
        return 1;
    }
    println!(
        "guard daemon: removed {} and the runs cgroup",
        config.pin_dir.display()
    );
    0
}
