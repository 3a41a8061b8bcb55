//! `sockops` (kernel 4.13; listen callbacks 4.19 era, verified from 5.10):
//! what conntrack does for redirected connections (a record per
//! established connection, under its 4-tuple, released when both ends
//! closed), and the proxy's inbound listener registered for [`crate::sk_lookup`].

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE, bpf_sock,
    },
    macros::sock_ops,
    programs::SockOpsContext,
};
use redirect_common::{
    CFG_EXCLUDE_IFACES, CFG_INBOUND, ConnTuple, Counter, InboundInput, InboundVerdict,
    LISTENER_SLOTS, OrigDst, decide_inbound, in_bypass_key, tuple_from_client_side,
    tuple_from_server_side, v4_mapped,
};

use crate::{
    maps::{
        RDR_IN_BYPASS, RDR_LISTENER, RDR_ORIG_TUPLE, active, count, flag, load, mark_accepted,
        set_flag, sock_record,
    },
    net::{AF_INET, AF_INET6, read_ip6},
};

/// Keeps the original-destination records of redirected connections (Istio
/// relies on conntrack for this; there is no iptables rule to mirror):
/// copies a socket's record from its storage to the 4-tuple map when its
/// handshake completes, and removes records when connections close.
#[sock_ops]
pub fn redirect_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_LISTEN_CB {
        on_listen(&ctx);
        return 1;
    }
    let Some(ends) = Ends::of(&ctx) else {
        return 1;
    };
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_active_established(&ctx, &ends),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(&ctx, &ends),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx, &ends),
        _ => {}
    }
    1
}

/// A socket's two ends as IPv4 (network-order addresses, host-order ports),
/// for AF_INET sockets and for AF_INET6 sockets with IPv4-mapped ends.
struct Ends {
    local_ip: u32,
    local_port: u16,
    remote_ip: u32,
    remote_port: u16,
}

