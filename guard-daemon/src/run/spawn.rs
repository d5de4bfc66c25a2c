//! Starting the command inside the run's cgroup.
//!
//! `clone3(CLONE_INTO_CGROUP)` creates the child directly in the cgroup:
//! no instruction of it runs outside, and it avoids what moving a process
//! costs (writing `cgroup.procs` takes the cgroup's process-migration lock
//! for writing, which waits for an RCU grace period: 3-30 ms on an idle
//! host, the largest part of a run through the daemon). Where clone3 is
//! refused (a seccomp profile that hides it, as some container runtimes
//! ship), the child is forked and writes itself into `cgroup.procs` before
//! exec, as before. Either way a failure to enter the cgroup means the
//! command never starts.
//!
//! Hand-written rather than `std::process::Command`, which cannot place a
//! child in a cgroup at creation.
use std::{
    ffi::{CString, OsStr, OsString},
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::{ffi::OsStrExt as _, process::ExitStatusExt as _},
    },
    process::ExitStatus,
};

use tokio::io::{unix::AsyncFd, Interest};

/// The errno a child reports when it could not enter the cgroup: exec
/// never returns it, so it cannot be mistaken for "cannot run".
pub const PLACEMENT_FAILED: i32 = libc::ENOTRECOVERABLE;

/// The running command.
pub struct Spawned {
    pid: libc::pid_t,
    /// Readable when the command has exited.
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
}

/// Where the child goes: the cgroup's directory (for clone3) and its
/// `cgroup.procs` (for the fallback).
pub struct Target<'a> {
    pub dir: BorrowedFd<'a>,
    pub procs: BorrowedFd<'a>,
}

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Starts `program` with `args` in the cgroup. Errors are those of exec
/// (not found, permission) or [`PLACEMENT_FAILED`].
pub fn spawn(target: Target<'_>, program: &OsStr, args: &[OsString]) -> io::Result<Spawned> {
    // Everything the child needs is prepared here: after the clone it may
    // only make async-signal-safe calls.
    let c_string = |s: &OsStr| CString::new(s.as_bytes()).map_err(io::Error::other);
    let program_c = c_string(program)?;
    let args_c = std::iter::once(Ok(program_c.clone()))
        .chain(args.iter().map(|a| c_string(a)))
        .collect::<io::Result<Vec<CString>>>()?;
    let mut argv: Vec<*const libc::c_char> = args_c.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let (report_read, report_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;

    let mut pidfd: RawFd = -1;
    let mut clone_args = CloneArgs {
        flags: libc::CLONE_PIDFD as u64 | CLONE_INTO_CGROUP,
        pidfd: (&raw mut pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: target.dir.as_raw_fd() as u64,
        ..Default::default()
    };
    // SAFETY: a fork-like clone3 (no CLONE_VM): the child runs on a copy of
    // this stack and only calls async-signal-safe functions before exec.
    let mut pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &raw mut clone_args,
            std::mem::size_of::<CloneArgs>(),
        )
    } as libc::pid_t;
    let mut placed = true;
    if pid < 0 {
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::ENOSYS | libc::EPERM) => {
                tracing::debug!(%error, "clone3 refused; forking and moving the child");
                placed = false;
                // SAFETY: as above, the child only makes async-signal-safe
                // calls.
                pid = unsafe { libc::fork() };
                if pid < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            _ => return Err(error),
        }
    }
    if pid == 0 {
        // SAFETY: the child of a fork or fork-like clone3.
        unsafe {
            child(
                placed,
                target.procs.as_raw_fd(),
                report_write.as_raw_fd(),
                &argv,
            )
        }
    }
    drop(report_write);
    let pidfd = if placed {
        // SAFETY: CLONE_PIDFD stored a new descriptor that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(pidfd) }
    } else {
        // SAFETY: pidfd_open returns a new descriptor (or -1).
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, libc::PIDFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
    };
    // SAFETY: the pidfd is owned by the AsyncFd and stays open, with the
    // same description, for as long as it is registered.
    let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let mut spawned = Spawned {
        pid,
        pidfd,
        status: None,
    };
    // The child writes its errno if placement or exec failed; EOF (the
    // pipe closed by exec) means the command is running.
    let mut errno = [0u8; 4];
    let read = nix::unistd::read(&report_read, &mut errno);
    if let Ok(4) = read {
        spawned.reap_blocking();
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
    }
    Ok(spawned)
}

/// The child's side: enter the cgroup if clone3 did not, restore the
/// signal state a program expects, exec. Never returns.
unsafe fn child(placed: bool, procs: RawFd, report: RawFd, argv: &[*const libc::c_char]) -> ! {
    let fail = |errno: i32| -> ! {
        let bytes = errno.to_ne_bytes();
        unsafe {
            libc::write(report, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127)
        }
    };
    unsafe {
        if !placed && libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
            fail(PLACEMENT_FAILED);
        }
        // Rust ignores SIGPIPE; a shell pipeline in the command expects the
        // default. Blocked signals are inherited across exec: none.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execvp(argv[0], argv.as_ptr());
        fail(*libc::__errno_location())
    }
}

impl Spawned {
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// Waits for the command to exit (cancel-safe).
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        loop {
            let mut ready = self.pidfd.readable().await?;
            if let Some(status) = reap(self.pid, libc::WNOHANG)? {
                self.status = Some(status);
                return Ok(status);
            }
            ready.clear_ready();
        }
    }

    /// Sends SIGKILL (for a command that must not go on).
    pub fn start_kill(&self) -> io::Result<()> {
        // SAFETY: a signal to our own unreaped child, by pidfd.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.get_ref().as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn reap_blocking(&mut self) {
        if let Ok(Some(status)) = reap(self.pid, 0) {
            self.status = Some(status);
        }
    }
}

/// `waitpid` for our own child: None while it runs (with `WNOHANG`).
fn reap(pid: libc::pid_t, flags: i32) -> io::Result<Option<ExitStatus>> {
    let mut status = 0;
    // SAFETY: reaping our own child.
    match unsafe { libc::waitpid(pid, &mut status, flags) } {
        0 => Ok(None),
        reaped if reaped == pid => Ok(Some(ExitStatus::from_raw(status))),
        _ => Err(io::Error::last_os_error()),
    }
}
