//! Kernel time per packet of guard's programs, from the kernel's own
//! accounting: per allowed DNS query by policy size, and per non-DNS
//! packet.
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use super::{
    kernel::{self, BpfStats, HeldRun, ProgramStats},
    stats::Spread,
    targets::Figure,
    Bench, Findings, HEADLINE_POLICY, OTHER_UDP, SERVER,
};

/// What `kernel_runs` accounted runs of one command gave.
struct Accounted {
    /// The figure, one sample per run.
    figure: Spread,
    /// Packets the packet programs saw in the last run.
    packets: u64,
    /// Each packet program's time per run of it, `name median`.
    per_program: String,
    /// Every run's per-program accounting.
    runs: Value,
}

impl Accounted {
    /// A row of the section's table.
    fn row(&self, traffic: &str, entries: usize) -> String {
        format!(
            "| {traffic} | {entries} | {} | {} | {} |\n",
            self.figure.text(0),
            self.per_program,
            self.packets
        )
    }
}

/// Kernel time per allowed query: the packet programs' time over the
/// queries the load tool sent.
fn per_query(result: &Value, _packets: u64, time_ns: u64) -> Result<f64> {
    Ok(time_ns as f64 / result["queries"].as_f64().context("the load's queries")?)
}

/// How a run's accounting becomes the figure: (the command's result, the
/// packet programs' run count, their run time in ns) to a number.
type FigureOf = dyn Fn(&Value, u64, u64) -> Result<f64>;

impl Bench {
    /// What each program guarding a run did while `command` ran: the
    /// kernel's accounting, before and after.
    fn accounted(
        &self,
        policy: &Path,
        command: &[String],
        through_daemon: bool,
    ) -> Result<(Value, Vec<ProgramStats>)> {
        let guard = if through_daemon {
            let mut guard = self.guard_via_daemon();
            guard.args(["run", "-q", "-p"]).arg(policy).arg("--");
            guard
        } else {
            self.standalone_run(Some(policy))
        };
        let mut run = HeldRun::start(
            guard,
            command,
            &self.dir.join("kernel.fifo"),
            &self.cgroup_root,
        )?;
        let cgroup = run.cgroup().to_owned();
        let programs = || kernel::guarding_programs(&cgroup, &self.cgroup_root);
        let before = programs()?;
        let result = run
            .command_result()?
            .context("the measured command printed no result")?;
        let after = programs()?;
        run.finish()?;
        Ok((result, kernel::since(&before, &after)))
    }

