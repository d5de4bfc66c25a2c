//! Shared set-up for the real-kernel tests: every test gets its own network
//! namespace (so servers on port 53 and the guarded clients never meet the
//! host's network, nor each other), DNS servers on 127.0.0.1:53 and
//! [::1]:53, and a private /etc/resolv.conf pointing at them.
#![allow(dead_code)]

pub mod daemon;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use guard_testkit::DnsServer;

pub const GUARD: &str = env!("CARGO_BIN_EXE_guard");

pub struct Sandbox {
    pub v4: DnsServer,
    pub v6: DnsServer,
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        assert!(
            nix::unistd::geteuid().is_root(),
            "these tests load eBPF programs and must run as root (cargo xtask test)"
        );
        // Affects only this test's thread and what it starts.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        let status = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("ip");
        assert!(status.success(), "ip link set lo up");
        let v4 =
            DnsServer::start("127.0.0.1:53".parse().unwrap()).expect("DNS server on 127.0.0.1:53");
        let v6 = DnsServer::start("[::1]:53".parse().unwrap()).expect("DNS server on [::1]:53");
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(
            dir.path().join("resolv.conf"),
            "nameserver 127.0.0.1\noptions attempts:1 timeout:3\n",
        )
        .unwrap();
        Sandbox { v4, v6, dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `guard ARGS...` in a private mount namespace whose /etc/resolv.conf
    /// names the test servers.
    pub fn guard(&self, args: &[&str]) -> Command {
        self.guard_with_files(&[], args)
    }

    /// As [`Sandbox::guard`], with each (file, target) also bind-mounted
    /// over its target (a hosts file, an nsswitch.conf) for guard and its
    /// command only.
    pub fn guard_with_files(&self, files: &[(&Path, &str)], args: &[&str]) -> Command {
        let mut mounts = String::from("mount --bind \"$0\" /etc/resolv.conf");
        for (index, (_, target)) in files.iter().enumerate() {
            mounts += &format!(" && mount --bind \"${}\" {target}", index + 1);
        }
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(format!("{mounts} && shift {} && exec \"$@\"", files.len()))
            .arg(self.path("resolv.conf"));
        for (file, _) in files {
            command.arg(file);
        }
        command.arg(GUARD).args(args);
        command
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.guard(args).output().expect("running guard"))
    }
}

/// The test DNS client (guard-testkit's guard-dns-query), built beside guard.
pub fn dns_query() -> String {
    let path = Path::new(GUARD).with_file_name("guard-dns-query");
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo xtask test does)",
        path.display()
    );
    path.display().to_string()
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(output: Output) -> Run {
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

pub fn report(path: &Path) -> serde_json::Value {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("report {}: {e}", path.display()));
    serde_json::from_str(&text).expect("report is JSON")
}

/// Longer than anything here takes by orders of magnitude; only a hang
/// reaches it, and then the test fails instead of hanging with it.
pub const HANG: Duration = Duration::from_secs(60);

/// Runs `command` to completion, killing it and failing the test if it is
/// still running after [`HANG`]. Output goes through files, so a child
/// that writes much cannot block on a full pipe.
pub fn bounded(mut command: Command, dir: &Path) -> Run {
    let stdout = dir.join("bounded.stdout");
    let stderr = dir.join("bounded.stderr");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout).unwrap())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("starting guard");
    let deadline = Instant::now() + HANG;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "still running after {HANG:?} (killed): {command:?}\n{}",
                fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code().unwrap_or(-1),
        stdout: fs::read_to_string(&stdout).unwrap(),
        stderr: fs::read_to_string(&stderr).unwrap(),
    }
}

/// Polls `condition` for up to `limit` (used for processes finishing, not to
/// measure speed).
pub fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    condition()
}

/// The cgroup2 mount point (its root cgroup's directory).
pub fn cgroup_root() -> PathBuf {
    guard_daemon::kernel::cgroup::cgroup2_mount_point(
        &fs::read_to_string("/proc/self/mountinfo").unwrap(),
    )
    .expect("cgroup2 mounted")
}

/// This process's cgroup v2 directory (guard creates run cgroups under the
/// cgroup it runs in).
pub fn own_cgroup_dir() -> PathBuf {
    let text = fs::read_to_string("/proc/self/cgroup").unwrap();
    let relative = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
    cgroup_root().join(relative.trim_start_matches('/'))
}

pub fn run_cgroups_of(pid: u32) -> Vec<PathBuf> {
    let prefix = format!("guard-run-{pid}-");
    fs::read_dir(own_cgroup_dir())
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Checks a report against schemas/report.schema.json.
pub fn validate_report(value: &serde_json::Value) {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../schemas/report.schema.json"
    ));
    let schema: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("the schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "report does not match its schema: {errors:#?}\n{value:#}"
    );
}

/// The test servers, as `guard-dns-query` takes them.
pub const SERVERS: [&str; 2] = ["127.0.0.1:53", "[::1]:53"];

/// `guard run --deny frontend.internal --deny '*.frontend.internal' --report
/// R -- CMD...`: the run and its report.
pub fn guarded(sandbox: &Sandbox, command: &[&str]) -> (Run, serde_json::Value) {
    guarded_with(
        sandbox,
        &[
            "--deny",
            "frontend.internal",
            "--deny",
            "*.frontend.internal",
        ],
        command,
    )
}

/// `guard run OPTIONS --report R -- CMD...`: the run and its report,
/// checked against the report's schema.
pub fn guarded_with(
    sandbox: &Sandbox,
    options: &[&str],
    command: &[&str],
) -> (Run, serde_json::Value) {
    let report_path = sandbox.path("report.json");
    let _ = fs::remove_file(&report_path);
    let mut args = vec!["run"];
    args.extend_from_slice(options);
    args.extend(["--report", report_path.to_str().unwrap(), "--"]);
    args.extend_from_slice(command);
    let run = sandbox.run(&args);
    let value = report(&report_path);
    validate_report(&value);
    (run, value)
}

pub fn saw(sandbox: &Sandbox, name: &str) -> bool {
    sandbox.v4.saw(name) || sandbox.v6.saw(name)
}

/// A denied lookup: exit 77, never at the server, one blocked event.
pub fn assert_refused(sandbox: &Sandbox, run: &Run, report: &serde_json::Value, name: &str) {
    assert_eq!(run.code, 77, "{name}: {run:?}");
    assert!(!saw(sandbox, name), "{name} reached the server: {run:?}");
    let events = report["events"].as_array().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["verdict"] == "blocked" && e["name"] == name),
        "{name}: {report:#}"
    );
    // Every refusal is one event, none lost here.
    assert_eq!(
        report["counters"]["blocked"].as_u64().unwrap(),
        events.len() as u64 + report["events_lost"].as_u64().unwrap(),
        "{report:#}"
    );
}

/// An allowed lookup: answered, exit 0, no event.
pub fn assert_answered(sandbox: &Sandbox, run: &Run, report: &serde_json::Value, name: &str) {
    assert_eq!(run.code, 0, "{name}: {run:?}");
    assert!(
        saw(sandbox, name),
        "{name} never reached the server: {run:?}"
    );
    assert!(
        run.stdout.contains("192.0.2.1") || run.stdout.contains("2001:db8::1"),
        "{run:?}"
    );
    assert_eq!(report["events"].as_array().unwrap().len(), 0, "{report:#}");
}
