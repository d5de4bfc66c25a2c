//! Everything that talks to the kernel: loading and attaching the programs
//! ([`programs`], [`hooks`], [`unixhooks`], [`pinned`]), their maps
//! ([`maps`], [`evidence`]), the records they send ([`records`]), ending
//! sockets ([`sockdiag`]), cgroups ([`cgroup`]), the pseudo-filesystems all
//! of it lives on ([`kernelfs`]), and what aya 0.14 does not offer: a few
//! raw `bpf()` commands ([`bpfsys`]) and struct offsets from BTF ([`btf`]).
//!
//! This is the lowest layer: it knows the kernel object's contract
//! (`guard_common`) and nothing of policies files, runs, reports or the
//! daemon. Rules arrive as ready-made map entries.
pub mod bpfsys;
pub mod btf;
pub mod cgroup;
pub mod evidence;
pub mod hooks;
pub mod kernelfs;
pub mod maps;
pub mod pinned;
pub mod programs;
pub mod records;
pub mod sockdiag;
pub mod unixhooks;

pub use maps::KernelMaps;
pub use pinned::{ensure_bpffs, remove_pins, Pinned};
pub use programs::{generation, object_fingerprint, LoadOptions, Programs};
