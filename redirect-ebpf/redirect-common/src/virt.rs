//! `-k`: Istio's `PREROUTING -i X -j ISTIO_REDIRECT` for the KubeVirt
//! interfaces, decided here and applied by the tc programs as a packet
//! rewrite (REDIRECT's destination NAT, and conntrack's reverse NAT of the
//! replies).

use crate::{
    abi::{ConnTuple, MAX_VIRT_IFACES, RedirectConfig, VirtIface},
    sockopt::{to_v4_mapped, v4_mapped},
};

/// The `-k` interface with index `ifindex`, if it is one.
#[inline(always)]
pub fn virt_iface(cfg: &RedirectConfig, ifindex: u32) -> Option<&VirtIface> {
    let mut i = 0;
    while i < MAX_VIRT_IFACES {
        if i as u32 >= cfg.virt_iface_count {
            return None;
        }
        if cfg.virt_ifaces[i].ifindex == ifindex {
            return Some(&cfg.virt_ifaces[i]);
        }
        i += 1;
    }
    None
}

/// Where REDIRECT in `PREROUTING` sends a connection that arrived on
/// `iface` for `dst` (an IPv4 address mapped, or an IPv6 one): the
/// interface's first address of the family, for an IPv6 link-local
/// destination its first link-local one (the kernel's rule since 6.7:
/// an address of the destination's scope). `None`: there is none, and
/// REDIRECT drops the packet.
#[inline(always)]
pub fn redirect_target(iface: &VirtIface, dst: &[u32; 4]) -> Option<[u32; 4]> {
    let to = if v4_mapped(dst).is_some() {
        if iface.addr4 == 0 {
            return None;
        }
        to_v4_mapped(iface.addr4)
    } else if is_link_local6(dst) {
        iface.addr6_link
    } else {
        iface.addr6
    };
    if to == [0; 4] { None } else { Some(to) }
}

/// The key of the NAT entry of a connection REDIRECT took from a `-k`
/// interface, given its tuple after the change (`vm` the VM's end, `to`
/// the interface's address and proxy port). It is kept in the tuple map
/// beside the record the proxy's end takes, under the tuple reversed:
/// its "client" is the proxy port, from which no app connects while the
/// proxy listens there, so it cannot be another connection's record.
#[inline(always)]
pub const fn virt_nat_key(
    pod: u32,
    vm_ip: [u32; 4],
    vm_port: u16,
    to_ip: [u32; 4],
    to_port: u16,
) -> ConnTuple {
    ConnTuple {
        client_ip: to_ip,
        server_ip: vm_ip,
        client_port: to_port,
        server_port: vm_port,
        pod,
    }
}

/// `fe80::/10` (four network-order words).
#[inline(always)]
pub fn is_link_local6(ip: &[u32; 4]) -> bool {
    let first = u32::from_be(ip[0]);
    first >> 22 == 0xfe80 >> 6
}

/// `::1`, which the kernel drops when it arrives on any other interface
/// than `lo` before netfilter (or a tc rewrite) could have redirected it.
#[inline(always)]
pub fn is_loopback6(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && u32::from_be(ip[3]) == 1
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::Ip6;

    fn v6(text: &str) -> [u32; 4] {
        Ip6::from_octets(text.parse::<Ipv6Addr>().unwrap().octets()).0
    }

    fn v4(text: &str) -> u32 {
        u32::from_ne_bytes(text.parse::<Ipv4Addr>().unwrap().octets())
    }

    fn cfg_with(ifaces: &[VirtIface]) -> RedirectConfig {
        let mut cfg = zeroed();
        for (i, iface) in ifaces.iter().enumerate() {
            cfg.virt_ifaces[i] = *iface;
        }
        cfg.virt_iface_count = ifaces.len() as u32;
        cfg
    }

    fn zeroed() -> RedirectConfig {
        // SAFETY: RedirectConfig is plain integers; all zeros is valid.
        unsafe { core::mem::zeroed() }
    }

    #[test]
    fn only_the_listed_interfaces_are_found() {
        let a = VirtIface {
            ifindex: 7,
            ..VirtIface::default()
        };
        let b = VirtIface {
            ifindex: 9,
            ..VirtIface::default()
        };
        let mut cfg = cfg_with(&[a, b]);
        assert_eq!(virt_iface(&cfg, 9), Some(&b));
        assert_eq!(virt_iface(&cfg, 7), Some(&a));
        assert_eq!(virt_iface(&cfg, 8), None);
        // Entries past the count are not interfaces, whatever they hold.
        cfg.virt_iface_count = 1;
        assert_eq!(virt_iface(&cfg, 9), None);
        cfg.virt_iface_count = 0;
        assert_eq!(virt_iface(&cfg, 7), None);
    }

    #[test]
    fn redirect_goes_to_the_interfaces_address_of_the_family_and_scope() {
        let iface = VirtIface {
            ifindex: 3,
            addr4: v4("10.9.0.1"),
            addr6: v6("fe80::1"),
            addr6_link: v6("fe80::1"),
        };
        assert_eq!(
            redirect_target(&iface, &to_v4_mapped(v4("1.2.3.4"))),
            Some(to_v4_mapped(v4("10.9.0.1")))
        );
        // A global destination takes the first address, link-local or not.
        assert_eq!(
            redirect_target(&iface, &v6("2001:db8::5")),
            Some(v6("fe80::1"))
        );
        let global_first = VirtIface {
            addr6: v6("2001:db8::1"),
            ..iface
        };
        assert_eq!(
            redirect_target(&global_first, &v6("2001:db8::5")),
            Some(v6("2001:db8::1"))
        );
        assert_eq!(
            redirect_target(&global_first, &v6("fe80::77")),
            Some(v6("fe80::1"))
        );
    }

    #[test]
    fn without_an_address_of_the_family_redirect_drops() {
        let none = VirtIface {
            ifindex: 3,
            ..VirtIface::default()
        };
        assert_eq!(redirect_target(&none, &to_v4_mapped(v4("1.2.3.4"))), None);
        assert_eq!(redirect_target(&none, &v6("2001:db8::5")), None);
        let global_only = VirtIface {
            addr6: v6("2001:db8::1"),
            ..none
        };
        assert_eq!(redirect_target(&global_only, &v6("fe80::9")), None);
    }

    #[test]
    fn link_local_and_loopback_are_told_apart() {
        assert!(is_link_local6(&v6("fe80::1")));
        assert!(is_link_local6(&v6("febf:ffff::1")));
        assert!(!is_link_local6(&v6("fec0::1")));
        assert!(!is_link_local6(&v6("2001:db8::1")));
        assert!(is_loopback6(&v6("::1")));
        assert!(!is_loopback6(&v6("::2")));
        assert!(!is_loopback6(&v6("::ffff:127.0.0.1")));
    }
}
