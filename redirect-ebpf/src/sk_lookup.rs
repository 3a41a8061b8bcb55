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
use redirect_common::{Counter, InboundInput, InboundVerdict, LISTENER_SLOTS, decide_inbound};

use crate::{
    maps::{RDR_IN_HITS, RDR_LISTENER, active, count},
    net::{AF_INET, IPPROTO_TCP},
};

/// Mirrors Istio's inbound capture, by default (`-b '*'`):
///
/// ```text
/// -A PREROUTING -p tcp -j ISTIO_INBOUND
/// -A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
/// -A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN     (each -d port)
/// -A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
/// -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
/// ```
///
/// (the whole decision, with `-b` lists, is [`decide_inbound`]).
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
    if lookup.family != AF_INET || lookup.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let Some((cfg, maps)) = active() else {
        return SK_PASS;
    };
    let input = InboundInput {
        src_ip: lookup.remote_ip4,
        dst_port: lookup.local_port as u16,
    };
    match decide_inbound(&input, cfg, &maps) {
        InboundVerdict::Bypass(counter) => {
            count(counter);
            SK_PASS
        }
        InboundVerdict::Capture => {
            if !assign_listener(&ctx) {
                count(Counter::InboundRefused);
                return SK_DROP;
            }
            count(Counter::InboundCaptured);
            count_port(input.dst_port);
            SK_PASS
        }
    }
}

/// Hands the connection to the first live registered listener.
#[inline(always)]
fn assign_listener(ctx: &SkLookupContext) -> bool {
    let mut slot = 0;
    while slot < LISTENER_SLOTS {
        if RDR_LISTENER.redirect_sk_lookup(ctx, slot, 0).is_ok() {
            return true;
        }
        slot += 1;
    }
    false
}

/// Adds one to the inbound capture count of `port`.
#[inline(always)]
fn count_port(port: u16) {
    if let Some(slot) = RDR_IN_HITS.get_ptr_mut(port) {
        // SAFETY: a valid, aligned map value (see `count`).
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1) };
    } else if RDR_IN_HITS.insert(port, 1, u64::from(BPF_NOEXIST)).is_err()
        && let Some(slot) = RDR_IN_HITS.get_ptr_mut(port)
    {
        // Another CPU created the entry first.
        // SAFETY: as above.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1) };
    }
}
