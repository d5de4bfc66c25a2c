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
pub mod config;
mod metrics;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use guard_common::maps::{Binding, Counter};
use tokio::{
    io::unix::AsyncFd,
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot},
};

use self::config::{BindingConfig, Config, Target};
use crate::{
    api::{
        self, BindingStatus, Frame, ProgramStatus, Reply, Request, RunRequest, RunTotals, Status,
    },
    cgroup::{remove_cgroup_tree, run_cgroup_name, run_owner, Hierarchy, RunCgroup, RUN_PREFIX},
    error::{Error, Result},
    events::{decode, policy_of, Record},
    loader::{self, remove_pins, KernelMaps as _, LoadOptions, Pinned},
    policy::{Mode, Policy, RuleSet},
    procs::ProcessTable,
    report::{Clock, Counters, EventRecord, ProgramStats},
};

/// Events kept for `guard events` without `--follow`.
const RECENT_EVENTS: usize = 1000;
/// Records buffered for a run whose client is away (daemon restarted and
/// the client has not resumed yet); beyond this they are counted as lost.
const RUN_BACKLOG: usize = 65_536;
/// Frames queued for one client before further ones are dropped (counted).
const CLIENT_QUEUE: usize = 65_536;
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
        Ok(config) => config,
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
    runtime.block_on(async {
        match start(config).await {
            Ok((daemon, ring, listener)) => serve(daemon, ring, listener).await,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("guard daemon: {e}");
                1
            }
        }
    })
}

/// `guard daemon --uninstall`: removes everything the daemon pinned and the
/// runs cgroup. Refused while a daemon answers on the socket.
pub fn uninstall(config_path: &Path) -> i32 {
    let config = match Config::load_or_default(config_path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("guard daemon: {e}");
            return 1;
        }
    };
    if std::os::unix::net::UnixStream::connect(&config.socket).is_ok() {
        eprintln!(
            "guard daemon: a daemon is running on {}; stop it first (systemctl stop guard)",
            config.socket.display()
        );
        return 1;
    }
    // Runs first: once the links are gone their commands would be
    // unguarded, so they are killed while still guarded.
    if let Ok(hierarchy) = Hierarchy::find_or_mount("uninstall") {
        if let Ok(runs_root) = runs_root(&config, &hierarchy) {
            if let Err(e) = remove_cgroup_tree(&runs_root) {
                eprintln!("guard daemon: {e}");
                return 1;
            }
        }
    }
    remove_pins(&config.pin_dir);
    let _ = fs::remove_file(&config.socket);
    if config.pin_dir.exists() {
        eprintln!(
            "guard daemon: could not remove everything under {}",
            config.pin_dir.display()
        );
        return 1;
    }
    println!(
        "guard daemon: removed {} and the runs cgroup",
        config.pin_dir.display()
    );
    0
}

fn load_options(config: &Config) -> LoadOptions<'_> {
    LoadOptions {
        dns_ports: &config.dns_ports,
        rule_capacity: config.rule_capacity,
        ring_buffer_bytes: config.ring_buffer_size,
        record_capacity: 65_536,
        policy_capacity: config.max_policies,
    }
}

fn runs_root(config: &Config, hierarchy: &Hierarchy) -> Result<PathBuf> {
    Ok(match &config.runs_cgroup {
        Some(path) => hierarchy.mount.join(path.strip_prefix("/").unwrap_or(path)),
        None => hierarchy.own_cgroup()?.join("runs"),
    })
}

/// Who a policy id belongs to, for logs, events and metrics.
struct PolicyInfo {
    kind: &'static str,
    /// Policy names, joined with `,`.
    label: String,
    target: String,
    mode: Mode,
    rules: Arc<RuleSet>,
}

struct ActiveBinding {
    config: BindingConfig,
    policy_id: u32,
    /// The cgroup guarded now (path, id); None while the unit is not running.
    cgroup: Option<(PathBuf, u64)>,
}

struct RunSession {
    cgroup: PathBuf,
    cgroup_id: u64,
    client_pid: u32,
    /// The connection of the client; None after a restart until it resumes.
    sink: Option<(u64, mpsc::Sender<Frame>)>,
    backlog: VecDeque<Vec<u8>>,
    /// Records the client could not be sent (queue full, or backlog full).
    dropped: u64,
    /// Rule hashes to remove at the end; None for a run adopted after a
    /// restart (its rules are then found by a scan).
    rules: Option<Arc<RuleSet>>,
    stats_at_start: Option<(u64, u64)>,
    /// Its cgroup is being removed (off the daemon's task); the rest of the
    /// ending follows when that is done.
    ending: bool,
    /// Send the totals to the client once the run has ended.
    send_totals: bool,
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
    /// A run's cgroup is gone (sent by the blocking task that removed it).
    Removed {
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
    hierarchy: Hierarchy,
    kernel: Pinned,
    generation: String,
    runs_root: PathBuf,
    runs_root_id: u64,
    bindings: Vec<ActiveBinding>,
    runs: HashMap<u32, RunSession>,
    policies: HashMap<u32, PolicyInfo>,
    /// Counters of policy ids that are gone, by (kind, label), so metrics
    /// stay monotonic across runs and reloads.
    retired: BTreeMap<(String, String), (Counters, u64)>,
    next_policy_id: u32,
    procs: ProcessTable,
    clock: Clock,
    recent: VecDeque<serde_json::Value>,
    subscribers: Vec<mpsc::Sender<Frame>>,
    started: Instant,
    empty_rules: Arc<RuleSet>,
    /// Who the policy ids of a previous daemon belonged to, so the records
    /// they left in the ring are logged under the right binding.
    previous: HashMap<u32, PolicyInfo>,
    /// The daemon's own queue, for work it hands to blocking tasks.
    tx: Option<mpsc::Sender<Msg>>,
}

async fn start(config: Config) -> Result<(Daemon, AsyncFd<RingBuf<MapData>>, UnixListener)> {
    let hierarchy = Hierarchy::find_or_mount("daemon")?;
    loader::ensure_bpffs(&config.pin_dir)?;
    let options = load_options(&config);
    let generation = loader::generation(&options);
    let t = Instant::now();
    let (mut kernel, adopted) = Pinned::open_or_create(&config.pin_dir, &options)?;
    if adopted {
        tracing::info!(pin_dir = %kernel.dir().display(), elapsed = ?t.elapsed(), "adopted the pinned programs and maps");
    } else {
        tracing::info!(pin_dir = %kernel.dir().display(), elapsed = ?t.elapsed(), "loaded, attached and pinned the programs");
    }
    let ring = kernel.take_events()?;

    let runs_root = runs_root(&config, &hierarchy)?;
    match fs::create_dir_all(&runs_root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(Error::Cgroup {
                action: "creating the runs cgroup",
                path: runs_root,
                source,
            })
        }
    }
    let runs_dir = fs::File::open(&runs_root).map_err(|source| Error::Cgroup {
        action: "opening",
        path: runs_root.clone(),
        source,
    })?;
    let runs_root_id = runs_dir
        .metadata()
        .map_err(Error::io("reading the runs cgroup"))?
        .ino();
    kernel.attach_cgroup(&runs_dir, runs_root_id)?;

