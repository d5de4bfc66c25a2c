//! Where guard's programs attach: three on every guarded cgroup (DNS
//! egress, DNS ingress, sock_ops), three on the sockhash of the cgroups'
//! DNS connections (the stream programs), and the tracepoints (process
//! tracking, escapes). The Unix-socket hooks, which aya cannot load, are in
//! [`super::unixhooks`].
use std::os::fd::AsFd;

use aya::{
    maps::{sock::SockMapFd, SockHash},
    programs::{links::FdLink, CgroupAttachMode, CgroupSkbAttachType, Program, SkMsg, SkSkb},
    Ebpf,
};
use guard_common::{
    evidence::{PROGRAM_ESCAPE_ATTACH, PROGRAM_ESCAPE_CLONE3, PROGRAM_ESCAPE_FORK},
    maps::{
        PROGRAM_DNS_EGRESS, PROGRAM_DNS_INGRESS, PROGRAM_SOCK_OPS, PROGRAM_STREAM_ANSWER,
        PROGRAM_STREAM_PARSE, PROGRAM_STREAM_SEND, SOCKETS,
    },
};

use super::{
    bpfsys::{BPF_CGROUP_INET_EGRESS, BPF_CGROUP_INET_INGRESS, BPF_CGROUP_SOCK_OPS},
    programs::program,
};
use crate::error::{Error, Result};

/// A program attached to every guarded cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupHook {
    Egress,
    Ingress,
    SockOps,
}

impl CgroupHook {
    pub const ALL: [CgroupHook; 3] = [CgroupHook::Egress, CgroupHook::Ingress, CgroupHook::SockOps];

    pub const fn program(self) -> &'static str {
        match self {
            CgroupHook::Egress => PROGRAM_DNS_EGRESS,
            CgroupHook::Ingress => PROGRAM_DNS_INGRESS,
            CgroupHook::SockOps => PROGRAM_SOCK_OPS,
        }
    }

    /// The kernel's attach type (`BPF_CGROUP_*`), as `BPF_PROG_QUERY` lists
    /// attachments.
    pub const fn attach_type(self) -> u32 {
        match self {
            CgroupHook::Egress => BPF_CGROUP_INET_EGRESS,
            CgroupHook::Ingress => BPF_CGROUP_INET_INGRESS,
            CgroupHook::SockOps => BPF_CGROUP_SOCK_OPS,
        }
    }

    /// The name of a pinned link of this hook (bpffs refuses dots).
    pub const fn link_suffix(self) -> &'static str {
        match self {
            CgroupHook::Egress => "egress",
            CgroupHook::Ingress => "ingress",
            CgroupHook::SockOps => "sockops",
        }
    }

    /// Attaches `program` to a cgroup with a bpf_link, taken out of the
    /// program: it detaches when dropped, unless pinned. aya 0.14 uses
    /// bpf_link_create on >= 5.7, where only Single is accepted; links still
    /// allow other programs below and beside.
    pub fn attach(self, program: &mut Program, cgroup: impl AsFd) -> Result<FdLink> {
        let name = self.program();
        let error = |source| Error::Program { name, source };
        let link = match (self, program) {
            (CgroupHook::Egress | CgroupHook::Ingress, Program::CgroupSkb(skb)) => {
                let kind = if self == CgroupHook::Egress {
                    CgroupSkbAttachType::Egress
                } else {
                    CgroupSkbAttachType::Ingress
                };
                let id = skb
                    .attach(cgroup, kind, CgroupAttachMode::Single)
                    .map_err(error)?;
                FdLink::try_from(skb.take_link(id).map_err(error)?)
            }
            (CgroupHook::SockOps, Program::SockOps(ops)) => {
                let id = ops
                    .attach(cgroup, CgroupAttachMode::Single)
                    .map_err(error)?;
                FdLink::try_from(ops.take_link(id).map_err(error)?)
            }
            _ => return Err(Error::Missing(name)),
        };
        link.map_err(|e| Error::Pin(name.into(), crate::error::with_causes(&e)))
    }
}

/// (attach type, program id) of loaded cgroup programs, to check later
/// that they are still attached.
pub fn attached_ids<'a>(hooks: impl Iterator<Item = (CgroupHook, &'a Program)>) -> Vec<(u32, u32)> {
    hooks
        .filter_map(|(hook, program)| Some((hook.attach_type(), program.info().ok()?.id())))
        .collect()
}

