//! A `guard daemon` of the bench's own (socket, pins and cgroups of its
//! own; uninstalled when stopped).
use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::Bench;

pub struct BenchDaemon {
    child: Child,
    config: PathBuf,
    guard: PathBuf,
}

impl BenchDaemon {
    pub fn start(bench: &Bench) -> Result<BenchDaemon> {
        let dir = bench.dir.join("daemon");
        fs::create_dir_all(dir.join("policies"))?;
        let config = dir.join("daemon.yaml");
        fs::write(
            &config,
            format!(
                // Named by this process, so benches in other checkouts on
                // the same machine do not share pins or cgroups.
                "socket: {}\npin_dir: /sys/fs/bpf/guard-bench-{pid}\nruns_cgroup: /guard-bench-runs-{pid}\nbindings: []\n",
                dir.join("guard.sock").display(),
                pid = std::process::id(),
            ),
        )?;
        let guard = bench.bin.join("guard");
        let child = Command::new(&guard)
            .args(["daemon", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("daemon.log"))?)
            .spawn()
            .context("starting guard daemon")?;
        let daemon = BenchDaemon {
            child,
            config,
            guard,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !bench
            .guard_via_daemon()
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success()
        {
            if Instant::now() > deadline {
                let _ = daemon.stop();
                bail!(
                    "guard daemon did not start; see {}",
                    dir.join("daemon.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(daemon)
    }

    /// (resident, peak resident) memory of the daemon process.
    pub fn memory_kb(&self) -> Result<(u64, u64)> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Ok((field("VmRSS:"), field("VmHWM:")))
    }

    pub fn stop(mut self) -> Result<()> {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let status = Command::new(&self.guard)
            .args(["daemon", "--uninstall", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("guard daemon --uninstall failed");
        }
        Ok(())
    }
}
