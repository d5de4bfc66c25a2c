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
use std::{
    collections::HashSet,
    ffi::OsString,
    fs::File,
    hash::{BuildHasher, Hasher},
    io::{self, IsTerminal as _, Write as _},
    os::{fd::AsRawFd, unix::process::ExitStatusExt as _},
    path::PathBuf,
    process::ExitStatus,
    time::{Instant, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use guard_common::{
    event::Verdict,
    maps::{Binding, Counter},
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

use crate::{
    api::{self, PolicyText, RunRequest, RunTotals},
    cgroup::{run_cgroup_name, sweep_stale_runs, Hierarchy, RunCgroup},
    client,
    error::{Error, PolicyError, Result},
    events::{decode, DnsQuery, Record, Transport},
    inventory::Inventory,
    loader::{KernelMaps as _, LoadOptions, Programs},
    policy::{Mode, Policy, RuleSet},
    procs::ProcessTable,
    reaper::{self, Reaper},
    render,
    report::{Clock, CommandExit, Counters, EventRecord, PolicyRef, ProgramStats, Report, SCHEMA},
    sockdiag,
};

/// At least one lookup was blocked in enforce mode (the CI gate).
pub const EXIT_BLOCKED: i32 = 77;
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

/// errno the child reports when it cannot enter the cgroup. Chosen because
/// exec never returns it, so it cannot be mistaken for "cannot run".
const PLACEMENT_FAILED: i32 = libc::ENOTRECOVERABLE;

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
    /// Never use the daemon, even when one is running.
    pub standalone: bool,
}

/// Runs the command under guard and returns guard's exit status.
pub fn run(options: RunOptions) -> i32 {
    if options.command.is_empty() {
        eprintln!("guard: no command to run");
        return EXIT_SETUP_FAILED;
    }
    let (texts, policies, rules) = match load_policies(&options) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("guard: {e}");
            eprintln!("guard: the command was not run");
            return EXIT_SETUP_FAILED;
        }
    };
    if rules.deny_count() == 0 && !options.quiet {
        eprintln!("guard: warning: no deny rules; nothing will be blocked");
    }
    if !options.standalone {
        let request = RunRequest {
            object: client::own_object(),
            dns_ports: options.dns_ports.clone(),
            policies: texts,
            deny: options.deny.clone(),
            allow: options.allow.clone(),
            audit: options.audit,
            record: options.record.is_some(),
        };
        match client::start_run(&api::socket_path(), &request) {
            Ok(client::Started::Daemon(session)) => {
                return match new_runtime() {
                    Ok(runtime) => runtime.block_on(supervise(
                        options,
                        policies,
                        rules,
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
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.clone(),
            source,
        })?;
        policies.push(Policy::parse(&text, path)?);
        texts.push(PolicyText {
            path: path.clone(),
            text,
        });
    }
    let (policies, rules) = compile(policies, &options.deny, &options.allow, options.audit)?;
    Ok((texts, policies, rules))
}

/// Adds the command-line rules to the policies and compiles them: the one
/// compilation both `guard run` and the daemon use, so rule ids agree.
pub fn compile(
    mut policies: Vec<Policy>,
    deny: &[String],
    allow: &[String],
    audit: bool,
) -> Result<(Vec<Policy>, RuleSet), PolicyError> {
    if !deny.is_empty() || !allow.is_empty() {
        policies.push(Policy::from_command_line(deny, allow)?);
    }
    let rules = RuleSet::compile(&policies, audit)?;
    Ok((policies, rules))
}

/// Where the run's cgroup goes, decided (and the reaper started) while the
/// process is still single-threaded.
struct Placement {
    hierarchy: Hierarchy,
    path: PathBuf,
    reaper: Reaper,
}

impl Placement {
    fn prepare(options: &RunOptions) -> Result<Placement> {
        let nonce = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let hierarchy = Hierarchy::find_or_mount(&format!("{}-{nonce:x}", std::process::id()))?;
        let parent = match &options.cgroup_parent {
            Some(parent) => parent.clone(),
            None => hierarchy.own_cgroup()?,
        };
        for stale in sweep_stale_runs(&parent) {
            tracing::warn!(cgroup = %stale.display(), "removed the cgroup of a guard run that died");
        }
        let path = parent.join(run_cgroup_name(std::process::id(), nonce));
        let reaper = reaper::spawn(&path, hierarchy.private_mount())?;
        Ok(Placement {
            hierarchy,
            path,
            reaper,
        })
    }
}

fn setup_failed(options: &RunOptions, error: &Error) -> i32 {
    eprintln!("guard: cannot set up enforcement: {error}");
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

/// A standalone run's own programs and cgroup. Dropping it detaches the
/// programs and removes the cgroup, on every path out.
struct Enforcement {
    programs: Programs,
    cgroup: Option<RunCgroup>,
}

/// A run that loaded its own programs.
struct Standalone {
    enforcement: Enforcement,
    ring: RingBuf<MapData>,
    reaper: Reaper,
    hierarchy: Hierarchy,
    path: PathBuf,
}

impl Standalone {
    fn set_up(options: &RunOptions, rules: &RuleSet, placement: Placement) -> Result<Standalone> {
        let Placement {
            hierarchy,
            path,
            reaper,
        } = placement;
        let (enforcement, ring) = Enforcement::set_up(options, rules, &path)?;
        Ok(Standalone {
            enforcement,
            ring,
            reaper,
            hierarchy,
            path,
        })
    }
}

impl Enforcement {
    fn set_up(
        options: &RunOptions,
        rules: &RuleSet,
        path: &std::path::Path,
    ) -> Result<(Enforcement, RingBuf<MapData>)> {
        let t = Instant::now();
        let cgroup = RunCgroup::create(path)?;
        tracing::debug!(elapsed = ?t.elapsed(), "cgroup created");
        let setup = || -> Result<(Programs, RingBuf<MapData>)> {
            let mut programs = Programs::load(&LoadOptions {
                dns_ports: &options.dns_ports,
                rule_capacity: rules.entries().len() as u32,
                ring_buffer_bytes: options.ring_buffer_bytes,
                record_capacity: if options.record.is_some() {
                    RECORD_CAPACITY
                } else {
                    0
                },
                policy_capacity: 1,
            })?;
            tracing::debug!(elapsed = ?t.elapsed(), "programs loaded");
            programs.install_rules(0, rules)?;
            programs.bind(
                cgroup.id(),
                Binding {
                    policy_id: 0,
                    audit_only: u8::from(options.audit),
                    record: u8::from(options.record.is_some()),
                    _pad: [0; 2],
                    label_mask: rules.label_mask(),
                },
            )?;
            programs.attach_tracepoints()?;
            tracing::debug!(elapsed = ?t.elapsed(), "tracepoints attached");
            programs.attach_cgroup(cgroup.dir())?;
            tracing::debug!(elapsed = ?t.elapsed(), "cgroup program attached");
            let events = programs.take_events()?;
            Ok((programs, events))
        };
        match setup() {
            Ok((programs, events)) => Ok((
                Enforcement {
                    programs,
                    cgroup: Some(cgroup),
                },
                events,
            )),
            Err(e) => {
                let _ = cgroup.remove();
                Err(e)
            }
        }
    }

    /// What the report needs from the kernel once the command is done.
    fn totals(&self, record: bool) -> RunTotals {
        let read = |c| self.programs.counter(c).unwrap_or(0);
        RunTotals {
            counters: Counters {
                inspected: read(Counter::Inspected),
                blocked: read(Counter::Blocked),
                audited: read(Counter::Audited),
                malformed: read(Counter::Malformed),
                unbound: read(Counter::Unbound),
            },
            events_lost: read(Counter::EventsLost),
            seen: if record {
                self.programs
                    .seen_counts(0)
                    .into_iter()
                    .map(|((hash, qtype), count)| (hash, qtype, count))
                    .collect()
            } else {
                Vec::new()
            },
            program_stats: self
                .programs
                .egress_stats()
                .map(|(runs, ns)| ProgramStats::new(runs, ns)),
        }
    }

    fn remove_cgroup(&mut self) -> Result<()> {
        match self.cgroup.take() {
            Some(cgroup) => cgroup.remove(),
            None => Ok(()),
        }
    }
}

impl Drop for Enforcement {
    fn drop(&mut self) {
        if let Err(e) = self.remove_cgroup() {
            eprintln!("guard: {e}");
        }
    }
}

/// Where the run's enforcement lives.
enum Backend {
    Standalone(Box<Standalone>),
    Daemon(client::RunSession),
}

/// Where the run's events come from while the command runs.
enum Events {
    Ring(AsyncFd<RingBuf<MapData>>),
    Daemon(client::RunSession),
}

async fn supervise(
    options: RunOptions,
    policies: Vec<Policy>,
    rules: RuleSet,
    backend: Backend,
) -> i32 {
    let started = Instant::now();
    let started_at = SystemTime::now();
    let (path, procs, standalone, mut events) = match backend {
        Backend::Standalone(standalone) => {
            let Standalone {
                enforcement,
                ring,
                reaper,
                hierarchy,
                path,
            } = *standalone;
            let procs = match enforcement
                .cgroup
                .as_ref()
                .map(RunCgroup::procs_for_writing)
            {
                Some(Ok(procs)) => procs,
                Some(Err(e)) => return setup_failed(&options, &e),
                None => unreachable!("cgroup is present until removal"),
            };
            // SAFETY: the ring buffer owns its descriptor and keeps it open,
            // with the same description, for as long as the AsyncFd holds it.
            let registered =
                unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
            let ring = match registered.map_err(|e| e.into_parts().1) {
                Ok(ring) => ring,
                Err(e) => {
                    return setup_failed(&options, &Error::io("watching the event ring buffer")(e))
                }
            };
            (
                path,
                procs,
                Some((enforcement, reaper, hierarchy)),
                Events::Ring(ring),
            )
        }
        Backend::Daemon(session) => {
            let path = session.cgroup().to_owned();
            let procs = match crate::cgroup::procs_for_writing(&path) {
                Ok(procs) => procs,
                Err(error) => {
                    // Ending the session makes the daemon remove the cgroup.
                    drop(session);
                    return setup_failed(&options, &error);
                }
            };
            (path, procs, None, Events::Daemon(session))
        }
    };

    let (program, args) = options
        .command
        .split_first()
        .expect("run() checked the command is not empty");
    let mut command = tokio::process::Command::new(program);
    command.args(args);
    let procs_fd = procs.as_raw_fd();
    // SAFETY: the closure only calls write(2), which is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            // Enter the guarded cgroup before exec: if this fails the command
            // never starts.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::from_raw_os_error(PLACEMENT_FAILED));
            }
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) if e.raw_os_error() == Some(PLACEMENT_FAILED) => {
            drop(events);
            drop(standalone);
            return setup_failed(&options, &Error::io("placing the command in its cgroup")(e));
        }
        Err(e) => {
            drop(events);
            drop(standalone);
            return spawn_error_code(program, &e);
        }
    };
    drop(procs);
    let child_pid = child.id().unwrap_or(0);

    let mut state = RunState::new(child_pid, &rules, options.quiet);
    let status = match wait_forwarding_signals(&mut child, &mut events, &mut state).await {
        Ok(status) => status,
        Err(e) => {
            eprintln!("guard: {e}");
            let _ = child.start_kill();
            child
                .wait()
                .await
                .unwrap_or_else(|_| ExitStatus::from_raw(EXIT_SETUP_FAILED << 8))
        }
    };

    // Processes the command left behind are killed with the cgroup; the
    // events they and the command produced are all in the ring by now.
    let totals = match (events, standalone) {
        (Events::Ring(mut ring), Some((mut enforcement, reaper, hierarchy))) => {
            let t = Instant::now();
            if let Err(e) = enforcement.remove_cgroup() {
                eprintln!("guard: {e}");
            }
            tracing::debug!(elapsed = ?t.elapsed(), "cgroup removed");
            state.drain(ring.get_mut());
            let totals = enforcement.totals(options.record.is_some());
            let t = Instant::now();
            drop(enforcement);
            tracing::debug!(elapsed = ?t.elapsed(), "programs unloaded");
            drop(reaper);
            drop(hierarchy);
            totals
        }
        (Events::Daemon(session), _) => {
            match session.finish(|bytes| state.feed(bytes)).await {
                Ok(totals) => totals,
                Err(e) => {
                    eprintln!("guard: {e}");
                    eprintln!("guard: the daemon did not report the run's counters; they are missing below");
                    return conclude(
                        &options,
                        &policies,
                        state,
                        status,
                        RunTotals::default(),
                        &path,
                        started,
                        started_at,
                    )
                    .max(EXIT_SETUP_FAILED);
                }
            }
        }
        (Events::Ring(_), None) => unreachable!("a ring comes with standalone enforcement"),
    };
    conclude(
        &options, &policies, state, status, totals, &path, started, started_at,
    )
}

/// Builds the report from what the run saw and writes every output asked
/// for; returns guard's exit status.
#[allow(clippy::too_many_arguments)]
fn conclude(
    options: &RunOptions,
    policies: &[Policy],
    state: RunState<'_>,
    status: ExitStatus,
    totals: RunTotals,
    path: &std::path::Path,
    started: Instant,
    started_at: SystemTime,
) -> i32 {
    let RunTotals {
        counters,
        events_lost,
        seen,
        program_stats,
    } = totals;
    let allowed_counts: std::collections::HashMap<(u64, u16), u64> = seen
        .into_iter()
        .map(|(hash, qtype, count)| ((hash, qtype), count))
        .collect();
    let drops =
        counters.blocked + counters.unbound + if options.audit { 0 } else { counters.malformed };
    let reported = counters.audited + if options.audit { counters.malformed } else { 0 };
    let command_code = exit_code_of(status);
    let exit_code = if drops > 0 || (options.fail_on_block && reported > 0) {
        EXIT_BLOCKED
    } else {
        command_code
    };
    let command: Vec<String> = options
        .command
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let started_at = humantime::format_rfc3339_millis(started_at).to_string();
    let (recorded, events): (Vec<EventRecord>, Vec<EventRecord>) = state
        .events
        .into_iter()
        .partition(|e| e.verdict == "allowed");
    let report = Report {
        schema: SCHEMA.into(),
        guard_version: env!("CARGO_PKG_VERSION").into(),
        command: command.clone(),
        command_exit: CommandExit {
            code: status.code(),
            signal: status.signal(),
        },
        exit_code,
        mode: if options.audit {
            Mode::Audit
        } else {
            Mode::Enforce
        },
        fail_on_block: options.fail_on_block,
        policies: policies
            .iter()
            .map(|p| PolicyRef {
                name: p.name.clone(),
                source: p.source.as_ref().map(|s| s.display().to_string()),
                mode: if options.audit { Mode::Audit } else { p.mode },
            })
            .collect(),
        started_at: started_at.clone(),
        duration_ms: started.elapsed().as_millis() as u64,
        cgroup: path.display().to_string(),
        events,
        events_lost,
        events_omitted: state.omitted,
        counters,
        program_stats,
    };
    let color = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    eprint!("{}", render::text(&report, color));
    if events_lost > 0 {
        eprintln!("guard: warning: {events_lost} events did not fit in the ring buffer and are missing above (counters are exact)");
    }
    if exit_code == EXIT_BLOCKED {
        let what = if drops > 0 {
            "blocked"
        } else {
            "would have been blocked (--fail-on-block)"
        };
        eprintln!(
            "guard: exit {EXIT_BLOCKED}: {} DNS lookup(s) {what} (the command itself exited with {command_code})",
            drops.max(reported)
        );
    }
    let mut failed_outputs = false;
    let mut write = |path: &std::path::Path, text: &str, append: bool| {
        if let Err(e) = write_text(path, text, append) {
            eprintln!("guard: writing {}: {e}", path.display());
            failed_outputs = true;
        }
    };
    if std::env::var("GITHUB_ACTIONS").is_ok_and(|v| v == "true") {
        for line in render::github_annotations(&report) {
            println!("{line}");
        }
        if let Some(summary) = std::env::var_os("GITHUB_STEP_SUMMARY").filter(|s| !s.is_empty()) {
            write(
                std::path::Path::new(&summary),
                &render::markdown(&report),
                true,
            );
        }
    }
    if let Some(path) = &options.summary_markdown {
        write(path, &render::markdown(&report), false);
    }
    if let Some(path) = &options.junit {
        write(path, &render::junit(&report), false);
    }
    if let Some(path) = &options.report {
        let json = serde_json::to_string_pretty(&report).expect("a report serialises");
        write(path, &(json + "\n"), false);
    }
    if let Some(path) = &options.record {
        let mut all = recorded;
        all.extend(report.events.iter().cloned());
        let inventory = Inventory::build(
            command,
            started_at,
            &all,
            &state.qtype_codes,
            &allowed_counts,
        );
        let json = serde_json::to_string_pretty(&inventory).expect("a record serialises");
        write(path, &(json + "\n"), false);
    }
    if failed_outputs {
        return EXIT_SETUP_FAILED;
    }
    exit_code
}

async fn wait_forwarding_signals(
    child: &mut tokio::process::Child,
    events: &mut Events,
    state: &mut RunState<'_>,
) -> Result<ExitStatus> {
    let listen = |kind: SignalKind| signal(kind).map_err(Error::io("installing signal handlers"));
    let mut interrupt = listen(SignalKind::interrupt())?;
    let mut terminate = listen(SignalKind::terminate())?;
    let mut hangup = listen(SignalKind::hangup())?;
    let mut quit = listen(SignalKind::quit())?;
    let pid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let forward = |signal: nix::sys::signal::Signal| {
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(pid, signal);
        }
    };
    loop {
        tokio::select! {
            status = child.wait() => return status.map_err(Error::io("waiting for the command")),
            batch = next_events(events) => match batch? {
                Batch::Ring => {
                    if let Events::Ring(ring) = events {
                        state.drain(ring.get_mut());
                    }
                }
                Batch::Record(bytes) => state.feed(&bytes),
            },
            _ = interrupt.recv() => {
                // Ctrl-C at a terminal reaches the command directly (same
                // process group); forwarding it too would deliver it twice.
                if !in_terminal_foreground() {
                    forward(nix::sys::signal::Signal::SIGINT);
                }
            }
            _ = terminate.recv() => forward(nix::sys::signal::Signal::SIGTERM),
            _ = hangup.recv() => forward(nix::sys::signal::Signal::SIGHUP),
            _ = quit.recv() => forward(nix::sys::signal::Signal::SIGQUIT),
        }
    }
}

