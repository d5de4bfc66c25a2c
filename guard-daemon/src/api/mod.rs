//! The daemon's local API: frames on a Unix stream socket.
//!
//! A frame is a little-endian `u32` length, a one-byte tag and the payload:
//! `J` carries one JSON [`Request`] or [`Reply`]; `E` carries one raw kernel
//! record, byte for byte as the ring buffer held it, so a `guard run`
//! client decodes and attributes events with the same code as standalone.
pub mod admin;
pub mod client;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use guard_common::maps::Counter;

use crate::{
    error::Result,
    kernel::{evidence::EvidenceMaps as _, KernelMaps},
    policy::Mode,
    report::{Counters, ProgramStats},
};

/// Default socket path; `guard run` and the admin commands look here.
pub const DEFAULT_SOCKET: &str = "/run/guard/guard.sock";
/// Environment variable that overrides the socket path for clients.
pub const SOCKET_ENV: &str = "GUARD_SOCKET";

const TAG_JSON: u8 = b'J';
const TAG_EVENT: u8 = b'E';
/// Bigger frames are refused: nothing legitimate comes close (a run's
/// policies travel as text).
const MAX_FRAME: usize = 64 << 20;

/// The socket clients use: `$GUARD_SOCKET`, else the default.
pub fn socket_path() -> PathBuf {
    std::env::var_os(SOCKET_ENV)
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

#[derive(Clone, Debug)]
pub enum Frame {
    Json(Vec<u8>),
    Event(Vec<u8>),
}

impl Frame {
    pub fn json<T: Serialize>(value: &T) -> Frame {
        Frame::Json(serde_json::to_vec(value).expect("API messages serialise"))
    }
}

pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frame: &Frame,
) -> std::io::Result<()> {
    let (tag, payload) = match frame {
        Frame::Json(bytes) => (TAG_JSON, bytes),
        Frame::Event(bytes) => (TAG_EVENT, bytes),
    };
    let mut header = [0u8; 5];
    header[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[4] = tag;
    writer.write_all(&header).await?;
    writer.write_all(payload).await?;
    writer.flush().await
}

/// The next frame, or None at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> std::io::Result<Option<Frame>> {
    let mut header = [0u8; 5];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut payload = vec![0; len];
    reader.read_exact(&mut payload).await?;
    match header[4] {
        TAG_JSON => Ok(Some(Frame::Json(payload))),
        TAG_EVENT => Ok(Some(Frame::Event(payload))),
        tag => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unknown frame tag {tag}"),
        )),
    }
}

/// Reads the next JSON frame as `T` (event frames are an error here).
pub async fn read_json<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    reader: &mut R,
) -> std::io::Result<Option<T>> {
    match read_frame(reader).await? {
        None => Ok(None),
        Some(Frame::Json(bytes)) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Some(Frame::Event(_)) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "unexpected event frame",
        )),
    }
}

/// Blocking versions for the first exchange, before any async runtime.
pub fn write_frame_blocking(
    writer: &mut impl std::io::Write,
    frame: &Frame,
) -> std::io::Result<()> {
    let (tag, payload) = match frame {
        Frame::Json(bytes) => (TAG_JSON, bytes),
        Frame::Event(bytes) => (TAG_EVENT, bytes),
    };
    let mut bytes = Vec::with_capacity(5 + payload.len());
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.push(tag);
    bytes.extend_from_slice(payload);
    writer.write_all(&bytes)
}

pub fn read_json_blocking<T: for<'de> Deserialize<'de>>(
    reader: &mut impl std::io::Read,
) -> std::io::Result<T> {
    let mut header = [0u8; 5];
    reader.read_exact(&mut header)?;
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME || header[4] != TAG_JSON {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "unexpected frame",
        ));
    }
    let mut payload = vec![0; len];
    reader.read_exact(&mut payload)?;
    serde_json::from_slice(&payload)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// A policy file as the client read it: the daemon validates it again and
