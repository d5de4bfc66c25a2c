//! `cargo xtask dist`: the Debian package, `target/debian/guard_<version>_<arch>.deb`.
//!
//! cargo-deb packs it from `[package.metadata.deb]` in guard-daemon/Cargo.toml:
//! the release binary, the unit and maintainer scripts from dist/, the
//! configuration as a conffile, examples, and the shell completions and man
//! pages generated here from the clap definition
//! (guard-daemon/examples/generate-docs.rs).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{run, setup};

pub fn dist() -> Result<()> {
    setup::setup()?;
    build().map(|_| ())
}

/// Builds the package (setup done); returns its path.
pub fn build() -> Result<PathBuf> {
    let (root, bin) = crate::release_binaries()?;
    generate_docs(&root)?;
    let out_dir = root.join("target/debian");
    std::fs::create_dir_all(&out_dir)?;
    let mut command = Command::new("cargo");
    command
        .current_dir(&root)
        .args(["deb", "--package", "guard-daemon", "--no-build", "--output"])
        .arg(&out_dir);
    eprintln!("+ {command:?}");
    let output = command.output().context("running cargo deb")?;
    if !output.status.success() {
        bail!(
            "cargo deb failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // cargo-deb prints the package's path last.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let deb = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo deb named no package:\n{stdout}"))?;
    let name = deb.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if !name.starts_with("guard_") || !deb.exists() {
        bail!(
            "cargo deb made {}, not guard_<version>_<arch>.deb",
            deb.display()
        );
    }
    println!(
        "dist: {} (from {})",
        deb.display(),
        bin.join("guard").display()
    );
    Ok(deb)
}

/// Completions and man pages into target/dist/{completions,man}, where the
/// package's assets list expects them. The debug build of the generator is
/// the one the tests already built; the pages do not depend on optimisation.
fn generate_docs(root: &Path) -> Result<()> {
    run(Command::new("cargo")
        .current_dir(root)
        .args(["build", "--workspace", "--examples"]))?;
    run(
        Command::new(root.join("target/debug/examples/generate-docs"))
            .arg(root.join("target/dist")),
    )
}
