//! `cargo xtask bench`: what the guard costs, side by side with no guard,
//! in one run, on loopback only, inside a private network namespace.
//!
//! Leads with the figures issue 14 sets targets for, each beside its
//! target; then the details: where a standalone run's start-up goes, the
//! kernel's own accounting of guard's programs, allowed lookups beside a
//! hand-built netfilter rule, bulk TCP, blocked lookups reaching userspace,
//! memory. Writes `target/bench/results.md`, `results.json` and SVG charts
//! beside them. `--smoke` runs every part on tiny sizes (the test suite
//! uses it to check the bench works, never how fast anything is).
mod charts;
mod daemon;
mod kernel;
mod kernel_time;
mod startup;
mod stats;
mod targets;
mod traffic;

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use self::{
    daemon::BenchDaemon,
    kernel::HeldRun,
    startup::{timed_run, wall_and_cpu_ms, wall_ms, TimedRun},
    stats::{differences, interleaved, Spread},
    targets::Figure,
};
use crate::{require_root, run, setup};

struct Sizes {
    smoke: bool,
    /// Allowed-lookup loads: queries per run, interleaved rounds.
    queries: u64,
    rounds: usize,
    /// Pairs of `true` and a standalone `guard run -- true`.
    startup_runs: usize,
    /// Pairs of `true` and `guard run -- true` through the daemon.
    daemon_runs: usize,
    /// Rounds of start-up with each policy size.
    policy_rounds: usize,
    /// Rounds of exec-heavy work with and without a run active, and the
    /// execs in each.
    exec_rounds: usize,
    execs: usize,
    /// Runs (and queries each) measured with the kernel's accounting.
    kernel_runs: usize,
    kernel_queries: u64,
    tcp_seconds: u64,
    flood_queries: u64,
    flood_rates: Vec<u64>,
    policy_sizes: Vec<usize>,
}

impl Sizes {
    fn full() -> Sizes {
        Sizes {
            smoke: false,
            queries: 50_000,
            rounds: 5,
            startup_runs: 25,
            daemon_runs: 40,
            policy_rounds: 9,
            exec_rounds: 16,
            execs: 200,
            kernel_runs: 3,
            kernel_queries: 50_000,
            tcp_seconds: 2,
            flood_queries: 100_000,
            flood_rates: vec![50_000, 100_000, 200_000, 0],
            policy_sizes: vec![10, 1_000, 100_000],
        }
    }

    fn smoke() -> Sizes {
        Sizes {
            smoke: true,
            queries: 500,
            rounds: 1,
            startup_runs: 2,
            daemon_runs: 2,
            policy_rounds: 1,
            exec_rounds: 1,
            execs: 5,
            kernel_runs: 1,
            kernel_queries: 200,
            tcp_seconds: 1,
            flood_queries: 500,
            flood_rates: vec![10_000, 0],
            policy_sizes: vec![10, 100],
        }
    }
}

const WINDOW: &str = "32";
const DENIED: &str = "frontend.internal";
const SERVER: &str = "127.0.0.1:53";
/// The same server on a port guard does not treat as DNS: its traffic is
/// the bench's non-DNS UDP.
const OTHER_UDP: &str = "127.0.0.1:5353";
const TCP_SINK: &str = "127.0.0.1:5001";
/// The policy size of the headline figures (the others are in the policy
/// size rows and chart).
const HEADLINE_POLICY: usize = 10;

pub fn bench(args: &[String]) -> Result<()> {
    require_root("bench")?;
    let smoke = args.iter().any(|a| a == "--smoke");
    let sizes = if smoke { Sizes::smoke() } else { Sizes::full() };
    setup::setup()?;
    let (root, bin) = crate::release_binaries()?;
    let out_dir = root.join(if smoke {
        "target/bench-smoke"
    } else {
        "target/bench"
    });
    fs::create_dir_all(&out_dir)?;

    // Everything below runs in a network namespace of our own: loopback only,
    // and the iptables rule and servers vanish with it.
    // SAFETY: plain unshare(2); xtask is single-threaded here.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    run(Command::new("ip").args(["link", "set", "lo", "up"]))?;
    let bench = Bench::new(bin, out_dir.clone(), sizes)?;
    let result = bench.run_all();
    drop(bench);
    let findings = result?;
    let markdown = findings.markdown();
    fs::write(out_dir.join("results.md"), &markdown)?;
    fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&findings.json())? + "\n",
    )?;
    findings.draw(&out_dir)?;
    println!("\n{markdown}");
    println!("written to {}", out_dir.display());
    Ok(())
}

