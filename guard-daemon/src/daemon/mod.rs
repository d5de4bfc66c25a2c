//! `guard daemon`: one pinned copy of the programs guarding configured
//! cgroups and systemd units, and hosting `guard run`s.
//!
//! The kernel state is the source of truth and outlives the process:
//! programs, links and maps are pinned under the pin directory. The daemon
//! only ever changes enforcement in an order where every packet sees either
//! the old or the new policy in full:
//! - a policy gets a fresh policy id; its rules and counters are written
//!   under that id first;
//! - then the cgroup's binding is switched to the id (one map update);
//! - only then are the old id's rules removed.
//!
//! Killing the daemon changes nothing in the kernel. A restart adopts the
//! pinned state, re-applies the configuration by the same three steps, and
//! picks up runs whose client is still waiting to resume.
//!
//! The daemon is an event loop ([`serve`]) over one [`Daemon`], which
//! composes state that one type each owns, behind narrow interfaces:
//! - [`policies`]: policy ids, their rules and counters in the kernel;
//! - [`bindings`]: configured units and cgroups, and what guards them now;
//! - [`runs`]: runs hosted for `guard run` clients;
//! - [`records`]: the kernel's records: process table, logs, subscribers;
//! - [`generation`]: the pinned programs and maps, and their clean-up;
//! - [`tree`]: where cgroups are (read-only);
//! - [`connection`]: the socket, turning requests into [`Msg`]s;
//! - [`status`], [`metrics`]: read-only answers.
mod bindings;
pub mod config;
mod connection;
mod generation;
mod metrics;
mod policies;
mod records;
mod runs;
mod status;
mod tree;

use std::{
    cell::OnceCell,
    collections::HashSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    net::UnixListener,
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot},
};

use self::{
    bindings::Bindings,
    config::Config,
    policies::PolicyIds,
    records::Records,
    runs::{Admission, RunClient, RunRefusal, Runs},
    tree::CgroupTree,
};
use crate::{
    api::{Frame, Reply, RunRequest},
    error::{Error, Result},
    kernel::{records::policy_of, KernelMaps as _, Pinned},
};

pub use generation::uninstall;

const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(500);

pub struct DaemonOptions {
    pub config: PathBuf,
}

/// `guard daemon`: returns the process exit status.
pub fn main(options: DaemonOptions) -> i32 {
    if !options.config.exists() {
        tracing::warn!(
            config = %options.config.display(),
            "no configuration file: starting with the defaults and no bindings"
        );
    }
    let config = match Config::load_or_default(&options.config) {
        Ok(config) => {
            config.warn_about_skipped_files();
            config
        }
        Err(e) => {
            eprintln!("guard daemon: {e}");
            return 1;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("guard daemon: starting the async runtime: {e}");
            return 1;
        }
    };
    let code = runtime.block_on(async {
        match start(config).await {
            Ok((daemon, ring, listener)) => serve(daemon, ring, listener).await,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("guard daemon: {e}");
                1
            }
        }
    });
    // A reload stuck reading a file (a FIFO) must not keep the daemon from
    // stopping: dropping the runtime would wait for it.
    runtime.shutdown_background();
    code
}

enum Msg {
    Run {
        request: RunRequest,
        client_pid: u32,
        token: u64,
        sink: mpsc::Sender<Frame>,
        reply: oneshot::Sender<Reply>,
    },
    Resume {
        cgroup: PathBuf,
        run: Box<RunRequest>,
        token: u64,
        sink: mpsc::Sender<Frame>,
        reply: oneshot::Sender<Reply>,
    },
    Finish {
        policy_id: u32,
    },
    /// Nothing runs in a run's cgroup any more (sent by the blocking task
    /// that killed what was left).
    Emptied {
        policy_id: u32,
    },
    Detached {
        policy_id: u32,
        token: u64,
    },
    Status {
        reply: oneshot::Sender<Reply>,
    },
    Reload {
        reply: oneshot::Sender<Reply>,
    },
    /// A configuration read off the daemon's task for a reload (reading
    /// files may block: a FIFO, a slow mount), to be swapped in.
    Loaded {
        sequence: u64,
        config: Box<std::result::Result<Config, String>>,
        reply: Option<oneshot::Sender<Reply>>,
    },
    Subscribe {
        follow: bool,
        sink: mpsc::Sender<Frame>,
    },
    Metrics {
        reply: oneshot::Sender<String>,
    },
    EnsureGuarded {
        pid: u32,
        reply: oneshot::Sender<Reply>,
    },
}

