//! Test support shared by guard's integration tests, the demo and the
//! benchmarks: a small authoritative-for-everything DNS server that answers
//! over UDP and TCP and records every query it receives.
//!
//! Every name resolves: A to 192.0.2.1, AAAA to 2001:db8::1 (documentation
//! ranges, never routed). Recording what arrived lets a test prove that a
//! blocked query never left the host, not only that the client failed.
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
    rr::{rdata, RData, Record, RecordType},
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

fn serve_connection(mut stream: TcpStream, seen: &Log) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    loop {
        let mut length = [0u8; 2];
        if stream.read_exact(&mut length).is_err() {
            return Ok(());
        }
        let mut message = vec![0u8; u16::from_be_bytes(length) as usize];
        stream.read_exact(&mut message)?;
        if let Some(reply) = answer(&message, true, seen) {
            let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&reply);
            stream.write_all(&framed)?;
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
        let data = match question.query_type() {
            RecordType::A => Some(RData::A(rdata::A(ANSWER_V4))),
            RecordType::AAAA => Some(RData::AAAA(rdata::AAAA(ANSWER_V6))),
            _ => None,
        };
        if let Some(data) = data {
            reply.add_answer(Record::from_rdata(question.name().clone(), 60, data));
        }
    }
    reply.to_bytes().ok()
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

/// Reads the answer addresses out of a reply.
pub fn answers(reply: &[u8]) -> Vec<String> {
    Message::from_bytes(reply)
        .map(|m| m.answers().iter().map(|r| r.data().to_string()).collect())
        .unwrap_or_default()
}
