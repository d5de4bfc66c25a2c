//! What a run tells its user: a line per event as it happens, a summary on
//! stderr when the command exits, and the JSON report (`--report`).
pub mod chains;
pub mod evidence;
pub mod hosts;
pub mod inventory;
pub mod render;

use std::time::{Duration, SystemTime};

use guard_common::event::Verdict;
use serde::{Deserialize, Serialize};

use self::chains::ChainLink;
use crate::{
    kernel::records::{reason_text, Direction, DnsQuery, Transport},
    policy::{Mode, Rule, RuleSet},
};

pub const SCHEMA: &str = "guard.report/2";
/// Reports of this older schema are still read (`guard report`).
pub const SCHEMA_V1: &str = "guard.report/1";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RuleRef {
    pub kind: String,
    pub pattern: String,
    pub policy: String,
    pub origin: String,
}

impl RuleRef {
    pub fn new(rule: &Rule) -> RuleRef {
        RuleRef {
            kind: rule.kind.to_string(),
            pattern: rule.pattern.to_string(),
            policy: rule.policy.clone(),
            origin: rule.origin.to_string(),
        }
    }
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} (policy {}, {})",
            self.kind, self.pattern, self.policy, self.origin
        )
    }
}

/// One reported query or answer, with attribution.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventRecord {
    pub time: String,
    pub verdict: String,
    /// `query` (the question was decided) or `answer` (the names an answer
    /// would have the client use were decided).
    #[serde(default = "query_direction")]
    pub direction: Direction,
    /// The question's name.
    pub name: String,
    pub query_type: String,
    /// Answers: the refused name the answer led to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched_name: Option<String>,
    /// Answers: the type of the record that carried it (CNAME, SRV, A, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_type: Option<String>,
    /// Answers: the names from the question to the refused one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alias_chain: Vec<String>,
    /// Unreadable messages: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub transport: Transport,
    pub resolver: String,
    pub source: String,
    pub pid: u32,
    pub comm: String,
    pub process_chain: Vec<ChainLink>,
    pub rule: Option<RuleRef>,
    /// For blocked queries: whether the sending socket was ended at once
    /// (so the client failed fast instead of waiting for a timeout).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_ended: Option<bool>,
}

fn query_direction() -> Direction {
    Direction::Query
}

pub fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Blocked => "blocked",
        Verdict::Audited => "audited",
        Verdict::UnreadableBlocked => "unreadable-blocked",
        Verdict::UnreadableAudited => "unreadable-audited",
        Verdict::Allowed => "allowed",
    }
}

impl EventRecord {
    pub fn new(
        query: &DnsQuery,
        chain: Vec<ChainLink>,
        rules: &RuleSet,
        clock: &Clock,
    ) -> EventRecord {
        EventRecord {
            time: clock.format(query.boot_ns),
            verdict: verdict_name(query.verdict).to_owned(),
            direction: query.direction,
            name: query.name.clone(),
            query_type: query.qtype_name(),
            matched_name: query.matched.as_ref().map(|m| m.name.clone()),
            record_type: query.matched.as_ref().map(|m| m.record_type.clone()),
            alias_chain: query.alias_chain.clone(),
            reason: query.reason.map(|r| reason_text(r).to_owned()),
            transport: query.transport,
            resolver: query.resolver.to_string(),
            source: query.source.to_string(),
            pid: query.pid,
            comm: query.comm.clone(),
            process_chain: chain,
            rule: query
                .rule_id
                .and_then(|id| rules.rule(id))
                .map(RuleRef::new),
            socket_ended: None,
        }
    }

    pub fn chain_text(&self) -> String {
        if self.process_chain.is_empty() {
            return format!("{} [{}]", self.comm, self.pid);
        }
        self.process_chain
            .iter()
            .map(ChainLink::short)
            .collect::<Vec<_>>()
            .join(" → ")
    }

