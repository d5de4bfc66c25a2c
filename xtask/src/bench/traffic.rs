//! Traffic through a guarded cgroup: allowed lookups (throughput and the
//! latency of each query) beside no guard and a hand-built netfilter rule,
//! bulk TCP, blocked lookups reaching userspace, and guard's memory.
use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use super::{
    daemon::BenchDaemon,
    json_line,
    stats::{interleaved, percentile, Spread},
    Bench, Findings, DENIED, SERVER, WINDOW,
};
use crate::run;

/// The ways an allowed-lookup load is run, side by side.
const WAYS: [&str; 4] = ["unguarded", "guarded", "netfilter", "guarded via daemon"];

/// The netfilter comparison's cgroup, named by this process.
fn netfilter_cgroup() -> String {
    format!("guard-bench-netfilter-{}", std::process::id())
}

impl Bench {
    /// One allowed-lookup load of `queries` queries: unguarded, guarded, or
    /// under netfilter.
    fn load(&self, how: &str, policy: &Path) -> Result<Value> {
        let load = self.load_args(SERVER, self.sizes.queries);
        let (stdout, _) = match how {
            "unguarded" => self.output(Command::new(&load[0]).args(&load[1..]))?,
            "guarded" => self.output(
                self.guard()
                    .args(["run", "--standalone", "-q", "-p"])
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
            _ => unreachable!("no such way: {how}"),
        };
        json_line(&stdout)
    }

    fn netfilter(&self, add: bool) -> Result<()> {
        let cgroup = self.cgroup_root.join(netfilter_cgroup());
        if add {
            std::fs::create_dir_all(&cgroup)?;
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
        let result = run(Command::new("iptables")
            .arg(if add { "-A" } else { "-D" })
            .args(["OUTPUT", "-p", "udp", "--dport", "53", "-m", "cgroup"])
            .args(["--path", &netfilter_cgroup()])
            .args(["-m", "string", "--algo", "bm", "--hex-string", &hex])
            .args(["-j", "DROP"]));
        if !add {
            let _ = std::fs::remove_dir(&cgroup);
        }
        result
    }

    /// Allowed lookups four ways, rounds interleaved so drift hits every
    /// way alike: throughput, and every query's latency (pooled over the
    /// rounds for the distribution chart).
    pub(super) fn allowed_lookups(&self, policy: &Path, findings: &mut Findings) -> Result<()> {
        self.netfilter(true)?;
        let samples = interleaved(self.sizes.rounds, WAYS.len(), |way| {
            self.load(WAYS[way], policy)
        });
        self.netfilter(false)?;
        let samples = samples?;
        let field = |runs: &[Value], key: &str| -> Vec<f64> {
            runs.iter()
                .map(|s| s[key].as_f64().unwrap_or(0.0))
                .collect()
        };
        let base_qps = Spread::of(&field(&samples[0], "qps")).median;
        let mut md = format!("## Allowed lookups\n\n{} queries per run, {WINDOW} in flight, {} interleaved rounds; the policy does not match. Latency p50: every query's, pooled over the rounds; p99: median of the runs' p99.\n\n| cgroup | QPS, median (p10–p90) | latency p50 µs | p99 µs | QPS ratio to unguarded |\n| --- | --- | --- | --- | --- |\n", self.sizes.queries, self.sizes.rounds);
        let mut all = serde_json::Map::new();
        for (way, runs) in WAYS.iter().zip(&samples) {
            let qps = Spread::of(&field(runs, "qps"));
            // Each run gives its latency percentiles 0..=100: pooled, they
            // are the distribution of every query of every round.
            let mut latencies: Vec<f64> = runs
                .iter()
                .flat_map(|run| run["percentiles_us"].as_array().into_iter().flatten())
                .filter_map(Value::as_f64)
                .collect();
            if latencies.is_empty() {
                bail!("the load tool gave no latency percentiles");
            }
            latencies.sort_by(f64::total_cmp);
            let p50 = percentile(&latencies, 0.5);
            // The tail from each run's exact p99 (the pooled percentiles are
            // whole percents apart).
            let p99 = Spread::of(&field(runs, "p99_us")).median;
            let _ = writeln!(
                md,
                "| {way} | {} | {p50:.0} | {p99:.0} | {:.3} |",
                qps.text(0),
                qps.median / base_qps
            );
            all.insert(
                (*way).into(),
                json!({"qps": qps.json(), "latency_p50_us": p50, "latency_p99_us": p99, "ratio": qps.median / base_qps, "runs": runs}),
            );
            findings.latency.push(((*way).to_string(), latencies));
        }
        findings.section(md, "allowed_lookups", all.into());
        Ok(())
    }

    fn tcp_rate(&self, guarded: bool, policy: &Path) -> Result<f64> {
        let mut sink = self.tcp_sink()?;
        let send = self.tcp_send_args();
        let result = if guarded {
            self.output(
                self.guard()
                    .args(["run", "--standalone", "-q", "-p"])
                    .arg(policy)
                    .arg("--")
                    .args(&send),
            )
        } else {
            self.output(Command::new(&send[0]).args(&send[1..]))
        };
        let _ = sink.kill();
        let _ = sink.wait();
        Ok(json_line(&result?.0)?["bytes_per_second"]
            .as_f64()
            .unwrap_or(0.0))
    }

    pub(super) fn bulk_tcp(&self, policy: &Path, findings: &mut Findings) -> Result<()> {
        let rates = interleaved(self.sizes.rounds, 2, |arm| self.tcp_rate(arm == 1, policy))?;
        let base = Spread::of(&rates[0]).median;
        let mut md = format!("## Bulk TCP over loopback\n\n{} s per run, {} interleaved rounds.\n\n| cgroup | Gbit/s, median (p10–p90) | ratio |\n| --- | --- | --- |\n", self.sizes.tcp_seconds, self.sizes.rounds);
        let mut all = serde_json::Map::new();
        for (how, samples) in ["unguarded", "guarded"].iter().zip(&rates) {
            let gbits: Vec<f64> = samples.iter().map(|rate| rate * 8.0 / 1e9).collect();
            let spread = Spread::of(&gbits);
            let ratio = Spread::of(samples).median / base;
            let _ = writeln!(md, "| {how} | {} | {ratio:.3} |", spread.text(2));
            all.insert(
                (*how).into(),
                json!({"gbit_per_second": spread.json(), "ratio": ratio}),
            );
        }
        findings.section(md, "bulk_tcp", all.into());
        Ok(())
    }

    /// How many blocked lookups per second reach userspace; every one the
    /// kernel blocked is either received or counted as lost.
    pub(super) fn blocked_events(&self, findings: &mut Findings) -> Result<()> {
        let mut md = format!("## Blocked lookups reported\n\n{} refused queries per run from one process; the kernel's counters are exact, events beyond what the ring buffer (4 MiB) holds are counted as lost.\n\n| offered rate /s | achieved /s | blocked (kernel) | events received | events lost |\n| --- | --- | --- | --- | --- |\n", self.sizes.flood_queries);
        let mut floods = Vec::new();
        for &rate in &self.sizes.flood_rates {
            let (stdout, stderr) = self.output(
                self.guard()
                    .args(["run", "--standalone", "-q", "--deny", DENIED, "--"])
                    .arg(self.tool())
                    .args(["flood", SERVER, DENIED])
                    .arg(self.sizes.flood_queries.to_string())
                    .arg(rate.to_string()),
            )?;
            let flood = json_line(&stdout)?;
            let (blocked, received, lost) = flood_counts(&stderr)?;
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
            floods.push(json!({"offered_rate": rate, "achieved_rate": flood["rate"], "blocked": blocked, "received": received, "lost": lost}));
        }
        findings.section(md, "blocked_events", floods.into());
        Ok(())
    }

    /// Peak resident memory of a standalone guard during an allowed load,
    /// and of the daemon after every row that used it.
    pub(super) fn footprint(
        &self,
        policy: &Path,
        daemon: &BenchDaemon,
        findings: &mut Findings,
    ) -> Result<()> {
        let (_, stderr) = self.output(
            Command::new("/usr/bin/time")
                .args(["-f", "maxrss_kb=%M"])
                .arg(self.bin.join("guard"))
                .env("GUARD_SOCKET", self.dir.join("no-daemon.sock"))
                .args(["run", "--standalone", "-q", "-p"])
                .arg(policy)
                .arg("--")
                .args(self.load_args(SERVER, self.sizes.queries)),
        )?;
        let rss: u64 = stderr
            .lines()
            .find_map(|l| l.strip_prefix("maxrss_kb="))
            .and_then(|v| v.trim().parse().ok())
            .context("no maxrss_kb from /usr/bin/time")?;
        let (daemon_rss, daemon_peak) = daemon.memory_kb()?;
        let md = format!("## Footprint\n\n| process | resident memory |\n| --- | --- |\n| guard (standalone run), peak | {:.1} MiB |\n| guard daemon, now / peak | {:.1} / {:.1} MiB |\n", rss as f64 / 1024.0, daemon_rss as f64 / 1024.0, daemon_peak as f64 / 1024.0);
        findings.section(
            md,
            "footprint",
            json!({"guard_run_maxrss_kb": rss, "daemon_rss_kb": daemon_rss, "daemon_peak_rss_kb": daemon_peak}),
        );
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
