//! `cargo xtask setup`: installs what building and testing guard needs and a
//! fresh machine lacks. Idempotent: each step checks first.
//!
//! - the nightly toolchain's rust-src (eBPF crates are built with
//!   `-Z build-std=core`);
//! - bpf-linker, built against an LLVM with the same major version as
//!   nightly's: first nightly's own libLLVM, then Debian's llvm-N-dev;
//! - every command the tests, the bench and the systemd container test run
//!   ([`TOOLS`]: dig, xmllint, debootstrap, systemd-nspawn, ...);
//! - nss-resolve, unpacked (not installed) for the systemd-resolved test;
//! - cargo-deb, which builds the Debian package (`cargo xtask dist`).
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{run, succeeds};

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn setup() -> Result<()> {
    nightly_with_rust_src()?;
    bpf_linker()?;
    test_tools()?;
    require_tools()?;
    println!("setup: everything needed is installed");
    Ok(())
}

fn nightly_with_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("setup: installing the nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: adding rust-src to nightly");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if succeeds(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    let version = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("`rustc +nightly -vV` printed no LLVM version")?
        .to_string();
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} for LLVM {major} (about a minute)");

    // 1. Nightly ships libLLVM; point bpf-linker at it through a prefix
    //    directory that outlives this build (bpf-linker's RUNPATH names it).
    let first = nightly_llvm_prefix(&major).and_then(|prefix| install_bpf_linker(&major, &prefix));
    let first_error = match first {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    println!("setup: building against nightly's libLLVM failed ({first_error:#}); trying Debian's llvm-{major}-dev");

    // 2. Debian's LLVM of the same major version.
    apt_install(&[
        &format!("llvm-{major}-dev"),
        &format!("libpolly-{major}-dev"),
        "zlib1g-dev",
        "libzstd-dev",
    ])?;
    install_bpf_linker(&major, Path::new(&format!("/usr/lib/llvm-{major}"))).with_context(|| {
        format!(
            "bpf-linker could not be built against nightly's libLLVM ({first_error:#}) nor against Debian's \
             llvm-{major}-dev"
        )
    })
}

/// A directory `P/lib` holding `libLLVM.so` and its soname, both pointing at
/// nightly's libLLVM.
fn nightly_llvm_prefix(major: &str) -> Result<PathBuf> {
    let sysroot =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let library = fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("libLLVM.so.{major}"))
                    || n.starts_with(&format!("libLLVM-{major}"))
            })
        })
        .with_context(|| format!("no libLLVM for LLVM {major} in {}", lib_dir.display()))?;
    let home = env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| env::var("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let prefix = home.join(format!("guard-llvm-{major}"));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    let soname = library.file_name().expect("file name").to_owned();
    for link in [prefix_lib.join("libLLVM.so"), prefix_lib.join(soname)] {
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&library, &link)?;
    }
    Ok(prefix)
}

