//! The daemon's configuration: `/etc/guard/daemon.yaml` by default.
//!
//! ```yaml
//! policies_dir: policies          # relative to this file; every *.yaml in it
//! bindings:
//!   - unit: deploy-agent.service  # every process of the unit, now and later
//!     policies: [frontend-during-db-deploy]
//!   - cgroup: /deploy.slice/chef-client.service
//!     policies: [frontend-during-db-deploy, no-package-mirrors]
//!     mode: audit                 # report instead of block (default: enforce)
//! metrics_address: 127.0.0.1:9464 # optional; loopback only
//! ```
use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;

use crate::{
    error::PolicyError,
    input::{self, InputError},
    policy::{check_unique_names, yaml, yaml::Text, Mode, Policy, RuleSet},
};

pub const DEFAULT_CONFIG: &str = "/etc/guard/daemon.yaml";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/guard";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    policies_dir: Option<Text>,
    #[serde(default)]
    bindings: Vec<BindingFile>,
    #[serde(default)]
    socket: Option<Text>,
    #[serde(default)]
    pin_dir: Option<Text>,
    #[serde(default)]
    runs_cgroup: Option<Text>,
    #[serde(default)]
    metrics_address: Option<Text>,
    #[serde(default)]
    dns_ports: Option<Vec<u16>>,
    #[serde(default)]
    resolver_sockets: Vec<Text>,
    #[serde(default)]
    rule_capacity: Option<u32>,
    #[serde(default)]
    max_policies: Option<u32>,
    #[serde(default)]
    ring_buffer_size: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BindingFile {
    #[serde(default)]
    unit: Option<Text>,
    #[serde(default)]
    cgroup: Option<Text>,
    policies: Vec<Text>,
    #[serde(default)]
    mode: Option<Mode>,
}

/// What a binding guards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A systemd unit, found by its cgroup's name wherever it is.
    Unit(String),
    /// A cgroup path, relative to the cgroup2 mount.
    Cgroup(PathBuf),
}

impl Target {
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Unit(_) => "unit",
            Target::Cgroup(_) => "cgroup",
        }
    }

    pub fn name(&self) -> String {
        match self {
            Target::Unit(unit) => unit.clone(),
            Target::Cgroup(path) => path.display().to_string(),
        }
    }
}

#[derive(Debug)]
pub struct BindingConfig {
    pub target: Target,
    pub policies: Vec<String>,
    pub mode: Mode,
    pub rules: Arc<RuleSet>,
}

#[derive(Debug)]
pub struct Config {
    pub path: PathBuf,
    pub policies_dir: PathBuf,
    pub bindings: Vec<BindingConfig>,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub runs_cgroup: Option<PathBuf>,
    pub metrics_address: Option<SocketAddr>,
    pub dns_ports: Vec<u16>,
    /// Resolver-daemon sockets refused besides the defaults.
    pub resolver_sockets: Vec<PathBuf>,
    pub rule_capacity: u32,
    pub max_policies: u32,
    pub ring_buffer_size: u32,
    /// Entries of the policies directory named like policies that are not
    /// regular files (a FIFO, a device, a directory), each with why: they
    /// are skipped, never read, and the daemon reports them.
    pub skipped_policy_files: Vec<String>,
}

impl Config {
    /// Reads the configuration and every policy it names. Every problem is
    /// reported with the file, the line and the offending value.
    pub fn load(path: &Path) -> Result<Config, PolicyError> {
        let text = input::read_text(path)?;
        Config::parse(path, &text)
    }

