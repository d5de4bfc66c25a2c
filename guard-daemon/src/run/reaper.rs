//! A watchdog process that cleans up after a `guard run` that died.
//!
//! Links that are not pinned vanish with guard's file descriptors, but the
//! run's cgroup would stay behind, and the command's processes would go on
//! running in it without a guard. So before loading anything, guard forks a
//! small reaper in its own session, connected by a pipe. When guard exits in
//! any way (even SIGKILL) the pipe closes; the reaper then kills whatever is
//! left in the run's cgroup, removes it, and exits. After a normal exit the
//! cgroup is already gone and the reaper just exits.
use std::{
    fs::File,
    io::Read as _,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use nix::{
    fcntl::OFlag,
    unistd::{fork, pipe2, setsid, ForkResult},
};

use crate::{
    error::{Error, Result},
    kernel::cgroup::remove_cgroup_tree,
};

/// Held by guard; dropping it (or dying) tells the reaper to act.
#[derive(Debug)]
pub struct Reaper {
    _lifeline: OwnedFd,
}

/// Must be called while the process has a single thread (before the async
/// runtime starts), since the child continues with ordinary Rust code.
pub fn spawn(cgroup: &Path, private_mount: Option<&Path>) -> Result<Reaper> {
    // Close-on-exec: the command must not inherit the write end, or the
    // reaper would keep waiting for as long as the command lives.
    let (read_end, write_end) =
        pipe2(OFlag::O_CLOEXEC).map_err(Error::sys("creating the reaper's pipe"))?;
    let cgroup: PathBuf = cgroup.to_owned();
    let private_mount: Option<PathBuf> = private_mount.map(Path::to_owned);
    // SAFETY: single-threaded at this point (documented precondition).
    match unsafe { fork() }.map_err(Error::sys("forking the reaper"))? {
        ForkResult::Parent { .. } => {
            drop(read_end);
            Ok(Reaper {
                _lifeline: write_end,
            })
        }
        ForkResult::Child => {
            drop(write_end);
            reaper_main(read_end, &cgroup, private_mount.as_deref());
        }
    }
}

fn reaper_main(lifeline: OwnedFd, cgroup: &Path, private_mount: Option<&Path>) -> ! {
    // Out of the terminal's process group, so Ctrl-C meant for the command
    // does not take the reaper with it; and holding no descriptor but the
    // lifeline, so it keeps no pipe of the caller open.
    let _ = setsid();
    let keep = lifeline.as_raw_fd();
    close_all_except(keep);
    let mut file = File::from(lifeline);
    let mut byte = [0u8; 1];
    // Blocks until guard has exited (EOF) or closed its end.
    while let Ok(n) = file.read(&mut byte) {
        if n == 0 {
            break;
        }
    }
    let _ = remove_cgroup_tree(cgroup);
    if let Some(mount) = private_mount {
        let _ = nix::mount::umount2(mount, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(mount);
    }
    std::process::exit(0);
}

fn close_all_except(keep: i32) {
    // SAFETY: closing descriptors we own in a freshly forked child.
    unsafe {
        if keep > 0 {
            libc::close_range(0, (keep - 1) as u32, 0);
        }
        libc::close_range((keep + 1) as u32, u32::MAX, 0);
        // Standard descriptors point at /dev/null so stray writes are harmless.
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                if fd != keep {
                    libc::dup2(null, fd);
                }
            }
            if null > 2 && null != keep {
                libc::close(null);
            }
        }
    }
}
