//! guard's userspace, in layers (each module says what it owns):
//!
//! - [`kernel`]: everything that talks to the kernel (programs, maps,
//!   records, sock_diag, cgroups, pseudo-filesystems);
//! - [`policy`]: policy files and command-line rules, validated and
//!   compiled to rule tables;
//! - [`report`]: what a run tells people and machines (process chains,
//!   the JSON report and its renderings, the inventory of names);
//! - [`run`]: one guarded command (`guard run`), standalone or through the
//!   daemon;
//! - [`daemon`]: the long-lived service (`guard daemon`);
//! - [`api`]: the daemon's socket protocol and its client;
//! - [`doctor`]: `guard doctor`, what on this host weakens the guard;
//! - [`input`]: reading input files (policies, configuration, reports)
//!   safely: regular files only, size-capped, UTF-8 checked;
//! - [`deps`]: `guard deps`, the fleet's deploy-time dependency map built
//!   from runs' records and reports (a store, a catalog, the questions);
//! - [`cli`]: the command line on top of all of them;
//! - [`fault`]: test-only fault injection (debug builds), usable anywhere.
//!
//! Lower layers never use higher ones: kernel and policy know nothing of
//! reports; report knows nothing of runs; run and daemon share only the
//! layers below them and the api.
pub mod api;
pub mod cli;
pub mod daemon;
pub mod deps;
pub mod doctor;
pub mod error;
pub mod fault;
pub mod input;
pub mod kernel;
pub mod policy;
pub mod report;
pub mod run;