/// reports errors against the same path and lines.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyText {
    pub path: PathBuf,
    pub text: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    Reload,
    /// Recent events; with `follow`, then every new one as it happens.
    Events {
        follow: bool,
    },
    /// Start a run: the daemon creates and binds the cgroup; the client
    /// puts the command in it. Then `E` frames flow to the client until it
    /// sends [`Request::Finish`].
    Run(RunRequest),
    /// Reattach to a run after the daemon restarted.
    Resume {
        cgroup: PathBuf,
        policy_id: u32,
        /// The original request, so the daemon can name the run's rules
        /// again.
        run: Box<RunRequest>,
    },
    /// The command has exited: kill what is left in the cgroup, send the
    /// last events and the counters, remove everything of the run.
    Finish,
    /// Make sure the cgroup of the asking process is guarded now (binding
    /// it at once if the configuration binds it); for `ExecStartPre=` of a
    /// bound unit, so the unit's main process never runs unguarded.
    EnsureGuarded,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRequest {
    /// Fingerprint of the client's kernel object: a daemon running another
    /// build would produce records and rule ids the client cannot read.
    pub object: String,
    /// The DNS ports the run expects inspected (the daemon's are fixed).
    pub dns_ports: Vec<u16>,
    pub policies: Vec<PolicyText>,
    pub deny: Vec<String>,
    pub allow: Vec<String>,
    pub audit: bool,
    pub record: bool,
    /// `--allow-raw-sockets`.
    #[serde(default)]
    pub allow_raw_sockets: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Error {
        message: String,
    },
    /// The daemon cannot host this run as asked (another build, other DNS
    /// ports); the client runs standalone instead.
    Incompatible {
        message: String,
    },
    Reloaded {
        message: String,
    },
    Status(Box<Status>),
    RunStarted {
        cgroup: PathBuf,
        policy_id: u32,
        /// The pinned generation guarding the run: the client reads its
        /// counters there if the daemon goes away, and notices there when
        /// the guard is removed.
        #[serde(default)]
        pin_dir: Option<PathBuf>,
    },
    RunFinished(Box<RunTotals>),
    /// One event, for `guard events`.
    Event(Box<serde_json::Value>),
    /// End of the backlog in `guard events` (live events follow if asked).
    Backlog,
    Guarded {
        cgroup: PathBuf,
        policies: Vec<String>,
    },
}

/// What a finished run's report needs from the kernel.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunTotals {
    pub counters: Counters,
    pub events_lost: u64,
    /// Record mode: (name hash, query type, count).
    pub seen: Vec<(u64, u16, u64)>,
    /// The shared program's runs during the run (all cgroups it guards).
    pub program_stats: Option<ProgramStats>,
    /// Evidence the kernel counted for the run, by `EvidenceKind`.
    #[serde(default)]
    pub evidence: Vec<u64>,
    /// Evidence guard itself found (its programs detached from the run's
    /// cgroup), as report entries.
    #[serde(default)]
    pub detached: Vec<String>,
    /// `active`, or why the resolver-socket hooks are missing.
    #[serde(default)]
    pub resolver_socket_hooks: String,
}

impl RunTotals {
    /// A run's totals as the kernel counted them under its policy id, from
    /// whoever holds the maps (the daemon, or a client whose daemon went
    /// away). Fails when the policy has no counters (any more). The fields
    /// only the daemon knows (program statistics, detaches, the
    /// resolver-socket hooks) are left for the caller.
    pub fn from_kernel(
        maps: &impl KernelMaps,
        policy_id: u32,
        with_seen: bool,
    ) -> Result<RunTotals> {
        let counters = maps.policy_counters(policy_id)?;
        let seen = if with_seen {
            maps.seen_counts(policy_id)
                .into_iter()
                .map(|((hash, qtype), count)| (hash, qtype, count))
                .collect()
        } else {
            Vec::new()
        };
        Ok(RunTotals {
            counters: Counters::from_kernel(&counters),
            events_lost: counters.values[Counter::EventsLost as usize],
            seen,
            program_stats: None,
            evidence: maps.evidence_counts(policy_id).to_vec(),
            detached: Vec::new(),
            resolver_socket_hooks: String::new(),
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// Fingerprint of the daemon's kernel object (its build).
    #[serde(default)]
    pub object: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    pub generation: String,
    pub pin_dir: PathBuf,
    pub config: PathBuf,
    pub runs_cgroup: PathBuf,
    pub programs: Vec<ProgramStatus>,
    pub bindings: Vec<BindingStatus>,
    pub totals: Counters,
    pub events_lost: u64,
    pub rules_loaded: usize,
    /// Entries of the policies directory that are not regular files, each
    /// with why; skipped at the last (re)load.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped_policy_files: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgramStatus {
    pub name: String,
    pub attached_to: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified_instructions: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BindingStatus {
    /// `unit`, `cgroup` or `run`.
    pub kind: String,
    /// The unit name, configured cgroup, or the run's command.
    pub target: String,
    /// The cgroup guarded now; None while a unit is not running.
    pub cgroup: Option<PathBuf>,
    pub policies: Vec<String>,
    pub mode: Mode,
    pub policy_id: u32,
    pub counters: Counters,
    pub events_lost: u64,
}
