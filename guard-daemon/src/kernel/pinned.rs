//! The daemon's copy of the object, pinned under bpffs so that enforcement
//! outlives the daemon process; generations of it, and their removal.
use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Map, MapData, RingBuf},
    programs::{links::PinnedLink, CgroupSkb, CgroupSkbAttachType, Program, SockOps},
};
use guard_common::{
    evidence::{EVIDENCE_COUNTERS, EVIDENCE_SETTINGS, TRACKED, UNIX_SOCKETS},
    maps::{BINDINGS, COUNTERS, EVENTS, POLICY_COUNTERS, RULES, SEEN},
};

use super::{
    bpfsys,
    evidence::Attachments,
    hooks::{attached_ids, CgroupHook},
    kernelfs::mount_kernel_fs,
    maps::KernelMaps,
    programs::{egress_stats, generation, LoadOptions, Programs},
    unixhooks::{UnixHooks, UNIX_HOOKS},
};
use crate::error::{with_causes, Error, Result};

/// Maps the daemon keeps pinned (the scratch maps live as long as the
/// program that uses them, which is pinned too).
pub(super) const PINNED_MAPS: [&str; 10] = [
    BINDINGS,
    RULES,
    EVENTS,
    COUNTERS,
    POLICY_COUNTERS,
    SEEN,
    TRACKED,
    EVIDENCE_COUNTERS,
    EVIDENCE_SETTINGS,
    UNIX_SOCKETS,
];

/// Prefix of the pins of a cgroup's program links:
/// `link_cgroup_<cgroup id>_<hook>`.
const CGROUP_LINK_PREFIX: &str = "link_cgroup_";

/// The daemon's copy of the object, pinned in `<root>/<generation>/`. The
/// generation names the object and its load options, so a daemon adopts
/// only what it would have loaded itself; anything else is an older
/// version, replaced once the new one is in place.
pub struct Pinned {
    dir: PathBuf,
    maps: HashMap<&'static str, Map>,
    /// The cgroup programs, in [`CgroupHook::ALL`] order.
    hooks: Vec<(CgroupHook, Program)>,
    /// None when the generation was loaded on a kernel without them.
    unix: Option<UnixHooks>,
}

impl Pinned {
    /// Adopts the pinned generation that matches `options`, or loads,
    /// attaches and pins a new one. Returns whether it was adopted.
    pub fn open_or_create(root: &Path, options: &LoadOptions<'_>) -> Result<(Pinned, bool)> {
        let dir = root.join(generation(options));
        if dir.join(format!("map_{EVENTS}")).exists() {
            return Ok((Pinned::open(&dir)?, true));
        }
        fs::create_dir_all(root).map_err(Error::io(format!("creating {}", root.display())))?;
        // A daemon that died while pinning leaves a partial directory whose
        // links keep the tracepoints attached: remove it first.
        for partial in list_dirs(root).into_iter().filter(|d| is_partial(d)) {
            remove_pins(&partial);
        }
        // (bpffs refuses names with dots, so no hidden names.)
        let partial = root.join(format!(
            "{PARTIAL_PREFIX}{}-{}",
            generation(options),
            std::process::id()
        ));
        fs::create_dir(&partial).map_err(Error::io(format!("creating {}", partial.display())))?;
        let pinned = Programs::load(options).and_then(|mut programs| {
            programs.attach_tracepoints()?;
            programs.pin_into(&partial)
        });
        if let Err(e) = pinned {
            remove_pins(&partial);
            return Err(e);
        }
        // Rename is atomic: a crash leaves either the partial
        // directory or the complete generation, never half of one.
        fs::rename(&partial, &dir).map_err(Error::io(format!("renaming {}", partial.display())))?;
        Ok((Pinned::open(&dir)?, false))
    }

