//! Where things are in the cgroup tree: the hierarchy, the daemon's runs
//! cgroup, the cgroups of bound units and cgroups, and of processes.
//!
//! Owns no kernel state; reads the cgroup filesystem and `/proc`.
use std::{
    collections::{HashSet, VecDeque},
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::config::{Config, Target};
use crate::{
    error::{Error, Result},
    kernel::cgroup::{Hierarchy, RUN_PREFIX},
};

pub(super) struct CgroupTree {
    pub hierarchy: Hierarchy,
    /// The cgroup the daemon creates runs in (always attached).
    pub runs_root: PathBuf,
    pub runs_root_id: u64,
}

impl CgroupTree {
    /// Finds the hierarchy and creates the runs cgroup if needed; returns
    /// the runs cgroup opened, for attaching.
    pub fn open(config: &Config) -> Result<(CgroupTree, fs::File)> {
        let hierarchy = Hierarchy::find_or_mount("daemon")?;
        let runs_root = runs_root(config, &hierarchy)?;
        match fs::create_dir_all(&runs_root) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(Error::Cgroup {
                    action: "creating the runs cgroup",
                    path: runs_root,
                    source,
                })
            }
        }
        let runs_dir = fs::File::open(&runs_root).map_err(|source| Error::Cgroup {
            action: "opening",
            path: runs_root.clone(),
            source,
        })?;
        let runs_root_id = runs_dir
            .metadata()
            .map_err(Error::io("reading the runs cgroup"))?
            .ino();
        Ok((
            CgroupTree {
                hierarchy,
                runs_root,
                runs_root_id,
            },
            runs_dir,
        ))
    }

    /// Where a binding's target is now (path, cgroup id).
    pub fn resolve(&self, target: &Target) -> Option<(PathBuf, u64)> {
        let path = match target {
            Target::Cgroup(relative) => Some(self.hierarchy.mount.join(relative)),
            Target::Unit(unit) => find_unit_cgroup(&self.hierarchy.mount, unit, &self.runs_root),
        }?;
        let id = fs::metadata(&path).ok().filter(|m| m.is_dir())?.ino();
        Some((path, id))
    }

    /// The cgroup directory of a process.
    pub fn cgroup_of(&self, pid: u32) -> Option<PathBuf> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let relative = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        Some(self.hierarchy.mount.join(relative.trim_start_matches('/')))
    }

    /// The cgroup of a process that is already guarded, by a binding of
    /// this daemon (`bound`: ids of the cgroups bound in the kernel map) or
    /// by a standalone `guard run` around it.
    pub fn already_guarded(&self, pid: u32, bound: &HashSet<u64>) -> Option<PathBuf> {
        let cgroup = self.cgroup_of(pid)?;
        let mut probe = cgroup.clone();
        while probe.starts_with(&self.hierarchy.mount) {
            let in_run = probe
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(RUN_PREFIX));
            let is_bound = fs::metadata(&probe).is_ok_and(|m| bound.contains(&m.ino()));
            if in_run || is_bound {
                return Some(cgroup);
            }
            if !probe.pop() {
                break;
            }
        }
        None
    }
}

/// The runs cgroup of a configuration: `runs_cgroup`, else `runs` below the
/// daemon's own cgroup.
pub(super) fn runs_root(config: &Config, hierarchy: &Hierarchy) -> Result<PathBuf> {
    Ok(match &config.runs_cgroup {
        Some(path) => hierarchy.mount.join(path.strip_prefix("/").unwrap_or(path)),
        None => hierarchy.own_cgroup()?.join("runs"),
    })
}

/// A unit's cgroup: the directory named after it, anywhere in the tree
/// (systemd places units in their slice). Our runs cgroup is skipped.
fn find_unit_cgroup(mount: &Path, unit: &str, skip: &Path) -> Option<PathBuf> {
    for slice in ["system.slice", "user.slice", ""] {
        let candidate = mount.join(slice).join(unit);
        if candidate.is_dir() {
            return Some(candidate);
        }
    }
    let mut queue = VecDeque::from([(mount.to_path_buf(), 0u32)]);
    while let Some((dir, depth)) = queue.pop_front() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            if path == skip {
                continue;
            }
            if entry.file_name().to_str() == Some(unit) {
                return Some(path);
            }
            if depth < 8 {
                queue.push_back((path, depth + 1));
            }
        }
    }
    None
}
