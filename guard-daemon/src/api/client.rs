//! The client side of the daemon's API: `guard run` through the daemon,
//! and `guard status`, `guard reload`, `guard events`.
use std::{
    io,
    os::unix::net::UnixStream as StdUnixStream,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    net::{unix::OwnedWriteHalf, UnixStream},
    sync::{mpsc, Mutex},
};

use crate::{
    api::{self, Frame, Reply, Request, RunRequest, RunTotals},
    error::{Error, Result},
    kernel,
    kernel::{
        cgroup::remove_cgroup_tree,
        pinned::{generation_pinned, PinnedMaps},
    },
};

/// How long a finished run waits for a daemon that went away to come back
/// before it ends the run itself, with the counters read from the kernel.
const DAEMON_RETURN_TIMEOUT: Duration = Duration::from_secs(30);
/// Tests shorten [`DAEMON_RETURN_TIMEOUT`] with this (debug builds only).
pub const DAEMON_RETURN_TIMEOUT_ENV: &str = "GUARD_TEST_DAEMON_RETURN_MS";
const RECONNECT_INTERVAL: Duration = Duration::from_millis(100);
/// The first exchange with the daemon (it answers in milliseconds; a hung
/// daemon must not hang every deploy: the run goes standalone instead).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Tests shorten [`HANDSHAKE_TIMEOUT`] with this (debug builds only).
pub const HANDSHAKE_TIMEOUT_ENV: &str = "GUARD_TEST_HANDSHAKE_MS";
/// Tests make the run's pinned counters unreadable with this (`1`, debug
/// builds only), as with a daemon that does not say where they are.
pub const NO_PINNED_COUNTERS_ENV: &str = "GUARD_TEST_NO_PINNED_COUNTERS";

pub fn own_object() -> String {
    kernel::object_fingerprint()
}

pub enum Started {
    /// The daemon created and bound the run's cgroup.
    Daemon(Box<RunSession>),
    /// No daemon listens: run standalone.
    NoDaemon,
    /// A daemon listens but cannot host this run as asked.
    Incompatible(String),
    /// Something is on the socket but did not answer as a daemon does (no
    /// answer in time, the connection closed, a squatter): nothing was set
    /// up there, so the run goes standalone.
    Unanswered(String),
}

/// Asks the daemon for a guarded cgroup. Blocking: called before guard
/// starts its async runtime.
pub fn start_run(socket: &Path, request: &RunRequest) -> Result<Started> {
    let mut stream = match StdUnixStream::connect(socket) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(Started::NoDaemon)
        }
        Err(e) => {
            return Ok(Started::Unanswered(
                unreachable_daemon(socket, e).to_string(),
            ))
        }
    };
    let timeout = crate::fault::duration(HANDSHAKE_TIMEOUT_ENV, HANDSHAKE_TIMEOUT);
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let written =
        api::write_frame_blocking(&mut stream, &Frame::json(&Request::Run(request.clone())));
    let reply: Reply = match api::read_json_blocking(&mut stream) {
        Ok(reply) => reply,
        Err(e) => {
            let e = written.err().unwrap_or(e);
            let error = if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                format!(
                    "the guard daemon on {} did not answer within {}s",
                    socket.display(),
                    timeout.as_secs_f32()
                )
            } else {
                unreachable_daemon(socket, e).to_string()
            };
            return Ok(Started::Unanswered(error));
        }
    };
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_write_timeout(None);
    match reply {
        Reply::RunStarted {
            cgroup,
            policy_id,
            pin_dir,
        } => {
            // Opened now, while the daemon is known to be there: the maps
            // stay readable through these descriptors whatever happens to
            // the daemon or the pins later.
            let maps = pin_dir
                .as_deref()
                .filter(|_| !crate::fault::asked(NO_PINNED_COUNTERS_ENV))
                .and_then(|dir| PinnedMaps::for_run_totals(dir).ok());
            Ok(Started::Daemon(Box::new(RunSession {
                request: request.clone(),
                socket: socket.to_owned(),
                cgroup,
                policy_id,
                pin_dir,
                maps,
                stream: Some(stream),
                link: None,
            })))
        }
        Reply::Incompatible { message } => Ok(Started::Incompatible(message)),
        Reply::Error { message } => Err(Error::Daemon(message)),
        other => Ok(Started::Unanswered(format!(
            "the guard daemon on {} gave an unexpected reply {other:?}",
            socket.display()
        ))),
    }
}

pub(super) fn unreachable_daemon(socket: &Path, error: io::Error) -> Error {
    Error::io(format!(
        "talking to the guard daemon on {}",
        socket.display()
    ))(error)
}

