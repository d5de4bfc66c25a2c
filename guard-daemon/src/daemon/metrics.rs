//! Prometheus text metrics on a loopback address.
//!
//! The exposition format is a few lines of text and the server answers any
//! request on the socket with them, so both are written here rather than
//! pulling in an HTTP stack.
use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use super::Msg;
use crate::report::Counters;

pub struct Snapshot {
    /// (binding kind, policy names) -> counters, events lost.
    pub by_policy: BTreeMap<(String, String), (Counters, u64)>,
    pub unbound: u64,
    pub events_lost: u64,
    pub runs: usize,
    pub bindings: usize,
    pub rules: usize,
}

pub async fn serve(listener: TcpListener, tx: mpsc::Sender<Msg>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            // Read the request head (any path answers with the metrics).
            let mut request = [0u8; 4096];
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut request));
            if !matches!(read.await, Ok(Ok(n)) if n > 0) {
                return;
            }
            let (reply, answer) = oneshot::channel();
            if tx.send(Msg::Metrics { reply }).await.is_err() {
                return;
            }
            let Ok(body) = answer.await else { return };
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

pub fn render(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    type Get = fn(&(Counters, u64)) -> u64;
    let per_policy: [(&str, &str, Get); 5] = [
        (
            "guard_dns_queries_inspected_total",
            "DNS queries whose question guard inspected.",
            |c| c.0.inspected,
        ),
        (
            "guard_dns_queries_blocked_total",
            "DNS queries refused (a deny rule in enforce mode).",
            |c| c.0.blocked,
        ),
        (
            "guard_dns_queries_audited_total",
            "DNS queries that matched a deny rule in audit mode and were let through.",
            |c| c.0.audited,
        ),
        (
            "guard_dns_queries_unreadable_total",
            "DNS queries whose question could not be read (refused in enforce mode).",
            |c| c.0.unreadable,
        ),
        (
            "guard_events_lost_total",
            "Event records that did not fit in the ring buffer.",
            |c| c.1,
        ),
    ];
    for (name, help, get) in per_policy {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for ((kind, policy), counters) in &snapshot.by_policy {
            let _ = writeln!(
                out,
                "{name}{{binding=\"{}\",policy=\"{}\"}} {}",
                escape(kind),
                escape(policy),
                get(counters)
            );
        }
    }
    let gauges: [(&str, &str, &str, u64); 5] = [
        (
            "guard_dns_unbound_total",
            "counter",
            "DNS packets from a guarded cgroup without a binding (refused).",
            snapshot.unbound,
        ),
        (
            "guard_events_lost_all_total",
            "counter",
            "Event records lost, all policies.",
            snapshot.events_lost,
        ),
        (
            "guard_runs_active",
            "gauge",
            "guard runs hosted by the daemon now.",
            snapshot.runs as u64,
        ),
        (
            "guard_bindings_active",
            "gauge",
            "Configured bindings guarding a cgroup now.",
            snapshot.bindings as u64,
        ),
        (
            "guard_rules_loaded",
            "gauge",
            "Entries in the kernel rule map.",
            snapshot.rules as u64,
        ),
    ];
    for (name, kind, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    out
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_per_policy_counters_with_escaped_labels() {
        let mut by_policy = BTreeMap::new();
        by_policy.insert(
            ("unit".to_owned(), "front\"end".to_owned()),
            (
                Counters {
                    inspected: 7,
                    blocked: 2,
                    ..Default::default()
                },
                1,
            ),
        );
        let text = render(&Snapshot {
            by_policy,
            unbound: 0,
            events_lost: 1,
            runs: 3,
            bindings: 1,
            rules: 9,
        });
        assert!(text.contains(
            "guard_dns_queries_blocked_total{binding=\"unit\",policy=\"front\\\"end\"} 2\n"
        ));
        assert!(text.contains(
            "guard_dns_queries_inspected_total{binding=\"unit\",policy=\"front\\\"end\"} 7\n"
        ));
        assert!(
            text.contains("guard_events_lost_total{binding=\"unit\",policy=\"front\\\"end\"} 1\n")
        );
        assert!(text.contains("# TYPE guard_runs_active gauge\nguard_runs_active 3\n"));
    }
}
