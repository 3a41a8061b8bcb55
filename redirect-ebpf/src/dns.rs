//! `cgroup/sendmsg4`/`6` (kernel 4.18) and `cgroup/recvmsg4`/`6` (5.2):
//! Istio's DNS capture for UDP sockets that send without connecting, and
//! the reverse NAT conntrack does for every captured DNS socket. Connected
//! UDP and TCP DNS are [`crate::connect`]'s. The `6` programs serve
//! dual-stack sockets sending to IPv4-mapped nameservers (Istio's IPv4
//! rules), and IPv6 nameservers (its IPv6 rules: to `[::1]:15053`).
//!
//! Nothing is NATed, so nothing needs Istio's conntrack zones (the raw
//! table's `CT --zone` rules keep the proxy's upstream DNS and the app's
//! DNS to the same server apart in conntrack, where a 4-tuple reused
//! between the two would be de-NATed wrongly).

use aya_ebpf::{bindings::bpf_sock, macros::cgroup_sock_addr, programs::SockAddrContext};
use redirect_common::{
    CFG_DNS, Counter, DNS_PORT, Ip6, LOCALHOST, OrigDst, to_v4_mapped, v4_mapped,
};

use crate::{
    connect::{capture, capture6, pass_ipv6},
    maps::{active, count, load, pod_of, sock_record},
    net::{ALLOW, read_ip6, write_ip6},
};

/// ```text
/// -A ISTIO_OUTPUT_DNS -p udp --dport 53 -d NS -j REDIRECT --to-port 15053
/// ```
///
/// (reached through the `ISTIO_OUTPUT` rules before it, see
/// `decide_connect`). A datagram to a nameserver's port 53 goes to
/// `127.0.0.1:15053`, from the source the kernel would have chosen for the
/// nameserver; the socket remembers the nameserver for the reply.
#[cgroup_sock_addr(sendmsg4)]
pub fn redirect_sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/sendmsg4 program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    if !may_be_dns(addr.user_port) {
        return ALLOW;
    }
    // SAFETY: `sk` is always a valid socket in a sock_addr context.
    let sk = unsafe { &*addr.__bindgen_anon_1.sk };
    let src_ip = match addr.msg_src_ip4 {
        0 => sk.src_ip4,
        chosen => chosen,
    };
    let Some(pod) = pod_of(ctx.sock_addr) else {
        return ALLOW;
    };
    if let Some((port, source)) = capture(
        &ctx,
        pod,
        sk,
        addr.type_,
        addr.user_ip4,
        addr.user_port,
        src_ip,
    ) {
        if source != 0 {
            addr.msg_src_ip4 = source;
        }
        addr.user_ip4 = LOCALHOST;
        addr.user_port = u32::from(port.to_be());
    }
    ALLOW
}

/// [`redirect_sendmsg4`] for an AF_INET6 socket: to an IPv4-mapped
/// nameserver it goes to `::ffff:127.0.0.1:15053`; to an IPv6 one, which
/// Istio's IPv6 table captures (its `ISTIO_OUTPUT_DNS` rule with `-d
/// NS/128`), to `[::1]:15053`.
#[cgroup_sock_addr(sendmsg6)]
pub fn redirect_sendmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/sendmsg6 program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    if !may_be_dns(addr.user_port) {
        return ALLOW;
    }
    // SAFETY: `sk` is always a valid socket in a sock_addr context.
    let sk = unsafe { &*addr.__bindgen_anon_1.sk };
    let dst6 = read_ip6(&raw const addr.user_ip6);
    let Some(pod) = pod_of(ctx.sock_addr) else {
        return ALLOW;
    };
    let Some(dst) = v4_mapped(&dst6) else {
        let chosen = Ip6(read_ip6(&raw const addr.msg_src_ip6));
        let src = if chosen == Ip6([0; 4]) {
            Ip6(read_ip6(&raw const sk.src_ip6))
        } else {
            chosen
        };
        if let Some((port, source)) =
            capture6(&ctx, pod, sk, addr.type_, Ip6(dst6), addr.user_port, src)
        {
            if source != Ip6([0; 4]) {
                write_ip6((&raw mut addr.msg_src_ip6).cast(), source.0);
            }
            write_ip6((&raw mut addr.user_ip6).cast(), Ip6::LOOPBACK.0);
            addr.user_port = u32::from(port.to_be());
        }
        return ALLOW;
    };
    send_mapped(&ctx, pod, dst);
    ALLOW
}

