//! cgroup v2 management: finding (or mounting) the hierarchy, creating a
//! run's cgroup, and removing it with everything still in it.
use std::{
    collections::{HashMap, HashSet},
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use super::kernelfs::mount_kernel_fs;
use crate::error::{Error, Result};

/// Prefix of every cgroup a `guard run` creates; the stale-run sweep and the
/// leftover checks rely on it.
pub const RUN_PREFIX: &str = "guard-run-";

/// Where private cgroup2 mounts go when the host has none.
const PRIVATE_MOUNT_DIR: &str = "/run/guard";

/// The cgroup v2 hierarchy as seen by this process.
#[derive(Debug)]
pub struct Hierarchy {
    pub mount: PathBuf,
    /// Set when guard mounted it itself; unmounted on drop.
    mounted_by_guard: bool,
}

impl Hierarchy {
    /// The first cgroup2 mount in `/proc/self/mountinfo`, or a private mount
    /// under `/run/guard` when there is none.
    pub fn find_or_mount(run_id: &str) -> Result<Hierarchy> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(Error::io("reading /proc/self/mountinfo"))?;
        if let Some(mount) = cgroup2_mount_point(&mountinfo) {
            return Ok(Hierarchy {
                mount,
                mounted_by_guard: false,
            });
        }
        let mount = Path::new(PRIVATE_MOUNT_DIR).join(format!("cgroup2-{run_id}"));
        fs::create_dir_all(&mount).map_err(Error::io(format!("creating {}", mount.display())))?;
        mount_kernel_fs("cgroup2", &mount).map_err(|e| {
            Error::NoCgroup2(format!(
                "none mounted, and mounting one on {} failed: {e}",
                mount.display()
            ))
        })?;
        Ok(Hierarchy {
            mount,
            mounted_by_guard: true,
        })
    }

    pub fn private_mount(&self) -> Option<&Path> {
        self.mounted_by_guard.then_some(self.mount.as_path())
    }

    /// The cgroup this process is in, as a path under the mount.
    pub fn own_cgroup(&self) -> Result<PathBuf> {
        let text = fs::read_to_string("/proc/self/cgroup")
            .map_err(Error::io("reading /proc/self/cgroup"))?;
        let relative = text
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .ok_or_else(|| Error::NoCgroup2("/proc/self/cgroup has no cgroup v2 entry".into()))?;
        Ok(self.mount.join(relative.trim_start_matches('/')))
    }
}

impl Drop for Hierarchy {
    fn drop(&mut self) {
        if self.mounted_by_guard {
            let _ = nix::mount::umount2(&self.mount, nix::mount::MntFlags::MNT_DETACH);
            let _ = fs::remove_dir(&self.mount);
        }
    }
}

