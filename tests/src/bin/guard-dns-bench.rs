//! Load tools for `cargo xtask bench`. Each mode prints one JSON object.
//!
//!   serve ADDR SECONDS                 a DNS server that records nothing
//!   load SERVER QUERIES WINDOW         allowed-lookup load: QUERIES queries,
//!                                      WINDOW in flight; qps, p50, p99, and
//!                                      the latency percentiles 0..=100
//!   flood SERVER NAME QUERIES RATE     send QUERIES queries for NAME at RATE
//!                                      per second (0 = as fast as possible);
//!                                      counts sends the kernel refused
//!   tcp-sink ADDR SECONDS              accept one connection, discard data
//!   tcp-send ADDR SECONDS              send as fast as possible; bytes/s
use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::{Duration, Instant},
};

use guard_testkit::{query_bytes, DnsServer};
use hickory_proto::rr::RecordType;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = |i: usize| -> u64 {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| usage())
    };
    let address = |i: usize| -> SocketAddr {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| usage())
    };
    match args.first().map(String::as_str) {
        Some("serve") => serve(address(1), parsed(2)),
        Some("load") => load(address(1), parsed(2), parsed(3) as usize),
        Some("flood") => flood(
            address(1),
            args.get(2).cloned().unwrap_or_else(|| usage()),
            parsed(3),
            parsed(4),
        ),
        Some("tcp-sink") => tcp_sink(address(1), parsed(2)),
        Some("tcp-send") => tcp_send(address(1), parsed(2)),
        _ => usage(),
    }
    ExitCode::SUCCESS
}

fn usage() -> ! {
    eprintln!("usage: guard-dns-bench serve|load|flood|tcp-sink|tcp-send ... (see the source)");
    std::process::exit(2);
}

fn serve(address: SocketAddr, seconds: u64) {
    let _server = DnsServer::start_quiet(address).expect("serve");
    println!("{{\"serving\": \"{address}\"}}");
    std::thread::sleep(Duration::from_secs(seconds));
}

/// Pipelined UDP load over one connected socket: keeps `window` queries in
/// flight, each with its own id and send time, and takes every reply's
/// latency. A reply that does not come within 200 ms counts as lost and its
/// slot is reused.
fn load(server: SocketAddr, queries: u64, window: usize) {
    let socket = UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .expect("bind");
    socket.connect(server).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    // A few hundred distinct, realistic names, none matching any bench policy.
    let packets: Vec<Vec<u8>> = (0..window.max(1))
        .map(|slot| {
            query_bytes(
                &format!("host-{slot}.svc.cluster.example"),
                RecordType::A,
                slot as u16,
            )
        })
        .collect();
    let mut sent_at: Vec<Option<Instant>> = vec![None; window];
    let mut latencies: Vec<u32> = Vec::with_capacity(queries as usize);
    let (mut sent, mut lost) = (0u64, 0u64);
    let start = Instant::now();
    let mut buffer = [0u8; 1500];
    for (slot, packet) in packets
        .iter()
        .enumerate()
        .take(window.min(queries as usize))
    {
        sent_at[slot] = Some(Instant::now());
        socket.send(packet).expect("send");
        sent += 1;
    }
    while (latencies.len() as u64) + lost < queries {
        match socket.recv(&mut buffer) {
            Ok(len) if len >= 2 => {
                let slot = u16::from_be_bytes([buffer[0], buffer[1]]) as usize;
                let Some(at) = sent_at.get_mut(slot).and_then(Option::take) else {
                    continue;
                };
                latencies.push(at.elapsed().as_micros() as u32);
                if sent < queries {
                    sent_at[slot] = Some(Instant::now());
                    socket.send(&packets[slot]).expect("send");
                    sent += 1;
                }
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                for slot in 0..window {
                    if sent_at[slot].take().is_some() {
                        lost += 1;
                        if sent < queries {
                            sent_at[slot] = Some(Instant::now());
                            socket.send(&packets[slot]).expect("send");
                            sent += 1;
                        }
                    }
                }
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    let percentiles: Vec<String> = (0..=100)
        .map(|p| percentile(f64::from(p) / 100.0).to_string())
        .collect();
    println!(
        "{{\"queries\": {queries}, \"answered\": {}, \"lost\": {lost}, \"seconds\": {seconds:.4}, \"qps\": {:.1}, \"p50_us\": {}, \"p99_us\": {}, \"percentiles_us\": [{}]}}",
        latencies.len(),
        latencies.len() as f64 / seconds,
        percentile(0.50),
        percentile(0.99),
        percentiles.join(", ")
    );
}

/// Sends queries for a (denied) name; the kernel refuses each send.
fn flood(server: SocketAddr, name: String, queries: u64, rate: u64) {
    let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
    let packet = query_bytes(&name, RecordType::A, 1);
    let (mut refused, mut accepted) = (0u64, 0u64);
    let start = Instant::now();
    for i in 0..queries {
        if rate > 0 {
            // Pace against the schedule, not per packet, so bursts even out.
            let due = Duration::from_secs_f64(i as f64 / rate as f64);
            while start.elapsed() < due {
                std::hint::spin_loop();
            }
        }
        match socket.send_to(&packet, server) {
            Ok(_) => accepted += 1,
            Err(_) => refused += 1,
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{{\"queries\": {queries}, \"refused\": {refused}, \"accepted\": {accepted}, \"seconds\": {seconds:.4}, \"rate\": {:.1}}}",
        queries as f64 / seconds
    );
}

fn tcp_sink(address: SocketAddr, seconds: u64) {
    let listener = TcpListener::bind(address).expect("bind");
    println!("{{\"listening\": \"{address}\"}}");
    let deadline = Instant::now() + Duration::from_secs(seconds);
    listener.set_nonblocking(true).expect("nonblocking");
    let mut buffer = vec![0u8; 1 << 20];
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false).expect("blocking");
                while let Ok(n) = stream.read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn tcp_send(address: SocketAddr, seconds: u64) {
    let mut stream = TcpStream::connect(address).expect("connect");
    let buffer = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        stream.write_all(&buffer).expect("write");
        bytes += buffer.len() as u64;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{{\"bytes\": {bytes}, \"seconds\": {elapsed:.4}, \"bytes_per_second\": {:.0}}}",
        bytes as f64 / elapsed
    );
}
