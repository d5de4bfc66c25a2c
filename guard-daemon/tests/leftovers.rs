//! After runs that end in every way (success, blocked lookup, failing
//! command, SIGTERM, SIGKILL of guard), no cgroup, program or link of guard
//! remains anywhere. Its own test binary: cargo runs test binaries one at a
//! time, so no other guard is running while it checks the whole host.
mod common;

use std::{fs, path::Path, process::Stdio, time::Duration};

use common::{eventually, run_cgroups_of, Sandbox};
use guard_common::{
    evidence::{ESCAPE_TRACEPOINTS, PROGRAM_UNIX_CONNECT, PROGRAM_UNIX_SENDMSG},
    maps::{
        PROGRAM_DNS_EGRESS, PROGRAM_DNS_INGRESS, PROGRAM_EXEC_ENTER, PROGRAM_EXEC_EXIT,
        PROGRAM_FORK, PROGRAM_SOCK_OPS, PROGRAM_STREAM_ANSWER, PROGRAM_STREAM_PARSE,
        PROGRAM_STREAM_SEND,
    },
};

fn guard_cgroups(root: &Path, depth: usize, found: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("guard-run-") {
                found.push(entry.path().display().to_string());
            }
            if depth > 0 {
                guard_cgroups(&entry.path(), depth - 1, found);
            }
        }
    }
}

/// Loaded programs with the name of one of guard's. The kernel keeps the
/// first 15 bytes of a program's name (`BPF_OBJ_NAME_LEN`).
fn guard_programs() -> Vec<String> {
    let mut ours = vec![
        PROGRAM_DNS_EGRESS,
        PROGRAM_DNS_INGRESS,
        PROGRAM_SOCK_OPS,
        PROGRAM_STREAM_SEND,
        PROGRAM_STREAM_PARSE,
        PROGRAM_STREAM_ANSWER,
        PROGRAM_EXEC_ENTER,
        PROGRAM_EXEC_EXIT,
        PROGRAM_FORK,
        PROGRAM_UNIX_CONNECT,
        PROGRAM_UNIX_SENDMSG,
    ];
    ours.extend(ESCAPE_TRACEPOINTS.iter().map(|(name, _, _)| *name));
    let kernel_name = |name: &str| name[..name.len().min(15)].to_owned();
    aya::programs::loaded_programs()
        .flatten()
        .filter_map(|p| p.name_as_str().map(str::to_owned))
        .filter(|name| ours.iter().any(|o| kernel_name(o) == kernel_name(name)))
        .collect()
}

#[test]
fn nothing_of_guard_remains_after_any_kind_of_exit() {
    let sandbox = Sandbox::new();
    let deny = ["run", "-q", "--deny", "frontend.internal", "--"];
    fn with<'a>(deny: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [deny, extra].concat()
    }
    assert_eq!(sandbox.run(&with(&deny, &["true"])).code, 0);
    assert_eq!(
        sandbox
            .run(&with(&deny, &["getent", "hosts", "frontend.internal"]))
            .code,
        77
    );
    assert_eq!(sandbox.run(&with(&deny, &["sh", "-c", "exit 3"])).code, 3);
    assert_eq!(sandbox.run(&with(&deny, &["/nonexistent"])).code, 127);

    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        let marker = sandbox.path(&format!("ready-{signal}"));
        let mut child = sandbox
            .guard(&with(
                &deny,
                &["sh", "-c", &format!("touch {}; sleep 30", marker.display())],
            ))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(eventually(Duration::from_secs(10), || marker.exists()));
        assert_eq!(run_cgroups_of(child.id()).len(), 1);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
        child.wait().unwrap();
    }

    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = guard_daemon::kernel::cgroup::cgroup2_mount_point(&mountinfo).unwrap();
    let mut left = Vec::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            left.clear();
            guard_cgroups(&root, 6, &mut left);
            left.is_empty()
        }),
        "cgroups left behind: {left:?}"
    );
    let mut programs = Vec::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            programs = guard_programs();
            programs.is_empty()
        }),
        "programs still loaded: {programs:?}"
    );
    // The kernel's bpf_preload iterators (maps.debug, progs.debug) appear in
    // every bpffs mount; anything else would be a pin.
    let pins: Vec<_> = fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| !p.to_string_lossy().ends_with(".debug"))
                .collect()
        })
        .unwrap_or_default();
    assert!(pins.is_empty(), "pinned objects: {pins:?}");
}
