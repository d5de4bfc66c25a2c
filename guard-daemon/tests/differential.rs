//! A differential test of the kernel's DNS reading: the real egress and
//! ingress programs, run by the kernel on generated and mutated packets
//! (`BPF_PROG_TEST_RUN`, no network), against a reference decision made on
//! the host from the same bytes: hickory-proto reads the names, a plain
//! matcher (every rule tried, the most specific wins) decides them, and the
//! rules guard documents say what is unreadable. A wrong verdict in either
//! direction fails the test, and so does a refused message reported as the
//! wrong kind (blocked where it was unreadable, or the other way), or a
//! block that names a name the reference does not deny.
//!
//! Cases: the seed corpus (`tests/data/differential/seeds.txt`: hand-made
//! messages for every rule, each also mutated) and generated ones: queries
//! and answers of names near the policy's (case, suffixes, dots inside
//! labels, long and many labels), answers with every record type guard
//! follows and some it must not, compressed at random, then mutated (bytes
//! flipped, pointers planted, counts changed, cut, extended); over UDP and
//! TCP (up to several messages in a segment, the last perhaps cut), IPv4
//! and IPv6 (with extension headers), both directions.
//!
//! The short pass runs here; `cargo xtask differential --cases N` runs a
//! long one (GUARD_DIFFERENTIAL_CASES, GUARD_DIFFERENTIAL_SEED).
//! Disagreements are written to target/differential/disagreements.txt.
//!
//! Stream cases (TCP as written and read by real sockets, through the
//! sk_msg and stream parser programs) are in streams.rs and answers.rs.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use guard_common::{event::Verdict, maps::Binding};
use guard_daemon::{
    kernel::{
        cgroup::RunCgroup,
        hooks::CgroupHook,
        records::{decode, Direction, Record},
        KernelMaps, LoadOptions, Programs,
    },
    policy::{Policy, RuleKind, RuleSet},
};
use hickory_proto::{
    rr::Name,
    serialize::binary::{BinDecodable, BinDecoder},
};
use rand::{rngs::StdRng, Rng, SeedableRng};

const DENY: &[&str] = &[
    "frontend.internal",
    "*.frontend.internal",
    "api.payments.internal",
    "*.corp",
];
const ALLOW: &[&str] = &["ok.frontend.internal", "*.safe.frontend.internal"];
const SHORT_PASS_CASES: u64 = 40_000;
/// Messages a TCP segment of a connection the stream programs do not
/// follow may hold (egress, ingress), as guard documents.
const SEGMENT_MESSAGES: [usize; 2] = [8, 4];
const MAX_RECORDS: usize = 512;
/// The largest packet BPF_PROG_TEST_RUN takes: a page, less the room the
/// kernel keeps around it.
const MAX_TEST_PACKET: usize = 3_600;

// ---------------------------------------------------------------------------
// The reference: what guard says it decides, computed independently.

/// What should become of one DNS message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Pass,
    Block,
    Unreadable,
}

/// Every rule tried, the most specific match wins (an exact name over a
/// `*.` rule of a shorter suffix); labels compared as bytes, ASCII letters
/// folded.
struct Matcher {
    rules: Vec<(bool, Vec<Vec<u8>>, bool)>,
}

impl Matcher {
    fn new() -> Matcher {
        let mut rules = Vec::new();
        for (list, deny) in [(DENY, true), (ALLOW, false)] {
            for pattern in list {
                let (wildcard, base) = match pattern.strip_prefix("*.") {
                    Some(base) => (true, base),
                    None => (false, *pattern),
                };
                let labels = base.split('.').map(|l| l.as_bytes().to_vec()).collect();
                rules.push((wildcard, labels, deny));
            }
        }
        Matcher { rules }
    }

    fn denied(&self, labels: &[Vec<u8>]) -> bool {
        let labels: Vec<Vec<u8>> = labels.iter().map(|l| l.to_ascii_lowercase()).collect();
        let mut best: Option<(usize, bool)> = None;
        for (wildcard, base, deny) in &self.rules {
            let matches = if *wildcard {
                labels.len() > base.len() && labels.ends_with(base)
            } else {
                labels == *base
            };
            let specificity = if *wildcard {
                base.len()
            } else {
                labels.len() + 1
            };
            if matches && best.is_none_or(|(s, _)| specificity > s) {
                best = Some((specificity, *deny));
            }
        }
        best.is_some_and(|(_, deny)| deny)
    }
}

