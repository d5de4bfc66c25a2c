//! The `guard` command line.
use std::{ffi::OsString, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::{
    policy::Policy,
    report::inventory::{self, Inventory},
    report::render,
    report::Report,
    run::{run, RunOptions},
};

const EXIT_CODES: &str = "\
Exit status of `guard run`:
  CMD's own     nothing was blocked (or --audit was given)
  77            at least one DNS lookup was blocked in enforce mode, or
                the run took a way around the guard (left its cgroup, a
                packet or raw socket, guard's programs detached, a hosts
                entry for a denied name), even if CMD exited 0 (the CI gate)
  74            CMD ran and nothing was blocked, but an output (--report,
                --junit, ..., --deps-db) could not be written (a full disk)
  75            the guard was removed while CMD ran (guard daemon
                --uninstall, a new generation); CMD was ended
  76            the daemon hosting the run went away for good and the
                run's counters could not be read; no block is known
  125           guard could not set up enforcement, a policy file or option
                was unreadable or invalid, or an output file (--report,
                --junit, --summary-markdown, --record) could not be opened
                for writing; CMD was not run (unless --fail-open, for set-up)
  126           CMD was found but could not be run
  127           CMD was not found
  128+N         CMD was killed by signal N
  2             usage error on the command line (also: --dns-port
                outside 1-65535 or given more than 4 times)

Exit status of `guard policy check`: 0 all files valid, 1 otherwise.
With --audit --fail-on-block, 77 also when a lookup would have been blocked.";

/// Deploy-time egress guard: run a command in its own cgroup where DNS
/// lookups of denylisted names are refused in the kernel, and report every
/// refused lookup with the process chain that made it.
#[derive(Debug, Parser)]
#[command(name = "guard", version, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Render a saved JSON report (from `guard run --report`) again.
    Report(ReportArgs),
    /// Run CMD with DNS lookups of denylisted names refused.
    ///
    /// CMD and everything it starts run in a fresh cgroup v2 with eBPF
    /// programs attached before CMD starts. Questions are judged over UDP
    /// and TCP, and so are answers: one that leads to a denied name (a
    /// CNAME, DNAME, SRV, MX, HTTPS or SVCB target, an address record owned
    /// by it) is refused too. A refused lookup fails at once: the send fails
    /// (EPERM over UDP, EACCES over TCP), a refused TCP answer arrives as
    /// REFUSED, and guard ends the socket. Lookups through nscd or
    /// systemd-resolved are sent back on the wire (Linux 6.7+). In enforce
    /// mode a process that leaves the cgroup or opens a packet socket is
    /// killed (see --allow-raw-sockets) and the run fails. Nothing outside
    /// the cgroup is affected. Requires root.
    #[command(after_help = EXIT_CODES)]
    Run(Box<RunArgs>),
    /// Work with policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run the guard service (systemd unit `guard.service`).
    ///
    /// Loads the programs once, pins them under bpffs and guards the cgroups
    /// and units bound in the configuration; `guard run` uses it when it
    /// runs. Enforcement stays in place if the daemon dies; a restart adopts
    /// it. SIGHUP reloads the configuration and policies.
    Daemon(DaemonArgs),
    /// Show what the daemon guards: programs, bindings, runs, counters.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make the daemon re-read its configuration and policies. An invalid
    /// configuration is refused and the running one stays in force.
    Reload,
    /// Exit 0 once the daemon guards the cgroup this command runs in, 1
    /// otherwise. Put it in `ExecStartPre=` of a bound unit: the unit then
    /// cannot start unguarded (see the README).
    EnsureGuarded,
    /// Say what on this host weakens the guard, each finding with what to
    /// do: kernel features, how names are resolved here (nsswitch, hosts
    /// file, nscd, systemd-resolved), DNS ports, IPsec, the daemon. Exit 0
    /// when nothing weakens it, 1 otherwise.
    Doctor(DoctorArgs),
    /// The fleet's deploy-time dependency map: store the lookups of guarded
    /// deploys, load a service catalog, and ask which services a service
    /// affects, what it depends on, and every cycle.
    Deps(crate::deps::DepsArgs),
    /// Print the daemon's recent DNS events (blocked, audited, recorded).
    Events {
        /// Keep printing new events as they happen.
        #[arg(short, long)]
        follow: bool,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct DoctorArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Check the hosts file against these policies; repeatable.
    #[arg(short, long = "policy", value_name = "FILE")]
    policies: Vec<PathBuf>,
    /// ... and these denied names; repeatable.
    #[arg(long, value_name = "NAME")]
    deny: Vec<String>,
    /// The DNS ports guard runs would inspect.
    #[arg(long = "dns-port", value_name = "PORT", default_value = "53", value_parser = dns_port())]
    dns_ports: Vec<u16>,
}

#[derive(Debug, Args)]
struct DaemonArgs {
    /// The configuration file; without one the daemon starts with the
    /// defaults and no bindings.
    #[arg(long, value_name = "FILE", default_value = crate::daemon::config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Log format on stderr (journald keeps either).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Remove everything the daemon pinned and the runs cgroup, then exit
    /// (stop the service first).
    #[arg(long)]
    uninstall: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Policy file (YAML); repeat to combine several.
    #[arg(short, long = "policy", value_name = "FILE")]
    policies: Vec<PathBuf>,
    /// Refuse NAME (`frontend.internal`) or every name below a domain
    /// (`*.frontend.internal`); repeatable.
    #[arg(long, value_name = "NAME")]
    deny: Vec<String>,
    /// Let NAME through even where a broader deny matches; repeatable.
    #[arg(long, value_name = "NAME")]
    allow: Vec<String>,
    /// Let every lookup through; report what would have been blocked.
    #[arg(long)]
    audit: bool,
    /// Write a JSON report of the run to FILE.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// If enforcement cannot be set up, run CMD unguarded instead of failing
    /// with 125. A loud warning is printed.
    #[arg(long)]
    fail_open: bool,
    /// Destination port treated as DNS (UDP and TCP), 1 to 65535;
    /// repeatable, up to 4.
    #[arg(long = "dns-port", value_name = "PORT", default_value = "53", value_parser = dns_port())]
    dns_ports: Vec<u16>,
    /// Create the run's cgroup under this cgroup v2 directory instead of
    /// guard's own cgroup.
    #[arg(long, value_name = "DIR")]
    cgroup_parent: Option<PathBuf>,
    /// Print only the end-of-run summary, not a line per event.
    #[arg(short, long)]
    quiet: bool,
    /// With --audit (or audit-mode policies): exit 77 when a lookup would
    /// have been blocked, so the CI job fails without breaking the deploy.
    #[arg(long)]
    fail_on_block: bool,
    /// Write a JUnit XML report: one failing test case per blocked name.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Write a markdown summary (written to $GITHUB_STEP_SUMMARY
    /// automatically on GitHub Actions).
    #[arg(long, value_name = "FILE")]
    summary_markdown: Option<PathBuf>,
    /// Record every name the command resolved, allowed or not, with query
    /// types, counts and the asking process chain (JSON). Turn it into a
    /// starting policy with `guard policy suggest`.
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
    /// With --deps-db: the service this run deploys, under which its
    /// lookups are stored.
    #[arg(long, value_name = "NAME", requires = "deps_db")]
    service: Option<String>,
    /// At the end of the run, store every name it resolved in this
    /// dependency store (an SQLite file or a postgres:// URL; see `guard
    /// deps`). Needs --service.
    #[arg(long, value_name = "PATH|URL", requires = "service")]
    deps_db: Option<String>,
    /// Do not use the guard daemon even when one is running: load the
    /// programs for this run alone. (Without a daemon this is the default.)
    #[arg(long)]
    standalone: bool,
    /// Packet and raw sockets are expected (a tool that needs them): they
    /// are reported, but neither killed nor failing the run. A policy can
    /// say the same with `allow_raw_sockets: true`.
    #[arg(long)]
    allow_raw_sockets: bool,
    /// Unix socket of a local resolver daemon to refuse connections to,
    /// besides nscd's and systemd-resolved's; repeatable. Implies
    /// --standalone.
    #[arg(long = "resolver-socket", value_name = "PATH")]
    resolver_sockets: Vec<PathBuf>,
    /// Size of the kernel-to-userspace event buffer (a power of two, at
    /// least 4096).
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20, value_parser = ring_size)]
    ring_buffer_size: u32,
    /// The command and its arguments.
    #[arg(required = true, last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate policy files; report every problem with file and line.
    Check {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Print a starting policy (YAML, commented) from a `--record` file.
    Suggest {
        /// The record written by `guard run --record`.
        #[arg(value_name = "RECORD")]
        record: PathBuf,
        /// Name of the suggested policy.
        #[arg(long, default_value = "suggested")]
        name: String,
    },
}

