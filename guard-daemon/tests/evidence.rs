//! Ways around the DNS hooks, on the real kernel: a process leaving the
//! run's cgroup (moving itself, moved by another, clone3 into another
//! cgroup), packet and raw sockets, guard's own program detached, and
//! hosts-file entries for denied names. Each fails the run (77), names the
//! process, and is in the report; a process that escaped is killed.
mod common;

use std::fs;

use common::{cgroup_root, dns_query, guarded_with, report, validate_report, Run, Sandbox, GUARD};

fn evidence(report: &serde_json::Value) -> &Vec<serde_json::Value> {
    report["evidence"].as_array().expect("evidence array")
}

/// The first entry of one kind. Other entries may come first: on a host
/// that runs nscd, glibc's passwd lookup at a program's start-up is a
/// refused resolver-socket connection, which is noted in the report.
fn first_of<'a>(report: &'a serde_json::Value, kind: &str) -> &'a serde_json::Value {
    evidence(report)
        .iter()
        .find(|e| e["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} evidence in {report:#}"))
}

fn clone3() -> String {
    std::path::Path::new(GUARD)
        .with_file_name("guard-clone3")
        .display()
        .to_string()
}

#[test]
fn a_process_that_moves_itself_out_is_killed_and_fails_the_run() {
    let sandbox = Sandbox::new();
    let root = cgroup_root();
    let script = format!(
        "echo $$ > {}/cgroup.procs; {} 127.0.0.1:53 frontend.internal; echo survived",
        root.display(),
        dns_query()
    );
    let (run, report) = guarded_with(
        &sandbox,
        &["--deny", "frontend.internal"],
        &["sh", "-c", &script],
    );
    assert_eq!(run.code, 77, "{run:?}");
    assert!(!run.stdout.contains("survived"), "{run:?}");
    assert!(
        !sandbox.v4.saw("frontend.internal"),
        "no lookup from outside"
    );
    assert!(
        run.stderr
            .contains("ESCAPED left-cgroup: moved itself to /"),
        "{run:?}"
    );
    let escape = first_of(&report, "left-cgroup");
    assert_eq!(escape["verdict"], "fails-run");
    assert_eq!(escape["action"], "killed");
    assert_eq!(escape["destination"], "/");
    assert_eq!(escape["process_chain"][0]["argv"][0], "sh", "{escape:#}");
    assert_eq!(report["exit_code"], 77);

    // Audit mode: reported, not killed, and the run keeps the command's
    // status unless --fail-on-block.
    for (extra, code) in [(None, 0), (Some("--fail-on-block"), 77)] {
        let mut args = vec!["run", "-q", "--audit", "--deny", "frontend.internal"];
        args.extend(extra);
        args.extend(["--", "sh", "-c", &script]);
        let run = sandbox.run(&args);
        assert_eq!(run.code, code, "{run:?}");
        assert!(run.stdout.contains("survived"), "{run:?}");
        assert!(
            run.stderr.contains("left-cgroup: moved itself to /"),
            "{run:?}"
        );
    }
}

#[test]
fn a_process_moved_out_by_another_is_killed_but_moves_within_the_run_are_not_escapes() {
    let sandbox = Sandbox::new();
    let root = cgroup_root();
    let script = format!(
        "sleep 20 & echo $! > {}/cgroup.procs; wait $!; echo waited=$?",
        root.display()
    );
    let (run, report) = guarded_with(&sandbox, &["-q"], &["sh", "-c", &script]);
    assert_eq!(run.code, 77, "{run:?}");
    assert!(run.stdout.contains("waited=137"), "killed: {run:?}");
    let escape = first_of(&report, "left-cgroup");
    assert_eq!(escape["action"], "killed");
    assert!(
        escape["detail"]
            .as_str()
            .unwrap()
            .starts_with("moved to / by sh"),
        "{escape:#}"
    );
    // The shell, then the child it moved (sleep, or the shell's fork of it
    // if it had not exec'd yet).
    let chain = escape["process_chain"].as_array().unwrap();
    assert_eq!(chain.len(), 2, "{escape:#}");
    assert_eq!(chain[1]["pid"], escape["subject"], "{escape:#}");

    // Into a cgroup the command made below its own: still guarded.
    let inside = "cg=$(awk '$9 == \"cgroup2\" {print $5; exit}' /proc/self/mountinfo)$(sed -n 's/^0:://p' /proc/self/cgroup); \
                  mkdir \"$cg/sub\" && sleep 0.3 & pid=$!; sleep 0.1; echo $pid > \"$cg/sub/cgroup.procs\"; wait $pid; echo waited=$?";
    let run = sandbox.run(&["run", "-q", "--", "sh", "-c", inside]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("waited=0"), "{run:?}");
}

#[test]
fn clone3_into_another_cgroup_is_killed_and_fails_the_run() {
    let sandbox = Sandbox::new();
    let root = cgroup_root();
    let script = format!(
        "{} 127.0.0.1:53 frontend.internal; echo escaped",
        dns_query()
    );
    let (run, report) = guarded_with(
        &sandbox,
        &["-q", "--deny", "frontend.internal"],
        &[&clone3(), root.to_str().unwrap(), "sh", "-c", &script],
    );
    assert_eq!(run.code, 77, "{run:?}");
    assert!(!run.stdout.contains("escaped"), "{run:?}");
    assert!(!sandbox.v4.saw("frontend.internal"));
    let escape = first_of(&report, "left-cgroup");
    assert_eq!(escape["action"], "killed");
    assert!(
        escape["detail"]
            .as_str()
            .unwrap()
            .contains("CLONE_INTO_CGROUP"),
        "{escape:#}"
    );
    assert!(
        escape["process_chain"][0]["argv"][0]
            .as_str()
            .unwrap()
            .ends_with("guard-clone3"),
        "{escape:#}"
    );
}

