//! The Debian package on real systemd: installed with apt in a container
//! booted with systemd as PID 1 ([`crate::container`]), then used as an
//! operator would: a unit bound in the configuration that keeps resolving a
//! refused and an allowed name, reloads, restarts, `kill -9`, an upgrade, a
//! stop, `guard run` through the daemon, a fresh boot, no configuration
//! file, and a purge that must leave nothing pinned or attached.
//!
//! DNS inside the container is dnsmasq on 127.0.0.1 only (the container has
//! no other network): it answers `*.frontend.internal` and `db.internal`
//! and logs every query it receives, so "refused" is checked at the server
//! too: a refused name must never reach it.
use std::{
    fs,
    os::unix::fs::symlink,
    path::Path,
    process::Child,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::container::{self, check_interrupted, Container};

const DNS_UNIT: &str = "\
[Unit]
Description=guard container test: DNS server on loopback
Before=guard.service deploy-agent.service

[Service]
# The container has loopback only; getaddrinfo's AI_ADDRCONFIG asks for IPv4
# only where a non-loopback IPv4 address exists.
ExecStartPre=/sbin/ip address replace 192.0.2.1/32 dev lo
ExecStart=/usr/sbin/dnsmasq --keep-in-foreground --no-resolv --no-hosts --user=root \\
    --listen-address=127.0.0.1 --bind-interfaces --port=53 --log-queries --log-facility=- \\
    --address=/frontend.internal/192.0.2.10 --address=/db.internal/192.0.2.20

[Install]
WantedBy=multi-user.target
";

/// The bound unit: it resolves a name the policy refuses and one it allows,
/// five times a second, and says what happened. /run/agent-pause holds it
/// (it answers with /run/agent-paused) so counts can be compared at rest.
const AGENT_UNIT: &str = r#"
[Unit]
Description=guard container test: a deploy agent bound in /etc/guard/daemon.yaml

[Service]
ExecStart=/bin/sh -c 'while :; do \
    if [ -e /run/agent-pause ]; then touch /run/agent-paused; sleep 0.1; continue; fi; \
    if getent ahostsv4 api.frontend.internal >/dev/null; then echo frontend-resolved; else echo frontend-refused; fi; \
    if getent ahostsv4 db.internal >/dev/null; then echo db-answered; else echo db-failed; fi; \
    sleep 0.2; done'

[Install]
WantedBy=multi-user.target
"#;

const BOUND_CONFIG: &str = "\
policies_dir: policies
bindings:
  - unit: deploy-agent.service
    policies: [frontend-during-db-deploy]
";

/// Installs `deb` in a freshly booted container and runs the cases.
pub fn package_test(root: &Path, deb: &Path) -> Result<()> {
    let started = Instant::now();
    let work = root.join("target/systemd-test");
    fs::create_dir_all(&work)?;
    let tarball = container::rootfs_tarball(&work)?;
    let mut cases = Cases::default();
    let result = run_cases(&work, &tarball, deb, &mut cases);
    println!(
        "systemd container: {} passed, {} failed ({:.0?} in all)",
        cases.passed,
        u32::from(result.is_err()),
        started.elapsed()
    );
    result
}

fn run_cases(work: &Path, tarball: &Path, deb: &Path, cases: &mut Cases) -> Result<()> {
    let mut c = Container::create(work, tarball)?;
    let result = cases_in(&mut c, deb, cases);
    if result.is_err() {
        // What the container's journal says helps more than any message.
        let script = "systemctl --no-pager --lines=0 status guard test-dns deploy-agent; \
                      journalctl -b --no-pager -n 60 -o short-monotonic -u guard -u test-dns; \
                      journalctl -b --no-pager -n 10 -o short-monotonic -u deploy-agent";
        if let Ok(output) = c.sh(script, 20) {
            println!(
                "systemd: the container's units and journal:\n{}",
                String::from_utf8_lossy(&output.stdout)
            );
        }
    }
    result
}

fn cases_in(c: &mut Container, deb: &Path, cases: &mut Cases) -> Result<()> {
    let deb_name = deb.file_name().context("package file name")?;
    fs::copy(deb, c.path("/root").join(deb_name))?;
    let deb_inside = format!("/root/{}", deb_name.to_string_lossy());
    fs::write(c.path("/etc/systemd/system/test-dns.service"), DNS_UNIT)?;
    fs::write(
        c.path("/etc/systemd/system/deploy-agent.service"),
        AGENT_UNIT,
    )?;
    symlink(
        "/etc/systemd/system/test-dns.service",
        c.path("/etc/systemd/system/multi-user.target.wants/test-dns.service"),
    )?;
    let t = Instant::now();
    c.boot()?;
    println!("container: booted in {:.1?}", t.elapsed());

    cases.case(
        "apt installs the package; guard.service is enabled and active, with no bindings",
        || {
            // As on a machine where nothing mounted bpffs: the service must
            // mount it where everyone sees it, not in its own namespace.
            c.sh_ok("umount /sys/fs/bpf && ! mountpoint -q /sys/fs/bpf", 10)?;
            c.sh_ok(
                &format!("DEBIAN_FRONTEND=noninteractive apt-get install -y -q {deb_inside}"),
                300,
            )?;
            c.sh_ok("mountpoint -q /sys/fs/bpf && test -d /sys/fs/bpf/guard", 10)?;
            expect_eq(
                &c.sh_ok("systemctl is-enabled guard.service", 10)?,
                "enabled",
            )?;
            expect_eq(&c.sh_ok("systemctl is-active guard.service", 10)?, "active")?;
            let unit = c.sh_ok("systemctl show -P FragmentPath guard.service", 10)?;
            ensure!(
                unit.trim().ends_with("/lib/systemd/system/guard.service"),
                "unit file: {unit}"
            );
            let status = c.sh_ok("guard status", 10)?;
            ensure!(
                status.contains("guarded:\n  nothing"),
                "guard status:\n{status}"
            );
            let journal = c.sh_ok("journalctl -b -u guard.service -o cat", 10)?;
            ensure!(
                journal.contains("ready") && journal.contains("bindings=0"),
                "journal:\n{journal}"
            );
            let conffiles = c.sh_ok("dpkg-query -W -f='${Conffiles}' guard", 10)?;
            ensure!(
                conffiles.contains("/etc/guard/daemon.yaml"),
                "conffiles: {conffiles}"
            );
            c.sh_ok(
                "test -x /usr/bin/guard && test -d /etc/guard/policies \
                 && test -f /usr/share/doc/guard/examples/policies/frontend-during-db-deploy.yaml \
                 && test -f /usr/share/doc/guard/examples/deploy-agent.service.d/guard.conf",
                10,
            )?;
            Ok(())
        },
    )?;

    cases.case("bash, zsh and fish completions and a man page per command are installed", || {
        let words = |line: &str| {
            format!(
                "bash -c '. /usr/share/bash-completion/completions/guard; COMP_WORDS=({line}); \
                 COMP_CWORD=$((${{#COMP_WORDS[@]}}-1)); COMP_LINE=\"{line}\"; COMP_POINT=${{#COMP_LINE}}; \
                 _guard guard \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
                 printf \"%s\\n\" \"${{COMPREPLY[@]}}\"'"
            )
        };
        let subcommands = c.sh_ok(&words("guard ru"), 10)?;
        ensure!(subcommands.lines().any(|l| l == "run"), "`guard ru<TAB>`: {subcommands:?}");
        let options = c.sh_ok(&words("guard run --pol"), 10)?;
        ensure!(options.lines().any(|l| l == "--policy"), "`guard run --pol<TAB>`: {options:?}");
        expect_eq(&c.sh_ok("head -n1 /usr/share/zsh/vendor-completions/_guard", 10)?, "#compdef guard")?;
        c.sh_ok("grep -q '^complete -c guard' /usr/share/fish/vendor_completions.d/guard.fish", 10)?;
        // Every command `guard --help` lists has its page, e.g. guard-run(1).
        let help = c.sh_ok("guard --help", 10)?;
        let commands: Vec<&str> = help
            .split("Commands:\n")
            .nth(1)
            .context("guard --help lists no commands")?
            .lines()
            .take_while(|l| !l.trim().is_empty())
            // Not the wrapped descriptions' continuation lines.
            .filter(|l| l.starts_with("  ") && !l[2..].starts_with(' '))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| *c != "help")
            .collect();
        ensure!(commands.contains(&"run") && commands.contains(&"daemon"), "{commands:?}");
        for page in std::iter::once("guard".to_string()).chain(commands.iter().map(|c| format!("guard-{c}"))) {
            let title = c.sh_ok(&format!("zcat /usr/share/man/man1/{page}.1.gz | grep '^\\.TH'"), 10)?;
            ensure!(title.to_lowercase().contains(&page), "{page}.1: {title}");
        }
        c.sh_ok("zcat /usr/share/man/man1/guard-run.1.gz | grep -q 'policy'", 10)?;
        Ok(())
    })?;

    cases.case("a unit bound in the configuration is guarded after `systemctl reload guard`", || {
        let daemon_pid = main_pid(c, "guard")?;
        c.sh_ok("cp /usr/share/doc/guard/examples/policies/frontend-during-db-deploy.yaml /etc/guard/policies/ \
                 && mkdir -p /etc/systemd/system/deploy-agent.service.d \
                 && cp /usr/share/doc/guard/examples/deploy-agent.service.d/guard.conf /etc/systemd/system/deploy-agent.service.d/", 10)?;
        fs::write(c.path("/etc/guard/daemon.yaml"), BOUND_CONFIG)?;
        c.sh_ok("systemctl reload guard", 30)?;
        ensure!(main_pid(c, "guard")? == daemon_pid, "reload restarted the daemon");
        c.sh_ok("systemctl daemon-reload && systemctl enable --now deploy-agent.service", 30)?;
        let status = binding(c, "deploy-agent.service")?;
        ensure!(status["cgroup"].is_string(), "deploy-agent.service is not guarded: {status}");
        wait_for_lookups(c, 3)?;
        Ok(())
    })?;

    let t = Instant::now();
    c.shutdown()?;
    c.boot()?;
    println!("container: rebooted in {:.1?}", t.elapsed());

    cases.case(
        "after a fresh boot guard.service is active and the bound unit starts guarded, after it",
        || {
            expect_eq(&c.sh_ok("systemctl is-active guard.service", 10)?, "active")?;
            let journal = c.sh_ok("journalctl -b -u guard.service -o cat", 10)?;
            ensure!(
                journal.contains("loaded, attached and pinned the programs"),
                "journal:\n{journal}"
            );
            expect_eq(
                &c.sh_ok("systemctl is-active deploy-agent.service", 10)?,
                "active",
            )?;
            let ready = monotonic(c, "guard", "ActiveEnterTimestampMonotonic")?;
            let agent = monotonic(c, "deploy-agent", "ExecMainStartTimestampMonotonic")?;
            ensure!(
                ready <= agent,
                "deploy-agent started ({agent}) before guard was ready ({ready})"
            );
            wait_for_lookups(c, 3)?;
            Ok(())
        },
    )?;

    cases.case("the journal has one structured record per refused lookup", || {
        c.sh_ok("rm -f /run/agent-paused; touch /run/agent-pause; \
                 for i in $(seq 100); do [ -e /run/agent-paused ] && exit 0; sleep 0.1; done; exit 1", 20)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        let (settled, last) = loop {
            let status = binding(c, "deploy-agent.service")?;
            let blocked = status["counters"]["blocked"].as_u64().unwrap_or(0);
            ensure!(status["events_lost"].as_u64() == Some(0), "events were lost: {status}");
            let records = c.sh_ok(
                "journalctl -b -u guard.service -o cat | grep -F 'guard::blocked' | grep -cF 'guarded=\"deploy-agent.service\"' || true",
                10,
            )?;
            let last = (blocked, records.trim().parse::<u64>().unwrap_or(0));
            if last.0 > 0 && last.0 == last.1 {
                break (true, last);
            }
            if Instant::now() > deadline {
                break (false, last);
            }
            thread::sleep(Duration::from_millis(300));
        };
        ensure!(settled, "the kernel counted {} blocked lookups, the journal has {} records", last.0, last.1);
        let record = c.sh_ok("journalctl -b -u guard.service -o cat | grep 'guard::blocked' | tail -n1", 10)?;
        for field in [
            "name=api.frontend.internal",
            "query_type=A",
            "binding=\"unit\"",
            "policy=\"frontend-during-db-deploy\"",
            "rule=\"deny *.frontend.internal",
            "chain=",
        ] {
            ensure!(record.contains(field), "no {field} in {record}");
        }
        ensure!(record.contains("getent ahostsv4 api.frontend.internal"), "chain: {record}");
        c.sh_ok("rm -f /run/agent-pause", 10)?;
        Ok(())
    })?;

    cases.case(
        "`systemctl reload guard` keeps the daemon and the binding",
        || {
            let daemon_pid = main_pid(c, "guard")?;
            c.sh_ok("systemctl reload guard", 30)?;
            ensure!(
                main_pid(c, "guard")? == daemon_pid,
                "reload restarted the daemon"
            );
            ensure!(
                binding(c, "deploy-agent.service")?["cgroup"].is_string(),
                "binding lost"
            );
            wait_for_lookups(c, 3)?;
            Ok(())
        },
    )?;

    cases.case("`systemctl restart guard`: ready when restart returns; the bound unit keeps its PID and stays guarded", || {
        let (agent, daemon) = (main_pid(c, "deploy-agent")?, main_pid(c, "guard")?);
        // Type=notify: once `systemctl restart` returns, the daemon answers.
        c.sh_ok("systemctl restart guard && guard status >/dev/null", 60)?;
        ensure!(main_pid(c, "guard")? != daemon, "the daemon was not restarted");
        ensure!(main_pid(c, "deploy-agent")? == agent, "deploy-agent.service was restarted with guard");
        wait_for_lookups(c, 3)?;
        Ok(())
    })?;

    cases.case("`kill -9` of the daemon: systemd restarts it; the bound unit keeps its PID and stays guarded", || {
        let (agent, daemon) = (main_pid(c, "deploy-agent")?, main_pid(c, "guard")?);
        c.sh_ok(&format!("kill -9 {daemon}"), 10)?;
        wait_until("guard.service restarted after kill -9", 30, || {
            let pid = main_pid(c, "guard")?;
            Ok(pid != 0 && pid != daemon && is_active(c, "guard")?)
        })?;
        let journal = c.sh_ok("journalctl -b -u guard.service -o cat", 10)?;
        ensure!(journal.contains("adopted the pinned programs"), "journal:\n{journal}");
        ensure!(main_pid(c, "deploy-agent")? == agent, "deploy-agent.service was restarted");
        wait_for_lookups(c, 3)?;
        Ok(())
    })?;

    cases.case(
        "an upgrade (reinstall) restarts the daemon, keeps the edited conffile, and the bound unit guarded",
        || {
            let (agent, daemon) = (main_pid(c, "deploy-agent")?, main_pid(c, "guard")?);
            c.sh_ok(
                &format!(
                    "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --reinstall {deb_inside}"
                ),
                300,
            )?;
            ensure!(is_active(c, "guard")?, "guard.service is not active after the upgrade");
            ensure!(main_pid(c, "guard")? != daemon, "the upgrade did not restart the daemon");
            ensure!(main_pid(c, "deploy-agent")? == agent, "deploy-agent.service was restarted");
            ensure!(
                fs::read_to_string(c.path("/etc/guard/daemon.yaml"))? == BOUND_CONFIG,
                "the upgrade replaced the edited /etc/guard/daemon.yaml"
            );
            ensure!(binding(c, "deploy-agent.service")?["cgroup"].is_string(), "binding lost");
            wait_for_lookups(c, 3)?;
            Ok(())
        },
    )?;

    cases.case("`systemctl stop guard`: the bound unit keeps running, still refused (enforcement is pinned)", || {
        let agent = main_pid(c, "deploy-agent")?;
        c.sh_ok("systemctl stop guard", 30)?;
        wait_for_lookups(c, 3)?;
        ensure!(!is_active(c, "guard")?, "guard.service is active again");
        ensure!(main_pid(c, "deploy-agent")? == agent, "deploy-agent.service was stopped or restarted");
        c.sh_ok("systemctl start guard", 60)?;
        Ok(())
    })?;

    cases.case("`guard run` in the container goes through the daemon and exits 77", || {
        let output = c.sh(
            "systemd-run --wait --pipe --quiet guard run --report /root/run.json --deny '*.frontend.internal' \
             -- getent ahostsv4 api.frontend.internal",
            60,
        )?;
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        ensure!(output.status.code() == Some(77), "exit {:?}:\n{text}", output.status.code());
        ensure!(text.contains("api.frontend.internal"), "{text}");
        let report: serde_json::Value = serde_json::from_slice(&fs::read(c.path("/root/run.json"))?)?;
        let cgroup = report["cgroup"].as_str().unwrap_or_default();
        ensure!(cgroup.contains("/guard.service/runs/"), "the run's cgroup is not the daemon's: {cgroup}");
        Ok(())
    })?;

    cases.case(
        "KillMode=process: a `guard run` in progress outlives a restart of the daemon",
        || {
            let run = c.spawn_sh(
                "systemd-run --wait --pipe --quiet guard run --deny '*.frontend.internal' \
             -- sh -c 'sleep 4; getent ahostsv4 api.frontend.internal'",
            )?;
            let run = KillOnDrop(run);
            wait_until("the run to appear in guard status", 20, || {
                Ok(status(c)?["bindings"]
                    .as_array()
                    .is_some_and(|b| b.iter().any(|b| b["kind"] == "run")))
            })?;
            c.sh_ok("systemctl restart guard", 60)?;
            let output = wait_child(run, 60)?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            ensure!(
                output.status.code() == Some(77),
                "exit {:?}:\n{text}",
                output.status.code()
            );
            ensure!(text.contains("api.frontend.internal"), "{text}");
            Ok(())
        },
    )?;

    cases.case("a run through the daemon keeps the devices a standalone run has (/dev/net/tun)", || {
        for mode in ["", "--standalone"] {
            c.sh_ok(&format!(
                "systemd-run --wait --pipe --quiet guard run {mode} --deny x.invalid -- sh -c 'exec 3<>/dev/net/tun'"
            ), 60)?;
        }
        Ok(())
    })?;

    cases.case(
        "systemd-analyze security guard.service: exposure 4.0 or lower",
        || {
            let analysis = c.sh_ok("systemd-analyze security guard.service", 30)?;
            let exposure: f64 = analysis
                .lines()
                .find_map(|l| l.split("guard.service: ").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("no overall exposure in:\n{analysis}"))?;
            println!("systemd: guard.service exposure {exposure:.1}");
            ensure!(exposure <= 4.0, "exposure {exposure}:\n{analysis}");
            Ok(())
        },
    )?;

    cases.case(
        "without /etc/guard/daemon.yaml the service starts, says so, guards nothing; --uninstall works",
        || {
            c.sh_ok(
                "mv /etc/guard/daemon.yaml /root/daemon.yaml.saved && systemctl restart guard",
                60,
            )?;
            expect_eq(&c.sh_ok("systemctl is-active guard", 10)?, "active")?;
            let journal = c.sh_ok("journalctl -b -u guard.service -o cat | tail -n 20", 10)?;
            ensure!(
                journal.contains("no configuration file"),
                "journal:\n{journal}"
            );
            let bindings = status(c)?["bindings"].clone();
            ensure!(
                bindings.as_array().is_some_and(|b| b.is_empty()),
                "bindings: {bindings}"
            );
            // `--uninstall` needs no configuration file either.
            let uninstall = c.sh_ok("systemctl stop guard && guard daemon --uninstall", 30)?;
            ensure!(uninstall.contains("removed /sys/fs/bpf/guard"), "{uninstall}");
            c.sh_ok("test ! -e /sys/fs/bpf/guard", 10)?;
            c.sh_ok(
                "mv /root/daemon.yaml.saved /etc/guard/daemon.yaml && systemctl start guard",
                60,
            )?;
            ensure!(
                binding(c, "deploy-agent.service")?["cgroup"].is_string(),
                "binding not restored"
            );
            Ok(())
        },
    )?;

    cases.case("`apt-get purge guard` ends runs, leaves nothing pinned or attached, removes the conffile", || {
        c.sh_ok("systemd-run --unit=run-in-progress --no-block guard run --deny x.invalid -- sleep 601", 30)?;
        wait_until("the run to appear in guard status", 20, || {
            Ok(status(c)?["bindings"].as_array().is_some_and(|b| b.iter().any(|b| b["kind"] == "run")))
        })?;
        // The check below can see guard's program: it is there now.
        let attached = c.sh_ok("bpftool cgroup tree /sys/fs/cgroup", 30)?;
        ensure!(attached.contains("dns_egress"), "bpftool sees no guard program:\n{attached}");
        c.sh_ok("DEBIAN_FRONTEND=noninteractive apt-get purge -y -q guard", 120)?;
        let attached = c.sh_ok("bpftool cgroup tree /sys/fs/cgroup", 30)?;
        ensure!(!attached.contains("dns_egress"), "still attached after purge:\n{attached}");
        // Every bpffs has the kernel's maps.debug and progs.debug.
        let pinned = c.sh_ok("ls -A /sys/fs/bpf", 10)?;
        let pinned: Vec<&str> = pinned
            .lines()
            .filter(|name| !["maps.debug", "progs.debug"].contains(name))
            .collect();
        ensure!(pinned.is_empty(), "still pinned: {pinned:?}");
        // The run's command was ended (its `guard run` sees the pins gone
        // and exits 75, the guard removed) and its cgroup is gone.
        wait_until("the run's command to end", 10, || {
            Ok(c.sh("pgrep -fx 'sleep 601'", 10)?.status.code() == Some(1))
        })?;
        wait_until("the run's cgroup to go", 10, || {
            Ok(c.sh("test -e /sys/fs/cgroup/system.slice/guard.service", 10)?.status.code() == Some(1))
        })?;
        // The conffile goes; the policy the operator copied in stays.
        c.sh_ok("test ! -e /usr/bin/guard && test ! -e /etc/guard/daemon.yaml \
                 && test -f /etc/guard/policies/frontend-during-db-deploy.yaml", 10)?;
        expect_eq(&c.sh_ok("systemctl show -P LoadState guard.service", 10)?, "not-found")?;
        // Should its `guard run` still be there, it goes.
        c.sh_ok("systemctl kill --signal=SIGKILL run-in-progress", 10)?;
        // And the bound unit, no longer guarded, now resolves the frontend.
        wait_until("the frontend to resolve once guard is purged", 20, || {
            Ok(count(c, "deploy-agent", "frontend-resolved")? > 0)
        })?;
        Ok(())
    })?;

    let t = Instant::now();
    c.shutdown()?;
    println!("container: powered off in {:.1?}", t.elapsed());
    Ok(())
}