    let bound = kernel.bindings()?;
    let highest = bound
        .iter()
        .map(|(_, b)| b.policy_id)
        .chain(kernel.all_policy_counters()?.iter().map(|(id, _)| *id))
        .max()
        .unwrap_or(0);
    let empty_rules = Arc::new(RuleSet::compile(&[], false)?);
    let mut daemon = Daemon {
        generation,
        hierarchy,
        kernel,
        runs_root,
        runs_root_id,
        bindings: Vec::new(),
        runs: HashMap::new(),
        policies: HashMap::new(),
        retired: BTreeMap::new(),
        next_policy_id: highest.wrapping_add(1).max(1),
        procs: ProcessTable::new(0),
        clock: Clock::new(),
        recent: VecDeque::new(),
        subscribers: Vec::new(),
        started: Instant::now(),
        empty_rules,
        previous: HashMap::new(),
        tx: None,
        config,
    };
    daemon.adopt_runs(&bound);
    daemon.remember_previous_bindings(&bound);
    let bindings = std::mem::take(&mut daemon.config.bindings);
    let active = daemon.install_bindings(bindings)?;
    daemon.switch_bindings(active);
    daemon.collect_garbage()?;
    for old in daemon.kernel.other_generations(&daemon.config.pin_dir) {
        // An older build's programs: ours are in place, so removing its
        // links opens no gap.
        tracing::info!(dir = %old.display(), "removing a previous generation of pinned programs");
        remove_pins(&old);
    }

    let listener = bind_socket(&daemon.config.socket)?;
    // SAFETY: the ring buffer owns its descriptor for as long as AsyncFd
    // holds it.
    let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| Error::io("watching the event ring buffer")(e.into_parts().1))?;
    Ok((daemon, ring, listener))
}

/// The socket: its directory root-only, the socket itself 0600. Peer
/// credentials are checked too, in case the modes are loosened.
fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(Error::io(format!("securing {}", dir.display())))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Error::io(format!(
            "another daemon answers on {}",
            path.display()
        ))(std::io::Error::from_raw_os_error(
            libc::EADDRINUSE,
        )));
    }
    let _ = fs::remove_file(path);
    let listener =
        UnixListener::bind(path).map_err(Error::io(format!("listening on {}", path.display())))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(Error::io(format!("securing {}", path.display())))?;
    Ok(listener)
}

async fn serve(
    mut daemon: Daemon,
    mut ring: AsyncFd<RingBuf<MapData>>,
    listener: UnixListener,
) -> i32 {
    let (tx, mut rx) = mpsc::channel::<Msg>(1024);
    daemon.tx = Some(tx.clone());
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut next_token = 1u64;
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        next_token += 1;
                        tokio::spawn(connection(stream, tx.clone(), next_token));
                    }
                    Err(e) => tracing::warn!(error = %e, "accepting a connection"),
                }
            }
        });
    }
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
            _ = hangup.recv() => {
                let _ = daemon.reload();
            }
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

