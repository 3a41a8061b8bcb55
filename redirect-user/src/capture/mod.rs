//! The one resolved capture configuration.
//!
//! Every command line (`istio-iptables`, `install`, `run`) resolves into a
//! [`Capture`] through the typed parsers of [`parse`]; nothing else of the
//! command line reaches the backends. Its consumers are the two lowerings:
//! `iptables::rules::rules(&Capture)` (Istio's rules, byte for byte) and
//! `ebpf::lower::lower(&Capture)` (the kernel configuration and sets, or
//! the list of what eBPF cannot honour, which is auto mode's reason).
//!
//! Values keep the text they were given ([`Given`]) where istio-iptables
//! passes a flag's text through to its rules unchanged (`-q "4000, 5000"`
//! becomes `--dport  5000`): the iptables lowering renders that text, the
//! eBPF lowering uses the parsed value, and neither parses again.

pub mod parse;

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// A parsed value and the text it was given as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Given<T> {
    pub value: T,
    pub text: String,
}

impl<T> fmt::Display for Given<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A port or an inclusive range of ports (`a:b`, `a:`, `:b`, as iptables'
/// `--dport` takes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    pub first: u16,
    pub last: u16,
}

impl Ports {
    /// The single port, when this is one.
    pub fn single(self) -> Option<u16> {
        (self.first == self.last).then_some(self.first)
    }
}

/// A comma-separated port list, each item as given.
pub type PortList = Vec<Given<Ports>>;

/// `-b`: which inbound ports are captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboundPorts {
    /// `-b ''`: no inbound capture.
    Off,
    /// `-b '*'`: every port but `-d`.
    All,
    /// These ports.
    List(PortList),
}

/// An IP network as `addr/bits`, host bits kept (as istio-iptables renders
/// it: Go's `netip.Prefix`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub bits: u8,
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.bits)
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

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & u32::from(self.mask()) == u32::from(self.network())
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An IPv6 network, `a::b/n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Cidr {
    pub addr: Ipv6Addr,
    pub prefix: u8,
}

impl Ipv6Cidr {
    fn mask(&self) -> u128 {
        if self.prefix == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.prefix.min(128)))
        }
    }

    pub fn network(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.addr) & self.mask())
    }

    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) & self.mask() == u128::from(self.network())
    }
}

impl fmt::Display for Ipv6Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Destination networks of one flag (`-i`, `-x`), split by family.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Cidrs {
    /// `*`: every destination.
    pub wildcard: bool,
    pub v4: Vec<Prefix>,
    pub v6: Vec<Prefix>,
    /// A listed network is a loopback one (127/8, ::1): Istio then keeps
    /// the pod's local traffic in the chain.
    pub has_loopback: bool,
}

impl Cidrs {
    /// The IPv4 networks, typed.
    pub fn v4_cidrs(&self) -> Vec<Ipv4Cidr> {
        self.v4
            .iter()
            .filter_map(|p| match p.addr {
                IpAddr::V4(addr) => Some(Ipv4Cidr {
                    addr,
                    prefix: p.bits,
                }),
                IpAddr::V6(_) => None,
            })
            .collect()
    }

    /// The IPv6 networks, typed.
    pub fn v6_cidrs(&self) -> Vec<Ipv6Cidr> {
        self.v6
            .iter()
            .filter_map(|p| match p.addr {
                IpAddr::V6(addr) => Some(Ipv6Cidr {
                    addr,
                    prefix: p.bits,
                }),
                IpAddr::V4(_) => None,
            })
            .collect()
    }
}

/// Whose outbound traffic is captured, by owner group
/// (`ISTIO_OUTBOUND_OWNER_GROUPS`, `..._EXCLUDE`): names or ids as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerGroups {
    /// Every group except these.
    Except(Vec<String>),
    /// Only these groups.
    Only(Vec<String>),
}

impl OwnerGroups {
    pub fn groups(&self) -> &[String] {
        match self {
            Self::Except(groups) | Self::Only(groups) => groups,
        }
    }
}

/// DNS capture (`--redirect-dns`, `--capture-all-dns`), when in effect.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Dns {
    /// Every destination's port 53, not only the resolv.conf servers'.
    pub capture_all: bool,
    /// The resolv.conf servers, as written there.
    pub v4: Vec<String>,
    pub v6: Vec<String>,
}

/// Which rule table a capture follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Profile {
    /// Today's `istio-iptables` (every flag below).
    #[default]
    Istio,
    /// The table of Istio's first init script (`--profile legacy`): every
    /// connection leaving through `lo` to anything but 127.0.0.1 goes to
    /// the proxy port whoever makes it, then the proxy's uid returns,
    /// 127.0.0.1 returns, the rest goes to the proxy port; inbound TCP on
    /// every port goes to the proxy port too. Only `-p` and `-u` apply:
    /// see [`Capture::legacy`].
    Legacy,
}

/// The resolved capture configuration. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capture {
    /// Which rule table the lowerings produce.
    pub profile: Profile,
    /// `-p`: where outbound connections go.
    pub proxy_port: Given<u16>,
    /// `-z`: the proxy's inbound listener.
    pub inbound_port: Given<u16>,
    /// `-e`: the inbound tunnel port.
    pub tunnel_port: Given<u16>,
    /// `-u`: the proxy's users, names or ids as given.
    pub proxy_uids: Vec<String>,
    /// `-g`: the proxy's groups, names or ids as given.
    pub proxy_gids: Vec<String>,
    /// `-m TPROXY` (else REDIRECT).
    pub tproxy: bool,
    /// `-t`: TPROXY's mark.
    pub tproxy_mark: Given<u32>,
    /// `-r`: TPROXY's routing table.
    pub tproxy_route_table: Given<u32>,
    /// `-b`.
    pub inbound: InboundPorts,
    /// `-d`: inbound ports never captured (Istio uses them with `-b '*'`).
    pub inbound_exclude: PortList,
    /// `-i`: destinations captured.
    pub include: Cidrs,
    /// `-x`: destinations never captured.
    pub exclude: Cidrs,
    /// `-q`: destination ports always captured.
    pub outbound_ports: PortList,
    /// `-o`: destination ports never captured.
    pub outbound_exclude: PortList,
    /// `-c`: interfaces whose traffic is never captured.
    pub exclude_interfaces: Vec<String>,
    /// `-k`: interfaces whose inbound traffic is treated as outbound.
    pub kube_virt_interfaces: Vec<String>,
    /// DNS capture, `None` when off (or on with no server to capture).
    pub dns: Option<Dns>,
    /// `--drop-invalid`.
    pub drop_invalid: bool,
    /// IPv6 rules (`--ipv6`, or the pod has IPv6).
    pub ipv6: bool,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`.
    pub owner_groups: OwnerGroups,
    /// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`: destinations never captured.
    pub loopback: Given<Ipv4Cidr>,
    /// The pod's own IPv4 addresses outside 127/8 (those of the network
    /// namespace the capture is for): connects to them leave through `lo`.
    pub pod_addresses: Vec<Ipv4Addr>,
    /// `--max-connections`: redirected connections open at once (eBPF).
    pub max_connections: u32,
    /// Which eBPF decisions are reported (`redirect run --log`; 0: none).
    pub log_level: u8,
}