struct Daemon {
    config: Config,
    tree: CgroupTree,
    kernel: Pinned,
    generation: String,
    policies: PolicyIds,
    bindings: Bindings,
    runs: Runs,
    records: Records,
    /// How guard's programs are attached to each guarded cgroup, to notice
    /// them detached or replaced (by cgroup id).
    attachments: std::collections::HashMap<u64, crate::kernel::evidence::Attachments>,
    started: Instant,
    /// The daemon's own queue, for work it hands to blocking tasks.
    tx: Option<mpsc::Sender<Msg>>,
    /// Reloads asked for, and the latest one swapped in: a reload whose
    /// reading finishes after a later one's is not applied.
    reloads_asked: u64,
    reload_applied: u64,
    /// Held for the daemon's life: no second daemon works with these pins.
    _pin_lock: crate::kernel::pinned::PinLock,
}

async fn start(mut config: Config) -> Result<(Daemon, AsyncFd<RingBuf<MapData>>, UnixListener)> {
    let (tree, runs_dir) = CgroupTree::open(&config)?;
    let (mut kernel, generation, pin_lock) = generation::open(&config)?;
    let ring = kernel.take_events()?;
    kernel.attach_cgroup(&runs_dir, tree.runs_root_id)?;
    {
        use crate::kernel::{evidence::EvidenceMaps as _, unixhooks::socket_table};
        kernel.set_unix_sockets(&socket_table(&config.resolver_sockets))?;
        if !kernel.has_unix_hooks() {
            tracing::warn!("this kernel has no Unix-socket hooks (Linux 6.7+): lookups through nscd or systemd-resolved's socket are not refused, and not seen");
        }
    }

    let bound = kernel.bindings()?;
    let highest = bound
        .iter()
        .map(|(_, b)| b.policy_id)
        .chain(kernel.all_policy_counters()?.iter().map(|(id, _)| *id))
        .max()
        .unwrap_or(0);
    let mut policies = PolicyIds::new(highest)?;
    let mut runs = Runs::default();
    runs.adopt(&bound, &mut kernel, &mut policies, &tree);
    let configured = std::mem::take(&mut config.bindings);
    bindings::remember_previous(&configured, &bound, &tree, &mut policies);
    let prepared = Bindings::prepare(configured, &mut kernel, &mut policies)?;
    let mut bindings = Bindings::default();
    bindings.switch(prepared, &mut kernel, &mut policies, &tree);
    let mut daemon = Daemon {
        config,
        tree,
        kernel,
        generation,
        policies,
        bindings,
        runs,
        records: Records::new(),
        attachments: std::collections::HashMap::new(),
        started: Instant::now(),
        tx: None,
        reloads_asked: 0,
        reload_applied: 0,
        _pin_lock: pin_lock,
    };
    daemon.collect_garbage()?;
    generation::remove_older(&daemon.kernel, &daemon.config.pin_dir, &daemon.tree);

    let listener = connection::bind_socket(&daemon.config.socket)?;
    // SAFETY: the ring buffer owns its descriptor for as long as AsyncFd
    // holds it.
    let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| Error::io("watching the event ring buffer")(e.into_parts().1))?;
    Ok((daemon, ring, listener))
}

/// The event loop: kernel records, messages from connections and blocking
/// tasks, signals and the housekeeping tick, one at a time.
async fn serve(
    mut daemon: Daemon,
    mut ring: AsyncFd<RingBuf<MapData>>,
    listener: UnixListener,
) -> i32 {
    let (tx, mut rx) = mpsc::channel::<Msg>(1024);
    daemon.tx = Some(tx.clone());
    tokio::spawn(connection::accept(listener, tx.clone()));
    if let Some(address) = daemon.config.metrics_address {
        match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => {
                tracing::info!(%address, "serving Prometheus metrics");
                tokio::spawn(metrics::serve(listener, tx.clone()));
            }
            Err(e) => tracing::error!(%address, error = %e, "cannot serve metrics"),
        }
    }
    let listen = |kind| signal(kind).expect("signal handlers install");
    let mut hangup = listen(SignalKind::hangup());
    let mut terminate = listen(SignalKind::terminate());
    let mut interrupt = listen(SignalKind::interrupt());
    let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    tracing::info!(
        socket = %daemon.config.socket.display(),
        bindings = daemon.bindings.len(),
        runs = daemon.runs.len(),
        "ready"
    );
    notify(&[sd_notify::NotifyState::Ready]);
    loop {
        tokio::select! {
            readable = ring.readable_mut() => match readable {
                Ok(mut guard) => {
                    daemon.drain(guard.get_inner_mut());
                    guard.clear_ready();
                }
                Err(e) => {
                    tracing::error!(error = %e, "reading the event ring buffer");
                    break;
                }
            },
            Some(msg) = rx.recv() => daemon.handle(msg, ring.get_mut()),
            _ = hangup.recv() => daemon.start_reload(None),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = tick.tick() => daemon.housekeeping(ring.get_mut()),
        }
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!(
        "stopping; enforcement stays in place (pinned) until `guard daemon --uninstall`"
    );
    0
}

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    let _ = sd_notify::notify(state);
}

