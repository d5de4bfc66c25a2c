//! `guard daemon` on the real kernel: a real daemon process per test, with
//! its own configuration, pin directory, socket and cgroups, in the test's
//! own network namespace (see common::Sandbox).
mod common;

use std::{
    collections::HashSet,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::{
    daemon::{query, TestDaemon, FRONTEND},
    dns_query, eventually, report, Run, Sandbox, GUARD,
};
use guard_daemon::kernel::KernelMaps as _;

/// A run through the daemon reports exactly what a standalone run reports.
#[test]
fn a_run_through_the_daemon_behaves_like_a_standalone_run() {
    let sandbox = Sandbox::new();
    let daemon = TestDaemon::start(&[FRONTEND], "  []\n");
    let policy = daemon.dir.path().join("policies/frontend.yaml");
    let script = format!(
        "{q} 127.0.0.1:53 api.frontend.test; {q} 127.0.0.1:53 status.frontend.test; {q} 127.0.0.1:53 db.test; exit 3",
        q = dns_query()
    );
    let mut reports = Vec::new();
    for (how, extra) in [("daemon", None), ("standalone", Some("--standalone"))] {
        let report_path = sandbox.path(&format!("{how}.json"));
        let mut args = vec!["run", "-p", policy.to_str().unwrap(), "--report"];
        args.push(report_path.to_str().unwrap());
        args.extend(extra);
        args.extend(["--", "sh", "-c", &script]);
        let run = Run::from(daemon.guard(&sandbox, &args).output().unwrap());
        assert_eq!(run.code, 77, "{how}: {run:?}");
        assert!(
            run.stderr.contains("blocked A api.frontend.test"),
            "{how}: {run:?}"
        );
        reports.push(report(&report_path));
    }
    let (via_daemon, standalone) = (&reports[0], &reports[1]);
    let runs_dir = daemon.cgroups.join("runs");
    assert!(
        via_daemon["cgroup"]
            .as_str()
            .unwrap()
            .starts_with(runs_dir.to_str().unwrap()),
        "the run did not go through the daemon: {}",
        via_daemon["cgroup"]
    );
    assert!(!standalone["cgroup"]
        .as_str()
        .unwrap()
        .starts_with(runs_dir.to_str().unwrap()));
    for key in [
        "exit_code",
        "command_exit",
        "counters",
        "events_lost",
        "mode",
        "policies",
    ] {
        assert_eq!(via_daemon[key], standalone[key], "{key} differs");
    }
    let summary = |r: &serde_json::Value| -> Vec<(String, String, String, String)> {
        r["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["verdict"].as_str().unwrap().to_owned(),
                    e["name"].as_str().unwrap().to_owned(),
                    e["rule"]["pattern"].to_string(),
                    e["process_chain"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|l| l["argv"][0].to_string())
                        .collect::<Vec<_>>()
                        .join(" > "),
                )
            })
            .collect()
    };
    assert_eq!(summary(via_daemon), summary(standalone));
    assert_eq!(via_daemon["counters"]["blocked"], 1);
    assert!(sandbox.v4.saw("status.frontend.test") && sandbox.v4.saw("db.test"));
    assert!(!sandbox.v4.saw("api.frontend.test"));
}

