//! The socket-level answers: the tuples that key the original-destination
//! records, `getsockopt(SO_ORIGINAL_DST)`'s (and `IP6T_SO_ORIGINAL_DST`'s)
//! rules and bytes, and IPv4-mapped IPv6 addresses.

use crate::abi::{ConnTuple, OrigDst};

/// The client-side tuple of a connection given the tuple of the socket asking
/// (local, remote), for a socket that is the *server* side (the proxy's
/// accepted socket): its remote end is the client.
#[inline(always)]
pub const fn tuple_from_server_side(
    pod: u32,
    local_ip: [u32; 4],
    local_port: u16,
    remote_ip: [u32; 4],
    remote_port: u16,
) -> ConnTuple {
    ConnTuple {
        client_ip: remote_ip,
        server_ip: local_ip,
        client_port: remote_port,
        server_port: local_port,
        pod,
    }
}

/// `SOL_IP`, the level of `SO_ORIGINAL_DST`.
pub const SOL_IP: i32 = 0;
/// `SO_ORIGINAL_DST` (`linux/netfilter_ipv4.h`).
pub const SO_ORIGINAL_DST: i32 = 80;
/// Size of `struct sockaddr_in`, what `SO_ORIGINAL_DST` returns.
pub const SOCKADDR_IN_LEN: i32 = 16;
/// `SOL_IPV6`, the level of `IP6T_SO_ORIGINAL_DST`.
pub const SOL_IPV6: i32 = 41;
/// `IP6T_SO_ORIGINAL_DST` (`linux/netfilter_ipv6/ip6_tables.h`).
pub const IP6T_SO_ORIGINAL_DST: i32 = 80;
/// Size of `struct sockaddr_in6`, what `IP6T_SO_ORIGINAL_DST` returns.
pub const SOCKADDR_IN6_LEN: i32 = 28;

/// Largest `optlen` the program keeps when it answers: below this, the
/// buffer it writes is exactly the caller's length (the kernel hands the
/// program min(caller's length, page size) bytes).
pub const MAX_KEPT_OPTLEN: i32 = SOCKOPT_PAGE;

/// What the getsockopt program does with one `getsockopt()` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockoptAction {
    /// Not ours: hand the caller what the kernel, or a program that ran
    /// before this one, produced (see [`pass_through_optlen`]).
    PassThrough,
    /// `SO_ORIGINAL_DST`: answer it from the record of this connection, if
    /// there is one (else pass through).
    AnswerOriginalDst,
    /// `IP6T_SO_ORIGINAL_DST`: the same for an IPv6 connection.
    AnswerOriginalDst6,
}

/// The page size the kernel caps a getsockopt program's buffer at (the
/// smallest Linux page; on larger pages the cap is only reached later).
pub const SOCKOPT_PAGE: i32 = 4096;

/// What a getsockopt program with nothing to say must store in `optlen`,
/// `None` meaning "leave `optlen` and `retval` exactly as found".
///
/// The kernel's cgroup-sockopt rules (kernel/bpf/cgroup.c): the program's
/// buffer holds the answer so far, the kernel's own or one a program that
/// ran earlier on this or a descendant cgroup wrote, and is copied back
/// unless `optlen` is 0. Left alone it is copied back unchanged, so an
/// earlier program's answer survives. Only two cases need `optlen = 0`
/// (the kernel then keeps the caller's buffer as the kernel's getsockopt
/// left it): an answer longer than the page the program sees (`optlen`
/// beyond it is an `EFAULT` before kernel 6.5), and a failing call
/// (`retval` set: the kernel did not copy the caller's buffer in, so
/// copying the program's zeroed buffer back would overwrite it).
#[inline(always)]
pub const fn pass_through_optlen(retval: i32, optlen: i32) -> Option<i32> {
    if retval != 0 || optlen > SOCKOPT_PAGE {
        Some(0)
    } else {
        None
    }
}

/// Classifies a `getsockopt()` call by its level and option.
#[inline(always)]
pub fn classify_getsockopt(level: i32, optname: i32) -> SockoptAction {
    if level == SOL_IP && optname == SO_ORIGINAL_DST {
        SockoptAction::AnswerOriginalDst
    } else if level == SOL_IPV6 && optname == IP6T_SO_ORIGINAL_DST {
        SockoptAction::AnswerOriginalDst6
    } else {
        SockoptAction::PassThrough
    }
}

/// The `optlen` to report with an answer of `len` bytes (a `sockaddr_in`
/// or `sockaddr_in6`): the caller's, as conntrack leaves it, when it is a
/// length the program's buffer matches; else `len`.
#[inline(always)]
pub const fn answer_optlen(optlen: i32, len: i32) -> i32 {
    if optlen >= len && optlen <= MAX_KEPT_OPTLEN {
        optlen
    } else {
        len
    }
}

/// The `struct sockaddr_in` bytes that `SO_ORIGINAL_DST` returns for `orig`:
/// family AF_INET (host order), port and address in network order, zero padding.
#[inline(always)]
pub fn sockaddr_in(orig: &OrigDst) -> [u8; 16] {
    let family = 2u16.to_ne_bytes();
    let port = orig.port.to_be_bytes();
    let ip = orig.ip[3].to_ne_bytes();
    [
        family[0], family[1], port[0], port[1], ip[0], ip[1], ip[2], ip[3], 0, 0, 0, 0, 0, 0, 0, 0,
    ]
}

/// The `struct sockaddr_in6` words that `IP6T_SO_ORIGINAL_DST` returns for
/// `orig`, as conntrack fills it for a socket without a flow label or a
/// scope: family AF_INET6 (host order) and port (network order) in the
/// first word, flow info 0, the address, scope id 0.
#[inline(always)]
pub fn sockaddr_in6(orig: &OrigDst) -> [u32; 7] {
    let family = 10u16.to_ne_bytes();
    let port = orig.port.to_be_bytes();
    [
        u32::from_ne_bytes([family[0], family[1], port[0], port[1]]),
        0,
        orig.ip[0],
        orig.ip[1],
        orig.ip[2],
        orig.ip[3],
        0,
    ]
}

/// The IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`),
/// as the kernel's `u32[4]` of network-order words; `None` for real IPv6.
/// A dual-stack socket connecting to such an address sends IPv4 packets,
/// which Istio's IPv4 nat rules capture: so must connect6.
#[inline(always)]
pub fn v4_mapped(ip6: &[u32; 4]) -> Option<u32> {
    (ip6[0] == 0 && ip6[1] == 0 && ip6[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]))
        .then_some(ip6[3])
}

/// `::ffff:a.b.c.d` for a network-order IPv4 address.
#[inline(always)]
pub fn to_v4_mapped(ip: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip]
}

/// The tuple of a client-side socket (the app's connected socket).
#[inline(always)]
pub const fn tuple_from_client_side(
    pod: u32,
    local_ip: [u32; 4],
    local_port: u16,
    remote_ip: [u32; 4],
    remote_port: u16,
) -> ConnTuple {
    ConnTuple {
        client_ip: local_ip,
        server_ip: remote_ip,
        client_port: local_port,
        server_port: remote_port,
        pod,
    }
}
