//! The Unix-socket hooks (`cgroup/connect_unix`, `cgroup/sendmsg_unix`,
//! Linux 6.7+), which refuse connections to local resolver daemons.
//!
//! aya 0.14 has no attach type for them, so they are loaded here: the
//! object is parsed again with aya's own parser (`aya-obj`), the programs'
//! map references are pointed at the maps aya already created, and the
//! programs are loaded and linked with raw `bpf()` calls
//! ([`super::bpfsys`]). On an older kernel, or without BTF, they are
//! unavailable, and guard says so.
use std::{
    collections::HashSet,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
};

use aya::{maps::Map, Ebpf};
use guard_common::evidence::{PROGRAM_UNIX_CONNECT, PROGRAM_UNIX_SENDMSG};

use super::bpfsys::{
    self, BPF_CGROUP_UNIX_CONNECT, BPF_CGROUP_UNIX_SENDMSG, BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
};

/// The two programs with their attach types.
pub const UNIX_HOOKS: [(&str, u32); 2] = [
    (PROGRAM_UNIX_CONNECT, BPF_CGROUP_UNIX_CONNECT),
    (PROGRAM_UNIX_SENDMSG, BPF_CGROUP_UNIX_SENDMSG),
];

/// The loaded Unix-socket programs.
pub struct UnixHooks {
    programs: Vec<(&'static str, u32, OwnedFd)>,
}

/// Offsets of `uaddr` and `uaddrlen` in the kernel's `struct
/// bpf_sock_addr_kern`, from its BTF. The second field arrived with the
/// Unix hooks (6.7): without it the hooks cannot exist.
pub fn sock_addr_offsets() -> Result<(u32, u32), String> {
    let btf = std::fs::read("/sys/kernel/btf/vmlinux")
        .map_err(|e| format!("cannot read the kernel's BTF (/sys/kernel/btf/vmlinux): {e}"))?;
    match super::btf::member_offsets(&btf, "bpf_sock_addr_kern", &["uaddr", "uaddrlen"]) {
        Some(offsets) => Ok((offsets[0], offsets[1])),
        None => Err("the kernel has no Unix-socket sock_addr hooks (Linux 6.7+)".into()),
    }
}

impl UnixHooks {
    /// Loads the programs from `object`, using the maps `ebpf` created for
    /// the same object.
    pub fn load(ebpf: &Ebpf, object: &[u8]) -> Result<UnixHooks, String> {
        let mut obj = aya_obj::Object::parse(object).map_err(|e| e.to_string())?;
        let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
        let mut fds = Vec::new();
        for name in obj.maps.keys() {
            // Maps aya did not create (none today) are left out; a program
            // that uses one fails relocation below, with its name.
            if let Some(fd) = ebpf.map(name).and_then(map_fd) {
                fds.push((name.clone(), fd));
            }
        }
        let maps: Vec<(&str, i32, &aya_obj::Map)> = fds
            .iter()
            .filter_map(|(name, fd)| {
                use std::os::fd::AsRawFd as _;
                Some((name.as_str(), fd.as_raw_fd(), obj.maps.get(name)?))
            })
            .collect();
        // The borrow of obj.maps above must end before obj is relocated.
        let maps: Vec<(String, i32, aya_obj::Map)> = maps
            .into_iter()
            .map(|(n, fd, m)| (n.to_owned(), fd, m.clone()))
            .collect();
        obj.relocate_maps(
            maps.iter().map(|(n, fd, m)| (n.as_str(), *fd, m)),
            &text_sections,
        )
        .map_err(|e| e.to_string())?;
        obj.relocate_calls(&text_sections)
            .map_err(|e| e.to_string())?;
        let mut programs = Vec::new();
        for (name, attach_type) in UNIX_HOOKS {
            let program = obj
                .programs
                .get(name)
                .ok_or_else(|| format!("the object has no program {name}"))?;
            let function = obj
                .functions
                .get(&program.function_key())
                .ok_or_else(|| format!("the object has no code for {name}"))?;
            let fd = bpfsys::load_program(
                BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                attach_type,
                name,
                &function.instructions,
                &obj.license,
            )
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL) => {
                    "the kernel refused the Unix-socket hooks (Linux 6.7+ has them)".to_string()
                }
                _ => format!("loading {name}: {e}"),
            })?;
            programs.push((name, attach_type, fd));
        }
        Ok(UnixHooks { programs })
    }

    /// Links both programs to a cgroup; the links go with the returned
    /// descriptors unless pinned.
    pub fn attach(&self, cgroup: BorrowedFd<'_>) -> std::io::Result<Vec<(&'static str, OwnedFd)>> {
        self.programs
            .iter()
            .map(|(name, _, _)| self.attach_one(name, cgroup).map(|link| (*name, link)))
            .collect()
    }

    /// Links the program `name` (one of [`UNIX_HOOKS`]) to a cgroup.
    pub fn attach_one(&self, name: &str, cgroup: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
        let (_, attach_type, program) =
            self.programs
                .iter()
                .find(|(known, _, _)| *known == name)
                .ok_or_else(|| std::io::Error::other(format!("no Unix-socket hook {name}")))?;
        bpfsys::link_cgroup(program.as_fd(), cgroup, *attach_type)
    }

    /// (attach type, program id) of each program.
    pub fn ids(&self) -> Vec<(u32, u32)> {
        self.programs
            .iter()
            .filter_map(|(_, attach_type, fd)| Some((*attach_type, bpfsys::object_id(fd).ok()?)))
            .collect()
    }

    /// Pins the programs as `prog_<name>` in `dir`; an error names the path.
    pub fn pin_into(&self, dir: &Path) -> std::io::Result<()> {
        for (name, _, fd) in &self.programs {
            let path = dir.join(format!("prog_{name}"));
            bpfsys::pin(fd.as_fd(), &path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        }
        Ok(())
    }

    /// The programs pinned in `dir`, if they are.
    pub fn from_pins(dir: &Path) -> Option<UnixHooks> {
        let mut programs = Vec::new();
        for (name, attach_type) in UNIX_HOOKS {
            let fd = bpfsys::open_pin(&dir.join(format!("prog_{name}"))).ok()?;
            programs.push((name, attach_type, fd));
        }
        Some(UnixHooks { programs })
    }
}

