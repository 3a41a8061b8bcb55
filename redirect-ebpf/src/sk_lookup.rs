//! `sk_lookup` (kernel 5.9), on the pod's network namespace: Istio's nat
//! `PREROUTING -> ISTIO_INBOUND -> ISTIO_IN_REDIRECT`.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST,
        sk_action::{SK_DROP, SK_PASS},
    },
    macros::sk_lookup,
    programs::SkLookupContext,
};
use redirect_common::{
    CFG_VIRT_IFACES, Counter, InboundInput, InboundVerdict, Ip6, LISTENER_SLOTS, decide_inbound,
    in_bypass_key, in_hits_key, listener_index, to_v4_mapped, virt_nat_key,
};

use crate::{
    maps::{RDR_IN_BYPASS, RDR_IN_HITS, RDR_LISTENER, RDR_ORIG_TUPLE, active, count, pod_at},
    net::{AF_INET, AF_INET6, IPPROTO_TCP, read_ip6},
};

/// Set to 1 by the loader where the kernel gives sk_lookup programs the
/// interface a packet arrived on (`ingress_ifindex`, 5.17). The value is a
/// frozen read-only global, so the verifier of an older kernel knows the
/// branch that reads the field is never taken and does not reject it.
#[unsafe(no_mangle)]
static INGRESS_IFINDEX: u32 = 0;

/// Mirrors Istio's inbound capture, by default (`-b '*'`):
///
/// ```text
/// -A PREROUTING -i X -j RETURN                       (each -c interface)
/// -A PREROUTING -p tcp -j ISTIO_INBOUND
/// -A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
/// -A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN     (each -d port)
/// -A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
/// -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
/// ```
///
/// (the whole decision, with `-b` lists, is [`decide_inbound`]; IPv6
/// connections are decided by the same rules of Istio's IPv6 table, with
/// IPv6 rules only, and go to a listener that takes IPv6).
/// Runs when a TCP SYN finds no established socket in the pod's network
/// namespace: a captured connection is assigned to the proxy's inbound
/// listener and keeps its destination address and port, which is what the
/// proxy reads back (getsockname, or SO_ORIGINAL_DST). It goes to the
/// first live listener registered; the kernel then picks among that
/// listener's `SO_REUSEPORT` group, as for any connection. With no listener
/// the connection is refused (a reset), as REDIRECT to a port nobody
/// listens on refuses it: captured traffic never reaches the app behind
/// the proxy's back.
#[sk_lookup]
pub fn redirect_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands every sk_lookup program a valid context.
    let lookup = unsafe { &*ctx.lookup };
    if (lookup.family != AF_INET && lookup.family != AF_INET6) || lookup.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let local_ip = if lookup.family == AF_INET {
        to_v4_mapped(lookup.local_ip4)
    } else {
        read_ip6(&raw const lookup.local_ip6)
    };
    // In a node set, a connection to no pod's address (one to 127.0.0.1,
    // which only the pod itself makes) is none of its business.
    let Some(pod) = pod_at(local_ip) else {
        return SK_PASS;
    };
    let Some((cfg, maps)) = active(pod) else {
        return SK_PASS;
    };
    // SAFETY: a global of this program, read as the kernel froze it.
    let ifindex = if unsafe { core::ptr::read_volatile(&raw const INGRESS_IFINDEX) } != 0 {
        // SAFETY: the context's field, which this kernel has (see above);
        // a volatile read, so it stays behind the test.
        unsafe { core::ptr::read_volatile(&raw const lookup.ingress_ifindex) }
    } else {
        0
    };
    let dst_port = lookup.local_port as u16;
    if cfg.flags & CFG_VIRT_IFACES != 0 && redirected_from_virt_iface(pod, lookup, dst_port) {
        // `PREROUTING -i X -j ISTIO_REDIRECT` came first: its REDIRECT
        // is terminal, so the inbound rules never see the connection.
        return SK_PASS;
    }
    let verdict = if lookup.family == AF_INET {
        let input = InboundInput {
            src_ip: lookup.remote_ip4,
            dst_port,
            ifindex,
        };
        decide_inbound(&input, cfg, &maps)
    } else {
        let input = InboundInput {
            src_ip: Ip6(read_ip6(&raw const lookup.remote_ip6)),
            dst_port,
            ifindex,
        };
        decide_inbound(&input, cfg, &maps)
    };
    match verdict {
        InboundVerdict::Bypass(Counter::InboundBypassInterface) => {
            count(pod, Counter::InboundBypassInterface);
            remember_bypass(pod, lookup, dst_port);
            SK_PASS
        }
        InboundVerdict::Bypass(counter) => {
            count(pod, counter);
            SK_PASS
        }
        InboundVerdict::Capture => {
            if !assign_listener(&ctx, pod) {
                count(pod, Counter::InboundRefused);
                return SK_DROP;
            }
            count(pod, Counter::InboundCaptured);
            count_port(pod, dst_port);
            SK_PASS
        }
    }
}

