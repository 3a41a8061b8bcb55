//! The one validated capture configuration. Every backend consumes a
//! [`Config`]; nothing else of the command line reaches them.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use redirect_common::{
    ABI_VERSION, CFG_GROUPS_ONLY, CFG_INBOUND, CFG_INBOUND_ALL, CFG_INCLUDE_ALL,
    CFG_INCLUDE_LOOPBACK, CFG_TPROXY, MAX_CIDRS, MAX_LOCAL_ADDRS, MAX_OWNERS, MAX_PORTS,
    RedirectConfig,
};

use crate::istio::{Host, IstioConfig, OwnerGroups};

/// Default capacity of the original-destination maps: connections
/// redirected and open at once.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 65536;
/// Bounds of `--max-connections`.
pub const MAX_CONNECTIONS_RANGE: std::ops::RangeInclusive<u32> = 256..=1 << 20;

/// Parses `--max-connections`.
pub fn parse_max_connections(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if MAX_CONNECTIONS_RANGE.contains(&n) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a connection count ({}..={})",
            MAX_CONNECTIONS_RANGE.start(),
            MAX_CONNECTIONS_RANGE.end()
        )),
    }
}

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
    /// Whether `owner_groups` are the only groups captured (else: never captured).
    pub groups_only: bool,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`, numeric.
    pub owner_groups: Vec<u32>,
    /// The pod's own IPv4 addresses outside 127/8: connects to them leave
    /// through `lo` (Istio's `-o lo`), and connections from them are not
    /// inbound.
    pub local_addrs: Vec<Ipv4Addr>,
    /// Inbound capture (`-b` not empty), or `None`.
    pub inbound: Option<Inbound>,
    /// Capacity of the original-destination maps (`--max-connections`):
    /// redirected connections open at once. Fixed when an instance is
    /// first installed.
    pub max_connections: u32,
}

/// Which inbound connections are captured (Istio `-b`, `-d`, `-m`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inbound {
    /// `-b '*'`: every port but `exclude`.
    pub all: bool,
    /// `-b` ports, when not `*`.
    pub ports: Vec<u16>,
    /// `-d` ports: not captured. Istio uses them with `-b '*'` only.
    pub exclude: Vec<u16>,
    /// `-m TPROXY` (else REDIRECT). Both are served by the same eBPF path;
    /// TPROXY's rules differ only in having no tunnel-port exception.
    pub tproxy: bool,
}

impl Inbound {
    /// Parses `-b`, `-d` and `-m` as istio-iptables reads them: `-b ""`
    /// is no inbound capture, `*` every port, else a list of ports.
    pub fn parse(ports: &str, exclude: &str, mode: &str) -> Result<Option<Self>, String> {
        let tproxy = parse_interception_mode(mode)?;
        let ports = ports.trim();
        if ports.is_empty() {
            return Ok(None);
        }
        let list = |raw: &str, flag: &str| -> Result<Vec<u16>, String> {
            crate::istio::split(raw)
                .iter()
                .map(|p| {
                    parse_port(p)
                        .map_err(|why| format!("{flag}: {why} (eBPF mode takes single ports)"))
                })
                .collect()
        };
        let all = ports == "*";
        Ok(Some(Self {
            all,
            ports: if all { Vec::new() } else { list(ports, "-b")? },
            exclude: list(exclude, "-d")?,
            tproxy,
        }))
    }
}

/// `-m`: `true` for TPROXY, `false` for REDIRECT (istio-iptables' two modes).
pub fn parse_interception_mode(mode: &str) -> Result<bool, String> {
    match mode {
        "" | "REDIRECT" => Ok(false),
        "TPROXY" => Ok(true),
        other => Err(format!(
            "-m: '{other}' is not an interception mode (REDIRECT or TPROXY)"
        )),
    }
}

/// The IPv4 addresses of the calling thread's network namespace outside
/// 127/8: the pod's own addresses when run in the pod.
pub fn pod_addresses() -> anyhow::Result<Vec<Ipv4Addr>> {
    use anyhow::Context as _;
    let all = crate::istio::Host::addresses(&crate::istio::RealHost)
        .context("listing the pod's addresses")?;
    Ok(all
        .into_iter()
        .filter_map(|a| match a {
            std::net::IpAddr::V4(v4) if !v4.is_loopback() => Some(v4),
            _ => None,
        })
        .collect())
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
            groups_only: false,
            owner_groups: Vec::new(),
            local_addrs: Vec::new(),
            inbound: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl Config {
    /// The map entry the eBPF programs read.
    pub fn to_bpf(&self) -> RedirectConfig {
        let mut out = RedirectConfig {
            abi_version: ABI_VERSION,
            proxy_port: self.proxy_port,
            log_level: 0,
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
                (self.inbound.as_ref().is_some_and(|i| i.tproxy), CFG_TPROXY),
            ]
            .iter()
            .filter(|(on, _)| *on)
            .fold(0, |flags, (_, bit)| flags | bit),
            group_count: self.owner_groups.len() as u32,
            owner_groups: [0; MAX_OWNERS],
        };
        out.proxy_uids[..self.proxy_uids.len()].copy_from_slice(&self.proxy_uids);
        out.proxy_gids[..self.proxy_gids.len()].copy_from_slice(&self.proxy_gids);
        out.owner_groups[..self.owner_groups.len()].copy_from_slice(&self.owner_groups);
        out
    }

    /// Checks the limits of the kernel maps (the list lengths); `to_bpf`
    /// and the loader rely on it.
    pub fn check_limits(&self) -> Result<(), String> {
        let limits = [
            ("proxy UIDs", self.proxy_uids.len(), MAX_OWNERS),
            ("proxy GIDs", self.proxy_gids.len(), MAX_OWNERS),
            ("owner groups", self.owner_groups.len(), MAX_OWNERS),
            ("included CIDRs", self.include.len(), MAX_CIDRS as usize),
            ("excluded CIDRs", self.exclude.len(), MAX_CIDRS as usize),
            (
                "outbound and inbound ports",
                self.ports_include.len()
                    + self.ports_exclude.len()
                    + self
                        .inbound
                        .as_ref()
                        .map_or(0, |i| i.ports.len() + i.exclude.len()),
                MAX_PORTS as usize,
            ),
            (
                "pod addresses",
                self.local_addrs.len(),
                MAX_LOCAL_ADDRS as usize,
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
    /// The lists kept in their own maps (CIDRs, ports, pod addresses) are
    /// left empty, the inbound port lists included.
    pub fn from_bpf(raw: &RedirectConfig) -> Self {
        let uids = (raw.uid_count as usize).min(MAX_OWNERS);
        let gids = (raw.gid_count as usize).min(MAX_OWNERS);
        let groups = (raw.group_count as usize).min(MAX_OWNERS);
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
            owner_groups: raw.owner_groups[..groups].to_vec(),
            inbound: (raw.flags & CFG_INBOUND != 0).then(|| Inbound {
                all: raw.flags & CFG_INBOUND_ALL != 0,
                tproxy: raw.flags & CFG_TPROXY != 0,
                ..Inbound::default()
            }),
            ..Self::default()
        }
    }
}

/// An IPv4 network, `a.b.c.d/n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    pub fn mask(&self) -> Ipv4Addr {
        let bits = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        };
        Ipv4Addr::from(bits)
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & u32::from(self.mask()))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("'{s}' is not an IPv4 CIDR (expected a.b.c.d/n)"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("'{s}' has a prefix length outside 0..=32"))?;
        Ok(Self { addr, prefix })
    }
}

