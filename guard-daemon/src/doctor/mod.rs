//! `guard doctor`: what on this host weakens the guard, each finding with
//! what to do. Exit 0 when nothing does, 1 otherwise; `--json` for
//! machines.
//!
//! It looks at the kernel (version, cgroup v2, BTF, lockdown, the hooks and
//! tracepoints guard uses, `BPF_PROG_TEST_RUN`), at how this host resolves
//! names (nsswitch's `hosts:` line, hosts-file entries for denied names,
//! nscd and systemd-resolved, resolv.conf against the DNS ports,
//! systemd-resolved's DNS-over-TLS, IPsec policies) and at the daemon.
use std::{
    fs,
    os::fd::{AsFd as _, BorrowedFd},
    path::Path,
};

use serde::Serialize;

use crate::{
    api,
    kernel::{
        bpfsys,
        unixhooks::{sock_addr_offsets, DEFAULT_RESOLVER_SOCKETS},
    },
    policy::RuleSet,
    report::hosts,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Nothing to do.
    Ok,
    /// Worth knowing; does not weaken the guard.
    Info,
    /// Weakens the guard on this host.
    Weakens,
}

#[derive(Debug, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
}

pub struct DoctorOptions {
    pub json: bool,
    /// Rules to check the hosts file against (none: every entry is only
    /// listed as information).
    pub rules: Option<RuleSet>,
    pub dns_ports: Vec<u16>,
}

/// `guard doctor`: prints the findings; 0 when nothing weakens the guard.
pub fn main(options: &DoctorOptions) -> i32 {
    let findings = examine(options);
    if options.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "weakened": findings.iter().any(|f| f.status == Status::Weakens),
                "findings": findings,
            }))
            .expect("findings serialise")
        );
    } else {
        for finding in &findings {
            let label = match finding.status {
                Status::Ok => "ok     ",
                Status::Info => "info   ",
                Status::Weakens => "WEAKENS",
            };
            println!("{label} {:<22} {}", finding.check, finding.detail);
            if let Some(advice) = &finding.advice {
                println!("        {:<22} → {advice}", "");
            }
        }
    }
    i32::from(findings.iter().any(|f| f.status == Status::Weakens))
}

fn finding(check: &'static str, status: Status, detail: impl Into<String>) -> Finding {
    Finding {
        check,
        status,
        detail: detail.into(),
        advice: None,
    }
}

fn advised(
    check: &'static str,
    status: Status,
    detail: impl Into<String>,
    advice: impl Into<String>,
) -> Finding {
    Finding {
        check,
        status,
        detail: detail.into(),
        advice: Some(advice.into()),
    }
}

pub fn examine(options: &DoctorOptions) -> Vec<Finding> {
    let mut findings = Vec::new();
    kernel(&mut findings);
    let unix_hooks = unix_hooks(&mut findings);
    tracepoints(&mut findings);
    resolution(&mut findings, options, unix_hooks);
    network(&mut findings, &options.dns_ports);
    daemon(&mut findings);
    findings
}

fn kernel(findings: &mut Vec<Finding>) {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let version: Vec<u32> = release
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .filter_map(|p| p.parse().ok())
        .collect();
    let at_least = |major: u32, minor: u32| version.as_slice() >= [major, minor].as_slice();
    findings.push(if at_least(5, 17) {
        finding("kernel", Status::Ok, format!("Linux {release}"))
    } else {
        advised(
            "kernel",
            Status::Weakens,
            format!("Linux {release}: guard needs 5.17+ (bpf_loop)"),
            "upgrade the kernel",
        )
    });
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    findings.push(
        match crate::kernel::cgroup::cgroup2_mount_point(&mountinfo) {
            Some(mount) => finding(
                "cgroup v2",
                Status::Ok,
                format!("mounted at {}", mount.display()),
            ),
            None => finding(
                "cgroup v2",
                Status::Info,
                "not mounted: guard mounts a private one for each run",
            ),
        },
    );
    findings.push(if Path::new("/sys/kernel/btf/vmlinux").exists() {
        finding("BTF", Status::Ok, "/sys/kernel/btf/vmlinux")
    } else {
        advised(
            "BTF",
            Status::Weakens,
            "the kernel has no BTF: the resolver-socket hooks cannot find their data",
            "use a kernel built with CONFIG_DEBUG_INFO_BTF",
        )
    });
    let lockdown = fs::read_to_string("/sys/kernel/security/lockdown").unwrap_or_default();
    findings.push(if lockdown.contains("[confidentiality]") {
        advised(
            "lockdown",
            Status::Weakens,
            "kernel lockdown (confidentiality) forbids reading kernel memory from BPF: the resolver-socket hooks cannot load",
            "use lockdown=integrity or none on hosts that run guard",
        )
    } else {
        let mode = lockdown.trim();
        finding(
            "lockdown",
            Status::Ok,
            if mode.is_empty() { "not enabled" } else { mode },
        )
    });
    let test_run = bpfsys::load_program(
        bpfsys::BPF_PROG_TYPE_CGROUP_SKB,
        0,
        "guard_probe",
        &bpfsys::returning(1),
        c"GPL",
    )
    .map_err(|e| e.to_string())
    .and_then(|program| test_run_probe(program.as_fd()));
    findings.push(match test_run {
        Ok(1) => finding("BPF_PROG_TEST_RUN", Status::Ok, "runs cgroup_skb programs"),
        Ok(other) => finding(
            "BPF_PROG_TEST_RUN",
            Status::Info,
            format!("ran, but returned {other}"),
        ),
        Err(e) => finding(
            "BPF_PROG_TEST_RUN",
            Status::Info,
            format!("unavailable ({e}): guard does not need it (it runs programs on test packets)"),
        ),
    });
}

