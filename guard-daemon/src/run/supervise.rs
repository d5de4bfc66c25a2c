//! The command under guard: started inside the cgroup, signals forwarded,
//! records turned into report entries as they arrive.
use std::{
    collections::HashSet,
    os::{fd::AsFd as _, unix::process::ExitStatusExt as _},
    process::ExitStatus,
    time::{Instant, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use guard_common::event::Verdict;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

use super::{
    conclude::conclude,
    outputs::Outputs,
    setup_failed,
    spawn::{self, PLACEMENT_FAILED},
    spawn_error_code,
    standalone::{Enforcement, Standalone},
    RunOptions, EXIT_SETUP_FAILED, MAX_STORED_EVENTS,
};
use crate::{
    api::{client, RunTotals},
    error::{Error, Result},
    kernel::{
        cgroup::RunCgroup,
        evidence::{hierarchy_path, kill_task, Evidence},
        records::{decode, DnsQuery, Record},
        sockdiag,
    },
    policy::{Policy, RuleSet},
    report::{
        chains::ProcessTable,
        evidence::{self as evidence_report, EvidenceEntry, EvidencePolicy},
        hosts::HostsEntry,
        Clock, EventRecord, RunFault,
    },
};

/// How often a standalone run checks that its programs are still attached
/// (a detach is also seen at the end: it is permanent).
const ATTACHMENT_CHECK: std::time::Duration = std::time::Duration::from_millis(200);

/// Where the run's enforcement lives.
pub(super) enum Backend {
    Standalone(Box<Standalone>),
    Daemon(Box<client::RunSession>),
}

/// Where the run's events come from while the command runs.
pub(super) enum Events {
    Ring(AsyncFd<RingBuf<MapData>>),
    Daemon(client::RunSession),
}

pub(super) async fn supervise(
    options: RunOptions,
    policies: Vec<Policy>,
    rules: RuleSet,
    hosts: Vec<HostsEntry>,
    outputs: Outputs,
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
            let procs = match crate::kernel::cgroup::procs_for_writing(&path) {
                Ok(procs) => procs,
                Err(error) => {
                    // Ending the session makes the daemon remove the cgroup.
                    drop(session);
                    return setup_failed(&options, &error);
                }
            };
            (path, procs, None, Events::Daemon(*session))
        }
    };

    let (program, args) = options
        .command
        .split_first()
        .expect("run() checked the command is not empty");
    let dir = match crate::kernel::cgroup::open_dir(&path) {
        Ok(dir) => dir,
        Err(e) => {
            drop(events);
            drop(standalone);
            return setup_failed(&options, &e);
        }
    };
    let target = spawn::Target {
        dir: dir.as_fd(),
        procs: procs.as_fd(),
    };
    let mut child = match spawn::spawn(target, program, args) {
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
    drop(dir);
    let child_pid = child.id();

    let mut state = RunState::new(child_pid, &rules, options.quiet);
    state.hosts = hosts;
    state.outputs = outputs;
    state.evidence_policy = EvidencePolicy {
        enforce: super::evidence_enforced(&options, &rules),
        allow_raw_sockets: options.allow_raw_sockets || rules.allow_raw_sockets(),
        guarded_path: hierarchy_path(&path),
        own_executable: std::env::current_exe().ok(),
    };
    let enforcement = standalone.as_ref().map(|(enforcement, _, _)| enforcement);
    let status =
        match wait_forwarding_signals(&mut child, &mut events, &mut state, enforcement).await {
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
    let (totals, finished) = match (events, standalone) {
        (Events::Ring(mut ring), Some((mut enforcement, reaper, hierarchy))) => {
            state.on_detached(enforcement.detached());
            let t = Instant::now();
            if let Err(e) = enforcement.remove_cgroup() {
                eprintln!("guard: {e}");
            }
            tracing::debug!(elapsed = ?t.elapsed(), "cgroup removed");
            state.drain(ring.get_mut());
            let totals = enforcement.totals(options.records_names());
            drop(reaper);
            drop(hierarchy);
            (totals, Some((enforcement, ring)))
        }
        (Events::Daemon(session), _) => match session.finish(|bytes| state.feed(bytes)).await {
            client::Ending::Totals(totals) => (totals, None),
            client::Ending::WithoutDaemon {
                counted,
                guard_removed,
                reason,
            } => (state.without_daemon(counted, guard_removed, &reason), None),
        },
        (Events::Ring(_), None) => unreachable!("a ring comes with standalone enforcement"),
    };
    let code = conclude(
        &options, &policies, state, status, totals, &path, started, started_at,
    );
    // The report is out; detaching the programs (slow in the kernel, and
    // they guard nothing now the cgroup is gone) happens after guard exits.
    if let Some(programs) = finished {
        super::teardown::release_after_exit(programs);
    }
    code
}

async fn wait_forwarding_signals(
    child: &mut spawn::Spawned,
    events: &mut Events,
    state: &mut RunState<'_>,
    enforcement: Option<&Enforcement>,
) -> Result<ExitStatus> {
    let mut attachment_check = tokio::time::interval(ATTACHMENT_CHECK);
    let listen = |kind: SignalKind| signal(kind).map_err(Error::io("installing signal handlers"));
    let mut interrupt = listen(SignalKind::interrupt())?;
    let mut terminate = listen(SignalKind::terminate())?;
    let mut hangup = listen(SignalKind::hangup())?;
    let mut quit = listen(SignalKind::quit())?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let forward = |signal: nix::sys::signal::Signal| {
        let _ = nix::sys::signal::kill(pid, signal);
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
            _ = attachment_check.tick(), if enforcement.is_some() => {
                if let Some(enforcement) = enforcement {
                    let missing = enforcement.detached();
                    if !missing.is_empty() && state.on_detached(missing) {
                        // Fail closed: nothing goes on unguarded.
                        eprintln!("guard: guard's programs were detached from the run's cgroup; ending the run");
                        enforcement.kill_processes();
                    }
                }
            }
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
pub(super) struct RunState<'a> {
    pub(super) table: ProcessTable,
    pub(super) rules: &'a RuleSet,
    pub(super) clock: Clock,
    pub(super) quiet: bool,
    pub(super) events: Vec<EventRecord>,
    /// (socket cookie, sequence) of TCP segments already reported, so
    /// retransmits of one query are counted once.
    pub(super) ended_sockets: HashSet<u64>,
    /// Query type names seen, with their codes (to match the kernel's counts).
    pub(super) qtype_codes: std::collections::HashMap<String, u16>,
    /// Events past `MAX_STORED_EVENTS`, counted only.
    pub(super) omitted: u64,
    /// Ways around the DNS hooks, as report entries.
    pub(super) evidence: Vec<EvidenceEntry>,
    /// Evidence records received, by kind (to find lost ones).
    pub(super) evidence_received: [u64; guard_common::evidence::EVIDENCE_SLOTS],
    pub(super) evidence_policy: EvidencePolicy,
    /// Hosts-file entries for denied names, found at the start.
    pub(super) hosts: Vec<HostsEntry>,
    /// The output files, opened before the command started.
    pub(super) outputs: Outputs,
    /// Records of blocked, audited or unreadable messages received (each
    /// such message is one record), to count those that never arrived.
    pub(super) reports_received: u64,
    /// Set when the run ended without its daemon (see [`RunFault`]).
    pub(super) fault: Option<RunFault>,
}

impl<'a> RunState<'a> {
    pub(super) fn new(root: u32, rules: &'a RuleSet, quiet: bool) -> RunState<'a> {
        RunState {
            table: ProcessTable::new(root),
            rules,
            clock: Clock::new(),
            quiet,
            events: Vec::new(),
            ended_sockets: HashSet::new(),
            qtype_codes: std::collections::HashMap::new(),
            omitted: 0,
            evidence: Vec::new(),
            evidence_received: [0; guard_common::evidence::EVIDENCE_SLOTS],
            evidence_policy: EvidencePolicy {
                enforce: true,
                allow_raw_sockets: false,
                guarded_path: None,
                own_executable: None,
            },
            hosts: Vec::new(),
            outputs: Outputs::default(),
            reports_received: 0,
            fault: None,
        }
    }

    /// The totals of a run ended without its daemon: the kernel's counters
    /// read from the pinned maps when they could be (exact; the records the
    /// daemon never passed on count as lost), else only what the records
    /// received show. Notes the fault for the report and the exit status.
    pub(super) fn without_daemon(
        &mut self,
        counted: Option<RunTotals>,
        guard_removed: bool,
        reason: &str,
    ) -> RunTotals {
        eprintln!("guard: {reason}; the run was ended without the daemon");
        let (kind, detail, totals) = match (guard_removed, counted) {
            (true, counted) => (
                "guard-removed",
                "the guard was removed while the command ran (guard daemon --uninstall, or a new generation that could not carry the run over); the command was ended",
                counted.unwrap_or_else(|| self.totals_from_records()),
            ),
            (false, Some(counted)) => (
                "daemon-gone",
                "the guard daemon went away and did not finish the run; its counters were read from the kernel",
                counted,
            ),
            (false, None) => (
                "counters-unavailable",
                "the guard daemon went away and the run's counters could not be read; only the records received are counted",
                self.totals_from_records(),
            ),
        };
        eprintln!("guard: {detail}");
        let mut totals = totals;
        let reported =
            totals.counters.blocked + totals.counters.audited + totals.counters.unreadable;
        totals.events_lost = totals
            .events_lost
            .max(reported.saturating_sub(self.reports_received));
        if totals.resolver_socket_hooks.is_empty() {
            totals.resolver_socket_hooks =
                "unknown: the guard daemon did not report the end of the run".into();
        }
        self.fault = Some(RunFault {
            kind: kind.into(),
            detail: format!("{reason}: {detail}"),
        });
        totals
    }

    /// Counters from the records received alone (a lower bound).
    fn totals_from_records(&self) -> RunTotals {
        let count = |verdicts: &[&str]| {
            self.events
                .iter()
                .filter(|e| verdicts.contains(&e.verdict.as_str()))
                .count() as u64
        };
        let mut totals = RunTotals::default();
        totals.counters.blocked = count(&["blocked"]);
        totals.counters.audited = count(&["audited"]);
        totals.counters.unreadable = count(&["unreadable-blocked", "unreadable-audited"]);
        totals.evidence = self.evidence_received.to_vec();
        totals
    }

    fn on_evidence(&mut self, evidence: Evidence) {
        if let Some(slot) = self.evidence_received.get_mut(evidence.kind as usize) {
            *slot += 1;
        }
        let chain = self.table.chain(evidence.subject);
        let Some(mut entry) = self.evidence_policy.entry(&evidence, chain, &self.clock) else {
            return;
        };
        if entry.escaped_alive() && kill_task(evidence.subject) {
            entry.action = "killed".into();
        }
        if !self.quiet && entry.verdict != "noted" {
            eprintln!("{}", entry.line());
        }
        evidence_report::add(&mut self.evidence, entry);
    }

    /// Records guard's programs found detached; true the first time.
    pub(super) fn on_detached(&mut self, missing: Vec<String>) -> bool {
        let first = !self.evidence.iter().any(|e| e.kind == "detached");
        for detail in missing {
            if self.evidence.iter().any(|e| e.detail == detail) {
                continue;
            }
            let entry = EvidenceEntry::detached(
                detail,
                self.evidence_policy.enforce,
                humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            );
            eprintln!("{}", entry.line());
            self.evidence.push(entry);
        }
        first && self.evidence.iter().any(|e| e.kind == "detached")
    }

    pub(super) fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            let record = decode(&item);
            drop(item);
            self.on_record(record);
        }
    }

    /// One raw record, as the daemon forwards them.
    pub(super) fn feed(&mut self, bytes: &[u8]) {
        self.on_record(decode(bytes));
    }

    fn on_record(&mut self, record: Option<Record>) {
        match record {
            Some(Record::Dns(query)) => self.on_query(*query),
            Some(Record::Exec {
                tid, path, args, ..
            }) => self.table.on_exec(tid, path, args),
            Some(Record::ExecResult { pid, tid, ret }) => self.table.on_exec_result(pid, tid, ret),
            Some(Record::Fork {
                parent,
                child,
                comm,
            }) => self.table.on_fork(parent, child, comm),
            Some(Record::Evidence(evidence)) => self.on_evidence(evidence),
            None => tracing::warn!("undecodable event record"),
        }
    }

    fn on_query(&mut self, query: DnsQuery) {
        let mut ended = None;
        if query.verdict.dropped() && self.ended_sockets.insert(query.socket_cookie) {
            let result = sockdiag::end_socket_of(&query);
            if let Err(e) = &result {
                tracing::debug!(error = %e, transport = %query.transport, "could not end the blocked query's socket");
            }
            ended = Some(result.is_ok());
        }
        if query.verdict != Verdict::Allowed {
            self.reports_received += 1;
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
            .decide_labels(query.decided_labels())
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