impl Ends {
    #[inline(always)]
    fn of(ctx: &SockOpsContext) -> Option<Self> {
        let (local_ip, remote_ip) = match ctx.family() {
            AF_INET => (ctx.local_ip4(), ctx.remote_ip4()),
            AF_INET6 => {
                // SAFETY: the kernel hands every sockops program a valid context.
                let ops = unsafe { &*ctx.ops };
                (
                    v4_mapped(&read_ip6(&raw const ops.local_ip6))?,
                    v4_mapped(&read_ip6(&raw const ops.remote_ip6))?,
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
    fn as_app(&self) -> ConnTuple {
        tuple_from_client_side(
            self.local_ip,
            self.local_port,
            self.remote_ip,
            self.remote_port,
        )
    }

    /// The connection's tuple when this socket is the proxy's (server) end.
    #[inline(always)]
    fn as_proxy(&self) -> ConnTuple {
        tuple_from_server_side(
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

/// Asks for a callback on every state change of this socket, so its close is seen.
#[inline(always)]
fn watch_close(ctx: &SockOpsContext) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
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
fn on_listen(ctx: &SockOpsContext) {
    let Some((cfg, _)) = active() else {
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
        if unsafe { RDR_LISTENER.update(slot, ctx.ops, u64::from(flags)) }.is_ok() {
            count(Counter::ListenerRegistered);
            return;
        }
        slot += 1;
    }
}

/// A redirected socket is about to send its SYN: watch it, so that a connect
/// that never completes is counted when it closes.
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    if !sock_record(sock(ctx)).is_null() {
        watch_close(ctx);
    }
}

/// The app's redirected connection is established: its local port is now
/// known, so file the record under the connection's tuple.
#[inline(always)]
fn on_active_established(ctx: &SockOpsContext, ends: &Ends) {
    let sk = sock(ctx);
    let record = sock_record(sk);
    if record.is_null() {
        return;
    }
    let orig = load(record);
    if RDR_ORIG_TUPLE.insert(ends.as_app(), orig, 0).is_ok() {
        count(Counter::TupleRecorded);
    }
    // The socket's own copy stays, marked: at close it tells an
    // established connection (whose tuple record may have been evicted)
    // from a connect that never completed. It goes with the socket.
    set_flag(record, OrigDst::ESTABLISHED);
    watch_close(ctx);
}

/// The proxy's side of a redirected connection is established (it runs in
/// this cgroup): from now on the record waits for both sides to close.
/// Any other accepted socket is marked as accepted, for the
/// `SO_ORIGINAL_DST` answer conntrack gives it, and as the proxy's end of
/// an inbound capture when the inbound rules capture its ends (such a
/// connection reached no other socket: [`crate::sk_lookup`] handed it to
/// the proxy), for the local port REDIRECT would show.
#[inline(always)]
fn on_passive_established(ctx: &SockOpsContext, ends: &Ends) {
    if let Some(orig) = RDR_ORIG_TUPLE.get_ptr_mut(ends.as_proxy()) {
        set_flag(orig, OrigDst::PROXY_SEEN);
        watch_close(ctx);
        return;
    }
    let Some((cfg, maps)) = active() else {
        return;
    };
    let input = InboundInput {
        src_ip: ends.remote_ip,
        dst_port: ends.local_port,
        ifindex: 0,
    };
    let captured = decide_inbound(&input, cfg, &maps) == InboundVerdict::Capture
        && !(cfg.flags & CFG_EXCLUDE_IFACES != 0 && arrived_on_excluded(ends));
    let kind = if captured {
        OrigDst::INBOUND
    } else {
        OrigDst::ACCEPTED
    };
    mark_accepted(sock(ctx), kind);
}

/// Whether [`crate::sk_lookup`] left this connection alone for the
/// interface it arrived on (which only its SYN tells); the entry goes.
#[inline(always)]
fn arrived_on_excluded(ends: &Ends) -> bool {
    let key = in_bypass_key(ends.remote_ip, ends.remote_port, ends.local_port);
    RDR_IN_BYPASS.remove(key).is_ok()
}

/// A watched socket closed. A record goes when both ends of its connection
/// have closed (the app may still call getpeername() after the proxy closed,
/// the proxy may still ask SO_ORIGINAL_DST after the app closed), or with
/// the app's end alone when the proxy's end is never seen (a proxy outside
/// this cgroup). The app's socket is the one with a record in its storage:
/// not yet established, its connect never completed; established but its
/// tuple record gone, the LRU map evicted it.
///
/// Each end sets its own byte, then reads the other's; if both close at once
/// on two CPUs and miss each other's store, the record is left to the LRU.
#[inline(always)]
fn on_close(ctx: &SockOpsContext, ends: &Ends) {
    let own = sock_record(sock(ctx));
    if !own.is_null() {
        if flag(own, OrigDst::ESTABLISHED) == 0 {
            count(Counter::ConnectAborted);
            return;
        }
        let as_app = ends.as_app();
        let Some(orig) = RDR_ORIG_TUPLE.get_ptr_mut(as_app) else {
            count(Counter::RecordEvicted);
            return;
        };
        set_flag(orig, OrigDst::APP_CLOSED);
        if flag(orig, OrigDst::PROXY_SEEN) == 0 || flag(orig, OrigDst::PROXY_CLOSED) == 1 {
            release(&as_app);
        }
        return;
    }
    let as_proxy = ends.as_proxy();
    if let Some(orig) = RDR_ORIG_TUPLE.get_ptr_mut(as_proxy) {
        set_flag(orig, OrigDst::PROXY_CLOSED);
        if flag(orig, OrigDst::APP_CLOSED) == 1 {
            release(&as_proxy);
        }
    }
}

#[inline(always)]
fn release(tuple: &ConnTuple) {
    if RDR_ORIG_TUPLE.remove(tuple).is_ok() {
        count(Counter::TupleReleased);
    }
}
