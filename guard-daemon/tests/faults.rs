//! Faults, injected on the real kernel: the daemon killed (SIGKILL) at each
//! step of a run's set-up and tear-down (`GUARD_FAULT_AT`, honoured by debug
//! builds only), the daemon gone for longer than a run waits for it, the
//! guard uninstalled under a run, a full disk for the reports, the socket
//! path squatted, a second daemon against the same pins, a reload stuck on a
//! FIFO.
//!
//! The invariant checked every time: the command never runs unguarded (a
//! denied lookup it makes after the fault never reaches the test DNS server,
//! whose log is checked), and a blocked lookup is never reported as a pass
//! (nor as 125, "not run", for a command that ran).
mod common;

use std::{
    fs,
    os::unix::{
        fs::{FileTypeExt as _, OpenOptionsExt as _},
        net::UnixListener,
        process::ExitStatusExt as _,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::{
    daemon::{ScriptRun, TestDaemon, FRONTEND},
    dns_query, eventually, report, saw, validate_report, Run, Sandbox, GUARD,
};
use guard_daemon::{api::client, fault::FAULT_AT, kernel::KernelMaps as _};

/// A script that looks up two denied names, before and after `gate`
/// exists (made by the test once the fault has happened; None: at once).
fn two_denied_lookups(gate: Option<&Path>) -> String {
    let wait = gate.map_or(String::new(), |gate| {
        format!("while [ ! -e {} ]; do sleep 0.02; done; ", gate.display())
    });
    format!(
        "{q} 127.0.0.1:53 before.frontend.test; echo before=$?; {wait}{q} 127.0.0.1:53 after.frontend.test; echo after=$?",
        q = dns_query()
    )
}

/// A script that looks up a denied name once, then another one until it is
/// killed, saying LEAKED if one is ever answered.
fn denied_lookups_forever() -> String {
    format!(
        "{q} 127.0.0.1:53 before.frontend.test; echo before=$?; while :; do {q} --timeout 1 127.0.0.1:53 after.frontend.test >/dev/null && echo LEAKED; sleep 0.02; done",
        q = dns_query()
    )
}

/// A run ended by the guard's removal: never unguarded, exit 75, and the
/// report says so and keeps what was seen. Returns the report.
fn assert_ended_by_removal(
    sandbox: &Sandbox,
    finished: &Run,
    report_path: &Path,
    log: &str,
) -> serde_json::Value {
    assert_eq!(finished.code, 75, "{finished:?}\n{log}");
    assert!(!finished.stdout.contains("LEAKED"), "{finished:?}");
    assert!(
        finished.stderr.contains("the guard was removed"),
        "{finished:?}"
    );
    for name in ["before.frontend.test", "after.frontend.test"] {
        assert!(!saw(sandbox, name), "{name} was answered: {finished:?}");
    }
    let report = report(report_path);
    validate_report(&report);
    assert_eq!(report["fault"]["kind"], "guard-removed", "{report:#}");
    assert_eq!(report["exit_code"], 75);
    // What it saw is kept: the first lookup's record, and every blocked
    // lookup counted.
    assert!(report["counters"]["blocked"].as_u64().unwrap() >= 1);
    assert!(
        report["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "before.frontend.test"),
        "{report:#}"
    );
    report
}

/// The invariant: no denied name reached the servers, and a run with a
/// blocked lookup did not pass. Returns the report.
fn assert_guarded(
    sandbox: &Sandbox,
    run: &Run,
    report_path: &Path,
    blocked: u64,
) -> serde_json::Value {
    for name in ["before.frontend.test", "after.frontend.test"] {
        assert!(!saw(sandbox, name), "{name} was answered: {run:?}");
    }
    assert_ne!(run.code, 0, "a blocked lookup reported as a pass: {run:?}");
    assert_ne!(
        run.code, 125,
        "a command that ran reported as not run: {run:?}"
    );
    let report = report(report_path);
    validate_report(&report);
    assert_eq!(
        report["counters"]["blocked"], blocked,
        "{report:#}\n{run:?}"
    );
    report
}

/// Run cgroups still present in the daemon's runs cgroup.
fn run_cgroups(daemon: &TestDaemon) -> Vec<PathBuf> {
    child_cgroups(&daemon.cgroups.join("runs"))
}

/// The cgroups directly below `parent` (none if it is gone).
fn child_cgroups(parent: &Path) -> Vec<PathBuf> {
    fs::read_dir(parent)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Nothing of a finished run is left: no cgroup, no binding.
fn assert_runs_cleaned_up(daemon: &TestDaemon) {
    assert!(
        eventually(Duration::from_secs(10), || run_cgroups(daemon).is_empty()
            && daemon.pinned().bindings().unwrap().is_empty()),
        "left behind: {:?}, {:?}\n{}",
        run_cgroups(daemon),
        daemon.pinned().bindings(),
        daemon.log()
    );
}

/// The daemon killed at each step of a run's set-up and tear-down, then
/// restarted (as systemd does): the run is guarded throughout and keeps
/// its verdict. Set-up faults before the reply send the run standalone;
/// later ones are resumed, or finished with the counters read from the
/// kernel.
#[test]
fn the_daemon_killed_at_each_step_of_a_run_never_leaves_it_unguarded() {
    let sandbox = Sandbox::new();
    let mut daemon = TestDaemon::start(&[FRONTEND], "  []\n");
    // A run in progress through every fault and restart below, looking up
    // a denied name all along.
    let bystander_report = sandbox.path("bystander.json");
    let bystander_gate = sandbox.path("bystander.gate");
    let bystander = daemon.start_script(
        &sandbox,
        &bystander_report,
        &format!(
            "while [ ! -e {gate} ]; do {q} --timeout 1 127.0.0.1:53 bystander.frontend.test >/dev/null && echo LEAKED; sleep 0.05; done",
            gate = bystander_gate.display(),
            q = dns_query()
        ),
        &[],
    );
    assert!(eventually(Duration::from_secs(10), || run_cgroups(&daemon)
        .len()
        == 1));
    let steps = [
        ("run-cgroup-created", "standalone"),
        ("run-rules-written", "standalone"),
        ("run-bound", "standalone"),
        ("run-replied", "daemon"),
        ("run-ending", "daemon"),
        ("run-emptied", "daemon"),
        ("run-totals-queued", "daemon"),
        ("run-unbound", "daemon"),
        ("run-retired", "daemon"),
    ];
    for (step, placement) in steps {
        daemon.stop();
        daemon.spawn_with(&[(FAULT_AT, step)]);
        daemon.wait_ready();
        let report_path = sandbox.path(&format!("{step}.json"));
        let gate = sandbox.path(&format!("{step}.gate"));
        // A set-up fault happens before the command starts; give a later
        // one time to happen while the command runs (or has ended).
        let script = if placement == "standalone" {
            two_denied_lookups(None)
        } else {
            two_denied_lookups(Some(&gate))
        };
        let run = daemon.start_script(
            &sandbox,
            &report_path,
            &script,
            &[(client::DAEMON_RETURN_TIMEOUT_ENV, "60000")],
        );
        if step == "run-replied" {
            // Dies as soon as the run is set up: the lookups come after.
            let status = daemon.wait_exit();
            assert_eq!(status.signal(), Some(9), "{step}: {}", daemon.log());
            fs::write(&gate, "").unwrap();
        } else if placement == "daemon" {
            fs::write(&gate, "").unwrap();
            let status = daemon.wait_exit();
            assert_eq!(status.signal(), Some(9), "{step}: {}", daemon.log());
        } else {
            let status = daemon.wait_exit();
            assert_eq!(status.signal(), Some(9), "{step}: {}", daemon.log());
        }
        // Restarted, as `Restart=on-failure` does.
        daemon.spawn();
        let finished = run.wait();
        assert_eq!(finished.code, 77, "{step}: {finished:?}\n{}", daemon.log());
        assert!(finished.stdout.contains("before=1"), "{step}: {finished:?}");
        assert!(finished.stdout.contains("after=1"), "{step}: {finished:?}");
        let report = assert_guarded(&sandbox, &finished, &report_path, 2);
        let runs_dir = daemon.cgroups.join("runs");
        let through_daemon = report["cgroup"]
            .as_str()
            .unwrap()
            .starts_with(runs_dir.to_str().unwrap());
        assert_eq!(
            through_daemon,
            placement == "daemon",
            "{step}: {report:#}\n{finished:?}"
        );
        if placement == "standalone" {
            assert!(
                finished.stderr.contains("running standalone"),
                "{step}: {finished:?}"
            );
        }
        assert!(
            eventually(Duration::from_secs(10), || run_cgroups(&daemon).len() == 1),
            "{step}: left behind: {:?}\n{}",
            run_cgroups(&daemon),
            daemon.log()
        );
    }
    fs::write(&bystander_gate, "").unwrap();
    let bystander = bystander.wait();
    assert_eq!(bystander.code, 77, "{bystander:?}\n{}", daemon.log());
    assert!(!bystander.stdout.contains("LEAKED"), "{bystander:?}");
    assert!(!saw(&sandbox, "bystander.frontend.test"));
    let report = report(&bystander_report);
    assert!(report["counters"]["blocked"].as_u64().unwrap() >= 1);
    assert!(report.get("fault").is_none(), "{report:#}");
    // It went through the daemon, and back to it after the faults.
    assert!(
        report["cgroup"]
            .as_str()
            .unwrap()
            .starts_with(daemon.cgroups.join("runs").to_str().unwrap()),
        "{report:#}"
    );
    assert!(
        bystander.stderr.contains("reconnected to the guard daemon"),
        "{bystander:?}"
    );
    assert_runs_cleaned_up(&daemon);
}

/// `guard daemon --uninstall` during a run, with the default runs cgroup
/// (below the daemon's own cgroup, not the uninstalling process's): the run
/// is found from the pinned state and ended while still guarded; its
/// `guard run` says the guard was removed, exits 75 and keeps what it saw.
#[test]
fn uninstall_during_a_run_ends_it_and_the_run_says_so() {
    let sandbox = Sandbox::new();
    let mut daemon = TestDaemon::start_in_service(&[FRONTEND]);
    let report_path = sandbox.path("report.json");
    let run = daemon.start_script(&sandbox, &report_path, &denied_lookups_forever(), &[]);
    let service_runs = daemon.cgroups.join("service/runs");
    assert!(
        eventually(Duration::from_secs(10), || child_cgroups(&service_runs)
            .len()
            == 1),
        "{}",
        daemon.log()
    );
    // Something that is not guard's in the runs cgroup.
    let foreign = service_runs.join("not-a-run");
    fs::create_dir(&foreign).unwrap();
    let mut stranger = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec sleep 60",
            foreign.display()
        ))
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || fs::read_to_string(
        foreign.join("cgroup.procs")
    )
    .is_ok_and(|p| !p.trim().is_empty())));
    // The run has seen its first blocked lookup; it loops on another.
    run.wait_to_say("blocked A before.frontend.test");
    daemon.stop();
    let uninstall = daemon.uninstall();
    assert_eq!(uninstall.code, 0, "{uninstall:?}");
    assert!(uninstall.stdout.contains("ended the run"), "{uninstall:?}");
    assert!(!daemon.pin_root.exists());
    let finished = run.wait();
    assert_ended_by_removal(&sandbox, &finished, &report_path, &daemon.log());
    // The run is gone; what was not guard's stays, and so does the runs
    // cgroup holding it.
    assert_eq!(child_cgroups(&service_runs), vec![foreign.clone()]);
    assert!(
        stranger.try_wait().unwrap().is_none(),
        "not guard's to kill"
    );
    assert!(uninstall.stderr.contains("stays"), "{uninstall:?}");
    stranger.kill().unwrap();
    stranger.wait().unwrap();
}