/// Runs the probe once on a dummy packet with aya's `BPF_PROG_TEST_RUN`;
/// returns its return value. aya did not load the probe (it is two raw
/// instructions), but drives it once given its info, found by its id.
fn test_run_probe(program: BorrowedFd<'_>) -> Result<u32, String> {
    use aya::programs::{CgroupSkb, TestRun as _, TestRunOptions};
    let id = bpfsys::object_id(program).map_err(|e| e.to_string())?;
    let info = aya::programs::loaded_programs()
        .flatten()
        .find(|info| info.id() == id)
        .ok_or("the probe program vanished")?;
    let probe = CgroupSkb::from_program_info(info, "guard_probe".into(), None)
        .map_err(|e| e.to_string())?;
    let packet = [0x45u8; 64];
    probe
        .test_run(TestRunOptions {
            data_in: Some(&packet),
            ..TestRunOptions::default()
        })
        .map(|result| result.return_value)
        .map_err(|e| e.to_string())
}

/// Whether the Unix-socket hooks work here (and a finding saying so).
fn unix_hooks(findings: &mut Vec<Finding>) -> bool {
    let loaded = sock_addr_offsets().and_then(|_| {
        bpfsys::load_program(
            bpfsys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            bpfsys::BPF_CGROUP_UNIX_CONNECT,
            "guard_probe",
            &bpfsys::returning(1),
            c"GPL",
        )
        .map_err(|e| format!("the kernel refused a connect_unix program: {e}"))
    });
    match loaded {
        Ok(_) => {
            findings.push(finding(
                "resolver-socket hooks",
                Status::Ok,
                "cgroup/connect_unix and sendmsg_unix: connections to nscd and systemd-resolved are refused for guarded commands",
            ));
            true
        }
        Err(reason) => {
            let daemons: Vec<&str> = DEFAULT_RESOLVER_SOCKETS
                .into_iter()
                .filter(|p| is_socket(Path::new(p)))
                .collect();
            findings.push(if daemons.is_empty() {
                advised(
                    "resolver-socket hooks",
                    Status::Info,
                    format!("{reason}; no resolver daemon socket is present now"),
                    "if nscd or systemd-resolved is ever started here, lookups through it are not seen: use Linux 6.7+",
                )
            } else {
                advised(
                    "resolver-socket hooks",
                    Status::Weakens,
                    format!(
                        "{reason}: lookups through {} are answered outside the cgroup and never seen",
                        daemons.join(", ")
                    ),
                    "use Linux 6.7+, or stop the caching daemon on hosts that run guard",
                )
            });
            false
        }
    }
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

fn tracepoints(findings: &mut Vec<Finding>) {
    let root = [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ]
    .into_iter()
    .map(Path::new)
    .find(|p| p.exists());
    let needed = [
        ("syscalls", "sys_enter_execve", "attribution"),
        (
            "sched",
            "sched_process_fork",
            "attribution and escape tracking",
        ),
        ("sched", "sched_process_exit", "escape tracking"),
        (
            "cgroup",
            "cgroup_attach_task",
            "escapes through cgroup.procs",
        ),
        ("syscalls", "sys_exit_clone3", "escapes through clone3"),
        ("syscalls", "sys_enter_socket", "packet and raw sockets"),
        (
            "syscalls",
            "sys_enter_bpf",
            "tampering with guard's programs",
        ),
    ];
    let Some(root) = root else {
        findings.push(finding(
            "tracepoints",
            Status::Info,
            "tracefs is not mounted; guard mounts it at /sys/kernel/tracing when it runs",
        ));
        return;
    };
    let missing: Vec<String> = needed
        .iter()
        .filter(|(category, event, _)| !root.join(category).join(event).exists())
        .map(|(category, event, what)| format!("{category}:{event} ({what})"))
        .collect();
    findings.push(if missing.is_empty() {
        finding(
            "tracepoints",
            Status::Ok,
            "exec, fork, exit, cgroup_attach_task, clone3, socket, bpf",
        )
    } else {
        advised(
            "tracepoints",
            Status::Weakens,
            format!("missing: {}", missing.join(", ")),
            "use a kernel with CONFIG_FTRACE_SYSCALLS and the cgroup tracepoints",
        )
    });
}

fn resolution(findings: &mut Vec<Finding>, options: &DoctorOptions, unix_hooks: bool) {
    let nsswitch = fs::read_to_string("/etc/nsswitch.conf").ok();
    let sources = nsswitch
        .as_deref()
        .and_then(hosts::hosts_sources)
        .unwrap_or_else(|| vec!["files".into(), "dns".into()]);
    for source in &sources {
        let base = source.as_str();
        let (status, detail, advice) = match base {
            "files" | "dns" | "myhostname" => continue,
            "resolve" if unix_hooks => (
                Status::Info,
                "systemd-resolved (nss-resolve): its socket is refused for guarded commands, which fall back to dns".to_string(),
                None,
            ),
            "resolve" => (
                Status::Weakens,
                "systemd-resolved (nss-resolve) answers over its varlink socket, outside the cgroup, and this kernel cannot refuse it".to_string(),
                Some("use Linux 6.7+, or put dns before resolve for hosts that run guard"),
            ),
            _ if base.starts_with("mdns") => (
                Status::Weakens,
                format!("{base}: names answered by avahi over its own socket are not seen"),
                Some("remove it from the hosts line, or deny no .local names"),
            ),
            _ => (
                Status::Weakens,
                format!("{base}: names answered by this source are not seen by guard"),
                Some("keep only files, dns and myhostname on the hosts line of hosts that run guard"),
            ),
        };
        findings.push(Finding {
            check: "nsswitch hosts",
            status,
            detail,
            advice: advice.map(String::from),
        });
    }
    findings.push(finding(
        "nsswitch hosts",
        Status::Ok,
        format!("hosts: {}", sources.join(" ")),
    ));
    if sources.iter().any(|s| s == "files") {
        hosts_file(findings, options);
    }
    for socket in DEFAULT_RESOLVER_SOCKETS {
        if is_socket(Path::new(socket)) {
            findings.push(finding(
                "resolver daemon",
                if unix_hooks {
                    Status::Info
                } else {
                    Status::Weakens
                },
                format!(
                    "{socket} is listening{}",
                    if unix_hooks {
                        ": refused for guarded commands"
                    } else {
                        ": lookups through it are not seen"
                    }
                ),
            ));
        }
    }
    resolved_tls(findings);
    local_listeners(findings);
}

/// Resolvers listening on this host's DNS port (systemd-resolved's stub,
/// dnsmasq, unbound...): a guarded command's queries to them are judged
/// like any other; what they do upstream is outside the cgroup.
fn local_listeners(findings: &mut Vec<Finding>) {
    let mut listening = Vec::new();
    for (file, listen_state) in [
        ("/proc/net/udp", "07"),
        ("/proc/net/udp6", "07"),
        ("/proc/net/tcp", "0A"),
        ("/proc/net/tcp6", "0A"),
    ] {
        let Ok(text) = fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
                continue;
            };
            if *state == listen_state && local.ends_with(":0035") {
                let proto = file.trim_start_matches("/proc/net/");
                listening.push(format!("{proto} {}", local.trim_end_matches(":0035")));
            }
        }
    }
    if !listening.is_empty() {
        findings.push(finding(
            "local resolvers",
            Status::Info,
            format!(
                "listening on port 53 here ({}): queries to them from guarded commands are judged; their own upstream queries are outside the cgroup",
                listening.join(", ")
            ),
        ));
    }
}