/// Parses mountinfo lines: `... mount-point ... - fstype source options`.
pub fn cgroup2_mount_point(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = before.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            out.push(
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'),
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A run's own cgroup. Created empty; CMD is placed in it before it execs.
#[derive(Debug)]
pub struct RunCgroup {
    path: PathBuf,
    dir: File,
    id: u64,
}

impl RunCgroup {
    pub fn create(path: &Path) -> Result<RunCgroup> {
        fs::create_dir(path).map_err(|source| Error::Cgroup {
            action: "creating cgroup",
            path: path.to_owned(),
            source,
        })?;
        let opened = File::open(path).and_then(|dir| Ok((dir.metadata()?.ino(), dir)));
        match opened {
            Ok((id, dir)) => Ok(RunCgroup {
                path: path.to_owned(),
                dir,
                id,
            }),
            Err(source) => {
                let _ = fs::remove_dir(path);
                Err(Error::Cgroup {
                    action: "opening cgroup",
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id the kernel reports for the cgroup (its kernfs inode number).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn dir(&self) -> &File {
        &self.dir
    }

    /// `cgroup.procs`, opened for writing: a child writes "0" to it to move
    /// itself in before exec.
    pub fn procs_for_writing(&self) -> Result<File> {
        procs_for_writing(&self.path)
    }

    /// Kills whatever still runs in the cgroup and removes it.
    pub fn remove(self) -> Result<()> {
        remove_cgroup_tree(&self.path)
    }
}

/// A cgroup's directory, for clone3(CLONE_INTO_CGROUP).
pub fn open_dir(cgroup: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(cgroup)
        .map_err(|source| Error::Cgroup {
            action: "opening",
            path: cgroup.to_owned(),
            source,
        })
}

/// A cgroup's `cgroup.procs`, opened for writing.
pub fn procs_for_writing(cgroup: &Path) -> Result<File> {
    let procs = cgroup.join("cgroup.procs");
    OpenOptions::new()
        .write(true)
        .open(&procs)
        .map_err(|source| Error::Cgroup {
            action: "opening",
            path: procs,
            source,
        })
}

/// Kills every process in `path` (and below) and removes the directories.
/// Used on normal exit, by the reaper after a crash, and by the stale sweep.
pub fn remove_cgroup_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    // cgroup.kill (Linux 5.14) kills the whole subtree atomically, including
    // processes forking at that moment.
    if let Ok(mut kill) = OpenOptions::new()
        .write(true)
        .open(path.join("cgroup.kill"))
    {
        let _ = kill.write_all(b"1");
    } else {
        kill_listed_processes(path);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match remove_dirs_bottom_up(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                // Killed processes take a moment to leave the cgroup.
                thread::sleep(Duration::from_millis(5));
            }
            Err(source) => {
                return Err(Error::Cgroup {
                    action: "removing cgroup",
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

/// Kills every process in `path` (and below) and waits until none is
/// left, keeping the directories: what the processes did is counted by
/// then, and whoever owns the cgroup removes it.
pub fn kill_processes(path: &Path) -> Result<()> {
    let killed = OpenOptions::new()
        .write(true)
        .open(path.join("cgroup.kill"))
        .and_then(|mut kill| kill.write_all(b"1"));
    if killed.is_err() {
        kill_listed_processes(path);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::read_to_string(path.join("cgroup.events")) {
            Ok(events) if events.lines().any(|l| l == "populated 0") => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(Error::Cgroup {
                    action: "reading cgroup.events of",
                    path: path.to_owned(),
                    source,
                })
            }
            Ok(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            Ok(_) => {
                return Err(Error::Cgroup {
                    action: "emptying",
                    path: path.to_owned(),
                    source: io::Error::from_raw_os_error(libc::EBUSY),
                })
            }
        }
    }
}

/// The cgroups among `ids` (cgroup ids: their directories' inode numbers),
/// wherever they are below `mount`.
pub fn find_by_ids(mount: &Path, ids: &HashSet<u64>) -> HashMap<u64, PathBuf> {
    let mut found = HashMap::new();
    let mut queue = vec![mount.to_path_buf()];
    while let Some(dir) = queue.pop() {
        if found.len() == ids.len() {
            break;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if let Ok(metadata) = entry.metadata() {
                if ids.contains(&metadata.ino()) {
                    found.insert(metadata.ino(), entry.path());
                }
            }
            queue.push(entry.path());
        }
    }
    found
}

fn kill_listed_processes(path: &Path) {
    let mut text = String::new();
    if File::open(path.join("cgroup.procs"))
        .and_then(|mut f| f.read_to_string(&mut text))
        .is_ok()
    {
        for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn remove_dirs_bottom_up(path: &Path) -> io::Result<()> {
    match fs::read_dir(path) {
        Ok(entries) => {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_dirs_bottom_up(&entry.path())?;
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    match fs::remove_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The name of a run's cgroup: prefix, owning guard's pid, a nonce.
pub fn run_cgroup_name(pid: u32, nonce: u64) -> String {
    format!("{RUN_PREFIX}{pid}-{nonce:016x}")
}

/// The pid of the `guard run` that owns a run cgroup, from its name.
pub fn run_owner(path: &Path) -> Option<u32> {
    path.file_name()?
        .to_str()?
        .strip_prefix(RUN_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Removes run cgroups under `parent` whose guard process is gone (it was
/// killed before its reaper could act, or the reaper was killed too).
pub fn sweep_stale_runs(parent: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(parent) else {
        return removed;
    };
    for entry in entries.flatten() {
        let Some(pid) = run_owner(&entry.path()) else {
            continue;
        };
        if pid_alive(pid as i32) {
            continue;
        }
        if remove_cgroup_tree(&entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

fn pid_alive(pid: i32) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_directories_by_inode_at_any_depth() {
        let root = tempfile::tempdir().unwrap();
        let deep = root.path().join("a/b/guard-run-1-0");
        let shallow = root.path().join("c");
        fs::create_dir_all(&deep).unwrap();
        fs::create_dir_all(&shallow).unwrap();
        fs::write(root.path().join("a/file"), "").unwrap();
        let id = |path: &Path| fs::metadata(path).unwrap().ino();
        let wanted = HashSet::from([id(&deep), id(&shallow), u64::MAX]);
        let found = find_by_ids(root.path(), &wanted);
        assert_eq!(
            found,
            HashMap::from([(id(&deep), deep.clone()), (id(&shallow), shallow)])
        );
        assert!(find_by_ids(root.path(), &HashSet::new()).is_empty());
    }

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "25 1 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw\n\
                      27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cgroup2_mount_point(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 1 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_mount_point(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let none = "25 1 0:22 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_mount_point(none), None);
        // Optional fields before the separator vary in number.
        let spaced = "31 1 0:27 / /mnt/my\\040cg rw master:1 shared:2 - cgroup2 none rw\n";
        assert_eq!(
            cgroup2_mount_point(spaced),
            Some(PathBuf::from("/mnt/my cg"))
        );
    }

    #[test]
    fn run_names_carry_the_owner_pid() {
        let name = run_cgroup_name(4242, 0xabc);
        assert_eq!(name, "guard-run-4242-0000000000000abc");
    }
}