/// A run through the daemon that waits only a second for it once its
/// command is done, started and seen to report its first blocked lookup;
/// its second waits for the gate. Returns the run, its report's path and the gate.
fn start_gated_run(daemon: &TestDaemon, sandbox: &Sandbox) -> (ScriptRun, PathBuf, PathBuf) {
    let report_path = sandbox.path("report.json");
    let gate = sandbox.path("gate");
    let run = daemon.start_script(
        sandbox,
        &report_path,
        &two_denied_lookups(Some(&gate)),
        &[(client::DAEMON_RETURN_TIMEOUT_ENV, "1000")],
    );
    run.wait_to_say("blocked A before.frontend.test");
    (run, report_path, gate)
}

/// The daemon stopped for longer than a finished run waits for it: the run
/// ends itself with the counters read from the pinned maps (both blocked
/// lookups, one of them made while the daemon was down), never "0 blocked".
#[test]
fn a_daemon_gone_longer_than_the_run_waits_keeps_the_verdict() {
    let sandbox = Sandbox::new();
    let mut daemon = TestDaemon::start(&[FRONTEND], "  []\n");
    let (run, report_path, gate) = start_gated_run(&daemon, &sandbox);
    daemon.stop();
    fs::write(&gate, "").unwrap();
    let finished = run.wait();
    assert_eq!(finished.code, 77, "{finished:?}");
    assert!(finished.stdout.contains("after=1"), "{finished:?}");
    let report = assert_guarded(&sandbox, &finished, &report_path, 2);
    assert_eq!(report["fault"]["kind"], "daemon-gone", "{report:#}");
    // The record of the lookup made while the daemon was down never
    // reached the run: counted as lost, not dropped silently.
    assert_eq!(report["events"].as_array().unwrap().len(), 1, "{report:#}");
    assert_eq!(report["events_lost"], 1, "{report:#}");
    assert!(run_cgroups(&daemon).is_empty());
    // A daemon started later removes what the run left in the maps.
    daemon.spawn();
    assert_runs_cleaned_up(&daemon);
}