fn hosts_file(findings: &mut Vec<Finding>, options: &DoctorOptions) {
    let path = Path::new(hosts::HOSTS_FILE);
    let Ok(text) = fs::read_to_string(path) else {
        return;
    };
    match &options.rules {
        Some(rules) => {
            let entries = hosts::denied_entries(path, &text, rules);
            if entries.is_empty() {
                findings.push(finding(
                    "hosts file",
                    Status::Ok,
                    format!("{}: no entry for a denied name", path.display()),
                ));
            }
            for entry in entries {
                findings.push(advised(
                    "hosts file",
                    Status::Weakens,
                    format!(
                        "{}:{}: {} → {} matches {}: answered from the file, never a DNS query",
                        entry.file, entry.line, entry.name, entry.address, entry.rule
                    ),
                    "remove the entry (a guarded run with it fails in enforce mode)",
                ));
            }
        }
        None => findings.push(finding(
            "hosts file",
            Status::Info,
            format!(
                "{}: names in it bypass DNS; give --policy or --deny to check them",
                path.display()
            ),
        )),
    }
}

fn resolved_tls(findings: &mut Vec<Finding>) {
    let mut files = vec![Path::new("/etc/systemd/resolved.conf").to_path_buf()];
    if let Ok(entries) = fs::read_dir("/etc/systemd/resolved.conf.d") {
        files.extend(entries.flatten().map(|e| e.path()));
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines() {
            let Some(value) = line.trim().strip_prefix("DNSOverTLS=") else {
                continue;
            };
            if matches!(value.trim(), "yes" | "opportunistic" | "true" | "1") {
                findings.push(finding(
                    "DNS over TLS",
                    Status::Info,
                    format!(
                        "{}: DNSOverTLS={}: systemd-resolved encrypts its own upstream queries (outside the cgroup); a guarded command's lookups reach resolved first and are judged there",
                        file.display(),
                        value.trim()
                    ),
                ));
            }
        }
    }
}