/// One client connection: the first request decides what it is.
async fn connection(stream: UnixStream, tx: mpsc::Sender<Msg>, token: u64) {
    let credentials = stream.peer_cred();
    let (mut reader, mut writer) = stream.into_split();
    // Read the request first, so that a refusal is read as a reply rather
    // than lost in a reset connection.
    let request = api::read_json::<_, Request>(&mut reader).await;
    let peer = match credentials {
        Ok(c) if c.uid() == 0 => c,
        Ok(c) => {
            tracing::warn!(uid = c.uid(), pid = ?c.pid(), "refused a client that is not root");
            let message = format!(
                "permission denied: guard's API is for root only (you are uid {})",
                c.uid()
            );
            refuse(&mut writer, message).await;
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a client's credentials");
            return;
        }
    };
    let request: Request = match request {
        Ok(Some(request)) => request,
        Ok(None) => return,
        Err(e) => {
            refuse(&mut writer, format!("bad request: {e}")).await;
            return;
        }
    };
    let ask = |make: fn(oneshot::Sender<Reply>) -> Msg| {
        let tx = tx.clone();
        async move {
            let (reply, answer) = oneshot::channel();
            if tx.send(make(reply)).await.is_err() {
                return None;
            }
            answer.await.ok()
        }
    };
    match request {
        Request::Status => {
            if let Some(reply) = ask(|reply| Msg::Status { reply }).await {
                let _ = api::write_frame(&mut writer, &Frame::json(&reply)).await;
            }
        }
        Request::Reload => {
            if let Some(reply) = ask(|reply| Msg::Reload { reply }).await {
                let _ = api::write_frame(&mut writer, &Frame::json(&reply)).await;
            }
        }
        Request::Events { follow } => {
            let (sink, mut frames) = mpsc::channel(CLIENT_QUEUE);
            if tx.send(Msg::Subscribe { follow, sink }).await.is_err() {
                return;
            }
            let mut closed = [0u8; 1];
            loop {
                tokio::select! {
                    frame = frames.recv() => match frame {
                        Some(frame) => if api::write_frame(&mut writer, &frame).await.is_err() { return },
                        None => return,
                    },
                    // The client hung up (its reads are all done).
                    _ = tokio::io::AsyncReadExt::read(&mut reader, &mut closed) => return,
                }
            }
        }
        Request::Run(request) => {
            let (sink, frames) = mpsc::channel(CLIENT_QUEUE);
            let (reply, answer) = oneshot::channel();
            let client_pid = peer.pid().unwrap_or(0) as u32;
            let msg = Msg::Run {
                request,
                client_pid,
                token,
                sink,
                reply,
            };
            run_session(msg, answer, frames, reader, writer, tx, token).await;
        }
        Request::Resume { cgroup, run, .. } => {
            let (sink, frames) = mpsc::channel(CLIENT_QUEUE);
            let (reply, answer) = oneshot::channel();
            let msg = Msg::Resume {
                cgroup,
                run,
                token,
                sink,
                reply,
            };
            run_session(msg, answer, frames, reader, writer, tx, token).await;
        }
        Request::EnsureGuarded => {
            let pid = peer.pid().unwrap_or(0) as u32;
            let (reply, answer) = oneshot::channel();
            if tx.send(Msg::EnsureGuarded { pid, reply }).await.is_ok() {
                if let Ok(reply) = answer.await {
                    let _ = api::write_frame(&mut writer, &Frame::json(&reply)).await;
                }
            }
        }
        Request::Finish => {
            let _ = api::write_frame(
                &mut writer,
                &Frame::json(&Reply::Error {
                    message: "finish outside a run".into(),
                }),
            )
            .await;
        }
    }
}

async fn refuse(writer: &mut tokio::net::unix::OwnedWriteHalf, message: String) {
    let _ = api::write_frame(writer, &Frame::json(&Reply::Error { message })).await;
}