    /// The configuration at `path` or, when there is no file there, the
    /// defaults: no bindings (the daemon then only hosts `guard run`s).
    /// Used at start and by `--uninstall`; a reload still requires the file.
    pub fn load_or_default(path: &Path) -> Result<Config, PolicyError> {
        match fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::parse(path, "{}"),
            _ => Config::load(path),
        }
    }

    /// Where the socket, the pins and the runs cgroup are, for `guard
    /// daemon --uninstall`: the file's settings without its bindings, and
    /// no policy read, so that no policy (broken, or a FIFO that blocks)
    /// can keep guard from being removed. Defaults without a file.
    pub fn load_locations(path: &Path) -> Result<Config, PolicyError> {
        let text = match fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "{}".to_owned(),
            _ => input::read_text(path)?,
        };
        Config::parse_with(path, &text, false)
    }

    fn parse(path: &Path, text: &str) -> Result<Config, PolicyError> {
        Config::parse_with(path, text, true)
    }

    fn parse_with(path: &Path, text: &str, read_policies: bool) -> Result<Config, PolicyError> {
        let mut file: ConfigFile = yaml::from_str(text, path)?;
        let invalid = |needle: &str, message: String| PolicyError::Invalid {
            path: path.to_owned(),
            line: line_of(text, needle),
            message,
        };
        let base = path.parent().unwrap_or(Path::new("/"));
        let policies_dir = base.join(
            file.policies_dir
                .clone()
                .map_or_else(|| PathBuf::from("policies"), PathBuf::from),
        );
        if !read_policies {
            file.bindings.clear();
        }
        // Policies serve bindings only: without either there is nothing to load.
        let mut skipped_policy_files = Vec::new();
        let policies = if !read_policies || (file.bindings.is_empty() && !policies_dir.exists()) {
            BTreeMap::new()
        } else {
            load_policy_dir(&policies_dir, &mut skipped_policy_files)?
        };

        let mut bindings = Vec::new();
        for (index, binding) in file.bindings.iter().enumerate() {
            let cgroup = binding.cgroup.clone().map(PathBuf::from);
            let target = match (binding.unit.as_ref().map(|Text(unit)| unit), &cgroup) {
                (Some(unit), None) if valid_unit_name(unit) => Target::Unit(unit.clone()),
                (Some(unit), None) => {
                    return Err(invalid(
                        unit,
                        format!(
                        "binding {}: unit {unit:?} is not a unit name (e.g. deploy-agent.service)",
                        index + 1
                    ),
                    ))
                }
                (None, Some(cgroup)) => {
                    let relative = cgroup.strip_prefix("/").unwrap_or(cgroup);
                    if relative.as_os_str().is_empty()
                        || relative
                            .components()
                            .any(|c| !matches!(c, std::path::Component::Normal(_)))
                    {
                        return Err(invalid(
                            &cgroup.display().to_string(),
                            format!("binding {}: cgroup {:?} must be a path below the cgroup root, without `..`", index + 1, cgroup.display().to_string()),
                        ));
                    }
                    Target::Cgroup(relative.to_owned())
                }
                _ => {
                    return Err(invalid(
                        "policies",
                        format!(
                            "binding {}: give exactly one of `unit` and `cgroup`",
                            index + 1
                        ),
                    ))
                }
            };
            if binding.policies.is_empty() {
                return Err(invalid(
                    "policies",
                    format!(
                        "binding {} ({}): `policies` is empty",
                        index + 1,
                        target.name()
                    ),
                ));
            }
            let mut chosen = Vec::new();
            let names: Vec<String> = binding.policies.iter().cloned().map(String::from).collect();
            for name in &names {
                let policy = policies.get(name).ok_or_else(|| {
                    invalid(
                        name,
                        format!(
                            "binding {} ({}): unknown policy {name:?}; {} has: {}",
                            index + 1,
                            target.name(),
                            policies_dir.display(),
                            policies.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    )
                })?;
                chosen.push(policy.clone());
            }
            let mode = binding.mode.unwrap_or(Mode::Enforce);
            let rules = RuleSet::compile(&chosen, mode == Mode::Audit)?;
            if bindings.iter().any(|b: &BindingConfig| b.target == target) {
                return Err(invalid(
                    &target.name(),
                    format!("{} {} is bound twice", target.kind(), target.name()),
                ));
            }
            bindings.push(BindingConfig {
                target,
                policies: names,
                mode,
                rules: Arc::new(rules),
            });
        }

        let metrics_address = match &file.metrics_address {
            None => None,
            Some(Text(text)) => {
                let address: SocketAddr = text.parse().map_err(|e| {
                    invalid(
                        text,
                        format!("metrics_address {text:?}: {e} (expected e.g. 127.0.0.1:9464)"),
                    )
                })?;
                if !address.ip().is_loopback() {
                    return Err(invalid(
                        text,
                        format!("metrics_address {text:?} is not a loopback address; metrics are served on loopback only"),
                    ));
                }
                Some(address)
            }
        };
        let dns_ports = file.dns_ports.clone().unwrap_or_else(|| vec![53]);
        if dns_ports.is_empty()
            || dns_ports.len() > guard_common::maps::MAX_DNS_PORTS
            || dns_ports.contains(&0)
        {
            return Err(invalid(
                "dns_ports",
                format!(
                    "dns_ports {dns_ports:?}: give 1 to {} non-zero ports",
                    guard_common::maps::MAX_DNS_PORTS
                ),
            ));
        }
        let ring_buffer_size = file.ring_buffer_size.unwrap_or(4 << 20);
        if ring_buffer_size < 4096 || !ring_buffer_size.is_power_of_two() {
            return Err(invalid(
                "ring_buffer_size",
                format!(
                    "ring_buffer_size {ring_buffer_size} is not a power of two of at least 4096"
                ),
            ));
        }
        Ok(Config {
            path: path.to_owned(),
            policies_dir,
            bindings,
            socket: file
                .socket
                .map_or_else(|| PathBuf::from(crate::api::DEFAULT_SOCKET), PathBuf::from),
            pin_dir: file
                .pin_dir
                .map_or_else(|| PathBuf::from(DEFAULT_PIN_DIR), PathBuf::from),
            runs_cgroup: file.runs_cgroup.map(PathBuf::from),
            metrics_address,
            dns_ports,
            resolver_sockets: file
                .resolver_sockets
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            rule_capacity: file.rule_capacity.unwrap_or(131_072).max(1),
            max_policies: file.max_policies.unwrap_or(4096).max(16),
            ring_buffer_size,
            skipped_policy_files,
        })
    }

    /// Logs each skipped entry of the policies directory (at start and on
    /// every reload, so the journal says why a policy is missing).
    pub fn warn_about_skipped_files(&self) {
        for skipped in &self.skipped_policy_files {
            tracing::warn!("skipped in the policies directory: {skipped}");
        }
    }

    /// Settings that are baked into the loaded object or the process; a
    /// reload cannot change them.
    pub fn restart_only_settings(&self) -> String {
        format!(
            "{:?}",
            (
                &self.socket,
                &self.pin_dir,
                &self.runs_cgroup,
                &self.metrics_address,
                &self.dns_ports,
                &self.resolver_sockets,
                self.rule_capacity,
                self.max_policies,
                self.ring_buffer_size
            )
        )
    }
}