#[derive(Default)]
struct Cases {
    passed: u32,
}

impl Cases {
    fn case(&mut self, name: &str, body: impl FnOnce() -> Result<()>) -> Result<()> {
        check_interrupted()?;
        let started = Instant::now();
        match body() {
            Ok(()) => {
                self.passed += 1;
                println!("systemd: ok   {name} ({:.1?})", started.elapsed());
                Ok(())
            }
            Err(e) => {
                println!("systemd: FAIL {name}: {e:#}");
                bail!("systemd container test failed: {name}")
            }
        }
    }
}

fn expect_eq(actual: &str, expected: &str) -> Result<()> {
    ensure!(
        actual.trim() == expected,
        "expected {expected:?}, got {:?}",
        actual.trim()
    );
    Ok(())
}

/// `systemctl is-active` (which exits non-zero for every other state).
fn is_active(c: &Container, unit: &str) -> Result<bool> {
    let output = c.sh(&format!("systemctl is-active {unit}"), 10)?;
    Ok(String::from_utf8_lossy(&output.stdout).trim() == "active")
}

fn main_pid(c: &Container, unit: &str) -> Result<u32> {
    let pid = c.sh_ok(&format!("systemctl show -P MainPID {unit}"), 10)?;
    pid.trim()
        .parse()
        .with_context(|| format!("MainPID of {unit}: {pid:?}"))
}

