//! `guard run`: one command in its own guarded cgroup.
//!
//! Order matters and is the whole safety argument:
//! 1. policies are validated (nothing runs on bad input);
//! 2. the reaper is forked while the process is single-threaded;
//! 3. the cgroup is created, programs loaded, rules and binding written,
//!    programs attached;
//! 4. only then is the command started, placing itself in the cgroup before
//!    it execs, so no instruction of it runs unguarded;
//! 5. when it exits, whatever it left in the cgroup is killed, the last
//!    events are read, the report written, and everything removed.
//!
//! Set-up lives in [`standalone`] (own programs) or comes from the daemon
//! (`crate::api::client`); [`supervise`] runs and watches the command;
//! [`conclude`] turns what was seen into the report and the exit status;
//! [`reaper`] cleans up after a guard that died; [`teardown`] lets the
//! kernel detach a finished run's programs after guard has exited.
mod conclude;
mod outputs;
mod reaper;
mod spawn;
mod standalone;
mod supervise;
mod teardown;

use std::{
    ffi::OsString, io, os::unix::process::ExitStatusExt as _, path::PathBuf, process::ExitStatus,
};

use crate::{
    api::{self, client, PolicyText, RunRequest},
    error::{Error, Result},
    policy::{compile, Policy, RuleSet},
    report::hosts,
};
use outputs::Outputs;
use standalone::{Placement, Standalone};
use supervise::{supervise, Backend};

/// At least one lookup was blocked in enforce mode (the CI gate).
pub const EXIT_BLOCKED: i32 = 77;
/// The guard was removed while the command ran (`guard daemon
/// --uninstall`, or a new generation that could not carry the run over):
/// the command was ended; the report has what was seen until then.
pub const EXIT_GUARD_REMOVED: i32 = 75;
/// The daemon hosting the run went away for good and the run's counters
/// could not be read: no lookup is known to have been blocked, but that
/// cannot be established either.
pub const EXIT_VERDICT_UNKNOWN: i32 = 76;
/// The command ran and its verdict was a pass, but an output asked for
/// (`--report`, `--junit`, ...) could not be written (a full disk, say).
pub const EXIT_OUTPUT_FAILED: i32 = 74;
/// guard could not set up enforcement (or its input was invalid); the
/// command was not run.
pub const EXIT_SETUP_FAILED: i32 = 125;
/// The command was found but could not be run.
pub const EXIT_CANNOT_RUN: i32 = 126;
/// The command was not found.
pub const EXIT_NOT_FOUND: i32 = 127;

/// Event records kept in memory for the report; beyond this only the
/// kernel's counters (exact) and `events_omitted` grow, so a command looping
/// on a blocked name cannot make guard's memory grow without bound.
const MAX_STORED_EVENTS: usize = 100_000;

/// Distinct (name, query type) pairs `--record` counts in the kernel.
const RECORD_CAPACITY: u32 = 65_536;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub command: Vec<OsString>,
    pub policy_files: Vec<PathBuf>,
    pub deny: Vec<String>,
    pub allow: Vec<String>,
    pub audit: bool,
    pub fail_open: bool,
    pub report: Option<PathBuf>,
    pub dns_ports: Vec<u16>,
    pub cgroup_parent: Option<PathBuf>,
    pub quiet: bool,
    pub ring_buffer_bytes: u32,
    /// In audit mode, exit 77 when something would have been blocked.
    pub fail_on_block: bool,
    pub junit: Option<PathBuf>,
    pub summary_markdown: Option<PathBuf>,
    /// Write every resolved name (`--record`).
    pub record: Option<PathBuf>,
    /// Store every resolved name in the dependency store at the end of the
    /// run: (service, store location) (`--service`, `--deps-db`).
    pub deps: Option<(String, String)>,
    /// Never use the daemon, even when one is running.
    pub standalone: bool,
    /// Packet and raw sockets are expected (`--allow-raw-sockets`).
    pub allow_raw_sockets: bool,
    /// Resolver-daemon sockets to refuse besides the defaults.
    pub resolver_sockets: Vec<PathBuf>,
}

impl RunOptions {
    /// Whether the kernel counts every name resolved, not only refused
    /// ones: for `--record` and for the dependency store.
    pub fn records_names(&self) -> bool {
        self.record.is_some() || self.deps.is_some()
    }
}

