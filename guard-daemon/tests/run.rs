//! `guard run` on the real kernel: real programs, real cgroups, real DNS
//! servers on loopback, real clients (dig, glibc's getent, a scripted client
//! for unconnected sendto, IPv6 and dual-stack sockets).
mod common;

use std::{
    fs,
    process::{Command, Stdio},
    time::Duration,
};

use common::{dns_query, eventually, report, run_cgroups_of, Sandbox, GUARD};

const POLICY: &str = "name: db-deploy
mode: enforce
deny:
  - frontend.internal
  - \"*.frontend.internal\"
allow:
  - status.frontend.internal
";

fn write_policy(sandbox: &Sandbox, text: &str) -> String {
    let path = sandbox.path("policy.yaml");
    fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn events(report: &serde_json::Value) -> &Vec<serde_json::Value> {
    report["events"].as_array().expect("events array")
}

/// The chain of a reported event as argv[0] basenames.
fn chain(event: &serde_json::Value) -> Vec<String> {
    event["process_chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|link| {
            let argv0 = link["argv"][0].as_str().unwrap_or("?");
            argv0.rsplit('/').next().unwrap().to_string()
        })
        .collect()
}

#[test]
fn grandchild_udp_lookup_is_refused_at_once_and_reported_with_its_chain() {
    let sandbox = Sandbox::new();
    let policy = write_policy(&sandbox, POLICY);
    let report_path = sandbox.path("report.json");
    // deploy.sh -> drain tool -> dig: the grandchild makes the lookup.
    let script = "sh -c 'dig +tries=1 +time=5 @127.0.0.1 api.frontend.internal; echo dig-exit=$?'";
    let run = sandbox.run(&[
        "run",
        "--policy",
        &policy,
        "--report",
        report_path.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(run.code, 77, "{run:?}");
    // The client was refused by the kernel, not left to time out: its socket
    // was ended ("connection reset"), well within its 5 s timeout.
    assert!(run.stdout.contains("connection reset"), "{run:?}");
    assert!(!run.stdout.contains("timed out"), "{run:?}");
    assert!(
        !sandbox.v4.saw("api.frontend.internal"),
        "the query must never reach the server"
    );

    let report = report(&report_path);
    assert_eq!(report["exit_code"], 77);
    assert_eq!(report["command_exit"]["code"], 0);
    let events = events(&report);
    let event = events
        .iter()
        .find(|e| e["name"] == "api.frontend.internal")
        .expect("event for the blocked name");
    assert_eq!(event["verdict"], "blocked");
    assert_eq!(event["query_type"], "A");
    assert_eq!(event["transport"], "udp");
    assert_eq!(event["resolver"], "127.0.0.1:53");
    // comm is the sending thread's name (dig sends from a worker thread).
    assert!(!event["comm"].as_str().unwrap().is_empty());
    assert_eq!(event["rule"]["pattern"], "*.frontend.internal");
    assert_eq!(event["rule"]["policy"], "db-deploy");
    assert!(
        event["rule"]["origin"]
            .as_str()
            .unwrap()
            .ends_with("policy.yaml:5"),
        "{event}"
    );
    assert_eq!(event["socket_ended"], true);
    assert_eq!(chain(event), ["sh", "sh", "dig"], "{event}");
    assert_eq!(
        event["process_chain"][2]["argv"][4],
        "api.frontend.internal"
    );
    // The summary names the name, the rule and the chain.
    assert!(
        run.stderr.contains("BLOCKED api.frontend.internal"),
        "{run:?}"
    );
    assert!(
        run.stderr.contains("rule: deny *.frontend.internal"),
        "{run:?}"
    );
    assert!(
        run.stderr
            .contains("from: sh -c … → sh -c … → dig +tries=1"),
        "{run:?}"
    );
    assert!(
        !std::path::Path::new(report["cgroup"].as_str().unwrap()).exists(),
        "cgroup removed"
    );
}

#[test]
fn grandchild_tcp_lookup_has_its_connection_ended() {
    let sandbox = Sandbox::new();
    let policy = write_policy(&sandbox, POLICY);
    let report_path = sandbox.path("report.json");
    let run = sandbox.run(&[
        "run",
        "-p",
        &policy,
        "--report",
        report_path.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "sh -c 'dig +tcp +tries=1 +time=10 @127.0.0.1 frontend.internal'",
    ]);
    assert_eq!(run.code, 77, "{run:?}");
    // Without the socket being destroyed dig would wait 10 s and say "timed out".
    assert!(run.stdout.contains("connection reset"), "{run:?}");
    assert!(!sandbox.v4.saw("frontend.internal"));
    let report = report(&report_path);
    let event = &events(&report)[0];
    assert_eq!(event["transport"], "tcp");
    assert_eq!(event["verdict"], "blocked");
    assert_eq!(event["socket_ended"], true);
    assert_eq!(chain(event), ["sh", "sh", "dig"]);
    // A retransmitted segment is one query, not several.
    assert_eq!(events(&report).len(), 1, "{report}");
}

#[test]
fn scripted_tcp_client_sees_the_connection_aborted() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    let run = sandbox.run(&[
        "run",
        "--deny",
        "frontend.internal",
        "--",
        &client,
        "--tcp",
        "--timeout",
        "20",
        "127.0.0.1:53",
        "frontend.internal",
    ]);
    assert_eq!(run.code, 77, "{run:?}");
    // The write of the refused query fails at once (the stream program
    // drops it before it enters the socket).
    assert!(
        run.stdout.contains("error send: PermissionDenied"),
        "{run:?}"
    );
}

#[test]
fn allowed_exception_lookalikes_and_other_names_resolve() {
    let sandbox = Sandbox::new();
    let policy = write_policy(&sandbox, POLICY);
    let names = [
        "status.frontend.internal",
        "notfrontend.internal",
        "frontend.internal.example",
        "db.internal",
        "x-frontend.internal",
    ];
    let script = names
        .iter()
        .map(|n| {
            format!("dig +short +tries=1 +time=5 @127.0.0.1 {n} | grep -q 192.0.2.1 || exit 9")
        })
        .collect::<Vec<_>>()
        .join("; ");
    let run = sandbox.run(&["run", "-q", "-p", &policy, "--", "sh", "-c", &script]);
    assert_eq!(run.code, 0, "{run:?}");
    for name in names {
        assert!(sandbox.v4.saw(name), "{name} must reach the server");
    }
}

#[test]
fn letter_case_and_trailing_dot_do_not_bypass() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    for name in [
        "FrOnTeNd.InTeRnAl",
        "frontend.internal.",
        "API.Frontend.INTERNAL",
    ] {
        let run = sandbox.run(&[
            "run",
            "--deny",
            "frontend.internal",
            "--deny",
            "*.frontend.internal",
            "--",
            &client,
            "127.0.0.1:53",
            name,
        ]);
        assert_eq!(run.code, 77, "{name}: {run:?}");
        assert!(
            run.stdout.contains("error send: PermissionDenied"),
            "{name}: {run:?}"
        );
    }
    assert!(sandbox.v4.seen().is_empty(), "{:?}", sandbox.v4.seen());
}

