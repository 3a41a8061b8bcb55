//! The configuration the eBPF programs read: what [`super::lower`] makes
//! of a [`crate::capture::Capture`], written into the config map and the
//! set maps by the loader, and read back by `redirect status`.

use std::net::{Ipv4Addr, Ipv6Addr};

use redirect_common::{
    ABI_VERSION, CFG_DNS, CFG_DNS_ALL, CFG_EXCLUDE_IFACES, CFG_GROUPS_ONLY, CFG_INBOUND,
    CFG_INBOUND_ALL, CFG_INCLUDE_ALL, CFG_INCLUDE_LOOPBACK, CFG_IPV6, CFG_LEGACY, CFG_PORT_RANGES,
    CFG_VIRT_IFACES, DNS_PROXY_PORT, MAX_CIDRS, MAX_CIDRS6, MAX_DNS_SERVERS, MAX_EXCLUDE_IFACES,
    MAX_GROUPS, MAX_LOCAL_ADDRS, MAX_OWNERS, MAX_PORT_BLOCKS, MAX_PORTS, MAX_ROUTES, MAX_ROUTES6,
    MAX_VIRT_IFACES, RedirectConfig,
};

pub use super::{routes::RouteSource, routes6::RouteSource6};
use crate::capture::parse::DEFAULT_MAX_CONNECTIONS;
pub use crate::capture::{Ipv4Cidr, Ipv6Cidr};

/// Istio's defaults (`istio-iptables -p 15001 -z 15006 -e 15008 -u 1337 -g 1337`).
pub const DEFAULT_PROXY_PORT: u16 = 15001;
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
pub const DEFAULT_TUNNEL_PORT: u16 = 15008;
pub const DEFAULT_PROXY_ID: u32 = 1337;