impl Capture {
    /// `--profile legacy` with `proxy_port` (`-p`) and `proxy_uids` (`-u`):
    /// the fields say what the legacy table does, so that a lowering that
    /// reads only them (eBPF's inbound rules) is right, and the ones the
    /// table has no rule for are empty: inbound on every port to the proxy
    /// port itself, no tunnel port (0), every destination, 127.0.0.1/32 the
    /// only loopback return, no groups.
    pub fn legacy(
        proxy_port: Given<u16>,
        proxy_uids: Vec<String>,
        pod_addresses: Vec<Ipv4Addr>,
        max_connections: u32,
        log_level: u8,
    ) -> Self {
        Self {
            profile: Profile::Legacy,
            inbound_port: proxy_port.clone(),
            proxy_port,
            tunnel_port: Given {
                value: 0,
                text: String::new(),
            },
            proxy_uids,
            proxy_gids: Vec::new(),
            tproxy: false,
            tproxy_mark: Given {
                value: 0,
                text: String::new(),
            },
            tproxy_route_table: Given {
                value: 0,
                text: String::new(),
            },
            inbound: InboundPorts::All,
            inbound_exclude: Vec::new(),
            include: Cidrs {
                wildcard: true,
                ..Cidrs::default()
            },
            exclude: Cidrs::default(),
            outbound_ports: Vec::new(),
            outbound_exclude: Vec::new(),
            exclude_interfaces: Vec::new(),
            kube_virt_interfaces: Vec::new(),
            dns: None,
            drop_invalid: false,
            ipv6: false,
            owner_groups: OwnerGroups::Except(Vec::new()),
            loopback: parse::default_loopback(),
            pod_addresses,
            max_connections,
            log_level,
        }
    }
}