/// A `guard run` client's connection: events out, `finish` in.
async fn run_session(
    start: Msg,
    answer: oneshot::Receiver<Reply>,
    mut frames: mpsc::Receiver<Frame>,
    mut reader: tokio::net::unix::OwnedReadHalf,
    mut writer: tokio::net::unix::OwnedWriteHalf,
    tx: mpsc::Sender<Msg>,
    token: u64,
) {
    if tx.send(start).await.is_err() {
        return;
    }
    let Ok(reply) = answer.await else { return };
    let policy_id = match &reply {
        Reply::RunStarted { policy_id, .. } => *policy_id,
        _ => {
            let _ = api::write_frame(&mut writer, &Frame::json(&reply)).await;
            return;
        }
    };
    if api::write_frame(&mut writer, &Frame::json(&reply))
        .await
        .is_err()
    {
        let _ = tx.send(Msg::Detached { policy_id, token }).await;
        return;
    }
    let mut finishing = false;
    loop {
        tokio::select! {
            frame = frames.recv() => match frame {
                Some(frame) => {
                    if api::write_frame(&mut writer, &frame).await.is_err() && !finishing {
                        let _ = tx.send(Msg::Detached { policy_id, token }).await;
                        return;
                    }
                }
                // The daemon sent the totals and closed the session.
                None => return,
            },
            request = api::read_json::<_, Request>(&mut reader), if !finishing => match request {
                Ok(Some(Request::Finish)) => {
                    finishing = true;
                    let _ = tx.send(Msg::Finish { policy_id }).await;
                }
                // Anything else, or the client going away, ends the run.
                _ => {
                    let _ = tx.send(Msg::Detached { policy_id, token }).await;
                    return;
                }
            },
        }
    }
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
                    Ok((cgroup, policy_id)) => Reply::RunStarted { cgroup, policy_id },
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
                let _ = reply.send(self.resume_run(&cgroup, &run, token, sink));
            }
            Msg::Finish { policy_id } => self.finish_run(policy_id, ring, true),
            Msg::Removed { policy_id } => self.complete_run(policy_id, ring),
            Msg::Detached { policy_id, token } => {
                let current = self
                    .runs
                    .get(&policy_id)
                    .and_then(|s| s.sink.as_ref())
                    .map(|(t, _)| *t);
                let ending = self.runs.get(&policy_id).is_some_and(|s| s.ending);
                if current == Some(token) && !ending {
                    tracing::warn!(policy_id, "a guard run client went away; ending its run");
                    self.finish_run(policy_id, ring, false);
                }
            }
            Msg::Status { reply } => {
                let _ = reply.send(Reply::Status(Box::new(self.status())));
            }
            Msg::Reload { reply } => {
                let answer = match self.reload() {
                    Ok(message) => Reply::Reloaded { message },
                    Err(message) => Reply::Error { message },
                };
                let _ = reply.send(answer);
            }
            Msg::Subscribe { follow, sink } => {
                for event in &self.recent {
                    let _ = sink.try_send(Frame::json(&Reply::Event(Box::new(event.clone()))));
                }
                let _ = sink.try_send(Frame::json(&Reply::Backlog));
                if follow {
                    self.subscribers.push(sink);
                }
            }
            Msg::Metrics { reply } => {
                let _ = reply.send(self.metrics());
            }
            Msg::EnsureGuarded { pid, reply } => {
                let _ = reply.send(self.ensure_guarded(pid));
            }
        }
    }

    fn allocate_policy_id(&mut self) -> u32 {
        loop {
            let id = self.next_policy_id;
            self.next_policy_id = self.next_policy_id.wrapping_add(1).max(1);
            if !self.policies.contains_key(&id) && !self.runs.contains_key(&id) {
                return id;
            }
        }
    }

    /// Writes a policy's rules and counters under a fresh id (step one of
    /// every change; nothing is bound to the id yet).
    fn install_policy(&mut self, rules: &RuleSet) -> Result<u32> {
        let id = self.allocate_policy_id();
        let installed = self
            .kernel
            .add_policy_counters(id)
            .and_then(|()| self.kernel.install_rules(id, rules));
        if let Err(e) = installed {
            let _ = self.kernel.remove_rules(id, rules);
            self.kernel.remove_policy_counters(id);
            return Err(e);
        }
        Ok(id)
    }

    /// Removes a policy id that nothing is bound to any more, keeping its
    /// counts for the metrics.
    fn retire_policy(&mut self, id: u32, rules: Option<&RuleSet>) {
        if let Some(info) = self.policies.remove(&id) {
            let counters = self.kernel.policy_counters(id).ok();
            if let Some(counters) = counters {
                let entry = self
                    .retired
                    .entry((info.kind.to_owned(), info.label.clone()))
                    .or_default();
                entry.0.add(&Counters::from_kernel(&counters));
                entry.1 += counters.values[Counter::EventsLost as usize];
            }
        }
        match rules {
            Some(rules) => {
                let _ = self.kernel.remove_rules(id, rules);
            }
            None => {
                let _ = self.kernel.retain_rules(&|policy| policy != id);
            }
        }
        self.kernel.remove_policy_counters(id);
    }

    fn install_bindings(&mut self, configs: Vec<BindingConfig>) -> Result<Vec<ActiveBinding>> {
        let mut active = Vec::new();
        for config in configs {
            match self.install_policy(&config.rules) {
                Ok(policy_id) => {
                    self.policies.insert(
                        policy_id,
                        PolicyInfo {
                            kind: config.target.kind(),
                            label: config.policies.join(","),
                            target: config.target.name(),
                            mode: config.mode,
                            rules: config.rules.clone(),
                        },
                    );
                    active.push(ActiveBinding {
                        config,
                        policy_id,
                        cgroup: None,
                    });
                }
                Err(e) => {
                    for binding in active {
                        self.retire_policy(binding.policy_id, Some(&binding.config.rules));
                    }
                    return Err(e);
                }
            }
        }
        Ok(active)
    }

    /// Step two: points every bound cgroup at its new policy id, then
    /// retires the old ids and unbinds cgroups no longer configured.
    fn switch_bindings(&mut self, mut active: Vec<ActiveBinding>) {
        for binding in &mut active {
            binding.cgroup = self.resolve(&binding.config.target);
            if let Some((path, id)) = binding.cgroup.clone() {
                if let Err(e) = self.guard_cgroup(&path, id, binding.kernel_binding()) {
                    tracing::error!(cgroup = %path.display(), error = %e, "cannot guard a bound cgroup");
                    binding.cgroup = None;
                }
            }
        }
        let old = std::mem::replace(&mut self.bindings, active);
        let still_bound: Vec<u64> = self
            .bindings
            .iter()
            .filter_map(|b| b.cgroup.as_ref().map(|(_, id)| *id))
            .collect();
        for binding in old {
            if let Some((path, id)) = &binding.cgroup {
                if !still_bound.contains(id) {
                    tracing::info!(cgroup = %path.display(), "no longer bound");
                    let _ = self.kernel.unbind(*id);
                    self.kernel.detach_cgroup(*id);
                }
            }
            self.retire_policy(binding.policy_id, Some(&binding.config.rules));
        }
    }

    /// Attaches the program to a bound cgroup (if not yet) and binds it.
    fn guard_cgroup(&mut self, path: &Path, id: u64, binding: Binding) -> Result<()> {
        let dir = fs::File::open(path).map_err(|source| Error::Cgroup {
            action: "opening",
            path: path.to_owned(),
            source,
        })?;
        // Bind before attaching: the program must never see the cgroup
        // without a binding (it would fail closed and drop all its DNS).
        self.kernel.bind(id, binding)?;
        self.kernel.attach_cgroup(&dir, id)
    }

    /// Where a binding's target is now (path, cgroup id).
    fn resolve(&self, target: &Target) -> Option<(PathBuf, u64)> {
        let path = match target {
            Target::Cgroup(relative) => Some(self.hierarchy.mount.join(relative)),
            Target::Unit(unit) => find_unit_cgroup(&self.hierarchy.mount, unit, &self.runs_root),
        }?;
        let id = fs::metadata(&path).ok().filter(|m| m.is_dir())?.ino();
        Some((path, id))
    }

    /// Runs found in the runs cgroup after a restart: kept, waiting for
    /// their client to resume, if the client lives.
    fn adopt_runs(&mut self, bound: &[(u64, Binding)]) {
        let Ok(entries) = fs::read_dir(&self.runs_root) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(pid) = run_owner(&path) else {
                continue;
            };
            let Ok(metadata) = entry.metadata() else {
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
                    self.policies.insert(
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
                            rules: self.empty_rules.clone(),
                        },
                    );
                    self.runs.insert(
                        binding.policy_id,
                        RunSession {
                            cgroup: path,
                            cgroup_id: id,
                            client_pid: pid,
                            sink: None,
                            backlog: VecDeque::new(),
                            dropped: 0,
                            rules: None,
                            stats_at_start: None,
                            ending: false,
                            send_totals: false,
                        },
                    );
                }
                _ => {
                    tracing::warn!(cgroup = %path.display(), "removing the cgroup of a run whose client is gone");
                    if let Err(e) = remove_cgroup_tree(&path) {
                        tracing::error!(error = %e, "removing a stale run");
                    }
                    let _ = self.kernel.unbind(id);
                }
            }
        }
    }

    /// Labels the policy ids the previous daemon bound to the cgroups that
    /// this configuration binds (rules unknown: its records name no rule).
    fn remember_previous_bindings(&mut self, bound: &[(u64, Binding)]) {
        for config in &self.config.bindings {
            let Some((_, id)) = self.resolve(&config.target) else {
                continue;
            };
            if let Some((_, binding)) = bound.iter().find(|(cgroup, _)| *cgroup == id) {
                self.previous.insert(
                    binding.policy_id,
                    PolicyInfo {
                        kind: config.target.kind(),
                        label: config.policies.join(","),
                        target: config.target.name(),
                        mode: config.mode,
                        rules: self.empty_rules.clone(),
                    },
                );
            }
        }
    }

    /// Removes whatever the kernel maps hold that no binding or run owns
    /// (left by a crash between steps).
    fn collect_garbage(&mut self) -> Result<()> {
        let live: std::collections::HashSet<u32> = self
            .bindings
            .iter()
            .map(|b| b.policy_id)
            .chain(self.runs.keys().copied())
            .collect();
        let cgroups: std::collections::HashSet<u64> = self
            .bindings
            .iter()
            .filter_map(|b| b.cgroup.as_ref().map(|(_, id)| *id))
            .chain(self.runs.values().map(|r| r.cgroup_id))
            .collect();
        for (cgroup, binding) in self.kernel.bindings()? {
            if !live.contains(&binding.policy_id) || !cgroups.contains(&cgroup) {
                self.kernel.unbind(cgroup)?;
            }
        }
        let removed = self.kernel.retain_rules(&|id| live.contains(&id))?;
        if removed > 0 {
            tracing::info!(rules = removed, "removed rules nothing was bound to");
        }
        for (id, _) in self.kernel.all_policy_counters()? {
            if !live.contains(&id) {
                self.kernel.remove_policy_counters(id);
            }
        }
        for cgroup in self.kernel.attached_cgroups() {
            if cgroup != self.runs_root_id && !cgroups.contains(&cgroup) {
                self.kernel.detach_cgroup(cgroup);
            }
        }
        Ok(())
    }

    fn start_run(
        &mut self,
        request: RunRequest,
        client_pid: u32,
        token: u64,
        sink: mpsc::Sender<Frame>,
    ) -> Result<(PathBuf, u32), RunRefusal> {
        let object = loader::object_fingerprint();
        if request.object != object {
            return Err(RunRefusal::Incompatible(format!(
                "the daemon runs another build of guard (programs {object}, yours {})",
                request.object
            )));
        }
        if request.dns_ports != self.config.dns_ports {
            return Err(RunRefusal::Incompatible(format!(
                "the daemon inspects DNS ports {:?}, this run asks for {:?}",
                self.config.dns_ports, request.dns_ports
            )));
        }
        // A guard run inside an already guarded cgroup must stay under that
        // guard too. Standalone, its cgroup nests inside and both programs
        // decide; moved to the daemon's runs cgroup it would escape.
        if let Some(cgroup) = self.already_guarded(client_pid, &self.bound_cgroup_ids()) {
            return Err(RunRefusal::Incompatible(format!(
                "guard run is already inside a guarded cgroup ({}), whose guard must keep applying",
                cgroup.display()
            )));
        }
        let mut policies = Vec::new();
        for text in &request.policies {
            policies.push(Policy::parse(&text.text, &text.path)?);
        }
        let (policies, rules) =
            crate::run::compile(policies, &request.deny, &request.allow, request.audit)?;
        let live = self.runs.len() + self.bindings.len();
        if live + 1 >= self.config.max_policies as usize {
            return Err(RunRefusal::Error(format!(
                "the daemon already guards {live} runs and bindings (max_policies {})",
                self.config.max_policies
            )));
        }
        let nonce = std::collections::hash_map::RandomState::new();
        let nonce = std::hash::BuildHasher::hash_one(&nonce, (client_pid, Instant::now()));
        let path = self.runs_root.join(run_cgroup_name(client_pid, nonce));
        let cgroup = RunCgroup::create(&path)?;
        let rules = Arc::new(rules);
        let policy_id = match self.install_policy(&rules) {
            Ok(id) => id,
            Err(e) => {
                let _ = cgroup.remove();
                return Err(e.into());
            }
        };
        let bound = self.kernel.bind(
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
            let _ = self.kernel.remove_rules(policy_id, &rules);
            self.kernel.remove_policy_counters(policy_id);
            return Err(e.into());
        }
        self.policies.insert(
            policy_id,
            PolicyInfo {
                kind: "run",
                label: policy_label(&policies),
                target: format!("guard run (pid {client_pid})"),
                mode: if request.audit {
                    Mode::Audit
                } else {
                    Mode::Enforce
                },
                rules: rules.clone(),
            },
        );
        self.runs.insert(
            policy_id,
            RunSession {
                cgroup: path.clone(),
                cgroup_id: cgroup.id(),
                client_pid,
                sink: Some((token, sink)),
                backlog: VecDeque::new(),
                dropped: 0,
                rules: Some(rules),
                stats_at_start: self.kernel.egress_stats(),
                ending: false,
                send_totals: false,
            },
        );
        tracing::debug!(cgroup = %path.display(), policy_id, client = client_pid, "run started");
        Ok((path, policy_id))
    }

    fn resume_run(
        &mut self,
        cgroup: &Path,
        run: &RunRequest,
        token: u64,
        sink: mpsc::Sender<Frame>,
    ) -> Reply {
        let Some((policy_id, session)) = self.runs.iter_mut().find(|(_, s)| s.cgroup == cgroup)
        else {
            return Reply::Error {
                message: format!("no run in {}", cgroup.display()),
            };
        };
        // A run adopted after a restart: name its rules again (the same
        // build compiles the same request to the same rules).
        if session.rules.is_none() && run.object == loader::object_fingerprint() {
            let compiled = run
                .policies
                .iter()
                .map(|p| Policy::parse(&p.text, &p.path))
                .collect::<Result<Vec<_>, _>>()
                .ok()
                .and_then(|policies| {
                    crate::run::compile(policies, &run.deny, &run.allow, run.audit).ok()
                });
            if let Some((policies, rules)) = compiled {
                let rules = Arc::new(rules);
                session.rules = Some(rules.clone());
                if let Some(info) = self.policies.get_mut(policy_id) {
                    info.label = policy_label(&policies);
                    info.target = format!("guard run (pid {})", session.client_pid);
                    info.rules = rules;
                }
            }
        }
        for record in session.backlog.drain(..) {
            if sink.try_send(Frame::Event(record)).is_err() {
                session.dropped += 1;
            }
        }
        session.sink = Some((token, sink));
        tracing::info!(cgroup = %cgroup.display(), "a run's client resumed");
        Reply::RunStarted {
            cgroup: cgroup.to_owned(),
            policy_id: *policy_id,
        }
    }

    /// Ends a run: kills what is left in its cgroup, forwards its last
    /// events and totals, and removes its cgroup, binding, rules, counters.
    fn finish_run(&mut self, policy_id: u32, ring: &mut RingBuf<MapData>, send_totals: bool) {
        let Some(session) = self.runs.get_mut(&policy_id) else {
            return;
        };
        session.send_totals |= send_totals;
        if session.ending {
            return;
        }
        session.ending = true;
        let cgroup = session.cgroup.clone();
        // Killing and removing the cgroup can take a while (processes that
        // are slow to die); it must not hold up every other run's events.
        match self.tx.clone() {
            Some(tx) => {
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = remove_cgroup_tree(&cgroup) {
                        tracing::error!(error = %e, "removing a run's cgroup");
                    }
                    let _ = tx.blocking_send(Msg::Removed { policy_id });
                });
            }
            None => {
                if let Err(e) = remove_cgroup_tree(&cgroup) {
                    tracing::error!(error = %e, "removing a run's cgroup");
                }
                self.complete_run(policy_id, ring);
            }
        }
    }

    /// The rest of ending a run, once its cgroup is gone.
    fn complete_run(&mut self, policy_id: u32, ring: &mut RingBuf<MapData>) {
        // Everything the run's processes did is in the ring now.
        self.drain(ring);
        let Some(session) = self.runs.remove(&policy_id) else {
            return;
        };
        if session.send_totals {
            if let Some((_, sink)) = &session.sink {
                let counters = self.kernel.policy_counters(policy_id).unwrap_or_default();
                let seen = if session.rules.is_some() {
                    self.kernel
                        .seen_counts(policy_id)
                        .into_iter()
                        .map(|((hash, qtype), count)| (hash, qtype, count))
                        .collect()
                } else {
                    Vec::new()
                };
                let program_stats = match (session.stats_at_start, self.kernel.egress_stats()) {
                    (Some((runs0, ns0)), Some((runs1, ns1))) => Some(ProgramStats::new(
                        runs1.saturating_sub(runs0),
                        ns1.saturating_sub(ns0),
                    )),
                    _ => None,
                };
                let totals = RunTotals {
                    counters: Counters::from_kernel(&counters),
                    events_lost: counters.values[Counter::EventsLost as usize] + session.dropped,
                    seen,
                    program_stats,
                };
                // Sent with `send` semantics on a full queue would block the
                // daemon; the totals get a slot of their own instead.
                let sink = sink.clone();
                tokio::spawn(async move {
                    let _ = sink
                        .send(Frame::json(&Reply::RunFinished(Box::new(totals))))
                        .await;
                });
            }
        }
        let _ = self.kernel.unbind(session.cgroup_id);
        self.kernel.forget_seen(policy_id);
        self.retire_policy(policy_id, session.rules.as_deref());
        tracing::debug!(cgroup = %session.cgroup.display(), policy_id, "run finished");
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            let bytes = item.to_vec();
            drop(item);
            self.dispatch(bytes);
        }
    }

    fn dispatch(&mut self, bytes: Vec<u8>) {
        let record = decode(&bytes);
        let policy_id = policy_of(&bytes);
        match &record {
            Some(Record::Exec {
                tid, path, args, ..
            }) => self.procs.on_exec(*tid, path.clone(), args.clone()),
            Some(Record::ExecResult { pid, tid, ret }) => {
                self.procs.on_exec_result(*pid, *tid, *ret)
            }
            Some(Record::Fork {
                parent,
                child,
                comm,
            }) => {
                if self.procs.len() >= 60_000 {
                    // A long-lived daemon must not remember every process
                    // it ever saw; chains of older processes come from /proc.
                    self.procs = ProcessTable::new(0);
                }
                self.procs.on_fork(*parent, *child, comm.clone())
            }
            Some(Record::Dns(query)) => self.on_query(query),
            None => tracing::warn!("undecodable event record"),
        }
        let Some(session) = policy_id.and_then(|id| self.runs.get_mut(&id)) else {
            return;
        };
        match &session.sink {
            Some((_, sink)) => {
                if sink.try_send(Frame::Event(bytes)).is_err() {
                    session.dropped += 1;
                }
            }
            None if session.backlog.len() < RUN_BACKLOG => session.backlog.push_back(bytes),
            None => session.dropped += 1,
        }
    }

    /// Logs a reported query (one structured record per blocked call) and
    /// passes it to `guard events`.
    fn on_query(&mut self, query: &crate::events::DnsQuery) {
        let info = self
            .policies
            .get(&query.policy_id)
            .or_else(|| self.previous.get(&query.policy_id));
        // A `guard run` client ends its own blocked sockets; for bound
        // cgroups the daemon does, so the asker fails at once instead of
        // waiting for its timeout.
        if query.verdict.dropped() && info.is_some_and(|i| i.kind != "run") {
            let protocol = match query.transport {
                crate::events::Transport::Tcp => crate::sockdiag::Protocol::Tcp,
                crate::events::Transport::Udp => crate::sockdiag::Protocol::Udp,
            };
            if let Err(e) = crate::sockdiag::destroy(
                protocol,
                query.source,
                query.resolver,
                query.socket_cookie,
            ) {
                tracing::debug!(error = %e, "could not end a blocked query's socket");
            }
        }
        let rules = info.map_or(&self.empty_rules, |i| &i.rules);
        // The bound cgroups are read once per event, and only if the chain
        // has a process the kernel programs did not report.
        let bound = std::cell::OnceCell::new();
        let chain = self.procs.chain_within(query.pid, |pid| {
            self.already_guarded(pid, bound.get_or_init(|| self.bound_cgroup_ids()))
                .is_some()
        });
        let record = EventRecord::new(query, chain, rules, &self.clock);
        let (kind, label, target) = info.map_or(("unknown", "", ""), |i| {
            (i.kind, i.label.as_str(), i.target.as_str())
        });
        let rule = record.rule.as_ref().map(|r| r.to_string());
        let chain = record.chain_text();
        match record.verdict.as_str() {
            "allowed" => {}
            "blocked" | "unreadable" => tracing::warn!(
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
        let mut value = serde_json::to_value(&record).unwrap_or_default();
        if let Some(object) = value.as_object_mut() {
            object.insert("binding".into(), kind.into());
            object.insert("policy".into(), label.into());
            object.insert("guarded".into(), target.into());
        }
        if self.recent.len() >= RECENT_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back(value.clone());
        if !self.subscribers.is_empty() {
            let frame = Reply::Event(Box::new(value));
            let frame = Frame::json(&frame);
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

    fn housekeeping(&mut self, ring: &mut RingBuf<MapData>) {
        // Runs whose client is gone (found after a restart).
        let orphans: Vec<u32> = self
            .runs
            .iter()
            .filter(|(_, s)| s.sink.is_none() && !client_alive(s.client_pid))
            .map(|(id, _)| *id)
            .collect();
        for id in orphans {
            tracing::warn!(
                policy_id = id,
                "the client of an adopted run is gone; ending the run"
            );
            self.finish_run(id, ring, false);
        }
        self.refresh_bindings();
        // Run cgroups nobody owns (a crash between mkdir and the reply).
        if let Ok(entries) = fs::read_dir(&self.runs_root) {
            for entry in entries.flatten() {
                let path = entry.path();
                if run_owner(&path).is_some() && !self.runs.values().any(|s| s.cgroup == path) {
                    tracing::warn!(cgroup = %path.display(), "removing a run cgroup nobody owns");
                    let _ = remove_cgroup_tree(&path);
                }
            }
        }
        self.subscribers.retain(|s| !s.is_closed());
    }

    /// Follows bound units and cgroups that started, stopped or restarted.
    fn refresh_bindings(&mut self) {
        for index in 0..self.bindings.len() {
            let now = self.resolve(&self.bindings[index].config.target);
            let before = self.bindings[index].cgroup.clone();
            if now.as_ref().map(|(_, id)| *id) == before.as_ref().map(|(_, id)| *id) {
                continue;
            }
            if let Some((path, id)) = &before {
                tracing::info!(cgroup = %path.display(), "bound cgroup is gone");
                let _ = self.kernel.unbind(*id);
                self.kernel.detach_cgroup(*id);
            }
            self.bindings[index].cgroup = None;
            if let Some((path, id)) = now {
                let binding = self.bindings[index].kernel_binding();
                match self.guard_cgroup(&path, id, binding) {
                    Ok(()) => {
                        tracing::info!(cgroup = %path.display(), target = %self.bindings[index].config.target.name(), "guarding");
                        self.bindings[index].cgroup = Some((path, id));
                    }
                    Err(e) => {
                        tracing::error!(cgroup = %path.display(), error = %e, "cannot guard a bound cgroup")
                    }
                }
            }
        }
    }

    /// The cgroup directory of a process.
    fn cgroup_of(&self, pid: u32) -> Option<PathBuf> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let relative = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        Some(self.hierarchy.mount.join(relative.trim_start_matches('/')))
    }

    /// Ids of the cgroups bound in the kernel map.
    fn bound_cgroup_ids(&self) -> std::collections::HashSet<u64> {
        self.kernel
            .bindings()
            .map(|bound| bound.into_iter().map(|(id, _)| id).collect())
            .unwrap_or_default()
    }

    /// The cgroup of a process that is already guarded, by a binding of
    /// this daemon (`bound`: [`Daemon::bound_cgroup_ids`]) or by a
    /// standalone `guard run` around it.
    fn already_guarded(&self, pid: u32, bound: &std::collections::HashSet<u64>) -> Option<PathBuf> {
        let cgroup = self.cgroup_of(pid)?;
        let mut probe = cgroup.clone();
        while probe.starts_with(&self.hierarchy.mount) {
            let in_run = probe
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(RUN_PREFIX));
            let is_bound = fs::metadata(&probe).is_ok_and(|m| bound.contains(&m.ino()));
            if in_run || is_bound {
                return Some(cgroup);
            }
            if !probe.pop() {
                break;
            }
        }
        None
    }

    /// `guard ensure-guarded`: is the asking process's cgroup guarded by a
    /// configured binding (bound now if it just appeared)?
    fn ensure_guarded(&mut self, pid: u32) -> Reply {
        self.refresh_bindings();
        let cgroup = self.cgroup_of(pid);
        let Some(cgroup) = cgroup else {
            return Reply::Error {
                message: format!("cannot read the cgroup of pid {pid}"),
            };
        };
        match self.bindings.iter().find(|b| {
            b.cgroup
                .as_ref()
                .is_some_and(|(path, _)| cgroup.starts_with(path))
        }) {
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

    /// Re-reads the configuration and policies and swaps them in. A config
    /// that does not validate changes nothing. Tells systemd, and logs.
    fn reload(&mut self) -> Result<String, String> {
        notify(&[sd_notify::NotifyState::Reloading]);
        let result = self.swap_configuration();
        match &result {
            Ok(message) => tracing::info!("{message}"),
            Err(message) => tracing::error!("reload refused: {message}"),
        }
        notify(&[sd_notify::NotifyState::Ready]);
        result
    }

    fn swap_configuration(&mut self) -> Result<String, String> {
        let config = Config::load(&self.config.path).map_err(|e| e.to_string())?;
        let mut notes = String::new();
        if config.restart_only_settings() != self.config.restart_only_settings() {
            notes = " (socket, pin_dir, runs_cgroup, metrics_address, dns_ports and capacities change only on restart)".into();
        }
        let Config { bindings, .. } = config;
        let count = bindings.len();
        let active = self.install_bindings(bindings).map_err(|e| e.to_string())?;
        self.switch_bindings(active);
        Ok(format!(
            "reloaded {}: {count} binding(s){notes}",
            self.config.path.display()
        ))
    }

    fn status(&self) -> Status {
        let counters_of = |id: u32| {
            self.kernel
                .policy_counters(id)
                .map(|c| {
                    (
                        Counters::from_kernel(&c),
                        c.values[Counter::EventsLost as usize],
                    )
                })
                .unwrap_or_default()
        };
        let mut bindings: Vec<BindingStatus> = self
            .bindings
            .iter()
            .map(|b| {
                let (counters, events_lost) = counters_of(b.policy_id);
                BindingStatus {
                    kind: b.config.target.kind().into(),
                    target: b.config.target.name(),
                    cgroup: b.cgroup.as_ref().map(|(p, _)| p.clone()),
                    policies: b.config.policies.clone(),
                    mode: b.config.mode,
                    policy_id: b.policy_id,
                    counters,
                    events_lost,
                }
            })
            .collect();
        let mut runs: Vec<(&u32, &RunSession)> = self.runs.iter().collect();
        runs.sort_by_key(|(id, _)| **id);
        for (id, run) in runs {
            let (counters, events_lost) = counters_of(*id);
            let info = self.policies.get(id);
            bindings.push(BindingStatus {
                kind: "run".into(),
                target: info.map(|i| i.target.clone()).unwrap_or_default(),
                cgroup: Some(run.cgroup.clone()),
                policies: info
                    .map(|i| i.label.split(',').map(str::to_owned).collect())
                    .unwrap_or_default(),
                mode: info.map(|i| i.mode).unwrap_or_default(),
                policy_id: *id,
                counters,
                events_lost,
            });
        }
        let global = |c| self.kernel.counter(c).unwrap_or(0);
        let mut programs = vec![ProgramStatus {
            name: guard_common::maps::PROGRAM_DNS_EGRESS.into(),
            attached_to: format!("{} cgroup(s)", self.kernel.attached_cgroups().len()),
            verified_instructions: self.kernel.egress_instructions(),
        }];
        for (name, event) in [
            (
                guard_common::maps::PROGRAM_EXEC_ENTER,
                "syscalls/sys_enter_execve",
            ),
            (
                guard_common::maps::PROGRAM_EXEC_EXIT,
                "syscalls/sys_exit_execve",
            ),
            (guard_common::maps::PROGRAM_FORK, "sched/sched_process_fork"),
        ] {
            programs.push(ProgramStatus {
                name: name.into(),
                attached_to: format!("tracepoint {event}"),
                verified_instructions: None,
            });
        }
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs(),
            generation: self.generation.clone(),
            pin_dir: self.kernel.dir().to_owned(),
            config: self.config.path.clone(),
            runs_cgroup: self.runs_root.clone(),
            programs,
            bindings,
            totals: Counters {
                inspected: global(Counter::Inspected),
                blocked: global(Counter::Blocked),
                audited: global(Counter::Audited),
                malformed: global(Counter::Malformed),
                unbound: global(Counter::Unbound),
            },
            events_lost: global(Counter::EventsLost),
            rules_loaded: self.kernel.rule_count().unwrap_or(0),
        }
    }

    fn metrics(&self) -> String {
        let mut by_label: BTreeMap<(String, String), (Counters, u64)> = self.retired.clone();
        for (id, info) in &self.policies {
            if let Ok(counters) = self.kernel.policy_counters(*id) {
                let entry = by_label
                    .entry((info.kind.to_owned(), info.label.clone()))
                    .or_default();
                entry.0.add(&Counters::from_kernel(&counters));
                entry.1 += counters.values[Counter::EventsLost as usize];
            }
        }
        let global = |c| self.kernel.counter(c).unwrap_or(0);
        metrics::render(&metrics::Snapshot {
            by_policy: by_label,
            unbound: global(Counter::Unbound),
            events_lost: global(Counter::EventsLost),
            runs: self.runs.len(),
            bindings: self.bindings.iter().filter(|b| b.cgroup.is_some()).count(),
            rules: self.kernel.rule_count().unwrap_or(0),
        })
    }
}

enum RunRefusal {
    Incompatible(String),
    Error(String),
}

impl<E: std::fmt::Display> From<E> for RunRefusal {
    fn from(error: E) -> RunRefusal {
        RunRefusal::Error(error.to_string())
    }
}

impl ActiveBinding {
    fn kernel_binding(&self) -> Binding {
        Binding {
            policy_id: self.policy_id,
            audit_only: u8::from(self.config.mode == Mode::Audit),
            record: 0,
            _pad: [0; 2],
            label_mask: self.config.rules.label_mask(),
        }
    }
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

/// A unit's cgroup: the directory named after it, anywhere in the tree
/// (systemd places units in their slice). Our runs cgroup is skipped.
fn find_unit_cgroup(mount: &Path, unit: &str, skip: &Path) -> Option<PathBuf> {
    for slice in ["system.slice", "user.slice", ""] {
        let candidate = mount.join(slice).join(unit);
        if candidate.is_dir() {
            return Some(candidate);
        }
    }
    let mut queue = VecDeque::from([(mount.to_path_buf(), 0u32)]);
    while let Some((dir, depth)) = queue.pop_front() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            if path == skip {
                continue;
            }
            if entry.file_name().to_str() == Some(unit) {
                return Some(path);
            }
            if depth < 8 {
                queue.push_back((path, depth + 1));
            }
        }
    }
    None
}
