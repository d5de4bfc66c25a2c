//! `guard-clone3 CGROUP-DIR CMD [ARGS...]`: starts CMD with clone3 directly
//! in another cgroup (`CLONE_INTO_CGROUP`), as a process that wants to leave
//! its cgroup without writing to `cgroup.procs` would, and exits with its
//! status.
use std::{ffi::CString, os::unix::ffi::OsStrExt as _};

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

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: guard-clone3 CGROUP-DIR CMD [ARGS...]");
        std::process::exit(2);
    }
    let dir = CString::new(args[0].as_bytes()).expect("path");
    let argv: Vec<CString> = args[1..]
        .iter()
        .map(|a| CString::new(a.as_bytes()).expect("argument"))
        .collect();
    let mut pointers: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    pointers.push(std::ptr::null());
    // SAFETY: plain syscalls; the child only calls execvp and _exit.
    unsafe {
        let cgroup = libc::open(dir.as_ptr(), libc::O_DIRECTORY | libc::O_RDONLY);
        if cgroup < 0 {
            eprintln!("guard-clone3: open: {}", std::io::Error::last_os_error());
            std::process::exit(2);
        }
        let mut clone_args = CloneArgs {
            flags: CLONE_INTO_CGROUP,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: cgroup as u64,
            ..Default::default()
        };
        let pid = libc::syscall(
            libc::SYS_clone3,
            &mut clone_args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        );
        if pid < 0 {
            eprintln!("guard-clone3: clone3: {}", std::io::Error::last_os_error());
            std::process::exit(2);
        }
        if pid == 0 {
            libc::execvp(pointers[0], pointers.as_ptr());
            libc::_exit(127);
        }
        let mut status = 0;
        libc::waitpid(pid as i32, &mut status, 0);
        if libc::WIFEXITED(status) {
            std::process::exit(libc::WEXITSTATUS(status));
        }
        std::process::exit(128 + libc::WTERMSIG(status));
    }
}