#[test]
fn glibc_getaddrinfo_is_refused_and_other_names_resolve() {
    let sandbox = Sandbox::new();
    let run = sandbox.run(&[
        "run",
        "--deny",
        "frontend.internal",
        "--",
        "sh",
        "-c",
        "getent hosts db.internal || exit 9; getent hosts frontend.internal; echo getent-exit=$?",
    ]);
    assert_eq!(run.code, 77, "{run:?}");
    assert!(run.stdout.contains("db.internal"), "{run:?}");
    assert!(
        run.stdout.contains("getent-exit=2"),
        "getent reports not found: {run:?}"
    );
    assert!(sandbox.v4.saw("db.internal"));
    assert!(!sandbox.v4.saw("frontend.internal"));
    assert!(
        run.stderr
            .contains("from: sh -c … → getent hosts frontend.internal"),
        "{run:?}"
    );
}

#[test]
fn every_query_type_is_covered() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    for qtype in ["A", "AAAA", "HTTPS", "SRV", "TXT", "MX", "ANY"] {
        let run = sandbox.run(&[
            "run",
            "-q",
            "--deny",
            "frontend.internal",
            "--",
            &client,
            "127.0.0.1:53",
            "frontend.internal",
            qtype,
        ]);
        assert_eq!(run.code, 77, "{qtype}: {run:?}");
    }
    assert!(sandbox.v4.seen().is_empty());
}