/// Loads every program of the object with its type's attach point. The
/// verifier is most of a standalone run's start-up and verifies one
/// program per thread, so the programs are spread over the CPUs, the
/// heaviest first (each thread gets the next program while it has the
/// least work).
pub fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    let mut known: Vec<(&'static str, &mut Program)> = ebpf
        .programs_mut()
        .filter_map(|(name, program)| Some((known_program(name)?, program)))
        .collect();
    known.sort_by_key(|(name, _)| std::cmp::Reverse(verification_weight(name)));
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, 4);
    let mut shares: Vec<(u32, Vec<(&'static str, &mut Program)>)> =
        (0..threads).map(|_| (0, Vec::new())).collect();
    for (name, program) in known {
        let lightest = shares
            .iter_mut()
            .min_by_key(|(weight, _)| *weight)
            .expect("at least one thread");
        lightest.0 += verification_weight(name);
        lightest.1.push((name, program));
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = shares
            .into_iter()
            .map(|(_, share)| {
                scope.spawn(move || {
                    share
                        .into_iter()
                        .try_for_each(|(name, program)| load_one(name, program))
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|worker| worker.join().expect("a verifier thread panicked"))
    })
}

/// The name of a program guard loads with aya, as a `'static` name.
fn known_program(name: &str) -> Option<&'static str> {
    [
        PROGRAM_DNS_EGRESS,
        PROGRAM_DNS_INGRESS,
        PROGRAM_SOCK_OPS,
        PROGRAM_STREAM_SEND,
        PROGRAM_STREAM_PARSE,
        PROGRAM_STREAM_ANSWER,
    ]
    .into_iter()
    .chain(super::programs::tracepoints().map(|(name, _, _)| name))
    .find(|known| *known == name)
}

/// Roughly the verifier's work for a program, in thousands of processed
/// instructions (`GUARD_LOG=debug` prints the real counts).
fn verification_weight(name: &str) -> u32 {
    match name {
        PROGRAM_DNS_INGRESS => 20,
        PROGRAM_DNS_EGRESS | PROGRAM_STREAM_SEND => 15,
        PROGRAM_STREAM_ANSWER => 7,
        PROGRAM_ESCAPE_ATTACH | PROGRAM_ESCAPE_FORK => 7,
        PROGRAM_ESCAPE_CLONE3 => 5,
        _ => 2,
    }
}

fn load_one(name: &'static str, program: &mut Program) -> Result<()> {
    let t = std::time::Instant::now();
    let loaded = match program {
        Program::CgroupSkb(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::SkMsg(p) => p.load(),
        Program::SkSkb(p) => p.load(),
        Program::TracePoint(p) => p.load(),
        _ => return Ok(()),
    };
    loaded.map_err(|source| Error::Program { name, source })?;
    let instructions = program
        .info()
        .ok()
        .and_then(|i| i.verified_instruction_count());
    tracing::debug!(program = name, elapsed = ?t.elapsed(), ?instructions, "verified");
    Ok(())
}

/// Attaches the stream programs to the sockhash of DNS connections (a
/// prog_attach to the map: it lasts as long as the map). Returns the
/// attachments; dropping them detaches.
pub fn attach_streams(ebpf: &mut Ebpf) -> Result<Vec<Box<dyn std::any::Any>>> {
    let map = ebpf.map(SOCKETS).ok_or(Error::Missing(SOCKETS))?;
    let sockets: SockHash<_, u64> = SockHash::try_from(map).map_err(|source| Error::Map {
        name: SOCKETS,
        source,
    })?;
    let fd: SockMapFd = sockets
        .fd()
        .try_clone()
        .map_err(Error::io("duplicating the sockhash descriptor"))?;
    let mut attachments: Vec<Box<dyn std::any::Any>> = Vec::new();
    let send: &mut SkMsg = program(ebpf, PROGRAM_STREAM_SEND)?;
    let id = send.attach(&fd).map_err(|source| Error::Program {
        name: PROGRAM_STREAM_SEND,
        source,
    })?;
    attachments.push(Box::new(send.take_link(id).map_err(|source| {
        Error::Program {
            name: PROGRAM_STREAM_SEND,
            source,
        }
    })?));
    for name in [PROGRAM_STREAM_PARSE, PROGRAM_STREAM_ANSWER] {
        let skb: &mut SkSkb = program(ebpf, name)?;
        let id = skb
            .attach(&fd)
            .map_err(|source| Error::Program { name, source })?;
        attachments.push(Box::new(
            skb.take_link(id)
                .map_err(|source| Error::Program { name, source })?,
        ));
    }
    Ok(attachments)
}
