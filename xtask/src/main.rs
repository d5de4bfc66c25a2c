//! Project tasks: `cargo xtask setup | test | demo | bench | deps-bench |
//! differential | dist | test-package`.
//!
//! Each installs what it needs first (`setup`), so on a fresh machine each
//! is the one command to type. All but `dist` need root: they load eBPF
//! programs, create cgroups or boot a container.
mod bench;
mod container;
mod demo;
mod deps_bench;
mod dist;
mod package_test;
mod setup;

use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

fn main() {
    let task = std::env::args().nth(1).unwrap_or_default();
    let result = match task.as_str() {
        "setup" => setup::setup(),
        "test" => test(),
        "demo" => demo::demo(),
        "bench" => bench::bench(&std::env::args().skip(2).collect::<Vec<_>>()),
        "deps-bench" => deps_bench::main(&std::env::args().skip(2).collect::<Vec<_>>()),
        "differential" => differential(&std::env::args().skip(2).collect::<Vec<_>>()),
        "dist" => dist::dist(),
        "test-package" => test_package(),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n\
                 tasks:\n  \
                 setup         install the nightly rust-src, bpf-linker, cargo-deb and the test tools if missing\n  \
                 test          setup, then formatting, clippy (host and eBPF), every test, the package\n                \
                 on systemd in a container, and the bench on tiny sizes (root)\n  \
                 demo          setup, then a sample deploy script under guard against a loopback DNS server (root)\n  \
                 bench         what guard costs, against no guard and a netfilter rule; --smoke for tiny sizes (root)\n  \
                 deps-bench    how long `guard deps ingest` takes for 100,000 lookups, SQLite and\n                \
                 PostgreSQL; --smoke for tiny sizes (root)\n  \
                 differential  the kernel's DNS reading against the host's, on many packets (root);\n                \
                 --cases N (default 1000000), --seed S\n  \
                 dist          the Debian package: target/debian/guard_<version>_<arch>.deb\n  \
                 test-package  dist, then only the package test in a container booting systemd (root)"
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("xtask {task}: {e:#}");
        std::process::exit(1);
    }
}

fn test() -> Result<()> {
    require_root("test")?;
    // Ends by checking that every command the tests run is there.
    setup::setup()?;
    run(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
    run(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The kernel crate, for the target it is really built for.
    run(Command::new("rustup")
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--package",
            "guard-ebpf",
            "--release",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--target-dir", "target/ebpf-clippy", "--", "-D", "warnings"])
        // As aya-build passes it when building the object.
        .env(
            "RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        ))?;
    // Integration tests drive the test client binary built beside guard.
    run(Command::new("cargo").args(["build", "--workspace", "--bins"]))?;
    cargo_test()?;
    // The package, installed and used on systemd booted in a container.
    package_test::package_test(&workspace_root()?, &dist::build()?)?;
    // The benchmark must keep working; on tiny sizes it checks that every row
    // runs and that received + lost events add up, never how fast anything is.
    bench::bench(&["--smoke".to_string()])?;
    // So must the dependency store's ingest figure (both stores, tiny sizes).
    deps_bench::main(&["--smoke".to_string()])
}

/// The long pass of the differential test (guard-daemon/tests/
/// differential.rs; `cargo xtask test` runs a short one).
fn differential(args: &[String]) -> Result<()> {
    require_root("differential")?;
    setup::setup()?;
    let mut cases = "1000000".to_string();
    let mut seed = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--cases" => cases = args.next().context("--cases N")?.clone(),
            "--seed" => seed = Some(args.next().context("--seed S")?.clone()),
            other => bail!("differential: unknown argument {other:?} (--cases N, --seed S)"),
        }
    }
    let mut command = Command::new("cargo");
    command
        .args([
            "test",
            "--release",
            "-p",
            "guard-daemon",
            "--test",
            "differential",
        ])
        .args(["--", "--nocapture"])
        .env("GUARD_DIFFERENTIAL_CASES", &cases);
    if let Some(seed) = seed {
        command.env("GUARD_DIFFERENTIAL_SEED", seed);
    }
    run(&mut command)
}

fn test_package() -> Result<()> {
    require_root("test-package")?;
    setup::setup()?;
    package_test::package_test(&workspace_root()?, &dist::build()?)
}

pub fn workspace_root() -> Result<std::path::PathBuf> {
    Ok(std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_owned())
}

/// Runs the tests, echoing their output, and closes with one total line:
/// cargo's own last line is about whichever test binary ran last (often a
/// crate without doc-tests), not about the run.
fn cargo_test() -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut command = Command::new("cargo");
    command
        .args(["test", "--workspace", "--no-fail-fast"])
        .stdout(Stdio::piped());
    eprintln!("+ {command:?}");
    let mut child = command.spawn().context("starting cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().context("cargo test stdout")?).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(word))
                    .and_then(|n| n.trim().rsplit(' ').next().and_then(|n| n.parse().ok()))
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let status = child.wait()?;
    println!("{passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("cargo test failed: {status}");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Builds every binary in release mode; returns (workspace root, binary dir).
pub fn release_binaries() -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    run(Command::new("cargo").args(["build", "--release", "--workspace", "--bins"]))?;
    let root = workspace_root()?;
    let bin = root.join("target/release");
    Ok((root, bin))
}

pub fn require_root(task: &str) -> Result<()> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!("`cargo xtask {task}` loads eBPF programs and creates cgroups: run it as root");
    }
    Ok(())
}

pub fn run(command: &mut Command) -> Result<()> {
    eprintln!("+ {command:?}");
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

pub fn succeeds(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
