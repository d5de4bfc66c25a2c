//! The kernel object and the programs of a standalone `guard run`: loaded,
//! verified and attached for one run, gone with guard's descriptors.
use std::{
    any::Any,
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use aya::{
    maps::{Map, MapData, RingBuf},
    programs::{links::FdLink, trace_point::TracePointLinkId, CgroupSkb, TracePoint},
    Ebpf, EbpfLoader,
};
use guard_common::evidence::{
    ESCAPE_TRACEPOINTS, GLOBAL_UNIX_UADDRLEN_OFFSET, GLOBAL_UNIX_UADDR_OFFSET,
};
use guard_common::maps::{
    BINDINGS, EVENTS, GLOBAL_DNS_PORTS, GLOBAL_FORK_CHILD_PID_OFFSET, MAX_DNS_PORTS,
    POLICY_COUNTERS, PROGRAM_DNS_EGRESS, PROGRAM_EXEC_ENTER, PROGRAM_EXEC_EXIT, PROGRAM_FORK,
    RULES, SCRATCH, SEEN,
};

use super::{
    hooks::{attach_streams, attached_ids, load_programs, CgroupHook},
    kernelfs::{ensure_tracefs, fork_child_pid_offset},
    maps::KernelMaps,
    pinned::PINNED_MAPS,
    unixhooks::{sock_addr_offsets, UnixHooks},
};
use crate::error::{with_causes, Error, Result};

/// The kernel object, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guard-ebpf"));

pub struct LoadOptions<'a> {
    pub dns_ports: &'a [u16],
    pub rule_capacity: u32,
    pub ring_buffer_bytes: u32,
    /// Distinct (name, type) pairs record mode can count; 0 when no binding
    /// records (the LRU map is preallocated, so it is only made big on use).
    pub record_capacity: u32,
    /// Entries of the per-policy counter map (one per concurrent policy id).
    pub policy_capacity: u32,
}

/// The process trackers: (program, tracepoint category, event).
pub const PROCESS_TRACEPOINTS: [(&str, &str, &str); 3] = [
    (PROGRAM_EXEC_ENTER, "syscalls", "sys_enter_execve"),
    (PROGRAM_EXEC_EXIT, "syscalls", "sys_exit_execve"),
    (PROGRAM_FORK, "sched", "sched_process_fork"),
];

/// Every tracepoint program: the process trackers, then the escape
/// tracepoints.
pub fn tracepoints() -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
    PROCESS_TRACEPOINTS.into_iter().chain(ESCAPE_TRACEPOINTS)
}

/// Loaded, verified programs and their maps. Dropping it detaches and
/// unloads everything (nothing is pinned).
pub struct Programs {
    ebpf: Ebpf,
    tracepoint_links: Vec<(&'static str, TracePointLinkId)>,
    cgroup_links: Vec<FdLink>,
    /// The stream programs' attachments to the sockhash.
    stream_attachments: Vec<Box<dyn Any>>,
    /// The Unix-socket hooks, or why this kernel has none.
    unix: std::result::Result<UnixHooks, String>,
    /// Links of the Unix-socket hooks to cgroups (detached on drop).
    unix_links: Vec<OwnedFd>,
}

impl Programs {
    pub fn load(options: &LoadOptions<'_>) -> Result<Programs> {
        if options.dns_ports.is_empty() || options.dns_ports.len() > MAX_DNS_PORTS {
            return Err(Error::Tracefs(format!(
                "between 1 and {MAX_DNS_PORTS} DNS ports are supported"
            )));
        }
        let mut ports = [0u16; MAX_DNS_PORTS];
        for (slot, port) in ports.iter_mut().zip(options.dns_ports) {
            *slot = port.to_be();
        }
        let t = std::time::Instant::now();
        ensure_tracefs()?;
        let fork_offset = fork_child_pid_offset()?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::io("counting CPUs")(e))? as u32;
        let unix_offsets = sock_addr_offsets();
        // Defaults for the layout of 6.7+; unused when the hooks are absent.
        let (uaddr, uaddrlen) = unix_offsets.clone().unwrap_or((8, 32));
        let mut ebpf = EbpfLoader::new()
            .override_global(GLOBAL_UNIX_UADDR_OFFSET, &uaddr, true)
            .override_global(GLOBAL_UNIX_UADDRLEN_OFFSET, &uaddrlen, true)
            .override_global(GLOBAL_DNS_PORTS, &ports, true)
            .override_global(GLOBAL_FORK_CHILD_PID_OFFSET, &fork_offset, true)
            .map_max_entries(RULES, options.rule_capacity.max(1))
            .map_max_entries(EVENTS, options.ring_buffer_bytes)
            .map_max_entries(SEEN, options.record_capacity.max(1))
            .map_max_entries(POLICY_COUNTERS, options.policy_capacity.max(1))
            .map_max_entries(BINDINGS, options.policy_capacity.max(1))
            // Two working-memory slots per CPU (see the kernel's maps.rs).
            .map_max_entries(SCRATCH, cpus * 2)
            .load(OBJECT)?;
        tracing::debug!(elapsed = ?t.elapsed(), "object loaded (maps created)");
        load_programs(&mut ebpf)?;
        tracing::debug!(elapsed = ?t.elapsed(), "programs verified");
        let unix = unix_offsets.and_then(|_| UnixHooks::load(&ebpf, OBJECT));
        tracing::debug!(elapsed = ?t.elapsed(), unix_hooks = unix.is_ok(), "Unix-socket hooks verified");
        let stream_attachments = attach_streams(&mut ebpf)?;
        Ok(Programs {
            ebpf,
            tracepoint_links: Vec::new(),
            cgroup_links: Vec::new(),
            stream_attachments,
            unix,
            unix_links: Vec::new(),
        })
    }

