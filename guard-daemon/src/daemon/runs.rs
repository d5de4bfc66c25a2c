//! Runs hosted for `guard run` clients.
//!
//! Owns: each run's cgroup, client, connection and the records queued for
//! it. A run starts with its own cgroup under the runs cgroup (already
//! attached), its rules under a fresh policy id and its binding; it ends
//! when its client says `finish` or goes away: what is left in the cgroup is
//! killed, the last records and the totals are sent, and cgroup, binding,
//! rules and counters are removed. After a restart, runs found in the runs
//! cgroup wait for their client to resume.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    fs,
    hash::BuildHasher as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use guard_common::{evidence::EvidenceSettings, maps::Binding};
use tokio::sync::mpsc;

use super::{
    policies::{PolicyIds, PolicyInfo},
    tree::CgroupTree,
};
use crate::{
    api::{Frame, Reply, RunRequest, RunTotals},
    kernel::{
        self,
        cgroup::{remove_cgroup_tree, run_cgroup_name, run_owner, RunCgroup},
        evidence::EvidenceMaps as _,
        KernelMaps as _, Pinned,
    },
    policy::{compile, Mode, Policy, RuleSet},
    report::ProgramStats,
};

/// Records buffered for a run whose client is away (daemon restarted and
/// the client has not resumed yet); beyond this they are counted as lost.
const RUN_BACKLOG: usize = 65_536;

pub(super) struct RunSession {
    cgroup: PathBuf,
    cgroup_id: u64,
    client_pid: u32,
    /// The connection of the client; None after a restart until it resumes.
    sink: Option<(u64, mpsc::Sender<Frame>)>,
    backlog: VecDeque<Vec<u8>>,
    /// Records the client could not be sent (queue full, or backlog full).
    dropped: u64,
    stats_at_start: Option<(u64, u64)>,
    /// Its cgroup is being removed (off the daemon's task); the rest of the
    /// ending follows when that is done.
    ending: bool,
    /// Send the totals to the client once the run has ended.
    send_totals: bool,
    /// guard's programs found detached from the runs cgroup during the run.
    detached: Vec<String>,
}

impl RunSession {
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }
}

pub(super) enum RunRefusal {
    Incompatible(String),
    Error(String),
}

impl<E: std::fmt::Display> From<E> for RunRefusal {
    fn from(error: E) -> RunRefusal {
        RunRefusal::Error(error.to_string())
    }
}

/// The `guard run` asking for a run: its pid, its connection's token and
/// where its frames go.
pub(super) struct RunClient {
    pub pid: u32,
    pub token: u64,
    pub sink: mpsc::Sender<Frame>,
}

/// What a new run needs to know about the daemon it asks.
pub(super) struct Admission<'a> {
    pub dns_ports: &'a [u16],
    pub max_policies: u32,
    /// Bindings configured, which count against `max_policies`.
    pub bindings: usize,
    /// The cgroup of the client if it is already guarded.
    pub already_guarded: Option<PathBuf>,
}

#[derive(Default)]
pub(super) struct Runs {
    sessions: HashMap<u32, RunSession>,
}

