//! The pinned generation of the programs and maps the daemon works with:
//! adopting it (or loading and pinning a new one), removing older ones once
//! the new one is in place, removing what no binding or run owns after a
//! crash, and `guard daemon --uninstall`.
//!
//! Owns the pin directory. Knows which policy ids and cgroups are live only
//! through what the caller passes in.
use std::{
    collections::HashSet,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Instant,
};

use super::{
    config::Config,
    tree::{runs_root, CgroupTree},
};
use crate::{
    error::Result,
    kernel::{
        self,
        cgroup::{self, remove_cgroup_tree, Hierarchy},
        pinned::{PinLock, PinnedMaps},
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
/// one. Returns it with its name, and the lock on the pin directory that
/// keeps a second daemon from working with the same pins.
pub(super) fn open(config: &Config) -> Result<(Pinned, String, PinLock)> {
    kernel::ensure_bpffs(&config.pin_dir)?;
    let lock = lock_pins(&config.pin_dir)?;
    let options = load_options(config);
    let generation = kernel::generation(&options);
    let t = Instant::now();
    let (kernel, adopted) = Pinned::open_or_create(&config.pin_dir, &options)?;
    if adopted {
        tracing::info!(pin_dir = %kernel.dir().display(), elapsed = ?t.elapsed(), "adopted the pinned programs and maps");
    } else {
        tracing::info!(pin_dir = %kernel.dir().display(), elapsed = ?t.elapsed(), "loaded, attached and pinned the programs");
    }
    Ok((kernel, generation, lock))
}

/// The pin directory, created if needed, locked for this process.
fn lock_pins(pin_dir: &Path) -> Result<PinLock> {
    fs::create_dir_all(pin_dir).map_err(crate::error::Error::io(format!(
        "creating {}",
        pin_dir.display()
    )))?;
    PinLock::take(pin_dir)
}

/// Removes older builds' generations. Called once ours guards everything,
/// so removing their links opens no gap for what ours guards; runs still
/// guarded by an old generation only (this build cannot carry them over),
/// wherever their cgroups are, are ended first.
pub(super) fn remove_older(kernel: &Pinned, pin_dir: &Path, tree: &CgroupTree) {
    let ours: HashSet<u64> = kernel
        .bindings()
        .map(|bound| bound.into_iter().map(|(id, _)| id).collect())
        .unwrap_or_default();
    for old in kernel.other_generations(pin_dir) {
        tracing::info!(dir = %old.display(), "removing a previous generation of pinned programs");
        for ended in end_runs(&old, &tree.hierarchy.mount, &ours) {
            tracing::warn!(cgroup = %ended.display(), "ended a run of a previous generation");
        }
        remove_pins(&old);
    }
}

/// Ends the runs a pinned generation guards, found from what it pins (not
/// from where this process would put runs): the run cgroups its bindings
/// map names, and those in the runs cgroups its links attach to (which
/// finds them even when the map cannot be read, from a build of another
/// layout). Each not in `keep` is killed and removed while the
/// generation's programs still guard it. Bound units and cgroups, and
/// anything else that is not a run cgroup, are left alone. Returns the
/// cgroups ended.
fn end_runs(generation: &Path, cgroup_mount: &Path, keep: &HashSet<u64>) -> Vec<PathBuf> {
    let bound: HashSet<u64> = PinnedMaps::for_bindings(generation)
        .and_then(|maps| maps.bindings())
        .map(|bound| bound.into_iter().map(|(id, _)| id).collect())
        .unwrap_or_default();
    let attached: HashSet<u64> = kernel::pinned::attached_cgroups_in(generation)
        .into_iter()
        .collect();
    let found = cgroup::find_by_ids(cgroup_mount, &bound.union(&attached).copied().collect());
    let mut runs: Vec<PathBuf> = Vec::new();
    for (id, path) in found {
        if bound.contains(&id) && cgroup::run_owner(&path).is_some() {
            runs.push(path.clone());
        }
        // A runs cgroup: attached, bound to nothing. (Below a bound unit, a
        // run cgroup is a standalone `guard run`'s, guarded by its own.)
        if attached.contains(&id) && !bound.contains(&id) {
            runs.extend(run_cgroups_in(&path));
        }
    }
    runs.sort();
    runs.dedup();
    let mut ended = Vec::new();
    for path in runs {
        if fs::metadata(&path).is_ok_and(|m| keep.contains(&m.ino())) {
            continue;
        }
        match remove_cgroup_tree(&path) {
            Ok(()) => ended.push(path),
            Err(e) => tracing::error!(error = %e, "ending a run"),
        }
    }
    ended
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

/// The runs cgroups a generation's programs are attached to: attached but
/// bound to no policy (the runs below them are bound one by one). Only
/// their run cgroups are ever killed.
fn attached_runs_roots(generation: &Path, cgroup_mount: &Path) -> Vec<PathBuf> {
    let bound: HashSet<u64> = PinnedMaps::for_bindings(generation)
        .and_then(|maps| maps.bindings())
        .map(|bound| bound.into_iter().map(|(id, _)| id).collect())
        .unwrap_or_default();
    let unbound: HashSet<u64> = kernel::pinned::attached_cgroups_in(generation)
        .into_iter()
        .filter(|id| !bound.contains(id))
        .collect();
    cgroup::find_by_ids(cgroup_mount, &unbound)
        .into_values()
        .collect()
}

/// The run cgroups directly below a cgroup.
fn run_cgroups_in(path: &Path) -> Vec<PathBuf> {
    fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir() && cgroup::run_owner(p).is_some())
                .collect()
        })
        .unwrap_or_default()
}

