//! A DNS server for demos and manual testing: answers every name (A
//! 192.0.2.1, AAAA 2001:db8::1) over UDP and TCP and logs each query.
//!
//! Usage: guard-dns-stub ADDRESS:PORT [SECONDS]
use std::{net::SocketAddr, thread, time::Duration};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(address) = args.next().and_then(|a| a.parse::<SocketAddr>().ok()) else {
        eprintln!("usage: guard-dns-stub ADDRESS:PORT [SECONDS]");
        std::process::exit(2);
    };
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(3600);
    let server = match guard_testkit::DnsServer::start(address) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("guard-dns-stub: cannot serve on {address}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("guard-dns-stub: serving on {}", server.address());
    let mut logged = 0;
    for _ in 0..seconds * 10 {
        thread::sleep(Duration::from_millis(100));
        let seen = server.seen();
        for query in &seen[logged..] {
            eprintln!(
                "guard-dns-stub: answered {} {} over {}",
                query.qtype,
                query.name,
                if query.tcp { "tcp" } else { "udp" }
            );
        }
        logged = seen.len();
    }
}
