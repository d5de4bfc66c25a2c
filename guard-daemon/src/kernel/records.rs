//! Decoding the kernel's ring-buffer records into owned Rust values.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use guard_common::{
    event::{
        DnsEvent, EventKind, EvidenceEvent, ExecEvent, ExecResultEvent, ForkEvent, Unreadable,
        Verdict, DIRECTION_ANSWER, FAMILY_IPV4, SECTION_ADDITIONAL, SECTION_ANSWER,
        SECTION_AUTHORITY, TRANSPORT_TCP,
    },
    matching::wire_labels,
};
use hickory_proto::{
    op::Message,
    rr::{Name, RData, RecordType},
    serialize::binary::BinDecodable,
};
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

/// Which way the reported message went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// A query the cgroup sent: its question was decided.
    Query,
    /// An answer the cgroup received: the names it would have the client
    /// use were decided.
    Answer,
}

/// A name found in a refused answer, and the record that carried it.
#[derive(Clone, Debug)]
pub struct MatchedName {
    pub labels: Vec<Vec<u8>>,
    pub name: String,
    /// The record's type (CNAME, SRV, A for an owner, ...).
    pub record_type: String,
    /// "answer" or "additional".
    pub section: &'static str,
}

/// A DNS message the kernel reported (blocked, audited, unreadable, or in
/// record mode a first sighting).
#[derive(Clone, Debug)]
pub struct DnsQuery {
    pub verdict: Verdict,
    pub direction: Direction,
    /// Why the message was unreadable, when it was.
    pub reason: Option<Unreadable>,
    /// The question's labels, as sent (letter case untouched).
    pub labels: Vec<Vec<u8>>,
    /// The question for people: lower case, no trailing dot, labels joined
    /// with `.` ([`display_name`]); `""` for the root or when unreadable.
    pub name: String,
    pub qtype: u16,
    /// Answers: the refused name found in it.
    pub matched: Option<MatchedName>,
    /// Answers: the names from the question to the refused one, following
    /// the answer's aliases (`db-lb.internal → frontend.internal`).
    pub alias_chain: Vec<String>,
    pub transport: Transport,
    /// The asker's address, and the resolver's.
    pub source: SocketAddr,
    pub resolver: SocketAddr,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub rule_id: Option<u32>,
    pub policy_id: u32,
    pub cgroup_id: u64,
    pub socket_cookie: u64,
    pub boot_ns: u64,
}

/// A record type's mnemonic; types hickory does not name are written as
/// RFC 3597 has them (`TYPE65280`), but DNAME, which guard follows.
pub fn record_type_name(code: u16) -> String {
    match RecordType::from(code) {
        RecordType::Unknown(39) => "DNAME".into(),
        RecordType::Unknown(other) => format!("TYPE{other}"),
        known => known.to_string(),
    }
}

impl DnsQuery {
    pub fn qtype_name(&self) -> String {
        if self.qtype == 0 {
            return "?".into();
        }
        record_type_name(self.qtype)
    }

    /// The labels the deciding rule matched: the refused name of an answer,
    /// else the question.
    pub fn decided_labels(&self) -> &[Vec<u8>] {
        match &self.matched {
            Some(matched) => &matched.labels,
            None => &self.labels,
        }
    }
}

/// Words for an unreadable reason.
pub fn reason_text(reason: Unreadable) -> &'static str {
    match reason {
        Unreadable::None => "unreadable",
        Unreadable::Truncated => "truncated message",
        Unreadable::QuestionCount => "not exactly one question",
        Unreadable::CompressedQuestion => "compression pointer in the question",
        Unreadable::BadLabel => "reserved label type",
        Unreadable::NameTooLong => "name over 255 bytes",
        Unreadable::BadPointer => "compression pointer that does not point back",
        Unreadable::TooManyRecords => "more records than the kernel reads",
        Unreadable::ExtensionHeaders => "more IPv6 extension headers than the kernel follows",
        Unreadable::UrgentData => "TCP urgent data on a DNS connection",
        Unreadable::UnfollowedStream => "TCP data the stream inspection does not follow",
        Unreadable::TooManySegments => "UDP GSO send with too many datagrams",
        Unreadable::Busy => "kernel working memory busy",
    }
}