    /// Attaches the process trackers and the escape tracepoints. They fire
    /// host-wide but return at once for processes outside guarded cgroups.
    pub fn attach_tracepoints(&mut self) -> Result<()> {
        for (name, category, event) in tracepoints() {
            let tracepoint: &mut TracePoint = program(&mut self.ebpf, name)?;
            let link = tracepoint
                .attach(category, event)
                .map_err(|source| Error::Program { name, source })?;
            self.tracepoint_links.push((name, link));
        }
        Ok(())
    }

    /// Attaches the DNS programs to a cgroup (bpf_links: they go away with
    /// this process unless pinned).
    pub fn attach_cgroup(&mut self, cgroup: impl AsFd) -> Result<()> {
        for hook in CgroupHook::ALL {
            let name = hook.program();
            let program = self.ebpf.program_mut(name).ok_or(Error::Missing(name))?;
            self.cgroup_links
                .push(hook.attach(program, cgroup.as_fd())?);
        }
        if let Ok(unix) = &self.unix {
            let links = unix
                .attach(cgroup.as_fd())
                .map_err(Error::io("attaching the Unix-socket hooks"))?;
            self.unix_links
                .extend(links.into_iter().map(|(_, link)| link));
        }
        Ok(())
    }

    /// The Unix-socket hooks, or why this kernel has none.
    pub fn unix_hooks(&self) -> std::result::Result<&UnixHooks, &str> {
        self.unix.as_ref().map_err(String::as_str)
    }

    /// (attach type, program id) of the programs [`Programs::attach_cgroup`]
    /// attaches, to check later that they still are.
    pub fn cgroup_programs(&self) -> Vec<(u32, u32)> {
        let mut ids = attached_ids(
            CgroupHook::ALL
                .into_iter()
                .filter_map(|hook| Some((hook, self.ebpf.program(hook.program())?))),
        );
        if let Ok(unix) = &self.unix {
            ids.extend(unix.ids());
        }
        ids
    }