/// What the bench found, section by section, and what the headline table
/// and the charts are drawn from.
#[derive(Default)]
struct Findings {
    /// Tiny sizes: the run checks the bench works, its figures mean nothing.
    smoke: bool,
    targets: Vec<targets::Row>,
    sections: String,
    json: serde_json::Map<String, Value>,
    /// Start-up wall times (ms) per command, for the chart.
    startup: Vec<(String, Vec<f64>)>,
    /// Allowed-lookup latencies (µs) per way, for the chart.
    latency: Vec<(String, Vec<f64>)>,
    /// Kernel ns per allowed query by policy size, for the chart.
    cost_by_size: Vec<(usize, Spread)>,
}

const DNS_QUERY_TARGET_NS: f64 = 250.0;

impl Findings {
    fn target(&mut self, figure: Figure, label: impl Into<String>, measured: Spread) {
        self.targets.push(targets::Row {
            figure,
            label: label.into(),
            measured,
        });
    }

    fn section(&mut self, markdown: String, key: &str, value: Value) {
        self.sections += "\n";
        self.sections += &markdown;
        self.json.insert(key.into(), value);
    }

    fn markdown(&self) -> String {
        format!(
            "# guard benchmark\n\n\
             Machine: {} cores, kernel {}; loopback in a private network namespace. \
             The machine may be shared: other work on it (builds, other tests, other \
             guards' programs) shows up as spread, so every figure is a median of \
             interleaved runs with its 10th and 90th percentiles.\n\n\
             ## Targets (issue 14)\n\n{}{}\n\
             Charts: [start-up](startup.svg), [allowed-lookup latency](dns-latency.svg), \
             [kernel time per query by policy size](cost-by-policy-size.svg).\n{}",
            num_cpus(),
            kernel(),
            if self.smoke {
                "**Smoke run** (`--smoke`): tiny sizes, to check that every part works; \
                 the figures and marks mean nothing.\n\n"
            } else {
                ""
            },
            targets::markdown(&self.targets),
            self.sections
        )
    }

    fn json(&self) -> Value {
        let mut all = self.json.clone();
        all.insert(
            "machine".into(),
            json!({"cpus": num_cpus(), "kernel": kernel()}),
        );
        all.insert("targets".into(), targets::json(&self.targets));
        all.insert("smoke".into(), self.smoke.into());
        all.into()
    }

    fn draw(&self, dir: &Path) -> Result<()> {
        charts::distribution(
            &dir.join("startup.svg"),
            "Start-up: wall time of each run",
            "ms",
            &self.startup,
        )?;
        charts::distribution(
            &dir.join("dns-latency.svg"),
            "Allowed-lookup latency, guarded and not",
            "µs",
            &self.latency,
        )?;
        charts::cost_by_policy_size(
            &dir.join("cost-by-policy-size.svg"),
            &self.cost_by_size,
            DNS_QUERY_TARGET_NS,
        )
    }
}

struct Bench {
    bin: PathBuf,
    dir: PathBuf,
    sizes: Sizes,
    servers: Vec<Child>,
    cgroup_root: PathBuf,
}

impl Drop for Bench {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

/// The last line of `text` that is a JSON object.
fn json_line(text: &str) -> Result<Value> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no JSON in {text:?}"))?;
    Ok(serde_json::from_str(line)?)
}

impl Bench {
    fn new(bin: PathBuf, dir: PathBuf, sizes: Sizes) -> Result<Bench> {
        let mut bench = Bench {
            bin,
            dir,
            sizes,
            servers: Vec::new(),
            cgroup_root: cgroup_root()?,
        };
        for address in [SERVER, OTHER_UDP] {
            let server = Command::new(bench.tool())
                .args(["serve", address, "3600"])
                .stdout(Stdio::null())
                .spawn()
                .context("starting the DNS server")?;
            bench.servers.push(server);
        }
        std::thread::sleep(Duration::from_millis(300));
        Ok(bench)
    }

    /// The allowed-lookup load generator's command line.
    fn load_args(&self, server: &str, queries: u64) -> Vec<String> {
        vec![
            self.tool(),
            "load".into(),
            server.into(),
            queries.to_string(),
            WINDOW.into(),
        ]
    }

