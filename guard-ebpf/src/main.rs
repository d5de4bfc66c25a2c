//! guard's kernel programs, one file per hook:
//!
//! - [`egress`] `dns_egress` (cgroup_skb/egress): reads every DNS query a
//!   guarded cgroup sends and drops those whose name a deny rule matches.
//! - [`ingress`] `dns_ingress` (cgroup_skb/ingress): reads every DNS answer
//!   a guarded cgroup receives and drops those that would have the client
//!   use a denied name (an alias, a service target, an owner).
//! - [`stream`] `dns_sock_ops`, `dns_stream_send`, `dns_stream_parse`,
//!   `dns_stream_answer` (sock_ops, sk_msg, sk_skb): DNS over TCP judged as
//!   whole messages, whatever the write pattern.
//! - [`process`] `exec_enter`, `exec_exit`, `process_fork` (tracepoints):
//!   record what runs in guarded cgroups, so every blocked query can be
//!   attributed to a process chain with arguments even when the processes
//!   have already exited.
//! - [`escape`] `escape_*` (tracepoints): tasks leaving their guarded
//!   cgroup, packet and raw sockets, `bpf()` calls that could change guard.
//! - [`unix`] `unix_connect`, `unix_sendmsg` (cgroup sock_addr, Unix
//!   sockets): connections to local resolver daemons refused.
//!
//! Shared by the hooks: [`packet`] (where a packet's parts are), [`wire`]
//! (reading and deciding a DNS question), [`verdict`] (counting, reporting,
//! passing or dropping), [`evidence`] (escape and tamper records), [`maps`]
//! (maps and globals).
//!
//! On a host build this crate is an empty binary, so `cargo clippy --workspace`
//! works; the real object is built for `bpfel-unknown-none` by guard-daemon's
//! build script.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod egress;
#[cfg(target_arch = "bpf")]
mod escape;
#[cfg(target_arch = "bpf")]
mod evidence;
#[cfg(target_arch = "bpf")]
mod ingress;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod process;
#[cfg(target_arch = "bpf")]
mod stream;
#[cfg(target_arch = "bpf")]
mod unix;
#[cfg(target_arch = "bpf")]
mod verdict;
#[cfg(target_arch = "bpf")]
mod wire;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never reached.
    unsafe { core::hint::unreachable_unchecked() }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