/// Whether the tc program of a `-k` interface sent this connection here
/// (see [`crate::virt`]).
#[inline(always)]
fn redirected_from_virt_iface(
    pod: u32,
    lookup: &aya_ebpf::bindings::bpf_sk_lookup,
    local_port: u16,
) -> bool {
    let (vm_ip, to_ip) = if lookup.family == AF_INET {
        (
            to_v4_mapped(lookup.remote_ip4),
            to_v4_mapped(lookup.local_ip4),
        )
    } else {
        (
            read_ip6(&raw const lookup.remote_ip6),
            read_ip6(&raw const lookup.local_ip6),
        )
    };
    let key = virt_nat_key(pod, vm_ip, remote_port(lookup), to_ip, local_port);
    // SAFETY: only tested for presence.
    unsafe { RDR_ORIG_TUPLE.get(key) }.is_some()
}

/// The connection's remote port, host order. It is a __be16 in the low
/// half of a 32-bit word (a 4-byte load, which every kernel allows;
/// narrower ones came in 5.18).
#[inline(always)]
fn remote_port(lookup: &aya_ebpf::bindings::bpf_sk_lookup) -> u16 {
    // SAFETY: the context's field, read as a whole word.
    let word = unsafe { core::ptr::read_volatile((&raw const lookup.remote_port).cast::<u32>()) };
    u16::from_be(word as u16)
}

/// Remembers a connection left alone for its interface until it is
/// accepted (see `RDR_IN_BYPASS`).
#[inline(always)]
fn remember_bypass(pod: u32, lookup: &aya_ebpf::bindings::bpf_sk_lookup, local_port: u16) {
    let remote_ip = if lookup.family == AF_INET {
        to_v4_mapped(lookup.remote_ip4)
    } else {
        read_ip6(&raw const lookup.remote_ip6)
    };
    let key = in_bypass_key(pod, remote_ip, remote_port(lookup), local_port);
    let _ = RDR_IN_BYPASS.insert(key, 1, 0);
}

/// Hands the connection to the first live registered listener that takes
/// its family (an IPv4 one takes no IPv6 connection; a dual-stack IPv6
/// one takes both).
#[inline(always)]
fn assign_listener(ctx: &SkLookupContext, pod: u32) -> bool {
    let mut slot = 0;
    while slot < LISTENER_SLOTS {
        if RDR_LISTENER
            .redirect_sk_lookup(ctx, listener_index(pod, slot), 0)
            .is_ok()
        {
            return true;
        }
        slot += 1;
    }
    false
}

/// Adds one to the inbound capture count of `pod`'s `port`.
#[inline(always)]
fn count_port(pod: u32, port: u16) {
    let key = in_hits_key(pod, port);
    if let Some(slot) = RDR_IN_HITS.get_ptr_mut(key) {
        // SAFETY: a valid, aligned map value (see `count`).
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1) };
    } else if RDR_IN_HITS.insert(key, 1, u64::from(BPF_NOEXIST)).is_err()
        && let Some(slot) = RDR_IN_HITS.get_ptr_mut(key)
    {
        // Another CPU created the entry first.
        // SAFETY: as above.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1) };
    }
}