fn monotonic(c: &Container, unit: &str, property: &str) -> Result<u64> {
    let value = c.sh_ok(&format!("systemctl show -P {property} {unit}"), 10)?;
    value
        .trim()
        .parse()
        .with_context(|| format!("{property} of {unit}: {value:?}"))
}

fn status(c: &Container) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&c.sh_ok("guard status --json", 10)?)?)
}

fn binding(c: &Container, unit: &str) -> Result<serde_json::Value> {
    let status = status(c)?;
    status["bindings"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["target"] == unit).cloned())
        .with_context(|| format!("no binding for {unit} in {status}"))
}

/// Lines of `unit`'s journal in this boot containing `needle`.
fn count(c: &Container, unit: &str, needle: &str) -> Result<u64> {
    let n = c.sh_ok(
        &format!("journalctl -b -u {unit} -o cat | grep -cF -- '{needle}' || true"),
        10,
    )?;
    Ok(n.trim().parse().unwrap_or(0))
}

/// Waits for `rounds` more lookup rounds of the bound unit, each with the
/// frontend refused and db.internal answered, and checks that the frontend
/// never resolved, in the unit or at the DNS server.
fn wait_for_lookups(c: &Container, rounds: u64) -> Result<()> {
    let refused = count(c, "deploy-agent", "frontend-refused")?;
    let answered = count(c, "deploy-agent", "db-answered")?;
    wait_until(
        &format!("{rounds} more rounds of lookups by deploy-agent.service"),
        30,
        || {
            Ok(
                count(c, "deploy-agent", "frontend-refused")? >= refused + rounds
                    && count(c, "deploy-agent", "db-answered")? >= answered + rounds,
            )
        },
    )?;
    ensure!(
        count(c, "deploy-agent", "frontend-resolved")? == 0,
        "the frontend resolved"
    );
    ensure!(
        count(c, "deploy-agent", "db-failed")? == 0,
        "db.internal did not resolve"
    );
    ensure!(
        count(c, "test-dns", "frontend.internal")? == 0,
        "a frontend query reached the DNS server"
    );
    ensure!(
        count(c, "test-dns", "query[A] db.internal")? > 0,
        "the DNS server saw no query at all"
    );
    Ok(())
}

fn wait_until(what: &str, seconds: u64, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        check_interrupted()?;
        if done()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {seconds} s waiting for {what}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// A child process (nsenter) killed if the case ends early.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_child(mut child: KillOnDrop, seconds: u64) -> Result<std::process::Output> {
    wait_until("the run to finish", seconds, || {
        Ok(child.0.try_wait()?.is_some())
    })?;
    let mut output = std::process::Output {
        status: child.0.wait()?,
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    use std::io::Read as _;
    if let Some(mut out) = child.0.stdout.take() {
        out.read_to_end(&mut output.stdout)?;
    }
    if let Some(mut err) = child.0.stderr.take() {
        err.read_to_end(&mut output.stderr)?;
    }
    Ok(output)
}
