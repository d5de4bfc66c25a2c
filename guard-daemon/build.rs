//! Builds the kernel programs (`guard-ebpf`) for the BPF target with the
//! nightly toolchain and bpf-linker, the aya-template way. `cargo xtask setup`
//! installs both when they are missing.
use std::{env, path::PathBuf};

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("guard-daemon has no parent directory"))?;
    let ebpf_dir = root.join("guard-ebpf");
    // The kernel object also depends on the shared crate.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("guard-common").display()
    );
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: "guard-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed; `cargo xtask setup` installs the nightly \
         toolchain's rust-src and bpf-linker",
    )?;
    // The object's FNV-1a, computed once here rather than over its ~1 MB in
    // every `guard run` (it names the build to the daemon).
    let object = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?).join("guard-ebpf");
    let bytes = std::fs::read(&object).with_context(|| format!("reading {}", object.display()))?;
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    });
    println!("cargo:rustc-env=GUARD_OBJECT_FNV1A={hash:016x}");
    Ok(())
}