/// Runs the command under guard and returns guard's exit status.
pub fn run(options: RunOptions) -> i32 {
    if options.command.is_empty() {
        eprintln!("guard: no command to run");
        return EXIT_SETUP_FAILED;
    }
    let t = std::time::Instant::now();
    let (texts, policies, rules) = match load_policies(&options) {
        Ok(loaded) => {
            tracing::debug!(elapsed = ?t.elapsed(), "policies read and compiled");
            loaded
        }
        Err(e) => {
            eprintln!("guard: {e}");
            eprintln!("guard: the command was not run");
            return EXIT_SETUP_FAILED;
        }
    };
    // Before anything is set up: a report that cannot be written must stop
    // the run while the command can still be left unrun.
    let outputs = match Outputs::open(&options) {
        Ok(outputs) => outputs,
        Err(e) => {
            eprintln!("guard: {e}");
            eprintln!("guard: the command was not run");
            return EXIT_SETUP_FAILED;
        }
    };
    if rules.deny_count() == 0 && !options.quiet {
        eprintln!("guard: warning: no deny rules; nothing will be blocked");
    }
    // Names the hosts file answers never become DNS queries: name them now.
    let hosts = hosts::check_host(&rules);
    for entry in &hosts {
        eprintln!("{}", entry.line_text());
    }
    if !options.standalone {
        let request = RunRequest {
            object: client::own_object(),
            dns_ports: options.dns_ports.clone(),
            policies: texts,
            deny: options.deny.clone(),
            allow: options.allow.clone(),
            audit: options.audit,
            record: options.records_names(),
            allow_raw_sockets: options.allow_raw_sockets,
        };
        match client::start_run(&api::socket_path(), &request) {
            Ok(client::Started::Daemon(session)) => {
                return match new_runtime() {
                    Ok(runtime) => runtime.block_on(supervise(
                        options,
                        policies,
                        rules,
                        hosts,
                        outputs,
                        Backend::Daemon(session),
                    )),
                    Err(e) => setup_failed(&options, &e),
                };
            }
            Ok(client::Started::NoDaemon) => {}
            Ok(client::Started::Incompatible(message)) => {
                if !options.quiet {
                    eprintln!("guard: note: {message}; running standalone");
                }
            }
            Ok(client::Started::Unanswered(message)) => {
                eprintln!("guard: warning: {message}; running standalone");
            }
            Err(e) => return setup_failed(&options, &e),
        }
    }
    let placement = match Placement::prepare(&options) {
        Ok(placement) => placement,
        Err(e) => return setup_failed(&options, &e),
    };
    let runtime = match new_runtime() {
        Ok(runtime) => runtime,
        Err(e) => return setup_failed(&options, &e),
    };
    runtime.block_on(async {
        let backend = match Standalone::set_up(&options, &rules, placement) {
            Ok(backend) => backend,
            Err(e) => return setup_failed(&options, &e),
        };
        supervise(
            options,
            policies,
            rules,
            hosts,
            outputs,
            Backend::Standalone(Box::new(backend)),
        )
        .await
    })
}

fn new_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting the async runtime"))
}

/// The policy files (their text travels to the daemon, which validates it
/// again), the policies, and the compiled rules.
fn load_policies(options: &RunOptions) -> Result<(Vec<PolicyText>, Vec<Policy>, RuleSet)> {
    let mut texts = Vec::new();
    let mut policies = Vec::new();
    for path in &options.policy_files {
        let (text, policy) = Policy::read(path)?;
        policies.push(policy);
        texts.push(PolicyText {
            path: path.clone(),
            text,
        });
    }
    let (policies, rules) = compile(policies, &options.deny, &options.allow, options.audit)?;
    Ok((texts, policies, rules))
}

/// Whether evidence (escapes, packet sockets, tampering) fails the run and
/// is stopped in the kernel: not with `--audit`, nor when every policy is
/// in audit mode.
fn evidence_enforced(options: &RunOptions, rules: &RuleSet) -> bool {
    let rules = rules.rules();
    !options.audit
        && (rules.is_empty() || rules.iter().any(|r| r.mode == crate::policy::Mode::Enforce))
}

fn setup_failed(options: &RunOptions, error: &Error) -> i32 {
    eprintln!("guard: cannot set up enforcement: {error}");
    if crate::error::denied_permission(error) {
        eprintln!("guard: {}", crate::error::PRIVILEGE_HINT);
    }
    if !options.fail_open {
        eprintln!("guard: the command was not run (use --fail-open to run it unguarded instead)");
        return EXIT_SETUP_FAILED;
    }
    eprintln!("guard: WARNING: --fail-open: running the command WITHOUT any DNS guard");
    let Some((program, args)) = options.command.split_first() else {
        return EXIT_SETUP_FAILED;
    };
    match std::process::Command::new(program).args(args).status() {
        Ok(status) => exit_code_of(status),
        Err(e) => spawn_error_code(program, &e),
    }
}

/// The shell's convention: 128 + signal number for a command killed by one.
pub fn exit_code_of(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => EXIT_SETUP_FAILED,
    }
}

/// `env`'s convention: 127 when the command is not found, 126 otherwise.
fn spawn_error_code(program: &std::ffi::OsStr, error: &io::Error) -> i32 {
    eprintln!("guard: {}: {error}", program.to_string_lossy());
    if error.kind() == io::ErrorKind::NotFound {
        EXIT_NOT_FOUND
    } else {
        EXIT_CANNOT_RUN
    }
}