/// A run hosted by the daemon, from the client's side. Dropping it before
/// [`RunSession::finish`] closes the connection, and the daemon ends the
/// run (kills what is in the cgroup and removes it).
pub struct RunSession {
    request: RunRequest,
    socket: PathBuf,
    cgroup: PathBuf,
    policy_id: u32,
    /// The pinned generation guarding the run (None from a daemon that
    /// does not say).
    pin_dir: Option<PathBuf>,
    /// The run's counters, readable without the daemon.
    maps: Option<PinnedMaps>,
    /// The connection until the async side takes it over.
    stream: Option<StdUnixStream>,
    link: Option<Link>,
}

/// How a run hosted by the daemon ended.
pub enum Ending {
    /// The daemon ended it and sent its totals.
    Totals(RunTotals),
    /// The run was ended without the daemon (its cgroup removed here).
    WithoutDaemon {
        /// The run's totals as the kernel counted them, read from the
        /// pinned maps once nothing was left in its cgroup; None when they
        /// could not be read.
        counted: Option<RunTotals>,
        /// The pinned generation guarding the run is gone (`guard daemon
        /// --uninstall`, or a newer generation that could not carry the
        /// run over): the guard was removed under the run.
        guard_removed: bool,
        /// Why, in a sentence.
        reason: String,
    },
}

/// What the connection task passes on.
enum Incoming {
    Record(Vec<u8>),
    Totals(RunTotals),
    Lost,
    Resumed,
    Failed(String),
}

struct Link {
    incoming: mpsc::Receiver<Incoming>,
    writer: Arc<Mutex<Option<OwnedWriteHalf>>>,
    finishing: Arc<AtomicBool>,
}

impl RunSession {
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    fn resume_request(&self) -> Request {
        Request::Resume {
            cgroup: self.cgroup.clone(),
            policy_id: self.policy_id,
            run: Box::new(self.request.clone()),
        }
    }

    /// Starts the task that reads the connection (inside the runtime).
    fn link(&mut self) -> &mut Link {
        if self.link.is_none() {
            let (tx, incoming) = mpsc::channel(4096);
            let writer = Arc::new(Mutex::new(None));
            let finishing = Arc::new(AtomicBool::new(false));
            let stream = self.stream.take().and_then(|s| {
                s.set_nonblocking(true).ok()?;
                UnixStream::from_std(s).ok()
            });
            // Without a usable stream the task starts by reconnecting.
            let reader = stream.map(|stream| {
                let (reader, write_half) = stream.into_split();
                if let Ok(mut slot) = writer.try_lock() {
                    *slot = Some(write_half);
                }
                reader
            });
            tokio::spawn(connection_task(
                reader,
                tx,
                writer.clone(),
                finishing.clone(),
                self.resume_request(),
                self.socket.clone(),
            ));
            self.link = Some(Link {
                incoming,
                writer,
                finishing,
            });
        }
        self.link.as_mut().expect("just set")
    }

    /// The next record of the run (waits through daemon restarts).
    pub async fn next_record(&mut self) -> Vec<u8> {
        loop {
            match self.link().incoming.recv().await {
                Some(Incoming::Record(bytes)) => return bytes,
                Some(Incoming::Lost) => eprintln!(
                    "guard: lost the connection to the guard daemon; the command stays guarded; reconnecting"
                ),
                Some(Incoming::Resumed) => eprintln!("guard: reconnected to the guard daemon"),
                Some(Incoming::Failed(message)) => {
                    eprintln!("guard: the guard daemon: {message}");
                    std::future::pending::<()>().await;
                }
                Some(Incoming::Totals(_)) | None => std::future::pending::<()>().await,
            }
        }
    }