enum Batch {
    /// The ring buffer has records.
    Ring,
    /// One record from the daemon.
    Record(Vec<u8>),
}

/// Waits for the next events (cancel-safe: both sources keep their place).
async fn next_events(events: &mut Events) -> Result<Batch> {
    match events {
        Events::Ring(ring) => {
            let mut guard = ring
                .readable_mut()
                .await
                .map_err(Error::io("reading events"))?;
            guard.clear_ready();
            Ok(Batch::Ring)
        }
        Events::Daemon(session) => Ok(Batch::Record(session.next_record().await)),
    }
}

fn in_terminal_foreground() -> bool {
    let stdin = std::io::stdin();
    match nix::unistd::tcgetpgrp(&stdin) {
        Ok(foreground) => foreground == nix::unistd::getpgrp(),
        Err(_) => false,
    }
}

/// Turns records into report entries as they arrive.
struct RunState<'a> {
    table: ProcessTable,
    rules: &'a RuleSet,
    clock: Clock,
    quiet: bool,
    events: Vec<EventRecord>,
    /// (socket cookie, sequence) of TCP segments already reported, so
    /// retransmits of one query are counted once.
    seen_segments: HashSet<(u64, u32)>,
    ended_sockets: HashSet<u64>,
    /// Query type names seen, with their codes (to match the kernel's counts).
    qtype_codes: std::collections::HashMap<String, u16>,
    /// Events past `MAX_STORED_EVENTS`, counted only.
    omitted: u64,
}

