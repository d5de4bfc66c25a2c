//! Errors of guard's userspace. Each says what failed and on what, so the
//! message alone is enough to act on.
use std::{io, path::PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum PolicyError {
    #[error(transparent)]
    Input(#[from] crate::input::InputError),
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Syntax {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("{message}")]
    Argument { message: String },
    #[error("conflicting rules for {pattern}: {first}, and {second}")]
    Conflict {
        pattern: String,
        first: String,
        second: String,
    },
}

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("no cgroup v2 hierarchy: {0}")]
    NoCgroup2(String),
    #[error("{action} {}: {source}", path.display())]
    Cgroup {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("loading the eBPF object: {}", with_causes(.0))]
    Ebpf(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {}", with_causes(source))]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {}", with_causes(source))]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    /// A pinned program or map that cannot be opened (BPF_OBJ_GET).
    #[error("opening {}: {message}", path.display())]
    OpenPin { path: PathBuf, message: String },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("the guard daemon refused: {0}")]
    Daemon(String),
    /// `pinning WHAT (at PATH): WHY`, WHY ending with the errno's text.
    #[error("pinning {0}: {1}")]
    Pin(String, String),
    #[error("tracefs: {0}")]
    Tracefs(String),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("{context}: {source}")]
    Sys { context: String, source: nix::Error },
}

impl Error {
    pub fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    pub fn sys(context: impl Into<String>) -> impl FnOnce(nix::Error) -> Error {
        let context = context.into();
        move |source| Error::Sys { context, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error's message followed by those of its causes, each once: aya's
/// errors say "`BPF_OBJ_PIN` failed" and keep the errno ("File exists") in
/// their source, which a plain `{}` never shows.
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(source) = cause {
        let text = source.to_string();
        // thiserror's `#[error(transparent)]` and messages that already
        // embed their source would otherwise repeat it.
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        cause = source.source();
    }
    message
}

/// What to do about a refused bpf(), perf_event_open() or cgroup write.
pub const PRIVILEGE_HINT: &str = "guard needs root, or CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and CAP_SYS_ADMIN (loading programs, attaching tracepoints and cgroup hooks, creating cgroups)";

/// Whether the kernel refused an operation for lack of privilege (EPERM
/// or EACCES) anywhere in the error's chain of causes.
pub fn denied_permission(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::PermissionDenied {
                return true;
            }
        }
        if let Some(errno) = e.downcast_ref::<nix::Error>() {
            if matches!(errno, nix::Error::EPERM | nix::Error::EACCES) {
                return true;
            }
        }
        cause = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_for_lack_of_privilege_is_found_among_the_causes() {
        let pin = aya::pin::PinError::SyscallError(aya::sys::SyscallError {
            call: "BPF_OBJ_PIN",
            io_error: io::Error::from_raw_os_error(libc::EPERM),
        });
        assert!(denied_permission(&pin));
        let exists = aya::pin::PinError::SyscallError(aya::sys::SyscallError {
            call: "BPF_OBJ_PIN",
            io_error: io::Error::from_raw_os_error(libc::EEXIST),
        });
        assert!(!denied_permission(&exists));
        let cgroup = Error::Sys {
            context: "creating the cgroup".into(),
            source: nix::Error::EACCES,
        };
        assert!(denied_permission(&cgroup));
    }

    #[test]
    fn causes_are_shown_once_each() {
        let errno = io::Error::from_raw_os_error(libc::EEXIST);
        let pin = aya::pin::PinError::SyscallError(aya::sys::SyscallError {
            call: "BPF_OBJ_PIN",
            io_error: errno,
        });
        assert_eq!(
            Error::Pin("/sys/fs/bpf/guard/x".into(), with_causes(&pin)).to_string(),
            "pinning /sys/fs/bpf/guard/x: `BPF_OBJ_PIN` failed: File exists (os error 17)"
        );
    }
}