/// What eBPF capture cannot honour yet (later issues), as asked for by
/// istio-iptables' flags. The one list both `redirect istio-iptables`
/// (through [`Config::from_istio`]) and `install`/`run` refuse from.
#[derive(Clone, Copy, Debug, Default)]
pub struct NotYet {
    pub exclude_interfaces: bool,
    pub kube_virt_interfaces: bool,
    pub redirect_dns: bool,
    pub drop_invalid: bool,
    pub ipv6: bool,
}

impl NotYet {
    /// The flags asking for it, in istio-iptables' flag order.
    pub fn flags(&self) -> Vec<&'static str> {
        [
            (self.exclude_interfaces, "-c/--istio-exclude-interfaces"),
            (self.kube_virt_interfaces, "-k/--kube-virt-interfaces"),
            (self.redirect_dns, "--redirect-dns (DNS capture)"),
            (self.drop_invalid, "--drop-invalid"),
            (
                self.ipv6,
                "IPv6 rules (the pod has IPv6, --ipv6=true or --dual-stack)",
            ),
        ]
        .into_iter()
        .filter_map(|(on, flag)| on.then_some(flag))
        .collect()
    }
}

/// Parses a proxy port: 1..=65535.
pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        Ok(p) => Err(format!("{p} is not a port number (1..=65535)")),
        Err(_) => Err(format!("'{s}' is not a port number (1..=65535)")),
    }
}