#[test]
fn unconnected_connected_ipv6_and_dual_stack_sockets_are_all_guarded() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    let cases: [&[&str]; 5] = [
        &["127.0.0.1:53"],
        &["--connect", "127.0.0.1:53"],
        &["[::1]:53"],
        &["--connect", "[::1]:53"],
        &["--dual-stack", "127.0.0.1:53"],
    ];
    for case in cases {
        let report_path = sandbox.path("report.json");
        let mut args = vec![
            "run",
            "-q",
            "--deny",
            "frontend.internal",
            "--report",
            report_path.to_str().unwrap(),
            "--",
            &client,
        ];
        args.extend_from_slice(case);
        args.push("frontend.internal");
        let run = sandbox.run(&args);
        assert_eq!(run.code, 77, "{case:?}: {run:?}");
        assert!(
            run.stdout.contains("error send: PermissionDenied"),
            "{case:?}: {run:?}"
        );
        let report = report(&report_path);
        let resolver = events(&report)[0]["resolver"].as_str().unwrap().to_string();
        let expected = if case.contains(&"[::1]:53") {
            "[::1]:53"
        } else {
            "127.0.0.1:53"
        };
        assert_eq!(resolver, expected, "{case:?}");
    }
    assert!(sandbox.v4.seen().is_empty() && sandbox.v6.seen().is_empty());
    // The same clients resolve an allowed name.
    for case in cases {
        let mut args = vec!["run", "-q", "--deny", "frontend.internal", "--", &client];
        args.extend_from_slice(case);
        args.push("db.internal");
        let run = sandbox.run(&args);
        assert_eq!(run.code, 0, "{case:?}: {run:?}");
        assert!(
            run.stdout.contains("answer db.internal"),
            "{case:?}: {run:?}"
        );
    }
}

#[test]
fn audit_mode_lets_it_resolve_reports_it_and_keeps_the_commands_status() {
    let sandbox = Sandbox::new();
    let policy = write_policy(&sandbox, POLICY);
    let report_path = sandbox.path("report.json");
    let run = sandbox.run(&[
        "run",
        "--audit",
        "-p",
        &policy,
        "--report",
        report_path.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "sh -c 'dig +short +tries=1 +time=5 @127.0.0.1 api.frontend.internal'; exit 3",
    ]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stdout.contains("192.0.2.1"), "resolved: {run:?}");
    assert!(sandbox.v4.saw("api.frontend.internal"));
    assert!(
        run.stderr.contains("WOULD BLOCK api.frontend.internal"),
        "{run:?}"
    );
    let report = report(&report_path);
    assert_eq!(report["mode"], "audit");
    let event = &events(&report)[0];
    assert_eq!(event["verdict"], "audited");
    assert_eq!(chain(event), ["sh", "sh", "dig"]);
    assert!(event.get("socket_ended").is_none());
}