const PACKET_SOCKET: &str =
    "import socket; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); print('opened')";
const RAW_SOCKET: &str =
    "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP); print('opened')";

#[test]
fn packet_and_raw_sockets_fail_the_run_unless_the_policy_allows_them() {
    let sandbox = Sandbox::new();
    let (run, report) = guarded_with(
        &sandbox,
        &["--deny", "frontend.internal"],
        &["python3", "-c", PACKET_SOCKET],
    );
    assert_eq!(run.code, 77, "{run:?}");
    // Killed before it could send anything below the cgroup hooks.
    assert!(!run.stdout.contains("opened"), "{run:?}");
    let entry = first_of(&report, "packet-socket");
    assert_eq!(entry["action"], "killed");
    assert_eq!(entry["detail"], "socket(AF_PACKET, SOCK_RAW, 0)");
    assert!(
        entry["process_chain"][0]["argv"][0]
            .as_str()
            .unwrap()
            .ends_with("python3"),
        "{entry:#}"
    );

    // A raw IP socket's packets still pass the egress program: recorded,
    // not killed, and the run fails.
    let run = sandbox.run(&[
        "run", "-q", "--deny", "x.test", "--", "python3", "-c", RAW_SOCKET,
    ]);
    assert_eq!(run.code, 77, "{run:?}");
    assert!(run.stdout.contains("opened"), "{run:?}");
    assert!(run.stderr.contains("RAW SOCKET raw-socket"), "{run:?}");

    // A policy written for a tool that needs them.
    let policy = sandbox.path("tool.yaml");
    fs::write(
        &policy,
        "name: capture\ndeny: [frontend.internal]\nallow_raw_sockets: true\n",
    )
    .unwrap();
    let run = sandbox.run(&[
        "run",
        "-q",
        "-p",
        policy.to_str().unwrap(),
        "--",
        "python3",
        "-c",
        PACKET_SOCKET,
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("opened"), "{run:?}");
    assert!(run.stderr.contains("(recorded, allowed)"), "{run:?}");
}

/// What `bpftool link detach` does to guard's egress link, from inside the
/// run (the link of the run's own cgroup, found as a user would).
const DETACH: &str = "cg=$(stat -c %i $(awk '$9 == \"cgroup2\" {print $5; exit}' /proc/self/mountinfo)$(sed -n 's/^0:://p' /proc/self/cgroup)); \
    id=$(bpftool -j link show | python3 -c \"import json, sys; print([l['id'] for l in json.load(sys.stdin) if l.get('cgroup_id') == $cg and l.get('attach_type') == 'cgroup_inet_egress'][0])\"); \
    bpftool link detach id $id && echo detached; sleep 5; echo still-running";

#[test]
fn detaching_guards_program_fails_the_run_and_ends_it() {
    let sandbox = Sandbox::new();
    let (run, report) = guarded_with(
        &sandbox,
        &["--deny", "frontend.internal"],
        &["sh", "-c", DETACH],
    );
    assert_eq!(run.code, 77, "{run:?}");
    assert!(run.stdout.contains("detached"), "{run:?}");
    // Nothing goes on unguarded: the run is ended at once.
    assert!(!run.stdout.contains("still-running"), "{run:?}");
    assert!(run.stderr.contains("ending the run"), "{run:?}");
    let kinds: Vec<&str> = evidence(&report)
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"detached"), "{report:#}");
    let bpf = evidence(&report)
        .iter()
        .find(|e| e["kind"] == "bpf")
        .expect("the bpf() call is evidence too");
    assert_eq!(bpf["detail"], "bpf(BPF_LINK_DETACH)");
    assert_eq!(bpf["comm"], "bpftool");
}

#[test]
fn a_hosts_entry_for_a_denied_name_is_named_and_fails_the_run() {
    let sandbox = Sandbox::new();
    let hosts = sandbox.path("hosts");
    fs::write(
        &hosts,
        "127.0.0.1 localhost\n192.0.2.7 fe.frontend.internal frontend # the frontend\n192.0.2.8 db.internal\n",
    )
    .unwrap();
    let report_path = sandbox.path("report.json");
    let files = [(hosts.as_path(), "/etc/hosts")];
    let run = Run::from(
        sandbox
            .guard_with_files(
                &files,
                &[
                    "run",
                    "--deny",
                    "*.frontend.internal",
                    "--report",
                    report_path.to_str().unwrap(),
                    "--",
                    "getent",
                    "hosts",
                    "db.internal",
                ],
            )
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 77, "{run:?}");
    assert!(
        run.stderr.contains(
            "/etc/hosts:2: fe.frontend.internal → 192.0.2.7 matches deny *.frontend.internal"
        ),
        "{run:?}"
    );
    let report = report(&report_path);
    validate_report(&report);
    let entries = report["hosts_entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{report:#}");
    assert_eq!(entries[0]["file"], "/etc/hosts");
    assert_eq!(entries[0]["line"], 2);
    assert_eq!(entries[0]["name"], "fe.frontend.internal");
    assert_eq!(entries[0]["address"], "192.0.2.7");
    assert_eq!(entries[0]["rule"]["pattern"], "*.frontend.internal");
    // Audit mode names it without failing.
    let run = Run::from(
        sandbox
            .guard_with_files(
                &files,
                &[
                    "run",
                    "--audit",
                    "--deny",
                    "*.frontend.internal",
                    "--",
                    "true",
                ],
            )
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("HOSTS FILE /etc/hosts:2"), "{run:?}");
}
