//! The pod's IPv6 routing view for redirected connects (the IPv4 one and
//! why it is needed: [`super::routes`]). The kernel picks an IPv6 source
//! by RFC 6724's rules over the candidate addresses (scope, preference,
//! labels, longest matching prefix), which is not re-implemented here: the
//! loader asks the pod's kernel. For each route of the pod's table, a UDP
//! socket connected to an address of the route reports the source the
//! kernel picked for it (what `ip -6 route get` shows), and a route the
//! kernel refuses to connect through is marked refused.
//!
//! Left out: link-local routes (a link-local destination is not redirected,
//! see `redirect_common::Source::LinkLocal`), multicast routes (TCP refuses
//! multicast before any route), the local table's routes to the pod's own
//! addresses (a connect to them leaves through `lo` from the address
//! itself) and cached routes. Policy routing (`ip -6 rule`) is not
//! mirrored, as for IPv4. Where an interface holds several addresses of
//! one scope, RFC 6724's longest-prefix rule can pick a different source
//! for other destinations of the same route than for the one asked.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};

use anyhow::{Context, Result, bail};

use crate::capture::Ipv6Cidr;

/// One entry of the IPv6 routing view: connects to `dst` leave from `src`,
/// or the kernel refuses them (`None`: an unreachable or prohibit route);
/// `excluded`: through an interface `-c` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteSource6 {
    pub dst: Ipv6Cidr,
    pub src: Option<Ipv6Addr>,
    pub excluded: bool,
}

/// A route of `/proc/net/ipv6_route`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route6 {
    pub iface: String,
    pub dst: Ipv6Cidr,
    /// `RTF_REJECT`: an unreachable, prohibit or blackhole route.
    pub reject: bool,
    /// `RTF_LOCAL`: a route to one of the namespace's own addresses.
    pub local: bool,
    /// `RTF_CACHE`: a cloned route, not one of the table's.
    pub cache: bool,
}

/// The IPv6 routing view of the calling thread's network namespace, each
/// route marked when its interface is one of `excluded` (`-c`).
pub fn read(excluded: &[String]) -> Result<Vec<RouteSource6>> {
    let table = std::fs::read_to_string("/proc/thread-self/net/ipv6_route")
        .context("reading the pod's IPv6 routes (/proc/thread-self/net/ipv6_route)")?;
    let routes = parse_proc_ipv6_route(&table)?;
    Ok(view(&routes, excluded, &kernel_source))
}

/// The view of `routes`, each with the source `source_for` gives an
/// address of it that no more specific route of the table covers (`None`:
/// the kernel refuses it).
pub fn view(
    routes: &[Route6],
    excluded: &[String],
    source_for: &dyn Fn(Ipv6Addr) -> Option<Ipv6Addr>,
) -> Vec<RouteSource6> {
    let kept: Vec<&Route6> = routes
        .iter()
        .filter(|r| !r.cache && !r.local && !special(r.dst))
        .collect();
    let mut out: Vec<RouteSource6> = kept
        .iter()
        .map(|route| RouteSource6 {
            dst: route.dst,
            src: if route.reject {
                None
            } else {
                probe(route.dst, &kept).and_then(source_for)
            },
            excluded: excluded.contains(&route.iface),
        })
        .collect();
    // Where a table has a route and the null route for one network (the
    // local table's ::/0), the route is the one a lookup ends at.
    out.sort_by_key(|r| (r.dst.prefix, r.dst.network(), r.src.is_none()));
    out.dedup_by_key(|r| (r.dst.prefix, r.dst.network()));
    out
}

/// Link-local and multicast networks, which the view leaves out.
fn special(dst: Ipv6Cidr) -> bool {
    let first = dst.network().segments()[0];
    (dst.prefix >= 10 && first & 0xffc0 == 0xfe80) || (dst.prefix >= 8 && first & 0xff00 == 0xff00)
}

/// An address of `dst` whose longest match among `routes` is `dst`
/// itself, to ask the kernel about; `None` when every candidate tried is
/// covered by a more specific route.
fn probe(dst: Ipv6Cidr, routes: &[&Route6]) -> Option<Ipv6Addr> {
    let net = u128::from(dst.network());
    let host_bits = if dst.prefix >= 128 {
        0
    } else {
        u128::MAX >> dst.prefix
    };
    // Global unicast addresses for the default route (`::1`, `::x` are
    // special), host parts with few zero bits for anything narrower.
    let patterns: [u128; 4] = [
        0x2001_0db8_0000_0000_0000_0000_0000_0001,
        0x2a00_1450_4001_0809_8a2c_5e1f_3b7d_9c01,
        0x3fff_0000_0000_0000_0000_0000_0000_0001,
        0x2400_cb00_2048_0001_a1b2_c3d4_e5f6_0102,
    ];
    patterns
        .iter()
        .map(|p| Ipv6Addr::from(net | (p & host_bits)))
        .find(|candidate| {
            routes
                .iter()
                .filter(|r| r.dst.contains(*candidate))
                .max_by_key(|r| r.dst.prefix)
                .is_some_and(|r| r.dst == dst)
        })
}

/// The source the calling thread's kernel picks for a connection to `to`:
/// a UDP socket connected there reports it (no packet is sent). `None`
/// when the kernel refuses the connect (no route).
fn kernel_source(to: Ipv6Addr) -> Option<Ipv6Addr> {
    source_from(None, to)
}

