//! Test support shared by guard's integration tests, the demo and the
//! benchmarks: a small authoritative-for-everything DNS server that answers
//! over UDP and TCP and records every query it receives.
//!
//! Every name resolves: A to 192.0.2.1, AAAA to 2001:db8::1 (documentation
//! ranges, never routed). Recording what arrived lets a test prove that a
//! blocked query never left the host, not only that the client failed.
//!
//! A few names answer with records that lead elsewhere, for the tests of
//! answers ([`ALIASES`]): aliases (CNAME, DNAME), service records (SRV, MX,
//! HTTPS, SVCB) and additional records, most of them leading to
//! `frontend.internal`.
pub mod postgres;

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{rdata, Name, RData, Record, RecordType},
    serialize::binary::{BinDecodable, BinEncodable},
};

pub const ANSWER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const ANSWER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenQuery {
    /// Lower case, no trailing dot.
    pub name: String,
    pub qtype: RecordType,
    pub tcp: bool,
}

pub struct DnsServer {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    /// `None` for a server that records nothing (benchmarks).
    seen: Option<Arc<Mutex<Vec<SeenQuery>>>>,
    threads: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// Serves UDP and TCP on `address` (port 0 picks a free port, the same
    /// for both), recording every query.
    pub fn start(address: SocketAddr) -> io::Result<DnsServer> {
        DnsServer::spawn(address, true)
    }

    /// As [`DnsServer::start`], recording nothing: for load tests.
    pub fn start_quiet(address: SocketAddr) -> io::Result<DnsServer> {
        DnsServer::spawn(address, false)
    }

    fn spawn(address: SocketAddr, record: bool) -> io::Result<DnsServer> {
        let udp = UdpSocket::bind(address)?;
        let address = udp.local_addr()?;
        let tcp = TcpListener::bind(address)?;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        tcp.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = record.then(|| Arc::new(Mutex::new(Vec::new())));
        let mut threads = Vec::new();
        {
            let (stop, seen) = (stop.clone(), seen.clone());
            threads.push(thread::spawn(move || serve_udp(udp, &stop, &seen)));
        }
        {
            let (stop, seen) = (stop.clone(), seen.clone());
            threads.push(thread::spawn(move || serve_tcp(tcp, &stop, &seen)));
        }
        Ok(DnsServer {
            address,
            stop,
            seen,
            threads,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn seen(&self) -> Vec<SeenQuery> {
        self.seen
            .as_ref()
            .map(|s| s.lock().expect("lock").clone())
            .unwrap_or_default()
    }

    /// Did a query for `name` (any type, any transport) arrive?
    pub fn saw(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.seen().iter().any(|q| q.name == name)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

type Log = Option<Arc<Mutex<Vec<SeenQuery>>>>;

fn serve_udp(socket: UdpSocket, stop: &AtomicBool, seen: &Log) {
    let mut buffer = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        let Ok((len, peer)) = socket.recv_from(&mut buffer) else {
            continue;
        };
        if let Some(reply) = answer(&buffer[..len], false, seen) {
            let _ = socket.send_to(&reply, peer);
        }
    }
}

fn serve_tcp(listener: TcpListener, stop: &AtomicBool, seen: &Log) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = serve_connection(stream, seen);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5))
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Answers every whole query it has read in one write, so pipelined
/// queries get answers that share segments (as busy servers' do).
fn serve_connection(mut stream: TcpStream, seen: &Log) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut pending: Vec<u8> = Vec::new();
    let mut buffer = [0u8; 65536];
    loop {
        let read = match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return Ok(()),
            Ok(n) => n,
        };
        pending.extend_from_slice(&buffer[..read]);
        let mut replies = Vec::new();
        while pending.len() >= 2 {
            let len = u16::from_be_bytes([pending[0], pending[1]]) as usize;
            if pending.len() < 2 + len {
                break;
            }
            let message: Vec<u8> = pending.drain(..2 + len).skip(2).collect();
            if let Some(reply) = answer(&message, true, seen) {
                let split = asks_for_split_answer(&message);
                replies.extend_from_slice(&(reply.len() as u16).to_be_bytes());
                replies.extend_from_slice(&reply);
                if split {
                    // The length alone, then the answer in two halves, each
                    // its own segment: the reader must put them together.
                    stream.set_nodelay(true)?;
                    let cut = replies.len() - reply.len();
                    let half = cut + reply.len() / 2;
                    for piece in [&replies[..cut], &replies[cut..half], &replies[half..]] {
                        stream.write_all(piece)?;
                        thread::sleep(Duration::from_millis(20));
                    }
                    replies.clear();
                }
            }
        }
        if !replies.is_empty() {
            stream.write_all(&replies)?;
        }
    }
}

