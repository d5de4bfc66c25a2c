//! A DNS client for tests, with control over the socket and the write
//! pattern: unconnected `sendto` (the default for UDP), connected UDP, TCP,
//! an IPv6 socket sending to an IPv4-mapped address (dual stack), and the
//! ways a stream or a send can be cut up.
//!
//! Usage: guard-dns-query [options] SERVER:PORT NAME[,NAME...] [TYPE]
//!
//! Options:
//!   --tcp             DNS over TCP (one connection; several names are
//!                     pipelined in one write)
//!   --connect         UDP: connect, then send
//!   --dual-stack      UDP: an IPv6 socket to the IPv4-mapped server address
//!   --timeout SECS    per receive (default 5)
//!   --repeat N        ask N times
//!   --split OFFSETS   TCP: write the framed queries in pieces, cut at these
//!                     byte offsets (`2` sends the length prefix alone), each
//!                     piece its own segment (TCP_NODELAY, a pause between)
//!   --oob             TCP: send the first byte as urgent data (MSG_OOB)
//!   --fastopen        TCP: send the first write with the SYN (MSG_FASTOPEN)
//!   --gso             UDP: send all names in one sendmsg with UDP_SEGMENT
//!                     (the names must encode to the same length but the last)
//!   --edns            add an EDNS OPT record to each query (an additional
//!                     record after the question, as most resolvers send)
//!   --raw HEX         send these bytes as the message (hex), instead of a
//!                     query for NAME (which then only labels the output)
//!
//! A NAME may escape a dot inside a label as `\.` (one label `a.b`).
//!
//! Prints `answer NAME TYPE DATA...` per answer and exits 0, or prints
//! `error STAGE: KIND: MESSAGE` (STAGE is send, recv or connect) and exits 1.
//! An answer with an error code (REFUSED, say) prints `error rcode: NAME
//! TYPE: CODE` and the exit status is 1.
use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV6, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    process::ExitCode,
    str::FromStr,
    time::Duration,
};

use guard_testkit::{answers, query_bytes, query_bytes_edns, response_code};
use hickory_proto::{op::ResponseCode, rr::RecordType};

#[derive(Default)]
struct Options {
    tcp: bool,
    connect: bool,
    dual_stack: bool,
    timeout: Duration,
    repeat: u32,
    split: Vec<usize>,
    oob: bool,
    fastopen: bool,
    gso: bool,
    edns: bool,
    raw: Option<Vec<u8>>,
    server: Option<SocketAddr>,
    names: Vec<String>,
    qtype: Option<RecordType>,
}

fn parse() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut options = Options {
        timeout: Duration::from_secs(5),
        repeat: 1,
        ..Options::default()
    };
    let mut positional = Vec::new();
    let value = |args: &mut dyn Iterator<Item = String>, what: &str| {
        args.next().ok_or_else(|| format!("{what} needs a value"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--tcp" => options.tcp = true,
            "--connect" => options.connect = true,
            "--dual-stack" => options.dual_stack = true,
            "--oob" => options.oob = true,
            "--fastopen" => options.fastopen = true,
            "--gso" => options.gso = true,
            "--edns" => options.edns = true,
            "--raw" => {
                let hex = value(&mut args, "--raw")?;
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("x"), 16))
                    .collect::<Result<Vec<u8>, _>>()
                    .map_err(|_| format!("--raw: not hex: {hex}"))?;
                options.raw = Some(bytes);
            }
            "--timeout" => {
                let secs: f64 = value(&mut args, "--timeout")?
                    .parse()
                    .map_err(|_| "--timeout SECS")?;
                options.timeout = Duration::from_secs_f64(secs);
            }
            "--repeat" => {
                options.repeat = value(&mut args, "--repeat")?
                    .parse()
                    .map_err(|_| "--repeat N")?
            }
            "--split" => {
                options.split = value(&mut args, "--split")?
                    .split(',')
                    .map(|o| o.parse().map_err(|_| format!("--split: bad offset {o}")))
                    .collect::<Result<_, _>>()?
            }
            _ => positional.push(arg),
        }
    }
    let [server, names, rest @ ..] = positional.as_slice() else {
        return Err("usage: guard-dns-query [options] SERVER:PORT NAME[,NAME...] [TYPE]".into());
    };
    options.server = Some(server.parse().map_err(|e| format!("{server}: {e}"))?);
    options.names = names.split(',').map(str::to_owned).collect();
    options.qtype = Some(
        RecordType::from_str(rest.first().map(String::as_str).unwrap_or("A"))
            .map_err(|e| e.to_string())?,
    );
    Ok(options)
}

fn fail(stage: &str, error: std::io::Error) -> ExitCode {
    println!("error {stage}: {:?}: {error}", error.kind());
    ExitCode::from(1)
}