/// A name read by hickory at `at`: its labels and where it ends in the
/// message (after its root label or first pointer).
fn read_name(message: &[u8], at: usize) -> Option<(Vec<Vec<u8>>, usize)> {
    if at >= message.len() || at > u16::MAX as usize {
        return None;
    }
    let mut decoder = BinDecoder::new(message).clone(at as u16);
    let name = Name::read(&mut decoder).ok()?;
    Some((name.iter().map(<[u8]>::to_vec).collect(), decoder.index()))
}

fn u16_at(message: &[u8], at: usize) -> usize {
    u16::from_be_bytes([message[at], message[at + 1]]) as usize
}

/// A query's question: exactly one (none: nothing to decide), written
/// without compression, its name and type inside the message.
fn reference_query(message: &[u8], matcher: &Matcher) -> Expect {
    if message.len() < 12 {
        return Expect::Unreadable;
    }
    match u16_at(message, 4) {
        0 => return Expect::Pass,
        1 => {}
        _ => return Expect::Unreadable,
    }
    let mut at = 12;
    loop {
        let Some(&length) = message.get(at) else {
            return Expect::Unreadable;
        };
        if length == 0 {
            break;
        }
        if length >= 0x40 {
            return Expect::Unreadable;
        }
        at += 1 + length as usize;
    }
    let Some((labels, end)) = read_name(message, 12) else {
        return Expect::Unreadable;
    };
    if end + 2 > message.len() {
        return Expect::Unreadable;
    }
    if matcher.denied(&labels) {
        Expect::Block
    } else {
        Expect::Pass
    }
}

/// An answer: every name it would have the client use (owners of answer
/// and additional records, CNAME, DNAME, MX, SRV, SVCB and HTTPS targets)
/// beyond its question. An owner that is a pointer to the question is the
/// question. The first record that is refused or unreadable decides.
fn reference_answer(message: &[u8], matcher: &Matcher) -> Expect {
    let len = message.len();
    if len < 12 {
        return Expect::Unreadable;
    }
    if message[2] & 0x80 == 0 {
        return Expect::Pass;
    }
    let questions = u16_at(message, 4);
    let (answers, authority, additional) =
        (u16_at(message, 6), u16_at(message, 8), u16_at(message, 10));
    if questions > 1 {
        return Expect::Unreadable;
    }
    let records = answers + authority + additional;
    if records > MAX_RECORDS {
        return Expect::Unreadable;
    }
    let mut at = 12;
    if questions == 1 {
        let Some((_, end)) = read_name(message, 12) else {
            return Expect::Unreadable;
        };
        if end + 4 > len {
            return Expect::Unreadable;
        }
        at = end + 4;
    }
    for index in 0..records {
        let judged = index < answers || index >= answers + authority;
        if at + 1 >= len {
            return Expect::Unreadable;
        }
        let points_at_question = questions == 1 && message[at..at + 2] == [0xc0, 0x0c];
        let Some((owner, end)) = read_name(message, at) else {
            return Expect::Unreadable;
        };
        if end + 10 > len {
            return Expect::Unreadable;
        }
        let rtype = u16_at(message, end);
        let rdata = end + 10;
        let next = rdata + u16_at(message, end + 8);
        if next > len {
            return Expect::Unreadable;
        }
        let mut refused = false;
        if judged {
            refused |= !points_at_question && matcher.denied(&owner);
            let target = match rtype {
                5 | 39 => Some(rdata),
                15 | 64 | 65 => Some(rdata + 2),
                33 => Some(rdata + 6),
                _ => None,
            };
            if let Some(target) = target {
                if target >= next {
                    return Expect::Unreadable;
                }
                match read_name(message, target) {
                    Some((name, name_end)) if name_end <= next => {
                        refused |= matcher.denied(&name);
                    }
                    _ => return Expect::Unreadable,
                }
            }
        }
        if refused {
            return Expect::Block;
        }
        at = next;
    }
    Expect::Pass
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    Out,
    In,
}

const UDP: u8 = 17;
const TCP: u8 = 6;

