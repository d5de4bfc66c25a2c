//! The process tree of a run, built from the kernel's exec and fork records
//! as they arrive, so a chain can be named after its processes are gone.
use std::{collections::HashMap, fs};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default)]
struct Process {
    parent: Option<u32>,
    executable: Option<String>,
    argv: Vec<String>,
    comm: String,
}

/// One link of a process chain, root first.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChainLink {
    pub pid: u32,
    /// The arguments it was exec'd with (argv[0] first); empty if unknown.
    pub argv: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executable: Option<String>,
}

impl ChainLink {
    /// Short form for humans: the program name and its first arguments.
    pub fn short(&self) -> String {
        let Some(program) = self.argv.first() else {
            return format!("[{}]", self.pid);
        };
        let program = program.rsplit('/').next().unwrap_or(program);
        let mut text = program.to_string();
        for arg in self.argv.iter().skip(1) {
            if text.len() + arg.len() > 48 {
                text.push_str(" …");
                break;
            }
            text.push(' ');
            text.push_str(arg);
        }
        text
    }
}

/// Upper bound on tracked processes per run; beyond it the oldest entries
/// are not evicted, new ones fall back to /proc.
const MAX_TRACKED: usize = 65_536;

#[derive(Debug, Default)]
pub struct ProcessTable {
    root: u32,
    processes: HashMap<u32, Process>,
    /// execve calls not yet known to have succeeded, by thread id.
    pending_exec: HashMap<u32, (String, Vec<String>)>,
}

impl ProcessTable {
    pub fn new(root: u32) -> ProcessTable {
        ProcessTable {
            root,
            ..Default::default()
        }
    }

    /// Processes remembered.
    pub fn len(&self) -> usize {
        self.processes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
    }

    pub fn on_fork(&mut self, parent: u32, child: u32, comm: String) {
        if self.processes.len() >= MAX_TRACKED {
            return;
        }
        // A forked child runs its parent's program until it execs.
        let (argv, executable) = self
            .processes
            .get(&parent)
            .map(|p| (p.argv.clone(), p.executable.clone()))
            .unwrap_or_default();
        self.processes.insert(
            child,
            Process {
                parent: Some(parent),
                executable,
                argv,
                comm,
            },
        );
    }

    pub fn on_exec(&mut self, tid: u32, path: String, argv: Vec<String>) {
        self.pending_exec.insert(tid, (path, argv));
    }

    pub fn on_exec_result(&mut self, pid: u32, tid: u32, ret: i32) {
        let Some((path, argv)) = self.pending_exec.remove(&tid) else {
            return;
        };
        if ret != 0 {
            return;
        }
        let process = self.processes.entry(pid).or_default();
        process.executable = Some(path);
        process.argv = argv;
    }

    /// The chain from the run's root process down to `pid`.
    pub fn chain(&self, pid: u32) -> Vec<ChainLink> {
        self.chain_within(pid, |_| true)
    }

    /// As [`ProcessTable::chain`], but a process the kernel programs never
    /// reported is looked up in /proc only if `guarded(pid)`: the chain
    /// stops at the edge of the guarded cgroup instead of climbing into
    /// whatever started it (the daemon's view of a bound unit).
    pub fn chain_within(&self, pid: u32, guarded: impl Fn(u32) -> bool) -> Vec<ChainLink> {
        let mut chain = Vec::new();
        let mut current = Some(pid);
        while let Some(pid) = current {
            if chain.len() >= 64 || chain.iter().any(|l: &ChainLink| l.pid == pid) {
                break;
            }
            let (link, parent) = match self.processes.get(&pid) {
                Some(p) => (
                    ChainLink {
                        pid,
                        argv: if p.argv.is_empty() && !p.comm.is_empty() {
                            vec![p.comm.clone()]
                        } else {
                            p.argv.clone()
                        },
                        executable: p.executable.clone(),
                    },
                    p.parent,
                ),
                // Not seen by the kernel programs (should not happen for a
                // process in the run): ask /proc while it still exists.
                None if guarded(pid) => from_proc(pid),
                None => break,
            };
            chain.push(link);
            if pid == self.root {
                break;
            }
            // Above the root is guard itself and whatever started it: not
            // part of the run.
            current = parent.filter(|p| *p != 0 && *p != std::process::id());
        }
        chain.reverse();
        chain
    }
}

fn from_proc(pid: u32) -> (ChainLink, Option<u32>) {
    let argv = fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default();
    let parent = fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The command name may contain spaces and parentheses: skip past the last ')'.
            let rest = &stat[stat.rfind(')')? + 2..];
            rest.split_whitespace().nth(1)?.parse().ok()
        });
    let executable = fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.display().to_string());
    (
        ChainLink {
            pid,
            argv,
            executable,
        },
        parent,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn builds_chains_from_fork_and_exec_records_of_exited_processes() {
        let mut t = ProcessTable::new(100);
        t.on_exec(100, "/bin/sh".into(), argv(&["sh", "deploy.sh"]));
        t.on_exec_result(100, 100, 0);
        t.on_fork(100, 101, "sh".into());
        // A failed PATH probe, then the real exec.
        t.on_exec(
            101,
            "/usr/local/bin/dbctl".into(),
            argv(&["dbctl", "drain"]),
        );
        t.on_exec_result(101, 101, -2);
        t.on_exec(101, "/usr/bin/dbctl".into(), argv(&["dbctl", "drain"]));
        t.on_exec_result(101, 101, 0);
        t.on_fork(101, 102, "dbctl".into());
        t.on_exec(
            102,
            "/usr/bin/getent".into(),
            argv(&["getent", "hosts", "frontend.internal"]),
        );
        t.on_exec_result(102, 102, 0);
        let chain = t.chain(102);
        let shown: Vec<String> = chain.iter().map(ChainLink::short).collect();
        assert_eq!(
            shown,
            [
                "sh deploy.sh",
                "dbctl drain",
                "getent hosts frontend.internal"
            ]
        );
        assert_eq!(chain[1].executable.as_deref(), Some("/usr/bin/dbctl"));
        assert_eq!(chain[0].pid, 100);
    }

    #[test]
    fn forked_child_without_exec_shows_its_parents_program() {
        let mut t = ProcessTable::new(1);
        t.on_exec(1, "/bin/bash".into(), argv(&["bash", "x.sh"]));
        t.on_exec_result(1, 1, 0);
        t.on_fork(1, 2, "bash".into());
        assert_eq!(t.chain(2)[1].argv, argv(&["bash", "x.sh"]));
    }
}
