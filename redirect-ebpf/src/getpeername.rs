//! `cgroup/getpeername4`/`6` and `cgroup/getsockname4`/`6` (kernel 5.8,
//! optional): REDIRECT leaves the app's peer address unchanged, so the
//! app's redirected socket reports its original destination; and it moves
//! an inbound connection to the inbound port, which the proxy's end
//! reports as its local port.

use aya_ebpf::{bindings::bpf_sock, macros::cgroup_sock_addr, programs::SockAddrContext};
use redirect_common::{Counter, Ip6, LOCALHOST, OrigDst, v4_mapped};

use crate::{
    maps::{active, count, load, pod_of, sock_record},
    net::{ALLOW, read_ip6, write_ip6},
};

/// The record of the app's redirected socket `sk` whose peer is the
/// loopback address a redirect sends to (`at_loopback`) and the port
/// `user_port` (the context's): the one in its storage, if the socket is
/// connected where that record sent it.
#[inline(always)]
pub(crate) fn peer_record(sk: *mut bpf_sock, at_loopback: bool, user_port: u32) -> Option<OrigDst> {
    if !at_loopback {
        return None;
    }
    let own = sock_record(sk);
    if own.is_null() {
        return None;
    }
    let record = load(own);
    (record.kind == OrigDst::REDIRECTED && record.via == u16::from_be(user_port as u16))
        .then_some(record)
}

/// `getpeername()` on the app's redirected socket returns the original
/// destination instead of 127.0.0.1:<proxy port>, as it does with iptables
/// REDIRECT (there the kernel never sees the rewrite). Other sockets,
/// including the proxy's own, have no record and are unaffected.
#[cgroup_sock_addr(getpeername4)]
pub fn redirect_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/getpeername4 program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    // SAFETY: reading the union member the kernel filled in.
    let sk = unsafe { addr.__bindgen_anon_1.sk };
    if let Some(orig) = peer_record(sk, addr.user_ip4 == LOCALHOST, addr.user_port) {
        addr.user_ip4 = orig.ip[3];
        addr.user_port = u32::from(orig.port.to_be());
        count_for(&ctx, Counter::PeernameRestored);
    }
    ALLOW
}

/// [`redirect_getpeername4`] for AF_INET6 sockets redirected by
/// [`redirect_connect6`]: the peer reads `::ffff:<original address>` for
/// an IPv4 connection sent to `::ffff:127.0.0.1`, the original IPv6
/// address for one sent to `::1`.
#[cgroup_sock_addr(getpeername6)]
pub fn redirect_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/getpeername6 program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    let peer = read_ip6(&raw const addr.user_ip6);
    let at_loopback = v4_mapped(&peer) == Some(LOCALHOST) || Ip6(peer) == Ip6::LOOPBACK;
    // SAFETY: reading the union member the kernel filled in.
    let sk = unsafe { addr.__bindgen_anon_1.sk };
    if let Some(orig) = peer_record(sk, at_loopback, addr.user_port) {
        // The record holds an IPv4 destination mapped, as the peer reads.
        write_ip6((&raw mut addr.user_ip6).cast(), orig.ip);
        addr.user_port = u32::from(orig.port.to_be());
        count_for(&ctx, Counter::PeernameRestored);
    }
    ALLOW
}

/// Counts a decision for the pod of `ctx`'s socket.
#[inline(always)]
fn count_for(ctx: &SockAddrContext, counter: Counter) {
    if let Some(pod) = pod_of(ctx.sock_addr) {
        count(pod, counter);
    }
}

/// The inbound port, when `sk` is the proxy's end of an inbound capture
/// in `pod`.
#[inline(always)]
fn redirected_port(pod: u32, sk: *mut bpf_sock) -> Option<u16> {
    let own = sock_record(sk);
    if own.is_null() || load(own).kind != OrigDst::INBOUND {
        return None;
    }
    let (cfg, _) = active(pod)?;
    Some(cfg.inbound_port)
}

/// `getsockname()` on the proxy's end of an inbound capture reports the
/// inbound port, as after `-j REDIRECT --to-ports 15006` (sk_lookup kept
/// the original port, which SO_ORIGINAL_DST reports, as conntrack does).
#[cgroup_sock_addr(getsockname4)]
pub fn redirect_getsockname4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/getsockname4 program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    // SAFETY: reading the union member the kernel filled in.
    let sk = unsafe { addr.__bindgen_anon_1.sk };
    let Some(pod) = pod_of(ctx.sock_addr) else {
        return ALLOW;
    };
    if let Some(port) = redirected_port(pod, sk) {
        addr.user_port = u32::from(port.to_be());
        count(pod, Counter::SocknameRedirected);
    }
    ALLOW
}

/// [`redirect_getsockname4`] for dual-stack sockets.
#[cgroup_sock_addr(getsockname6)]
pub fn redirect_getsockname6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/getsockname6 program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    // SAFETY: reading the union member the kernel filled in.
    let sk = unsafe { addr.__bindgen_anon_1.sk };
    let Some(pod) = pod_of(ctx.sock_addr) else {
        return ALLOW;
    };
    if let Some(port) = redirected_port(pod, sk) {
        addr.user_port = u32::from(port.to_be());
        count(pod, Counter::SocknameRedirected);
    }
    ALLOW
}