/// The descriptor of one of aya's maps, whatever its type.
fn map_fd(map: &Map) -> Option<OwnedFd> {
    let data = match map {
        Map::Array(data)
        | Map::HashMap(data)
        | Map::LruHashMap(data)
        | Map::PerCpuArray(data)
        | Map::PerCpuHashMap(data)
        | Map::PerCpuLruHashMap(data)
        | Map::RingBuf(data)
        | Map::SockHash(data)
        | Map::SockMap(data)
        | Map::SkStorage(data) => data,
        _ => return None,
    };
    data.fd().as_fd().try_clone_to_owned().ok()
}

/// Sockets of local resolver daemons, refused: nscd's (glibc's client; also
/// unscd and nsncd) and systemd-resolved's varlink service (nss-resolve).
/// The same paths on Debian, Ubuntu and Fedora.
pub const DEFAULT_RESOLVER_SOCKETS: [&str; 2] = [
    "/var/run/nscd/socket",
    "/run/systemd/resolve/io.systemd.Resolve",
];

/// Sockets through which work is handed to a process outside the cgroup
/// (systemd's private socket, the D-Bus system bus): noted, not refused.
pub const HANDOFF_SOCKETS: [&str; 3] = [
    "/run/systemd/private",
    "/run/dbus/system_bus_socket",
    "/var/run/dbus/system_bus_socket",
];

/// The table for the Unix-socket map: the default and `extra` resolver
/// sockets (refused) under each name they are commonly reached by
/// (`/var/run` and `/run`, and the path with its directory resolved), and
/// the hand-off sockets (noted).
pub fn socket_table(extra: &[std::path::PathBuf]) -> Vec<(Vec<u8>, u8)> {
    use guard_common::evidence::{UNIX_NOTE, UNIX_REFUSE};
    use std::os::unix::ffi::OsStrExt as _;
    let mut table: Vec<(Vec<u8>, u8)> = Vec::new();
    let mut add = |path: &Path, action: u8| {
        let mut names = vec![path.to_path_buf()];
        if let Ok(rest) = path.strip_prefix("/var/run") {
            names.push(Path::new("/run").join(rest));
        } else if let Ok(rest) = path.strip_prefix("/run") {
            names.push(Path::new("/var/run").join(rest));
        }
        if let (Some(dir), Some(file)) = (path.parent(), path.file_name()) {
            if let Ok(real) = std::fs::canonicalize(dir) {
                names.push(real.join(file));
            }
        }
        for name in names {
            let bytes = name.as_os_str().as_bytes().to_vec();
            if !table.iter().any(|(p, _)| *p == bytes) {
                table.push((bytes, action));
            }
        }
    };
    for path in DEFAULT_RESOLVER_SOCKETS.iter().map(Path::new) {
        add(path, UNIX_REFUSE);
    }
    for path in extra {
        add(path, UNIX_REFUSE);
    }
    for path in HANDOFF_SOCKETS.iter().map(Path::new) {
        add(path, UNIX_NOTE);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use guard_common::evidence::{UNIX_NOTE, UNIX_REFUSE};

    #[test]
    fn the_table_has_both_spellings_of_run() {
        let table = socket_table(&["/run/x/y.sock".into()]);
        let action = |p: &str| {
            table
                .iter()
                .find(|(b, _)| b == p.as_bytes())
                .map(|(_, a)| *a)
        };
        assert_eq!(action("/var/run/nscd/socket"), Some(UNIX_REFUSE));
        assert_eq!(action("/run/nscd/socket"), Some(UNIX_REFUSE));
        assert_eq!(
            action("/var/run/systemd/resolve/io.systemd.Resolve"),
            Some(UNIX_REFUSE)
        );
        assert_eq!(action("/var/run/x/y.sock"), Some(UNIX_REFUSE));
        assert_eq!(action("/run/systemd/private"), Some(UNIX_NOTE));
        assert_eq!(action("/run/other"), None);
    }
}