/// kill -9 of the daemon: a guarded run and a bound cgroup stay guarded;
/// after a restart the run resumes and its next blocked lookup is reported.
#[test]
fn enforcement_survives_kill_9_and_a_restart_resumes_reporting() {
    let sandbox = Sandbox::new();
    let (mut daemon, agent) = TestDaemon::with_agent();

    // A run that waits for our signal between lookups.
    let step = |n: u32| sandbox.path(&format!("step{n}"));
    let script = format!(
        "while [ ! -e {s1} ]; do sleep 0.05; done; {q} 127.0.0.1:53 during.frontend.test; echo during=$?; \
         while [ ! -e {s2} ]; do sleep 0.05; done; {q} 127.0.0.1:53 after.frontend.test; echo after=$?",
        s1 = step(1).display(),
        s2 = step(2).display(),
        q = dns_query()
    );
    let report_path = sandbox.path("report.json");
    let run = daemon.start_script(&sandbox, &report_path, &script, &[]);
    assert!(eventually(Duration::from_secs(10), || {
        daemon.status()["bindings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["kind"] == "run")
    }));

    daemon.kill9();
    // The daemon is gone; its pinned programs still decide.
    fs::write(step(1), "").unwrap();
    let bound = Run::from(
        daemon
            .in_cgroup(&sandbox, &agent, &query("bound.frontend.test"))
            .output()
            .unwrap(),
    );
    assert_eq!(bound.code, 1, "{bound:?}");
    assert!(bound.stdout.contains("error send"), "{bound:?}");
    let allowed = Run::from(
        daemon
            .in_cgroup(&sandbox, &agent, &query("status.frontend.test"))
            .output()
            .unwrap(),
    );
    assert_eq!(allowed.code, 0, "{allowed:?}");
    // The run's lookup happens (and is refused) while the daemon is down;
    // the run's cgroup stays, with the command in it.
    let runs_dir = daemon.cgroups.join("runs");
    let runs_now = || {
        fs::read_dir(&runs_dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().unwrap().is_dir())
            .count()
    };
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(runs_now(), 1);
    assert!(!sandbox.v4.saw("during.frontend.test"));
    assert!(!sandbox.v4.saw("bound.frontend.test"));

    daemon.spawn();
    // The client reconnects, and the daemon names the adopted run's
    // policy again from the resumed request.
    assert!(
        eventually(Duration::from_secs(10), || daemon.status()["bindings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["kind"] == "run" && b["policies"][0] == "command-line")),
        "{:#}",
        daemon.status()
    );
    fs::write(step(2), "").unwrap();
    let run = run.wait();
    assert_eq!(run.code, 77, "{run:?}\n{}", daemon.log());
    assert!(run.stdout.contains("during=1"), "{run:?}");
    assert!(run.stdout.contains("after=1"), "{run:?}");
    assert!(
        run.stderr.contains("reconnected to the guard daemon"),
        "{run:?}"
    );
    let report = report(&report_path);
    let names: HashSet<&str> = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    // Both blocked lookups are reported: the one made while the daemon was
    // down was read from the pinned ring buffer after the restart.
    assert_eq!(
        names,
        HashSet::from(["during.frontend.test", "after.frontend.test"]),
        "{report:#}"
    );
    assert_eq!(report["counters"]["blocked"], 2);
    assert!(!sandbox.v4.saw("after.frontend.test"));
    // The restarted daemon reports the bound cgroup's blocks too.
    let again = Run::from(
        daemon
            .in_cgroup(&sandbox, &agent, &query("again.frontend.test"))
            .output()
            .unwrap(),
    );
    assert_eq!(again.code, 1, "{again:?}");
    assert!(eventually(Duration::from_secs(10), || {
        let events = daemon.admin(&["events", "--json"]).output().unwrap();
        String::from_utf8_lossy(&events.stdout).contains("again.frontend.test")
    }));
    let log = daemon.log();
    assert!(log.contains("adopted the pinned programs"), "{log}");
    // The blocks made while it was down are logged under their binding.
    assert!(
        log.lines()
            .any(|l| l.contains("name=bound.frontend.test") && l.contains("policy=\"frontend\"")),
        "{log}"
    );
    // The resumed run's rules were named again for the daemon's own log.
    assert!(
        log.lines().any(|l| l.contains("name=after.frontend.test")
            && l.contains("policy=\"command-line\"")
            && l.contains("deny *.frontend.test")),
        "{log}"
    );
}

/// A FIFO, a device and a directory named like policies in the policies
/// directory: a reload and a restart skip them instead of hanging on the
/// FIFO or reading the device forever, and say so in the log and in
/// `guard status`; the real policies still apply.
#[test]
fn special_files_in_the_policies_directory_are_skipped_and_reported() {
    let _sandbox = Sandbox::new();
    let mut daemon = TestDaemon::start(
        &[FRONTEND],
        "  - cgroup: @CG@/agent\n    policies: [frontend]\n",
    );
    let policies = daemon.dir.path().join("policies");
    nix::unistd::mkfifo(&policies.join("fifo.yaml"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    std::os::unix::fs::symlink("/dev/zero", policies.join("zero.yaml")).unwrap();
    fs::create_dir(policies.join("dir.yml")).unwrap();
    let expected = [
        format!(
            "{}/dir.yml: cannot read: it is a directory, not a regular file",
            policies.display()
        ),
        format!(
            "{}/fifo.yaml: cannot read: it is a FIFO, not a regular file",
            policies.display()
        ),
        format!(
            "{}/zero.yaml: cannot read: it is a character device, not a regular file",
            policies.display()
        ),
    ];
    let reload = common::bounded(daemon.admin(&["reload"]), daemon.dir.path());
    assert_eq!(reload.code, 0, "{reload:?}\n{}", daemon.log());
    let skipped = |daemon: &TestDaemon| -> Vec<String> {
        serde_json::from_value(daemon.status()["skipped_policy_files"].clone()).unwrap()
    };
    assert_eq!(skipped(&daemon), expected);
    assert_eq!(daemon.status()["bindings"][0]["policies"][0], "frontend");
    let status = common::bounded(daemon.admin(&["status"]), daemon.dir.path());
    assert!(
        status.stdout.contains("skipped in the policies directory:"),
        "{status:?}"
    );
    // A start reads the directory too (spawn waits for the daemon to answer).
    daemon.kill9();
    daemon.spawn();
    assert_eq!(skipped(&daemon), expected);
    for message in &expected {
        assert!(
            daemon
                .log()
                .contains(&format!("skipped in the policies directory: {message}")),
            "{}",
            daemon.log()
        );
    }
}

/// Reloading while lookups run: names denied in both policies are never
/// answered, names allowed in both are always answered, and a broken policy
/// is refused with its file and line, the old one staying in force.
#[test]
fn reload_swaps_policies_atomically_and_refuses_bad_ones() {
    let sandbox = Sandbox::new();
    let version = |n: u32| {
        format!(
            "name: churn\ndeny:\n  - always.denied.test\n  - \"*.v{n}.test\"\n  - only-in-{n}.test\n"
        )
    };
    let daemon = TestDaemon::start(
        &[("churn.yaml", &version(1))],
        "  - cgroup: @CG@/agent\n    policies: [churn]\n",
    );
    let agent = daemon.cgroup("agent");
    assert!(eventually(Duration::from_secs(10), || daemon.status()
        ["bindings"][0]["cgroup"]
        .is_string()));
    // A client in the bound cgroup: 400 rounds of a denied and an allowed
    // name, counting wrong verdicts itself.
    let script = format!(
        "bad=0; i=0; while [ $i -lt 400 ]; do \
           if {q} 127.0.0.1:53 always.denied.test >/dev/null; then bad=$((bad+1)); fi; \
           if ! {q} 127.0.0.1:53 allowed-$i.test >/dev/null; then bad=$((bad+1)); fi; \
           i=$((i+1)); done; echo wrong=$bad",
        q = format!("{} --timeout 2", dns_query())
    );
    let client = daemon
        .in_cgroup(&sandbox, &agent, &["sh".into(), "-c".into(), script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let policy_file = daemon.dir.path().join("policies/churn.yaml");
    let mut reloads = 0;
    let mut policy_ids = HashSet::new();
    while reloads < 40 {
        fs::write(&policy_file, version(reloads % 2 + 1)).unwrap();
        let reload = daemon.admin(&["reload"]).output().unwrap();
        assert!(reload.status.success(), "{reload:?}");
        policy_ids.insert(
            daemon.status()["bindings"][0]["policy_id"]
                .as_u64()
                .unwrap(),
        );
        reloads += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = client.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("wrong=0"), "{stdout}");
    assert!(
        policy_ids.len() >= 40,
        "reloads did not swap policy ids: {policy_ids:?}"
    );
    assert!(!sandbox.v4.saw("always.denied.test"));

    // The last version written was v2 (40 reloads, even count ends on 2).
    let check = |name: &str| {
        Run::from(
            daemon
                .in_cgroup(&sandbox, &agent, &query(name))
                .output()
                .unwrap(),
        )
        .code
    };
    assert_eq!(check("x.v2.test"), 1);
    assert_eq!(check("x.v1.test"), 0);

    // A broken policy: refused, named with its line; v2 stays in force.
    fs::write(
        &policy_file,
        "name: churn\ndeny:\n  - always.denied.test\n  - \"bad name.test\"\n",
    )
    .unwrap();
    let reload = Run::from(daemon.admin(&["reload"]).output().unwrap());
    assert_eq!(reload.code, 1, "{reload:?}");
    assert!(
        reload
            .stderr
            .contains(&format!("{}:4", policy_file.display())),
        "{reload:?}"
    );
    assert!(reload.stderr.contains("bad name.test"), "{reload:?}");
    assert!(
        reload.stderr.contains("previous policies stay in force"),
        "{reload:?}"
    );
    assert_eq!(check("y.v2.test"), 1);
    assert_eq!(check("y.v1.test"), 0);
    // Only the live policy's rules are loaded: old versions were removed.
    assert_eq!(daemon.status()["rules_loaded"], 3);

    // SIGHUP reloads too.
    fs::write(&policy_file, version(1)).unwrap();
    let pid = daemon.child.as_ref().unwrap().id();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(10), || check("z.v1.test") == 1));
    assert_eq!(check("z.v2.test"), 0);
}

#[test]
fn the_socket_refuses_clients_that_are_not_root() {
    let _sandbox = Sandbox::new();
    let daemon = TestDaemon::start(&[FRONTEND], "  []\n");
    let as_nobody = |args: &[&str]| {
        let mut command = daemon.admin(args);
        command.uid(65534).gid(65534);
        Run::from(command.output().unwrap())
    };
    // The file modes keep others out...
    let refused = as_nobody(&["status"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("Permission denied"), "{refused:?}");
    // ...and with the modes opened up, the peer check still refuses.
    fs::set_permissions(
        daemon.socket.parent().unwrap(),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    fs::set_permissions(&daemon.socket, fs::Permissions::from_mode(0o666)).unwrap();
    fs::set_permissions(daemon.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let refused = as_nobody(&["status"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("guard's API is for root only (you are uid 65534)"),
        "{refused:?}"
    );
    let refused = as_nobody(&["reload"]);
    assert!(refused.stderr.contains("root only"), "{refused:?}");
    assert!(daemon.log().contains("refused a client that is not root"));
    // Root still gets in.
    assert_eq!(daemon.status()["pid"], daemon.child.as_ref().unwrap().id());
}

/// 50 runs at once, each with its own deny list, through one daemon: each
/// blocks its own name and nobody else's.
#[test]
fn fifty_concurrent_runs_do_not_see_each_others_policies() {
    let sandbox = Sandbox::new();
    let daemon = TestDaemon::start(&[FRONTEND], "  []\n");
    let mut children = Vec::new();
    for i in 0..50 {
        let mine = format!("run{i}.test");
        let neighbour = format!("run{}.test", (i + 1) % 50);
        let script = format!(
            "{q} 127.0.0.1:53 {mine}; echo mine=$?; {q} 127.0.0.1:53 {neighbour}; echo neighbour=$?",
            q = format!("{} --timeout 3", dns_query())
        );
        let report_path = sandbox.path(&format!("report{i}.json"));
        let child = daemon
            .guard(
                &sandbox,
                &[
                    "run",
                    "--quiet",
                    "--deny",
                    &mine,
                    "--report",
                    report_path.to_str().unwrap(),
                    "--",
                    "sh",
                    "-c",
                    &script,
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        children.push((i, child, report_path));
    }
    let runs_dir = daemon.cgroups.join("runs");
    for (i, child, report_path) in children {
        let run = Run::from(child.wait_with_output().unwrap());
        assert_eq!(run.code, 77, "run {i}: {run:?}");
        assert!(run.stdout.contains("mine=1"), "run {i}: {run:?}");
        assert!(run.stdout.contains("neighbour=0"), "run {i}: {run:?}");
        let report = report(&report_path);
        assert!(report["cgroup"]
            .as_str()
            .unwrap()
            .starts_with(runs_dir.to_str().unwrap()));
        let events = report["events"].as_array().unwrap();
        assert_eq!(events.len(), 1, "run {i}: {report:#}");
        assert_eq!(events[0]["name"], format!("run{i}.test"));
        assert_eq!(report["counters"]["blocked"], 1);
        assert_eq!(report["counters"]["inspected"], 2);
    }
    for i in 0..50 {
        assert!(
            !sandbox.v4.saw(&format!("run{i}.test")) || {
                // Every name is some neighbour's: it must have been answered
                // for exactly that neighbour (one query), never for its owner.
                sandbox
                    .v4
                    .seen()
                    .iter()
                    .filter(|q| q.name == format!("run{i}.test"))
                    .count()
                    == 1
            }
        );
    }
}

/// 1,000 short runs in a row leave no cgroup, map entry or link behind.
#[test]
fn a_thousand_short_runs_leave_nothing_behind() {
    let _sandbox = Sandbox::new();
    let (daemon, _agent) = TestDaemon::with_agent();
    let count = |pinned: &guard_daemon::kernel::Pinned| {
        (
            pinned.bindings().unwrap().len(),
            pinned.rule_count().unwrap(),
            pinned.all_policy_counters().unwrap().len(),
            pinned.attached_cgroups().len(),
        )
    };
    let before = count(&daemon.pinned());
    assert_eq!(
        before,
        (1, 2, 1, 2),
        "one binding (2 rules), runs + agent links"
    );
    // Each run has its own policy, so each writes rules and a binding.
    let policy = daemon.dir.path().join("policies/frontend.yaml");
    let script = "i=0; while [ $i -lt 1000 ]; do \"$0\" run --quiet -p \"$1\" --deny \"short-$i.test\" -- true || exit 1; i=$((i+1)); done";
    let output = Command::new("sh")
        .args(["-c", script, GUARD, policy.to_str().unwrap()])
        .env("GUARD_SOCKET", &daemon.socket)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}\n{}", daemon.log());
    assert!(eventually(Duration::from_secs(10), || count(
        &daemon.pinned()
    ) == before));
    let runs: Vec<_> = fs::read_dir(daemon.cgroups.join("runs"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.path())
        .collect();
    assert!(runs.is_empty(), "run cgroups left: {runs:?}");
    let status = daemon.status();
    assert_eq!(status["bindings"].as_array().unwrap().len(), 1);
    // The metrics kept counting across the runs that are gone.
    let log = daemon.log();
    assert!(!log.contains("ERROR"), "{log}");
}

/// `guard events --follow` streams, the metrics count per policy, the log
/// has one structured record per blocked lookup (JSON lines).
#[test]
fn events_metrics_and_logs_report_blocked_lookups() {
    let sandbox = Sandbox::new();
    let port = 19000 + (std::process::id() % 1000) as u16;
    let daemon = TestDaemon::start_logging(
        &[FRONTEND],
        &format!("  - unit: guard-test-agent.service\n    policies: [frontend]\nmetrics_address: 127.0.0.1:{port}\n"),
        true,
    );
    // A "unit": the daemon finds it by name in the cgroup tree.
    let unit = daemon.cgroup("system.slice/guard-test-agent.service");
    assert!(
        eventually(Duration::from_secs(10), || daemon.status()["bindings"][0]
            ["cgroup"]
            == unit.to_str().unwrap()),
        "{:#}",
        daemon.status()
    );
    let mut follow = daemon
        .admin(&["events", "--follow", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    std::thread::sleep(Duration::from_millis(300));
    let blocked = Run::from(
        daemon
            .in_cgroup(&sandbox, &unit, &query("live.frontend.test"))
            .output()
            .unwrap(),
    );
    assert_eq!(blocked.code, 1, "{blocked:?}");
    let line = lines.next().expect("an event line").unwrap();
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["name"], "live.frontend.test");
    assert_eq!(event["verdict"], "blocked");
    assert_eq!(event["binding"], "unit");
    assert_eq!(event["policy"], "frontend");
    assert_eq!(event["guarded"], "guard-test-agent.service");
    assert_eq!(event["rule"]["pattern"], "*.frontend.test");
    // The chain stops at the edge of the guarded cgroup: the shell that
    // moved itself in and exec'd the query, nothing of what started it.
    let chain = event["process_chain"].as_array().unwrap();
    assert_eq!(chain.len(), 1, "{event:#}");
    assert!(
        chain[0]["argv"][0]
            .as_str()
            .unwrap()
            .ends_with("guard-dns-query"),
        "{event:#}"
    );
    let _ = follow.kill();
    let _ = follow.wait();

    let text = Run::from(daemon.admin(&["events"]).output().unwrap());
    assert!(
        text.stdout.contains("BLOCKED A live.frontend.test (unit guard-test-agent.service, policy frontend) [deny *.frontend.test]"),
        "{text:?}"
    );

    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut metrics = String::new();
    stream.read_to_string(&mut metrics).unwrap();
    assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
    assert!(
        metrics
            .contains("guard_dns_queries_blocked_total{binding=\"unit\",policy=\"frontend\"} 1\n"),
        "{metrics}"
    );
    assert!(metrics
        .contains("guard_dns_queries_inspected_total{binding=\"unit\",policy=\"frontend\"} 1\n"));

    // JSON lines: one structured record per blocked lookup.
    let log = daemon.log();
    let records: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let blocked: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["target"] == "guard::blocked")
        .collect();
    assert_eq!(blocked.len(), 1, "{log}");
    let record = blocked[0];
    assert_eq!(record["name"], "live.frontend.test", "{record:#}");
    assert_eq!(record["policy"], "frontend");
    assert_eq!(record["binding"], "unit");
    assert_eq!(record["level"], "WARN");
    assert!(record["chain"]
        .as_str()
        .unwrap()
        .contains("guard-dns-query"));

    let status = Run::from(daemon.admin(&["status"]).output().unwrap());
    assert!(
        status
            .stdout
            .contains("unit guard-test-agent.service  [enforce] frontend"),
        "{status:?}"
    );
    assert!(
        status.stdout.contains("inspected 1, blocked 1"),
        "{status:?}"
    );
}

#[test]
fn a_bad_configuration_is_refused_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("policies")).unwrap();
    fs::write(dir.path().join("policies").join(FRONTEND.0), FRONTEND.1).unwrap();
    let config = dir.path().join("daemon.yaml");
    fs::write(
        &config,
        "bindings:\n  - unit: deploy-agent.service\n    policies: [frontend, nope]\n",
    )
    .unwrap();
    let run = Run::from(
        Command::new(GUARD)
            .args(["daemon", "--config"])
            .arg(&config)
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains(&format!(
            "{}:3: binding 1 (deploy-agent.service): unknown policy \"nope\"",
            config.display()
        )),
        "{run:?}"
    );
}

/// `guard ensure-guarded` as a bound unit's ExecStartPre: it returns once
/// the unit's cgroup is guarded, so the main process never runs unguarded;
/// in a cgroup nothing binds it fails.
#[test]
fn ensure_guarded_binds_a_starting_unit_at_once() {
    let sandbox = Sandbox::new();
    let daemon = TestDaemon::start(
        &[FRONTEND],
        "  - unit: guard-test-ensure.service\n    policies: [frontend]\n",
    );
    let start_unit = |cgroup: &Path| {
        let script = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            format!(
                "{GUARD} ensure-guarded && exec {} --timeout 2 127.0.0.1:53 early.frontend.test",
                dns_query()
            ),
        ];
        let mut command = daemon.in_cgroup(&sandbox, cgroup, &script);
        command.env("GUARD_SOCKET", &daemon.socket);
        Run::from(command.output().unwrap())
    };
    // The unit's cgroup appears and its "ExecStartPre" runs at once,
    // without waiting for the daemon's periodic scan.
    let unit = daemon.cgroup("system.slice/guard-test-ensure.service");
    let started = start_unit(&unit);
    assert_eq!(started.code, 1, "{started:?}");
    assert!(
        started.stdout.contains("is guarded (frontend)"),
        "{started:?}"
    );
    assert!(started.stdout.contains("error send"), "{started:?}");
    assert!(!sandbox.v4.saw("early.frontend.test"));

    let elsewhere = daemon.cgroup("system.slice/other.service");
    let refused = start_unit(&elsewhere);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("is not guarded"), "{refused:?}");
    assert!(!refused.stdout.contains("error send"), "{refused:?}");
}

/// The shipped unit file passes systemd's own checks, and the shipped
/// configuration loads with the repository's policies: as installed (no
/// bindings), and with its commented example uncommented. (The package test,
/// `cargo xtask test-package`, runs them on systemd.)
#[test]
fn the_shipped_unit_and_configuration_are_valid() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let unit = fs::read_to_string(repo.join("dist/guard.service")).unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("Delegate=yes"));
    assert!(unit.contains("\nRuntimeDirectory=guard\n"), "{unit}");
    let unit_path = dir.path().join("guard.service");
    fs::write(&unit_path, unit.replace("/usr/bin/guard", GUARD)).unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .output()
        .expect("systemd-analyze (cargo xtask setup installs systemd)");
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    let etc = dir.path().join("etc-guard");
    fs::create_dir_all(etc.join("policies")).unwrap();
    for entry in fs::read_dir(repo.join("policies")).unwrap().flatten() {
        fs::copy(entry.path(), etc.join("policies").join(entry.file_name())).unwrap();
    }
    let shipped = fs::read_to_string(repo.join("dist/daemon.yaml")).unwrap();
    fs::write(etc.join("daemon.yaml"), &shipped).unwrap();
    let config = guard_daemon::daemon::config::Config::load(&etc.join("daemon.yaml"))
        .expect("dist/daemon.yaml loads");
    assert!(config.bindings.is_empty());
    assert_eq!(config.socket, Path::new("/run/guard/guard.sock"));

    // The example: the commented `# bindings:` block, up to the blank line.
    let example: String = shipped
        .lines()
        .skip_while(|l| *l != "# bindings:")
        .take_while(|l| !l.is_empty())
        .map(|l| format!("{}\n", l.strip_prefix("# ").unwrap_or(l)))
        .collect();
    let uncommented = shipped.replace("bindings: []\n", &example);
    fs::write(etc.join("daemon.yaml"), uncommented).unwrap();
    let config = guard_daemon::daemon::config::Config::load(&etc.join("daemon.yaml"))
        .expect("the example in dist/daemon.yaml loads");
    assert_eq!(config.bindings.len(), 2, "{example}");

    // Bound units must outlive a restart of guard (Wants=, not Requires=)
    // and never start unguarded.
    let drop_in = fs::read_to_string(repo.join("dist/deploy-agent.service.d/guard.conf")).unwrap();
    let directives: Vec<&str> = drop_in
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .collect();
    assert_eq!(
        directives,
        [
            "Wants=guard.service",
            "After=guard.service",
            "ExecStartPre=/usr/bin/guard ensure-guarded"
        ]
    );
}

/// An upgrade (here: a restart whose programs differ, forced by another
/// ring-buffer size) pins a new generation and removes the old one without
/// a moment in which a bound cgroup's denied lookup gets through.
#[test]
fn a_new_generation_replaces_the_old_without_a_gap() {
    let sandbox = Sandbox::new();
    let (mut daemon, agent) = TestDaemon::with_agent();
    let pin_root = daemon.pin_root.clone();
    let generations = || -> Vec<PathBuf> {
        fs::read_dir(&pin_root)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect()
    };
    let before = generations();
    assert_eq!(before.len(), 1);
    // A client that keeps asking for a denied name until told to stop.
    let stop = sandbox.path("stop");
    let script = format!(
        "n=0; while [ ! -e {stop} ]; do {q} --timeout 1 127.0.0.1:53 loop.frontend.test >/dev/null && echo LEAKED; n=$((n+1)); done; echo rounds=$n",
        stop = stop.display(),
        q = dns_query()
    );
    let client = daemon
        .in_cgroup(&sandbox, &agent, &["sh".into(), "-c".into(), script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    daemon.restart_as_new_generation();
    std::thread::sleep(Duration::from_millis(300));
    fs::write(&stop, "").unwrap();
    let output = client.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("LEAKED"), "{stdout}");
    let rounds: u32 = stdout
        .trim()
        .strip_prefix("rounds=")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(rounds >= 10, "{stdout}");
    assert!(!sandbox.v4.saw("loop.frontend.test"));
    let after = generations();
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after, before);
    assert!(daemon.log().contains("removing a previous generation"));
    assert_eq!(
        daemon.status()["bindings"][0]["cgroup"],
        agent.to_str().unwrap()
    );
}

/// When a `guard run` hosted by the daemon dies (kill -9), the daemon ends
/// the run: the command is killed and its cgroup, binding and rules go.
#[test]
fn the_daemon_ends_a_run_whose_guard_run_died() {
    let _sandbox = Sandbox::new();
    let daemon = TestDaemon::start(&[FRONTEND], "  []\n");
    let before = daemon.pinned().rule_count().unwrap();
    let mut run = daemon
        .admin(&["run", "--deny", "x.test", "--", "sleep", "300"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let runs_dir = daemon.cgroups.join("runs");
    let run_cgroups = || -> Vec<PathBuf> {
        fs::read_dir(&runs_dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().unwrap().is_dir())
            .map(|e| e.path())
            .collect()
    };
    let mut sleeper = None;
    assert!(eventually(Duration::from_secs(10), || {
        sleeper = run_cgroups()
            .first()
            .and_then(|c| fs::read_to_string(c.join("cgroup.procs")).ok())
            .and_then(|p| p.lines().next().map(str::to_owned));
        sleeper.is_some()
    }));
    assert_eq!(daemon.pinned().rule_count().unwrap(), before + 1);
    run.kill().unwrap();
    run.wait().unwrap();
    let sleeper = sleeper.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || run_cgroups().is_empty()
            && !Path::new(&format!("/proc/{sleeper}")).exists()),
        "{:?}\n{}",
        run_cgroups(),
        daemon.log()
    );
    assert_eq!(daemon.pinned().rule_count().unwrap(), before);
    assert_eq!(daemon.pinned().bindings().unwrap().len(), 0);
    assert!(daemon.log().contains("client went away"));
}

/// A `guard run` started inside a guarded cgroup (a bound unit, or another
/// run) must stay under that guard: the daemon does not move it out to its
/// runs cgroup; it runs standalone, nested, and both guards decide.
#[test]
fn a_nested_guard_run_stays_under_the_outer_guard() {
    let sandbox = Sandbox::new();
    let (daemon, agent) = TestDaemon::with_agent();
    let mut inner: Vec<String> = ["run", "--deny", "other.test", "--"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    inner.extend(query("inner.frontend.test"));
    let mut in_unit = vec![GUARD.to_owned()];
    in_unit.extend(inner.iter().cloned());
    let mut command = daemon.in_cgroup(&sandbox, &agent, &in_unit);
    command.env("GUARD_SOCKET", &daemon.socket);
    let run = Run::from(command.output().unwrap());
    assert!(run.stderr.contains("running standalone"), "{run:?}");
    assert!(run.stdout.contains("error send"), "{run:?}");
    assert!(!sandbox.v4.saw("inner.frontend.test"));

    // Inside a run hosted by the daemon.
    let mut args = vec!["run", "--deny", "nested.frontend.test", "--", GUARD];
    let mut inner: Vec<String> = ["run", "--deny", "other.test", "--"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    inner.extend(query("nested.frontend.test"));
    args.extend(inner.iter().map(String::as_str));
    let run = Run::from(daemon.guard(&sandbox, &args).output().unwrap());
    assert_eq!(run.code, 77, "{run:?}");
    assert!(run.stderr.contains("running standalone"), "{run:?}");
    assert!(!sandbox.v4.saw("nested.frontend.test"));
}

/// A task leaving a bound cgroup is killed (enforce mode) and logged; a
/// run through the daemon fails on an escape exactly as a standalone run.
#[test]
fn escapes_from_bound_cgroups_and_hosted_runs_are_killed_and_reported() {
    let sandbox = Sandbox::new();
    let (daemon, agent) = TestDaemon::with_agent();
    let root = common::cgroup_root();
    let escape = format!("echo $$ > {}/cgroup.procs; echo survived", root.display());
    let moved = Run::from(
        daemon
            .in_cgroup(
                &sandbox,
                &agent,
                &["sh".to_string(), "-c".to_string(), escape.clone()],
            )
            .output()
            .unwrap(),
    );
    assert!(!moved.stdout.contains("survived"), "killed: {moved:?}");
    assert!(
        eventually(Duration::from_secs(5), || daemon
            .log()
            .contains("moved itself to /")),
        "{}",
        daemon.log()
    );
    let events = Run::from(daemon.admin(&["events", "--json"]).output().unwrap());
    let escape_event = events
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["kind"] == "left-cgroup")
        .unwrap_or_else(|| panic!("an evidence event: {events:?}"));
    assert_eq!(escape_event["action"], "killed", "{escape_event:#}");
    assert_eq!(escape_event["binding"], "cgroup");
    let text = Run::from(daemon.admin(&["events"]).output().unwrap());
    assert!(
        text.stdout
            .contains("EVIDENCE left-cgroup: moved itself to / (killed, fails-run)"),
        "{text:?}"
    );

    let report_path = sandbox.path("report.json");
    let run = Run::from(
        daemon
            .guard(
                &sandbox,
                &[
                    "run",
                    "--deny",
                    "x.frontend.test",
                    "--report",
                    report_path.to_str().unwrap(),
                    "--",
                    "sh",
                    "-c",
                    &escape,
                ],
            )
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 77, "{run:?}");
    assert!(!run.stderr.contains("running standalone"), "{run:?}");
    assert!(!run.stdout.contains("survived"), "{run:?}");
    let report = report(&report_path);
    common::validate_report(&report);
    let escape = report["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "left-cgroup")
        .unwrap_or_else(|| panic!("no left-cgroup evidence: {report:#}"));
    assert_eq!(escape["action"], "killed");
    assert_eq!(report["resolver_socket_hooks"], "active");
}