/// Parses a comma-separated list of numeric user or group ids (at most 8).
pub fn parse_ids(s: &str) -> Result<Vec<u32>, String> {
    let ids = s
        .split(',')
        .map(str::trim)
        .map(|id| {
            id.parse::<u32>()
                .map_err(|_| format!("'{id}' is not a numeric id (use e.g. 1337 or 1337,1338)"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ids.len() > MAX_OWNERS {
        return Err(format!(
            "{} ids given; at most {MAX_OWNERS} are supported",
            ids.len()
        ));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_outside_the_range_are_rejected() {
        assert_eq!(parse_port("15001"), Ok(15001));
        assert!(parse_port("0").unwrap_err().contains("1..=65535"));
        assert!(parse_port("70000").unwrap_err().contains("70000"));
        assert!(parse_port("http").is_err());
    }

    #[test]
    fn id_lists_are_numeric_and_bounded() {
        assert_eq!(parse_ids("1337"), Ok(vec![1337]));
        assert_eq!(parse_ids("1337, 1338"), Ok(vec![1337, 1338]));
        assert!(parse_ids("envoy").unwrap_err().contains("'envoy'"));
        assert!(parse_ids("").is_err());
        assert!(
            parse_ids("1,2,3,4,5,6,7,8,9")
                .unwrap_err()
                .contains("at most 8")
        );
    }

    #[test]
    fn cidrs_parse_and_normalise() {
        let c: Ipv4Cidr = "127.0.0.1/8".parse().unwrap();
        assert_eq!(c.network(), Ipv4Addr::new(127, 0, 0, 0));
        assert_eq!(c.mask(), Ipv4Addr::new(255, 0, 0, 0));
        assert!("127.0.0.1/33".parse::<Ipv4Cidr>().is_err());
        assert!("localhost".parse::<Ipv4Cidr>().is_err());
        assert_eq!("10.0.0.1".parse::<Ipv4Cidr>().unwrap().prefix, 32);
    }

    #[test]
    fn bpf_round_trip_keeps_the_config() {
        let cfg = Config {
            proxy_port: 15006,
            proxy_uids: vec![1337, 0],
            proxy_gids: vec![],
            loopback: "127.0.0.0/8".parse().unwrap(),
            inbound_port: 15016,
            owner_groups: vec![5],
            groups_only: true,
            include_all: false,
            ..Config::default()
        };
        let back = Config::from_bpf(&cfg.to_bpf());
        assert_eq!(back.proxy_port, 15006);
        assert_eq!(back.proxy_uids, vec![1337, 0]);
        assert!(back.proxy_gids.is_empty());
        assert_eq!(back.loopback.prefix, 8);
        assert_eq!(back.inbound_port, 15016);
        assert_eq!(back.owner_groups, vec![5]);
        assert!(back.groups_only && !back.include_all && !back.include_loopback);
    }
}

impl Config {
    /// The eBPF configuration equivalent to an istio-iptables one, or the
    /// reasons eBPF mode cannot honour it (each names its flag). This is
    /// the one translation: both backends take their decisions from the
    /// same [`IstioConfig`]. Owner names are resolved through `host`;
    /// [`Config::local_addrs`] is left for the caller (it depends on the
    /// network namespace the capture is for).
    pub fn from_istio(cfg: &IstioConfig, host: &dyn Host) -> Result<Self, Vec<String>> {
        let not_yet = NotYet {
            exclude_interfaces: !cfg.exclude_interfaces.is_empty(),
            kube_virt_interfaces: !cfg.kube_virt_interfaces.is_empty(),
            redirect_dns: cfg.redirect_dns,
            drop_invalid: cfg.drop_invalid,
            ipv6: cfg.ipv6,
        };
        let mut unsupported: Vec<String> = not_yet.flags().into_iter().map(str::to_owned).collect();
        let ids = |list: &[String], what: &str, file: &str, unsupported: &mut Vec<String>| {
            let parsed: Option<Vec<u32>> = list
                .iter()
                .map(|id| crate::istio::resolve_owner(host, file, id))
                .collect();
            match parsed {
                Some(ids) if ids.len() <= MAX_OWNERS => ids,
                Some(_) => {
                    unsupported.push(format!("{what} with more than {MAX_OWNERS} ids"));
                    Vec::new()
                }
                None => {
                    unsupported.push(format!("{what} naming an unknown owner"));
                    Vec::new()
                }
            }
        };
        let proxy_uids = ids(
            &cfg.proxy_uids,
            "-u/--proxy-uid",
            "/etc/passwd",
            &mut unsupported,
        );
        let proxy_gids = ids(
            &cfg.proxy_gids,
            "-g/--proxy-gid",
            "/etc/group",
            &mut unsupported,
        );
        let (groups_only, groups) = match &cfg.owner_groups {
            OwnerGroups::Except(groups) => (false, groups),
            OwnerGroups::Only(groups) => (true, groups),
        };
        let owner_groups = ids(
            groups,
            "ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]",
            "/etc/group",
            &mut unsupported,
        );
        let mut ports = |raw: &str, what: &str| -> Vec<u16> {
            crate::istio::split(raw)
                .iter()
                .filter_map(|p| {
                    let port = p.parse::<u16>().ok();
                    if port.is_none() {
                        unsupported.push(format!("{what} '{p}' (only single port numbers)"));
                    }
                    port
                })
                .collect()
        };
        let ports_exclude = ports(
            &cfg.local_outbound_ports_exclude,
            "-o/--istio-local-outbound-ports-exclude",
        );
        let ports_include = ports(&cfg.outbound_ports, "-q/--istio-outbound-ports");
        let mut cidrs = |list: &[String], what: &str| -> Vec<Ipv4Cidr> {
            list.iter()
                .filter_map(|c| {
                    let cidr = c.parse::<Ipv4Cidr>().ok();
                    if cidr.is_none() {
                        unsupported.push(format!("{what} '{c}'"));
                    }
                    cidr
                })
                .collect()
        };
        let include = cidrs(&cfg.include.v4, "-i/--istio-service-cidr");
        let exclude = cidrs(&cfg.exclude.v4, "-x/--istio-service-exclude-cidr");
        let port = |raw: &str, what: &str, unsupported: &mut Vec<String>| {
            raw.trim().parse::<u16>().unwrap_or_else(|_| {
                unsupported.push(format!("{what} '{raw}'"));
                0
            })
        };
        let proxy_port = port(&cfg.envoy_port, "-p/--envoy-port", &mut unsupported);
        let inbound_port = port(
            &cfg.inbound_capture_port,
            "-z/--inbound-capture-port",
            &mut unsupported,
        );
        let tunnel_port = port(
            &cfg.inbound_tunnel_port,
            "-e/--inbound-tunnel-port",
            &mut unsupported,
        );
        let inbound = Inbound::parse(
            &cfg.inbound_ports,
            &cfg.local_exclude_ports.join(","),
            if cfg.tproxy { "TPROXY" } else { "REDIRECT" },
        )
        .unwrap_or_else(|why| {
            unsupported.push(why);
            None
        });
        let loopback = cfg.loopback_v4.parse::<Ipv4Cidr>();
        if loopback.is_err() {
            unsupported.push("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR".to_owned());
        }
        let config = Self {
            proxy_port,
            proxy_uids,
            proxy_gids,
            loopback: loopback.unwrap_or(Self::default().loopback),
            inbound_port,
            tunnel_port,
            include_all: cfg.include.wildcard,
            include,
            include_loopback: cfg.include.has_loopback,
            exclude,
            ports_exclude,
            ports_include,
            groups_only,
            owner_groups,
            local_addrs: Vec::new(),
            inbound,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        };
        if let Err(limit) = config.check_limits() {
            unsupported.push(limit);
        }
        if !unsupported.is_empty() {
            return Err(unsupported);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod istio_tests {
    use clap::Parser as _;

    use super::*;
    use crate::istio::{IstioArgs, RealHost};

    fn istio(argv: &[&str]) -> IstioConfig {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: IstioArgs,
        }
        let mut all = vec!["istio-iptables", "--ipv6=false"];
        all.extend_from_slice(argv);
        Cli::try_parse_from(all)
            .unwrap()
            .args
            .resolve(&RealHost)
            .unwrap()
    }

    #[test]
    fn default_outbound_capture_translates() {
        let cfg = Config::from_istio(
            &istio(&["-p", "15002", "-u", "1337,1338", "-g", "7", "-i", "*"]),
            &RealHost,
        )
        .unwrap();
        assert_eq!(cfg.proxy_port, 15002);
        assert_eq!(cfg.proxy_uids, vec![1337, 1338]);
        assert_eq!(cfg.proxy_gids, vec![7]);
        assert_eq!(cfg.loopback.to_string(), "127.0.0.1/32");
    }

    #[test]
    fn the_sidecar_command_line_names_what_ebpf_cannot_do_yet() {
        let cfg = Config::from_istio(
            &istio(&[
                "-p",
                "15001",
                "-z",
                "15006",
                "-u",
                "1337",
                "-m",
                "REDIRECT",
                "-i",
                "*",
                "-x",
                "",
                "-b",
                "*",
                "-d",
                "15090,15021,15020",
            ]),
            &RealHost,
        )
        .unwrap();
        let inbound = cfg.inbound.expect("-b '*' is inbound capture");
        assert!(inbound.all && !inbound.tproxy);
        assert_eq!(inbound.exclude, vec![15090, 15021, 15020]);
        let why = Config::from_istio(
            &istio(&["-b", "9080", "-c", "eth1", "-k", "eth2"]),
            &RealHost,
        )
        .unwrap_err();
        assert_eq!(
            why,
            vec!["-c/--istio-exclude-interfaces", "-k/--kube-virt-interfaces"]
        );
        let cfg =
            Config::from_istio(&istio(&["-b", "9080,9090", "-m", "TPROXY"]), &RealHost).unwrap();
        let inbound = cfg.inbound.expect("-b list");
        assert_eq!((inbound.all, inbound.tproxy), (false, true));
        assert_eq!(inbound.ports, vec![9080, 9090]);
        let cfg = Config::from_istio(
            &istio(&[
                "-i",
                "10.0.0.0/8",
                "-x",
                "10.1.0.0/16",
                "-q",
                "80",
                "-o",
                "22",
            ]),
            &RealHost,
        )
        .unwrap();
        assert!(!cfg.include_all);
        assert_eq!(cfg.include, vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(cfg.exclude, vec!["10.1.0.0/16".parse().unwrap()]);
        assert_eq!((cfg.ports_include, cfg.ports_exclude), (vec![80], vec![22]));
        let why = Config::from_istio(&istio(&["-u", "nosuchuser"]), &RealHost).unwrap_err();
        // -g defaults to -u, as in istio-iptables.
        assert_eq!(
            why,
            vec![
                "-u/--proxy-uid naming an unknown owner",
                "-g/--proxy-gid naming an unknown owner"
            ]
        );
    }
}

/// Properties: no flag value, and no configuration read back from the
/// kernel map, panics the parsers.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Text shaped like the flags' values, or any text.
    const VALUE: &str = "[0-9a-zA-Z.,/* :+-]{0,24}|\\PC{0,16}";

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn flag_values_parse_or_refuse(ports in VALUE, exclude in VALUE, mode in VALUE) {
            let _ = parse_port(&ports);
            let _ = parse_ids(&ports);
            let _ = parse_max_connections(&ports);
            let _ = parse_interception_mode(&mode);
            if let Ok(cidr) = ports.parse::<Ipv4Cidr>() {
                // What `status` prints parses back to the same network.
                prop_assert_eq!(cidr.to_string().parse::<Ipv4Cidr>(), Ok(cidr));
                let _ = (cidr.mask(), cidr.network());
            }
            if let Ok(Some(inbound)) = Inbound::parse(&ports, &exclude, &mode) {
                prop_assert!(inbound.ports.iter().chain(&inbound.exclude).all(|p| *p != 0));
            }
        }

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
