//! `-k`: what the tc programs need to know of each KubeVirt interface,
//! read from the pod's network namespace at install: its index, and the
//! addresses REDIRECT in `PREROUTING` would send its connections to (the
//! interface's first IPv4 address; its first usable IPv6 one, and first
//! usable link-local one for link-local destinations).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::ifaddrs::Addr;

use super::config::VirtIface;

/// An interface as the kernel lists it: index, link type and addresses in
/// the kernel's order (IPv6 ones with their `IFA_F_*` flags).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interface {
    pub ifindex: u32,
    /// An Ethernet link (`ARPHRD_ETHER`): the tc programs read Ethernet frames.
    pub ethernet: bool,
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<(Ipv6Addr, u32)>,
}

const IFA_F_OPTIMISTIC: u32 = 0x04;
const IFA_F_TENTATIVE: u32 = 0x40;
const ARPHRD_ETHER: u16 = 1;

impl Interface {
    /// What REDIRECT would pick on this interface (see the module doc).
    /// An address still in duplicate address detection is passed over
    /// (unless optimistic), as the kernel passes it over.
    pub fn redirect_targets(&self) -> VirtIface {
        let usable = |(addr, flags): &&(Ipv6Addr, u32)| {
            addr.to_ipv4_mapped().is_none()
                && (flags & IFA_F_TENTATIVE == 0 || flags & IFA_F_OPTIMISTIC != 0)
        };
        VirtIface {
            ifindex: self.ifindex,
            addr4: self.v4.first().copied(),
            addr6: self.v6.iter().find(usable).map(|(a, _)| *a),
            addr6_link: self
                .v6
                .iter()
                .filter(usable)
                .find(|(a, _)| a.is_unicast_link_local())
                .map(|(a, _)| *a),
        }
    }
}

/// The interface `name` among `interfaces` (the calling thread's network
/// namespace's), `None` when there is none.
pub fn read(
    name: &str,
    interfaces: &[crate::ifaddrs::Entry],
) -> std::io::Result<Option<Interface>> {
    let mut found: Option<Interface> = None;
    let mut v6 = Vec::new();
    for entry in interfaces.iter().filter(|e| e.iface == name) {
        let Some(addr) = entry.addr else {
            continue;
        };
        let iface = found.get_or_insert_with(Interface::default);
        match addr {
            Addr::Link { ifindex, hatype } => {
                iface.ifindex = ifindex;
                iface.ethernet = hatype == ARPHRD_ETHER;
            }
            Addr::Ip(IpAddr::V4(a)) => iface.v4.push(a),
            Addr::Ip(IpAddr::V6(a)) => v6.push(a),
        }
    }
    let Some(mut iface) = found else {
        return Ok(None);
    };
    if !v6.is_empty() {
        let flags = ipv6_flags(iface.ifindex)?;
        iface.v6 = v6
            .into_iter()
            .map(|a| {
                (
                    a,
                    flags.iter().find(|(f, _)| *f == a).map_or(0, |(_, x)| *x),
                )
            })
            .collect();
    }
    Ok(Some(iface))
}

/// The `IFA_F_*` flags of the IPv6 addresses of interface `ifindex`, from
/// `/proc/net/if_inet6` (getifaddrs has the kernel's order, not the flags).
fn ipv6_flags(ifindex: u32) -> std::io::Result<Vec<(Ipv6Addr, u32)>> {
    let text = std::fs::read_to_string("/proc/net/if_inet6")?;
    Ok(parse_if_inet6(&text, ifindex))
}

/// `/proc/net/if_inet6`'s lines of interface `ifindex`: address (32 hex
/// digits), index, prefix length, scope and flags (hex), name.
fn parse_if_inet6(text: &str, ifindex: u32) -> Vec<(Ipv6Addr, u32)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let addr = u128::from_str_radix(fields.next()?, 16).ok()?;
            let index = u32::from_str_radix(fields.next()?, 16).ok()?;
            let _prefix = fields.next()?;
            let _scope = fields.next()?;
            let flags = u32::from_str_radix(fields.next()?, 16).ok()?;
            (index == ifindex).then_some((Ipv6Addr::from(addr), flags))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn redirect_takes_the_first_address_of_each_kind() {
        let iface = Interface {
            ifindex: 4,
            ethernet: true,
            v4: vec![Ipv4Addr::new(10, 1, 0, 1), Ipv4Addr::new(10, 2, 0, 1)],
            v6: vec![(v6("fe80::1"), 0x80), (v6("2001:db8::1"), 0x80)],
        };
        let got = iface.redirect_targets();
        assert_eq!(got.ifindex, 4);
        assert_eq!(got.addr4, Some(Ipv4Addr::new(10, 1, 0, 1)));
        assert_eq!(got.addr6, Some(v6("fe80::1")));
        assert_eq!(got.addr6_link, Some(v6("fe80::1")));
    }

    #[test]
    fn addresses_in_duplicate_address_detection_are_passed_over() {
        let iface = Interface {
            ifindex: 4,
            ethernet: true,
            v4: vec![],
            v6: vec![
                (v6("fe80::1"), IFA_F_TENTATIVE),
                (v6("2001:db8::1"), IFA_F_TENTATIVE | IFA_F_OPTIMISTIC),
                (v6("2001:db8::2"), 0),
            ],
        };
        let got = iface.redirect_targets();
        assert_eq!(got.addr4, None);
        assert_eq!(got.addr6, Some(v6("2001:db8::1")));
        assert_eq!(got.addr6_link, None);
    }

    #[test]
    fn if_inet6_lines_are_read_by_interface() {
        let text = "fe800000000000000000000000000001 04 40 20 80     eth1\n\
                    20010db8000000000000000000000001 04 40 00 c0     eth1\n\
                    00000000000000000000000000000001 01 80 10 80       lo\n";
        assert_eq!(
            parse_if_inet6(text, 4),
            vec![(v6("fe80::1"), 0x80), (v6("2001:db8::1"), 0xc0)]
        );
        assert_eq!(parse_if_inet6(text, 1), vec![(v6("::1"), 0x80)]);
        assert!(parse_if_inet6(text, 9).is_empty());
    }
}
