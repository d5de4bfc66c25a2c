//! Kernel pseudo-filesystems guard needs mounted (tracefs, bpffs, cgroup2)
//! and what it reads from them.
use std::{fs, path::Path};

use crate::error::{Error, Result};

const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts a kernel pseudo-filesystem (cgroup2, tracefs) with the usual
/// nosuid, nodev, noexec.
pub fn mount_kernel_fs(fstype: &str, target: &Path) -> nix::Result<()> {
    use nix::mount::MsFlags;
    nix::mount::mount(
        Some(fstype),
        target,
        Some(fstype),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
}

/// aya finds tracepoints through tracefs; hosts without systemd may not have
/// it mounted. Mount it at its standard place (as systemd does at boot).
pub(super) fn ensure_tracefs() -> Result<()> {
    let populated = |p: &str| {
        fs::read_dir(p)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    };
    if populated(TRACEFS) || populated("/sys/kernel/debug/tracing") {
        return Ok(());
    }
    mount_kernel_fs("tracefs", Path::new(TRACEFS)).map_err(|e| {
        Error::Tracefs(format!(
            "not mounted, and mounting it on {TRACEFS} failed: {e}"
        ))
    })
}

/// The `child_pid` field moved between kernel versions; read its offset from
/// the tracepoint's format description.
pub(super) fn fork_child_pid_offset() -> Result<u32> {
    let root = if Path::new(TRACEFS).join("events").exists() {
        TRACEFS
    } else {
        "/sys/kernel/debug/tracing"
    };
    let path = format!("{root}/events/sched/sched_process_fork/format");
    let format =
        fs::read_to_string(&path).map_err(|e| Error::Tracefs(format!("reading {path}: {e}")))?;
    parse_field_offset(&format, "child_pid")
        .ok_or_else(|| Error::Tracefs(format!("{path} has no child_pid field")))
}

fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let declaration = parts.next()?.strip_prefix("field:")?;
        if declaration.split_whitespace().last()? != field {
            return None;
        }
        parts.find_map(|p| p.strip_prefix("offset:"))?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_field_offsets_of_old_and_new_fork_formats() {
        let new = "\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\
                   \tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\
                   \tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(new, "child_pid"), Some(20));
        let old = "\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\
                   \tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(old, "child_pid"), Some(44));
        assert_eq!(parse_field_offset(old, "parent_pid"), None);
    }
}