    /// The live line printed when the event arrives.
    pub fn line(&self) -> String {
        let answer = self.direction == Direction::Answer;
        let what = match (self.verdict.as_str(), answer) {
            ("blocked", false) => "blocked",
            ("blocked", true) => "blocked an answer to",
            ("audited", false) => "would block",
            ("audited", true) => "would block an answer to",
            ("unreadable-blocked", false) => "blocked unreadable DNS query",
            ("unreadable-blocked", true) => "blocked unreadable DNS answer",
            (_, false) => "unreadable DNS query (let through)",
            (_, true) => "unreadable DNS answer (let through)",
        };
        let mut name = if self.name.is_empty() {
            String::new()
        } else {
            format!(" {} {}", self.query_type, self.name)
        };
        if !self.alias_chain.is_empty() {
            let mut via = format!(" ({}", self.alias_chain.join(" → "));
            if let Some(record_type) = &self.record_type {
                via.push_str(&format!(", {record_type}"));
            }
            via.push(')');
            name.push_str(&via);
        }
        if let Some(reason) = &self.reason {
            name.push_str(&format!(" ({reason})"));
        }
        let rule = self
            .rule
            .as_ref()
            .map(|r| format!(" [{} {}]", r.kind, r.pattern))
            .unwrap_or_default();
        format!(
            "guard: {what}{name} via {}/{} from {}{rule}",
            self.transport,
            self.resolver,
            self.chain_text()
        )
    }
}