    /// `kernel_runs` accounted runs of `command` (with a TCP sink to send
    /// to if `tcp_sink`, through the bench's daemon if `through_daemon`),
    /// each turned into a figure by `figure`.
    fn repeat_accounted(
        &self,
        policy: &Path,
        (command, tcp_sink, through_daemon): (&[String], bool, bool),
        figure: &FigureOf,
    ) -> Result<Accounted> {
        let mut figures = Vec::new();
        let mut runs = Vec::new();
        let mut per_program: Vec<(String, Vec<f64>)> = Vec::new();
        let mut packets = 0;
        for _ in 0..self.sizes.kernel_runs {
            let mut sink = tcp_sink.then(|| self.tcp_sink()).transpose()?;
            let accounted = self.accounted(policy, command, through_daemon);
            if let Some(sink) = sink.as_mut() {
                let _ = sink.kill();
                let _ = sink.wait();
            }
            let (result, ran) = accounted?;
            let (time, count) = kernel::packet_totals(&ran);
            figures.push(figure(&result, count, time)?);
            packets = count;
            for program in ran.iter().filter(|p| p.sees_packets() && p.run_count > 0) {
                let ns = program.run_time_ns as f64 / program.run_count as f64;
                match per_program
                    .iter_mut()
                    .find(|(name, _)| *name == program.name)
                {
                    Some((_, samples)) => samples.push(ns),
                    None => per_program.push((program.name.clone(), vec![ns])),
                }
            }
            runs.push(
                ran.iter()
                    .map(|p| json!({"name": p.name, "attach_type": p.attach_type, "run_time_ns": p.run_time_ns, "run_count": p.run_count}))
                    .collect::<Vec<_>>(),
            );
        }
        let per_program = per_program
            .iter()
            .map(|(name, samples)| format!("{name} {:.0}", Spread::of(samples).median))
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Accounted {
            figure: Spread::of(&figures),
            packets,
            per_program,
            runs: runs.into(),
        })
    }

    /// Kernel time per allowed DNS query (by policy size) and per non-DNS
    /// packet, from the kernel's BPF run-time statistics.
    pub(super) fn kernel_time(&self, findings: &mut Findings) -> Result<()> {
        let _stats = BpfStats::enable()?;
        let mut md = format!("## Kernel time per packet\n\nThe kernel's own accounting (BPF run-time statistics, `BPF_ENABLE_STATS`, on only for these runs): run time and run count of guard's programs on a standalone run's cgroup (`bpftool cgroup show`, `bpftool prog show`), read while the run is held, before and after the measured command. Per allowed DNS query: the egress program's time on the questions plus the ingress program's on the answers, over the queries. Per non-DNS packet: both programs' time over the packets they saw, for UDP request/response on port 5353 and for bulk TCP. {} runs each, {} queries a run.\n\n| traffic | policy entries | ns, median (p10–p90) | per run of each program, ns (median) | packets seen per run |\n| --- | --- | --- | --- | --- |\n", self.sizes.kernel_runs, self.sizes.kernel_queries);
        let mut all = serde_json::Map::new();
        let mut per_size = Vec::new();
        for &entries in &self.sizes.policy_sizes {
            let policy = self.policy(entries)?;
            let dns = self.repeat_accounted(
                &policy,
                (
                    &self.load_args(SERVER, self.sizes.kernel_queries),
                    false,
                    false,
                ),
                &per_query,
            )?;
            md += &dns.row("allowed DNS query", entries);
            per_size.push(
                json!({"entries": entries, "ns_per_query": dns.figure.json(), "programs": dns.runs}),
            );
            findings.cost_by_size.push((entries, dns.figure));
            if entries == HEADLINE_POLICY {
                findings.target(
                    Figure::DnsQueryKernelTime,
                    format!("kernel time per allowed DNS query, egress + ingress ({entries}-entry policy)"),
                    dns.figure,
                );
            }
        }
        all.insert("dns_query".into(), per_size.into());
        let policy = self.policy(HEADLINE_POLICY)?;
        let per_packet: &FigureOf = &|_, count, time| {
            if count == 0 {
                bail!("guard's packet programs saw no packet");
            }
            Ok(time as f64 / count as f64)
        };
        let udp = self.repeat_accounted(
            &policy,
            (
                &self.load_args(OTHER_UDP, self.sizes.kernel_queries),
                false,
                false,
            ),
            per_packet,
        )?;
        let tcp =
            self.repeat_accounted(&policy, (&self.tcp_send_args(), true, false), per_packet)?;
        for (key, traffic, accounted) in [
            ("other_udp", "non-DNS UDP request/response", udp),
            ("bulk_tcp", "non-DNS bulk TCP", tcp),
        ] {
            md += &accounted.row(traffic, HEADLINE_POLICY);
            findings.target(
                Figure::OtherPacketKernelTime,
                format!("kernel time per non-DNS packet, every hook attached ({traffic})"),
                accounted.figure,
            );
            all.insert(
                key.into(),
                json!({"ns_per_packet": accounted.figure.json(), "programs": accounted.runs}),
            );
        }
        findings.section(md, "kernel_time", all.into());
        Ok(())
    }

    /// Kernel time per allowed DNS query through the bench's daemon (its
    /// pinned programs, attached to the cgroup of all its runs).
    pub(super) fn kernel_time_via_daemon(&self, findings: &mut Findings) -> Result<()> {
        let _stats = BpfStats::enable()?;
        let dns = self.repeat_accounted(
            &self.policy(HEADLINE_POLICY)?,
            (
                &self.load_args(SERVER, self.sizes.kernel_queries),
                false,
                true,
            ),
            &per_query,
        )?;
        let md = format!(
            "## Kernel time through the daemon\n\nAs above, for `guard run` through the bench's daemon: its programs are attached to the cgroup of all its runs.\n\n| traffic | policy entries | ns, median (p10–p90) | per run of each program, ns (median) | packets seen per run |\n| --- | --- | --- | --- | --- |\n{}",
            dns.row("allowed DNS query", HEADLINE_POLICY)
        );
        findings.section(
            md,
            "kernel_time_via_daemon",
            json!({"entries": HEADLINE_POLICY, "ns_per_query": dns.figure.json(), "programs": dns.runs}),
        );
        Ok(())
    }
}
