//! The kernel's own accounting of guard's programs: run time and run count
//! per program (BPF run-time statistics), read with `bpftool` while a
//! run's programs are attached.
use std::{
    fs,
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    os::{fd::OwnedFd, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

/// The kernel's run-time accounting of every BPF program, on for as long
/// as this lives (`BPF_ENABLE_STATS`: the kernel counts while any such
/// file descriptor is open or `kernel.bpf_stats_enabled` is 1). Unlike
/// the sysctl, it needs no putting back: it ends when the bench drops it
/// or dies however it dies, and it leaves the sysctl, which others on the
/// machine may be using, alone. (The accounting costs two clock reads per
/// program run, so it is not left on.)
pub struct BpfStats {
    _enabled: OwnedFd,
}

impl BpfStats {
    pub fn enable() -> Result<BpfStats> {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("enabling the kernel's BPF run-time statistics (BPF_ENABLE_STATS)")?;
        Ok(BpfStats { _enabled: fd })
    }
}

/// One program attached to a cgroup, with the kernel's accounting so far.
#[derive(Clone, Debug)]
pub struct ProgramStats {
    pub id: u64,
    pub name: String,
    pub attach_type: String,
    pub run_time_ns: u64,
    pub run_count: u64,
}

impl ProgramStats {
    /// A packet program: `cgroup_skb` on egress or ingress.
    pub fn sees_packets(&self) -> bool {
        self.attach_type.contains("inet_egress") || self.attach_type.contains("inet_ingress")
    }
}

/// bpftool's JSON answer; `null` when it prints nothing (as `cgroup show`
/// does for a cgroup with no program attached).
fn bpftool_json(args: &[&str]) -> Result<Value> {
    let output = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("running bpftool")?;
    if !output.status.success() {
        bail!(
            "bpftool {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    if output.stdout.trim_ascii().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&output.stdout)
        .with_context(|| format!("bpftool {}: not JSON", args.join(" ")))
}

/// Every program attached to `cgroup` itself, with its run time and count.
fn attached_programs(cgroup: &Path) -> Result<Vec<ProgramStats>> {
    let path = cgroup.to_str().context("cgroup path is not UTF-8")?;
    let attached = bpftool_json(&["cgroup", "show", path])?;
    let mut programs = Vec::new();
    for entry in attached.as_array().into_iter().flatten() {
        let id = entry["id"].as_u64().context("bpftool cgroup show: id")?;
        let info = bpftool_json(&["prog", "show", "id", &id.to_string()])?;
        programs.push(ProgramStats {
            id,
            name: entry["name"].as_str().unwrap_or_default().to_string(),
            attach_type: entry["attach_type"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            // bpftool leaves both out while a program has not run.
            run_time_ns: info["run_time_ns"].as_u64().unwrap_or(0),
            run_count: info["run_cnt"].as_u64().unwrap_or(0),
        });
    }
    Ok(programs)
}

/// The programs guarding `cgroup`: those attached to it or, failing that,
/// to its nearest ancestor below `root` that has any (a standalone run
/// attaches to its own cgroup, the daemon to the cgroup of all its runs).
pub fn guarding_programs(cgroup: &Path, root: &Path) -> Result<Vec<ProgramStats>> {
    for dir in cgroup.ancestors().take_while(|dir| *dir != root) {
        let programs = attached_programs(dir)?;
        if !programs.is_empty() {
            return Ok(programs);
        }
    }
    bail!("no program is attached to {} or above it", cgroup.display())
}

/// What each program of `after` ran since `before` (same programs, matched
/// by id).
pub fn since(before: &[ProgramStats], after: &[ProgramStats]) -> Vec<ProgramStats> {
    after
        .iter()
        .map(|program| {
            let earlier = before.iter().find(|p| p.id == program.id);
            ProgramStats {
                run_time_ns: program.run_time_ns - earlier.map_or(0, |p| p.run_time_ns),
                run_count: program.run_count - earlier.map_or(0, |p| p.run_count),
                ..program.clone()
            }
        })
        .collect()
}

/// (run time, run count) of the packet programs among `programs`.
pub fn packet_totals(programs: &[ProgramStats]) -> (u64, u64) {
    programs
        .iter()
        .filter(|p| p.sees_packets())
        .fold((0, 0), |(time, count), p| {
            (time + p.run_time_ns, count + p.run_count)
        })
}

/// A `guard run` whose command stops at two checkpoints, so the bench can
/// look at the kernel while the run's programs are attached: once before
/// the measured command runs and once after it. The command's stdout
/// comes back here.
pub struct HeldRun {
    child: Child,
    stdout: BufReader<ChildStdout>,
    fifo: PathBuf,
    /// guard's stderr, in a file so that it never blocks guard.
    log: PathBuf,
    cgroup: PathBuf,
    /// Past the first checkpoint, and the command's result once it is at
    /// the second.
    released: bool,
    result: Option<Option<Value>>,
}

/// What the held shell prints when it waits at a checkpoint.
const CHECKPOINT: &str = "guard-bench-checkpoint";

impl HeldRun {
    /// Starts `guard` (a `guard run ... --` command line without the
    /// command) on `command`; returns once the command's shell is in its
    /// cgroup, held at the first checkpoint.
    pub fn start(
        mut guard: Command,
        command: &[String],
        fifo: &Path,
        cgroup_root: &Path,
    ) -> Result<HeldRun> {
        let _ = fs::remove_file(fifo);
        make_fifo(fifo)?;
        let log = fifo.with_extension("log");
        // The shell is the run's first process: it says where it is, waits,
        // runs the command, and waits again. It says when it waits, so the
        // bench never writes to the FIFO while the previous `read` still
        // has it open (that write would be lost with the FIFO's buffer);
        // and it waits until it has read a line, since opening the FIFO
        // while the bench's last write is still open reads end-of-file.
        let wait = format!("until read _ < '{}'; do :; done", fifo.display());
        let script = format!(
            "cat /proc/self/cgroup && echo {CHECKPOINT} && {wait} && \"$@\"; status=$?; echo {CHECKPOINT}; {wait}; exit $status"
        );
        let mut child = guard
            .args(["sh", "-c", &script, "sh"])
            .args(command)
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting a held guard run")?;
        let stdout = child.stdout.take().context("the held run's stdout")?;
        let mut run = HeldRun {
            stdout: BufReader::new(stdout),
            child,
            fifo: fifo.to_owned(),
            log,
            cgroup: PathBuf::new(),
            released: false,
            result: None,
        };
        // The cgroup2 line; on a hybrid host the v1 hierarchies come first.
        let mut relative = None;
        for line in run.lines_to_checkpoint()? {
            if let Some(path) = line.strip_prefix("0::") {
                relative = Some(path.to_string());
            }
        }
        let relative = relative.context("the held run's shell did not say its cgroup")?;
        run.cgroup = cgroup_root.join(relative.trim_start_matches('/'));
        Ok(run)
    }

    /// The run's cgroup (where a standalone run attaches its programs).
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The shell's output up to its next checkpoint.
    fn lines_to_checkpoint(&mut self) -> Result<Vec<String>> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if self.stdout.read_line(&mut line)? == 0 {
                let _ = self.child.kill();
                let status = self.child.wait()?;
                bail!(
                    "the held guard run ended early ({status}): {}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            let line = line.trim_end();
            if line == CHECKPOINT {
                return Ok(lines);
            }
            lines.push(line.to_string());
        }
    }

    /// Lets the shell go on past the checkpoint it waits at.
    fn signal(&mut self) -> Result<()> {
        // Non-blocking, so a run that died does not hang the bench; the
        // shell may not have opened its end yet (ENXIO), so retry a while.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.fifo)
            {
                Ok(mut fifo) => return Ok(fifo.write_all(b"go\n")?),
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) && Instant::now() < deadline => {
                    if let Some(status) = self.child.try_wait()? {
                        bail!(
                            "the held guard run ended early ({status}): {}",
                            fs::read_to_string(&self.log).unwrap_or_default()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(e).context("releasing the held guard run"),
            }
        }
    }

    /// Lets the command run.
    pub fn release(&mut self) -> Result<()> {
        if !self.released {
            self.signal()?;
            self.released = true;
        }
        Ok(())
    }

    /// Waits for the command to end (held at the second checkpoint), and
    /// returns the last line of its output that is a JSON object (what the
    /// load tools print when they are done), if any.
    pub fn command_result(&mut self) -> Result<Option<Value>> {
        self.release()?;
        if self.result.is_none() {
            let lines = self.lines_to_checkpoint()?;
            let json = lines.iter().rev().find(|line| line.starts_with('{'));
            self.result = Some(json.map(|line| serde_json::from_str(line)).transpose()?);
        }
        Ok(self.result.clone().flatten())
    }

    /// Lets the shell past its last checkpoint and waits for guard to exit.
    pub fn finish(mut self) -> Result<()> {
        self.command_result()?;
        self.signal()?;
        let status = self.child.wait()?;
        let _ = fs::remove_file(&self.fifo);
        if !status.success() {
            bail!(
                "held guard run failed ({status}): {}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        Ok(())
    }
}

impl Drop for HeldRun {
    fn drop(&mut self) {
        // Only reached with the child still running on an error path.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn make_fifo(path: &Path) -> Result<()> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: mkfifo(3) on a NUL-terminated path we own.
    if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
        let error = std::io::Error::last_os_error();
        if error.kind() != ErrorKind::AlreadyExists {
            return Err(error).with_context(|| format!("mkfifo {}", path.display()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(id: u64, attach_type: &str, run_time_ns: u64, run_count: u64) -> ProgramStats {
        ProgramStats {
            id,
            name: format!("program_{id}"),
            attach_type: attach_type.into(),
            run_time_ns,
            run_count,
        }
    }

    #[test]
    fn packet_totals_count_what_ran_since_and_only_packet_programs() {
        let before = [
            program(1, "cgroup_inet_egress", 1_000, 10),
            program(2, "cgroup_inet_ingress", 500, 5),
            program(3, "cgroup_sock_ops", 100, 1),
        ];
        let after = [
            program(1, "cgroup_inet_egress", 91_000, 110),
            program(2, "cgroup_inet_ingress", 80_500, 105),
            program(3, "cgroup_sock_ops", 9_100, 31),
        ];
        let ran = since(&before, &after);
        assert_eq!((ran[0].run_time_ns, ran[0].run_count), (90_000, 100));
        assert_eq!(packet_totals(&ran), (170_000, 200));
    }

    #[test]
    fn a_program_absent_before_counts_from_zero() {
        let ran = since(&[], &[program(7, "cgroup_inet_egress", 300, 3)]);
        assert_eq!(packet_totals(&ran), (300, 3));
    }
}
