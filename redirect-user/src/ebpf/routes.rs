//! The pod's routing view that redirected connects need. iptables rewrites
//! a destination in nat `OUTPUT`, after the kernel's route lookup for the
//! original destination chose the connection's source address, and after
//! `tcp_v4_connect` refused what it does not connect to (no route, a
//! broadcast). eBPF rewrites the destination before that lookup, so the
//! connect program needs the lookup's answer for the original destination:
//! a source address per route of the pod's main table, read at install
//! (where a CNI plugin left them before any init container runs). Policy
//! routing (`ip rule`) is not mirrored.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result, bail};

use crate::capture::Ipv4Cidr;

/// One entry of the routing view: connects to `dst` leave from `src`, or
/// the kernel refuses them (`None`: a subnet broadcast address, or an
/// unreachable/prohibit route); `excluded`: through an interface `-c`
/// names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteSource {
    pub dst: Ipv4Cidr,
    pub src: Option<Ipv4Addr>,
    pub excluded: bool,
}

/// An IPv4 address of an interface, as `getifaddrs` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfAddr {
    pub iface: String,
    pub addr: Ipv4Addr,
    pub prefix: u8,
    /// The subnet broadcast address, when the interface has one.
    pub broadcast: Option<Ipv4Addr>,
}

/// A route of the main table, as `/proc/net/route` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MainRoute {
    pub iface: String,
    pub dst: Ipv4Cidr,
    pub gateway: Option<Ipv4Addr>,
    /// `RTF_REJECT`: an unreachable or prohibit route.
    pub reject: bool,
}

/// The routing view of the calling thread's network namespace, each route
/// marked when its interface is one of `excluded` (`-c`).
pub fn read(excluded: &[String], interfaces: &[crate::ifaddrs::Entry]) -> Result<Vec<RouteSource>> {
    let table = std::fs::read_to_string("/proc/thread-self/net/route")
        .context("reading the pod's routes (/proc/thread-self/net/route)")?;
    let routes = parse_proc_route(&table)?;
    Ok(view(&routes, &if_addrs(interfaces), excluded))
}

/// The view of `routes` and `addrs`: each route with the source the
/// kernel picks for it (`inet_select_addr`: the outgoing interface's
/// address in the gateway's or the destination's subnet, else its first)
/// and whether its interface is one of `excluded`, then each broadcast
/// address as refused.
pub fn view(routes: &[MainRoute], addrs: &[IfAddr], excluded: &[String]) -> Vec<RouteSource> {
    let mut out: Vec<RouteSource> = routes
        .iter()
        .filter_map(|route| {
            let excluded = excluded.contains(&route.iface);
            if route.reject {
                return Some(RouteSource {
                    dst: route.dst,
                    src: None,
                    excluded,
                });
            }
            let on_iface: Vec<&IfAddr> = addrs.iter().filter(|a| a.iface == route.iface).collect();
            let toward = route.gateway.unwrap_or(route.dst.network());
            let src = on_iface
                .iter()
                .find(|a| subnet_contains(a, toward))
                .or_else(|| on_iface.first())
                .map(|a| a.addr)
                // No address on the interface: the kernel takes another
                // interface's (the first that has one).
                .or_else(|| addrs.first().map(|a| a.addr))?;
            Some(RouteSource {
                dst: route.dst,
                src: Some(src),
                excluded,
            })
        })
        .collect();
    // The local table's broadcast routes (`fib_add_ifaddr`): each
    // subnet's all-ones address, and any broadcast address set explicitly.
    let subnet_broadcast = addrs.iter().filter(|a| a.prefix < 31).map(|a| {
        let host_bits = u32::MAX >> a.prefix;
        Ipv4Addr::from(u32::from(a.addr) | host_bits)
    });
    let explicit = addrs.iter().filter_map(|a| a.broadcast);
    for broadcast in subnet_broadcast.chain(explicit) {
        out.push(RouteSource {
            dst: Ipv4Cidr {
                addr: broadcast,
                prefix: 32,
            },
            src: None,
            excluded: false,
        });
    }
    out.sort_by_key(|r| (r.dst.prefix, r.dst.network()));
    out.dedup_by_key(|r| (r.dst.prefix, r.dst.network()));
    out
}

fn subnet_contains(addr: &IfAddr, ip: Ipv4Addr) -> bool {
    Ipv4Cidr {
        addr: addr.addr,
        prefix: addr.prefix,
    }
    .contains(ip)
}

/// Parses `/proc/net/route`: a header line, then `Iface Destination
/// Gateway Flags RefCnt Use Metric Mask ...`, addresses as the hex of the
/// network-order word in host order.
pub fn parse_proc_route(text: &str) -> Result<Vec<MainRoute>> {
    const RTF_GATEWAY: u32 = 0x2;
    const RTF_REJECT: u32 = 0x200;
    let word = |field: &str| -> Result<u32> {
        u32::from_str_radix(field, 16).with_context(|| format!("'{field}' is not a hex word"))
    };
    let addr = |field: &str| -> Result<Ipv4Addr> { Ok(Ipv4Addr::from(word(field)?.to_ne_bytes())) };
    let mut out = Vec::new();
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            bail!("unexpected /proc/net/route line: {line}");
        }
        let flags = word(fields[3])?;
        let mask = u32::from_be_bytes(addr(fields[7])?.octets());
        if mask.leading_ones() + mask.trailing_zeros() != 32 {
            bail!("non-contiguous netmask in /proc/net/route: {line}");
        }
        out.push(MainRoute {
            iface: fields[0].to_owned(),
            dst: Ipv4Cidr {
                addr: addr(fields[1])?,
                prefix: mask.leading_ones() as u8,
            },
            gateway: (flags & RTF_GATEWAY != 0)
                .then(|| addr(fields[2]))
                .transpose()?,
            reject: flags & RTF_REJECT != 0,
        });
    }
    Ok(out)
}

