//! Where a command line is resolved against the world: the environment,
//! files (resolv.conf, /etc/passwd, /etc/group) and the network
//! namespace's addresses, behind [`Host`] so that tests can give their own.

use std::{
    ffi::OsString,
    fs,
    net::{IpAddr, Ipv4Addr},
};

/// Why istio-iptables' input is refused, with its exit code.
#[derive(Debug)]
pub struct ConfigError {
    message: String,
    /// 1 for a configuration istio-iptables would refuse, or one that would
    /// fail halfway through applying it; 255 for input that is no value at
    /// all (see [`ConfigError::not_utf8`]).
    pub exit_code: u8,
}

impl ConfigError {
    /// A configuration refused (exit 1, as istio-iptables). Control
    /// characters of the values it quotes are escaped: the message stays
    /// one line, and a value cannot drive the terminal.
    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            message: message
                .into()
                .chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_default().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect(),
            exit_code: 1,
        }
    }

    /// Environment variable `name` is set to bytes that are not UTF-8.
    /// That is a bad command line, not a refused configuration: clap
    /// refuses the same bytes in the variables it reads for flags
    /// (`PROXY_UID`, ...) as a usage error, and `main` gives those exit 255
    /// (istio-iptables' code for a bad command line; 2 for redirect's own
    /// commands). Every variable, whoever reads it, gets that one rule.
    pub fn not_utf8(name: &str, value: &std::ffi::OsStr) -> Self {
        Self {
            message: format!(
                "environment variable {name} is not valid UTF-8 ('{}'): set it to text, or unset it",
                show_bytes(value)
            ),
            exit_code: 255,
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// `bytes` for a message: its UTF-8 text as Rust would escape it, each byte
/// that is not UTF-8 as `\xNN`. One line, whatever the bytes.
pub fn show_bytes(bytes: &std::ffi::OsStr) -> String {
    use std::{fmt::Write as _, os::unix::ffi::OsStrExt as _};
    let mut out = String::new();
    for chunk in bytes.as_bytes().utf8_chunks() {
        out.extend(chunk.valid().escape_debug());
        for byte in chunk.invalid() {
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    out
}

/// Where the resolution reads the world (the environment, files, the
/// interfaces), so that tests can give it their own. It hands over raw
/// bytes: what to make of bytes that are not UTF-8 is decided once, here
/// and in the parsers, not by each host.
pub trait Host {
    /// An environment variable's raw value, `None` when unset.
    fn env_os(&self, name: &str) -> Option<OsString>;
    /// A file's raw contents (resolv.conf, /etc/passwd, /etc/group: text
    /// files that may still hold a stray byte that is not UTF-8).
    fn read(&self, path: &std::path::Path) -> std::io::Result<Vec<u8>>;
    /// Addresses of the network namespace's interfaces, in kernel order.
    fn addresses(&self) -> std::io::Result<Vec<IpAddr>>;
    /// The network namespace's routing view for eBPF's redirected
    /// connects (see [`crate::ebpf::routes`]).
    fn routes(&self, excluded: &[String]) -> anyhow::Result<Vec<crate::ebpf::routes::RouteSource>>;
    /// The IPv6 routing view (see [`crate::ebpf::routes6`]).
    fn routes6(
        &self,
        excluded: &[String],
    ) -> anyhow::Result<Vec<crate::ebpf::routes6::RouteSource6>>;
    /// The IPv6 source the kernel gives a socket bound to `lo`.
    fn lo_source6(&self) -> Option<std::net::Ipv6Addr>;
    /// The index of the interface `name` in the calling thread's network
    /// namespace (`None`: no such interface).
    fn ifindex(&self, name: &str) -> Option<u32>;
    /// The interface `name` with its link type and addresses (`None`: no
    /// such interface).
    fn interface(&self, name: &str) -> std::io::Result<Option<crate::ebpf::virt::Interface>>;

    /// An environment variable as text, `None` when unset. A value that is
    /// not UTF-8 is an error naming the variable, never taken as unset: a
    /// variable the user set must not be silently ignored.
    fn env(&self, name: &str) -> Result<Option<String>, ConfigError> {
        self.env_os(name)
            .map(|raw| {
                raw.into_string()
                    .map_err(|raw| ConfigError::not_utf8(name, &raw))
            })
            .transpose()
    }
}

/// The real environment, files and interfaces of this process. The
/// interfaces are read once, at the first question about them, in the
/// network namespace the thread is in then: make a new one after entering
/// another namespace (each install makes its own).
#[derive(Default)]
pub struct RealHost {
    interfaces: std::cell::OnceCell<Vec<crate::ifaddrs::Entry>>,
}

impl RealHost {
    pub fn new() -> Self {
        Self::default()
    }

    /// The namespace's interfaces and addresses (see [`crate::ifaddrs`]),
    /// read on first use; a failed read is not kept.
    fn interfaces(&self) -> std::io::Result<&[crate::ifaddrs::Entry]> {
        if let Some(entries) = self.interfaces.get() {
            return Ok(entries);
        }
        let entries = crate::ifaddrs::read()?;
        Ok(self.interfaces.get_or_init(|| entries))
    }
}

impl Host for RealHost {
    fn env_os(&self, name: &str) -> Option<OsString> {
        std::env::var_os(name)
    }

    fn read(&self, path: &std::path::Path) -> std::io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn addresses(&self) -> std::io::Result<Vec<IpAddr>> {
        Ok(interface_addresses(self.interfaces()?))
    }

    fn routes(&self, excluded: &[String]) -> anyhow::Result<Vec<crate::ebpf::routes::RouteSource>> {
        use anyhow::Context as _;
        let interfaces = self
            .interfaces()
            .context("listing the pod's interface addresses")?;
        crate::ebpf::routes::read(excluded, interfaces)
    }
    fn routes6(
        &self,
        excluded: &[String],
    ) -> anyhow::Result<Vec<crate::ebpf::routes6::RouteSource6>> {
        crate::ebpf::routes6::read(excluded)
    }
    fn lo_source6(&self) -> Option<std::net::Ipv6Addr> {
        crate::ebpf::routes6::lo_source()
    }
    fn ifindex(&self, name: &str) -> Option<u32> {
        let name = std::ffi::CString::new(name).ok()?;
        // SAFETY: a NUL-terminated string that outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        (index != 0).then_some(index)
    }
    fn interface(&self, name: &str) -> std::io::Result<Option<crate::ebpf::virt::Interface>> {
        crate::ebpf::virt::read(name, self.interfaces()?)
    }
}

/// The numeric id of `name` in a passwd/group file, if listed. The file is
/// taken as bytes, field by field: a byte that is not UTF-8 elsewhere (a
/// comment field, another entry) does not hide the entry asked for.
pub fn lookup_id(host: &dyn Host, file: &str, name: &str) -> Option<String> {
    let text = host.read(std::path::Path::new(file)).ok()?;
    text.split(|&b| b == b'\n').find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut fields = line.split(|&b| b == b':');
        if fields.next()? != name.as_bytes() {
            return None;
        }
        std::str::from_utf8(fields.nth(1)?).ok().map(str::to_owned)
    })
}

/// The numeric id of an owner for `-m owner`: a number, or a name `file`
/// lists (as iptables resolves it when the rule is added).
pub fn resolve_owner(host: &dyn Host, file: &str, owner: &str) -> Option<u32> {
    owner
        .parse::<u32>()
        .ok()
        .or_else(|| lookup_id(host, file, owner)?.parse().ok())
}

/// Whether `program` can be run: on `PATH`, or in the sbin directories a
/// minimal `PATH` may leave out.
pub fn on_path(program: &str) -> bool {
    which(program).is_some()
}

/// Where `program` is: the first match on `PATH`, else in `/usr/sbin` or
/// `/sbin` (which a minimal `PATH` may leave out).
///
/// Test hook: with `REDIRECT_TEST_PATH_ONLY=1` (debug builds only) the
/// sbin directories are not searched, so that a test can show redirect a
/// node without some program by its `PATH` alone.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    });
    let path_only =
        cfg!(debug_assertions) && std::env::var("REDIRECT_TEST_PATH_ONLY").as_deref() == Ok("1");
    if on_path.is_some() || path_only {
        return on_path;
    }
    ["/usr/sbin", "/sbin"]
        .iter()
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// The pod's own IPv4 addresses among `addrs`: those outside 127/8.
pub fn pod_ipv4(addrs: &[IpAddr]) -> Vec<Ipv4Addr> {
    addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(v4) if !v4.is_loopback() => Some(*v4),
            _ => None,
        })
        .collect()
}

