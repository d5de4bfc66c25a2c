//! Everything that talks to the kernel: loading and attaching the programs
//! ([`programs`], [`pinned`]), their maps ([`maps`]), the records they send
//! ([`records`]), ending sockets ([`sockdiag`]), cgroups ([`cgroup`]) and the
//! pseudo-filesystems all of it lives on ([`kernelfs`]).
//!
//! This is the lowest layer: it knows the kernel object's contract
//! (`guard_common`) and nothing of policies files, runs, reports or the
//! daemon. Rules arrive as ready-made map entries.
pub mod bpfsys;
pub mod btf;
pub mod cgroup;
pub mod evidence;
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