type Failure = (&'static str, std::io::Error);

fn main() -> ExitCode {
    let options = match parse() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let qtype = options.qtype.unwrap_or(RecordType::A);
    for round in 0..options.repeat {
        let queries: Vec<Vec<u8>> = match &options.raw {
            Some(raw) => vec![raw.clone()],
            None => options
                .names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let id = 0x4000 + (round as u16) * 64 + i as u16;
                    if options.edns {
                        query_bytes_edns(name, qtype, id)
                    } else {
                        query_bytes(name, qtype, id)
                    }
                })
                .collect(),
        };
        let replies = if options.tcp {
            tcp(&options, &queries)
        } else {
            udp(&options, &queries)
        };
        match replies {
            Ok(replies) => {
                let mut refused = false;
                for (name, reply) in options.names.iter().zip(&replies) {
                    match response_code(reply) {
                        ResponseCode::NoError => {
                            println!("answer {name} {qtype} {}", answers(reply).join(" "))
                        }
                        code => {
                            println!("error rcode: {name} {qtype}: {code}");
                            refused = true;
                        }
                    }
                }
                if refused {
                    return ExitCode::from(1);
                }
            }
            Err((stage, error)) => return fail(stage, error),
        }
    }
    ExitCode::SUCCESS
}

fn udp(options: &Options, queries: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, Failure> {
    let server = options.server.expect("parsed");
    let (socket, target) = if options.dual_stack {
        let SocketAddr::V4(v4) = server else {
            return Err((
                "connect",
                std::io::Error::other("--dual-stack needs an IPv4 server"),
            ));
        };
        let socket = UdpSocket::bind("[::]:0").map_err(|e| ("connect", e))?;
        let mapped = SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0));
        (socket, mapped)
    } else {
        let bind = if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        (UdpSocket::bind(bind).map_err(|e| ("connect", e))?, server)
    };
    socket
        .set_read_timeout(Some(options.timeout))
        .map_err(|e| ("connect", e))?;
    if options.connect || options.gso {
        socket.connect(target).map_err(|e| ("connect", e))?;
    }
    if options.gso {
        send_gso(&socket, queries).map_err(|e| ("send", e))?;
    } else {
        for query in queries {
            if options.connect {
                socket.send(query).map_err(|e| ("send", e))?;
            } else {
                socket.send_to(query, target).map_err(|e| ("send", e))?;
            }
        }
    }
    let mut replies = Vec::new();
    for _ in queries {
        let mut buffer = [0u8; 4096];
        let len = socket.recv(&mut buffer).map_err(|e| ("recv", e))?;
        replies.push(buffer[..len].to_vec());
    }
    Ok(replies)
}

/// All queries in one sendmsg, cut into datagrams by the kernel (UDP GSO).
fn send_gso(socket: &UdpSocket, queries: &[Vec<u8>]) -> std::io::Result<()> {
    let segment = queries[0].len() as u16;
    let payload: Vec<u8> = queries.concat();
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    message.msg_controllen = space;
    // SAFETY: the control buffer holds one cmsg of this size.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&message);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut u16, segment);
    }
    // SAFETY: a valid socket and message.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &message, 0) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn tcp(options: &Options, queries: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, Failure> {
    let server = options.server.expect("parsed");
    let mut framed = Vec::new();
    for query in queries {
        framed.extend_from_slice(&(query.len() as u16).to_be_bytes());
        framed.extend_from_slice(query);
    }
    let mut stream = if options.fastopen {
        fastopen(server, &framed).map_err(|e| ("send", e))?
    } else {
        TcpStream::connect_timeout(&server, options.timeout).map_err(|e| ("connect", e))?
    };
    stream
        .set_read_timeout(Some(options.timeout))
        .map_err(|e| ("connect", e))?;
    if !options.fastopen {
        write_pieces(&mut stream, &framed, options).map_err(|e| ("send", e))?;
    }
    let mut replies = Vec::new();
    for _ in queries {
        let mut length = [0u8; 2];
        stream.read_exact(&mut length).map_err(|e| ("recv", e))?;
        let mut reply = vec![0u8; u16::from_be_bytes(length) as usize];
        stream.read_exact(&mut reply).map_err(|e| ("recv", e))?;
        replies.push(reply);
    }
    Ok(replies)
}

/// Writes the framed queries in the pieces `--split` and `--oob` ask for.
fn write_pieces(stream: &mut TcpStream, framed: &[u8], options: &Options) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut start = 0;
    if options.oob {
        // SAFETY: a valid socket and a one-byte buffer.
        let sent = unsafe {
            libc::send(
                stream.as_raw_fd(),
                framed.as_ptr() as *const libc::c_void,
                1,
                libc::MSG_OOB,
            )
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
        start = 1;
    }
    for &cut in &options.split {
        if cut <= start || cut >= framed.len() {
            continue;
        }
        stream.write_all(&framed[start..cut])?;
        start = cut;
        // Each piece its own segment.
        std::thread::sleep(Duration::from_millis(30));
    }
    stream.write_all(&framed[start..])
}

/// A TCP Fast Open connection whose SYN carries `data`.
fn fastopen(server: SocketAddr, data: &[u8]) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let family = if server.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the descriptor is owned by the TcpStream.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let (address, len) = socket_address(server);
    // SAFETY: address is a valid sockaddr of `len` bytes.
    let sent = unsafe {
        libc::sendto(
            fd,
            data.as_ptr() as *const libc::c_void,
            data.len(),
            libc::MSG_FASTOPEN,
            &address as *const libc::sockaddr_storage as *const libc::sockaddr,
            len,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

fn socket_address(address: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid, and the writes below fit in it.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match address {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}
