//! A real `guard daemon` process for a test, with its own configuration,
//! pin directory, socket and cgroups (used by daemon.rs and faults.rs).
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use guard_daemon::{
    kernel::cgroup::{cgroup2_mount_point, remove_cgroup_tree},
    kernel::Pinned,
};

use super::{dns_query, eventually, saw, Run, Sandbox, GUARD};

pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pin_root: PathBuf,
    /// The test's cgroup subtree: `runs` and bound cgroups live below it.
    pub cgroups: PathBuf,
    pub child: Option<Child>,
    pub starts: u32,
    pub json_logs: bool,
    /// The cgroup the daemon process runs in, when it is not the test's
    /// (as a service's own cgroup, with runs below it by default).
    pub service: Option<PathBuf>,
}

impl TestDaemon {
    /// Writes a configuration (`bindings` is YAML for the `bindings:` key,
    /// where `@CG@` stands for the test's cgroup subtree) and starts the
    /// daemon.
    pub fn start(policies: &[(&str, &str)], bindings: &str) -> TestDaemon {
        TestDaemon::start_logging(policies, bindings, false)
    }

    pub fn start_logging(policies: &[(&str, &str)], bindings: &str, json_logs: bool) -> TestDaemon {
        TestDaemon::create(policies, bindings, json_logs, false)
    }

    /// A daemon in a cgroup of its own (`service`), configured without
    /// `runs_cgroup`: its runs go below its own cgroup, where a process
    /// elsewhere (`--uninstall`) would not look for them.
    pub fn start_in_service(policies: &[(&str, &str)]) -> TestDaemon {
        TestDaemon::create(policies, "  []\n", false, true)
    }

    fn create(
        policies: &[(&str, &str)],
        bindings: &str,
        json_logs: bool,
        in_service: bool,
    ) -> TestDaemon {
        let dir = tempfile::tempdir().unwrap();
        let nonce = format!("{}-{:x}", std::process::id(), rand_nonce());
        let mount = cgroup2_mount_point(&fs::read_to_string("/proc/self/mountinfo").unwrap())
            .expect("cgroup2");
        let relative = format!("guard-test-{nonce}");
        let cgroups = mount.join(&relative);
        fs::create_dir(&cgroups).unwrap();
        fs::create_dir(dir.path().join("policies")).unwrap();
        for (file, text) in policies {
            fs::write(dir.path().join("policies").join(file), text).unwrap();
        }
        let socket = dir.path().join("run").join("guard.sock");
        let pin_root = PathBuf::from(format!("/sys/fs/bpf/guard-test-{nonce}"));
        let config = dir.path().join("daemon.yaml");
        let service = in_service.then(|| cgroups.join("service"));
        let runs_cgroup = match &service {
            Some(service) => {
                fs::create_dir(service).unwrap();
                String::new()
            }
            None => format!("runs_cgroup: /{relative}/runs\n"),
        };
        fs::write(
            &config,
            format!(
                "socket: {}\npin_dir: {}\n{runs_cgroup}bindings:\n{}",
                socket.display(),
                pin_root.display(),
                bindings.replace("@CG@", &format!("/{relative}"))
            ),
        )
        .unwrap();
        let mut daemon = TestDaemon {
            dir,
            config,
            socket,
            pin_root,
            cgroups,
            child: None,
            starts: 0,
            json_logs,
            service,
        };
        daemon.spawn();
        daemon
    }

    /// A daemon whose configuration binds the cgroup `agent` (created here)
    /// to the frontend policy, once it guards it.
    pub fn with_agent() -> (TestDaemon, PathBuf) {
        let daemon = TestDaemon::start(
            &[FRONTEND],
            "  - cgroup: @CG@/agent\n    policies: [frontend]\n",
        );
        let agent = daemon.cgroup("agent");
        assert!(
            eventually(Duration::from_secs(10), || daemon.status()["bindings"][0]
                ["cgroup"]
                == agent.to_str().unwrap()),
            "{}",
            daemon.log()
        );
        (daemon, agent)
    }

    pub fn log(&self) -> String {
        let mut all = String::new();
        for start in 1..=self.starts {
            all += &fs::read_to_string(self.dir.path().join(format!("daemon-{start}.log")))
                .unwrap_or_default();
        }
        all
    }

    /// Starts the daemon process and waits until it answers.
    pub fn spawn(&mut self) {
        self.spawn_with(&[]);
        self.wait_ready();
    }

