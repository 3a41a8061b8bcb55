//! The interfaces and addresses of the calling thread's network namespace,
//! as `getifaddrs(3)` lists them (two netlink dumps, in the kernel's
//! order): one read that the pod's address resolution, the eBPF routing
//! view and `-k`'s interfaces all take their part of (a
//! [`crate::host::RealHost`] keeps it for one install).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One `ifaddrs` node: an interface with one of its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub iface: String,
    /// `IFF_*` flags of the interface.
    pub flags: u32,
    pub addr: Option<Addr>,
    pub netmask: Option<IpAddr>,
    /// The broadcast address, for an interface with `IFF_BROADCAST`.
    pub broadcast: Option<IpAddr>,
}

/// An entry's address: an IP address, or (`AF_PACKET`) the link itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addr {
    Ip(IpAddr),
    Link { ifindex: u32, hatype: u16 },
}

impl Entry {
    /// The entry's IPv4 address.
    pub fn v4(&self) -> Option<Ipv4Addr> {
        match self.addr {
            Some(Addr::Ip(IpAddr::V4(a))) => Some(a),
            _ => None,
        }
    }

    /// The entry's IPv6 address.
    pub fn v6(&self) -> Option<Ipv6Addr> {
        match self.addr {
            Some(Addr::Ip(IpAddr::V6(a))) => Some(a),
            _ => None,
        }
    }
}

/// Every interface and address of the calling thread's network namespace.
pub fn read() -> std::io::Result<Vec<Entry>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        let broadcast = if ifa.ifa_flags & libc::IFF_BROADCAST as u32 != 0 {
            ip(ifa.ifa_ifu)
        } else {
            None
        };
        out.push(Entry {
            // SAFETY: a NUL-terminated name from getifaddrs.
            iface: unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
                .to_string_lossy()
                .into_owned(),
            flags: ifa.ifa_flags,
            addr: addr(ifa.ifa_addr),
            netmask: ip(ifa.ifa_netmask),
            broadcast,
        });
    }
    // SAFETY: the list getifaddrs allocated.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// A sockaddr getifaddrs filled in, read as the family it names.
fn addr(sa: *const libc::sockaddr) -> Option<Addr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: a non-null sockaddr of the family its first field names.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_PACKET => {
                let sll = &*sa.cast::<libc::sockaddr_ll>();
                Some(Addr::Link {
                    ifindex: sll.sll_ifindex as u32,
                    hatype: sll.sll_hatype,
                })
            }
            _ => ip(sa).map(Addr::Ip),
        }
    }
}

/// [`addr`] for IP families only.
fn ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: a non-null sockaddr of the family its first field names.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let sin = &*sa.cast::<libc::sockaddr_in>();
                Some(IpAddr::V4(Ipv4Addr::from(
                    sin.sin_addr.s_addr.to_ne_bytes(),
                )))
            }
            libc::AF_INET6 => {
                let sin6 = &*sa.cast::<libc::sockaddr_in6>();
                Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every namespace has `lo` with 127.0.0.1/8 (the tests' own
    /// namespace included) and its link entry.
    #[test]
    fn the_loopback_interface_is_listed() {
        let entries = read().expect("getifaddrs");
        let lo: Vec<&Entry> = entries.iter().filter(|e| e.iface == "lo").collect();
        assert!(
            lo.iter().any(|e| e.v4() == Some(Ipv4Addr::LOCALHOST)
                && e.netmask == Some(IpAddr::V4(Ipv4Addr::new(255, 0, 0, 0)))),
            "{lo:?}"
        );
        assert!(
            lo.iter()
                .any(|e| matches!(e.addr, Some(Addr::Link { ifindex: 1, .. }))),
            "{lo:?}"
        );
    }
}
