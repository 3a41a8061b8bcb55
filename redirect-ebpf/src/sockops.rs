//! `sockops` (kernel 4.13; listen callbacks 4.19 era, verified from 5.10):
//! what conntrack does for redirected connections (the original
//! destination carried from the app's socket to the proxy's accepted
//! one, through the handshake's 4-tuple), and the proxy's inbound listener
//! registered for [`crate::sk_lookup`].

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB, bpf_sock,
    },
    macros::sock_ops,
    programs::SockOpsContext,
};
use redirect_common::{
    CFG_EXCLUDE_IFACES, CFG_INBOUND, ConnTuple, Counter, InboundInput, InboundVerdict, Ip6,
    LISTENER_SLOTS, OrigDst, decide_inbound, in_bypass_key, listener_index, to_v4_mapped,
    tuple_from_client_side, tuple_from_server_side, v4_mapped,
};

use crate::{
    maps::{
        RDR_IN_BYPASS, RDR_LISTENER, RDR_ORIG_TUPLE, active, count, keep_in_socket, load, pod_of,
        sock_record,
    },
    net::{AF_INET, AF_INET6, read_ip6},
};

/// Carries each redirected connection's original destination from the
/// app's socket to the proxy's (Istio relies on conntrack for this; there
/// is no iptables rule to mirror): the app's socket files it under the
/// 4-tuple just before its SYN leaves, the proxy's end takes it into its
/// own storage when it is established. Only these two callbacks and
/// `listen` do anything: no socket is asked for further callbacks, so a
/// connection costs sockops nothing after its handshake.
#[sock_ops]
pub fn redirect_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_LISTEN_CB
        && op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
    {
        return 1;
    }
    let Some(pod) = pod_of(ctx.ops) else {
        return 1;
    };
    match op {
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(&ctx, pod),
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx, pod),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(&ctx, pod),
        _ => {}
    }
    1
}

/// A socket's two ends (host-order ports; addresses as IPv6, an AF_INET
/// socket's mapped, as a dual-stack socket's IPv4 ends are).
struct Ends {
    local_ip: [u32; 4],
    local_port: u16,
    remote_ip: [u32; 4],
    remote_port: u16,
}

impl Ends {
    #[inline(always)]
    fn of(ctx: &SockOpsContext) -> Option<Self> {
        let (local_ip, remote_ip) = match ctx.family() {
            AF_INET => (
                to_v4_mapped(ctx.local_ip4()),
                to_v4_mapped(ctx.remote_ip4()),
            ),
            AF_INET6 => {
                // SAFETY: the kernel hands every sockops program a valid context.
                let ops = unsafe { &*ctx.ops };
                (
                    read_ip6(&raw const ops.local_ip6),
                    read_ip6(&raw const ops.remote_ip6),
                )
            }
            _ => return None,
        };
        Some(Self {
            local_ip,
            // local_port is host order; remote_port holds the __be16 port
            // in its upper 16 bits.
            local_port: ctx.local_port() as u16,
            remote_ip,
            remote_port: u16::from_be((ctx.remote_port() >> 16) as u16),
        })
    }

    /// The connection's tuple when this socket is the app's (client) end.
    #[inline(always)]
    fn as_app(&self, pod: u32) -> ConnTuple {
        tuple_from_client_side(
            pod,
            self.local_ip,
            self.local_port,
            self.remote_ip,
            self.remote_port,
        )
    }

    /// The connection's tuple when this socket is the proxy's (server) end.
    #[inline(always)]
    fn as_proxy(&self, pod: u32) -> ConnTuple {
        tuple_from_server_side(
            pod,
            self.local_ip,
            self.local_port,
            self.remote_ip,
            self.remote_port,
        )
    }
}

/// The socket a sockops callback is about (a full socket in the callbacks
/// this program handles; null otherwise).
#[inline(always)]
fn sock(ctx: &SockOpsContext) -> *mut bpf_sock {
    // SAFETY: the kernel hands every sockops program a valid context.
    unsafe { (*ctx.ops).__bindgen_anon_2.sk }
}

