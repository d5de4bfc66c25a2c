//! A DNS client for tests, with control over the socket: unconnected
//! `sendto` (the default for UDP), connected UDP, TCP, and an IPv6 socket
//! sending to an IPv4-mapped address (dual stack).
//!
//! Usage: guard-dns-query [--tcp] [--connect] [--dual-stack] [--timeout SECS]
//!                        [--repeat N] SERVER:PORT NAME [TYPE]
//!
//! Prints `answer NAME TYPE DATA...` and exits 0, or prints `error STAGE:
//! KIND: MESSAGE` (STAGE is send, recv or connect) and exits 1.
use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV6, TcpStream, UdpSocket},
    process::ExitCode,
    str::FromStr,
    time::Duration,
};

use guard_testkit::{answers, query_bytes};
use hickory_proto::rr::RecordType;

struct Options {
    tcp: bool,
    connect: bool,
    dual_stack: bool,
    timeout: Duration,
    repeat: u32,
    server: SocketAddr,
    name: String,
    qtype: RecordType,
}

fn parse() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let (mut tcp, mut connect, mut dual_stack, mut timeout, mut repeat) =
        (false, false, false, 5.0, 1);
    let mut positional = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--tcp" => tcp = true,
            "--connect" => connect = true,
            "--dual-stack" => dual_stack = true,
            "--timeout" => {
                timeout = args
                    .next()
                    .and_then(|t| t.parse().ok())
                    .ok_or("--timeout SECS")?
            }
            "--repeat" => {
                repeat = args
                    .next()
                    .and_then(|t| t.parse().ok())
                    .ok_or("--repeat N")?
            }
            _ => positional.push(arg),
        }
    }
    let [server, name, rest @ ..] = positional.as_slice() else {
        return Err("usage: guard-dns-query [options] SERVER:PORT NAME [TYPE]".into());
    };
    Ok(Options {
        tcp,
        connect,
        dual_stack,
        timeout: Duration::from_secs_f64(timeout),
        repeat,
        server: server.parse().map_err(|e| format!("{server}: {e}"))?,
        name: name.clone(),
        qtype: RecordType::from_str(rest.first().map(String::as_str).unwrap_or("A"))
            .map_err(|e| e.to_string())?,
    })
}

fn fail(stage: &str, error: std::io::Error) -> ExitCode {
    println!("error {stage}: {:?}: {error}", error.kind());
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let options = match parse() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    for i in 0..options.repeat {
        let query = query_bytes(&options.name, options.qtype, 0x4000 + i as u16);
        let reply = if options.tcp {
            tcp(&options, &query)
        } else {
            udp(&options, &query)
        };
        match reply {
            Ok(reply) => println!(
                "answer {} {} {}",
                options.name,
                options.qtype,
                answers(&reply).join(" ")
            ),
            Err((stage, error)) => return fail(stage, error),
        }
    }
    ExitCode::SUCCESS
}

type Failure = (&'static str, std::io::Error);

fn udp(options: &Options, query: &[u8]) -> Result<Vec<u8>, Failure> {
    let (socket, target) = if options.dual_stack {
        let SocketAddr::V4(v4) = options.server else {
            return Err((
                "connect",
                std::io::Error::other("--dual-stack needs an IPv4 server"),
            ));
        };
        let socket = UdpSocket::bind("[::]:0").map_err(|e| ("connect", e))?;
        let mapped = SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0));
        (socket, mapped)
    } else {
        let bind = if options.server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        (
            UdpSocket::bind(bind).map_err(|e| ("connect", e))?,
            options.server,
        )
    };
    socket
        .set_read_timeout(Some(options.timeout))
        .map_err(|e| ("connect", e))?;
    if options.connect {
        socket.connect(target).map_err(|e| ("connect", e))?;
        socket.send(query).map_err(|e| ("send", e))?;
    } else {
        socket.send_to(query, target).map_err(|e| ("send", e))?;
    }
    let mut buffer = [0u8; 4096];
    let len = socket.recv(&mut buffer).map_err(|e| ("recv", e))?;
    Ok(buffer[..len].to_vec())
}

fn tcp(options: &Options, query: &[u8]) -> Result<Vec<u8>, Failure> {
    let mut stream =
        TcpStream::connect_timeout(&options.server, options.timeout).map_err(|e| ("connect", e))?;
    stream
        .set_read_timeout(Some(options.timeout))
        .map_err(|e| ("connect", e))?;
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed).map_err(|e| ("send", e))?;
    let mut length = [0u8; 2];
    stream.read_exact(&mut length).map_err(|e| ("recv", e))?;
    let mut reply = vec![0u8; u16::from_be_bytes(length) as usize];
    stream.read_exact(&mut reply).map_err(|e| ("recv", e))?;
    Ok(reply)
}
