//! A private PostgreSQL server for the dependency store's tests and
//! benchmark: a fresh cluster in a temporary directory (Debian's
//! `postgresql` package), listening only on a Unix socket there, owned by
//! the `postgres` user (the server refuses to run as root), and removed
//! when dropped.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    /// The sqlx URL of the `postgres` database, over the socket.
    pub url: String,
}

impl Cluster {
    /// Creates and starts a cluster; fails with what is missing or what
    /// the server said.
    pub fn start() -> Result<Cluster, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let bin = server_binaries()?;
        let dir = std::env::temp_dir().join(format!(
            "guard-postgres-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cluster = Cluster {
            url: format!(
                "postgres://postgres@localhost/postgres?host={}",
                dir.display()
            ),
            dir,
            bin,
        };
        if is_root() {
            run(Command::new("chown").arg("postgres:").arg(&cluster.dir))?;
        }
        let data = cluster.dir.join("data");
        run(cluster
            .as_server_user("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8"])
            .args(["--no-sync", "--no-instructions"]))?;
        // No TCP at all; the socket lives in the cluster's own directory.
        // JIT only slows short queries down.
        let settings = format!(
            "-k {} -c listen_addresses='' -c jit=off",
            cluster.dir.display()
        );
        run(cluster
            .as_server_user("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(cluster.dir.join("server.log"))
            .args(["-w", "-t", "60", "-o", &settings, "start"]))
        .map_err(|e| format!("{e}\n{}", cluster.log()))?;
        Ok(cluster)
    }

    fn as_server_user(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    /// The server's log, for failures.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .as_server_user("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The newest installed server's directory, /usr/lib/postgresql/N/bin.
fn server_binaries() -> Result<PathBuf, String> {
    let root = Path::new("/usr/lib/postgresql");
    let newest = fs::read_dir(root)
        .map_err(|e| format!("{}: {e} (apt-get install postgresql)", root.display()))?
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max();
    newest.map(|(_, bin)| bin).ok_or_else(|| {
        format!(
            "no PostgreSQL server under {} (apt-get install postgresql)",
            root.display()
        )
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run(command: &mut Command) -> Result<(), String> {
    let output = command
        .output()
        .map_err(|e| format!("{:?}: {e}", command.get_program()))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{:?} {:?}: {}\n{}{}",
        command.get_program(),
        command.get_args().collect::<Vec<_>>(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}