/// What to capture and where to send it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Port the proxy listens on for captured outbound connections.
    pub proxy_port: u16,
    /// The proxy's UIDs: their connections are never captured.
    pub proxy_uids: Vec<u32>,
    /// The proxy's GIDs: their connections are never captured.
    pub proxy_gids: Vec<u32>,
    /// Destinations never captured (Istio: 127.0.0.1/32).
    pub loopback: Ipv4Cidr,
    /// Port of the proxy's inbound listener (`-z`): the proxy's calls to
    /// its own pod are sent there.
    pub inbound_port: u16,
    /// Inbound tunnel port (`-e`): the proxy's calls to it are not.
    pub tunnel_port: u16,
    /// `-i '*'`: capture every destination not excluded.
    pub include_all: bool,
    /// `-i` CIDRs (when not `*`).
    pub include: Vec<Ipv4Cidr>,
    /// `-i` names a loopback network: local traffic is not returned early.
    pub include_loopback: bool,
    /// `-x` CIDRs: never captured.
    pub exclude: Vec<Ipv4Cidr>,
    /// `-o`: destination ports never captured.
    pub ports_exclude: Vec<u16>,
    /// `-q`: destination ports always captured.
    pub ports_include: Vec<u16>,
    /// The `a:b` ranges of `-o`, `-q`, `-b` and `-d`, each with its list's
    /// `PORT_*` flag (single ports are in the lists above).
    pub port_ranges: Vec<PortRange>,
    /// Whether `owner_groups` are the only groups captured (else: never captured).
    pub groups_only: bool,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`, numeric.
    pub owner_groups: Vec<u32>,
    /// The pod's own IPv4 addresses outside 127/8: connects to them leave
    /// through `lo` (Istio's `-o lo`), and connections from them are not
    /// inbound.
    pub local_addrs: Vec<Ipv4Addr>,
    /// The pod's routing view (see [`super::routes`]): where a redirected
    /// connect would have gone, so it keeps the source the kernel would
    /// have picked, and fails where the kernel would fail it.
    pub routes: Vec<RouteSource>,
    /// `-c`: the indexes of the excluded interfaces in the pod's network
    /// namespace at install (their routes are marked in `routes`).
    pub exclude_ifindexes: Vec<u32>,
    /// `-k`: the KubeVirt interfaces, as REDIRECT in `PREROUTING` sees
    /// them at install.
    pub virt_ifaces: Vec<VirtIface>,
    /// Inbound capture (`-b` not empty), or `None`.
    pub inbound: Option<Inbound>,
    /// DNS capture (`--redirect-dns`), or `None`.
    pub dns: Option<Dns>,
    /// Istio's IPv6 table (`--ipv6`, `--dual-stack`, or a pod with IPv6):
    /// the fields below decide IPv6 connections. Without it they are not
    /// captured.
    pub ipv6: Option<Ipv6>,
    /// `--profile legacy`: Istio's first rule table decides outbound
    /// connects (the fields above are what it needs: `-p`, `-u`,
    /// 127.0.0.1/32, inbound on every port to the proxy port).
    pub legacy: bool,
    /// Capacity of the original-destination maps (`--max-connections`):
    /// redirected connections open at once. Fixed when an instance is
    /// first installed.
    pub max_connections: u32,
    /// Which decisions the programs report in `RDR_EVENTS` (see
    /// `redirect_common::LOG_DEBUG`; 0 = none).
    pub log_level: u8,
}

/// What Istio's IPv6 table needs besides the rules both tables share.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ipv6 {
    /// `-i` IPv6 networks (when `-i` is not `*`).
    pub include: Vec<Ipv6Cidr>,
    /// `-x` IPv6 networks.
    pub exclude: Vec<Ipv6Cidr>,
    /// The pod's IPv6 addresses but `::1` (connects to them leave through
    /// `lo`).
    pub local_addrs: Vec<Ipv6Addr>,
    /// The pod's IPv6 routing view (see [`super::routes6`]).
    pub routes: Vec<RouteSource6>,
    /// The source the pod's kernel gives a socket bound to `lo`.
    pub lo_source: Option<Ipv6Addr>,
}

/// One `-k` interface: its index in the pod's network namespace and the
/// addresses REDIRECT sends its connections to (see
/// [`redirect_common::redirect_target`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtIface {
    pub ifindex: u32,
    /// Its first IPv4 address.
    pub addr4: Option<Ipv4Addr>,
    /// Its first usable IPv6 address (any scope).
    pub addr6: Option<Ipv6Addr>,
    /// Its first usable link-local IPv6 address.
    pub addr6_link: Option<Ipv6Addr>,
}

impl VirtIface {
    fn to_bpf(self) -> redirect_common::VirtIface {
        let v6 = |a: Option<Ipv6Addr>| {
            a.map_or([0; 4], |a| redirect_common::Ip6::from_octets(a.octets()).0)
        };
        redirect_common::VirtIface {
            ifindex: self.ifindex,
            addr4: self.addr4.map_or(0, |a| u32::from_ne_bytes(a.octets())),
            addr6: v6(self.addr6),
            addr6_link: v6(self.addr6_link),
        }
    }

    fn from_bpf(raw: &redirect_common::VirtIface) -> Self {
        let v6 = |w: [u32; 4]| {
            Some(Ipv6Addr::from(redirect_common::Ip6(w).octets())).filter(|a| !a.is_unspecified())
        };
        Self {
            ifindex: raw.ifindex,
            addr4: Some(Ipv4Addr::from(raw.addr4.to_ne_bytes())).filter(|a| !a.is_unspecified()),
            addr6: v6(raw.addr6),
            addr6_link: v6(raw.addr6_link),
        }
    }
}

/// One `a:b` range of a port list, and which list (its `PORT_*` flag).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
    pub flag: u8,
}

/// Which DNS is captured (Istio's `ISTIO_OUTPUT_DNS`): UDP and TCP port
/// 53 to the nameservers, or to any address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dns {
    /// `--capture-all-dns`: every destination's port 53.
    pub all: bool,
    /// resolv.conf's IPv4 nameservers.
    pub servers: Vec<Ipv4Addr>,
    /// resolv.conf's IPv6 nameservers (captured with IPv6 rules only).
    pub servers6: Vec<Ipv6Addr>,
}

/// Which inbound connections are captured (Istio `-b`, `-d`; REDIRECT
/// mode only, see [`super::lower`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inbound {
    /// `-b '*'`: every port but `exclude`.
    pub all: bool,
    /// `-b` ports, when not `*`.
    pub ports: Vec<u16>,
    /// `-d` ports: not captured. Istio uses them with `-b '*'` only.
    pub exclude: Vec<u16>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            proxy_port: DEFAULT_PROXY_PORT,
            proxy_uids: vec![DEFAULT_PROXY_ID],
            proxy_gids: vec![DEFAULT_PROXY_ID],
            loopback: Ipv4Cidr {
                addr: Ipv4Addr::LOCALHOST,
                prefix: 32,
            },
            inbound_port: DEFAULT_INBOUND_PORT,
            tunnel_port: DEFAULT_TUNNEL_PORT,
            include_all: true,
            include: Vec::new(),
            include_loopback: false,
            exclude: Vec::new(),
            ports_exclude: Vec::new(),
            ports_include: Vec::new(),
            port_ranges: Vec::new(),
            groups_only: false,
            owner_groups: Vec::new(),
            local_addrs: Vec::new(),
            routes: Vec::new(),
            exclude_ifindexes: Vec::new(),
            virt_ifaces: Vec::new(),
            inbound: None,
            dns: None,
            ipv6: None,
            legacy: false,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            log_level: 0,
        }
    }
}

impl Config {
    /// The map entry the eBPF programs read.
    pub fn to_bpf(&self) -> RedirectConfig {
        let mut out = RedirectConfig {
            abi_version: ABI_VERSION,
            proxy_port: self.proxy_port,
            log_level: self.log_level,
            _pad: 0,
            loopback_addr: u32::from_ne_bytes(self.loopback.network().octets()),
            loopback_mask: u32::from_ne_bytes(self.loopback.mask().octets()),
            uid_count: self.proxy_uids.len() as u32,
            gid_count: self.proxy_gids.len() as u32,
            proxy_uids: [0; MAX_OWNERS],
            proxy_gids: [0; MAX_OWNERS],
            inbound_port: self.inbound_port,
            tunnel_port: self.tunnel_port,
            flags: [
                (self.include_all, CFG_INCLUDE_ALL),
                (self.include_loopback, CFG_INCLUDE_LOOPBACK),
                (self.groups_only, CFG_GROUPS_ONLY),
                (self.inbound.is_some(), CFG_INBOUND),
                (
                    self.inbound.as_ref().is_some_and(|i| i.all),
                    CFG_INBOUND_ALL,
                ),
                (self.dns.is_some(), CFG_DNS),
                (self.dns.as_ref().is_some_and(|d| d.all), CFG_DNS_ALL),
                (!self.port_ranges.is_empty(), CFG_PORT_RANGES),
                (self.legacy, CFG_LEGACY),
                (!self.exclude_ifindexes.is_empty(), CFG_EXCLUDE_IFACES),
                (self.ipv6.is_some(), CFG_IPV6),
                (!self.virt_ifaces.is_empty(), CFG_VIRT_IFACES),
            ]
            .iter()
            .filter(|(on, _)| *on)
            .fold(0, |flags, (_, bit)| flags | bit),
            group_count: self.owner_groups.len() as u32,
            lo_source: self
                .local_addrs
                .first()
                .map_or(0, |a| u32::from_ne_bytes(a.octets())),
            dns_port: DNS_PROXY_PORT,
            dns_server_count: self.dns_servers().len() as u16,
            dns_servers: [0; MAX_DNS_SERVERS],
            dns_server6_count: 0,
            dns_servers6: [[0; 4]; MAX_DNS_SERVERS],
            exclude_iface_count: self.exclude_ifindexes.len() as u32,
            exclude_ifindex: [0; MAX_EXCLUDE_IFACES],
            lo_source6: self
                .ipv6
                .as_ref()
                .and_then(|v6| v6.lo_source)
                .map_or([0; 4], |a| redirect_common::Ip6::from_octets(a.octets()).0),
            virt_iface_count: self.virt_ifaces.len() as u32,
            virt_ifaces: [redirect_common::VirtIface::default(); MAX_VIRT_IFACES],
        };
        for (slot, iface) in out.virt_ifaces.iter_mut().zip(&self.virt_ifaces) {
            *slot = iface.to_bpf();
        }
        out.exclude_ifindex[..self.exclude_ifindexes.len()]
            .copy_from_slice(&self.exclude_ifindexes);
        out.proxy_uids[..self.proxy_uids.len()].copy_from_slice(&self.proxy_uids);
        out.proxy_gids[..self.proxy_gids.len()].copy_from_slice(&self.proxy_gids);
        for (slot, server) in out.dns_servers.iter_mut().zip(self.dns_servers()) {
            *slot = u32::from_ne_bytes(server.octets());
        }
        let servers6 = self.dns.as_ref().map_or(&[][..], |d| d.servers6.as_slice());
        out.dns_server6_count = servers6.len().min(MAX_DNS_SERVERS) as u32;
        for (slot, server) in out.dns_servers6.iter_mut().zip(servers6) {
            *slot = redirect_common::Ip6::from_octets(server.octets()).0;
        }
        out
    }

    /// The nameservers whose DNS is captured (none without DNS capture).
    pub fn dns_servers(&self) -> &[Ipv4Addr] {
        self.dns.as_ref().map_or(&[], |d| d.servers.as_slice())
    }

    /// Checks the limits of the kernel maps (the list lengths); `to_bpf`
    /// and the loader rely on it.
    pub fn check_limits(&self) -> Result<(), String> {
        let limits = [
            ("proxy UIDs", self.proxy_uids.len(), MAX_OWNERS),
            ("proxy GIDs", self.proxy_gids.len(), MAX_OWNERS),
            ("owner groups", self.owner_groups.len(), MAX_GROUPS),
            ("included CIDRs", self.include.len(), MAX_CIDRS as usize),
            ("excluded CIDRs", self.exclude.len(), MAX_CIDRS as usize),
            (
                "distinct outbound and inbound ports",
                self.ports_include
                    .iter()
                    .chain(&self.ports_exclude)
                    .chain(
                        self.inbound
                            .iter()
                            .flat_map(|i| i.ports.iter().chain(&i.exclude)),
                    )
                    .collect::<std::collections::HashSet<_>>()
                    .len(),
                MAX_PORTS as usize,
            ),
            (
                "pod addresses",
                self.local_addrs.len(),
                MAX_LOCAL_ADDRS as usize,
            ),
            ("routes", self.routes.len(), MAX_ROUTES as usize),
            (
                "excluded interfaces (-c)",
                self.exclude_ifindexes.len(),
                MAX_EXCLUDE_IFACES,
            ),
            (
                "KubeVirt interfaces (-k)",
                self.virt_ifaces.len(),
                MAX_VIRT_IFACES,
            ),
            (
                "aligned blocks of port ranges",
                super::maps::port_blocks(&self.port_ranges).len(),
                MAX_PORT_BLOCKS as usize,
            ),
            (
                "IPv4 nameservers",
                self.dns_servers().len(),
                MAX_DNS_SERVERS,
            ),
            (
                "IPv6 nameservers",
                self.dns.as_ref().map_or(0, |d| d.servers6.len()),
                MAX_DNS_SERVERS,
            ),
            (
                "included IPv6 CIDRs",
                self.ipv6.as_ref().map_or(0, |v6| v6.include.len()),
                MAX_CIDRS6 as usize,
            ),
            (
                "excluded IPv6 CIDRs",
                self.ipv6.as_ref().map_or(0, |v6| v6.exclude.len()),
                MAX_CIDRS6 as usize,
            ),
            (
                "pod IPv6 addresses",
                self.ipv6.as_ref().map_or(0, |v6| v6.local_addrs.len()),
                MAX_LOCAL_ADDRS as usize,
            ),
            (
                "IPv6 routes",
                self.ipv6.as_ref().map_or(0, |v6| v6.routes.len()),
                MAX_ROUTES6 as usize,
            ),
        ];
        for (what, n, max) in limits {
            if n > max {
                return Err(format!("{n} {what} given; eBPF mode holds at most {max}"));
            }
        }
        Ok(())
    }

    /// Reads back what [`Config::to_bpf`] wrote (for `redirect status`).
    /// The lists kept in their own maps (CIDRs, ports, port ranges, pod
    /// addresses, owner groups, the IPv6 ones) are left empty, the inbound
    /// port lists included.
    pub fn from_bpf(raw: &RedirectConfig) -> Self {
        let uids = (raw.uid_count as usize).min(MAX_OWNERS);
        let gids = (raw.gid_count as usize).min(MAX_OWNERS);
        let mask = u32::from_be_bytes(raw.loopback_mask.to_ne_bytes());
        Self {
            proxy_port: raw.proxy_port,
            proxy_uids: raw.proxy_uids[..uids].to_vec(),
            proxy_gids: raw.proxy_gids[..gids].to_vec(),
            loopback: Ipv4Cidr {
                addr: Ipv4Addr::from(raw.loopback_addr.to_ne_bytes()),
                prefix: mask.count_ones() as u8,
            },
            inbound_port: raw.inbound_port,
            tunnel_port: raw.tunnel_port,
            include_all: raw.flags & CFG_INCLUDE_ALL != 0,
            include_loopback: raw.flags & CFG_INCLUDE_LOOPBACK != 0,
            groups_only: raw.flags & CFG_GROUPS_ONLY != 0,
            inbound: (raw.flags & CFG_INBOUND != 0).then(|| Inbound {
                all: raw.flags & CFG_INBOUND_ALL != 0,
                ..Inbound::default()
            }),
            dns: (raw.flags & CFG_DNS != 0).then(|| Dns {
                all: raw.flags & CFG_DNS_ALL != 0,
                servers: raw.dns_servers[..(raw.dns_server_count as usize).min(MAX_DNS_SERVERS)]
                    .iter()
                    .map(|s| Ipv4Addr::from(s.to_ne_bytes()))
                    .collect(),
                servers6: raw.dns_servers6[..(raw.dns_server6_count as usize).min(MAX_DNS_SERVERS)]
                    .iter()
                    .map(|s| Ipv6Addr::from(redirect_common::Ip6(*s).octets()))
                    .collect(),
            }),
            legacy: raw.flags & CFG_LEGACY != 0,
            ipv6: (raw.flags & CFG_IPV6 != 0).then(|| Ipv6 {
                lo_source: Some(Ipv6Addr::from(
                    redirect_common::Ip6(raw.lo_source6).octets(),
                ))
                .filter(|a| !a.is_unspecified()),
                ..Ipv6::default()
            }),
            exclude_ifindexes: raw.exclude_ifindex
                [..(raw.exclude_iface_count as usize).min(MAX_EXCLUDE_IFACES)]
                .to_vec(),
            virt_ifaces: raw.virt_ifaces[..(raw.virt_iface_count as usize).min(MAX_VIRT_IFACES)]
                .iter()
                .map(VirtIface::from_bpf)
                .collect(),
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpf_round_trip_keeps_the_config() {
        let cfg = Config {
            proxy_port: 15006,
            proxy_uids: vec![1337, 0],
            proxy_gids: vec![],
            loopback: Ipv4Cidr {
                addr: Ipv4Addr::new(127, 0, 0, 0),
                prefix: 8,
            },
            inbound_port: 15016,
            owner_groups: vec![5],
            groups_only: true,
            include_all: false,
            dns: Some(Dns {
                all: false,
                servers: vec![Ipv4Addr::new(10, 96, 0, 10), Ipv4Addr::new(127, 0, 0, 53)],
                servers6: vec!["fd00::53".parse().unwrap()],
            }),
            ..Config::default()
        };
        let back = Config::from_bpf(&cfg.to_bpf());
        assert_eq!(back.proxy_port, 15006);
        assert_eq!(back.proxy_uids, vec![1337, 0]);
        assert!(back.proxy_gids.is_empty());
        assert_eq!(back.loopback.prefix, 8);
        assert_eq!(back.inbound_port, 15016);
        assert!(
            back.owner_groups.is_empty(),
            "a set map's, not the config's"
        );
        assert!(back.groups_only && !back.include_all && !back.include_loopback);
        assert_eq!(back.dns, cfg.dns);
        assert!(!back.legacy);
        let legacy = Config {
            legacy: true,
            ..Config::default()
        };
        assert!(Config::from_bpf(&legacy.to_bpf()).legacy);
    }
}

/// Properties: no configuration read back from the kernel map panics.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn any_kernel_config_reads_back(
            bytes in proptest::collection::vec(any::<u8>(), size_of::<RedirectConfig>()),
        ) {
            let raw: RedirectConfig = bytemuck::pod_read_unaligned(&bytes);
            let config = Config::from_bpf(&raw);
            prop_assert!(config.check_limits().is_ok());
            let _ = config.to_bpf();
        }
    }
}
