//! What the kernel reports, as the daemon sees it: the process table built
//! from exec and fork records, one structured log record per blocked (or
//! audited) lookup, the recent events and the `guard events` subscribers.
//!
//! Owns: the process table, the recent events and the subscribers. Reads
//! policy ids to name bindings; ends the socket of a lookup blocked in a
//! bound cgroup (runs' clients end their own).
use std::collections::VecDeque;

use tokio::sync::mpsc;

use super::policies::PolicyIds;
use crate::{
    api::{Frame, Reply},
    kernel::{
        evidence::{kill_task, Evidence},
        records::{decode, DnsQuery, Record},
        sockdiag,
    },
    policy::Mode,
    report::{chains::ProcessTable, evidence::EvidencePolicy, Clock, EventRecord},
};

/// Events kept for `guard events` without `--follow`.
const RECENT_EVENTS: usize = 1000;
/// Processes remembered before the table starts afresh: a long-lived daemon
/// must not remember every process it ever saw; chains of older processes
/// come from /proc.
const MAX_PROCESSES: usize = 60_000;

pub(super) struct Records {
    procs: ProcessTable,
    clock: Clock,
    recent: VecDeque<serde_json::Value>,
    subscribers: Vec<mpsc::Sender<Frame>>,
}

impl Records {
    pub fn new() -> Records {
        Records {
            procs: ProcessTable::new(0),
            clock: Clock::new(),
            recent: VecDeque::new(),
            subscribers: Vec::new(),
        }
    }

    /// Takes in one raw record. `guarded(pid)` says whether a process the
    /// kernel programs never reported may be looked up in /proc for a chain.
    /// `guarded_path(policy id)`: the bound cgroup's path in the hierarchy,
    /// to tell a move within it from an escape.
    pub fn observe(
        &mut self,
        bytes: &[u8],
        policies: &PolicyIds,
        guarded: impl Fn(u32) -> bool,
        guarded_path: impl Fn(u32) -> Option<String>,
    ) {
        match decode(bytes) {
            Some(Record::Exec {
                tid, path, args, ..
            }) => self.procs.on_exec(tid, path, args),
            Some(Record::ExecResult { pid, tid, ret }) => self.procs.on_exec_result(pid, tid, ret),
            Some(Record::Fork {
                parent,
                child,
                comm,
            }) => {
                if self.procs.len() >= MAX_PROCESSES {
                    self.procs = ProcessTable::new(0);
                }
                self.procs.on_fork(parent, child, comm)
            }
            Some(Record::Dns(query)) => self.on_query(&query, policies, guarded),
            Some(Record::Evidence(evidence)) => {
                let path = guarded_path(evidence.policy_id);
                self.on_evidence(&evidence, policies, guarded, path)
            }
            None => tracing::warn!("undecodable event record"),
        }
    }

    /// Sends the recent events to a new subscriber, then (with `follow`)
    /// every new one.
    pub fn subscribe(&mut self, follow: bool, sink: mpsc::Sender<Frame>) {
        for event in &self.recent {
            let _ = sink.try_send(Frame::json(&Reply::Event(Box::new(event.clone()))));
        }
        let _ = sink.try_send(Frame::json(&Reply::Backlog));
        if follow {
            self.subscribers.push(sink);
        }
    }

    pub fn forget_closed_subscribers(&mut self) {
        self.subscribers.retain(|s| !s.is_closed());
    }