    pub fn open(dir: &Path) -> Result<Pinned> {
        let maps = open_maps(dir, &PINNED_MAPS)?;
        let mut hooks = Vec::new();
        for hook in CgroupHook::ALL {
            let name = hook.program();
            let path = dir.join(format!("prog_{name}"));
            let error = |e: aya::programs::ProgramError| Error::OpenPin {
                path: path.clone(),
                message: with_causes(&e),
            };
            let program = match hook {
                CgroupHook::Egress => Program::CgroupSkb(
                    CgroupSkb::from_pin(&path, CgroupSkbAttachType::Egress).map_err(error)?,
                ),
                CgroupHook::Ingress => Program::CgroupSkb(
                    CgroupSkb::from_pin(&path, CgroupSkbAttachType::Ingress).map_err(error)?,
                ),
                CgroupHook::SockOps => Program::SockOps(SockOps::from_pin(&path).map_err(error)?),
            };
            hooks.push((hook, program));
        }
        Ok(Pinned {
            dir: dir.to_owned(),
            maps,
            hooks,
            unix: UnixHooks::from_pins(dir),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Pinned generations under `root` other than this one.
    pub fn other_generations(&self, root: &Path) -> Vec<PathBuf> {
        list_dirs(root)
            .into_iter()
            .filter(|d| *d != self.dir && !is_partial(d))
            .collect()
    }

    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.maps.remove(EVENTS).ok_or(Error::Missing(EVENTS))?;
        RingBuf::try_from(map).map_err(|source| Error::Map {
            name: EVENTS,
            source,
        })
    }

    /// Where the link of a cgroup's hook (`egress`, `unix_connect`, ...) is
    /// pinned.
    fn link_path(&self, cgroup_id: u64, hook: &str) -> PathBuf {
        self.dir
            .join(format!("{CGROUP_LINK_PREFIX}{cgroup_id}_{hook}"))
    }

    /// Attaches the DNS programs and the Unix-socket hooks to a cgroup with
    /// pinned links, unless they are pinned for it already. On failure none
    /// stays attached.
    pub fn attach_cgroup(&mut self, cgroup: &fs::File, cgroup_id: u64) -> Result<()> {
        let mut made: Vec<PathBuf> = Vec::new();
        let attached = self
            .attach_dns_hooks(cgroup, cgroup_id, &mut made)
            .and_then(|()| self.attach_unix_hooks(cgroup, cgroup_id, &mut made));
        if attached.is_err() {
            for path in made {
                unpin(&path);
            }
        }
        attached
    }

    fn attach_dns_hooks(
        &mut self,
        cgroup: &fs::File,
        cgroup_id: u64,
        made: &mut Vec<PathBuf>,
    ) -> Result<()> {
        for index in 0..self.hooks.len() {
            let hook = self.hooks[index].0;
            let path = self.link_path(cgroup_id, hook.link_suffix());
            if path.exists() {
                continue;
            }
            let link = hook.attach(&mut self.hooks[index].1, cgroup)?;
            link.pin(&path)
                .map_err(|e| Error::Pin(path.display().to_string(), with_causes(&e)))?;
            made.push(path);
        }
        Ok(())
    }

    /// Links the Unix-socket hooks to a cgroup with pinned links.
    fn attach_unix_hooks(
        &self,
        cgroup: &fs::File,
        cgroup_id: u64,
        made: &mut Vec<PathBuf>,
    ) -> Result<()> {
        use std::os::fd::AsFd as _;
        let Some(unix) = &self.unix else {
            return Ok(());
        };
        for (name, _) in UNIX_HOOKS {
            let path = self.link_path(cgroup_id, name);
            if path.exists() {
                continue;
            }
            let link = unix
                .attach_one(name, cgroup.as_fd())
                .map_err(Error::io(format!("attaching {name}")))?;
            bpfsys::pin(link.as_fd(), &path)
                .map_err(|e| Error::Pin(path.display().to_string(), with_causes(&e)))?;
            made.push(path);
        }
        Ok(())
    }

    /// Whether this generation has the Unix-socket hooks.
    pub fn has_unix_hooks(&self) -> bool {
        self.unix.is_some()
    }

    /// Records how guard's programs are attached to a cgroup now, to
    /// notice later if they are detached or replaced.
    pub fn attachments(&self, cgroup: &fs::File) -> Attachments {
        use std::os::fd::AsFd as _;
        let mut programs = attached_ids(self.hooks.iter().map(|(hook, program)| (*hook, program)));
        if let Some(unix) = &self.unix {
            programs.extend(unix.ids());
        }
        Attachments::record(cgroup.as_fd(), &programs)
    }

    /// Detaches guard's programs from a cgroup (removing the pins is the
    /// detach: nothing else holds the links).
    pub fn detach_cgroup(&self, cgroup_id: u64) {
        let hooks = CgroupHook::ALL.map(CgroupHook::link_suffix);
        for hook in hooks.into_iter().chain(UNIX_HOOKS.map(|(name, _)| name)) {
            unpin(&self.link_path(cgroup_id, hook));
        }
    }

    /// Ids of the cgroups with a pinned link.
    pub fn attached_cgroups(&self) -> Vec<u64> {
        attached_cgroups_in(&self.dir)
    }

    fn egress(&self) -> Option<&CgroupSkb> {
        match &self.hooks.first()?.1 {
            Program::CgroupSkb(egress) => Some(egress),
            _ => None,
        }
    }

    pub fn egress_stats(&self) -> Option<(u64, u64)> {
        egress_stats(self.egress()?)
    }

    /// Verified instructions of the DNS egress program.
    pub fn egress_instructions(&self) -> Option<u32> {
        self.egress()?
            .info()
            .ok()
            .and_then(|i| i.verified_instruction_count())
    }
}

/// Opens pinned maps of a generation by name.
fn open_maps(dir: &Path, names: &[&'static str]) -> Result<HashMap<&'static str, Map>> {
    let mut maps = HashMap::new();
    for &name in names {
        let path = dir.join(format!("map_{name}"));
        let data = MapData::from_pin(&path).map_err(|e| Error::OpenPin {
            message: with_causes(&e),
            path,
        })?;
        let map = Map::from_map_data(data).map_err(|source| Error::Map { name, source })?;
        maps.insert(name, map);
    }
    Ok(maps)
}

/// Ids of the cgroups with a pinned link in a generation's directory.
pub fn attached_cgroups_in(dir: &Path) -> Vec<u64> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut ids: Vec<u64> = entries
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix(CGROUP_LINK_PREFIX)?
                .split('_')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Whether a generation is still pinned (`guard daemon --uninstall` or a
/// newer generation removes it).
pub fn generation_pinned(dir: &Path) -> bool {
    dir.join(format!("map_{EVENTS}")).exists()
}

/// Some of a generation's maps, opened from their pins by someone other
/// than the daemon: a `guard run` reading its own counters (the maps live
/// as long as a descriptor holds them, even once unpinned), or
/// `guard daemon --uninstall` reading the bindings.
pub struct PinnedMaps {
    maps: HashMap<&'static str, Map>,
}

impl PinnedMaps {
    /// What a run's totals are read from: its counters, evidence counts
    /// and record-mode counts.
    pub fn for_run_totals(dir: &Path) -> Result<PinnedMaps> {
        Ok(PinnedMaps {
            maps: open_maps(dir, &[POLICY_COUNTERS, EVIDENCE_COUNTERS, SEEN])?,
        })
    }

    /// The bindings map: which cgroups the generation guards, and how.
    pub fn for_bindings(dir: &Path) -> Result<PinnedMaps> {
        Ok(PinnedMaps {
            maps: open_maps(dir, &[BINDINGS])?,
        })
    }
}

impl KernelMaps for PinnedMaps {
    fn map(&self, name: &'static str) -> Result<&Map> {
        self.maps.get(name).ok_or(Error::Missing(name))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map> {
        self.maps.get_mut(name).ok_or(Error::Missing(name))
    }
}

/// An exclusive lock on the pin directory, held for as long as this lives:
/// one daemon at a time works with a set of pins (two would each garbage
/// collect what the other guards), and `--uninstall` waits for none.
pub struct PinLock {
    _lock: nix::fcntl::Flock<fs::File>,
}

impl PinLock {
    /// Takes the lock without waiting; an error names who may hold it.
    pub fn take(root: &Path) -> Result<PinLock> {
        let dir = fs::File::open(root).map_err(Error::io(format!("opening {}", root.display())))?;
        match nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(PinLock { _lock: lock }),
            Err((_, errno)) => Err(Error::sys(format!(
                "locking {} (another guard daemon works with these pins: stop it first)",
                root.display()
            ))(errno)),
        }
    }
}

fn unpin(path: &Path) {
    if let Ok(link) = PinnedLink::from_pin(path) {
        let _ = link.unpin();
    }
}

impl KernelMaps for Pinned {
    fn map(&self, name: &'static str) -> Result<&Map> {
        self.maps.get(name).ok_or(Error::Missing(name))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map> {
        self.maps.get_mut(name).ok_or(Error::Missing(name))
    }
}

/// Unpins everything under `dir` and removes it: links go (detaching their
/// programs), and maps and programs are freed once nothing else holds them.
pub fn remove_pins(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_pins(&path);
        } else {
            let _ = fs::remove_file(&path);
        }
    }
    let _ = fs::remove_dir(dir);
}

fn list_dirs(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

const PARTIAL_PREFIX: &str = "partial-";

fn is_partial(dir: &Path) -> bool {
    dir.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(PARTIAL_PREFIX))
}

/// Makes sure a bpf filesystem is mounted at `root`'s mount point.
pub fn ensure_bpffs(root: &Path) -> Result<()> {
    const BPFFS_MAGIC: i64 = 0xcafe_4a11;
    let base = Path::new("/sys/fs/bpf");
    let on_bpffs =
        |p: &Path| nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPFFS_MAGIC);
    let mut probe = root.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if on_bpffs(&probe) {
        return Ok(());
    }
    if root.starts_with(base) && !on_bpffs(base) {
        mount_kernel_fs("bpf", base)
            .map_err(|e| Error::io(format!("mounting bpffs on {}", base.display()))(e.into()))?;
        return Ok(());
    }
    Err(Error::io(format!(
        "{} is not on a bpf filesystem",
        root.display()
    ))(io::Error::from_raw_os_error(libc::EXDEV)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pin_lock_admits_one_holder_at_a_time() {
        let root = tempfile::tempdir().unwrap();
        let first = PinLock::take(root.path()).unwrap();
        let refused = PinLock::take(root.path())
            .err()
            .expect("a second lock is refused");
        assert!(
            refused.to_string().contains("another guard daemon"),
            "{refused}"
        );
        drop(first);
        PinLock::take(root.path()).expect("free again once the holder is gone");
    }
}