/// The addresses of `interfaces`, IPv4 first (the order of the kernel's
/// address dump).
fn interface_addresses(interfaces: &[crate::ifaddrs::Entry]) -> Vec<IpAddr> {
    let v4 = interfaces.iter().filter_map(|e| e.v4().map(IpAddr::V4));
    let v6 = interfaces.iter().filter_map(|e| e.v6().map(IpAddr::V6));
    v4.chain(v6).collect()
}

/// A host with given files and environment, for the tests of every
/// module that resolves an istio-iptables configuration.
#[cfg(test)]
pub(crate) mod fake {
    use std::{ffi::OsString, net::IpAddr};

    use super::*;

    /// A host with given files and environment (one list, by path or
    /// name, as raw bytes), and one pod address.
    pub(crate) struct FakeHost(Vec<(&'static str, Vec<u8>)>);

    impl FakeHost {
        pub(crate) fn new(text: &[(&'static str, &'static str)]) -> Self {
            Self(
                text.iter()
                    .map(|(k, v)| (*k, v.as_bytes().to_vec()))
                    .collect(),
            )
        }

        /// Adds a file or variable holding any bytes.
        pub(crate) fn with_bytes(mut self, name: &'static str, value: &[u8]) -> Self {
            self.0.push((name, value.to_vec()));
            self
        }

        fn get(&self, name: &str) -> Option<&[u8]> {
            self.0
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_slice())
        }
    }

    impl Host for FakeHost {
        fn env_os(&self, name: &str) -> Option<OsString> {
            use std::os::unix::ffi::OsStrExt as _;
            self.get(name)
                .map(|v| std::ffi::OsStr::from_bytes(v).to_owned())
        }
        fn read(&self, path: &std::path::Path) -> std::io::Result<Vec<u8>> {
            self.get(&path.to_string_lossy())
                .map(<[u8]>::to_vec)
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        }
        fn addresses(&self) -> std::io::Result<Vec<IpAddr>> {
            Ok(vec![
                "10.0.0.5".parse().unwrap(),
                "::1".parse().unwrap(),
                "fd00::5".parse().unwrap(),
            ])
        }
        fn routes(
            &self,
            excluded: &[String],
        ) -> anyhow::Result<Vec<crate::ebpf::routes::RouteSource>> {
            Ok(vec![crate::ebpf::routes::RouteSource {
                dst: crate::capture::Ipv4Cidr {
                    addr: std::net::Ipv4Addr::UNSPECIFIED,
                    prefix: 0,
                },
                src: Some(std::net::Ipv4Addr::new(10, 0, 0, 5)),
                excluded: excluded.iter().any(|nic| nic == "eth0"),
            }])
        }
        fn routes6(
            &self,
            excluded: &[String],
        ) -> anyhow::Result<Vec<crate::ebpf::routes6::RouteSource6>> {
            Ok(vec![crate::ebpf::routes6::RouteSource6 {
                dst: crate::capture::Ipv6Cidr {
                    addr: std::net::Ipv6Addr::UNSPECIFIED,
                    prefix: 0,
                },
                src: Some("fd00::5".parse().unwrap()),
                excluded: excluded.iter().any(|nic| nic == "eth0"),
            }])
        }
        fn lo_source6(&self) -> Option<std::net::Ipv6Addr> {
            "fd00::5".parse().ok()
        }
        fn ifindex(&self, name: &str) -> Option<u32> {
            match name {
                "lo" => Some(1),
                "eth0" => Some(2),
                _ => None,
            }
        }
        fn interface(&self, name: &str) -> std::io::Result<Option<crate::ebpf::virt::Interface>> {
            Ok(match name {
                "eth0" | "eth1" => Some(crate::ebpf::virt::Interface {
                    ifindex: if name == "eth0" { 2 } else { 3 },
                    ethernet: true,
                    v4: vec![std::net::Ipv4Addr::new(10, 0, 0, 5)],
                    v6: vec![("fd00::5".parse().unwrap(), 0x80)],
                }),
                "lo" => Some(crate::ebpf::virt::Interface {
                    ifindex: 1,
                    ethernet: false,
                    v4: vec![std::net::Ipv4Addr::LOCALHOST],
                    v6: vec![],
                }),
                _ => None,
            })
        }
    }

    /// Everything a command line feeds short of applying it: the actions,
    /// the resolution, the owner checks, the eBPF translation and the
    /// rendered rules. The properties check that none of it panics, and
    /// that a refusal is one line.
    pub(crate) fn exercise(
        args: &crate::istio::IstioArgs,
        host: &dyn Host,
    ) -> Result<(), ConfigError> {
        use crate::iptables::builder::Family;
        args.actions(host)?;
        let cfg = args.resolve(host)?;
        if let Err(err) = crate::istio::check_owners(&cfg, host) {
            assert_eq!(err.to_string().lines().count(), 1, "{err}");
        }
        // The lowering checks the map limits `to_bpf` relies on.
        if let Ok(ebpf) = crate::ebpf::lower::lower(&cfg, host) {
            let _ = ebpf.to_bpf();
        }
        let rules = crate::iptables::rules::rules(&cfg);
        for family in [Family::V4, Family::V6] {
            let _ = rules.render(family);
        }
        Ok(())
    }
}