#[derive(Clone, Debug)]
pub enum Record {
    Dns(Box<DnsQuery>),
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
            .map(|query| Record::Dns(Box::new(query))),
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

/// The labels of a wire-format name the kernel reported (`len` bytes of
/// `wire`); empty when there is none or it does not read.
fn labels_of(wire: &[u8], len: u16) -> Vec<Vec<u8>> {
    let used = (len as usize).min(wire.len());
    wire_labels(&wire[..used])
        .map(|labels| labels.map(<[u8]>::to_vec).collect())
        .unwrap_or_default()
}

fn decode_dns(e: &DnsEvent) -> Option<DnsQuery> {
    let verdict = Verdict::from_u8(e.verdict)?;
    let labels = labels_of(&e.qname, e.qname_len);
    let name = display_name(&labels);
    let address = |raw: &[u8; 16], port: u16| {
        let ip = if e.family == FAMILY_IPV4 {
            IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
        } else {
            let v6 = Ipv6Addr::from(*raw);
            // A dual-stack socket's IPv4 peer.
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        };
        SocketAddr::new(ip, port)
    };
    let direction = if e.direction == DIRECTION_ANSWER {
        Direction::Answer
    } else {
        Direction::Query
    };
    let matched = (direction == Direction::Answer && e.matched_len > 0).then(|| {
        let labels = labels_of(&e.matched, e.matched_len);
        MatchedName {
            name: display_name(&labels),
            labels,
            record_type: record_type_name(e.matched_type),
            section: match e.matched_section {
                SECTION_ANSWER => "answer",
                SECTION_AUTHORITY => "authority",
                SECTION_ADDITIONAL => "additional",
                _ => "question",
            },
        }
    });
    let message = &e.message[..(e.message_len as usize).min(e.message.len())];
    let alias_chain = match &matched {
        Some(matched) => alias_chain(message, &name, &matched.name),
        None => Vec::new(),
    };
    Some(DnsQuery {
        verdict,
        direction,
        reason: (e.reason != 0).then(|| Unreadable::from_u8(e.reason)),
        labels,
        name,
        qtype: e.qtype,
        matched,
        alias_chain,
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
        boot_ns: e.boot_ns,
    })
}

/// The names from the question to the refused one: the question, then each
/// alias (CNAME, DNAME) the answer follows from it, then the refused name
/// (an SRV/MX/SVCB target, an additional owner). Read from the first bytes
/// of the answer the kernel kept; when they do not parse, question and
/// refused name alone.
fn alias_chain(message: &[u8], question: &str, matched: &str) -> Vec<String> {
    let mut chain = vec![question.to_owned()];
    if let Ok(message) = Message::from_bytes(message) {
        let mut current = question.to_owned();
        for _ in 0..message.answers().len() {
            let next = message.answers().iter().find_map(|record| {
                let owner = name_text(record.name());
                let target = match record.data() {
                    RData::CNAME(cname) => name_text(&cname.0),
                    RData::ANAME(aname) => name_text(&aname.0),
                    _ => return None,
                };
                (owner == current && !chain.contains(&target)).then_some(target)
            });
            match next {
                Some(next) => {
                    chain.push(next.clone());
                    current = next;
                }
                None => break,
            }
        }
    }
    if chain.last().map(String::as_str) != Some(matched) {
        chain.push(matched.to_owned());
    }
    chain
}

fn name_text(name: &Name) -> String {
    let labels: Vec<Vec<u8>> = name.iter().map(<[u8]>::to_vec).collect();
    display_name(&labels)
}

pub(super) fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// A name for people and reports: labels in lower case, joined with `.`.
/// Bytes that are not printable ASCII are written `\xNN`; a `.` or `\`
/// inside a label is escaped with `\`, so a label holding a dot never reads
/// as two labels. [`parse_display_name`] reverses it.
pub fn display_name(labels: &[Vec<u8>]) -> String {
    let mut out = String::new();
    for (i, label) in labels.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        for &b in label {
            let b = b.to_ascii_lowercase();
            match b {
                b'.' => out.push_str("\\."),
                b'\\' => out.push_str("\\\\"),
                b if b.is_ascii_graphic() => out.push(b as char),
                b => out.push_str(&format!("\\x{b:02x}")),
            }
        }
    }
    out
}

