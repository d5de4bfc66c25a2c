//! The daemon's socket: accepting connections, checking who is asking,
//! and turning each request into a message for the event loop (one task per
//! connection; a `guard run` client's connection lives as long as its run).
use std::{fs, os::unix::fs::PermissionsExt as _, path::Path};

use tokio::{
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use super::Msg;
use crate::{
    api::{self, Frame, Reply, Request},
    error::{Error, Result},
};

/// Frames queued for one client before further ones are dropped (counted).
pub(super) const CLIENT_QUEUE: usize = 65_536;

/// Accepts connections for as long as the daemon runs.
pub(super) async fn accept(listener: UnixListener, tx: mpsc::Sender<Msg>) {
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
}

/// The socket: its directory root-only, the socket itself 0600. Peer
/// credentials are checked too, in case the modes are loosened.
pub(super) fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(Error::io(format!("securing {}", dir.display())))?;
    }
    // A stale socket of a daemon that died is replaced; anything else on
    // the path is someone else's file, and not removed.
    if let Ok(metadata) = fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt as _;
        if !metadata.file_type().is_socket() {
            return Err(Error::io(format!(
                "{} exists and is not a socket; remove it, or set `socket` in the configuration",
                path.display()
            ))(std::io::Error::from_raw_os_error(
                libc::EEXIST,
            )));
        }
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
    reader: tokio::net::unix::OwnedReadHalf,
    mut writer: tokio::net::unix::OwnedWriteHalf,
    tx: mpsc::Sender<Msg>,
    token: u64,
) {
    let new_run = matches!(start, Msg::Run { .. });
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
    crate::fault::point(if new_run {
        "run-replied"
    } else {
        "run-resumed"
    });
    // Requests are read by a task of their own: reading a frame is not
    // cancel-safe, and in the select below a record to forward would cut a
    // half-read `finish` off and desynchronise the stream.
    let mut requests = read_requests(reader);
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
            request = requests.recv(), if !finishing => match request {
                Some(Ok(Some(Request::Finish))) => {
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

/// The requests of a connection, read in order by a task of their own; the
/// channel ends after the first end of stream or error (passed on).
fn read_requests(
    mut reader: tokio::net::unix::OwnedReadHalf,
) -> mpsc::Receiver<std::io::Result<Option<Request>>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let request = api::read_json::<_, Request>(&mut reader).await;
            let last = !matches!(request, Ok(Some(_)));
            if tx.send(request).await.is_err() || last {
                return;
            }
        }
    });
    rx
}