fn network(findings: &mut Vec<Finding>, dns_ports: &[u16]) {
    let resolv = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let servers: Vec<&str> = resolv
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .map(str::trim)
        .collect();
    // The C library always sends to port 53.
    findings.push(if dns_ports.contains(&53) {
        finding(
            "resolv.conf",
            Status::Ok,
            format!("nameservers {} on port 53, inspected", servers.join(", ")),
        )
    } else {
        advised(
            "resolv.conf",
            Status::Weakens,
            format!(
                "nameservers {} are reached on port 53, which is not among the DNS ports {dns_ports:?}",
                servers.join(", ")
            ),
            "include 53 in --dns-port (or dns_ports)",
        )
    });
    let xfrm = std::process::Command::new("ip")
        .args(["xfrm", "policy", "list"])
        .output();
    match xfrm {
        Ok(output) if output.status.success() => {
            let text = String::from_utf8_lossy(&output.stdout);
            let outbound = text.lines().filter(|l| l.contains("dir out")).count();
            findings.push(if outbound == 0 {
                finding("IPsec", Status::Ok, "no outbound xfrm policy")
            } else {
                advised(
                    "IPsec",
                    Status::Weakens,
                    format!("{outbound} outbound xfrm policies: DNS they cover is encrypted before the cgroup hook sees it"),
                    "exclude DNS (port 53) from the IPsec policies of hosts that run guard",
                )
            });
        }
        _ => findings.push(finding(
            "IPsec",
            Status::Info,
            "could not list xfrm policies (`ip xfrm policy list`)",
        )),
    }
}

fn daemon(findings: &mut Vec<Finding>) {
    let socket = api::socket_path();
    match api::admin::daemon_status(&socket) {
        Ok(None) => findings.push(finding(
            "daemon",
            Status::Info,
            format!(
                "none on {}: guard run loads its own programs",
                socket.display()
            ),
        )),
        Ok(Some(status)) => {
            let own = crate::kernel::object_fingerprint();
            findings.push(if status.object.is_empty() || status.object == own {
                finding(
                    "daemon",
                    Status::Ok,
                    format!(
                        "guard {} (pid {}, generation {}) on {}",
                        status.version,
                        status.pid,
                        status.generation,
                        socket.display()
                    ),
                )
            } else {
                advised(
                    "daemon",
                    Status::Info,
                    format!(
                        "guard {} runs another build (programs {}, this one {own}): guard run goes standalone",
                        status.version, status.object
                    ),
                    "restart the daemon with this build",
                )
            });
        }
        Err(e) => findings.push(advised(
            "daemon",
            Status::Weakens,
            format!("{}: {e}", socket.display()),
            "a guard run would fail to set up (125): restart the daemon or remove the stale socket",
        )),
    }
}