/// The IPv4 addresses of `interfaces` outside 127/8, in the kernel's
/// order.
fn if_addrs(interfaces: &[crate::ifaddrs::Entry]) -> Vec<IfAddr> {
    interfaces
        .iter()
        .filter_map(|entry| {
            let addr = entry.v4().filter(|a| !a.is_loopback())?;
            let IpAddr::V4(mask) = entry.netmask? else {
                return None;
            };
            let broadcast = match entry.broadcast {
                Some(IpAddr::V4(b)) if !b.is_unspecified() => Some(b),
                _ => None,
            };
            Some(IfAddr {
                iface: entry.iface.clone(),
                addr,
                prefix: u32::from_be_bytes(mask.octets()).leading_ones() as u8,
                broadcast,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Ipv4Cidr {
        let (addr, prefix) = text.split_once('/').unwrap();
        Ipv4Cidr {
            addr: addr.parse().unwrap(),
            prefix: prefix.parse().unwrap(),
        }
    }

    #[test]
    fn proc_route_lines_parse() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t010012C6\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    eth0\t000012C6\t00000000\t0001\t0\t0\t0\t0000FEFF\t0\t0\t0\n\
                    *\t0000000A\t00000000\t0201\t0\t0\t0\t000000FF\t0\t0\t0\n";
        let routes = parse_proc_route(text).unwrap();
        assert_eq!(
            routes,
            vec![
                MainRoute {
                    iface: "eth0".into(),
                    dst: cidr("0.0.0.0/0"),
                    gateway: Some(Ipv4Addr::new(198, 18, 0, 1)),
                    reject: false,
                },
                MainRoute {
                    iface: "eth0".into(),
                    dst: cidr("198.18.0.0/15"),
                    gateway: None,
                    reject: false,
                },
                MainRoute {
                    iface: "*".into(),
                    dst: cidr("10.0.0.0/8"),
                    gateway: None,
                    reject: true,
                },
            ]
        );
    }

    #[test]
    fn each_route_leaves_from_its_interface_address() {
        let addrs = vec![
            IfAddr {
                iface: "eth0".into(),
                addr: Ipv4Addr::new(10, 1, 0, 5),
                prefix: 24,
                broadcast: Some(Ipv4Addr::new(10, 1, 0, 255)),
            },
            IfAddr {
                iface: "net1".into(),
                addr: Ipv4Addr::new(192, 168, 7, 2),
                prefix: 24,
                broadcast: Some(Ipv4Addr::new(192, 168, 7, 255)),
            },
            IfAddr {
                iface: "net1".into(),
                addr: Ipv4Addr::new(172, 16, 0, 2),
                prefix: 16,
                broadcast: None,
            },
            IfAddr {
                iface: "net2".into(),
                addr: Ipv4Addr::new(100, 64, 0, 1),
                prefix: 31,
                broadcast: None,
            },
        ];
        let routes = vec![
            MainRoute {
                iface: "eth0".into(),
                dst: cidr("0.0.0.0/0"),
                gateway: Some(Ipv4Addr::new(10, 1, 0, 1)),
                reject: false,
            },
            MainRoute {
                iface: "net1".into(),
                dst: cidr("172.16.0.0/16"),
                gateway: None,
                reject: false,
            },
            MainRoute {
                iface: "net1".into(),
                dst: cidr("10.50.0.0/16"),
                gateway: Some(Ipv4Addr::new(192, 168, 7, 1)),
                reject: false,
            },
        ];
        let view = view(&routes, &addrs, &["net1".to_owned()]);
        let src = |dst: &str| {
            view.iter()
                .find(|r| r.dst == cidr(dst))
                .map(|r| r.src)
                .unwrap()
        };
        assert_eq!(src("0.0.0.0/0"), Some(Ipv4Addr::new(10, 1, 0, 5)));
        assert_eq!(src("172.16.0.0/16"), Some(Ipv4Addr::new(172, 16, 0, 2)));
        assert_eq!(src("10.50.0.0/16"), Some(Ipv4Addr::new(192, 168, 7, 2)));
        assert_eq!(src("10.1.0.255/32"), None);
        assert_eq!(src("192.168.7.255/32"), None);
        // A broadcast route even where no broadcast address was set; none
        // for a point-to-point /31.
        assert_eq!(src("172.16.255.255/32"), None);
        assert_eq!(view.len(), 6);
        // `-c net1` marks net1's routes, and only those.
        let excluded: Vec<String> = view
            .iter()
            .filter(|r| r.excluded)
            .map(|r| r.dst.to_string())
            .collect();
        assert_eq!(excluded, ["10.50.0.0/16", "172.16.0.0/16"]);
    }

    #[test]
    fn this_namespace_reads() {
        // Whatever this machine's table and addresses hold, they parse.
        let interfaces = crate::ifaddrs::read().unwrap();
        read(&[], &interfaces).unwrap();
    }
}
