//! The daemon's admin commands, from the client's side: `guard status`,
//! `guard reload`, `guard events` and `guard ensure-guarded`. Each sends one
//! request and exits 0 on success, 1 on any error.
use std::{os::unix::net::UnixStream as StdUnixStream, path::Path, time::Duration};

use super::{self as api, client::unreachable_daemon, Frame, Reply, Request, Status};
use crate::error::Result;

/// How long an admin command waits for its reply: a reload reads and
/// compiles every policy first; a daemon that takes longer is hung.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// One request, one reply (status, reload).
fn ask(socket: &Path, request: &Request) -> Result<Reply> {
    let mut stream = StdUnixStream::connect(socket).map_err(|e| unreachable_daemon(socket, e))?;
    let _ = stream.set_read_timeout(Some(REPLY_TIMEOUT));
    // A refusal may arrive before the request is fully written: read the
    // reply even when the write failed.
    let written = api::write_frame_blocking(&mut stream, &Frame::json(request));
    match api::read_json_blocking(&mut stream) {
        Ok(reply) => Ok(reply),
        Err(e) => Err(unreachable_daemon(socket, written.err().unwrap_or(e))),
    }
}

/// Sends one admin request and turns the reply into an exit status:
/// `handle` takes the expected reply (anything else is reported as
/// unexpected); a refusal is printed after `refused`.
fn admin(request: Request, refused: &str, handle: impl FnOnce(Reply) -> Result<i32, Reply>) -> i32 {
    match ask(&api::socket_path(), &request) {
        Ok(Reply::Error { message }) => {
            eprintln!("guard: {refused}{message}");
            1
        }
        Ok(reply) => handle(reply).unwrap_or_else(|other| {
            eprintln!("guard: unexpected reply {other:?}");
            1
        }),
        Err(e) => {
            eprintln!("guard: {e}");
            1
        }
    }
}

/// The daemon's status, or None when no daemon listens on `socket`.
pub fn daemon_status(socket: &Path) -> Result<Option<Status>> {
    if !socket.exists() {
        return Ok(None);
    }
    match ask(socket, &Request::Status)? {
        Reply::Status(status) => Ok(Some(*status)),
        other => Err(crate::error::Error::Daemon(format!(
            "unexpected reply {other:?}"
        ))),
    }
}

/// `guard status`.
pub fn status(json: bool) -> i32 {
    admin(Request::Status, "", |reply| match reply {
        Reply::Status(status) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).expect("status serialises")
                );
            } else {
                print!("{}", status_text(&status));
            }
            Ok(0)
        }
        other => Err(other),
    })
}

fn status_text(status: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "guard daemon {} (pid {}), up {}s",
        status.version, status.pid, status.uptime_seconds
    );
    let _ = writeln!(out, "config:   {}", status.config.display());
    let _ = writeln!(out, "pinned:   {}", status.pin_dir.display());
    let _ = writeln!(out, "runs in:  {}", status.runs_cgroup.display());
    let _ = writeln!(out, "programs:");
    for program in &status.programs {
        let _ = write!(out, "  {:<14} {}", program.name, program.attached_to);
        if let Some(insns) = program.verified_instructions {
            let _ = write!(out, " ({insns} verified instructions)");
        }
        out.push('\n');
    }
    let _ = writeln!(out, "guarded:");
    if status.bindings.is_empty() {
        let _ = writeln!(out, "  nothing");
    }
    for binding in &status.bindings {
        let cgroup = binding
            .cgroup
            .as_ref()
            .map(|c| c.display().to_string())
            .unwrap_or_else(|| "(not running)".into());
        let _ = writeln!(
            out,
            "  {} {}  [{}] {}  policy {}\n      {}\n      inspected {}, blocked {}, audited {}, unreadable {}, events lost {}",
            binding.kind,
            binding.target,
            binding.mode,
            binding.policies.join(", "),
            binding.policy_id,
            cgroup,
            binding.counters.inspected,
            binding.counters.blocked,
            binding.counters.audited,
            binding.counters.unreadable,
            binding.events_lost
        );
    }
    let t = &status.totals;
    let _ = writeln!(
        out,
        "totals: inspected {}, blocked {}, audited {}, unreadable {}, unbound {}, events lost {}; {} rules loaded",
        t.inspected, t.blocked, t.audited, t.unreadable, t.unbound, status.events_lost, status.rules_loaded
    );
    if !status.skipped_policy_files.is_empty() {
        let _ = writeln!(out, "skipped in the policies directory:");
        for skipped in &status.skipped_policy_files {
            let _ = writeln!(out, "  {skipped}");
        }
    }
    out
}