/// The refused messages of a packet, in order, as the reference sees it
/// (empty: the packet passes).
fn reference_packet(packet: &[u8], way: Way, matcher: &Matcher) -> Vec<Expect> {
    let judge = |message: &[u8]| match way {
        Way::Out => reference_query(message, matcher),
        Way::In if message.is_empty() => Expect::Unreadable,
        Way::In => reference_answer(message, matcher),
    };
    let refused = |outcomes: Vec<Expect>| -> Vec<Expect> {
        outcomes
            .into_iter()
            .filter(|e| *e != Expect::Pass)
            .collect()
    };
    let Some((transport, l4)) = transport_of(packet) else {
        return Vec::new();
    };
    if transport == 0xff {
        return vec![Expect::Unreadable];
    }
    if transport != UDP && transport != TCP {
        return Vec::new();
    }
    let port_at = l4 + if way == Way::Out { 2 } else { 0 };
    if port_at + 2 > packet.len() || u16_at(packet, port_at) != 53 {
        return Vec::new();
    }
    if transport == UDP {
        let start = l4 + 8;
        if start > packet.len() {
            return vec![Expect::Unreadable];
        }
        if way == Way::Out && start == packet.len() {
            return Vec::new();
        }
        return refused(vec![judge(&packet[start..])]);
    }
    if l4 + 14 > packet.len() {
        return vec![Expect::Unreadable];
    }
    let payload = l4 + (packet[l4 + 12] >> 4) as usize * 4;
    if packet[l4 + 13] & 0x20 != 0 {
        return vec![Expect::Unreadable];
    }
    if payload >= packet.len() {
        return Vec::new();
    }
    let limit = SEGMENT_MESSAGES[(way == Way::In) as usize];
    let mut outcomes = Vec::new();
    let mut at = payload;
    while at < packet.len() {
        if outcomes.len() == limit {
            outcomes.push(Expect::Unreadable);
            break;
        }
        if at + 2 > packet.len() || at + 2 + u16_at(packet, at) > packet.len() {
            outcomes.push(Expect::Unreadable);
            break;
        }
        let end = at + 2 + u16_at(packet, at);
        outcomes.push(judge(&packet[at + 2..end]));
        at = end;
    }
    refused(outcomes)
}

