//! A minimal Debian with systemd as PID 1, booted in a container on this
//! machine, to test the package and its unit as an operator meets them.
//!
//! - The root file system: `debootstrap --variant=minbase` of bookworm from
//!   the mirror in the host's apt sources, cached as a tarball under
//!   `target/systemd-test/` (rebuilt when the package list changes).
//! - The boot: `systemd-nspawn -b` with a private network (loopback only: no
//!   query can reach the host's resolver), a private bpffs on /sys/fs/bpf, the
//!   host's cgroup2, all capabilities and bpf(2)/perf_event_open(2) allowed.
//!   It runs in a cgroup of its own, so two test runs never share one.
//! - Commands go in through `nsenter` into the namespaces of the container's
//!   PID 1.
//! - Teardown always happens ([`Drop`]): after a failure, a panic, or Ctrl-C
//!   (SIGINT/SIGTERM/SIGHUP are caught while a container exists, so that
//!   xtask lives to clean up): the container is killed, its cgroup, bpffs
//!   and root directory removed.
use std::{
    fs,
    io::Read as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::run;

const SUITE: &str = "bookworm";
/// What the container needs beyond minbase: systemd as init, a DNS server
/// for loopback (dnsmasq), and tools to look at the kernel state.
const PACKAGES: &str = "systemd,systemd-sysv,dbus,dnsmasq-base,iproute2,procps,bpftool";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Fails once Ctrl-C (or SIGTERM/SIGHUP) arrived while a container runs.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// The cached root file system tarball, made first if missing.
pub fn rootfs_tarball(work: &Path) -> Result<PathBuf> {
    let key = fnv1a(&format!("{SUITE} minbase {PACKAGES}"));
    let tarball = work.join(format!("rootfs-{SUITE}-{key:016x}.tar.zst"));
    if tarball.exists() {
        return Ok(tarball);
    }
    let mirror = host_mirror()?;
    let build = work.join("rootfs.build");
    remove_tree(&build)?;
    println!("container: debootstrap {SUITE} from {mirror} (a few minutes, once)");
    let started = Instant::now();
    run(Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={PACKAGES}"), SUITE])
        .arg(&build)
        .arg(&mirror))?;
    // debootstrap copies the host's resolv.conf: the container must only
    // ever ask its own server on loopback.
    fs::write(
        build.join("etc/resolv.conf"),
        "nameserver 127.0.0.1\noptions attempts:1 timeout:2\n",
    )?;
    for entry in fs::read_dir(build.join("var/cache/apt/archives"))?.flatten() {
        if entry.path().extension().is_some_and(|e| e == "deb") {
            fs::remove_file(entry.path())?;
        }
    }
    let partial = tarball.with_extension("partial");
    run(Command::new("tar")
        .arg("--zstd")
        .arg("-C")
        .arg(&build)
        .arg("-cf")
        .arg(&partial)
        .arg("."))?;
    fs::rename(&partial, &tarball)?;
    remove_tree(&build)?;
    println!(
        "container: root file system cached in {} ({:.0?})",
        tarball.display(),
        started.elapsed()
    );
    Ok(tarball)
}

/// The Debian mirror the host installs from (deb822 `.sources` or one-line
/// `sources.list`), so the container comes from where the host's packages do.
fn host_mirror() -> Result<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        if let Some(uri) = mirror_in(&text) {
            return Ok(uri);
        }
    }
    bail!("no Debian {SUITE} main mirror in /etc/apt/sources.list or /etc/apt/sources.list.d")
}

/// The URI of a `deb` source for SUITE's main component, in either format.
fn mirror_in(text: &str) -> Option<String> {
    let wanted = |suites: &str, components: &str, uri: &str| {
        suites.split_whitespace().any(|s| s == SUITE)
            && components.split_whitespace().any(|c| c == "main")
            && uri.starts_with("http")
    };
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["deb", rest @ ..] = words.as_slice() {
            let rest: Vec<&str> = rest
                .iter()
                .copied()
                .filter(|w| !w.starts_with('['))
                .collect();
            if let [uri, suite, components @ ..] = rest.as_slice() {
                if wanted(suite, &components.join(" "), uri) {
                    return Some(uri.to_string());
                }
            }
        }
    }
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .unwrap_or("")
        };
        let uri = field("URIs").split_whitespace().next().unwrap_or("");
        if field("Types").split_whitespace().any(|t| t == "deb")
            && wanted(field("Suites"), field("Components"), uri)
        {
            return Some(uri.to_string());
        }
    }
    None
}

pub struct Container {
    root: PathBuf,
    bpffs: PathBuf,
    cgroup: PathBuf,
    console: PathBuf,
    nspawn: Option<Child>,
    pid1: u32,
}