impl Daemon {
    fn handle(&mut self, msg: Msg, ring: &mut RingBuf<MapData>) {
        match msg {
            Msg::Run {
                request,
                client_pid,
                token,
                sink,
                reply,
            } => {
                let answer = match self.start_run(request, client_pid, token, sink) {
                    Ok((cgroup, policy_id)) => Reply::RunStarted {
                        cgroup,
                        policy_id,
                        pin_dir: Some(self.kernel.dir().to_owned()),
                    },
                    Err(RunRefusal::Incompatible(message)) => Reply::Incompatible { message },
                    Err(RunRefusal::Error(message)) => Reply::Error { message },
                };
                let _ = reply.send(answer);
            }
            Msg::Resume {
                cgroup,
                run,
                token,
                sink,
                reply,
            } => {
                let answer = self.runs.resume(
                    &cgroup,
                    &run,
                    (token, sink),
                    &mut self.policies,
                    self.kernel.dir(),
                );
                let _ = reply.send(answer);
            }
            Msg::Finish { policy_id } => self.end_run(policy_id, ring, true),
            Msg::Emptied { policy_id } => self.complete_run(policy_id, ring),
            Msg::Detached { policy_id, token } => {
                if self.runs.is_current_connection(policy_id, token) {
                    tracing::warn!(policy_id, "a guard run client went away; ending its run");
                    self.end_run(policy_id, ring, false);
                }
            }
            Msg::Status { reply } => {
                let _ = reply.send(Reply::Status(Box::new(self.status())));
            }
            Msg::Reload { reply } => self.start_reload(Some(reply)),
            Msg::Loaded {
                sequence,
                config,
                reply,
            } => {
                let answer = match self.finish_reload(sequence, *config) {
                    Ok(message) => Reply::Reloaded { message },
                    Err(message) => Reply::Error { message },
                };
                if let Some(reply) = reply {
                    let _ = reply.send(answer);
                }
            }
            Msg::Subscribe { follow, sink } => self.records.subscribe(follow, sink),
            Msg::Metrics { reply } => {
                let _ = reply.send(self.metrics());
            }
            Msg::EnsureGuarded { pid, reply } => {
                let _ = reply.send(self.ensure_guarded(pid));
            }
        }
    }

    fn start_run(
        &mut self,
        request: RunRequest,
        client_pid: u32,
        token: u64,
        sink: mpsc::Sender<Frame>,
    ) -> Result<(PathBuf, u32), RunRefusal> {
        let admission = Admission {
            dns_ports: &self.config.dns_ports,
            max_policies: self.config.max_policies,
            bindings: self.bindings.len(),
            already_guarded: self
                .tree
                .already_guarded(client_pid, &self.bound_cgroup_ids()),
        };
        self.runs.start(
            request,
            RunClient {
                pid: client_pid,
                token,
                sink,
            },
            admission,
            &mut self.kernel,
            &mut self.policies,
            &self.tree,
        )
    }

    /// Ends a run: what is left in its cgroup is killed off the daemon's
    /// task (processes slow to die must not hold up every other run's
    /// events), then [`Daemon::complete_run`] follows.
    ///
    /// The cgroup itself goes last, once binding, rules and counters are
    /// gone: a daemon killed at any step in between leaves the cgroup for
    /// its successor to find, adopt and finish (or remove) with its client.
    fn end_run(&mut self, policy_id: u32, ring: &mut RingBuf<MapData>, send_totals: bool) {
        let Some(cgroup) = self.runs.begin_end(policy_id, send_totals) else {
            return;
        };
        crate::fault::point("run-ending");
        let empty = move || {
            if let Err(e) = crate::kernel::cgroup::kill_processes(&cgroup) {
                tracing::error!(error = %e, "killing what is left of a run");
            }
        };
        match self.tx.clone() {
            Some(tx) => {
                tokio::task::spawn_blocking(move || {
                    empty();
                    let _ = tx.blocking_send(Msg::Emptied { policy_id });
                });
            }
            None => {
                empty();
                self.complete_run(policy_id, ring);
            }
        }
    }