#[test]
fn policy_in_audit_mode_reports_without_blocking() {
    let sandbox = Sandbox::new();
    let policy = write_policy(
        &sandbox,
        "name: try-out\nmode: audit\ndeny: [frontend.internal]\n",
    );
    let client = dns_query();
    let run = sandbox.run(&[
        "run",
        "-p",
        &policy,
        "--",
        &client,
        "127.0.0.1:53",
        "frontend.internal",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("answer frontend.internal"), "{run:?}");
    assert!(
        run.stderr.contains("would block A frontend.internal"),
        "{run:?}"
    );
}

#[test]
fn processes_outside_the_cgroup_are_untouched() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    let marker = sandbox.path("started");
    let mut guarded = sandbox
        .guard(&["run", "-q", "--deny", "frontend.internal", "--", "sh", "-c"])
        .arg(format!("touch {}; sleep 3", marker.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || marker.exists()),
        "guarded command started"
    );
    // While the guarded run is active, the same lookup from outside works.
    let outside = Command::new(&client)
        .args(["127.0.0.1:53", "frontend.internal"])
        .output()
        .unwrap();
    assert!(
        outside.status.success(),
        "{}",
        String::from_utf8_lossy(&outside.stdout)
    );
    assert!(sandbox.v4.saw("frontend.internal"));
    let status = guarded.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn concurrent_runs_with_different_policies_do_not_cross_talk() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    // Each run asks for both names; each may only block its own.
    let script = format!(
        "sleep 0.5; {c} 127.0.0.1:53 a.internal; {c} 127.0.0.1:53 b.internal; true",
        c = client
    );
    let start = |deny: &str, report: &str| {
        sandbox
            .guard(&[
                "run", "-q", "--deny", deny, "--report", report, "--", "sh", "-c", &script,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let report_a = sandbox.path("a.json");
    let report_b = sandbox.path("b.json");
    let a = start("a.internal", report_a.to_str().unwrap());
    let b = start("b.internal", report_b.to_str().unwrap());
    let a = common::Run::from(a.wait_with_output().unwrap());
    let b = common::Run::from(b.wait_with_output().unwrap());
    assert_eq!(a.code, 77, "{a:?}");
    assert_eq!(b.code, 77, "{b:?}");
    assert!(
        a.stdout.contains("answer b.internal") && !a.stdout.contains("answer a.internal"),
        "{a:?}"
    );
    assert!(
        b.stdout.contains("answer a.internal") && !b.stdout.contains("answer b.internal"),
        "{b:?}"
    );
    let names = |path| -> Vec<String> {
        events(&report(path))
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&report_a), ["a.internal"]);
    assert_eq!(names(&report_b), ["b.internal"]);
}

#[test]
fn a_child_cgroup_made_by_the_command_stays_guarded() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    // The command moves itself into a cgroup it creates below the run's one.
    let script = format!(
        "cg=$(awk '$9 == \"cgroup2\" {{print $5; exit}}' /proc/self/mountinfo)$(sed -n 's/^0:://p' /proc/self/cgroup); \
         mkdir \"$cg/nested\" && echo $$ > \"$cg/nested/cgroup.procs\" && grep -q nested /proc/self/cgroup && \
         {client} 127.0.0.1:53 frontend.internal"
    );
    let run = sandbox.run(&[
        "run",
        "-q",
        "--deny",
        "frontend.internal",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(run.code, 77, "{run:?}");
    assert!(
        run.stdout.contains("error send: PermissionDenied"),
        "{run:?}"
    );
}

#[test]
fn dns_port_option_guards_other_ports() {
    let sandbox = Sandbox::new();
    let client = dns_query();
    let other = guard_testkit::DnsServer::start("127.0.0.1:5353".parse().unwrap()).unwrap();
    let run = sandbox.run(&[
        "run",
        "-q",
        "--dns-port",
        "5353",
        "--deny",
        "frontend.internal",
        "--",
        &client,
        "127.0.0.1:5353",
        "frontend.internal",
    ]);
    assert_eq!(run.code, 77, "{run:?}");
    assert!(!other.saw("frontend.internal"));
    // With only the default port, other ports are not DNS to guard.
    let run = sandbox.run(&[
        "run",
        "-q",
        "--deny",
        "frontend.internal",
        "--",
        &client,
        "127.0.0.1:5353",
        "frontend.internal",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
}

#[test]
fn exit_statuses_follow_env_and_the_shell() {
    let sandbox = Sandbox::new();
    let run = sandbox.run(&["run", "-q", "--", "sh", "-c", "exit 7"]);
    assert_eq!(run.code, 7, "{run:?}");
    let run = sandbox.run(&["run", "-q", "--", "/nonexistent/deploy.sh"]);
    assert_eq!(run.code, 127, "{run:?}");
    let not_executable = sandbox.path("deploy.sh");
    fs::write(&not_executable, "#!/bin/sh\n").unwrap();
    let run = sandbox.run(&["run", "-q", "--", not_executable.to_str().unwrap()]);
    assert_eq!(run.code, 126, "{run:?}");
    let run = sandbox.run(&["run", "-q", "--", "sh", "-c", "kill -KILL $$"]);
    assert_eq!(run.code, 128 + 9, "{run:?}");
}

#[test]
fn invalid_policy_stops_before_the_command_runs() {
    let sandbox = Sandbox::new();
    let policy = write_policy(
        &sandbox,
        "name: broken\ndeny:\n  - frontend.internal\n  - \"front end.internal\"\n",
    );
    let marker = sandbox.path("ran");
    let run = sandbox.run(&[
        "run",
        "-p",
        &policy,
        "--",
        "touch",
        marker.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 125, "{run:?}");
    assert!(
        run.stderr
            .contains("policy.yaml:4: deny entry \"front end.internal\""),
        "{run:?}"
    );
    assert!(!marker.exists(), "the command must not run");
    let run = sandbox.run(&[
        "run",
        "--deny",
        "a..b",
        "--",
        "touch",
        marker.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 125, "{run:?}");
    assert!(!marker.exists());
    let missing = sandbox.run(&["run", "-p", "/nonexistent.yaml", "--", "true"]);
    assert_eq!(missing.code, 125);
    assert!(
        missing.stderr.contains("/nonexistent.yaml: cannot read"),
        "{missing:?}"
    );
}

#[test]
fn policy_check_reports_problems_with_file_and_line() {
    let sandbox = Sandbox::new();
    let good = sandbox.path("good.yaml");
    fs::write(&good, POLICY).unwrap();
    let bad = sandbox.path("bad.yaml");
    fs::write(
        &bad,
        "name: x\ndeny:\n  - ok.internal\n  - \"*.*.internal\"\n",
    )
    .unwrap();
    let output = Command::new(GUARD)
        .args(["policy", "check", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(output.status.success());
    let output = Command::new(GUARD)
        .args([
            "policy",
            "check",
            good.to_str().unwrap(),
            bad.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad.yaml:4: deny entry \"*.*.internal\": '*' is only allowed"),
        "{stderr}"
    );
}

#[test]
fn sigterm_is_forwarded_and_the_command_decides_the_status() {
    let sandbox = Sandbox::new();
    let marker = sandbox.path("ready");
    let mut child = sandbox
        .guard(&["run", "-q", "--", "sh", "-c"])
        .arg(format!(
            "trap 'exit 42' TERM; touch {}; while :; do sleep 0.1; done",
            marker.display()
        ))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || marker.exists()));
    let guard_pid = child.id();
    let cgroups = run_cgroups_of(guard_pid);
    assert_eq!(cgroups.len(), 1, "one run cgroup for guard {guard_pid}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(guard_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(42));
    assert!(!cgroups[0].exists(), "cgroup removed after SIGTERM");
}

#[test]
fn sigkill_of_guard_leaves_no_cgroup_and_no_unguarded_command() {
    let sandbox = Sandbox::new();
    let marker = sandbox.path("ready");
    let survivor = sandbox.path("survived");
    let mut child = sandbox
        .guard(&["run", "-q", "--", "sh", "-c"])
        .arg(format!(
            "touch {}; sleep 3; touch {}",
            marker.display(),
            survivor.display()
        ))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || marker.exists()));
    let guard_pid = child.id();
    let cgroups = run_cgroups_of(guard_pid);
    assert_eq!(cgroups.len(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
    // The reaper removes the cgroup and kills the command with it.
    assert!(
        eventually(Duration::from_secs(10), || !cgroups[0].exists()),
        "cgroup left behind"
    );
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !survivor.exists(),
        "the command went on running after guard died"
    );
}

#[test]
fn processes_left_behind_by_the_command_are_ended_with_the_run() {
    let sandbox = Sandbox::new();
    let survivor = sandbox.path("survived");
    let run = sandbox.run(&[
        "run",
        "-q",
        "--",
        "sh",
        "-c",
        &format!(
            "(sleep 2; touch {}) > /dev/null 2>&1 & exit 0",
            survivor.display()
        ),
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !survivor.exists(),
        "a background process outlived the guarded run"
    );
}

#[test]
fn help_documents_the_exit_statuses() {
    let output = Command::new(GUARD)
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for needle in [
        "77",
        "125",
        "126",
        "127",
        "--fail-open",
        "--audit",
        "--report",
    ] {
        assert!(
            help.contains(needle),
            "{needle} missing from --help:\n{help}"
        );
    }
}

#[test]
fn setup_failure_refuses_to_run_unless_fail_open() {
    let sandbox = Sandbox::new();
    let marker = sandbox.path("ran");
    let touch = ["touch", marker.to_str().unwrap()];
    let mut args = vec![
        "run",
        "--cgroup-parent",
        "/nonexistent/cgroup",
        "--deny",
        "frontend.internal",
        "--",
    ];
    args.extend_from_slice(&touch);
    let run = sandbox.run(&args);
    assert_eq!(run.code, 125, "{run:?}");
    assert!(run.stderr.contains("cannot set up enforcement"), "{run:?}");
    assert!(run.stderr.contains("/nonexistent/cgroup"), "{run:?}");
    assert!(!marker.exists(), "the command must not run unguarded");

    let mut args = vec![
        "run",
        "--fail-open",
        "--cgroup-parent",
        "/nonexistent/cgroup",
        "--",
    ];
    args.extend_from_slice(&touch);
    let run = sandbox.run(&args);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("WITHOUT any DNS guard"), "{run:?}");
    assert!(marker.exists());
}

/// A raw IPv6 socket sends the query behind N extension headers. guard
/// follows four; beyond that it cannot see whether the packet is DNS and
/// refuses it (fail closed) rather than let it pass unexamined. (Raw
/// sockets are evidence that fails a run unless allowed; allowed here.)
#[test]
fn ipv6_extension_headers_cannot_hide_a_query() {
    let sandbox = Sandbox::new();
    let sender = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/ipv6_extension_headers.py"
    );
    let send = |headers: &str, name: &str| {
        sandbox.run(&[
            "run",
            "-q",
            "--allow-raw-sockets",
            "--deny",
            "frontend.internal",
            "--",
            "python3",
            sender,
            headers,
            name,
        ])
    };
    for headers in ["0", "1", "4"] {
        let denied = send(headers, "frontend.internal");
        assert_eq!(denied.code, 77, "{headers}: {denied:?}");
        assert!(denied.stdout.contains("refused 1"), "{headers}: {denied:?}");
        let allowed = send(headers, "db.internal");
        assert_eq!(allowed.code, 0, "{headers}: {allowed:?}");
        assert!(allowed.stdout.contains("sent"), "{headers}: {allowed:?}");
    }
    for headers in ["5", "8"] {
        for name in ["frontend.internal", "db.internal"] {
            let run = send(headers, name);
            assert_eq!(run.code, 77, "{headers} {name}: {run:?}");
            assert!(
                run.stdout.contains("refused 1"),
                "{headers} {name}: {run:?}"
            );
            assert!(
                run.stderr.contains("BLOCKED (unreadable)"),
                "{headers} {name}: {run:?}"
            );
        }
    }
}

/// Without privilege nothing is set up and the command does not run; the
/// error names the operation, the object and the OS error, and says what
/// guard needs.
#[test]
fn without_privilege_the_command_is_not_run_and_the_cause_is_named() {
    let sandbox = Sandbox::new();
    let marker = sandbox.path("ran");
    // The command would run as nobody: the marker's directory must be
    // writable by nobody, or the marker could not prove anything.
    let dir = marker.parent().unwrap().to_owned();
    let mode = fs::metadata(&dir).unwrap().permissions();
    fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", GUARD])
        .args(["run", "--standalone", "--deny", "frontend.internal", "--"])
        .args(["touch", marker.to_str().unwrap()])
        .current_dir("/")
        .output()
        .expect("setpriv (util-linux)");
    fs::set_permissions(&dir, mode).unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(!marker.exists(), "the command ran: {stderr}");
    assert!(stderr.contains("Permission denied (os error"), "{stderr}");
    assert!(stderr.contains("guard needs root, or CAP_BPF"), "{stderr}");
    assert!(stderr.contains("the command was not run"), "{stderr}");
}