impl Container {
    /// Unpacks the root file system into `work/root`. Nothing runs yet.
    pub fn create(work: &Path, tarball: &Path) -> Result<Container> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
        let cgroup2 = mountinfo
            .lines()
            .find_map(|line| {
                let (before, after) = line.split_once(" - ")?;
                (after.split_whitespace().next() == Some("cgroup2"))
                    .then(|| before.split_whitespace().nth(4).map(PathBuf::from))?
            })
            .context("no cgroup2 mount in /proc/self/mountinfo")?;
        let own = fs::read_to_string("/proc/self/cgroup")?
            .lines()
            .find_map(|l| {
                l.strip_prefix("0::")
                    .map(|p| p.trim_start_matches('/').to_owned())
            })
            .context("/proc/self/cgroup has no cgroup2 entry")?;
        let container = Container {
            root: work.join("root"),
            bpffs: work.join("bpffs"),
            cgroup: cgroup2
                .join(own)
                .join(format!("guard-container-{}", std::process::id())),
            console: work.join("console.log"),
            nspawn: None,
            pid1: 0,
        };
        // From here on Drop restores the default dispositions.
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::signal(signal, on_interrupt as *const () as libc::sighandler_t);
            }
        }
        remove_tree(&container.root)?;
        fs::create_dir_all(&container.root)?;
        run(Command::new("tar")
            .arg("--zstd")
            .arg("-C")
            .arg(&container.root)
            .arg("-xf")
            .arg(tarball))?;
        Ok(container)
    }

    /// A path inside the container, as seen from the host.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    /// Boots systemd with a fresh bpffs (as after a reboot of the machine)
    /// and waits until the boot is finished.
    pub fn boot(&mut self) -> Result<()> {
        check_interrupted()?;
        fs::create_dir_all(&self.bpffs)?;
        run(Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&self.bpffs))?;
        fs::create_dir_all(&self.cgroup)
            .with_context(|| format!("creating {}", self.cgroup.display()))?;
        let console = fs::File::create(&self.console)?;
        let procs = std::ffi::CString::new(
            self.cgroup
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )?;
        let mut command = Command::new("systemd-nspawn");
        command
            .arg("-D")
            .arg(&self.root)
            .args(["-M", &machine_name(), "-b", "--register=no", "--keep-unit"])
            .args(["--private-network", "--resolv-conf=off", "--timezone=off"])
            .args([
                "--capability=all",
                "--system-call-filter=bpf perf_event_open",
            ])
            .arg(format!("--bind={}:/sys/fs/bpf", self.bpffs.display()))
            .arg("--console=pipe")
            .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            // Not in the terminal's process group: Ctrl-C reaches xtask,
            // which tears the container down in order.
            .process_group(0);
        // SAFETY: between fork and exec only open(2) and write(2): "0" moves
        // the writing process itself.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
        eprintln!("+ {command:?}");
        let nspawn = command.spawn().context("starting systemd-nspawn")?;
        let nspawn_pid = nspawn.id();
        self.nspawn = Some(nspawn);
        let deadline = Instant::now() + Duration::from_secs(30);
        self.pid1 = loop {
            check_interrupted()?;
            if let Some(pid) = container_init(nspawn_pid) {
                break pid;
            }
            if let Some(status) = self.nspawn.as_mut().and_then(|c| c.try_wait().ok()?) {
                bail!("systemd-nspawn exited ({status}): {}", self.console_tail());
            }
            if Instant::now() > deadline {
                bail!(
                    "the container's init did not appear: {}",
                    self.console_tail()
                );
            }
            thread::sleep(Duration::from_millis(50));
        };
        // Until systemd's bus is up, `is-system-running --wait` cannot ask it.
        let deadline = Instant::now() + Duration::from_secs(120);
        let state = loop {
            let output = self.sh("systemctl is-system-running --wait", 120)?;
            let state = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            if state == "running" || state == "degraded" {
                break state;
            }
            if Instant::now() > deadline {
                bail!(
                    "the container did not finish booting (state {state:?}): {}{}",
                    String::from_utf8_lossy(&output.stderr),
                    self.console_tail()
                );
            }
            thread::sleep(Duration::from_millis(100));
        };
        if state != "running" {
            let failed = self.sh("systemctl --failed --no-legend --plain", 10)?;
            println!(
                "container: system state {state}; failed units:\n{}",
                String::from_utf8_lossy(&failed.stdout)
            );
        }
        Ok(())
    }

    /// Powers the container off cleanly (as `systemctl poweroff` would on a
    /// machine) and forgets its bpffs, as a reboot does.
    pub fn shutdown(&mut self) -> Result<()> {
        let Some(mut nspawn) = self.nspawn.take() else {
            return Ok(());
        };
        if self.pid1 > 1 {
            // SIGRTMIN+4: systemd's "poweroff".
            // SAFETY: kill(2) on the container's init.
            unsafe { libc::kill(self.pid1 as i32, libc::SIGRTMIN() + 4) };
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = nspawn.try_wait()? {
                break Some(status);
            }
            if Instant::now() > deadline || INTERRUPTED.load(Ordering::SeqCst) {
                let _ = nspawn.kill();
                let _ = nspawn.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(50));
        };
        self.unmount_bpffs();
        match status {
            Some(status) if status.success() => Ok(()),
            Some(status) => bail!(
                "systemd-nspawn exited with {status}: {}",
                self.console_tail()
            ),
            None => bail!("the container did not power off within 60 s"),
        }
    }

    /// `sh -c SCRIPT` inside the container, killed after `limit_seconds`.
    pub fn sh(&self, script: &str, limit_seconds: u64) -> Result<Output> {
        let mut command = self.command(script);
        bounded(&mut command, Duration::from_secs(limit_seconds))
            .with_context(|| format!("in the container: {script}"))
    }

    /// Like [`Container::sh`]; fails unless the script exits 0, and returns
    /// its standard output.
    pub fn sh_ok(&self, script: &str, limit_seconds: u64) -> Result<String> {
        let output = self.sh(script, limit_seconds)?;
        if !output.status.success() {
            bail!(
                "in the container: `{script}` failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `sh -c SCRIPT` inside the container, in the background; its output is
    /// captured.
    pub fn spawn_sh(&self, script: &str) -> Result<Child> {
        self.command(script)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting nsenter")
    }

    fn command(&self, script: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .args(["-t", &self.pid1.to_string(), "-a", "--", "sh", "-c", script])
            .stdin(Stdio::null());
        command
    }

    fn console_tail(&self) -> String {
        let text = fs::read_to_string(&self.console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn unmount_bpffs(&self) {
        let _ = Command::new("umount")
            .arg("--lazy")
            .arg(&self.bpffs)
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut nspawn) = self.nspawn.take() {
            if self.pid1 > 1 {
                // Killing init ends every process in the container's PID
                // namespace; nspawn then exits.
                // SAFETY: kill(2).
                unsafe { libc::kill(self.pid1 as i32, libc::SIGKILL) };
            }
            let _ = nspawn.kill();
            let _ = nspawn.wait();
        }
        let _ = fs::write(self.cgroup.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cgroup.exists() && remove_cgroup(&self.cgroup).is_err() {
            if Instant::now() > deadline {
                eprintln!("container: could not remove {}", self.cgroup.display());
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        self.unmount_bpffs();
        let _ = fs::remove_dir(&self.bpffs);
        // nspawn leaves this behind where /run is not a tmpfs.
        let _ = fs::remove_dir(Path::new("/run/systemd/nspawn/propagate").join(machine_name()));
        if let Err(e) = remove_tree(&self.root) {
            eprintln!("container: {e:#}");
        }
        // SAFETY: restores the default dispositions.
        unsafe {
            for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::signal(signal, libc::SIG_DFL);
            }
        }
    }
}

/// Unique on the machine: nspawn keeps per-name state in /run even with
/// --register=no, and other checkouts may be testing at the same time.
fn machine_name() -> String {
    format!("guard-test-{}", std::process::id())
}

/// The container's init: the child of systemd-nspawn that is PID 1 in its
/// own PID namespace, once it is systemd (before that exec its namespaces
/// are still being set up).
fn container_init(nspawn: u32) -> Option<u32> {
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        if field("PPid:") == Some(&nspawn.to_string())
            && field("Name:") == Some("systemd")
            && field("NSpid:").is_some_and(|ns| {
                let ids: Vec<&str> = ns.split_whitespace().collect();
                ids.len() > 1 && ids.last() == Some(&"1")
            })
        {
            return Some(pid);
        }
    }
    None
}

/// Runs `command` to completion, killing it after `limit` or on Ctrl-C.
fn bounded(command: &mut Command, limit: Duration) -> Result<Output> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let readers = [
        drain(
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ),
        drain(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ),
    ];
    let deadline = Instant::now() + limit;
    let status: ExitStatus = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let interrupted = INTERRUPTED.load(Ordering::SeqCst);
        if interrupted || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            if interrupted {
                bail!("interrupted");
            }
            bail!("still running after {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let [stdout, stderr] = readers.map(|r| r.join().unwrap_or_default());
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

fn drain(stream: Option<Box<dyn std::io::Read + Send>>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut stream) = stream {
            let _ = stream.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// Removes a cgroup and its descendants (all of them empty), deepest first.
fn remove_cgroup(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)?.flatten() {
        if entry.file_type()?.is_dir() {
            remove_cgroup(&entry.path())?;
        }
    }
    fs::remove_dir(dir)
}

/// `rm -rf --one-file-system`, after unmounting what an interrupted run
/// left mounted below `dir` (debootstrap mounts /proc and /sys there).
fn remove_tree(dir: &Path) -> Result<()> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let mut mounts: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mount in mounts {
        run(Command::new("umount").arg("--lazy").arg(mount))?;
    }
    if dir.exists() {
        run(Command::new("rm")
            .args(["-rf", "--one-file-system"])
            .arg(dir))?;
    }
    Ok(())
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_mirror_in_either_sources_format() {
        let deb822 =
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
                      Components: main\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\n\
                      Suites: bookworm-security\nComponents: main\n";
        assert_eq!(
            mirror_in(deb822).as_deref(),
            Some("http://deb.debian.org/debian")
        );
        let one_line = "deb [arch=amd64] http://mirror.example/debian bookworm main contrib\n";
        assert_eq!(
            mirror_in(one_line).as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            mirror_in("deb http://deb.debian.org/debian-security bookworm-security main\n"),
            None
        );
    }
}
