//! Decoding the kernel's ring-buffer records into owned Rust values.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use guard_common::event::{
    DnsEvent, EventKind, EvidenceEvent, ExecEvent, ExecResultEvent, ForkEvent, Verdict,
    FAMILY_IPV4, TRANSPORT_TCP,
};
use hickory_proto::rr::RecordType;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Tcp,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        })
    }
}

/// A DNS query the kernel reported (blocked, audited or unreadable).
#[derive(Clone, Debug)]
pub struct DnsQuery {
    pub verdict: Verdict,
    /// Dotted, lower case, no trailing dot; `""` for the root or when the
    /// question was unreadable. Bytes outside printable ASCII are escaped.
    pub name: String,
    pub qtype: u16,
    pub transport: Transport,
    pub source: SocketAddr,
    pub resolver: SocketAddr,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub rule_id: Option<u32>,
    pub policy_id: u32,
    pub cgroup_id: u64,
    pub socket_cookie: u64,
    pub tcp_seq: u32,
    pub boot_ns: u64,
}

impl DnsQuery {
    pub fn qtype_name(&self) -> String {
        if self.qtype == 0 {
            return "?".into();
        }
        RecordType::from(self.qtype).to_string()
    }
}

#[derive(Clone, Debug)]
pub enum Record {
    Dns(DnsQuery),
    Exec {
        pid: u32,
        tid: u32,
        path: String,
        args: Vec<String>,
        truncated: bool,
    },
    ExecResult {
        pid: u32,
        tid: u32,
        ret: i32,
    },
    Fork {
        parent: u32,
        child: u32,
        comm: String,
    },
    Evidence(super::evidence::Evidence),
}

/// Reads a `#[repr(C)]` record out of ring-buffer bytes.
fn read_record<T: Copy>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= std::mem::size_of::<T>())
        // SAFETY: length checked; T is a plain repr(C) struct of integers and
        // byte arrays, valid for any bit pattern.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const T) })
}

/// The policy id a raw record belongs to, without decoding the rest: how
/// the daemon routes records to the run or binding that caused them.
pub fn policy_of(bytes: &[u8]) -> Option<u32> {
    match *bytes.first()? {
        k if k == EventKind::Dns as u8 => read_record::<DnsEvent>(bytes).map(|e| e.policy_id),
        k if k == EventKind::Exec as u8 => read_record::<ExecEvent>(bytes).map(|e| e.policy_id),
        k if k == EventKind::ExecResult as u8 => {
            read_record::<ExecResultEvent>(bytes).map(|e| e.policy_id)
        }
        k if k == EventKind::Fork as u8 => read_record::<ForkEvent>(bytes).map(|e| e.policy_id),
        k if k == EventKind::Evidence as u8 => {
            read_record::<EvidenceEvent>(bytes).map(|e| e.policy_id)
        }
        _ => None,
    }
}

pub fn decode(bytes: &[u8]) -> Option<Record> {
    match *bytes.first()? {
        k if k == EventKind::Dns as u8 => read_record::<DnsEvent>(bytes)
            .and_then(|e| decode_dns(&e))
            .map(Record::Dns),
        k if k == EventKind::Exec as u8 => read_record::<ExecEvent>(bytes).map(|e| {
            let used = (e.args_len as usize).min(e.args.len());
            let args = e.args[..used]
                .split(|b| *b == 0)
                .take(e.argc as usize)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Record::Exec {
                pid: e.pid,
                tid: e.tid,
                path: c_string(&e.path),
                args,
                truncated: e.args_truncated != 0,
            }
        }),
        k if k == EventKind::ExecResult as u8 => {
            read_record::<ExecResultEvent>(bytes).map(|e| Record::ExecResult {
                pid: e.pid,
                tid: e.tid,
                ret: e.ret,
            })
        }
        k if k == EventKind::Fork as u8 => read_record::<ForkEvent>(bytes).map(|e| Record::Fork {
            parent: e.parent_pid,
            child: e.child_pid,
            comm: c_string(&e.comm),
        }),
        k if k == EventKind::Evidence as u8 => read_record::<EvidenceEvent>(bytes)
            .and_then(|e| super::evidence::Evidence::decode(&e))
            .map(Record::Evidence),
        _ => None,
    }
}

fn decode_dns(e: &DnsEvent) -> Option<DnsQuery> {
    let verdict = Verdict::from_u8(e.verdict)?;
    let len = (e.qname_len as usize).min(e.qname.len());
    // Byte 0 is the dot that replaced the first length byte.
    // DNS names are case-insensitive and the kernel leaves case as sent
    // (resolvers randomise it): report lower case.
    let name = if len > 1 {
        escape_name(&e.qname[1..len].to_ascii_lowercase())
    } else {
        String::new()
    };
    let address = |raw: &[u8; 16], port: u16| {
        let ip = if e.family == FAMILY_IPV4 {
            IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(*raw))
        };
        SocketAddr::new(ip, port)
    };
    Some(DnsQuery {
        verdict,
        name,
        qtype: e.qtype,
        transport: if e.transport == TRANSPORT_TCP {
            Transport::Tcp
        } else {
            Transport::Udp
        },
        source: address(&e.src_addr, e.src_port),
        resolver: address(&e.dst_addr, e.dst_port),
        pid: e.pid,
        tid: e.tid,
        comm: c_string(&e.comm),
        rule_id: (e.rule_id != u32::MAX).then_some(e.rule_id),
        policy_id: e.policy_id,
        cgroup_id: e.cgroup_id,
        socket_cookie: e.socket_cookie,
        tcp_seq: e.tcp_seq,
        boot_ns: e.boot_ns,
    })
}

pub(super) fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Names are bytes on the wire; keep them printable and unambiguous.
pub fn escape_name(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_graphic() && b != b'\\' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use guard_common::event::{NAME_CAP, TRANSPORT_UDP};

    fn as_bytes<T>(value: &T) -> &[u8] {
        // SAFETY: reading the bytes of a repr(C) value for a test.
        unsafe {
            std::slice::from_raw_parts(value as *const T as *const u8, std::mem::size_of::<T>())
        }
    }

    #[test]
    fn decodes_a_dns_record() {
        let mut qname = [0u8; NAME_CAP];
        qname[..19].copy_from_slice(b".FrontEnd.internal\0");
        let event = DnsEvent {
            kind: EventKind::Dns as u8,
            verdict: Verdict::Blocked as u8,
            transport: TRANSPORT_UDP,
            family: FAMILY_IPV4,
            qtype: 28,
            qname_len: 18,
            rule_id: 3,
            policy_id: 0,
            pid: 10,
            tid: 11,
            src_port: 5353,
            dst_port: 53,
            tcp_seq: 0,
            cgroup_id: 7,
            socket_cookie: 9,
            boot_ns: 1,
            src_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst_addr: [127, 0, 0, 53, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            qname,
        };
        let Some(Record::Dns(q)) = decode(as_bytes(&event)) else {
            panic!("not decoded")
        };
        assert_eq!(q.name, "frontend.internal");
        assert_eq!(q.qtype_name(), "AAAA");
        assert_eq!(q.resolver, "127.0.0.53:53".parse().unwrap());
        assert_eq!(q.comm, "curl");
        assert_eq!(q.rule_id, Some(3));
        assert!(
            decode(&as_bytes(&event)[..100]).is_none(),
            "short records are refused"
        );
    }

    #[test]
    fn escapes_unprintable_name_bytes() {
        assert_eq!(escape_name(b"a b.\x00x\\"), "a\\x20b.\\x00x\\x5c");
    }
}