#[cfg(test)]
impl EventRecord {
    /// A query event for tests: a blocked (or other) query of `name` by
    /// pid 1, over UDP to a loopback resolver, with no chain and no rule.
    pub fn for_test(name: &str, verdict: &str, query_type: &str) -> EventRecord {
        EventRecord {
            time: "2026-11-22T02:00:00.000Z".into(),
            verdict: verdict.into(),
            direction: Direction::Query,
            name: name.into(),
            query_type: query_type.into(),
            matched_name: None,
            record_type: None,
            alias_chain: Vec::new(),
            reason: None,
            transport: Transport::Udp,
            resolver: "127.0.0.1:53".into(),
            source: "127.0.0.1:4000".into(),
            pid: 1,
            comm: "x".into(),
            process_chain: Vec::new(),
            rule: None,
            socket_ended: None,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Queries whose question was read.
    pub inspected: u64,
    /// Answers that were read.
    #[serde(default)]
    pub answers_inspected: u64,
    /// Queries and answers refused by a deny rule.
    pub blocked: u64,
    /// Queries and answers a deny rule matched in audit mode.
    pub audited: u64,
    /// Queries and answers that could not be read with certainty (refused
    /// in enforce mode).
    #[serde(alias = "malformed")]
    pub unreadable: u64,
    /// DNS packets of a cgroup with no binding (refused).
    pub unbound: u64,
}

impl Counters {
    /// The report's view of a policy's kernel counters.
    pub fn from_kernel(counters: &guard_common::maps::PolicyCounters) -> Counters {
        Counters::read(|c| counters.values[c as usize])
    }

    /// The counters, each read by `get`.
    pub fn read(get: impl Fn(guard_common::maps::Counter) -> u64) -> Counters {
        use guard_common::maps::Counter;
        Counters {
            inspected: get(Counter::Inspected),
            answers_inspected: get(Counter::AnswersInspected),
            blocked: get(Counter::Blocked),
            audited: get(Counter::Audited),
            unreadable: get(Counter::Unreadable),
            unbound: get(Counter::Unbound),
        }
    }

    pub fn add(&mut self, other: &Counters) {
        self.inspected += other.inspected;
        self.answers_inspected += other.answers_inspected;
        self.blocked += other.blocked;
        self.audited += other.audited;
        self.unreadable += other.unreadable;
        self.unbound += other.unbound;
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PolicyRef {
    pub name: String,
    pub source: Option<String>,
    pub mode: Mode,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CommandExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub guard_version: String,
    pub command: Vec<String>,
    pub command_exit: CommandExit,
    pub exit_code: i32,
    pub mode: Mode,
    /// `--fail-on-block`: audit-mode reports also fail the job.
    #[serde(default)]
    pub fail_on_block: bool,
    pub policies: Vec<PolicyRef>,
    pub started_at: String,
    pub duration_ms: u64,
    pub cgroup: String,
    pub events: Vec<EventRecord>,
    pub events_lost: u64,
    /// Events that reached guard after it had stored its maximum; counted,
    /// not listed (the counters stay exact).
    #[serde(default)]
    pub events_omitted: u64,
    pub counters: Counters,
    /// The kernel's accounting of the DNS egress program (every packet the
    /// cgroup sent), present when `kernel.bpf_stats_enabled` was 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program_stats: Option<ProgramStats>,
    /// Ways around the DNS hooks the run took or tried: escapes from its
    /// cgroup, packet and raw sockets, changes to guard's programs, and the
    /// resolver-daemon connections refused.
    #[serde(default)]
    pub evidence: Vec<evidence::EvidenceEntry>,
    /// Evidence the kernel counted whose record never arrived (the ring
    /// buffer was full); it fails the run like the evidence itself.
    #[serde(default)]
    pub evidence_lost: u64,
    /// Hosts-file entries for denied names (lookups that bypass DNS).
    #[serde(default)]
    pub hosts_entries: Vec<hosts::HostsEntry>,
    /// `active`, or why connections to local resolver daemons (nscd,
    /// systemd-resolved) are not refused on this host.
    #[serde(default)]
    pub resolver_socket_hooks: String,
    /// Set when the run did not end the ordinary way: the guard was removed
    /// under it, or the daemon hosting it went away before reporting its
    /// end (see the README's exit statuses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<RunFault>,
}

/// How a run hosted by the daemon ended without the daemon.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct RunFault {
    /// `guard-removed`, `daemon-gone` or `counters-unavailable`.
    pub kind: String,
    /// What happened, in a sentence.
    pub detail: String,
}

#[derive(Debug, Serialize, Deserialize, Clone, Copy)]
pub struct ProgramStats {
    pub runs: u64,
    pub run_time_ns: u64,
    pub average_ns: f64,
}

impl ProgramStats {
    pub fn new(runs: u64, run_time_ns: u64) -> ProgramStats {
        ProgramStats {
            runs,
            run_time_ns,
            average_ns: if runs == 0 {
                0.0
            } else {
                run_time_ns as f64 / runs as f64
            },
        }
    }
}

impl Report {
    /// Reads a saved report; reports of schema 1 (before answers were
    /// read) are read too.
    pub fn load(path: &std::path::Path) -> Result<Report, String> {
        load_versioned(path, "guard report", SCHEMA, |r: &Report| &r.schema).or_else(|error| {
            load_versioned(path, "guard report", SCHEMA_V1, |r: &Report| &r.schema)
                .map_err(|_| error)
        })
    }
}

/// Reads a JSON document guard wrote (a report, a record), refusing one of
/// another schema version rather than misreading it.
pub fn load_versioned<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    what: &str,
    expected: &str,
    schema: impl Fn(&T) -> &str,
) -> Result<T, String> {
    let text = crate::input::read_text(path).map_err(|e| e.to_string())?;
    let document: T = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a {what}: {e}", path.display()))?;
    let found = schema(&document);
    if found != expected {
        return Err(format!(
            "{}: schema {found:?}, this guard reads {expected:?}",
            path.display()
        ));
    }
    Ok(document)
}

/// Converts the kernel's boot-time stamps to wall-clock time.
pub struct Clock {
    wall_at_boot: SystemTime,
}

impl Clock {
    pub fn new() -> Clock {
        let boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .map(|t| Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
            .unwrap_or_default();
        Clock {
            wall_at_boot: SystemTime::now() - boot,
        }
    }

    pub fn format(&self, boot_ns: u64) -> String {
        humantime::format_rfc3339_millis(self.wall_at_boot + Duration::from_nanos(boot_ns))
            .to_string()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