impl<'a> RunState<'a> {
    fn new(root: u32, rules: &'a RuleSet, quiet: bool) -> RunState<'a> {
        RunState {
            table: ProcessTable::new(root),
            rules,
            clock: Clock::new(),
            quiet,
            events: Vec::new(),
            seen_segments: HashSet::new(),
            ended_sockets: HashSet::new(),
            qtype_codes: std::collections::HashMap::new(),
            omitted: 0,
        }
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            let record = decode(&item);
            drop(item);
            self.on_record(record);
        }
    }

    /// One raw record, as the daemon forwards them.
    fn feed(&mut self, bytes: &[u8]) {
        self.on_record(decode(bytes));
    }

    fn on_record(&mut self, record: Option<Record>) {
        match record {
            Some(Record::Dns(query)) => self.on_query(query),
            Some(Record::Exec {
                tid, path, args, ..
            }) => self.table.on_exec(tid, path, args),
            Some(Record::ExecResult { pid, tid, ret }) => self.table.on_exec_result(pid, tid, ret),
            Some(Record::Fork {
                parent,
                child,
                comm,
            }) => self.table.on_fork(parent, child, comm),
            None => tracing::warn!("undecodable event record"),
        }
    }

    fn on_query(&mut self, query: DnsQuery) {
        let mut ended = None;
        if query.verdict.dropped() && self.ended_sockets.insert(query.socket_cookie) {
            let protocol = match query.transport {
                Transport::Tcp => sockdiag::Protocol::Tcp,
                Transport::Udp => sockdiag::Protocol::Udp,
            };
            let result =
                sockdiag::destroy(protocol, query.source, query.resolver, query.socket_cookie);
            if let Err(e) = &result {
                tracing::debug!(error = %e, transport = %query.transport, "could not end the blocked query's socket");
            }
            ended = Some(result.is_ok());
        }
        if query.transport == Transport::Tcp
            && !self
                .seen_segments
                .insert((query.socket_cookie, query.tcp_seq))
        {
            return;
        }
        if self.events.len() >= MAX_STORED_EVENTS {
            self.omitted += 1;
            return;
        }
        self.check_against_userspace(&query);
        let mut record =
            EventRecord::new(&query, self.table.chain(query.pid), self.rules, &self.clock);
        record.socket_ended = ended;
        self.qtype_codes
            .insert(record.query_type.clone(), query.qtype);
        if !self.quiet && query.verdict != Verdict::Allowed {
            eprintln!("{}", record.line());
        }
        self.events.push(record);
    }

    /// The kernel matches by 64-bit hash; confirm the rule really matches
    /// the name, so a collision could never be reported as a true match.
    fn check_against_userspace(&self, query: &DnsQuery) {
        if !matches!(query.verdict, Verdict::Blocked | Verdict::Audited) {
            return;
        }
        let expected = self
            .rules
            .decide(&query.name)
            .map(|(rule, _)| rule.pattern.to_string());
        let reported = query
            .rule_id
            .and_then(|id| self.rules.rule(id))
            .map(|r| r.pattern.to_string());
        if expected != reported {
            tracing::error!(name = %query.name, ?expected, ?reported, "kernel and userspace disagree on the matching rule");
        }
    }
}

fn write_text(path: &std::path::Path, text: &str, append: bool) -> io::Result<()> {
    let mut file = if append {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?
    } else {
        File::create(path)?
    };
    file.write_all(text.as_bytes())
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