    /// Starts the daemon process with more environment (`GUARD_FAULT_AT`),
    /// without waiting for it.
    pub fn spawn_with(&mut self, env: &[(&str, &str)]) {
        self.starts += 1;
        let log =
            fs::File::create(self.dir.path().join(format!("daemon-{}.log", self.starts))).unwrap();
        let mut command = Command::new(GUARD);
        command
            .args(["daemon", "--config"])
            .arg(&self.config)
            .args(["--log-format", if self.json_logs { "json" } else { "text" }])
            .env("GUARD_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let procs = self.service.as_ref().map(|service| {
            fs::OpenOptions::new()
                .write(true)
                .open(service.join("cgroup.procs"))
                .unwrap()
        });
        if let Some(procs) = &procs {
            use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
            let fd = procs.as_raw_fd();
            // SAFETY: only write(2), which is async-signal-safe.
            unsafe {
                command.pre_exec(move || {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command.spawn().expect("starting guard daemon");
        self.child = Some(child);
    }

    /// Waits until the daemon answers.
    pub fn wait_ready(&self) {
        let ready = eventually(Duration::from_secs(30), || {
            self.admin(&["status"])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        assert!(ready, "the daemon did not become ready:\n{}", self.log());
    }

    /// Waits for the daemon process to end by itself (a fault, a refusal).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.child
            .take()
            .expect("daemon started")
            .wait()
            .expect("waiting for the daemon")
    }

    /// Sends the daemon process a signal (SIGSTOP, SIGCONT, ...).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("daemon running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
    }

    /// kill -9, then a restart whose programs differ (another ring-buffer
    /// size, as an upgrade would): a new generation replaces the old one.
    pub fn restart_as_new_generation(&mut self) {
        self.kill9();
        let config = fs::read_to_string(&self.config).unwrap();
        fs::write(&self.config, format!("ring_buffer_size: 1048576\n{config}")).unwrap();
        self.spawn();
    }

    /// `guard daemon --uninstall` with this daemon's configuration.
    pub fn uninstall(&self) -> Run {
        Run::from(
            self.admin(&["daemon", "--uninstall", "--config"])
                .arg(&self.config)
                .output()
                .unwrap(),
        )
    }

    /// `systemctl stop guard`: SIGTERM, and wait.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        child.wait().unwrap();
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// `guard ARGS` as a client of this daemon (admin commands).
    pub fn admin(&self, args: &[&str]) -> Command {
        let mut command = Command::new(GUARD);
        command.args(args).env("GUARD_SOCKET", &self.socket);
        command
    }

    /// `guard ARGS` as a client of this daemon, with the sandbox resolver.
    pub fn guard(&self, sandbox: &Sandbox, args: &[&str]) -> Command {
        let mut command = sandbox.guard(args);
        command.env("GUARD_SOCKET", &self.socket);
        command
    }

    pub fn status(&self) -> serde_json::Value {
        let output = self.admin(&["status", "--json"]).output().unwrap();
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice(&output.stdout).unwrap()
    }

    pub fn pinned(&self) -> Pinned {
        let generation = fs::read_dir(&self.pin_root)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| !p.to_string_lossy().contains("partial-"))
            .expect("a pinned generation");
        Pinned::open(&generation).expect("opening the pinned maps")
    }

    /// A cgroup below the test's subtree (for bindings).
    pub fn cgroup(&self, name: &str) -> PathBuf {
        let path = self.cgroups.join(name);
        fs::create_dir_all(&path).unwrap();
        path
    }

    /// The first binding still guards `agent`: a lookup of the denied
    /// `name` from there is refused and never reaches the servers.
    pub fn assert_still_guards(&self, sandbox: &Sandbox, agent: &Path, name: &str) {
        let lookup = Run::from(
            self.in_cgroup(sandbox, agent, &query(name))
                .output()
                .unwrap(),
        );
        assert_eq!(lookup.code, 1, "{lookup:?}");
        assert!(!saw(sandbox, name), "{name} was answered: {lookup:?}");
        assert_eq!(
            self.status()["bindings"][0]["cgroup"],
            agent.to_str().unwrap()
        );
    }

    /// `guard run --deny '*.frontend.test' --report R -- sh -c SCRIPT` as
    /// a client of this daemon, started (not waited for); its stderr goes
    /// to `R.stderr`, where the test can watch it.
    pub fn start_script(
        &self,
        sandbox: &Sandbox,
        report_path: &Path,
        script: &str,
        env: &[(&str, &str)],
    ) -> ScriptRun {
        let stderr = report_path.with_extension("stderr");
        let child = self
            .guard(
                sandbox,
                &[
                    "run",
                    "--deny",
                    "*.frontend.test",
                    "--report",
                    report_path.to_str().unwrap(),
                    "--",
                    "sh",
                    "-c",
                    script,
                ],
            )
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        ScriptRun { child, stderr }
    }

    /// A command that moves itself into `cgroup` and then runs `args`.
    pub fn in_cgroup(&self, sandbox: &Sandbox, cgroup: &Path, args: &[String]) -> Command {
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount --bind \"$0\" /etc/resolv.conf && echo $$ > \"$1\" && shift 2 && exec \"$@\"")
            .arg(sandbox.path("resolv.conf"))
            .arg(cgroup.join("cgroup.procs"))
            .arg("--")
            .args(args);
        command
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
        let uninstall = self
            .admin(&["daemon", "--uninstall", "--config"])
            .arg(&self.config)
            .output();
        let _ = remove_cgroup_tree(&self.cgroups);
        if !std::thread::panicking() {
            let uninstall = uninstall.expect("guard daemon --uninstall");
            assert!(uninstall.status.success(), "{uninstall:?}");
            assert!(
                !self.pin_root.exists(),
                "uninstall left {}",
                self.pin_root.display()
            );
        }
    }
}

pub fn rand_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

pub const FRONTEND: (&str, &str) = (
    "frontend.yaml",
    "name: frontend\ndeny:\n  - \"*.frontend.test\"\nallow:\n  - status.frontend.test\n",
);

pub fn query(name: &str) -> Vec<String> {
    vec![
        dns_query(),
        "--timeout".into(),
        "2".into(),
        "127.0.0.1:53".into(),
        name.into(),
    ]
}

/// A `guard run` started by [`TestDaemon::start_script`].
pub struct ScriptRun {
    child: Child,
    stderr: PathBuf,
}

impl ScriptRun {
    /// Waits (up to 10 s) until guard has said `text` on stderr: a record
    /// it has received, say, before a fault is injected.
    pub fn wait_to_say(&self, text: &str) {
        assert!(
            eventually(Duration::from_secs(10), || fs::read_to_string(&self.stderr)
                .is_ok_and(|said| said.contains(text))),
            "guard never said {text:?}: {}",
            fs::read_to_string(&self.stderr).unwrap_or_default()
        );
    }

    /// Waits for the run to end.
    pub fn wait(self) -> Run {
        let mut run = Run::from(self.child.wait_with_output().unwrap());
        run.stderr = fs::read_to_string(&self.stderr).unwrap_or_default();
        run
    }
}
