//! The kernel's clean-up of a standalone run's programs, where nobody waits
//! for it.
//!
//! Detaching a perf-event tracepoint waits for an RCU grace period in the
//! process that closes the last descriptor (about 40 ms each here, and the
//! kernel serialises them: ~400 ms for guard's tracepoints). That wait is
//! nobody's business once the report is written, so a standalone run hands
//! its descriptors to a short-lived child: guard exits at once (its closes
//! only drop references), and the child, holding the last ones, pays for
//! the detaches after guard is gone. The cgroup is already removed by then,
//! so the programs guard nothing any more; they disappear moments later.
use std::os::fd::{AsRawFd as _, RawFd};

use nix::{
    fcntl::OFlag,
    unistd::{fork, pipe2, ForkResult},
};

/// Keeps `objects` (descriptors of BPF programs, links, maps) open in a
/// detached child until this process has exited, so the final close happens
/// there. Falls back to closing them here if the child cannot be made.
pub fn release_after_exit<T>(objects: T) {
    // Everything but anonymous inodes (BPF objects, perf events, epoll) is
    // closed in the child: a pipe or socket of the caller held open would
    // keep the caller waiting for guard's output to end.
    let to_close = descriptors_to_close();
    let Ok((parent_gone, lifeline)) = pipe2(OFlag::O_CLOEXEC) else {
        return drop(objects);
    };
    // SAFETY: the child only makes async-signal-safe calls (close, dup2,
    // open, setsid, read, _exit), so forking a threaded process is sound.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { .. }) => {
            // Closed when this process exits, which wakes the child.
            std::mem::forget(lifeline);
            std::mem::forget(objects);
        }
        Ok(ForkResult::Child) => {
            let wait_on = parent_gone.as_raw_fd();
            // SAFETY: async-signal-safe calls on descriptors this child owns.
            unsafe {
                libc::close(lifeline.as_raw_fd());
                for fd in to_close {
                    if fd != wait_on {
                        libc::close(fd);
                    }
                }
                libc::setsid();
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if null >= 0 {
                    for fd in 0..3 {
                        libc::dup2(null, fd);
                    }
                }
                let mut byte = 0u8;
                while libc::read(wait_on, (&raw mut byte).cast(), 1) > 0 {}
                libc::_exit(0);
            }
        }
        Err(_) => drop(objects),
    }
}

/// This process's descriptors that are not anonymous inodes.
fn descriptors_to_close() -> Vec<RawFd> {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let fd: RawFd = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            (!target.to_string_lossy().starts_with("anon_inode:")).then_some(fd)
        })
        .collect()
}