    /// Tells the daemon the command is done, passes on the last records and
    /// returns the run's totals. If the daemon does not come back in time,
    /// refuses to resume the run, or the guard is removed meanwhile, ends
    /// the run itself (removes the cgroup) with the counters it read from
    /// the kernel.
    pub async fn finish(mut self, mut feed: impl FnMut(&[u8])) -> Ending {
        let cgroup = self.cgroup.clone();
        // What is left in the cgroup is killed first, so that the counters
        // are final: read now, they are the verdict whatever happens to
        // the daemon next (a successor may remove them).
        if let Err(e) = crate::kernel::cgroup::kill_processes(&cgroup) {
            tracing::warn!(error = %e, "killing what the command left behind");
        }
        let counted = self.maps.as_ref().and_then(|maps| {
            RunTotals::from_kernel(maps, self.policy_id, self.request.record).ok()
        });
        let pin_dir = self.pin_dir.clone();
        let guard_removed = move || pin_dir.as_deref().is_some_and(|d| !generation_pinned(d));
        let timeout = crate::fault::duration(DAEMON_RETURN_TIMEOUT_ENV, DAEMON_RETURN_TIMEOUT);
        let link = self.link();
        link.finishing.store(true, Ordering::SeqCst);
        {
            let mut writer = link.writer.lock().await;
            if let Some(writer) = writer.as_mut() {
                let _ = api::write_frame(writer, &Frame::json(&Request::Finish)).await;
            }
        }
        let wait = async {
            let mut removal_check = tokio::time::interval(RECONNECT_INTERVAL);
            loop {
                tokio::select! {
                    incoming = link.incoming.recv() => match incoming {
                        Some(Incoming::Record(bytes)) => feed(&bytes),
                        Some(Incoming::Totals(totals)) => return Ok(totals),
                        Some(Incoming::Lost) => eprintln!(
                            "guard: lost the connection to the guard daemon; waiting for it to finish the run"
                        ),
                        Some(Incoming::Resumed) => eprintln!("guard: reconnected to the guard daemon"),
                        Some(Incoming::Failed(message)) => {
                            return Err(format!("the guard daemon could not finish the run: {message}"))
                        }
                        None => return Err("the connection to the guard daemon ended".to_owned()),
                    },
                    _ = removal_check.tick() => {
                        if guard_removed() {
                            return Err("the guard was removed".to_owned());
                        }
                    }
                }
            }
        };
        let reason = match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(totals)) => return Ending::Totals(totals),
            Ok(Err(reason)) => reason,
            Err(_) => format!(
                "the guard daemon did not come back within {}s",
                timeout.as_secs_f32()
            ),
        };
        if let Err(e) = remove_cgroup_tree(&cgroup) {
            eprintln!("guard: {e}");
        }
        Ending::WithoutDaemon {
            counted,
            guard_removed: guard_removed(),
            reason,
        }
    }
}

/// Reads the connection, and reconnects (resuming the run) when the daemon
/// restarts. Owns the read half so reads are never cut off mid-frame.
async fn connection_task(
    mut reader: Option<tokio::net::unix::OwnedReadHalf>,
    tx: mpsc::Sender<Incoming>,
    writer: Arc<Mutex<Option<OwnedWriteHalf>>>,
    finishing: Arc<AtomicBool>,
    resume: Request,
    socket: PathBuf,
) {
    loop {
        if let Some(read_half) = reader.as_mut() {
            match api::read_frame(read_half).await {
                Ok(Some(Frame::Event(bytes))) => {
                    if tx.send(Incoming::Record(bytes)).await.is_err() {
                        return;
                    }
                    continue;
                }
                Ok(Some(Frame::Json(bytes))) => {
                    match serde_json::from_slice::<Reply>(&bytes) {
                        Ok(Reply::RunFinished(totals)) => {
                            let _ = tx.send(Incoming::Totals(*totals)).await;
                            return;
                        }
                        Ok(Reply::Error { message }) => {
                            let _ = tx.send(Incoming::Failed(message)).await;
                            return;
                        }
                        _ => {}
                    }
                    continue;
                }
                Ok(None) | Err(_) => {
                    *writer.lock().await = None;
                    reader = None;
                    if tx.send(Incoming::Lost).await.is_err() {
                        return;
                    }
                }
            }
        }
        // Reconnect and resume.
        tokio::time::sleep(RECONNECT_INTERVAL).await;
        if tx.is_closed() {
            return;
        }
        let Ok(stream) = UnixStream::connect(&socket).await else {
            continue;
        };
        let (mut read_half, mut write_half) = stream.into_split();
        if api::write_frame(&mut write_half, &Frame::json(&resume))
            .await
            .is_err()
        {
            continue;
        }
        match api::read_json::<_, Reply>(&mut read_half).await {
            Ok(Some(Reply::RunStarted { .. })) => {
                let mut slot = writer.lock().await;
                if finishing.load(Ordering::SeqCst) {
                    let _ = api::write_frame(&mut write_half, &Frame::json(&Request::Finish)).await;
                }
                *slot = Some(write_half);
                reader = Some(read_half);
                if tx.send(Incoming::Resumed).await.is_err() {
                    return;
                }
            }
            Ok(Some(Reply::Error { message })) => {
                let _ = tx.send(Incoming::Failed(message)).await;
                return;
            }
            _ => continue,
        }
    }
}