/// Every `*.yaml`/`*.yml` policy in `dir`, by name. Two files with one name
/// are an error: a binding must not depend on directory order. Entries that
/// are not regular files go to `skipped` (a FIFO must not hang a reload; a
/// stray directory must not stop the daemon); a policy a binding needs is
/// then reported missing, with the file named in the log.
fn load_policy_dir(
    dir: &Path,
    skipped: &mut Vec<String>,
) -> Result<BTreeMap<String, Policy>, PolicyError> {
    let entries = fs::read_dir(dir).map_err(|source| PolicyError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    paths.sort();
    let mut policies = Vec::new();
    for path in paths {
        match Policy::load(&path) {
            Ok(policy) => policies.push(policy),
            Err(PolicyError::Input(error @ InputError::NotRegular { .. })) => {
                skipped.push(error.to_string());
            }
            Err(error) => return Err(error),
        }
    }
    check_unique_names(&policies)?;
    Ok(policies
        .into_iter()
        .map(|policy| (policy.name.clone(), policy))
        .collect())
}

fn valid_unit_name(unit: &str) -> bool {
    const SUFFIXES: [&str; 3] = [".service", ".scope", ".slice"];
    SUFFIXES
        .iter()
        .any(|s| unit.len() > s.len() && unit.ends_with(s))
        && !unit.contains('/')
        && unit != "."
        && unit != ".."
}

/// The 1-based line of the first occurrence of `needle` (serde_yaml gives
/// positions only for syntax errors).
fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines()
        .position(|line| line.contains(needle))
        .map(|index| index + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }

    fn setup(config: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("policies")).unwrap();
        write(
            &dir.path().join("policies"),
            "frontend.yaml",
            "name: frontend\ndeny:\n  - \"*.frontend.internal\"\n",
        );
        let path = write(dir.path(), "daemon.yaml", config);
        (dir, path)
    }

    #[test]
    fn uninstall_reads_the_locations_and_no_policy() {
        let (dir, path) = setup(
            "socket: /run/x/guard.sock\npin_dir: /sys/fs/bpf/x\nruns_cgroup: /x/runs\nbindings:\n  - unit: deploy-agent.service\n    policies: [nope]\n",
        );
        write(&dir.path().join("policies"), "broken.yaml", "name: [");
        assert!(Config::load(&path).is_err());
        let config = Config::load_locations(&path).unwrap();
        assert_eq!(config.socket, Path::new("/run/x/guard.sock"));
        assert_eq!(config.pin_dir, Path::new("/sys/fs/bpf/x"));
        assert_eq!(config.runs_cgroup.as_deref(), Some(Path::new("/x/runs")));
        assert!(config.bindings.is_empty());
        let defaults = Config::load_locations(&dir.path().join("absent.yaml")).unwrap();
        assert_eq!(defaults.pin_dir, Path::new(DEFAULT_PIN_DIR));
    }

    #[test]
    fn loads_bindings_with_their_rules() {
        let (_dir, path) = setup(
            "bindings:\n  - unit: deploy-agent.service\n    policies: [frontend]\n  - cgroup: /deploy.slice/x\n    policies: [frontend]\n    mode: audit\n",
        );
        let config = Config::load(&path).unwrap();
        assert_eq!(config.bindings.len(), 2);
        assert_eq!(
            config.bindings[0].target,
            Target::Unit("deploy-agent.service".into())
        );
        assert_eq!(
            config.bindings[1].target,
            Target::Cgroup("deploy.slice/x".into())
        );
        assert_eq!(config.bindings[1].mode, Mode::Audit);
        assert_eq!(config.bindings[0].rules.deny_count(), 1);
        assert_eq!(config.socket, PathBuf::from(crate::api::DEFAULT_SOCKET));
    }

    #[test]
    fn names_file_line_and_value_of_an_unknown_policy() {
        let (_dir, path) = setup(
            "bindings:\n  - unit: deploy-agent.service\n    policies:\n      - frontend\n      - frontedn\n",
        );
        let message = Config::load(&path).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("{}:5:", path.display())),
            "{message}"
        );
        assert!(message.contains("unknown policy \"frontedn\""), "{message}");
        assert!(message.contains("frontend"), "{message}");
    }

    #[test]
    fn refuses_typos_non_loopback_metrics_and_escaping_cgroups() {
        let (_dir, path) = setup("bindngs: []\n");
        let message = Config::load(&path).unwrap_err().to_string();
        assert!(message.contains("bindngs"), "{message}");
        assert!(message.contains(":1"), "{message}");

        let (_dir, path) = setup("metrics_address: 0.0.0.0:9464\n");
        let message = Config::load(&path).unwrap_err().to_string();
        assert!(message.contains(":1:"), "{message}");
        assert!(message.contains("not a loopback address"), "{message}");

        let (_dir, path) = setup("bindings:\n  - cgroup: /a/../../etc\n    policies: [frontend]\n");
        let message = Config::load(&path).unwrap_err().to_string();
        assert!(message.contains(":2:"), "{message}");
        assert!(message.contains("without `..`"), "{message}");

        let (_dir, path) = setup("bindings:\n  - unit: deploy-agent\n    policies: [frontend]\n");
        let message = Config::load(&path).unwrap_err().to_string();
        assert!(message.contains("not a unit name"), "{message}");
    }

    #[test]
    fn no_file_means_the_defaults_and_no_bindings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.yaml");
        let config = Config::load_or_default(&path).unwrap();
        assert!(config.bindings.is_empty());
        assert_eq!(config.path, path);
        assert_eq!(config.socket, PathBuf::from(crate::api::DEFAULT_SOCKET));
        assert_eq!(config.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert_eq!(config.dns_ports, [53]);
        // A reload, by contrast, needs the file.
        let message = Config::load(&path).unwrap_err().to_string();
        assert!(message.contains("daemon.yaml"), "{message}");
    }

    #[test]
    fn a_missing_policies_dir_matters_only_to_bindings() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "daemon.yaml", "bindings: []\n");
        assert!(Config::load(&path).unwrap().bindings.is_empty());

        write(
            dir.path(),
            "daemon.yaml",
            "bindings:\n  - unit: deploy-agent.service\n    policies: [frontend]\n",
        );
        let message = Config::load(&path).unwrap_err().to_string();
        assert!(message.contains("policies: cannot read"), "{message}");
    }

    #[test]
    fn special_files_in_the_policies_dir_are_skipped_and_named() {
        let (dir, path) =
            setup("bindings:\n  - unit: deploy-agent.service\n    policies: [frontend]\n");
        let policies = dir.path().join("policies");
        let fifo = policies.join("fifo.yaml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        fs::create_dir(policies.join("dir.yml")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", policies.join("zero.yaml")).unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.bindings.len(), 1);
        assert_eq!(
            config.skipped_policy_files,
            [
                format!(
                    "{}/dir.yml: cannot read: it is a directory, not a regular file",
                    policies.display()
                ),
                format!(
                    "{}: cannot read: it is a FIFO, not a regular file",
                    fifo.display()
                ),
                format!(
                    "{}/zero.yaml: cannot read: it is a character device, not a regular file",
                    policies.display()
                ),
            ]
        );
    }

    #[test]
    fn wrong_types_in_the_configuration_are_errors_with_lines() {
        let (_dir, path) = setup("bindings:\n  - unit: 5\n    policies: [frontend]\n");
        let message = Config::load(&path).unwrap_err().to_string();
        assert!(
            message.contains(":2: bindings[0].unit: invalid type: integer `5`"),
            "{message}"
        );
        let (_dir, path) = setup("\u{feff}socket: /run/g.sock\n");
        assert_eq!(
            Config::load(&path).unwrap().socket,
            PathBuf::from("/run/g.sock")
        );
    }

    #[test]
    fn a_bad_policy_file_is_reported_with_its_own_line() {
        let (dir, path) = setup("bindings: []\n");
        write(
            &dir.path().join("policies"),
            "broken.yaml",
            "name: broken\ndeny:\n  - \"exa mple.com\"\n",
        );
        let message = Config::load(&path).unwrap_err().to_string();
        assert!(message.contains("broken.yaml:3"), "{message}");
    }
}