/// `guard daemon --uninstall`: ends the runs every pinned generation
/// guards, then removes everything the daemon pinned and the runs cgroup.
/// Refused while a daemon answers on the socket or holds the pins.
pub fn uninstall(config_path: &Path) -> i32 {
    let config = match Config::load_locations(config_path) {
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
    let _lock = if config.pin_dir.exists() {
        match PinLock::take(&config.pin_dir) {
            Ok(lock) => Some(lock),
            Err(e) => {
                eprintln!("guard daemon: {e}");
                return 1;
            }
        }
    } else {
        None
    };
    // Runs first: once the links are gone their commands would be
    // unguarded, so they are killed while still guarded. They are found
    // from what is pinned: a daemon started elsewhere (another cgroup,
    // another runs_cgroup) put them elsewhere.
    let hierarchy = match Hierarchy::find_or_mount("uninstall") {
        Ok(hierarchy) => hierarchy,
        Err(e) => {
            eprintln!("guard daemon: {e}; nothing removed");
            return 1;
        }
    };
    let generations: Vec<PathBuf> = fs::read_dir(&config.pin_dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    let mut runs_roots = HashSet::new();
    for generation in &generations {
        for ended in end_runs(generation, &hierarchy.mount, &HashSet::new()) {
            println!("guard daemon: ended the run in {}", ended.display());
            runs_roots.extend(ended.parent().map(Path::to_path_buf));
        }
        runs_roots.extend(attached_runs_roots(generation, &hierarchy.mount));
    }
    runs_roots.extend(runs_root(&config, &hierarchy).ok());
    // What is in a runs cgroup besides runs (a unit attached but not bound
    // after a crash, say) is not guard's to kill: only run cgroups are
    // removed, and the runs cgroup itself once empty.
    for root in runs_roots.into_iter().filter(|root| root.is_dir()) {
        for run in run_cgroups_in(&root) {
            if let Err(e) = remove_cgroup_tree(&run) {
                eprintln!("guard daemon: {e}");
                return 1;
            }
        }
        if let Err(e) = fs::remove_dir(&root) {
            eprintln!("guard daemon: note: {} stays: {e}", root.display());
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
