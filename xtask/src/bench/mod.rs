//! `cargo xtask bench`: what the guard costs, side by side with no guard and
//! with a hand-built netfilter rule, in one run, on loopback only, inside a
//! private network namespace. Writes `target/bench/results.md` and
//! `results.json`. `--smoke` runs every row on tiny sizes (used by the test
//! suite to check the bench works, never how fast anything is).
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{require_root, run, setup};

struct Sizes {
    queries: u64,
    rounds: usize,
    startup_runs: usize,
    tcp_seconds: u64,
    flood_queries: u64,
    flood_rates: Vec<u64>,
    policy_sizes: Vec<usize>,
}

impl Sizes {
    fn full() -> Sizes {
        Sizes {
            queries: 200_000,
            rounds: 7,
            startup_runs: 50,
            tcp_seconds: 5,
            flood_queries: 200_000,
            flood_rates: vec![50_000, 100_000, 200_000, 400_000, 0],
            policy_sizes: vec![10, 1_000, 100_000],
        }
    }

    fn smoke() -> Sizes {
        Sizes {
            queries: 500,
            rounds: 1,
            startup_runs: 2,
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
const TCP_SINK: &str = "127.0.0.1:5001";
/// The netfilter comparison's cgroup, named by this process (see
/// `BenchDaemon::start`).
fn netfilter_cgroup() -> String {
    format!("guard-bench-netfilter-{}", std::process::id())
}

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
    let (markdown, json) = result?;
    fs::write(out_dir.join("results.md"), &markdown)?;
    fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    println!("\n{markdown}");
    println!("written to {}", out_dir.display());
    Ok(())
}

struct Bench {
    bin: PathBuf,
    dir: PathBuf,
    sizes: Sizes,
    server: Child,
    cgroup_root: PathBuf,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = fs::remove_dir(self.cgroup_root.join(netfilter_cgroup()));
    }
}

fn json(text: &str) -> Result<serde_json::Value> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no JSON in {text:?}"))?;
    Ok(serde_json::from_str(line)?)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

impl Bench {
    fn new(bin: PathBuf, dir: PathBuf, sizes: Sizes) -> Result<Bench> {
        let server = Command::new(bin.join("guard-dns-bench"))
            .args(["serve", SERVER, "3600"])
            .stdout(Stdio::null())
            .spawn()
            .context("starting the DNS server")?;
        std::thread::sleep(Duration::from_millis(300));
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
        let cgroup_root = mountinfo
            .lines()
            .find_map(|l| {
                let (before, after) = l.split_once(" - ")?;
                (after.split_whitespace().next()? == "cgroup2")
                    .then(|| before.split_whitespace().nth(4).map(PathBuf::from))
                    .flatten()
            })
            .context("no cgroup2 mount")?;
        Ok(Bench {
            bin,
            dir,
            sizes,
            server,
            cgroup_root,
        })
    }

    /// The allowed-lookup load generator's command line.
    fn load_args(&self) -> [String; 5] {
        [
            self.tool(),
            "load".into(),
            SERVER.into(),
            self.sizes.queries.to_string(),
            WINDOW.into(),
        ]
    }

    /// A bulk-TCP receiver, listening before it returns.
    fn tcp_sink(&self) -> Result<Child> {
        let sink = Command::new(self.tool())
            .args([
                "tcp-sink",
                TCP_SINK,
                &(self.sizes.tcp_seconds + 5).to_string(),
            ])
            .stdout(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(200));
        Ok(sink)
    }