fn install_bpf_linker(major: &str, prefix: &Path) -> Result<()> {
    let mut command = Command::new("cargo");
    command
        .args([
            "install",
            "bpf-linker",
            "--force",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", prefix)
        .env(format!("LLVM_SYS_{major}1_PREFIX"), prefix);
    run(&mut command)?;
    if !succeeds(Command::new("bpf-linker").arg("--version")) {
        bail!("bpf-linker was installed but does not run (is ~/.cargo/bin on PATH?)");
    }
    Ok(())
}

/// A command the tests, the bench or the container test run, and the Debian
/// package that has it.
struct Tool {
    command: &'static str,
    package: &'static str,
}

const fn tool(command: &'static str, package: &'static str) -> Tool {
    Tool { command, package }
}

/// Every external command `cargo xtask test` runs (the tests, the bench on
/// tiny sizes, the systemd container test), one a line.
const TOOLS: &[Tool] = &[
    tool("dig", "bind9-dnsutils"),
    tool("ip", "iproute2"),
    tool("unshare", "util-linux"),
    tool("nsenter", "util-linux"),
    tool("mount", "mount"),
    tool("script", "bsdutils"),
    tool("getent", "libc-bin"),
    tool("timeout", "coreutils"),
    tool("awk", "mawk"),
    tool("python3", "python3"),
    tool("xmllint", "libxml2-utils"),
    tool("systemd-analyze", "systemd"),
    tool("iptables", "iptables"),
    tool("/usr/bin/time", "time"),
    tool("dpkg-deb", "dpkg"),
    tool("debootstrap", "debootstrap"),
    tool("systemd-nspawn", "systemd-container"),
    tool("zstd", "zstd"),
    // A caching daemon the resolver-socket tests start (never as a service:
    // see no_service_starts).
    tool("nscd", "nscd"),
    // Detaches guard's links in the tamper tests, as a user would.
    tool("bpftool", "bpftool"),
    // Real DNS clients the stream and answer tests drive.
    tool("kdig", "knot-dnsutils"),
    tool("go", "golang-go"),
    tool(
        "/usr/lib/python3/dist-packages/dns/resolver.py",
        "python3-dnspython",
    ),
    // The dependency store's tests start a private PostgreSQL server (its
    // own cluster in a temporary directory; the package's is never
    // started: see no_service_starts) and render the graph as SVG.
    tool("pg_ctlcluster", "postgresql"),
    tool("dot", "graphviz"),
];

fn test_tools() -> Result<()> {
    let mut needed: Vec<&str> = missing_tools().map(|t| t.package).collect();
    needed.sort_unstable();
    needed.dedup();
    if !needed.is_empty() {
        let mymachines_before = package_installed("libnss-mymachines");
        no_service_starts(|| apt_install(&needed))?;
        // systemd-container recommends it; it would add the containers'
        // names to the host's name resolution.
        if !mymachines_before && package_installed("libnss-mymachines") {
            run(Command::new("apt-get")
                .args(["purge", "-y", "-q", "libnss-mymachines"])
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
        }
    }
    nss_resolve()?;
    cargo_deb()
}

/// Runs `install` with Debian's policy layer refusing every service start,
/// so that installing nscd never starts it for the whole host (the tests
/// start their own, in private namespaces). A policy-rc.d already in place
/// is left alone.
fn no_service_starts(install: impl FnOnce() -> Result<()>) -> Result<()> {
    let policy = Path::new("/usr/sbin/policy-rc.d");
    if policy.exists() {
        return install();
    }
    fs::write(
        policy,
        "#!/bin/sh\n# written by cargo xtask setup while it installs\nexit 101\n",
    )?;
    fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let result = install();
    fs::remove_file(policy)?;
    result
}

/// nss-resolve (libnss_resolve.so.2), unpacked beside the build for the
/// systemd-resolved test, which loads it through LD_LIBRARY_PATH and a
/// private nsswitch.conf. Not installed: its package depends on
/// systemd-resolved, which takes over /etc/resolv.conf, and its
/// maintainer script edits /etc/nsswitch.conf for the whole host.
pub fn nss_resolve() -> Result<()> {
    let dir = test_deps_dir();
    if fs::read_dir(dir.join("nss-resolve")).is_ok_and(|mut d| d.next().is_some()) {
        return Ok(());
    }
    println!("setup: unpacking libnss-resolve into {}", dir.display());
    fs::create_dir_all(&dir)?;
    if !succeeds(
        Command::new("apt-get")
            .args(["download", "libnss-resolve"])
            .current_dir(&dir),
    ) {
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["download", "libnss-resolve"])
            .current_dir(&dir))?;
    }
    let deb = fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnss-resolve") && n.ends_with(".deb"))
        })
        .context("apt-get download libnss-resolve left no .deb")?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(dir.join("nss-resolve")))?;
    fs::remove_file(deb)?;
    Ok(())
}

/// Where test dependencies that are unpacked rather than installed go.
pub fn test_deps_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("target/test-deps")
}

fn missing_tools() -> impl Iterator<Item = &'static Tool> {
    TOOLS.iter().filter(|t| {
        // A command on PATH, or a file (a library module) by its path.
        let check = format!("command -v {0} || test -e {0}", t.command);
        !succeeds(Command::new("sh").args(["-c", &check]))
    })
}

fn package_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f", "${Status}", package]))
        .is_ok_and(|status| status.ends_with(" installed"))
}

/// Fails, naming each missing command and its Debian package, unless every
/// command the tests run is there: the end of setup, so the start of
/// `cargo xtask test`, which would otherwise fail obscurely in some test.
fn require_tools() -> Result<()> {
    if !succeeds(Command::new("cargo").args(["deb", "--version"])) {
        bail!(
            "the tests need `cargo deb`, which is missing \
             (cargo install cargo-deb --locked --version {CARGO_DEB_VERSION})"
        );
    }
    let missing: Vec<&Tool> = missing_tools().collect();
    if !missing.is_empty() {
        let packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
        bail!(
            "the tests need commands that are missing: {} (apt-get install {})",
            missing
                .iter()
                .map(|t| format!("`{}` from Debian package {}", t.command, t.package))
                .collect::<Vec<_>>()
                .join(", "),
            packages.join(" ")
        );
    }
    Ok(())
}

/// `cargo xtask dist` builds the Debian package with cargo-deb. Pinned: the
/// newest release when this was written, and it builds with rustc 1.85+.
const CARGO_DEB_VERSION: &str = "3.8.0";

fn cargo_deb() -> Result<()> {
    if succeeds(Command::new("cargo").args(["deb", "--version"])) {
        return Ok(());
    }
    println!("setup: installing cargo-deb {CARGO_DEB_VERSION} (a few minutes, once)");
    run(Command::new("cargo").args([
        "install",
        "cargo-deb",
        "--locked",
        "--version",
        CARGO_DEB_VERSION,
    ]))
}

pub fn apt_install(packages: &[&str]) -> Result<()> {
    println!("setup: apt-get install {}", packages.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        // Another apt (unattended-upgrades on a fresh machine) may hold it.
        .args(["-o", "DPkg::Lock::Timeout=300"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!("{command:?} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