    /// Logs evidence (escapes, sockets, tampering) and passes it to `guard
    /// events`. In a bound cgroup in enforce mode, a task moved out by
    /// another process is killed here (a run's client does it for a run).
    fn on_evidence(
        &mut self,
        evidence: &Evidence,
        policies: &PolicyIds,
        guarded: impl Fn(u32) -> bool,
        guarded_path: Option<String>,
    ) {
        let info = policies.get(evidence.policy_id);
        let decide = EvidencePolicy {
            enforce: info.is_none_or(|i| i.mode == Mode::Enforce),
            allow_raw_sockets: info
                .and_then(|i| i.rules.as_ref())
                .is_some_and(|r| r.allow_raw_sockets()),
            guarded_path,
            own_executable: std::env::current_exe().ok(),
        };
        let chain = self.procs.chain_within(evidence.subject, guarded);
        let Some(mut entry) = decide.entry(evidence, chain, &self.clock) else {
            return;
        };
        let (kind, label, target) = info.map_or(("unknown", "", ""), |i| {
            (i.kind, i.label.as_str(), i.target.as_str())
        });
        if kind != "run" && entry.escaped_alive() && kill_task(evidence.subject) {
            entry.action = "killed".into();
        }
        if entry.verdict != "noted" {
            tracing::warn!(
                target: "guard::evidence",
                kind = %entry.kind,
                detail = %entry.detail,
                action = %entry.action,
                verdict = %entry.verdict,
                binding = kind,
                policy = label,
                guarded = target,
                pid = entry.pid,
                chain = %entry.line(),
                "a way around the DNS guard"
            );
        }
        let mut value = serde_json::to_value(&entry).unwrap_or_default();
        if let Some(object) = value.as_object_mut() {
            object.insert("evidence".into(), true.into());
            object.insert("binding".into(), kind.into());
            object.insert("policy".into(), label.into());
            object.insert("guarded".into(), target.into());
        }
        self.publish(value);
    }

    fn publish(&mut self, value: serde_json::Value) {
        if self.recent.len() >= RECENT_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back(value.clone());
        if !self.subscribers.is_empty() {
            let frame = Frame::json(&Reply::Event(Box::new(value)));
            self.subscribers.retain(|sink| {
                // A subscriber that cannot keep up misses events; a closed
                // one is forgotten.
                !matches!(
                    sink.try_send(frame.clone()),
                    Err(mpsc::error::TrySendError::Closed(_))
                )
            });
        }
    }

    /// Logs a reported query (one structured record per blocked call) and
    /// passes it to `guard events`.
    fn on_query(&mut self, query: &DnsQuery, policies: &PolicyIds, guarded: impl Fn(u32) -> bool) {
        let info = policies.get(query.policy_id);
        // A `guard run` client ends its own blocked sockets; for bound
        // cgroups the daemon does, so the asker fails at once instead of
        // waiting for its timeout.
        if query.verdict.dropped() && info.is_some_and(|i| i.kind != "run") {
            if let Err(e) = sockdiag::end_socket_of(query) {
                tracing::debug!(error = %e, "could not end a blocked query's socket");
            }
        }
        let rules = info
            .and_then(|i| i.rules.as_deref())
            .unwrap_or(policies.empty_rules());
        let chain = self.procs.chain_within(query.pid, guarded);
        let record = EventRecord::new(query, chain, rules, &self.clock);
        let (kind, label, target) = info.map_or(("unknown", "", ""), |i| {
            (i.kind, i.label.as_str(), i.target.as_str())
        });
        log(&record, kind, label, target);
        let mut value = serde_json::to_value(&record).unwrap_or_default();
        if let Some(object) = value.as_object_mut() {
            object.insert("binding".into(), kind.into());
            object.insert("policy".into(), label.into());
            object.insert("guarded".into(), target.into());
        }
        self.publish(value);
    }
}

/// One structured log record per blocked (warn) or audited (info) lookup.
/// Two calls because tracing fixes the level per call site.
fn log(record: &EventRecord, kind: &str, label: &str, target: &str) {
    let rule = record.rule.as_ref().map(|r| r.to_string());
    let chain = record.chain_text();
    match record.verdict.as_str() {
        "allowed" => {}
        "blocked" | "unreadable-blocked" => tracing::warn!(
            target: "guard::blocked",
            verdict = %record.verdict,
            name = %record.name,
            query_type = %record.query_type,
            binding = kind,
            policy = label,
            guarded = target,
            rule = rule.as_deref().unwrap_or("-"),
            pid = record.pid,
            chain = %chain,
            "DNS lookup blocked"
        ),
        _ => tracing::info!(
            target: "guard::audited",
            verdict = %record.verdict,
            name = %record.name,
            query_type = %record.query_type,
            binding = kind,
            policy = label,
            guarded = target,
            rule = rule.as_deref().unwrap_or("-"),
            pid = record.pid,
            chain = %chain,
            "DNS lookup would have been blocked"
        ),
    }
}