    fn tcp_send_args(&self) -> [String; 4] {
        [
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

    /// `guard` as a client of the bench's own daemon.
    fn guard_via_daemon(&self) -> Command {
        let mut command = Command::new(self.bin.join("guard"));
        command.env("GUARD_SOCKET", self.dir.join("daemon/guard.sock"));
        command
    }

    fn tool(&self) -> String {
        self.bin.join("guard-dns-bench").display().to_string()
    }

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

    /// One allowed-lookup load: unguarded, guarded, or under netfilter.
    fn load(&self, how: &str, policy: &Path) -> Result<serde_json::Value> {
        let load = self.load_args();
        let (stdout, _) = match how {
            "unguarded" => self.output(Command::new(&load[0]).args(&load[1..]))?,
            "guarded" => self.output(
                self.guard()
                    .args(["run", "-q", "-p"])
                    .arg(policy)
                    .arg("--")
                    .args(&load),
            )?,
            "guarded via daemon" => self.output(
                self.guard_via_daemon()
                    .args(["run", "-q", "-p"])
                    .arg(policy)
                    .arg("--")
                    .args(&load),
            )?,
            "netfilter" => {
                let procs = self
                    .cgroup_root
                    .join(netfilter_cgroup())
                    .join("cgroup.procs");
                let script = format!("echo $$ > {} && exec \"$@\"", procs.display());
                self.output(Command::new("sh").args(["-c", &script, "sh"]).args(&load))?
            }
            _ => unreachable!(),
        };
        json(&stdout)
    }

    fn netfilter(&self, add: bool) -> Result<()> {
        let cgroup = self.cgroup_root.join(netfilter_cgroup());
        if add {
            fs::create_dir_all(&cgroup)?;
        }
        // What an operator could build by hand: match the cgroup and the
        // name's wire bytes.
        let hex = format!(
            "|{}|",
            DENIED
                .split('.')
                .map(|l| format!("{:02x}{}", l.len(), hex(l)))
                .collect::<String>()
                + "00"
        );
        run(Command::new("iptables")
            .arg(if add { "-A" } else { "-D" })
            .args([
                "OUTPUT",
                "-p",
                "udp",
                "--dport",
                "53",
                "-m",
                "cgroup",
                "--path",
                &netfilter_cgroup(),
            ])
            .args([
                "-m",
                "string",
                "--algo",
                "bm",
                "--hex-string",
                &hex,
                "-j",
                "DROP",
            ]))
    }

    /// Every row, with a `guard daemon` of the bench's own running
    /// throughout (its rows are interleaved with the others).
    fn run_all(&self) -> Result<(String, serde_json::Value)> {
        let daemon = BenchDaemon::start(self)?;
        let result = self.rows(&daemon);
        let stopped = daemon.stop();
        let rows = result?;
        stopped?;
        Ok(rows)
    }

    fn rows(&self, daemon: &BenchDaemon) -> Result<(String, serde_json::Value)> {
        let mut md = String::from("# guard benchmark\n\n");
        let mut all = serde_json::Map::new();
        let _ = writeln!(
            md,
            "Machine: {} cores, kernel {}; loopback in a private network namespace.\n",
            num_cpus(),
            kernel()
        );
        let policy = self.policy(10)?;

        // 1. Allowed lookups, rounds interleaved so drift hits every row alike.
        self.netfilter(true)?;
        let mut rows: Vec<(&str, Vec<serde_json::Value>)> = vec![
            ("unguarded", vec![]),
            ("guarded", vec![]),
            ("netfilter", vec![]),
            ("guarded via daemon", vec![]),
        ];
        for _ in 0..self.sizes.rounds {
            for (how, samples) in rows.iter_mut() {
                samples.push(self.load(how, &policy)?);
            }
        }
        self.netfilter(false)?;
        let stat = |samples: &[serde_json::Value], key: &str| {
            median(
                &mut samples
                    .iter()
                    .map(|s| s[key].as_f64().unwrap_or(0.0))
                    .collect::<Vec<_>>(),
            )
        };
        let base_qps = stat(&rows[0].1, "qps");
        let _ = writeln!(md, "## Allowed lookups\n\n{} queries per round, {WINDOW} in flight, median of {} interleaved rounds; the policy does not match.\n", self.sizes.queries, self.sizes.rounds);
        let _ = writeln!(md, "| cgroup | QPS | p50 µs | p99 µs | QPS ratio to unguarded |\n| --- | --- | --- | --- | --- |");
        let mut allowed = serde_json::Map::new();
        for (how, samples) in &rows {
            let qps = stat(samples, "qps");
            let _ = writeln!(
                md,
                "| {how} | {qps:.0} | {:.0} | {:.0} | {:.3} |",
                stat(samples, "p50_us"),
                stat(samples, "p99_us"),
                qps / base_qps
            );
            allowed.insert((*how).into(), serde_json::json!({"qps": qps, "p50_us": stat(samples, "p50_us"), "p99_us": stat(samples, "p99_us"), "ratio": qps / base_qps, "samples": samples}));
        }
        all.insert("allowed_lookups".into(), allowed.into());

        // 2. Bulk TCP.
        let mut tcp = serde_json::Map::new();
        let _ = writeln!(md, "\n## Bulk TCP over loopback\n\n{} s per run, median of {} rounds.\n\n| cgroup | Gbit/s | ratio |\n| --- | --- | --- |", self.sizes.tcp_seconds, self.sizes.rounds);
        let mut rates: Vec<(&str, Vec<f64>)> = vec![("unguarded", vec![]), ("guarded", vec![])];
        for _ in 0..self.sizes.rounds {
            for (how, samples) in rates.iter_mut() {
                samples.push(self.tcp(how, &policy)?);
            }
        }
        let base = median(&mut rates[0].1.clone());
        for (how, samples) in rates.iter_mut() {
            let rate = median(samples);
            let _ = writeln!(
                md,
                "| {how} | {:.2} | {:.3} |",
                rate * 8.0 / 1e9,
                rate / base
            );
            tcp.insert(
                (*how).into(),
                serde_json::json!({"bytes_per_second": rate, "ratio": rate / base}),
            );
        }
        all.insert("bulk_tcp".into(), tcp.into());

        // 2b. The kernel program's own cost per packet, from the kernel's
        // accounting (kernel.bpf_stats_enabled), free of the VM's noise.
        let (dns_ns, tcp_ns) = self.kernel_cost(&policy)?;
        let _ = writeln!(md, "\n## Kernel program cost per packet\n\nFrom the kernel's own accounting of `dns_egress` (`kernel.bpf_stats_enabled`, on only for these two runs).\n\n| traffic | packets | ns per packet |\n| --- | --- | --- |\n| allowed DNS queries | {} | {:.0} |\n| bulk TCP (not DNS) | {} | {:.0} |", dns_ns.0, dns_ns.1, tcp_ns.0, tcp_ns.1);
        all.insert("kernel_cost".into(), serde_json::json!({"dns_query": {"packets": dns_ns.0, "ns_per_packet": dns_ns.1}, "bulk_tcp": {"packets": tcp_ns.0, "ns_per_packet": tcp_ns.1}}));

        // 3. Blocked lookups reaching userspace.
        let _ = writeln!(md, "\n## Blocked lookups reported\n\n{} refused queries per run from one process; the kernel's counters are exact, events beyond what the ring buffer (4 MiB) holds are counted as lost.\n\n| offered rate /s | achieved /s | blocked (kernel) | events received | events lost |\n| --- | --- | --- | --- | --- |", self.sizes.flood_queries);
        let mut floods = Vec::new();
        for &rate in &self.sizes.flood_rates {
            let (stdout, stderr) = self.output(
                self.guard()
                    .args(["run", "-q", "--deny", DENIED, "--"])
                    .arg(self.tool())
                    .args([
                        "flood",
                        SERVER,
                        DENIED,
                        &self.sizes.flood_queries.to_string(),
                        &rate.to_string(),
                    ]),
            )?;
            let flood = json(&stdout)?;
            let (blocked, received, lost) = flood_counts(&stderr)?;
            // Every blocked query is either received or counted as lost.
            if received + lost != blocked {
                bail!("events received ({received}) + lost ({lost}) != blocked ({blocked}):\n{stderr}");
            }
            let label = if rate == 0 {
                "unlimited".to_string()
            } else {
                rate.to_string()
            };
            let _ = writeln!(
                md,
                "| {label} | {:.0} | {blocked} | {received} | {lost} |",
                flood["rate"].as_f64().unwrap_or(0.0)
            );
            floods.push(serde_json::json!({"offered_rate": rate, "achieved_rate": flood["rate"], "blocked": blocked, "received": received, "lost": lost}));
        }
        all.insert("blocked_events".into(), floods.into());

        // 4. Start-up.
        let plain = self.times(self.sizes.startup_runs, || Command::new("true"))?;
        let guarded = self.times(self.sizes.startup_runs, || {
            let mut c = self.guard();
            c.args(["run", "-q", "--", "true"]);
            c
        })?;
        let _ = writeln!(md, "\n## Start-up\n\nMedian wall time of {} runs.\n\n| command | ms |\n| --- | --- |\n| `true` | {plain:.1} |\n| `guard run -- true` (standalone) | {guarded:.1} |\n| difference | {:.1} |", self.sizes.startup_runs, guarded - plain);
        all.insert("startup_ms".into(), serde_json::json!({"true": plain, "guard_run_true_standalone": guarded, "overhead": guarded - plain}));

        // 5. Policy size.
        let _ = writeln!(md, "\n## Policy size\n\nHalf exact names, half `*.` patterns. Load time = `guard run -p P -- true` minus the same with no policy (median of 3); throughput as in the first table (median of {} rounds).\n\n| entries | policy load ms | allowed QPS | ratio to unguarded |\n| --- | --- | --- | --- |", self.sizes.rounds);
        let empty = self.times(3, || {
            let mut c = self.guard();
            c.args(["run", "-q", "--", "true"]);
            c
        })?;
        let mut sizes_json = Vec::new();
        for &entries in &self.sizes.policy_sizes {
            let path = self.policy(entries)?;
            let with = self.times(3, || {
                let mut c = self.guard();
                c.args(["run", "-q", "-p"]).arg(&path).args(["--", "true"]);
                c
            })?;
            let mut qps: Vec<f64> = Vec::new();
            for _ in 0..self.sizes.rounds {
                qps.push(self.load("guarded", &path)?["qps"].as_f64().unwrap_or(0.0));
            }
            let qps = median(&mut qps);
            let _ = writeln!(
                md,
                "| {entries} | {:.0} | {qps:.0} | {:.3} |",
                with - empty,
                qps / base_qps
            );
            sizes_json.push(serde_json::json!({"entries": entries, "load_ms": with - empty, "qps": qps, "ratio": qps / base_qps}));
        }
        all.insert("policy_size".into(), sizes_json.into());

        // 6. Footprint: peak resident memory of guard during an allowed load.
        let (_, stderr) = self.output(
            Command::new("/usr/bin/time")
                .args(["-f", "maxrss_kb=%M"])
                .arg(self.bin.join("guard"))
                .args(["run", "-q", "-p"])
                .arg(&policy)
                .arg("--")
                .args(self.load_args()),
        )?;
        let rss: u64 = stderr
            .lines()
            .find_map(|l| l.strip_prefix("maxrss_kb="))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let _ = writeln!(md, "\n## Footprint\n\n| process | peak RSS |\n| --- | --- |\n| guard (standalone run) | {:.1} MiB |", rss as f64 / 1024.0);
        all.insert(
            "footprint".into(),
            serde_json::json!({"guard_run_maxrss_kb": rss}),
        );

        // 7. The daemon: start-up of a run through it, and its memory (its
        // throughput is a row of the first table).
        let (daemon_md, daemon_json) = self.daemon_rows(daemon, plain, guarded)?;
        md += &daemon_md;
        all.insert("daemon".into(), daemon_json);
        Ok((md, all.into()))
    }

    fn daemon_rows(
        &self,
        daemon: &BenchDaemon,
        plain: f64,
        standalone: f64,
    ) -> Result<(String, serde_json::Value)> {
        let mut md = String::new();
        let via_daemon = self.times(self.sizes.startup_runs, || {
            let mut c = self.guard_via_daemon();
            c.args(["run", "-q", "--", "true"]);
            c
        })?;
        let (rss_kb, peak_kb) = daemon.memory_kb()?;
        let _ = writeln!(
            md,
            "\n## Daemon\n\n`guard run` through a running `guard daemon` (programs already loaded; a run creates a cgroup and writes map entries). Start-up: median wall time of {} runs. Its allowed-lookup throughput is the `guarded via daemon` row of the first table. Memory after every row of this benchmark.\n\n| row | result |\n| --- | --- |\n| `guard run -- true` via daemon | {via_daemon:.1} ms |\n| `guard run -- true` standalone (above) | {standalone:.1} ms |\n| overhead over `true`, via daemon | {:.1} ms |\n| daemon RSS / peak | {:.1} / {:.1} MiB |",
            self.sizes.startup_runs,
            via_daemon - plain,
            rss_kb as f64 / 1024.0,
            peak_kb as f64 / 1024.0
        );
        Ok((
            md,
            serde_json::json!({
                "guard_run_true_ms": via_daemon,
                "guard_run_true_standalone_ms": standalone,
                "overhead_ms": via_daemon - plain,
                "rss_kb": rss_kb,
                "peak_rss_kb": peak_kb,
            }),
        ))
    }

    /// (packets, ns per packet) of dns_egress for an allowed DNS load and for
    /// bulk TCP, read from guard's report with the kernel's BPF stats on.
    fn kernel_cost(&self, policy: &Path) -> Result<((u64, f64), (u64, f64))> {
        let switch = Path::new("/proc/sys/kernel/bpf_stats_enabled");
        let before = fs::read_to_string(switch).unwrap_or_else(|_| "0".into());
        fs::write(switch, "1").context("enabling kernel.bpf_stats_enabled")?;
        let result = (|| -> Result<_> {
            let report = self.dir.join("stats-report.json");
            let guarded_with_report = |command: &[String]| {
                self.output(
                    self.guard()
                        .args(["run", "-q", "-p"])
                        .arg(policy)
                        .arg("--report")
                        .arg(&report)
                        .arg("--")
                        .args(command),
                )
            };
            let stats = |path: &Path| -> Result<(u64, f64)> {
                let value: serde_json::Value = serde_json::from_str(&fs::read_to_string(path)?)?;
                let stats = &value["program_stats"];
                Ok((
                    stats["runs"]
                        .as_u64()
                        .context("program_stats in the report")?,
                    stats["average_ns"].as_f64().unwrap_or(0.0),
                ))
            };
            guarded_with_report(&self.load_args())?;
            let dns = stats(&report)?;
            let mut sink = self.tcp_sink()?;
            let sent = guarded_with_report(&self.tcp_send_args());
            let _ = sink.kill();
            let _ = sink.wait();
            sent?;
            Ok((dns, stats(&report)?))
        })();
        let _ = fs::write(switch, before.trim());
        result
    }

    fn tcp(&self, how: &str, policy: &Path) -> Result<f64> {
        let mut sink = self.tcp_sink()?;
        let send = self.tcp_send_args();
        let result = match how {
            "unguarded" => self.output(Command::new(&send[0]).args(&send[1..])),
            _ => self.output(
                self.guard()
                    .args(["run", "-q", "-p"])
                    .arg(policy)
                    .arg("--")
                    .args(&send),
            ),
        };
        let _ = sink.kill();
        let _ = sink.wait();
        Ok(json(&result?.0)?["bytes_per_second"]
            .as_f64()
            .unwrap_or(0.0))
    }

    /// Median wall time in milliseconds.
    fn times(&self, runs: usize, make: impl Fn() -> Command) -> Result<f64> {
        let mut samples = Vec::with_capacity(runs);
        for _ in 0..runs {
            let mut command = make();
            command.stdout(Stdio::null()).stderr(Stdio::null());
            let start = Instant::now();
            let status = command.status()?;
            samples.push(start.elapsed().as_secs_f64() * 1000.0);
            if !status.success() {
                bail!("{command:?} failed: {status}");
            }
        }
        Ok(median(&mut samples))
    }
}

/// A `guard daemon` of the bench's own (socket, pins and cgroups of its
/// own; uninstalled when stopped).
struct BenchDaemon {
    child: Child,
    config: PathBuf,
    guard: PathBuf,
}

impl BenchDaemon {
    fn start(bench: &Bench) -> Result<BenchDaemon> {
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
    fn memory_kb(&self) -> Result<(u64, u64)> {
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

    fn stop(mut self) -> Result<()> {
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

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

/// (blocked by the kernel, events received by guard, events lost) from the
/// summary's first line.
fn flood_counts(stderr: &str) -> Result<(u64, u64, u64)> {
    let line = stderr
        .lines()
        .find(|l| l.contains(" DNS queries inspected, "))
        .with_context(|| format!("no summary in {stderr}"))?;
    let number_before = |marker: &str| -> Option<u64> {
        line.split(marker)
            .next()?
            .rsplit([' ', ','])
            .next()?
            .parse()
            .ok()
    };
    let blocked = number_before(" blocked").context("blocked count")?;
    let received = number_before(" received").context("received count")?;
    let lost = number_before(" lost").context("lost count")?;
    Ok((blocked, received, lost))
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