    /// A bulk-TCP receiver, listening before it returns.
    fn tcp_sink(&self) -> Result<Child> {
        let sink = Command::new(self.tool())
            .args(["tcp-sink", TCP_SINK])
            .arg((self.sizes.tcp_seconds + 5).to_string())
            .stdout(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(200));
        Ok(sink)
    }

    fn tcp_send_args(&self) -> Vec<String> {
        vec![
            self.tool(),
            "tcp-send".into(),
            TCP_SINK.into(),
            self.sizes.tcp_seconds.to_string(),
        ]
    }

    /// `guard` for standalone rows: pointed at a socket where no daemon
    /// listens, so a daemon on the host cannot change what is measured.
    fn guard(&self) -> Command {
        let mut command = Command::new(self.bin.join("guard"));
        command.env("GUARD_SOCKET", self.dir.join("no-daemon.sock"));
        command
    }

    /// `guard run --standalone -q [-p POLICY] --`, the command to follow.
    fn standalone_run(&self, policy: Option<&Path>) -> Command {
        let mut command = self.guard();
        command.args(["run", "--standalone", "-q"]);
        if let Some(policy) = policy {
            command.arg("-p").arg(policy);
        }
        command.arg("--");
        command
    }

    /// `guard` as a client of the bench's own daemon.
    fn guard_via_daemon(&self) -> Command {
        let mut command = Command::new(self.bin.join("guard"));
        command.env("GUARD_SOCKET", self.dir.join("daemon/guard.sock"));
        command
    }

    fn tool(&self) -> String {
        self.bin.join("guard-dns-bench").display().to_string()
    }