impl Runs {
    /// Runs found after a restart, in the runs cgroup or wherever the
    /// bindings map says they are (an earlier `runs_cgroup`): kept, waiting
    /// for their client to resume, if the client lives; removed otherwise.
    pub fn adopt(
        &mut self,
        bound: &[(u64, Binding)],
        kernel: &mut Pinned,
        policies: &mut PolicyIds,
        tree: &CgroupTree,
    ) {
        let mut found: Vec<PathBuf> = fs::read_dir(&tree.runs_root)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        let here: HashSet<u64> = found
            .iter()
            .filter_map(|path| fs::metadata(path).ok().map(|m| m.ino()))
            .collect();
        let elsewhere: HashSet<u64> = bound
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !here.contains(id))
            .collect();
        found.extend(kernel::cgroup::find_by_ids(&tree.hierarchy.mount, &elsewhere).into_values());
        for path in found {
            let Some(pid) = run_owner(&path) else {
                continue;
            };
            let Ok(metadata) = fs::metadata(&path) else {
                continue;
            };
            let id = metadata.ino();
            let binding = bound
                .iter()
                .find(|(cgroup, _)| *cgroup == id)
                .map(|(_, b)| *b);
            match binding {
                Some(binding) if client_alive(pid) => {
                    tracing::info!(cgroup = %path.display(), client = pid, "adopted a run; waiting for its client to resume");
                    policies.adopt(
                        binding.policy_id,
                        PolicyInfo {
                            kind: "run",
                            label: "run".into(),
                            target: path.display().to_string(),
                            mode: if binding.audit_only != 0 {
                                Mode::Audit
                            } else {
                                Mode::Enforce
                            },
                            rules: None,
                        },
                    );
                    self.sessions.insert(
                        binding.policy_id,
                        RunSession {
                            cgroup: path,
                            cgroup_id: id,
                            client_pid: pid,
                            sink: None,
                            backlog: VecDeque::new(),
                            dropped: 0,
                            stats_at_start: None,
                            ending: false,
                            send_totals: false,
                            detached: Vec::new(),
                        },
                    );
                }
                _ => {
                    tracing::warn!(cgroup = %path.display(), "removing the cgroup of a run whose client is gone");
                    if let Err(e) = remove_cgroup_tree(&path) {
                        tracing::error!(error = %e, "removing a stale run");
                    }
                    let _ = kernel.unbind(id);
                }
            }
        }
    }

    pub fn start(
        &mut self,
        request: RunRequest,
        client: RunClient,
        admission: Admission<'_>,
        kernel: &mut Pinned,
        policies: &mut PolicyIds,
        tree: &CgroupTree,
    ) -> Result<(PathBuf, u32), RunRefusal> {
        let RunClient {
            pid: client_pid,
            token,
            sink,
        } = client;
        let object = kernel::object_fingerprint();
        if request.object != object {
            return Err(RunRefusal::Incompatible(format!(
                "the daemon runs another build of guard (programs {object}, yours {})",
                request.object
            )));
        }
        if request.dns_ports != admission.dns_ports {
            return Err(RunRefusal::Incompatible(format!(
                "the daemon inspects DNS ports {:?}, this run asks for {:?}",
                admission.dns_ports, request.dns_ports
            )));
        }
        // A guard run inside an already guarded cgroup must stay under that
        // guard too. Standalone, its cgroup nests inside and both programs
        // decide; moved to the daemon's runs cgroup it would escape.
        if let Some(cgroup) = admission.already_guarded {
            return Err(RunRefusal::Incompatible(format!(
                "guard run is already inside a guarded cgroup ({}), whose guard must keep applying",
                cgroup.display()
            )));
        }
        let (policy_list, rules) = compile_request(&request)?;
        let live = self.sessions.len() + admission.bindings;
        if live + 1 >= admission.max_policies as usize {
            return Err(RunRefusal::Error(format!(
                "the daemon already guards {live} runs and bindings (max_policies {})",
                admission.max_policies
            )));
        }
        let nonce =
            std::collections::hash_map::RandomState::new().hash_one((client_pid, Instant::now()));
        let path = tree.runs_root.join(run_cgroup_name(client_pid, nonce));
        let cgroup = RunCgroup::create(&path)?;
        crate::fault::point("run-cgroup-created");
        let rules = Arc::new(rules);
        let info = PolicyInfo {
            kind: "run",
            label: policy_label(&policy_list),
            target: format!("guard run (pid {client_pid})"),
            mode: if request.audit {
                Mode::Audit
            } else {
                Mode::Enforce
            },
            rules: Some(rules.clone()),
        };
        let policy_id = match policies.install(kernel, info) {
            Ok(id) => id,
            Err(e) => {
                let _ = cgroup.remove();
                return Err(e.into());
            }
        };
        crate::fault::point("run-rules-written");
        // As a standalone run decides it (see run::evidence_enforced).
        let enforce = !request.audit
            && (rules.rules().is_empty() || rules.rules().iter().any(|r| r.mode == Mode::Enforce));
        let settings = EvidenceSettings {
            enforce: u8::from(enforce),
            allow_raw_sockets: u8::from(request.allow_raw_sockets || rules.allow_raw_sockets()),
            _pad: [0; 6],
        };
        if let Err(e) = kernel.set_evidence_settings(policy_id, settings) {
            let _ = cgroup.remove();
            policies.discard(kernel, policy_id);
            return Err(e.into());
        }
        let bound = kernel.bind(
            cgroup.id(),
            Binding {
                policy_id,
                audit_only: u8::from(request.audit),
                record: u8::from(request.record),
                _pad: [0; 2],
                label_mask: rules.label_mask(),
            },
        );
        if let Err(e) = bound {
            let _ = cgroup.remove();
            policies.discard(kernel, policy_id);
            return Err(e.into());
        }
        self.sessions.insert(
            policy_id,
            RunSession {
                cgroup: path.clone(),
                cgroup_id: cgroup.id(),
                client_pid,
                sink: Some((token, sink)),
                backlog: VecDeque::new(),
                dropped: 0,
                stats_at_start: kernel.egress_stats(),
                ending: false,
                send_totals: false,
                detached: Vec::new(),
            },
        );
        tracing::debug!(cgroup = %path.display(), policy_id, client = client_pid, "run started");
        crate::fault::point("run-bound");
        Ok((path, policy_id))
    }

    /// A client reconnecting to its run (after a restart of the daemon).
    pub fn resume(
        &mut self,
        cgroup: &Path,
        run: &RunRequest,
        sink: (u64, mpsc::Sender<Frame>),
        policies: &mut PolicyIds,
        pin_dir: &Path,
    ) -> Reply {
        let Some((policy_id, session)) = self.sessions.iter_mut().find(|(_, s)| s.cgroup == cgroup)
        else {
            return Reply::Error {
                message: format!("no run in {}", cgroup.display()),
            };
        };
        // A run adopted after a restart: name its rules again (the same
        // build compiles the same request to the same rules).
        if let Some(info) = policies.get_mut(*policy_id) {
            if info.rules.is_none() && run.object == kernel::object_fingerprint() {
                if let Ok((policy_list, rules)) = compile_request(run) {
                    info.label = policy_label(&policy_list);
                    info.target = format!("guard run (pid {})", session.client_pid);
                    info.rules = Some(Arc::new(rules));
                }
            }
        }
        for record in session.backlog.drain(..) {
            if sink.1.try_send(Frame::Event(record)).is_err() {
                session.dropped += 1;
            }
        }
        session.sink = Some(sink);
        tracing::info!(cgroup = %cgroup.display(), "a run's client resumed");
        Reply::RunStarted {
            cgroup: cgroup.to_owned(),
            policy_id: *policy_id,
            pin_dir: Some(pin_dir.to_owned()),
        }
    }

    /// Starts ending a run: returns its cgroup, to be killed and removed
    /// (off the daemon's task), unless it is ending already.
    pub fn begin_end(&mut self, policy_id: u32, send_totals: bool) -> Option<PathBuf> {
        let session = self.sessions.get_mut(&policy_id)?;
        session.send_totals |= send_totals;
        if session.ending {
            return None;
        }
        session.ending = true;
        Some(session.cgroup.clone())
    }

    /// The rest of ending a run, once its cgroup is empty and the ring
    /// drained: totals to the client, binding, rules and counters removed.
    /// Returns the cgroup, for the caller to remove last.
    pub fn complete(
        &mut self,
        policy_id: u32,
        kernel: &mut Pinned,
        policies: &mut PolicyIds,
    ) -> Option<PathBuf> {
        let session = self.sessions.remove(&policy_id)?;
        if let (true, Some((_, sink))) = (session.send_totals, &session.sink) {
            let rules_known = policies
                .get(policy_id)
                .is_some_and(|info| info.rules.is_some());
            let mut totals =
                RunTotals::from_kernel(kernel, policy_id, rules_known).unwrap_or_else(|e| {
                    tracing::error!(policy_id, error = %e, "reading a finished run's counters");
                    RunTotals::default()
                });
            totals.events_lost += session.dropped;
            totals.program_stats = match (session.stats_at_start, kernel.egress_stats()) {
                (Some((runs0, ns0)), Some((runs1, ns1))) => Some(ProgramStats::new(
                    runs1.saturating_sub(runs0),
                    ns1.saturating_sub(ns0),
                )),
                _ => None,
            };
            totals.detached = session.detached.clone();
            totals.resolver_socket_hooks = if kernel.has_unix_hooks() {
                "active".into()
            } else {
                "unavailable: the daemon's programs have no Unix-socket hooks (Linux 6.7+)".into()
            };
            // Sent with `send` semantics on a full queue would block the
            // daemon; the totals get a slot of their own instead.
            let sink = sink.clone();
            tokio::spawn(async move {
                let _ = sink
                    .send(Frame::json(&Reply::RunFinished(Box::new(totals))))
                    .await;
            });
            crate::fault::point("run-totals-queued");
        }
        let _ = kernel.unbind(session.cgroup_id);
        crate::fault::point("run-unbound");
        kernel.forget_seen(policy_id);
        policies.retire(kernel, policy_id);
        tracing::debug!(cgroup = %session.cgroup.display(), policy_id, "run finished");
        Some(session.cgroup)
    }

    /// Whether a client's connection going away should end its run: only
    /// the run's current connection counts, and not once it is ending.
    pub fn is_current_connection(&self, policy_id: u32, token: u64) -> bool {
        self.sessions
            .get(&policy_id)
            .is_some_and(|s| !s.ending && s.sink.as_ref().map(|(t, _)| *t) == Some(token))
    }

    /// Runs adopted after a restart whose client is gone.
    pub fn orphans(&self) -> Vec<u32> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.sink.is_none() && !client_alive(s.client_pid))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Passes a raw record on to the run it belongs to, if any.
    pub fn route(&mut self, policy_id: u32, bytes: &[u8]) {
        let Some(session) = self.sessions.get_mut(&policy_id) else {
            return;
        };
        match &session.sink {
            Some((_, sink)) => {
                if sink.try_send(Frame::Event(bytes.to_vec())).is_err() {
                    session.dropped += 1;
                }
            }
            None if session.backlog.len() < RUN_BACKLOG => {
                session.backlog.push_back(bytes.to_vec())
            }
            None => session.dropped += 1,
        }
    }

    /// Removes run cgroups in the runs cgroup that no run owns (a crash
    /// between mkdir and the reply).
    pub fn remove_unowned_cgroups(&self, tree: &CgroupTree) {
        let Ok(entries) = fs::read_dir(&tree.runs_root) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if run_owner(&path).is_some() && !self.sessions.values().any(|s| s.cgroup == path) {
                tracing::warn!(cgroup = %path.display(), "removing a run cgroup nobody owns");
                let _ = remove_cgroup_tree(&path);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// guard's programs were found detached from the runs cgroup: every
    /// run in progress was unguarded for a moment, and fails.
    pub fn mark_detached(&mut self, missing: &[String]) {
        for session in self.sessions.values_mut() {
            session.detached.extend(missing.iter().cloned());
        }
    }

    /// (policy id, session), in id order.
    pub fn sorted(&self) -> Vec<(u32, &RunSession)> {
        let mut runs: Vec<(u32, &RunSession)> =
            self.sessions.iter().map(|(id, s)| (*id, s)).collect();
        runs.sort_by_key(|(id, _)| *id);
        runs
    }

    pub fn policy_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.sessions.keys().copied()
    }

    pub fn cgroup_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.sessions.values().map(|s| s.cgroup_id)
    }

    /// The cgroups runs outside the runs cgroup live in (an earlier
    /// `runs_cgroup`): their programs stay attached there while they do.
    pub fn outer_roots(&self, runs_root: &Path) -> Vec<u64> {
        self.sessions
            .values()
            .filter_map(|s| s.cgroup.parent())
            .filter(|parent| *parent != runs_root)
            .filter_map(|parent| fs::metadata(parent).ok().map(|m| m.ino()))
            .collect()
    }
}

/// A run's policies and rules, compiled with the same code as `guard run`.
fn compile_request(request: &RunRequest) -> Result<(Vec<Policy>, RuleSet), RunRefusal> {
    let mut policies = Vec::new();
    for text in &request.policies {
        policies.push(Policy::parse(&text.text, &text.path)?);
    }
    Ok(compile(
        policies,
        &request.deny,
        &request.allow,
        request.audit,
    )?)
}

fn policy_label(policies: &[Policy]) -> String {
    policies
        .iter()
        .map(|p| p.name.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether a run's client still lives (and is still guard: pids get reused).
fn client_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "guard")
}