/// The transport protocol and where its header starts; 0xff for an IPv6
/// packet whose extension headers go on past the four guard follows; None
/// for what guard does not read (not IP, a later IPv4 or IPv6 fragment).
fn transport_of(packet: &[u8]) -> Option<(u8, usize)> {
    match packet.first()? >> 4 {
        4 => {
            if u16_at(packet, 6) & 0x1fff != 0 {
                return None;
            }
            Some((packet[9], (packet[0] & 0x0f) as usize * 4))
        }
        6 => {
            let (mut next, mut at) = (packet[6], 40);
            for _ in 0..4 {
                match next {
                    0 | 43 | 60 => {
                        let header = packet.get(at..at + 2)?;
                        next = header[0];
                        at += (header[1] as usize + 1) * 8;
                    }
                    44 => {
                        let header = packet.get(at..at + 4)?;
                        if u16::from_be_bytes([header[2], header[3]]) & 0xfff8 != 0 {
                            return None;
                        }
                        next = header[0];
                        at += 8;
                    }
                    _ => break,
                }
            }
            if matches!(next, 0 | 43 | 44 | 60) {
                return Some((0xff, at));
            }
            Some((next, at))
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Generated cases.

type Labels = Vec<Vec<u8>>;

fn labels(name: &str) -> Labels {
    // `\.` is a dot inside a label.
    let mut out = vec![Vec::new()];
    let mut bytes = name.bytes().peekable();
    while let Some(b) = bytes.next() {
        match b {
            b'\\' if bytes.peek() == Some(&b'.') => {
                bytes.next();
                out.last_mut().unwrap().push(b'.');
            }
            b'.' => out.push(Vec::new()),
            _ => out.last_mut().unwrap().push(b),
        }
    }
    out
}

/// Names at and around the policy's.
const NEAR: &[&str] = &[
    "frontend.internal",
    "api.frontend.internal",
    "FrOnTeNd.InTeRnAl",
    "x.y.frontend.internal",
    "ok.frontend.internal",
    "OK.frontend.internal",
    "a.ok.frontend.internal",
    "safe.frontend.internal",
    "b.safe.frontend.internal",
    "api.payments.internal",
    "v1.api.payments.internal",
    "payments.internal",
    "corp",
    "host.corp",
    "a.b.CORP",
    "notfrontend.internal",
    "frontend.internal.evil",
    "frontend",
    "internal",
    "db.internal",
    "frontend\\.internal",
    "a\\.b.frontend.internal",
    "x.frontend\\.internal",
    "frontend-internal",
];

struct Generator {
    rng: StdRng,
}

impl Generator {
    fn label(&mut self) -> Vec<u8> {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_";
        let len = match self.rng.random_range(0..20) {
            0 => 63,
            1 => self.rng.random_range(40..=63),
            _ => self.rng.random_range(1..12),
        };
        (0..len)
            .map(|_| {
                if self.rng.random_ratio(1, 40) {
                    self.rng.random()
                } else {
                    ALPHABET[self.rng.random_range(0..ALPHABET.len())]
                }
            })
            .collect()
    }

    fn name(&mut self) -> Labels {
        let mut name = if self.rng.random_bool(0.6) {
            labels(NEAR[self.rng.random_range(0..NEAR.len())])
        } else {
            (0..self.rng.random_range(1..5))
                .map(|_| self.label())
                .collect()
        };
        match self.rng.random_range(0..10) {
            0 | 1 => {
                for _ in 0..self.rng.random_range(1..4) {
                    let label = self.label();
                    name.insert(0, label);
                }
            }
            // Many labels, near the 255-byte limit.
            2 => {
                let target = self.rng.random_range(230..262);
                while wire_len(&name) < target {
                    let label = if self.rng.random_bool(0.5) {
                        vec![b'a']
                    } else {
                        self.label()
                    };
                    name.insert(0, label);
                }
            }
            _ => {}
        }
        name
    }

    fn qtype(&mut self) -> u16 {
        [1, 28, 5, 15, 33, 64, 65, 16, 255, 12, 2][self.rng.random_range(0..11)]
    }

    fn query(&mut self) -> Vec<u8> {
        let mut w = Writer::new(self.rng.random(), 0x0100, false);
        let name = self.name();
        w.counts(1, 0, 0, 0);
        w.name(&name, &mut self.rng);
        let qtype = self.qtype();
        w.u16(qtype);
        w.u16(1);
        if self.rng.random_bool(0.4) {
            w.set_count(3, 1);
            w.bytes(&[0, 0, 41, 4, 0xd0, 0, 0, 0x80, 0, 0, 0]);
        }
        w.buf
    }

    fn answer(&mut self) -> Vec<u8> {
        let compress = self.rng.random_bool(0.7);
        let mut w = Writer::new(self.rng.random(), 0x8180, compress);
        let question = loop {
            let name = self.name();
            if !Matcher::new().denied(&name) {
                break name;
            }
        };
        let sections = [
            self.rng.random_range(0..5),
            self.rng.random_range(0..3),
            self.rng.random_range(0..4),
        ];
        w.counts(1, sections[0], sections[1], sections[2]);
        w.name(&question, &mut self.rng);
        let qtype = self.qtype();
        w.u16(qtype);
        w.u16(1);
        for (section, count) in sections.into_iter().enumerate() {
            for _ in 0..count {
                self.record(&mut w, &question, section);
            }
        }
        w.buf
    }

    fn record(&mut self, w: &mut Writer, question: &Labels, section: usize) {
        let owner = if self.rng.random_bool(0.5) {
            question.clone()
        } else {
            self.name()
        };
        let rtype: u16 = if section == 1 {
            [2, 6, 5][self.rng.random_range(0..3)]
        } else {
            [1, 28, 5, 39, 15, 33, 64, 65, 16, 2, 12][self.rng.random_range(0..11)]
        };
        w.name(&owner, &mut self.rng);
        w.u16(rtype);
        w.u16(1);
        w.bytes(&[0, 0, 0, 60]);
        let length_at = w.buf.len();
        w.u16(0);
        let start = w.buf.len();
        let target = self.name();
        match rtype {
            1 => w.bytes(&[192, 0, 2, 1]),
            28 => w.bytes(&[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            5 | 39 | 2 | 12 => w.name(&target, &mut self.rng),
            15 => {
                w.u16(10);
                w.name(&target, &mut self.rng);
            }
            33 => {
                w.bytes(&[0, 1, 0, 1, 0x15, 0x38]);
                w.name(&target, &mut self.rng);
            }
            64 | 65 => {
                w.u16(1);
                // SVCB targets are not compressed (RFC 9460).
                w.plain_name(&target);
                w.bytes(&[0, 1, 0, 3, 2, b'h', b'2']);
            }
            6 => {
                w.name(&target, &mut self.rng);
                w.name(&self.name(), &mut self.rng);
                w.bytes(&[0; 20]);
            }
            _ => {
                // TXT holding a denied name's wire form: data, not a name.
                let text = wire(&labels("frontend.internal"));
                w.bytes(&[text.len() as u8]);
                w.bytes(&text);
            }
        }
        let length = (w.buf.len() - start) as u16;
        w.buf[length_at..length_at + 2].copy_from_slice(&length.to_be_bytes());
    }

    /// Flips, plants, cuts or extends: most results are broken messages.
    fn mutate(&mut self, message: &mut Vec<u8>) {
        for _ in 0..self.rng.random_range(1..4) {
            let len = message.len();
            match self.rng.random_range(0..8) {
                0 | 1 if len > 0 => {
                    let at = self.rng.random_range(0..len);
                    message[at] = self.rng.random();
                }
                2 if len > 1 => {
                    // A pointer, anywhere, to anywhere (often just behind).
                    let at = self.rng.random_range(0..len - 1);
                    let to = if self.rng.random_bool(0.5) {
                        self.rng.random_range(0..=at as u16)
                    } else {
                        self.rng.random_range(0..0x3fff)
                    };
                    message[at..at + 2].copy_from_slice(&(0xc000 | to).to_be_bytes());
                }
                3 if len > 12 => {
                    let at = 4 + 2 * self.rng.random_range(0..4);
                    let count: u16 = match self.rng.random_range(0..4) {
                        0 => self.rng.random(),
                        1 => 513,
                        _ => self.rng.random_range(0..6),
                    };
                    message[at..at + 2].copy_from_slice(&count.to_be_bytes());
                }
                4 if len > 0 => message.truncate(self.rng.random_range(0..len)),
                5 => {
                    let extra = self.rng.random_range(1..40);
                    message.extend((0..extra).map(|_| self.rng.random::<u8>()));
                }
                6 if len > 12 => {
                    // A length byte out of range.
                    let at = self.rng.random_range(12..len);
                    message[at] = self.rng.random_range(0x40..0xc0);
                }
                _ if len > 4 => {
                    // The QR bit.
                    message[2] ^= 0x80;
                }
                _ => {}
            }
        }
    }
}

fn wire(name: &Labels) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name {
        out.push(label.len() as u8);
        out.extend_from_slice(label);
    }
    out.push(0);
    out
}

fn wire_len(name: &Labels) -> usize {
    name.iter().map(|l| l.len() + 1).sum::<usize>() + 1
}

/// A DNS message writer that may compress names (a pointer to an earlier
/// occurrence of a suffix).
struct Writer {
    buf: Vec<u8>,
    compress: bool,
    suffixes: Vec<(Labels, usize)>,
}

impl Writer {
    fn new(id: u16, flags: u16, compress: bool) -> Writer {
        let mut w = Writer {
            buf: Vec::new(),
            compress,
            suffixes: Vec::new(),
        };
        w.u16(id);
        w.u16(flags);
        w.bytes(&[0; 8]);
        w
    }

    fn counts(&mut self, qd: u16, an: u16, ns: u16, ar: u16) {
        for (i, count) in [qd, an, ns, ar].into_iter().enumerate() {
            self.set_count(i, count);
        }
    }

    fn set_count(&mut self, index: usize, count: u16) {
        self.buf[4 + 2 * index..6 + 2 * index].copy_from_slice(&count.to_be_bytes());
    }

    fn u16(&mut self, value: u16) {
        self.buf.extend_from_slice(&value.to_be_bytes());
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    fn name(&mut self, name: &Labels, rng: &mut StdRng) {
        for i in 0..name.len() {
            let suffix = &name[i..];
            if self.compress && rng.random_bool(0.8) {
                if let Some((_, at)) = self.suffixes.iter().find(|(s, _)| s == suffix) {
                    self.u16(0xc000 | *at as u16);
                    return;
                }
            }
            if self.buf.len() < 0x3fff {
                self.suffixes.push((suffix.to_vec(), self.buf.len()));
            }
            self.buf.push(name[i].len() as u8);
            self.buf.extend_from_slice(&name[i]);
        }
        self.buf.push(0);
    }

    fn plain_name(&mut self, name: &Labels) {
        self.buf.extend_from_slice(&wire(name));
    }
}

/// An IP packet carrying `payload` over `transport` to (Out) or from (In)
/// port 53; IPv6 perhaps behind extension headers.
fn packet(
    rng: &mut StdRng,
    v6: bool,
    transport: u8,
    way: Way,
    payload: &[u8],
    port: u16,
) -> Vec<u8> {
    let (source, destination) = match way {
        Way::Out => (rng.random_range(32768..61000), port),
        Way::In => (port, rng.random_range(32768..61000)),
    };
    let mut l4 = Vec::new();
    l4.extend_from_slice(&u16::to_be_bytes(source));
    l4.extend_from_slice(&u16::to_be_bytes(destination));
    if transport == UDP {
        l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    } else {
        l4.extend_from_slice(&rng.random::<u32>().to_be_bytes());
        l4.extend_from_slice(&rng.random::<u32>().to_be_bytes());
        let options = if rng.random_ratio(1, 5) {
            rng.random_range(1..4)
        } else {
            0
        };
        let mut flags = 0x18u8;
        if rng.random_ratio(1, 30) {
            flags |= 0x20;
        }
        if rng.random_ratio(1, 30) {
            flags |= 0x02;
        }
        l4.push(((5 + options) << 4) as u8);
        l4.push(flags);
        l4.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        l4.extend(std::iter::repeat_n(1u8, options * 4));
    }
    l4.extend_from_slice(payload);
    let mut ip = Vec::new();
    if v6 {
        let mut extensions = Vec::new();
        let mut next = transport;
        if rng.random_ratio(1, 8) {
            for _ in 0..rng.random_range(1..6) {
                let kind = [0u8, 60, 43, 44][rng.random_range(0..4)];
                let mut header = vec![next, 0, 0, 0, 0, 0, 0, 0];
                if kind == 44 && rng.random_ratio(1, 4) {
                    header[2] = 0x01; // a later fragment
                }
                header.extend(extensions);
                extensions = header;
                next = kind;
            }
        }
        ip.extend_from_slice(&[0x60, 0, 0, 0]);
        ip.extend_from_slice(&((extensions.len() + l4.len()) as u16).to_be_bytes());
        ip.push(next);
        ip.push(64);
        ip.extend_from_slice(&[0u8; 15]);
        ip.push(1);
        ip.extend_from_slice(&[0u8; 15]);
        ip.push(1);
        ip.extend(extensions);
    } else {
        ip.extend_from_slice(&[0x45, 0]);
        ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[
            0, 0, 0x40, 0, 64, transport, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1,
        ]);
    }
    ip.extend(l4);
    ip
}

// ---------------------------------------------------------------------------
// The kernel side.

/// The test process in a cgroup of its own, bound to the test policy (a
/// test run's packet belongs to a socket of the caller's cgroup); moved
/// back and removed on drop.
struct Placement {
    home: PathBuf,
    cgroup: Option<RunCgroup>,
}

impl Placement {
    fn enter() -> (Placement, u64) {
        let text = fs::read_to_string("/proc/self/cgroup").unwrap();
        let relative = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mount = guard_daemon::kernel::cgroup::cgroup2_mount_point(&mountinfo).unwrap();
        let home = mount.join(relative.trim_start_matches('/'));
        let path = home.join(format!("guard-differential-{}", std::process::id()));
        let cgroup = RunCgroup::create(&path).expect("creating the test's cgroup");
        let id = cgroup.id();
        fs::write(path.join("cgroup.procs"), std::process::id().to_string())
            .expect("moving the test into its cgroup");
        (
            Placement {
                home,
                cgroup: Some(cgroup),
            },
            id,
        )
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        let _ = fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        if let Some(cgroup) = self.cgroup.take() {
            let _ = cgroup.remove();
        }
    }
}

struct Kernel {
    programs: Programs,
    events: aya::maps::RingBuf<aya::maps::MapData>,
}

impl Kernel {
    /// The kernel's verdict on a packet: passed, and the refused messages
    /// reported (their kind, and the name they were refused for).
    fn run(&mut self, way: Way, packet: &[u8]) -> (bool, Vec<(Expect, Labels)>) {
        let hook = match way {
            Way::Out => CgroupHook::Egress,
            Way::In => CgroupHook::Ingress,
        };
        let (verdict, _) = self.programs.test_run(hook, packet, 1).expect("test run");
        let mut reported = Vec::new();
        while let Some(item) = self.events.next() {
            if let Some(Record::Dns(query)) = decode(&item) {
                let expected_direction = match way {
                    Way::Out => Direction::Query,
                    Way::In => Direction::Answer,
                };
                assert_eq!(query.direction, expected_direction);
                let kind = match query.verdict {
                    Verdict::Blocked => Expect::Block,
                    Verdict::UnreadableBlocked => Expect::Unreadable,
                    other => panic!("unexpected verdict {other:?} in enforce mode"),
                };
                reported.push((kind, query.decided_labels().to_vec()));
            }
        }
        (verdict == 1, reported)
    }
}

struct Case {
    way: Way,
    what: &'static str,
    packet: Vec<u8>,
}

#[derive(Default)]
struct Tally {
    cases: u64,
    refused: u64,
    unreadable: u64,
    disagreements: Vec<String>,
}

fn check(kernel: &mut Kernel, matcher: &Matcher, case: &Case, tally: &mut Tally) {
    let expected = reference_packet(&case.packet, case.way, matcher);
    let (passed, reported) = kernel.run(case.way, &case.packet);
    tally.cases += 1;
    if !passed {
        tally.refused += 1;
    }
    tally.unreadable += expected
        .iter()
        .filter(|e| **e == Expect::Unreadable)
        .count() as u64;
    let kinds: Vec<Expect> = reported.iter().map(|(kind, _)| *kind).collect();
    let mut wrong = Vec::new();
    if passed != expected.is_empty() {
        wrong.push(if passed {
            "passed what the reference refuses"
        } else {
            "refused what the reference passes"
        });
    }
    if kinds != expected {
        wrong.push("reported other refusals than the reference");
    }
    if reported
        .iter()
        .any(|(kind, name)| *kind == Expect::Block && !matcher.denied(name))
    {
        wrong.push("blocked for a name the reference does not deny");
    }
    if !wrong.is_empty() && tally.disagreements.len() < 1000 {
        let mut text = String::new();
        let _ = writeln!(
            text,
            "{} {:?} {}: kernel {} {:?}, reference {:?}\n  {}",
            wrong.join("; "),
            case.way,
            case.what,
            if passed { "pass" } else { "drop" },
            reported,
            expected,
            hex(&case.packet)
        );
        tally.disagreements.push(text);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The seed corpus: `query HEX` or `answer HEX` lines (DNS messages).
fn seeds() -> Vec<(Way, Vec<u8>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/differential/seeds.txt");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty() && !line.starts_with('#'))
        .map(|(number, line)| {
            let mut words = line.split_whitespace();
            let way = match words.next() {
                Some("query") => Way::Out,
                Some("answer") => Way::In,
                other => panic!("{}:{}: {other:?}", path.display(), number + 1),
            };
            (way, unhex(words.next().expect("hex")))
        })
        .collect()
}

/// The messages of a case framed for its transport: one datagram, or a TCP
/// segment of one or more length-prefixed messages (the last perhaps cut).
fn frame(rng: &mut StdRng, transport: u8, messages: &[Vec<u8>]) -> Vec<u8> {
    if transport == UDP {
        return messages[0].clone();
    }
    let mut segment = Vec::new();
    for message in messages {
        segment.extend_from_slice(&(message.len() as u16).to_be_bytes());
        segment.extend_from_slice(message);
    }
    if rng.random_ratio(1, 8) && !segment.is_empty() {
        let cut = rng.random_range(0..segment.len());
        segment.truncate(cut);
    }
    segment
}

#[test]
fn the_kernel_reads_dns_as_the_reference_does() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads eBPF programs and must run as root (cargo xtask test)"
    );
    let cases: u64 = std::env::var("GUARD_DIFFERENTIAL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SHORT_PASS_CASES);
    let seed: u64 = std::env::var("GUARD_DIFFERENTIAL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x0067_7561_7264); // "guard"
    let matcher = Matcher::new();
    let deny: Vec<String> = DENY.iter().map(|s| s.to_string()).collect();
    let allow: Vec<String> = ALLOW.iter().map(|s| s.to_string()).collect();
    let rules =
        RuleSet::compile(&[Policy::from_command_line(&deny, &allow).unwrap()], false).unwrap();
    // The shared matcher agrees with the plain one on every name used.
    for name in NEAR {
        let labels = labels(name);
        assert_eq!(
            rules
                .decide_labels(&labels)
                .is_some_and(|(r, _)| r.kind == RuleKind::Deny),
            matcher.denied(&labels),
            "{name}"
        );
    }

    let (_placement, cgroup_id) = Placement::enter();
    let mut programs = Programs::load(&LoadOptions {
        dns_ports: &[53],
        rule_capacity: rules.entries().len() as u32,
        ring_buffer_bytes: 1 << 20,
        record_capacity: 0,
        policy_capacity: 1,
    })
    .expect("loading the programs");
    programs.install_rules(0, rules.entries()).unwrap();
    programs
        .bind(
            cgroup_id,
            Binding {
                policy_id: 0,
                audit_only: 0,
                record: 0,
                _pad: [0; 2],
                label_mask: rules.label_mask(),
            },
        )
        .unwrap();
    let events = programs.take_events().unwrap();
    let mut kernel = Kernel { programs, events };
    let mut generator = Generator {
        rng: StdRng::seed_from_u64(seed),
    };
    let mut tally = Tally::default();

    // The seeds as they are, over every transport, then mutated.
    let seeds = seeds();
    for (way, message) in &seeds {
        for v6 in [false, true] {
            for transport in [UDP, TCP] {
                let payload = if transport == UDP {
                    message.clone()
                } else {
                    let mut framed = (message.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(message);
                    framed
                };
                let packet = packet(&mut generator.rng, v6, transport, *way, &payload, 53);
                check(
                    &mut kernel,
                    &matcher,
                    &Case {
                        way: *way,
                        what: "seed",
                        packet,
                    },
                    &mut tally,
                );
            }
        }
    }
    while tally.cases < cases {
        let way = if generator.rng.random_bool(0.5) {
            Way::Out
        } else {
            Way::In
        };
        let v6 = generator.rng.random_bool(0.5);
        let transport = if generator.rng.random_ratio(3, 4) {
            UDP
        } else {
            TCP
        };
        let count = if transport == TCP {
            generator
                .rng
                .random_range(1..=SEGMENT_MESSAGES[(way == Way::In) as usize] + 1)
        } else {
            1
        };
        let mut what = "generated";
        let messages: Vec<Vec<u8>> = (0..count)
            .map(|_| {
                let mut message = match generator.rng.random_range(0..4) {
                    0 => {
                        what = "seed, mutated";
                        let (seed_way, seed) = &seeds[generator.rng.random_range(0..seeds.len())];
                        let mut seed = seed.clone();
                        if *seed_way != way {
                            // A query read as an answer, or the other way.
                            seed[2] ^= 0x80;
                        }
                        seed
                    }
                    _ if way == Way::Out => generator.query(),
                    _ => generator.answer(),
                };
                if generator.rng.random_bool(0.4) {
                    what = "mutated";
                    generator.mutate(&mut message);
                }
                message
            })
            .collect();
        let payload = frame(&mut generator.rng, transport, &messages);
        let port = if generator.rng.random_ratio(1, 40) {
            5353
        } else {
            53
        };
        let packet = packet(&mut generator.rng, v6, transport, way, &payload, port);
        if packet.len() > MAX_TEST_PACKET {
            continue;
        }
        check(
            &mut kernel,
            &matcher,
            &Case { way, what, packet },
            &mut tally,
        );
    }

    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../differential");
    fs::create_dir_all(&out).unwrap();
    let summary = format!(
        "seed {seed}: {} packets ({} seeds), {} refused by the kernel, {} unreadable messages, {} disagreements\n",
        tally.cases,
        seeds.len(),
        tally.refused,
        tally.unreadable,
        tally.disagreements.len()
    );
    fs::write(
        out.join("disagreements.txt"),
        format!("{summary}{}", tally.disagreements.join("")),
    )
    .unwrap();
    eprint!("differential: {summary}");
    assert!(
        tally.disagreements.is_empty(),
        "{summary}(all in target/differential/disagreements.txt)\n{}",
        tally.disagreements[..tally.disagreements.len().min(10)].join("")
    );
    // The cases reached what they are for: refusals of both kinds.
    assert!(
        tally.refused > cases / 10 && tally.unreadable > cases / 20,
        "{summary}"
    );
}