/// `guard ensure-guarded`: exit 0 once the daemon guards this process's
/// cgroup, 1 otherwise (so an `ExecStartPre=` fails the unit's start).
pub fn ensure_guarded() -> i32 {
    admin(Request::EnsureGuarded, "", |reply| match reply {
        Reply::Guarded { cgroup, policies } => {
            println!(
                "guard: {} is guarded ({})",
                cgroup.display(),
                policies.join(", ")
            );
            Ok(0)
        }
        other => Err(other),
    })
}

/// `guard reload`.
pub fn reload() -> i32 {
    admin(
        Request::Reload,
        "reload refused, the previous policies stay in force: ",
        |reply| match reply {
            Reply::Reloaded { message } => {
                println!("guard: {message}");
                Ok(0)
            }
            other => Err(other),
        },
    )
}

/// `guard events`: recent events, then (with `follow`) new ones as they
/// happen, as text or JSON lines.
pub fn events(follow: bool, json: bool) -> i32 {
    let socket = api::socket_path();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("guard: {e}");
            return 1;
        }
    };
    runtime.block_on(async {
        let mut stream = match tokio::net::UnixStream::connect(&socket).await {
            Ok(stream) => stream,
            Err(e) => {
                eprintln!("guard: {}", unreachable_daemon(&socket, e));
                return 1;
            }
        };
        if let Err(e) =
            api::write_frame(&mut stream, &Frame::json(&Request::Events { follow })).await
        {
            eprintln!("guard: {}", unreachable_daemon(&socket, e));
            return 1;
        }
        loop {
            match api::read_json::<_, Reply>(&mut stream).await {
                Ok(Some(Reply::Event(event))) => {
                    let line = if json {
                        event.to_string()
                    } else {
                        event_text(&event)
                    };
                    use std::io::Write as _;
                    let mut out = std::io::stdout().lock();
                    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                        return 0;
                    }
                }
                Ok(Some(Reply::Backlog)) if !follow => return 0,
                Ok(Some(Reply::Backlog)) => {}
                Ok(Some(Reply::Error { message })) => {
                    eprintln!("guard: {message}");
                    return 1;
                }
                Ok(Some(_)) => {}
                Ok(None) if !follow => return 0,
                Ok(None) => {
                    eprintln!("guard: the daemon closed the connection");
                    return 1;
                }
                Err(e) => {
                    eprintln!("guard: {}", unreachable_daemon(&socket, e));
                    return 1;
                }
            }
        }
    })
}

/// One event as a line for people.
fn event_text(event: &serde_json::Value) -> String {
    let get = |key: &str| event.get(key).and_then(|v| v.as_str()).unwrap_or("");
    let chain: Vec<String> = event
        .get("process_chain")
        .and_then(|c| c.as_array())
        .map(|links| {
            links
                .iter()
                .filter_map(|link| {
                    serde_json::from_value::<crate::report::chains::ChainLink>(link.clone()).ok()
                })
                .map(|link| link.short())
                .collect()
        })
        .unwrap_or_default();
    if event.get("evidence").is_some() {
        return format!(
            "{} EVIDENCE {}: {} ({}, {}) ({} {}, policy {}) from: {}",
            get("time"),
            get("kind"),
            get("detail"),
            get("action"),
            get("verdict"),
            get("binding"),
            get("guarded"),
            get("policy"),
            chain.join(" → ")
        );
    }
    let rule = event
        .get("rule")
        .filter(|r| !r.is_null())
        .and_then(|r| serde_json::from_value::<crate::report::RuleRef>(r.clone()).ok())
        .map(|r| format!(" [{} {}]", r.kind, r.pattern))
        .unwrap_or_default();
    format!(
        "{} {} {} {} ({} {}, policy {}){} from: {}",
        get("time"),
        get("verdict").to_uppercase(),
        get("query_type"),
        get("name"),
        get("binding"),
        get("guarded"),
        get("policy"),
        rule,
        if chain.is_empty() {
            format!(
                "pid {}",
                event.get("pid").and_then(|p| p.as_u64()).unwrap_or(0)
            )
        } else {
            chain.join(" → ")
        }
    )
}
