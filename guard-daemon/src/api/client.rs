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
    kernel::cgroup::remove_cgroup_tree,
};

/// How long a finished run waits for a daemon that went away to come back
/// before it gives up on the daemon's counters.
const DAEMON_RETURN_TIMEOUT: Duration = Duration::from_secs(30);
const RECONNECT_INTERVAL: Duration = Duration::from_millis(100);
/// The first exchange with the daemon (it answers in milliseconds; a hung
/// daemon must not hang every deploy).
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

pub fn own_object() -> String {
    kernel::object_fingerprint()
}

pub enum Started {
    /// The daemon created and bound the run's cgroup.
    Daemon(RunSession),
    /// No daemon listens: run standalone.
    NoDaemon,
    /// A daemon listens but cannot host this run as asked.
    Incompatible(String),
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
        Err(e) => return Err(unreachable_daemon(socket, e)),
    };
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let written =
        api::write_frame_blocking(&mut stream, &Frame::json(&Request::Run(request.clone())));
    let reply: Reply = api::read_json_blocking(&mut stream)
        .map_err(|e| unreachable_daemon(socket, written.err().unwrap_or(e)))?;
    let _ = stream.set_read_timeout(None);
    match reply {
        Reply::RunStarted { cgroup, policy_id } => Ok(Started::Daemon(RunSession {
            request: request.clone(),
            socket: socket.to_owned(),
            cgroup,
            policy_id,
            stream: Some(stream),
            link: None,
        })),
        Reply::Incompatible { message } => Ok(Started::Incompatible(message)),
        Reply::Error { message } => Err(Error::Daemon(message)),
        other => Err(Error::Daemon(format!("unexpected reply {other:?}"))),
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
    /// The connection until the async side takes it over.
    stream: Option<StdUnixStream>,
    link: Option<Link>,
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
    /// ends the run itself (kills and removes the cgroup).
    pub async fn finish(mut self, mut feed: impl FnMut(&[u8])) -> Result<RunTotals> {
        let cgroup = self.cgroup.clone();
        let link = self.link();
        link.finishing.store(true, Ordering::SeqCst);
        {
            let mut writer = link.writer.lock().await;
            if let Some(writer) = writer.as_mut() {
                let _ = api::write_frame(writer, &Frame::json(&Request::Finish)).await;
            }
        }
        let wait = async {
            loop {
                match link.incoming.recv().await {
                    Some(Incoming::Record(bytes)) => feed(&bytes),
                    Some(Incoming::Totals(totals)) => return Ok(totals),
                    Some(Incoming::Lost) => eprintln!(
                        "guard: lost the connection to the guard daemon; waiting for it to finish the run"
                    ),
                    Some(Incoming::Resumed) => eprintln!("guard: reconnected to the guard daemon"),
                    Some(Incoming::Failed(message)) => return Err(Error::Daemon(message)),
                    None => return Err(Error::Daemon("the connection ended".into())),
                }
            }
        };
        match tokio::time::timeout(DAEMON_RETURN_TIMEOUT, wait).await {
            Ok(result) => result,
            Err(_) => {
                let _ = remove_cgroup_tree(&cgroup);
                Err(Error::Daemon(format!(
                    "no answer within {}s; removed {} myself",
                    DAEMON_RETURN_TIMEOUT.as_secs(),
                    cgroup.display()
                )))
            }
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
