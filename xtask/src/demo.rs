//! `cargo xtask demo`: the main job, end to end, on loopback only.
//!
//! In a private network and mount namespace: a DNS server on 127.0.0.1:53,
//! /etc/resolv.conf pointing at it, and `examples/deploy-db.sh` under
//! `guard run` with the shipped frontend policy. The deploy's own lookup
//! resolves; its drain tool's lookup of the frontend is refused and reported
//! with the process chain; guard exits 77.
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{require_root, setup};

pub fn demo() -> Result<()> {
    require_root("demo")?;
    setup::setup()?;
    let (root, bin) = crate::release_binaries()?;
    let temp = std::env::temp_dir().join(format!("guard-demo-{}", std::process::id()));
    std::fs::create_dir_all(&temp)?;
    let script = format!(
        r#"
set -e
cd {root}
ip link set lo up
printf 'nameserver 127.0.0.1\noptions attempts:1 timeout:2\n' > {temp}/resolv.conf
mount --bind {temp}/resolv.conf /etc/resolv.conf
{bin}/guard-dns-stub 127.0.0.1:53 300 2> {temp}/dns.log &
stub=$!
# The server is the demo's own: stop it however the demo ends.
trap 'kill $stub 2>/dev/null || true; wait $stub 2>/dev/null || true' EXIT
for i in $(seq 50); do grep -q serving {temp}/dns.log && break; sleep 0.1; done
echo
echo "\$ guard run --policy policies/frontend-during-db-deploy.yaml --report {temp}/report.json -- examples/deploy-db.sh"
set +e
{bin}/guard run --policy policies/frontend-during-db-deploy.yaml --report {temp}/report.json -- examples/deploy-db.sh
status=$?
set -e
echo
echo "guard exited with $status (77 = a lookup was blocked; a CI job fails here)"
echo
echo "The DNS server received (the refused lookup never left the host):"
# The server writes its log every 100 ms, and guard exits right after the
# report: give it one more tick, then stop it so the log is complete.
sleep 0.25
kill $stub 2>/dev/null || true
wait $stub 2>/dev/null || true
grep answered {temp}/dns.log | sed 's/^/  /'
echo
echo "The JSON report is {temp}/report.json"
exit $status
"#,
        root = root.display(),
        temp = temp.display(),
        bin = bin.display(),
    );
    let status = Command::new("unshare")
        .args([
            "--net",
            "--mount",
            "--propagation",
            "private",
            "--",
            "bash",
            "-c",
            &script,
        ])
        .status()
        .context("starting the demo (unshare)")?;
    match status.code() {
        Some(77) => Ok(()),
        _ => {
            bail!("the demo should end with guard's 77 (a blocked lookup), it ended with {status}")
        }
    }
}