    /// (stdout, stderr) of a command that must succeed (or exit 77).
    fn output(&self, command: &mut Command) -> Result<(String, String)> {
        let output = command
            .output()
            .with_context(|| format!("running {command:?}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if !output.status.success() && output.status.code() != Some(77) {
            bail!("{command:?} failed ({}): {stderr}", output.status);
        }
        Ok((stdout, stderr))
    }

    /// A policy of `entries` deny rules (half exact names, half `*.`
    /// patterns), none matching the load's names.
    fn policy(&self, entries: usize) -> Result<PathBuf> {
        let path = self.dir.join(format!("policy-{entries}.yaml"));
        let mut text = format!("name: bench-{entries}\nmode: enforce\ndeny:\n  - {DENIED}\n");
        for i in 0..entries.saturating_sub(1) {
            if i % 2 == 0 {
                let _ = writeln!(text, "  - name-{i}.deny.internal");
            } else {
                let _ = writeln!(text, "  - \"*.zone-{i}.deny.internal\"");
            }
        }
        fs::write(&path, text)?;
        Ok(path)
    }

    /// Every part. Those without the daemon come first: its tracepoints
    /// are global, and a standalone run is measured as a host without a
    /// daemon would see it.
    fn run_all(&self) -> Result<Findings> {
        let mut findings = Findings {
            smoke: self.sizes.smoke,
            ..Findings::default()
        };
        let policy = self.policy(HEADLINE_POLICY)?;
        self.standalone_startup(&mut findings)?;
        self.policy_startup(&mut findings)?;
        self.exec_outside(&mut findings)?;
        self.kernel_time(&mut findings)?;
        self.blocked_events(&mut findings)?;
        let daemon = BenchDaemon::start(self)?;
        let result = (|| -> Result<()> {
            self.daemon_startup(&mut findings)?;
            self.kernel_time_via_daemon(&mut findings)?;
            self.allowed_lookups(&policy, &mut findings)?;
            self.bulk_tcp(&policy, &mut findings)?;
            self.footprint(&policy, &daemon, &mut findings)
        })();
        let stopped = daemon.stop();
        result?;
        stopped?;
        Ok(findings)
    }

    /// `true` and a standalone `guard run -- true`, interleaved; the step
    /// breakdown of the guarded runs.
    fn standalone_startup(&self, findings: &mut Findings) -> Result<()> {
        let mut runs = interleaved(self.sizes.startup_runs, 2, |arm| {
            if arm == 0 {
                Ok(TimedRun {
                    wall_ms: wall_ms(&mut Command::new("true"))?,
                    steps: Vec::new(),
                })
            } else {
                timed_run(
                    self.standalone_run(None).arg("true"),
                    &self.dir.join("startup.log"),
                )
            }
        })?;
        let guarded = runs.pop().unwrap_or_default();
        let plain: Vec<f64> = runs
            .pop()
            .unwrap_or_default()
            .iter()
            .map(|run| run.wall_ms)
            .collect();
        let wall: Vec<f64> = guarded.iter().map(|run| run.wall_ms).collect();
        let overhead = Spread::of(&differences(&plain, &wall));
        let steps = startup::breakdown(&guarded);
        findings.target(
            Figure::StandaloneStartup,
            "`guard run --standalone -- true` over `true`",
            overhead,
        );
        let md = format!(
            "## Start-up, standalone\n\n{n} interleaved pairs of `true` and `guard run --standalone -q -- true` (no daemon running).\n\n\
             | command | wall ms, median (p10–p90) |\n| --- | --- |\n| `true` | {} |\n| `guard run --standalone -- true` | {} |\n| difference, per pair | {} |\n\n\
             Where a standalone run's time goes, from the timestamps of guard's debug lines (`GUARD_LOG=guard_daemon=debug`); each step ends at the line it is named by.\n\n{}",
            Spread::of(&plain).text(1),
            Spread::of(&wall).text(1),
            overhead.text(1),
            startup::breakdown_markdown(&[("guard run", &steps)]),
            n = self.sizes.startup_runs,
        );
        findings.section(
            md,
            "startup_standalone",
            json!({"true_ms": Spread::of(&plain).json(), "guard_ms": Spread::of(&wall).json(), "overhead_ms": overhead.json(), "steps": startup::breakdown_json(&steps)}),
        );
        findings.startup.push(("true".into(), plain));
        findings
            .startup
            .push(("guard run --standalone -- true".into(), wall));
        Ok(())
    }

    /// Start-up with no policy against each policy size, interleaved; the
    /// step breakdown of the largest.
    fn policy_startup(&self, findings: &mut Findings) -> Result<()> {
        let mut policies = vec![None];
        for &entries in &self.sizes.policy_sizes {
            policies.push(Some(self.policy(entries)?));
        }
        let runs = interleaved(self.sizes.policy_rounds, policies.len(), |arm| {
            timed_run(
                self.standalone_run(policies[arm].as_deref()).arg("true"),
                &self.dir.join("startup.log"),
            )
        })?;
        let wall = |arm: usize| -> Vec<f64> { runs[arm].iter().map(|run| run.wall_ms).collect() };
        let mut md = format!("## Start-up by policy size\n\nHalf exact names, half `*.` patterns; {} interleaved rounds of `guard run --standalone -q [-p POLICY] -- true`. Extra = the run with the policy minus the run without, per round.\n\n| entries | extra ms, median (p10–p90) |\n| --- | --- |\n", self.sizes.policy_rounds);
        let mut rows = Vec::new();
        let mut largest = None;
        for (arm, &entries) in self.sizes.policy_sizes.iter().enumerate() {
            let extra = Spread::of(&differences(&wall(0), &wall(arm + 1)));
            let _ = writeln!(md, "| {entries} | {} |", extra.text(1));
            rows.push(json!({"entries": entries, "extra_ms": extra.json()}));
            largest = Some((entries, extra, arm + 1));
        }
        let (entries, extra, arm) = largest.context("no policy sizes")?;
        let without = startup::breakdown(&runs[0]);
        let steps = startup::breakdown(&runs[arm]);
        let _ = write!(
            md,
            "\nSteps without a policy and with {entries} entries:\n\n{}",
            startup::breakdown_markdown(&[
                ("no policy", &without),
                (&format!("{entries} entries"), &steps)
            ])
        );
        findings.target(
            Figure::LargePolicyStartup,
            format!("{entries}-entry policy, extra start-up"),
            extra,
        );
        findings.section(
            md,
            "startup_by_policy_size",
            json!({"sizes": rows, "largest_steps": startup::breakdown_json(&steps)}),
        );
        Ok(())
    }

    /// Exec-heavy work outside any guarded cgroup, with no run and while a
    /// run is active (its tracepoints see every exec and fork on the host).
    fn exec_outside(&self, findings: &mut Findings) -> Result<()> {
        let script = format!(
            "i=0; while [ $i -lt {} ]; do /bin/true; i=$((i+1)); done",
            self.sizes.execs
        );
        let batch = || wall_and_cpu_ms(Command::new("sh").args(["-c", &script]));
        let times = interleaved(self.sizes.exec_rounds, 2, |arm| {
            if arm == 0 {
                return batch();
            }
            let run = HeldRun::start(
                self.standalone_run(None),
                &["true".to_string()],
                &self.dir.join("exec.fifo"),
                &self.cgroup_root,
            )?;
            let time = batch()?;
            run.finish()?;
            Ok(time)
        })?;
        let wall = |arm: usize| -> Vec<f64> { times[arm].iter().map(|(wall, _)| *wall).collect() };
        let cpu = |arm: usize| -> Vec<f64> { times[arm].iter().map(|(_, cpu)| *cpu).collect() };
        let ratios = |samples: &dyn Fn(usize) -> Vec<f64>| {
            Spread::of(
                &samples(0)
                    .iter()
                    .zip(samples(1))
                    .map(|(without, with)| with / without)
                    .collect::<Vec<_>>(),
            )
        };
        let (cpu_ratio, wall_ratio) = (ratios(&cpu), ratios(&wall));
        findings.target(
            Figure::ExecOutside,
            "exec-heavy work outside any guarded cgroup while a run is active (CPU time)",
            cpu_ratio,
        );
        let md = format!(
            "## Exec-heavy work outside the guard\n\n{} forks and execs of `/bin/true` from a shell outside any guarded cgroup, {} interleaved rounds: with no guard run, and while a standalone `guard run` is active (its tracepoints see every fork and exec on the host). CPU time (user + system of the shell and its children) is the figure: wall time also counts waiting for a CPU, which on a shared machine is mostly other people's work.\n\n\
             | | CPU ms, median (p10–p90) | wall ms |\n| --- | --- | --- |\n| no run | {} | {} |\n| a run active | {} | {} |\n| ratio, per round | {} | {} |\n",
            self.sizes.execs,
            self.sizes.exec_rounds,
            Spread::of(&cpu(0)).text(1),
            Spread::of(&wall(0)).text(1),
            Spread::of(&cpu(1)).text(1),
            Spread::of(&wall(1)).text(1),
            cpu_ratio.text(3),
            wall_ratio.text(3),
        );
        findings.section(
            md,
            "exec_outside",
            json!({
                "no_run": {"cpu_ms": Spread::of(&cpu(0)).json(), "wall_ms": Spread::of(&wall(0)).json()},
                "run_active": {"cpu_ms": Spread::of(&cpu(1)).json(), "wall_ms": Spread::of(&wall(1)).json()},
                "ratio": {"cpu": cpu_ratio.json(), "wall": wall_ratio.json()},
            }),
        );
        Ok(())
    }

    /// `true` against `guard run -- true` through the daemon, interleaved.
    fn daemon_startup(&self, findings: &mut Findings) -> Result<()> {
        let times = interleaved(self.sizes.daemon_runs, 2, |arm| {
            if arm == 0 {
                wall_ms(&mut Command::new("true"))
            } else {
                wall_ms(self.guard_via_daemon().args(["run", "-q", "--", "true"]))
            }
        })?;
        let overhead = Spread::of(&differences(&times[0], &times[1]));
        findings.target(
            Figure::DaemonStartup,
            "`guard run -- true` through the daemon over `true`",
            overhead,
        );
        let md = format!("## Start-up through the daemon\n\n{} interleaved pairs of `true` and `guard run -q -- true` through a running `guard daemon` (programs already loaded; a run creates a cgroup and writes map entries).\n\n| command | wall ms, median (p10–p90) |\n| --- | --- |\n| `true` | {} |\n| `guard run -- true` via daemon | {} |\n| difference, per pair | {} |\n", self.sizes.daemon_runs, Spread::of(&times[0]).text(2), Spread::of(&times[1]).text(2), overhead.text(2));
        findings.section(
            md,
            "startup_daemon",
            json!({"true_ms": Spread::of(&times[0]).json(), "guard_ms": Spread::of(&times[1]).json(), "overhead_ms": overhead.json()}),
        );
        findings
            .startup
            .push(("guard run -- true via daemon".into(), times[1].clone()));
        Ok(())
    }
}

/// Where the cgroup2 hierarchy is mounted.
fn cgroup_root() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|l| {
            let (before, after) = l.split_once(" - ")?;
            (after.split_whitespace().next()? == "cgroup2")
                .then(|| before.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .context("no cgroup2 mount")
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}