/// [`redirect_sendmsg6`] for a pod without Istio's IPv6 table (see
/// [`crate::connect::redirect_conn6_v4`], whose terms the loader attaches
/// it on): a datagram to an IPv6 nameserver is only counted.
#[cgroup_sock_addr(sendmsg6)]
pub fn redirect_send6_v4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/sendmsg6 program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    if !may_be_dns(addr.user_port) {
        return ALLOW;
    }
    let dst6 = read_ip6(&raw const addr.user_ip6);
    let Some(pod) = pod_of(ctx.sock_addr) else {
        return ALLOW;
    };
    match v4_mapped(&dst6) {
        Some(dst) => send_mapped(&ctx, pod, dst),
        None => pass_ipv6(pod, dst6, addr.user_port),
    }
    ALLOW
}

/// An AF_INET6 socket's datagram to `::ffff:<dst>`, decided by Istio's
/// IPv4 rules and sent to `::ffff:127.0.0.1:15053` when captured.
#[inline(always)]
fn send_mapped(ctx: &SockAddrContext, pod: u32, dst: u32) {
    // SAFETY: the kernel hands every cgroup/sendmsg6 program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    // SAFETY: `sk` is always a valid socket in a sock_addr context.
    let sk = unsafe { &*addr.__bindgen_anon_1.sk };
    let src_ip = v4_mapped(&read_ip6(&raw const addr.msg_src_ip6))
        .filter(|ip| *ip != 0)
        .or_else(|| v4_mapped(&read_ip6(&raw const sk.src_ip6)))
        .unwrap_or(0);
    if let Some((port, source)) = capture(ctx, pod, sk, addr.type_, dst, addr.user_port, src_ip) {
        if source != 0 {
            write_ip6((&raw mut addr.msg_src_ip6).cast(), to_v4_mapped(source));
        }
        write_ip6((&raw mut addr.user_ip6).cast(), to_v4_mapped(LOCALHOST));
        addr.user_port = u32::from(port.to_be());
    }
}

/// Conntrack's reverse NAT of a captured DNS socket's replies: a datagram
/// from `127.0.0.1:15053` reads as coming from the nameserver the socket
/// last sent to (its `SO_ORIGINAL_DST`-like record), as it does after
/// REDIRECT.
#[cgroup_sock_addr(recvmsg4)]
pub fn redirect_recvmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/recvmsg4 program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    if addr.user_ip4 != LOCALHOST {
        return ALLOW;
    }
    // SAFETY: reading the union member the kernel filled in.
    let sk = unsafe { addr.__bindgen_anon_1.sk };
    let Some(pod) = pod_of(ctx.sock_addr) else {
        return ALLOW;
    };
    if let Some(ns) = nameserver(pod, sk, addr.user_port, false) {
        addr.user_ip4 = ns.ip[3];
        addr.user_port = u32::from(ns.port.to_be());
    }
    ALLOW
}

/// [`redirect_recvmsg4`] for AF_INET6 sockets: `::ffff:127.0.0.1:15053`
/// reads as `::ffff:<nameserver>:53`, `[::1]:15053` as `[<nameserver>]:53`.
#[cgroup_sock_addr(recvmsg6)]
pub fn redirect_recvmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/recvmsg6 program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    let from = read_ip6(&raw const addr.user_ip6);
    let v6 = if v4_mapped(&from) == Some(LOCALHOST) {
        false
    } else if Ip6(from) == Ip6::LOOPBACK {
        true
    } else {
        return ALLOW;
    };
    // SAFETY: reading the union member the kernel filled in.
    let sk = unsafe { addr.__bindgen_anon_1.sk };
    let Some(pod) = pod_of(ctx.sock_addr) else {
        return ALLOW;
    };
    if let Some(ns) = nameserver(pod, sk, addr.user_port, v6) {
        // The record holds an IPv4 nameserver mapped, as the source reads.
        write_ip6((&raw mut addr.user_ip6).cast(), ns.ip);
        addr.user_port = u32::from(ns.port.to_be());
    }
    ALLOW
}

/// Whether a datagram to `user_port` (the context's __be16) can be DNS
/// capture's: only port 53 is ever sent elsewhere.
#[inline(always)]
fn may_be_dns(user_port: u32) -> bool {
    u16::from_be(user_port as u16) == DNS_PORT
}

/// The nameserver a datagram from `127.0.0.1:<user_port>` (`[::1]` for
/// `v6`) to `sk`, a socket of `pod`, stands for: the socket's captured destination, when DNS
/// capture is on, the port is the proxy's DNS port and the nameserver is
/// of the datagram's family.
#[inline(always)]
fn nameserver(pod: u32, sk: *mut bpf_sock, user_port: u32, v6: bool) -> Option<OrigDst> {
    let (cfg, _) = active(pod)?;
    if cfg.flags & CFG_DNS == 0 || u16::from_be(user_port as u16) != cfg.dns_port {
        return None;
    }
    let own = sock_record(sk);
    if own.is_null() {
        return None;
    }
    let record = load(own);
    if record.kind != OrigDst::REDIRECTED || v4_mapped(&record.ip).is_none() != v6 {
        return None;
    }
    count(pod, Counter::DnsReplyRestored);
    Some(record)
}