fn answer(query: &[u8], tcp: bool, seen: &Log) -> Option<Vec<u8>> {
    let query = Message::from_bytes(query).ok()?;
    let mut reply = Message::new();
    reply
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true)
        .set_response_code(ResponseCode::NoError);
    for question in query.queries() {
        if let Some(seen) = seen {
            let name = question
                .name()
                .to_ascii()
                .trim_end_matches('.')
                .to_ascii_lowercase();
            seen.lock().expect("lock").push(SeenQuery {
                name,
                qtype: question.query_type(),
                tcp,
            });
        }
        reply.add_query(question.clone());
        let name = question.name().to_ascii().to_ascii_lowercase();
        if name.starts_with("loop-answer") {
            return Some(looping_answer(reply));
        }
        if let Some(alias) = ALIASES.iter().find(|a| a.name == name) {
            answer_alias(&mut reply, question.name(), question.query_type(), alias);
            continue;
        }
        if let Some(data) = address(question.query_type()) {
            reply.add_answer(Record::from_rdata(question.name().clone(), 60, data));
        }
    }
    reply.to_bytes().ok()
}

/// An answer no reader can follow: one A record whose owner name is a
/// compression pointer to itself (asked for by names starting
/// `loop-answer`).
fn looping_answer(reply: Message) -> Vec<u8> {
    let mut bytes = reply.to_bytes().expect("encodable");
    // One answer, after the question.
    bytes[6..8].copy_from_slice(&1u16.to_be_bytes());
    let at = bytes.len() as u16;
    bytes.extend_from_slice(&(0xc000 | at).to_be_bytes());
    bytes.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    bytes.extend_from_slice(&ANSWER_V4.octets());
    bytes
}

/// Names starting `split-answer` are answered over TCP in pieces.
fn asks_for_split_answer(query: &[u8]) -> bool {
    Message::from_bytes(query).is_ok_and(|m| {
        m.queries()
            .iter()
            .any(|q| q.name().to_ascii().starts_with("split-answer"))
    })
}

fn address(qtype: RecordType) -> Option<RData> {
    match qtype {
        RecordType::A => Some(RData::A(rdata::A(ANSWER_V4))),
        RecordType::AAAA => Some(RData::AAAA(rdata::AAAA(ANSWER_V6))),
        _ => None,
    }
}

