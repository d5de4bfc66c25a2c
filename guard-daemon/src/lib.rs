//! guard's userspace: policies, cgroups, program loading, events and
//! reports, and the `guard` command line built on them.
pub mod api;
pub mod cgroup;
pub mod cli;
pub mod client;
pub mod daemon;
pub mod error;
pub mod events;
pub mod inventory;
pub mod loader;
pub mod policy;
pub mod procs;
pub mod reaper;
pub mod render;
pub mod report;
pub mod run;
pub mod sockdiag;