#[derive(Debug, Args)]
struct ReportArgs {
    /// A JSON report written by `guard run --report`.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    format: ReportFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ReportFormat {
    /// The end-of-run summary, as on a terminal.
    Text,
    /// Markdown, as in a CI job summary.
    Markdown,
    /// JUnit XML.
    Junit,
    /// GitHub Actions annotations (workflow commands).
    Github,
}

/// A port (0 is not one: it would silently inspect nothing).
fn dns_port() -> clap::builder::RangedI64ValueParser<u16> {
    clap::value_parser!(u16).range(1..)
}

/// What clap cannot say in the argument definitions: `--dns-port` at most
/// [`MAX_DNS_PORTS`](guard_common::maps::MAX_DNS_PORTS) times (the kernel's
/// port table has that many slots).
fn validate(cli: &Cli) -> Result<(), clap::Error> {
    let dns_ports = match &cli.command {
        Command::Run(args) => &args.dns_ports,
        Command::Doctor(args) => &args.dns_ports,
        _ => return Ok(()),
    };
    let limit = guard_common::maps::MAX_DNS_PORTS;
    if dns_ports.len() > limit {
        return Err(command().error(
            clap::error::ErrorKind::TooManyValues,
            format!(
                "--dns-port given {} times ({}); at most {limit} ports can be inspected",
                dns_ports.len(),
                dns_ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    Ok(())
}

fn ring_size(text: &str) -> Result<u32, String> {
    let size: u32 = text.parse().map_err(|e| format!("{e}"))?;
    if size < 4096 || !size.is_power_of_two() {
        return Err(format!("{size} is not a power of two of at least 4096"));
    }
    Ok(size)
}

/// The command-line definition, for generating shell completions and man
/// pages from it (`cargo xtask dist`).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse().and_then(|cli| validate(&cli).map(|()| cli)) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    init_logging(&cli.command);
    match cli.command {
        Command::Run(args) => run(RunOptions {
            command: args.command,
            policy_files: args.policies,
            deny: args.deny,
            allow: args.allow,
            audit: args.audit,
            fail_open: args.fail_open,
            report: args.report,
            dns_ports: args.dns_ports,
            cgroup_parent: args.cgroup_parent.clone(),
            quiet: args.quiet,
            ring_buffer_bytes: args.ring_buffer_size,
            fail_on_block: args.fail_on_block,
            junit: args.junit,
            summary_markdown: args.summary_markdown,
            record: args.record,
            deps: args.service.zip(args.deps_db),
            // An explicit cgroup placement or extra resolver sockets are a
            // standalone run's features (the daemon's are its own).
            standalone: args.standalone
                || args.cgroup_parent.is_some()
                || !args.resolver_sockets.is_empty(),
            allow_raw_sockets: args.allow_raw_sockets,
            resolver_sockets: args.resolver_sockets,
        }),
        Command::Daemon(args) if args.uninstall => crate::daemon::uninstall(&args.config),
        Command::Daemon(args) => crate::daemon::main(crate::daemon::DaemonOptions {
            config: args.config,
        }),
        Command::Status { json } => crate::api::admin::status(json),
        Command::Reload => crate::api::admin::reload(),
        Command::EnsureGuarded => crate::api::admin::ensure_guarded(),
        Command::Events { follow, json } => crate::api::admin::events(follow, json),
        Command::Policy(PolicyCommand::Check { files }) => check(&files),
        Command::Policy(PolicyCommand::Suggest { record, name }) => suggest(&record, &name),
        Command::Report(args) => report(&args),
        Command::Doctor(args) => doctor(args),
        Command::Deps(args) => crate::deps::main(args),
    }
}

fn doctor(args: DoctorArgs) -> i32 {
    let rules = if args.policies.is_empty() && args.deny.is_empty() {
        None
    } else {
        let mut policies = Vec::new();
        for file in &args.policies {
            match Policy::load(file) {
                Ok(policy) => policies.push(policy),
                Err(e) => {
                    eprintln!("guard: {e}");
                    return 2;
                }
            }
        }
        match crate::policy::compile(policies, &args.deny, &[], false) {
            Ok((_, rules)) => Some(rules),
            Err(e) => {
                eprintln!("guard: {e}");
                return 2;
            }
        }
    };
    crate::doctor::main(&crate::doctor::DoctorOptions {
        json: args.json,
        rules,
        dns_ports: args.dns_ports,
    })
}

/// Logs go to stderr. The daemon logs at info (one record per blocked
/// lookup), as text without colours or timestamps under journald (it adds
/// its own), or as JSON lines; everything else logs warnings only.
/// `GUARD_LOG` overrides the filter (e.g. `guard=debug`).
fn init_logging(command: &Command) {
    let (default, json) = match command {
        Command::Daemon(args) => ("info", args.log_format == LogFormat::Json),
        _ => ("warn", false),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("GUARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    if json {
        builder.json().flatten_event(true).init();
    } else if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.with_ansi(false).without_time().init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

fn report(args: &ReportArgs) -> i32 {
    let report = match Report::load(&args.file) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("guard: {e}");
            return 1;
        }
    };
    match args.format {
        ReportFormat::Text => print!("{}", render::text(&report, false)),
        ReportFormat::Markdown => print!("{}", render::markdown(&report)),
        ReportFormat::Junit => print!("{}", render::junit(&report)),
        ReportFormat::Github => {
            for line in render::github_annotations(&report) {
                println!("{line}");
            }
        }
    }
    0
}

fn suggest(record: &std::path::Path, name: &str) -> i32 {
    match Inventory::load(record) {
        Ok(inventory) => {
            print!("{}", inventory::suggest(&inventory, name, record));
            0
        }
        Err(e) => {
            eprintln!("guard: {e}");
            1
        }
    }
}

fn check(files: &[PathBuf]) -> i32 {
    let mut policies = Vec::new();
    let mut failed = false;
    for file in files {
        match Policy::load(file) {
            Ok(policy) => {
                println!(
                    "{}: ok: policy {} ({}, {} rules)",
                    file.display(),
                    policy.name,
                    policy.mode,
                    policy.rules.len()
                );
                policies.push(policy);
            }
            Err(e) => {
                eprintln!("{e}");
                failed = true;
            }
        }
    }
    // Files that are fine alone may still contradict each other: the same
    // compilation `guard run -p A -p B` and the daemon make.
    if !failed && policies.len() > 1 {
        if let Err(e) = crate::policy::compile(policies, &[], &[], false) {
            eprintln!("{e}");
            failed = true;
        }
    }
    i32::from(failed)
}