    fn complete_run(&mut self, policy_id: u32, ring: &mut RingBuf<MapData>) {
        crate::fault::point("run-emptied");
        // Everything the run's processes did is in the ring now.
        self.drain(ring);
        // A detach is permanent: this sees any since the last look.
        self.check_attachments();
        if let Some(cgroup) = self
            .runs
            .complete(policy_id, &mut self.kernel, &mut self.policies)
        {
            crate::fault::point("run-retired");
            let remove = move || {
                if let Err(e) = crate::kernel::cgroup::remove_cgroup_tree(&cgroup) {
                    tracing::error!(error = %e, "removing a run's cgroup");
                }
            };
            // Off the daemon's task too: a process that would not die holds
            // the removal up, and nothing else.
            match self.tx {
                Some(_) => drop(tokio::task::spawn_blocking(remove)),
                None => remove(),
            }
        }
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            let bytes = item.to_vec();
            drop(item);
            // The bound cgroups are read once per record, and only if a
            // chain has a process the kernel programs did not report.
            let bound = OnceCell::new();
            let (tree, kernel, bindings) = (&self.tree, &self.kernel, &self.bindings);
            self.records.observe(
                &bytes,
                &self.policies,
                |pid| {
                    tree.already_guarded(pid, bound.get_or_init(|| bound_cgroup_ids(kernel)))
                        .is_some()
                },
                |policy_id| {
                    bindings
                        .cgroup_of_policy(policy_id)
                        .and_then(crate::kernel::evidence::hierarchy_path)
                },
            );
            if let Some(policy_id) = policy_of(&bytes) {
                self.runs.route(policy_id, &bytes);
            }
        }
    }

    fn housekeeping(&mut self, ring: &mut RingBuf<MapData>) {
        for id in self.runs.orphans() {
            tracing::warn!(
                policy_id = id,
                "the client of an adopted run is gone; ending the run"
            );
            self.end_run(id, ring, false);
        }
        self.bindings.refresh(&mut self.kernel, &self.tree);
        self.runs.remove_unowned_cgroups(&self.tree);
        self.records.forget_closed_subscribers();
        self.check_attachments();
    }

    /// Notices guard's programs detached from (or replaced on) a guarded
    /// cgroup, says so, and attaches them again. Runs in progress under a
    /// tampered runs cgroup fail.
    fn check_attachments(&mut self) {
        let mut watched: Vec<(u64, PathBuf)> =
            vec![(self.tree.runs_root_id, self.tree.runs_root.clone())];
        watched.extend(
            self.bindings
                .iter()
                .filter_map(|b| b.cgroup.as_ref().map(|(path, id)| (*id, path.clone()))),
        );
        self.attachments
            .retain(|id, _| watched.iter().any(|(w, _)| w == id));
        for (id, path) in watched {
            let Ok(dir) = std::fs::File::open(&path) else {
                continue;
            };
            let Some(expected) = self.attachments.get(&id) else {
                self.attachments.insert(id, self.kernel.attachments(&dir));
                continue;
            };
            let missing = expected.missing(&dir);
            if missing.is_empty() {
                continue;
            }
            tracing::error!(
                target: "guard::evidence",
                cgroup = %path.display(),
                missing = %missing.join("; "),
                "guard's programs were detached or replaced; attaching them again"
            );
            if id == self.tree.runs_root_id {
                self.runs.mark_detached(&missing);
            }
            self.kernel.detach_cgroup(id);
            if let Err(e) = self.kernel.attach_cgroup(&dir, id) {
                tracing::error!(cgroup = %path.display(), error = %e, "cannot attach guard's programs again");
            }
            self.attachments.insert(id, self.kernel.attachments(&dir));
        }
    }

    fn bound_cgroup_ids(&self) -> HashSet<u64> {
        bound_cgroup_ids(&self.kernel)
    }

    /// Removes whatever the kernel maps hold that no binding or run owns.
    fn collect_garbage(&mut self) -> Result<()> {
        let live: HashSet<u32> = self
            .bindings
            .policy_ids()
            .chain(self.runs.policy_ids())
            .collect();
        let guarded: HashSet<u64> = self
            .bindings
            .cgroup_ids()
            .chain(self.runs.cgroup_ids())
            .chain(self.runs.outer_roots(&self.tree.runs_root))
            .collect();
        generation::collect_garbage(&mut self.kernel, &live, &guarded, self.tree.runs_root_id)
    }

    /// `guard ensure-guarded`: is the asking process's cgroup guarded by a
    /// configured binding (bound now if it just appeared)?
    fn ensure_guarded(&mut self, pid: u32) -> Reply {
        self.bindings.refresh(&mut self.kernel, &self.tree);
        let Some(cgroup) = self.tree.cgroup_of(pid) else {
            return Reply::Error {
                message: format!("cannot read the cgroup of pid {pid}"),
            };
        };
        match self.bindings.guarding(&cgroup) {
            Some(binding) => Reply::Guarded {
                cgroup,
                policies: binding.config.policies.clone(),
            },
            None => Reply::Error {
                message: format!(
                    "{} is not guarded: {} binds no unit or cgroup containing it",
                    cgroup.display(),
                    self.config.path.display()
                ),
            },
        }
    }

    /// Starts a reload: the configuration and policies are read on a
    /// blocking task, so a file that blocks (a FIFO named `*.yaml`, a hung
    /// mount) holds up the reload only, never status, runs or records;
    /// [`Daemon::finish_reload`] swaps the result in.
    fn start_reload(&mut self, reply: Option<oneshot::Sender<Reply>>) {
        notify(&[sd_notify::NotifyState::Reloading]);
        self.reloads_asked += 1;
        let sequence = self.reloads_asked;
        let path = self.config.path.clone();
        let load = move || Box::new(Config::load(&path).map_err(|e| e.to_string()));
        match self.tx.clone() {
            Some(tx) => {
                tokio::task::spawn_blocking(move || {
                    let config = load();
                    let _ = tx.blocking_send(Msg::Loaded {
                        sequence,
                        config,
                        reply,
                    });
                });
            }
            None => {
                let answer = match self.finish_reload(sequence, *load()) {
                    Ok(message) => Reply::Reloaded { message },
                    Err(message) => Reply::Error { message },
                };
                if let Some(reply) = reply {
                    let _ = reply.send(answer);
                }
            }
        }
    }

    /// Swaps a configuration read for a reload in. One that does not
    /// validate changes nothing, nor does one overtaken by a later reload.
    /// Tells systemd, and logs.
    fn finish_reload(
        &mut self,
        sequence: u64,
        config: std::result::Result<Config, String>,
    ) -> Result<String, String> {
        let result = if sequence < self.reload_applied {
            Err("a later reload was applied first; this one changed nothing".to_owned())
        } else {
            self.reload_applied = sequence;
            config.and_then(|config| self.swap_configuration(config))
        };
        match &result {
            Ok(message) => tracing::info!("{message}"),
            Err(message) => tracing::error!("reload refused: {message}"),
        }
        if sequence == self.reloads_asked {
            notify(&[sd_notify::NotifyState::Ready]);
        }
        result
    }

    fn swap_configuration(&mut self, config: Config) -> Result<String, String> {
        config.warn_about_skipped_files();
        let mut notes = String::new();
        if config.restart_only_settings() != self.config.restart_only_settings() {
            notes = " (socket, pin_dir, runs_cgroup, metrics_address, dns_ports, resolver_sockets and capacities change only on restart)".into();
        }
        let Config {
            bindings,
            skipped_policy_files,
            ..
        } = config;
        let count = bindings.len();
        let prepared = Bindings::prepare(bindings, &mut self.kernel, &mut self.policies)
            .map_err(|e| e.to_string())?;
        self.config.skipped_policy_files = skipped_policy_files;
        self.bindings
            .switch(prepared, &mut self.kernel, &mut self.policies, &self.tree);
        Ok(format!(
            "reloaded {}: {count} binding(s){notes}",
            self.config.path.display()
        ))
    }
}

/// Ids of the cgroups bound in the kernel map.
fn bound_cgroup_ids(kernel: &Pinned) -> HashSet<u64> {
    kernel
        .bindings()
        .map(|bound| bound.into_iter().map(|(id, _)| id).collect())
        .unwrap_or_default()
}