    /// The ring buffer, taken out of the object to be read on its own.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map(EVENTS).ok_or(Error::Missing(EVENTS))?;
        RingBuf::try_from(map).map_err(|source| Error::Map {
            name: EVENTS,
            source,
        })
    }

    /// Runs and total run time of the DNS egress program (see [`egress_stats`]).
    pub fn egress_stats(&self) -> Option<(u64, u64)> {
        match self.ebpf.program(PROGRAM_DNS_EGRESS)? {
            aya::programs::Program::CgroupSkb(p) => egress_stats(p),
            _ => None,
        }
    }

    /// Runs a cgroup_skb hook's program `repeat` times on `packet` (an IP
    /// packet, as the hook sees it) without a network, with the kernel's
    /// `BPF_PROG_TEST_RUN`: the program's verdict (1 pass, 0 drop) and its
    /// mean run time. The packet counts as sent (or received) by a socket
    /// of the calling thread's cgroup. For the differential tests of the
    /// DNS reader and for the benchmark.
    pub fn test_run(
        &self,
        hook: CgroupHook,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, std::time::Duration)> {
        use aya::programs::{TestRun, TestRunOptions};
        let name = hook.program();
        let Some(aya::programs::Program::CgroupSkb(program)) = self.ebpf.program(name) else {
            return Err(Error::Missing(name));
        };
        // The kernel takes an Ethernet frame and hands the program what
        // follows the header; the EtherType tells it the family.
        let ether_type: u16 = if packet.first().is_some_and(|b| b >> 4 == 6) {
            0x86dd
        } else {
            0x0800
        };
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&ether_type.to_be_bytes());
        frame.extend_from_slice(packet);
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                repeat: repeat.max(1),
                ..TestRunOptions::default()
            })
            .map_err(|source| Error::Program { name, source })?;
        Ok((result.return_value, result.duration))
    }

    /// Pins programs, maps and the tracepoint links into `dir` (which must
    /// exist on bpffs), so that all of it outlives this process.
    pub(super) fn pin_into(mut self, dir: &Path) -> Result<()> {
        let pin_error = |path: &Path| {
            let path = path.display().to_string();
            move |e: aya::pin::PinError| Error::Pin(path, with_causes(&e))
        };
        for (name, id) in std::mem::take(&mut self.tracepoint_links) {
            let tracepoint: &mut TracePoint = program(&mut self.ebpf, name)?;
            let link = tracepoint
                .take_link(id)
                .map_err(|source| Error::Program { name, source })?;
            let link =
                FdLink::try_from(link).map_err(|e| Error::Pin(name.into(), with_causes(&e)))?;
            let path = dir.join(format!("link_{name}"));
            link.pin(&path).map_err(pin_error(&path))?;
        }
        for hook in CgroupHook::ALL {
            let name = hook.program();
            let program = self.ebpf.program_mut(name).ok_or(Error::Missing(name))?;
            let path = dir.join(format!("prog_{name}"));
            program.pin(&path).map_err(pin_error(&path))?;
        }
        if let Ok(unix) = &self.unix {
            unix.pin_into(dir)
                .map_err(|e| Error::Pin("the Unix-socket hooks".into(), e.to_string()))?;
        }
        // The stream programs stay attached to the sockhash for as long as
        // it lives (the pinned sock_ops program holds it): forgetting the
        // attachments keeps them from being detached when this process
        // drops them.
        for attachment in std::mem::take(&mut self.stream_attachments) {
            std::mem::forget(attachment);
        }
        for name in PINNED_MAPS {
            let map = self.ebpf.map(name).ok_or(Error::Missing(name))?;
            let path = dir.join(format!("map_{name}"));
            map.pin(&path).map_err(pin_error(&path))?;
        }
        Ok(())
    }
}

impl KernelMaps for Programs {
    fn map(&self, name: &'static str) -> Result<&Map> {
        self.ebpf.map(name).ok_or(Error::Missing(name))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map> {
        self.ebpf.map_mut(name).ok_or(Error::Missing(name))
    }
}

/// Runs and total run time of the DNS egress program, as the kernel
/// accounts them while `kernel.bpf_stats_enabled` is 1 (None otherwise).
pub(super) fn egress_stats(program: &CgroupSkb) -> Option<(u64, u64)> {
    let enabled = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").ok()?;
    if enabled.trim() != "1" {
        return None;
    }
    let info = program.info().ok()?;
    Some((info.run_count(), info.run_time().as_nanos() as u64))
}

impl Drop for Programs {
    /// Detaching a tracepoint waits for an RCU grace period (about 70 ms
    /// here) when it is the tracepoint's last perf user. Detaching the three
    /// side by side overlaps part of the waits (measured: 214 ms -> 178 ms;
    /// the kernel serialises the rest). A daemon that keeps them attached
    /// avoids the cost entirely.
    fn drop(&mut self) {
        let mut links = Vec::new();
        for (name, id) in self.tracepoint_links.drain(..) {
            if let Ok(tracepoint) = program::<TracePoint>(&mut self.ebpf, name) {
                if let Ok(link) = tracepoint.take_link(id) {
                    links.push(link);
                }
            }
        }
        std::thread::scope(|scope| {
            for link in links {
                scope.spawn(move || drop(link));
            }
        });
    }
}

pub(super) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(Error::Missing(name))?;
    program
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

/// FNV-1a over the kernel object: identifies the build of the programs and
/// the layout of their maps and records.
pub fn object_fingerprint() -> String {
    OBJECT_FNV1A.to_owned()
}

/// FNV-1a of [`OBJECT`], computed by build.rs.
const OBJECT_FNV1A: &str = env!("GUARD_OBJECT_FNV1A");

fn object_hash() -> u64 {
    u64::from_str_radix(OBJECT_FNV1A, 16).expect("build.rs writes 16 hex digits")
}

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Names a pinned generation: the object and the load options that are
/// baked into it (globals, map sizes).
pub fn generation(options: &LoadOptions<'_>) -> String {
    let mut hash = object_hash();
    let mut feed = |bytes: &[u8]| hash = fnv1a(hash, bytes);
    for port in options.dns_ports {
        feed(&port.to_le_bytes());
    }
    for value in [
        options.rule_capacity,
        options.ring_buffer_bytes,
        options.record_capacity,
        options.policy_capacity,
    ] {
        feed(&value.to_le_bytes());
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_time_fingerprint_is_the_objects_fnv1a() {
        assert_eq!(object_hash(), fnv1a(0xcbf2_9ce4_8422_2325, OBJECT));
    }
}
