//! Where the parts of a packet are, as a cgroup_skb program sees it (from
//! the IP header on): the fast classification every packet goes through,
//! and reads of packet bytes.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_get_socket_cookie, bpf_skb_cgroup_id},
    programs::SkBuffContext,
};
use guard_common::event::{DnsEvent, FAMILY_IPV4, FAMILY_IPV6, TRANSPORT_TCP, TRANSPORT_UDP};

use crate::maps::is_dns_port;

const ETH_P_IP_BE: u32 = 0x0800u16.to_be() as u32;
const ETH_P_IPV6_BE: u32 = 0x86DDu16.to_be() as u32;
pub const IPPROTO_TCP: u8 = 6;
pub const TCP_FLAG_URG: u8 = 0x20;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const IPPROTO_UDP: u8 = 17;
/// Marks a packet whose transport header could not be reached.
pub const OPAQUE: u8 = 0xff;
/// IPv6 extension headers skipped before giving up on finding UDP/TCP.
const MAX_IPV6_EXTENSIONS: u32 = 4;
/// Header fields at offsets below this are read directly from the packet.
const DIRECT_READ_LIMIT: u32 = 256;

/// Where the interesting parts of a DNS-bound packet are.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Packet {
    pub family: u8,
    pub transport: u8,
    pub l4_offset: u32,
}

/// Reads a `T` at `offset` from the packet: directly when it lies in the
/// linear head (always the case for locally built headers), through
/// `bpf_skb_load_bytes` otherwise.
#[inline(always)]
pub fn read<T: Copy>(ctx: &SkBuffContext, offset: u32) -> Option<T> {
    if offset < DIRECT_READ_LIMIT {
        let skb = ctx.skb.skb;
        let (data, data_end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
        let at = data + offset as usize;
        // One byte of slack (`<`, not `<=`): for a 1-byte read LLVM turns
        // `at + 1 <= end` into `at < end`, from which the verifier derives
        // no readable range. The last byte of a packet takes the slow path.
        if at + core::mem::size_of::<T>() < data_end {
            return Some(unsafe { (at as *const T).read_unaligned() });
        }
    }
    ctx.load::<T>(offset as usize).ok()
}

/// Reads through `bpf_skb_load_bytes` only. Used on the DNS slow path: a
/// helper's offset argument needs no precise tracking, so the verifier can
/// merge states that differ only in offsets (with direct packet access it
/// cannot, and the name walks blow up to hundreds of thousands of
/// instructions).
#[inline(always)]
pub fn load<T: Copy>(ctx: &SkBuffContext, offset: u32) -> Option<T> {
    ctx.load::<T>(offset as usize).ok()
}

/// Which port of a packet says it is DNS.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A query leaving: the destination port.
    Egress = 2,
    /// An answer arriving: the source port.
    Ingress = 0,
}

/// The fast path: `Some` only for UDP/TCP packets whose DNS-side port (see
/// [`Direction`]) is a DNS port.
#[inline(always)]
pub fn classify(ctx: &SkBuffContext, direction: Direction) -> Option<Packet> {
    let protocol = unsafe { (*ctx.skb.skb).protocol };
    let (family, transport, l4_offset) = if protocol == ETH_P_IP_BE {
        let version_ihl: u8 = read(ctx, 0)?;
        let flags_fragment: u16 = read(ctx, 6)?;
        // A non-first fragment carries no transport header. The question is
        // always in the first fragment, which is inspected.
        if u16::from_be(flags_fragment) & 0x1fff != 0 {
            return None;
        }
        let transport: u8 = read(ctx, 9)?;
        (FAMILY_IPV4, transport, ((version_ihl & 0x0f) as u32) * 4)
    } else if protocol == ETH_P_IPV6_BE {
        let (transport, offset) = skip_ipv6_extensions(ctx)?;
        (FAMILY_IPV6, transport, offset)
    } else {
        return None;
    };
    if transport != IPPROTO_UDP && transport != IPPROTO_TCP {
        if family == FAMILY_IPV6 && is_ipv6_extension(transport) {
            // More extension headers than we follow: the transport header,
            // and so whether this is DNS, cannot be seen. Fail closed.
            return Some(Packet {
                family,
                transport: OPAQUE,
                l4_offset,
            });
        }
        return None;
    }
    let port: u16 = read(ctx, l4_offset + direction as u32)?;
    if !is_dns_port(port) {
        return None;
    }
    Some(Packet {
        family,
        transport,
        l4_offset,
    })
}

#[inline(always)]
fn is_ipv6_extension(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 60)
}

/// Follows hop-by-hop, routing, destination-options and fragment headers, so
/// an extension header cannot hide a query.
#[inline(always)]
fn skip_ipv6_extensions(ctx: &SkBuffContext) -> Option<(u8, u32)> {
    let mut next: u8 = read(ctx, 6)?;
    let mut offset: u32 = 40;
    let mut i = 0;
    while i < MAX_IPV6_EXTENSIONS {
        match next {
            0 | 43 | 60 => {
                let header: [u8; 2] = read(ctx, offset)?;
                next = header[0];
                offset += (header[1] as u32 + 1) * 8;
            }
            44 => {
                let header: [u8; 4] = read(ctx, offset)?;
                if u16::from_be_bytes([header[2], header[3]]) & 0xfff8 != 0 {
                    return None;
                }
                next = header[0];
                offset += 8;
            }
            _ => break,
        }
        i += 1;
    }
    Some((next, offset))
}

/// Fills the transport fields of a record from the packet. `direction`
/// says which end is the asker's: the source of a query, the destination of
/// an answer.
#[inline(always)]
pub fn describe(ctx: &SkBuffContext, packet: &Packet, direction: Direction, event: &mut DnsEvent) {
    let skb = ctx.skb.skb;
    event.transport = if packet.transport == IPPROTO_TCP {
        TRANSPORT_TCP
    } else {
        TRANSPORT_UDP
    };
    event.family = packet.family;
    event.cgroup_id = unsafe { bpf_skb_cgroup_id(skb) };
    event.socket_cookie = unsafe { bpf_get_socket_cookie(skb as *mut c_void) };
    let ports: [u8; 4] = load(ctx, packet.l4_offset).unwrap_or([0; 4]);
    let (source, destination) = (
        u16::from_be_bytes([ports[0], ports[1]]),
        u16::from_be_bytes([ports[2], ports[3]]),
    );
    let (mut src, mut dst) = ([0u8; 16], [0u8; 16]);
    if packet.family == FAMILY_IPV4 {
        let addresses: [u8; 8] = load(ctx, 12).unwrap_or([0; 8]);
        src[..4].copy_from_slice(&addresses[..4]);
        dst[..4].copy_from_slice(&addresses[4..]);
    } else {
        src = load(ctx, 8).unwrap_or([0; 16]);
        dst = load(ctx, 24).unwrap_or([0; 16]);
    }
    if direction == Direction::Egress {
        (event.src_port, event.dst_port) = (source, destination);
        (event.src_addr, event.dst_addr) = (src, dst);
    } else {
        (event.src_port, event.dst_port) = (destination, source);
        (event.src_addr, event.dst_addr) = (dst, src);
    }
}
