//! The kernel side of `redirect`: the eBPF programs that replace Istio's
//! nat capture, one module per program, each headed by its hook, its first
//! kernel and the iptables rule it mirrors:
//!
//! - [`connect`] (`cgroup/connect4`, `cgroup/connect6`): Istio's
//!   `ISTIO_OUTPUT` chain; captured connects are rewritten to
//!   `127.0.0.1:<proxy port>`, the original destination kept in the
//!   socket's own storage.
//! - [`dns`] (`cgroup/sendmsg4/6`, `cgroup/recvmsg4/6`): Istio's
//!   `ISTIO_OUTPUT_DNS` for UDP sockets that send without connecting, and
//!   the reverse NAT of captured DNS replies.
//! - [`sockops`] (`sockops`): conntrack's bookkeeping for redirected
//!   connections (the record under the connection's 4-tuple once
//!   established, released at close), and the proxy's inbound listener
//!   registered when it listens.
//! - [`getsockopt`] (`cgroup/getsockopt`): conntrack's `SO_ORIGINAL_DST`
//!   answer; every other call is left as found.
//! - [`getpeername`] (`cgroup/getpeername4/6`): REDIRECT leaves the app's
//!   peer address unchanged.
//! - [`sk_lookup`] (`sk_lookup`, on the pod's network namespace): Istio's
//!   `ISTIO_INBOUND` chain, connections handed to the proxy's listener.
//! - [`virt`] (`tc` ingress and egress of each `-k` interface): Istio's
//!   `PREROUTING -i X -j ISTIO_REDIRECT`, REDIRECT's rewrite and
//!   conntrack's reverse one.
//!
//! The maps ([`maps`]) are pinned by user space; the configuration in force
//! is read through [`maps::active`]; every decision is counted in
//! `RDR_STATS`. The decisions themselves are `redirect_common`'s pure
//! functions.

#![no_std]
#![no_main]
// The BPF target's `core` has no atomic read-modify-write methods; the
// intrinsic compiles to the BPF atomic add the counters need.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod connect;
mod dns;
mod getpeername;
mod getsockopt;
mod maps;
mod net;
mod sk_lookup;
mod sockops;
mod virt;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}