/// A name that answers with a record leading to another name.
pub struct Alias {
    /// Fully qualified, lower case.
    pub name: &'static str,
    pub kind: AliasKind,
    pub target: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AliasKind {
    /// A CNAME to the target, then the target's address.
    Cname,
    /// A DNAME of the name's parent to the target zone, then the CNAME it
    /// synthesises (the name's first label under the target), then that
    /// name's address.
    Dname,
    Srv,
    Mx,
    Https,
    Svcb,
    /// The name's address, with an additional address record owned by the
    /// target.
    Additional,
}

/// The names of the test zone that lead elsewhere. `*.legacy.internal` is
/// renamed to `*.frontend.internal` by a DNAME. (Over TCP, names starting
/// `split-answer` are answered in pieces; names starting `loop-answer` get
/// an answer whose record name points at itself.)
pub const ALIASES: &[Alias] = &[
    Alias {
        name: "db-lb.internal.",
        kind: AliasKind::Cname,
        target: "frontend.internal.",
    },
    Alias {
        name: "chain.internal.",
        kind: AliasKind::Cname,
        target: "hop.internal.",
    },
    Alias {
        name: "hop.internal.",
        kind: AliasKind::Cname,
        target: "api.frontend.internal.",
    },
    Alias {
        name: "ok-alias.internal.",
        kind: AliasKind::Cname,
        target: "db.internal.",
    },
    Alias {
        name: "x.legacy.internal.",
        kind: AliasKind::Dname,
        target: "frontend.internal.",
    },
    Alias {
        name: "_db._tcp.internal.",
        kind: AliasKind::Srv,
        target: "frontend.internal.",
    },
    Alias {
        name: "_ok._tcp.internal.",
        kind: AliasKind::Srv,
        target: "db.internal.",
    },
    Alias {
        name: "mail.internal.",
        kind: AliasKind::Mx,
        target: "frontend.internal.",
    },
    Alias {
        name: "web.internal.",
        kind: AliasKind::Https,
        target: "frontend.internal.",
    },
    Alias {
        name: "svc.internal.",
        kind: AliasKind::Svcb,
        target: "frontend.internal.",
    },
    Alias {
        name: "split-answer-alias.internal.",
        kind: AliasKind::Cname,
        target: "frontend.internal.",
    },
    Alias {
        name: "glue.internal.",
        kind: AliasKind::Additional,
        target: "frontend.internal.",
    },
];

fn answer_alias(reply: &mut Message, owner: &Name, qtype: RecordType, alias: &Alias) {
    let target = Name::from_ascii(alias.target).expect("valid target");
    let record = |owner: &Name, data: RData| Record::from_rdata(owner.clone(), 60, data);
    match alias.kind {
        AliasKind::Cname => {
            reply.add_answer(record(owner, RData::CNAME(rdata::CNAME(target.clone()))));
            // Follow the chain as a resolver would.
            let mut current = target;
            let mut hops = 0;
            while let Some(next) = ALIASES.iter().find(|a| {
                a.kind == AliasKind::Cname && a.name == current.to_ascii().to_ascii_lowercase()
            }) {
                let next_target = Name::from_ascii(next.target).expect("valid target");
                reply.add_answer(record(
                    &current,
                    RData::CNAME(rdata::CNAME(next_target.clone())),
                ));
                current = next_target;
                hops += 1;
                if hops > 8 {
                    break;
                }
            }
            if let Some(data) = address(qtype) {
                reply.add_answer(record(&current, data));
            }
        }
        AliasKind::Dname => {
            let parent = owner.base_name();
            let first = owner.iter().next().expect("a label");
            let synthesised = Name::from_labels([first])
                .expect("label")
                .append_domain(&target)
                .expect("name");
            let mut wire = Vec::new();
            {
                let mut encoder = hickory_proto::serialize::binary::BinEncoder::new(&mut wire);
                target
                    .emit_as_canonical(&mut encoder, true)
                    .expect("encodable");
            }
            reply.add_answer(record(
                &parent,
                RData::Unknown {
                    code: RecordType::Unknown(39),
                    rdata: rdata::NULL::with(wire),
                },
            ));
            reply.add_answer(record(
                owner,
                RData::CNAME(rdata::CNAME(synthesised.clone())),
            ));
            if let Some(data) = address(qtype) {
                reply.add_answer(record(&synthesised, data));
            }
        }
        AliasKind::Srv => {
            reply.add_answer(record(
                owner,
                RData::SRV(rdata::SRV::new(0, 0, 5432, target.clone())),
            ));
            reply.add_additional(record(&target, RData::A(rdata::A(ANSWER_V4))));
        }
        AliasKind::Mx => {
            reply.add_answer(record(owner, RData::MX(rdata::MX::new(10, target))));
        }
        AliasKind::Https | AliasKind::Svcb => {
            let svcb = rdata::SVCB::new(1, target, Vec::new());
            let data = if alias.kind == AliasKind::Https {
                RData::HTTPS(rdata::HTTPS(svcb))
            } else {
                RData::SVCB(svcb)
            };
            reply.add_answer(record(owner, data));
        }
        AliasKind::Additional => {
            if let Some(data) = address(qtype) {
                reply.add_answer(record(owner, data));
            }
            reply.add_additional(record(&target, RData::A(rdata::A(ANSWER_V4))));
        }
    }
}

/// A DNS query in wire format, for clients written in the tests.
pub fn query_bytes(name: &str, qtype: RecordType, id: u16) -> Vec<u8> {
    use hickory_proto::{op::Query, rr::Name};
    let mut message = Message::new();
    message
        .set_id(id)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii(name).expect("valid name"),
            qtype,
        ));
    message.to_bytes().expect("encodable")
}

/// As [`query_bytes`], with an EDNS OPT record (4096-byte UDP payload), as
/// most resolvers send.
pub fn query_bytes_edns(name: &str, qtype: RecordType, id: u16) -> Vec<u8> {
    use hickory_proto::op::Edns;
    let mut message = Message::from_bytes(&query_bytes(name, qtype, id)).expect("just made");
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    message.set_edns(edns);
    message.to_bytes().expect("encodable")
}

/// The response code of a reply (`ServFail` when it does not parse).
pub fn response_code(reply: &[u8]) -> ResponseCode {
    Message::from_bytes(reply)
        .map(|m| m.response_code())
        .unwrap_or(ResponseCode::ServFail)
}

/// Reads the answer addresses out of a reply.
pub fn answers(reply: &[u8]) -> Vec<String> {
    Message::from_bytes(reply)
        .map(|m| m.answers().iter().map(|r| r.data().to_string()).collect())
        .unwrap_or_default()
}
