//! Ends the socket whose DNS query was blocked, so the client fails at once.
//!
//! TCP: dropping a segment only makes the sender retransmit for minutes; a
//! cgroup_skb program cannot reset the connection itself. UDP: the sender
//! gets EPERM from its send, but clients built on event loops (dig, libuv)
//! ignore send errors and wait for a reply until their timeout.
//!
//! Userspace asks the kernel to destroy the socket (sock_diag
//! `SOCK_DESTROY`): TCP clients see ECONNABORTED, UDP clients waiting for a
//! reply are woken with ECONNABORTED. The socket is named by its addresses
//! and the cookie the kernel program reported, so no other socket is hit.
//!
//! A socket lives in the network namespace it was made in, and sock_diag
//! only sees the namespace of the netlink socket that asks: the request is
//! made from the asking process's namespace (entered on a short-lived thread,
//! which leaves guard's own threads where they are).
//!
//! Hand-written rather than through a netlink crate: it is one fixed-size
//! request, and the netlink crates reviewed do not build SOCK_DESTROY.
use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt as _,
    },
};

use super::records::{DnsQuery, Transport};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const ALL_STATES: u32 = 0xfff;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagSockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    header: NlMsgHdr,
    body: InetDiagReqV2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// Ends the socket a reported query was sent on (or an answer arrived on),
/// in the network namespace of the process that asked.
pub fn end_socket_of(query: &DnsQuery) -> io::Result<()> {
    let protocol = match query.transport {
        Transport::Tcp => Protocol::Tcp,
        Transport::Udp => Protocol::Udp,
    };
    let destroy_here = || destroy(protocol, query.source, query.resolver, query.socket_cookie);
    let Some(namespace) = other_network_namespace(query.pid) else {
        return destroy_here();
    };
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                destroy_here()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("sock_diag thread panicked")))
    })
}

/// The network namespace of `pid` when it is not guard's own.
fn other_network_namespace(pid: u32) -> Option<File> {
    if pid == 0 {
        return None;
    }
    let theirs = File::open(format!("/proc/{pid}/ns/net")).ok()?;
    let ours = std::fs::metadata("/proc/self/ns/net").ok()?;
    let differs = theirs
        .metadata()
        .is_ok_and(|m| (m.dev(), m.ino()) != (ours.dev(), ours.ino()));
    differs.then_some(theirs)
}

/// Destroys the socket `source -> destination` with this cookie. An IPv4
/// packet may come from a dual-stack IPv6 socket (`::ffff:a.b.c.d`), so that
/// form is tried too.
pub fn destroy(
    protocol: Protocol,
    source: SocketAddr,
    destination: SocketAddr,
    cookie: u64,
) -> io::Result<()> {
    let socket = open()?;
    let first = request(&socket, protocol, source, destination, cookie, false);
    match (first, source.ip()) {
        (Ok(()), _) => Ok(()),
        (Err(_), IpAddr::V4(_)) => request(&socket, protocol, source, destination, cookie, true),
        (Err(e), _) => Err(e),
    }
}

fn open() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, owned descriptor.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: valid pointer and size for SO_RCVTIMEO.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    Ok(socket)
}

fn request(
    socket: &OwnedFd,
    protocol: Protocol,
    source: SocketAddr,
    destination: SocketAddr,
    cookie: u64,
    mapped: bool,
) -> io::Result<()> {
    let mut id = InetDiagSockId {
        sport: source.port().to_be_bytes(),
        dport: destination.port().to_be_bytes(),
        cookie: [cookie as u32, (cookie >> 32) as u32],
        ..Default::default()
    };
    let family = match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) if !mapped => {
            id.src[..4].copy_from_slice(&s.octets());
            id.dst[..4].copy_from_slice(&d.octets());
            libc::AF_INET
        }
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            id.src = s.to_ipv6_mapped().octets();
            id.dst = d.to_ipv6_mapped().octets();
            libc::AF_INET6
        }
        (s, d) => {
            id.src = to_v6(s);
            id.dst = to_v6(d);
            libc::AF_INET6
        }
    };
    let message = Request {
        header: NlMsgHdr {
            len: std::mem::size_of::<Request>() as u32,
            kind: SOCK_DESTROY,
            flags: NLM_F_REQUEST | NLM_F_ACK,
            seq: 1,
            pid: 0,
        },
        body: InetDiagReqV2 {
            family: family as u8,
            protocol: match protocol {
                Protocol::Tcp => libc::IPPROTO_TCP as u8,
                Protocol::Udp => libc::IPPROTO_UDP as u8,
            },
            states: ALL_STATES,
            id,
            ..Default::default()
        },
    };
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: message and address are valid for the given sizes.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            &message as *const Request as *const libc::c_void,
            std::mem::size_of::<Request>(),
            0,
            &kernel as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = [0u8; 512];
    // SAFETY: reply is a valid writable buffer.
    let received = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            reply.as_mut_ptr() as *mut libc::c_void,
            reply.len(),
            0,
        )
    };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    let header_len = std::mem::size_of::<NlMsgHdr>();
    if (received as usize) < header_len + 4 {
        return Err(io::Error::other("short sock_diag reply"));
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    if kind != NLMSG_ERROR {
        return Err(io::Error::other(format!(
            "unexpected sock_diag reply type {kind}"
        )));
    }
    let errno = i32::from_ne_bytes(
        reply[header_len..header_len + 4]
            .try_into()
            .expect("4 bytes"),
    );
    if errno == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-errno))
    }
}

fn to_v6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout_matches_the_kernel() {
        // struct nlmsghdr (16) + struct inet_diag_req_v2 (56).
        assert_eq!(std::mem::size_of::<Request>(), 72);
    }
}