/// A socket of the cgroup started listening: when it is on the inbound
/// capture port (and inbound capture is on), it becomes one of the
/// listeners that [`redirect_sk_lookup`] hands inbound connections to. This
/// is how the proxy's listeners, which appear after the init step has
/// exited, are found without a daemon. Each takes the first free slot (the
/// last one when all are taken); the kernel empties a slot when its socket
/// closes, so the others keep receiving, as iptables' REDIRECT reaches
/// whichever listeners remain.
#[inline(always)]
fn on_listen(ctx: &SockOpsContext, pod: u32) {
    let Some((cfg, _)) = active(pod) else {
        return;
    };
    if cfg.flags & CFG_INBOUND == 0 || ctx.local_port() != u32::from(cfg.inbound_port) {
        return;
    }
    let mut slot = 0;
    while slot < LISTENER_SLOTS {
        let flags = if slot + 1 == LISTENER_SLOTS {
            BPF_ANY
        } else {
            BPF_NOEXIST
        };
        // SAFETY: the context is the listening socket's, valid for this call.
        if unsafe { RDR_LISTENER.update(listener_index(pod, slot), ctx.ops, u64::from(flags)) }
            .is_ok()
        {
            count(pod, Counter::ListenerRegistered);
            return;
        }
        slot += 1;
    }
}

/// The app's redirected socket is about to send its SYN: its local port
/// is chosen, so file the record under the connection's tuple for the
/// proxy's end to take, as conntrack makes its entry from the first
/// packet. Filed before the SYN leaves, it is there even when the proxy's
/// end is established by the SYN itself (TCP Fast Open). The socket keeps
/// its own copy (getpeername(), and SO_ORIGINAL_DST asked on the app's
/// side). A connect that then fails leaves its tuple record to the LRU
/// map, as conntrack keeps an unanswered SYN's entry until it times out.
#[inline(always)]
fn on_connect(ctx: &SockOpsContext, pod: u32) {
    let record = sock_record(sock(ctx));
    if record.is_null() {
        return;
    }
    let Some(ends) = Ends::of(ctx) else {
        return;
    };
    if RDR_ORIG_TUPLE
        .insert(ends.as_app(pod), load(record), 0)
        .is_ok()
    {
        count(pod, Counter::TupleRecorded);
    }
}

/// An accepted socket of the cgroup is established. The proxy's end of a
/// redirected connection takes the connection's record from the tuple map
/// into its own storage (it lives as long as the socket, as conntrack's
/// entry lives as long as the connection). Any other accepted socket is
/// marked as accepted, for the `SO_ORIGINAL_DST` answer conntrack gives
/// it, and as the proxy's end of an inbound capture when the inbound rules
/// capture its ends (such a connection reached no other socket:
/// [`crate::sk_lookup`] handed it to the proxy), for the local port
/// REDIRECT would show.
#[inline(always)]
fn on_passive_established(ctx: &SockOpsContext, pod: u32) {
    let Some(ends) = Ends::of(ctx) else {
        return;
    };
    let tuple = ends.as_proxy(pod);
    // SAFETY: copied out before use.
    if let Some(orig) = unsafe { RDR_ORIG_TUPLE.get(tuple) }.copied() {
        take(pod, sock(ctx), &tuple, &orig);
        return;
    }
    let Some((cfg, maps)) = active(pod) else {
        return;
    };
    let verdict = match v4_mapped(&ends.remote_ip) {
        Some(src_ip) => decide_inbound(
            &InboundInput {
                src_ip,
                dst_port: ends.local_port,
                ifindex: 0,
            },
            cfg,
            &maps,
        ),
        None => decide_inbound(
            &InboundInput {
                src_ip: Ip6(ends.remote_ip),
                dst_port: ends.local_port,
                ifindex: 0,
            },
            cfg,
            &maps,
        ),
    };
    let captured = verdict == InboundVerdict::Capture
        && !(cfg.flags & CFG_EXCLUDE_IFACES != 0 && arrived_on_excluded(pod, &ends));
    let kind = if captured {
        OrigDst::INBOUND
    } else {
        OrigDst::ACCEPTED
    };
    let _ = keep_in_socket(sock(ctx), &OrigDst::accepted(kind));
}

/// Moves a redirected connection's record into the storage of its proxy's
/// end. Should the kernel fail to create the storage, the record stays in
/// the tuple map, where SO_ORIGINAL_DST still finds it.
#[inline(always)]
fn take(pod: u32, sk: *mut bpf_sock, tuple: &ConnTuple, orig: &OrigDst) {
    if keep_in_socket(sk, &orig.for_proxy()) && RDR_ORIG_TUPLE.remove(tuple).is_ok() {
        count(pod, Counter::TupleReleased);
    }
}

/// Whether [`crate::sk_lookup`] left this connection alone for the
/// interface it arrived on (which only its SYN tells); the entry goes.
#[inline(always)]
fn arrived_on_excluded(pod: u32, ends: &Ends) -> bool {
    let key = in_bypass_key(pod, ends.remote_ip, ends.remote_port, ends.local_port);
    RDR_IN_BYPASS.remove(key).is_ok()
}