/// The source the kernel gives a socket bound to `lo` toward a global
/// address (what `SO_BINDTODEVICE=lo` sockets leave from); `None` when it
/// refuses such a connect.
pub fn lo_source() -> Option<Ipv6Addr> {
    source_from(
        Some("lo"),
        Ipv6Addr::from(0x2001_0db8_0000_0000_0000_0000_0000_0001u128),
    )
}

fn source_from(device: Option<&str>, to: Ipv6Addr) -> Option<Ipv6Addr> {
    let socket = UdpSocket::bind(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0)).ok()?;
    if let Some(device) = device {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
        // SAFETY: setsockopt on a socket this function owns, with a buffer
        // of the length given.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                device.as_ptr().cast(),
                device.len() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return None;
        }
    }
    socket.connect(SocketAddrV6::new(to, 9, 0, 0)).ok()?;
    match socket.local_addr().ok()? {
        SocketAddr::V6(local) if !local.ip().is_unspecified() => Some(*local.ip()),
        _ => None,
    }
}

/// Parses `/proc/net/ipv6_route`: per line `dst dst_len src src_len
/// next_hop metric refcnt use flags device`, addresses as 32 hex digits,
/// lengths and flags in hex.
pub fn parse_proc_ipv6_route(text: &str) -> Result<Vec<Route6>> {
    const RTF_REJECT: u32 = 0x0200;
    const RTF_CACHE: u32 = 0x0100_0000;
    const RTF_LOCAL: u32 = 0x8000_0000;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 10 {
            bail!("unexpected /proc/net/ipv6_route line: {line}");
        }
        let addr = u128::from_str_radix(fields[0], 16)
            .with_context(|| format!("'{}' is not an IPv6 address in hex", fields[0]))?;
        let prefix = u8::from_str_radix(fields[1], 16)
            .ok()
            .filter(|p| *p <= 128)
            .with_context(|| format!("'{}' is not a prefix length", fields[1]))?;
        let flags = u32::from_str_radix(fields[8], 16)
            .with_context(|| format!("'{}' is not a hex word", fields[8]))?;
        out.push(Route6 {
            iface: fields[9].to_owned(),
            dst: Ipv6Cidr {
                addr: Ipv6Addr::from(addr),
                prefix,
            },
            reject: flags & RTF_REJECT != 0,
            local: flags & RTF_LOCAL != 0,
            cache: flags & RTF_CACHE != 0,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod's table: its /64 on eth0, a default route through it, the
    /// local table's own address, link-local and multicast routes, the
    /// null route.
    const TABLE: &str = "\
fd000198001800000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000198001800000000000000000002 00000400 00000001 00000000 00000003     eth0
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
fd000198001800000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001     eth0
ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000003 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";

    fn net(text: &str) -> Ipv6Cidr {
        let (addr, prefix) = text.split_once('/').unwrap();
        Ipv6Cidr {
            addr: addr.parse().unwrap(),
            prefix: prefix.parse().unwrap(),
        }
    }

    #[test]
    fn the_table_parses_with_its_flags() {
        let routes = parse_proc_ipv6_route(TABLE).unwrap();
        assert_eq!(routes.len(), 6);
        assert_eq!(routes[0].dst, net("fd00:198:18::/64"));
        assert_eq!(routes[3].dst, net("fd00:198:18::1/128"));
        assert!(routes[3].local && !routes[3].reject);
        assert!(routes[5].reject && routes[5].iface == "lo");
        assert!(parse_proc_ipv6_route("zz 40").is_err());
    }

    #[test]
    fn each_route_gets_the_source_the_kernel_gives_one_of_its_addresses() {
        let routes = parse_proc_ipv6_route(TABLE).unwrap();
        let asked = std::cell::RefCell::new(Vec::new());
        let source = |to: Ipv6Addr| {
            asked.borrow_mut().push(to);
            Some("fd00:198:18::1".parse().unwrap())
        };
        let view = view(&routes, &["eth0".to_owned()], &source);
        let dsts: Vec<Ipv6Cidr> = view.iter().map(|r| r.dst).collect();
        // The null route and the default route share ::/0: the route kept.
        assert_eq!(dsts, vec![net("::/0"), net("fd00:198:18::/64")]);
        assert!(view.iter().all(|r| r.excluded));
        for to in asked.borrow().iter() {
            let covering: Vec<&Route6> = routes
                .iter()
                .filter(|r| !r.local && r.dst.contains(*to))
                .collect();
            let longest = covering.iter().map(|r| r.dst.prefix).max().unwrap();
            assert!(
                covering
                    .iter()
                    .any(|r| r.dst.prefix == longest && !r.reject),
                "{to} asked about a refused route"
            );
        }
    }

    #[test]
    fn a_refused_route_has_no_source() {
        let table = "\
20010db8000000000000000000000000 20 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000200       lo
";
        let routes = parse_proc_ipv6_route(table).unwrap();
        let view = view(&routes, &[], &|_| panic!("nothing to ask"));
        assert_eq!(view[0].src, None);
    }

    #[test]
    fn a_probe_avoids_more_specific_routes() {
        let routes = parse_proc_ipv6_route(TABLE).unwrap();
        let kept: Vec<&Route6> = routes.iter().collect();
        let p = probe(net("::/0"), &kept).unwrap();
        assert!(!net("fd00:198:18::/64").contains(p));
        assert!(net("fd00:198:18::/64").contains(probe(net("fd00:198:18::/64"), &kept).unwrap()));
    }
}