/// The daemon gone for good and the run's counters unreadable (as with a
/// daemon that does not say where they are): a blocked lookup known from
/// the records received still gives 77; with none known, 76, never a pass.
#[test]
fn a_daemon_gone_with_unreadable_counters_never_passes() {
    let sandbox = Sandbox::new();
    let mut daemon = TestDaemon::start(&[FRONTEND], "  []\n");
    let unreadable = [
        (client::DAEMON_RETURN_TIMEOUT_ENV, "1000"),
        (client::NO_PINNED_COUNTERS_ENV, "1"),
    ];
    let blocked_report = sandbox.path("blocked.json");
    let blocked_gate = sandbox.path("blocked.gate");
    let blocked = daemon.start_script(
        &sandbox,
        &blocked_report,
        &two_denied_lookups(Some(&blocked_gate)),
        &unreadable,
    );
    let quiet_report = sandbox.path("quiet.json");
    let quiet_gate = sandbox.path("quiet.gate");
    let quiet = daemon.start_script(
        &sandbox,
        &quiet_report,
        &format!(
            "while [ ! -e {} ]; do sleep 0.02; done; {} 127.0.0.1:53 db.test",
            quiet_gate.display(),
            dns_query()
        ),
        &unreadable,
    );
    assert!(eventually(Duration::from_secs(10), || {
        let status = daemon.status();
        let runs: Vec<&serde_json::Value> = status["bindings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["kind"] == "run")
            .collect();
        runs.len() == 2
    }));
    blocked.wait_to_say("blocked A before.frontend.test");
    daemon.stop();
    fs::write(&blocked_gate, "").unwrap();
    fs::write(&quiet_gate, "").unwrap();

    let blocked = blocked.wait();
    assert_eq!(blocked.code, 77, "{blocked:?}");
    let known = assert_guarded(&sandbox, &blocked, &blocked_report, 1);
    assert_eq!(known["fault"]["kind"], "counters-unavailable", "{known:#}");

    let quiet = quiet.wait();
    assert!(saw(&sandbox, "db.test"));
    assert_eq!(quiet.code, 76, "{quiet:?}");
    let report = report(&quiet_report);
    validate_report(&report);
    assert_eq!(
        report["fault"]["kind"], "counters-unavailable",
        "{report:#}"
    );
    assert_eq!(report["exit_code"], 76);
}

/// A frozen daemon (SIGSTOP: alive, its socket accepting, answering
/// nothing): a run in progress ends itself with its counters once it has
/// waited long enough, a new run goes standalone after the handshake's
/// timeout, and the thawed daemon tidies up after both.
#[test]
fn a_frozen_daemon_neither_hangs_runs_nor_loses_their_verdict() {
    let sandbox = Sandbox::new();
    let daemon = TestDaemon::start(&[FRONTEND], "  []\n");
    let (run, report_path, gate) = start_gated_run(&daemon, &sandbox);
    daemon.signal(nix::sys::signal::Signal::SIGSTOP);
    fs::write(&gate, "").unwrap();
    let finished = run.wait();
    assert_eq!(finished.code, 77, "{finished:?}");
    let report = assert_guarded(&sandbox, &finished, &report_path, 2);
    assert_eq!(report["fault"]["kind"], "daemon-gone", "{report:#}");

    let late_report = sandbox.path("late.json");
    let late = daemon
        .start_script(
            &sandbox,
            &late_report,
            &two_denied_lookups(None),
            &[(client::HANDSHAKE_TIMEOUT_ENV, "500")],
        )
        .wait();
    assert_eq!(late.code, 77, "{late:?}");
    assert!(late.stderr.contains("did not answer"), "{late:?}");
    let late = assert_guarded(&sandbox, &late, &late_report, 2);
    assert!(late.get("fault").is_none(), "{late:#}");

    daemon.signal(nix::sys::signal::Signal::SIGCONT);
    assert_runs_cleaned_up(&daemon);
}

/// A full disk for the reports: the verdict stands (77, never 125), and a
/// run that passed says its report could not be written (74, not 0).
#[test]
fn a_full_disk_for_the_reports_keeps_the_verdict() {
    let sandbox = Sandbox::new();
    let full = sandbox.path("full");
    fs::create_dir(&full).unwrap();
    let guarded_on_full_disk = |name: &str| -> Run {
        // A tiny tmpfs, filled up, in the run's own mount namespace.
        let script = format!(
            "mount --bind \"$0\" /etc/resolv.conf && mount -t tmpfs -o size=64k tmpfs {dir} && \
             (head -c 1M /dev/zero > {dir}/filler; true) && exec \"$@\"",
            dir = full.display()
        );
        let report_path = full.join("report.json");
        let junit_path = full.join("junit.xml");
        let output = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(script)
            .arg(sandbox.path("resolv.conf"))
            .args([GUARD, "run", "--standalone", "--deny", "*.frontend.test"])
            .args(["--report", report_path.to_str().unwrap()])
            .args(["--junit", junit_path.to_str().unwrap(), "--"])
            .args([dns_query(), "127.0.0.1:53".into(), name.into()])
            .output()
            .unwrap();
        Run::from(output)
    };
    let blocked = guarded_on_full_disk("denied.frontend.test");
    assert_eq!(blocked.code, 77, "{blocked:?}");
    assert!(blocked.stderr.contains("writing"), "{blocked:?}");
    assert!(!saw(&sandbox, "denied.frontend.test"));
    let passed = guarded_on_full_disk("db.test");
    assert!(saw(&sandbox, "db.test"));
    assert_eq!(passed.code, 74, "{passed:?}");
}

/// Another file on the socket path: the daemon refuses to start (and
/// leaves the file alone); `guard run` runs standalone. A socket where
/// nothing answers: `guard run` gives up on it in bounded time and runs
/// standalone too.
#[test]
fn a_squatted_socket_path_leaves_runs_guarded() {
    let sandbox = Sandbox::new();
    let mut daemon = TestDaemon::start(&[FRONTEND], "  []\n");
    daemon.stop();
    fs::remove_file(&daemon.socket).unwrap();
    fs::write(&daemon.socket, "not a socket").unwrap();
    daemon.spawn_with(&[]);
    let status = daemon.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", daemon.log());
    assert!(daemon.log().contains("is not a socket"), "{}", daemon.log());
    assert_eq!(fs::read_to_string(&daemon.socket).unwrap(), "not a socket");

    let guarded_run = |name: &str, env: &[(&str, &str)]| {
        let report_path = sandbox.path(&format!("{name}.json"));
        let client = dns_query();
        let mut args = vec!["run", "--deny", "*.frontend.test", "--report"];
        args.push(report_path.to_str().unwrap());
        args.extend(["--", &client, "127.0.0.1:53", name]);
        let run = Run::from(
            daemon
                .guard(&sandbox, &args)
                .envs(env.iter().copied())
                .output()
                .unwrap(),
        );
        assert_eq!(run.code, 77, "{run:?}");
        assert!(!saw(&sandbox, name), "{name} was answered: {run:?}");
        report(&report_path)
    };
    guarded_run("file.frontend.test", &[]);

    // A socket that accepts connections but never answers.
    fs::remove_file(&daemon.socket).unwrap();
    let _silent = UnixListener::bind(&daemon.socket).unwrap();
    assert!(fs::metadata(&daemon.socket)
        .unwrap()
        .file_type()
        .is_socket());
    let report = guarded_run(
        "silent.frontend.test",
        &[(client::HANDSHAKE_TIMEOUT_ENV, "500")],
    );
    assert_eq!(report["counters"]["blocked"], 1);
    fs::remove_file(&daemon.socket).unwrap();
}

/// A second daemon against the same pins (another socket) is refused before
/// it touches anything, and so is `--uninstall` while the first holds them;
/// the first goes on guarding.
#[test]
fn a_second_daemon_against_the_same_pins_is_refused() {
    let sandbox = Sandbox::new();
    let (daemon, agent) = TestDaemon::with_agent();
    let second = daemon.dir.path().join("second.yaml");
    let other_socket = daemon.dir.path().join("other/guard.sock");
    let config = fs::read_to_string(&daemon.config).unwrap().replace(
        &daemon.socket.display().to_string(),
        &other_socket.display().to_string(),
    );
    fs::write(&second, config).unwrap();
    let daemon_with = |extra: &[&str]| {
        Run::from(
            Command::new(GUARD)
                .arg("daemon")
                .args(extra)
                .arg("--config")
                .arg(&second)
                .output()
                .unwrap(),
        )
    };
    let refused = daemon_with(&[]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("another guard daemon"),
        "{refused:?}"
    );
    let uninstall = daemon_with(&["--uninstall"]);
    assert_eq!(uninstall.code, 1, "{uninstall:?}");
    assert!(daemon.pin_root.exists());
    // The first daemon still guards its binding.
    daemon.assert_still_guards(&sandbox, &agent, "x.frontend.test");
}

/// A FIFO named `*.yaml` in the policies directory: a reload that reads it
/// may wait, but status and runs go on meanwhile, and the daemon still
/// stops when asked.
#[test]
fn a_reload_stuck_on_a_fifo_blocks_nothing_else() {
    let sandbox = Sandbox::new();
    let mut daemon = TestDaemon::start(&[FRONTEND], "  []\n");
    let fifo = daemon.dir.path().join("policies/stuck.yaml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut reload = daemon
        .admin(&["reload"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The reload is stuck reading the FIFO (or, reading files safely, done
    // with it already).
    let daemon_pid = daemon.child.as_ref().unwrap().id();
    let reading_fifo = || {
        // Waiting in open(2) for a writer, or holding it open.
        let opening = fs::read_dir(format!("/proc/{daemon_pid}/task")).is_ok_and(|tasks| {
            tasks.flatten().any(|task| {
                fs::read_to_string(task.path().join("wchan"))
                    .is_ok_and(|wchan| wchan == "wait_for_partner")
            })
        });
        let holding = fs::read_dir(format!("/proc/{daemon_pid}/fd")).is_ok_and(|fds| {
            fds.flatten()
                .any(|fd| fs::read_link(fd.path()).is_ok_and(|target| target == fifo))
        });
        opening || holding
    };
    assert!(eventually(Duration::from_secs(10), || reading_fifo()
        || reload.try_wait().unwrap().is_some()));
    // Status answers.
    let status = daemon.status();
    assert_eq!(
        status["runs_cgroup"],
        daemon.cgroups.join("runs").to_str().unwrap()
    );
    // A run goes through the daemon, guarded.
    let report_path = sandbox.path("report.json");
    let finished = daemon
        .start_script(&sandbox, &report_path, &two_denied_lookups(None), &[])
        .wait();
    assert_eq!(finished.code, 77, "{finished:?}");
    let report = assert_guarded(&sandbox, &finished, &report_path, 2);
    assert!(
        report["cgroup"]
            .as_str()
            .unwrap()
            .starts_with(daemon.cgroups.join("runs").to_str().unwrap()),
        "the run did not go through the daemon: {report:#}"
    );
    // A reload stuck on the FIFO does not keep the daemon from stopping,
    // nor guard from being uninstalled (which reads no policy).
    daemon.stop();
    let uninstall = daemon.uninstall();
    assert_eq!(uninstall.code, 0, "{uninstall:?}");
    // Let a reader stuck on the FIFO go (a writer that closes at once;
    // non-blocking, for when nothing reads it).
    let _ = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo);
    fs::remove_file(&fifo).unwrap();
    let _ = reload.wait();
}

/// Once the daemon's run has had a lookup blocked: kill -9 of the daemon,
/// and a restart with `runs_cgroup` moved to `runs2` and `prepend` added
/// to the configuration.
fn restart_elsewhere_once_blocked(daemon: &mut TestDaemon, prepend: &str) {
    assert!(eventually(Duration::from_secs(10), || {
        daemon.status()["bindings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["kind"] == "run" && b["counters"]["blocked"].as_u64() >= Some(1))
    }));
    daemon.kill9();
    let config = fs::read_to_string(&daemon.config).unwrap();
    let relative = daemon.cgroups.file_name().unwrap().to_str().unwrap();
    fs::write(
        &daemon.config,
        format!("{prepend}{config}").replace(
            &format!("runs_cgroup: /{relative}/runs"),
            &format!("runs_cgroup: /{relative}/runs2"),
        ),
    )
    .unwrap();
    daemon.spawn();
}

/// A new generation (another build, or here another ring-buffer size)
/// that cannot carry a run over, started with another runs cgroup too: the
/// old generation's run is found from its pins, wherever it is, and ended
/// before those pins go; its `guard run` says the guard was removed.
#[test]
fn a_new_generation_ends_the_runs_it_cannot_carry_over() {
    let sandbox = Sandbox::new();
    let mut daemon = TestDaemon::start(&[FRONTEND], "  []\n");
    let report_path = sandbox.path("report.json");
    let run = daemon.start_script(&sandbox, &report_path, &denied_lookups_forever(), &[]);
    let old_runs = daemon.cgroups.join("runs");
    run.wait_to_say("blocked A before.frontend.test");
    restart_elsewhere_once_blocked(&mut daemon, "ring_buffer_size: 1048576\n");
    let finished = run.wait();
    assert_ended_by_removal(&sandbox, &finished, &report_path, &daemon.log());
    assert!(daemon
        .log()
        .contains("ended a run of a previous generation"));
    let leftover = fs::read_dir(&old_runs)
        .map(|e| e.flatten().filter(|e| e.path().is_dir()).count())
        .unwrap_or(0);
    assert_eq!(leftover, 0);
}

/// `guard run --help` names the statuses of the faults.
#[test]
fn help_documents_the_fault_statuses() {
    let output = Command::new(GUARD)
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for status in ["74 ", "75 ", "76 "] {
        assert!(help.contains(status), "{status} missing:\n{help}");
    }
}

/// A restart with another `runs_cgroup` (same programs, so the generation
/// is adopted): the runs left in the old runs cgroup are found from the
/// pinned bindings and stay guarded (their old runs cgroup stays attached)
/// until they finish, through the restarted daemon.
#[test]
fn a_restart_with_another_runs_cgroup_keeps_earlier_runs_guarded() {
    let sandbox = Sandbox::new();
    let mut daemon = TestDaemon::start(&[FRONTEND], "  []\n");
    let report_path = sandbox.path("report.json");
    let gate = sandbox.path("gate");
    let script = format!(
        "{q} 127.0.0.1:53 before.frontend.test; echo before=$?; \
         while [ ! -e {gate} ]; do {q} --timeout 1 127.0.0.1:53 after.frontend.test >/dev/null && echo LEAKED; sleep 0.05; done",
        q = dns_query(),
        gate = gate.display()
    );
    let run = daemon.start_script(&sandbox, &report_path, &script, &[]);
    restart_elsewhere_once_blocked(&mut daemon, "");
    assert!(daemon.log().contains("adopted a run"), "{}", daemon.log());
    // Lookups go on, refused, across housekeeping rounds of the new daemon.
    std::thread::sleep(Duration::from_millis(1500));
    fs::write(&gate, "").unwrap();
    let finished = run.wait();
    assert_eq!(finished.code, 77, "{finished:?}\n{}", daemon.log());
    assert!(!finished.stdout.contains("LEAKED"), "{finished:?}");
    for name in ["before.frontend.test", "after.frontend.test"] {
        assert!(!saw(&sandbox, name), "{name} was answered: {finished:?}");
    }
    let report = report(&report_path);
    validate_report(&report);
    assert!(report.get("fault").is_none(), "{report:#}");
    assert!(report["counters"]["blocked"].as_u64().unwrap() >= 2);
    assert!(
        eventually(Duration::from_secs(10), || daemon
            .pinned()
            .bindings()
            .unwrap()
            .is_empty()),
        "{}",
        daemon.log()
    );
}

/// A standalone `guard run` inside a bound unit (its cgroup below the
/// unit's, guarded by its own programs) is no run of the daemon's: a new
/// generation removing the old one leaves it alone.
#[test]
fn a_new_generation_leaves_standalone_runs_in_bound_units_alone() {
    let sandbox = Sandbox::new();
    let (mut daemon, agent) = TestDaemon::with_agent();
    let gate = sandbox.path("gate");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.02; done; echo finished",
        gate.display()
    );
    let nested = daemon
        .in_cgroup(
            &sandbox,
            &agent,
            &[
                GUARD.into(),
                "run".into(),
                "--standalone".into(),
                "--deny".into(),
                "x.test".into(),
                "--".into(),
                "sh".into(),
                "-c".into(),
                script,
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || child_cgroups(
        &agent
    )
    .iter()
    .any(
        |c| fs::read_to_string(c.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
    )));
    daemon.restart_as_new_generation();
    assert!(daemon.log().contains("removing a previous generation"));
    fs::write(&gate, "").unwrap();
    let nested = Run::from(nested.wait_with_output().unwrap());
    assert_eq!(nested.code, 0, "{nested:?}\n{}", daemon.log());
    assert!(nested.stdout.contains("finished"), "{nested:?}");
    assert!(!daemon
        .log()
        .contains("ended a run of a previous generation"));
}