/// The labels of a name written by [`display_name`] (None if it is not one).
pub fn parse_display_name(text: &str) -> Option<Vec<Vec<u8>>> {
    if text.is_empty() {
        return Some(Vec::new());
    }
    let mut labels = vec![Vec::new()];
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '.' => labels.push(Vec::new()),
            '\\' => match chars.next()? {
                'x' => {
                    let hex: String = chars.by_ref().take(2).collect();
                    labels.last_mut()?.push(u8::from_str_radix(&hex, 16).ok()?);
                }
                escaped => labels.last_mut()?.push(u8::try_from(escaped).ok()?),
            },
            c => labels.last_mut()?.push(u8::try_from(c).ok()?),
        }
    }
    Some(labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use guard_common::event::{MESSAGE_CAP, NAME_CAP, TRANSPORT_UDP};

    fn as_bytes<T>(value: &T) -> &[u8] {
        // SAFETY: reading the bytes of a repr(C) value for a test.
        unsafe {
            std::slice::from_raw_parts(value as *const T as *const u8, std::mem::size_of::<T>())
        }
    }

    fn event(qname: &[u8]) -> DnsEvent {
        let mut name = [0u8; NAME_CAP];
        name[..qname.len()].copy_from_slice(qname);
        DnsEvent {
            kind: EventKind::Dns as u8,
            verdict: Verdict::Blocked as u8,
            transport: TRANSPORT_UDP,
            family: FAMILY_IPV4,
            direction: 1,
            reason: 0,
            qtype: 28,
            rule_id: 3,
            policy_id: 0,
            pid: 10,
            tid: 11,
            src_port: 5353,
            dst_port: 53,
            matched_type: 0,
            matched_section: 0,
            _pad: 0,
            cgroup_id: 7,
            socket_cookie: 9,
            boot_ns: 1,
            src_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst_addr: [127, 0, 0, 53, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            qname_len: qname.len() as u16,
            matched_len: 0,
            message_len: 0,
            _pad2: 0,
            qname: name,
            matched: [0; NAME_CAP],
            message: [0; MESSAGE_CAP],
        }
    }

    #[test]
    fn decodes_a_dns_record() {
        let event = event(b"\x08FrontEnd\x08internal\x00");
        let Some(Record::Dns(q)) = decode(as_bytes(&event)) else {
            panic!("not decoded")
        };
        assert_eq!(q.name, "frontend.internal");
        assert_eq!(q.labels, [b"FrontEnd".to_vec(), b"internal".to_vec()]);
        assert_eq!(q.qtype_name(), "AAAA");
        assert_eq!(record_type_name(39), "DNAME");
        assert_eq!(record_type_name(65280), "TYPE65280");
        assert_eq!(record_type_name(5), "CNAME");
        assert_eq!(q.resolver, "127.0.0.53:53".parse().unwrap());
        assert_eq!(q.comm, "curl");
        assert_eq!(q.rule_id, Some(3));
        assert_eq!(q.direction, Direction::Query);
        assert!(
            decode(&as_bytes(&event)[..100]).is_none(),
            "short records are refused"
        );
    }

    #[test]
    fn a_dot_inside_a_label_stays_distinct_and_round_trips() {
        let event = event(b"\x03a.b\x08frontend\x08internal\x00");
        let Some(Record::Dns(q)) = decode(as_bytes(&event)) else {
            panic!("not decoded")
        };
        assert_eq!(q.name, "a\\.b.frontend.internal");
        assert_eq!(parse_display_name(&q.name).unwrap(), q.labels);
    }

    #[test]
    fn escapes_unprintable_label_bytes() {
        let labels = vec![b"a b".to_vec(), b"\x00x\\".to_vec()];
        let shown = display_name(&labels);
        assert_eq!(shown, "a\\x20b.\\x00x\\\\");
        assert_eq!(parse_display_name(&shown).unwrap(), labels);
    }

    #[test]
    fn alias_chain_follows_cnames_to_the_refused_name() {
        use hickory_proto::{
            op::{Message, MessageType, Query},
            rr::{rdata::CNAME, RData, Record},
            serialize::binary::BinEncodable,
        };
        let mut message = Message::new();
        message.set_message_type(MessageType::Response);
        let q = Name::from_ascii("db-lb.internal.").unwrap();
        let mid = Name::from_ascii("lb.internal.").unwrap();
        let end = Name::from_ascii("frontend.internal.").unwrap();
        message.add_query(Query::query(q.clone(), RecordType::A));
        message.add_answer(Record::from_rdata(q, 60, RData::CNAME(CNAME(mid.clone()))));
        message.add_answer(Record::from_rdata(mid, 60, RData::CNAME(CNAME(end))));
        let bytes = message.to_bytes().unwrap();
        assert_eq!(
            alias_chain(&bytes, "db-lb.internal", "frontend.internal"),
            ["db-lb.internal", "lb.internal", "frontend.internal"]
        );
        assert_eq!(
            alias_chain(&bytes[..20], "db-lb.internal", "frontend.internal"),
            ["db-lb.internal", "frontend.internal"],
            "a cut message gives question and refused name"
        );
    }
}
