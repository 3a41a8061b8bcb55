//! `cgroup/getsockopt` (kernel 5.3; `optlen` 0 as "keep the kernel's
//! answer" 5.8): conntrack's `SO_ORIGINAL_DST` answer for the
//! `-j REDIRECT --to-ports 15001` and `ISTIO_IN_REDIRECT` rules.

use aya_ebpf::{bindings::bpf_sockopt, macros::cgroup_sockopt, programs::SockoptContext};
use redirect_common::{
    Counter, InboundInput, InboundVerdict, OrigDst, SOCKADDR_IN_LEN, SockoptAction, answer_optlen,
    classify_getsockopt, decide_inbound, pass_through_optlen, sockaddr_in, tuple_from_server_side,
};

use crate::{
    maps::{RDR_ORIG_TUPLE, active, count},
    net::sock_ends,
};

/// Answers `getsockopt(SOL_IP, SO_ORIGINAL_DST)` for redirected
/// connections, which with iptables is answered by conntrack for the
/// `-j REDIRECT --to-ports 15001` rule. The asking socket is the proxy's
/// accepted one: its remote end is the app's socket, so its tuple names the
/// record sockops filed. Every other call, and this one without a record,
/// comes back exactly as the kernel produced it (see [`SockoptAction`]).
///
/// No pointer arithmetic beyond a constant bounds check: subtracting the
/// buffer pointers needs CAP_PERFMON, which an init container lacks.
#[cgroup_sockopt(getsockopt)]
pub fn redirect_getsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/getsockopt program a valid context.
    let opt = unsafe { &mut *ctx.sockopt };
    if classify_getsockopt(opt.level, opt.optname) == SockoptAction::AnswerOriginalDst
        && answer_original_dst(opt)
    {
        return 1;
    }
    if let Some(optlen) = pass_through_optlen(opt.retval, opt.optlen) {
        // SAFETY: optlen is a writable field of the context.
        unsafe { core::ptr::write_volatile(&raw mut opt.optlen, optlen) };
    }
    1
}

/// Writes the record's `sockaddr_in` and clears the error; `false` when
/// there is no record (or no room), leaving the call to the kernel.
#[inline(always)]
fn answer_original_dst(opt: &mut bpf_sockopt) -> bool {
    // SAFETY: reading the union members the kernel filled in.
    let (optval, optval_end, sk) = unsafe {
        (
            opt.__bindgen_anon_2.optval as *mut u8,
            opt.__bindgen_anon_3.optval_end as *mut u8,
            opt.__bindgen_anon_1.sk,
        )
    };
    if optval.wrapping_add(SOCKADDR_IN_LEN as usize) > optval_end {
        return false;
    }
    let Some((local_ip, local_port, remote_ip, remote_port)) = sock_ends(sk) else {
        return false;
    };
    let tuple = tuple_from_server_side(local_ip, local_port, remote_ip, remote_port);
    // SAFETY: copied out before use.
    let orig = match (unsafe { RDR_ORIG_TUPLE.get(tuple) }).copied() {
        Some(orig) => {
            count(Counter::OrigDstAnswered);
            orig
        }
        None if inbound_captured(remote_ip, local_port) => {
            count(Counter::OrigDstInbound);
            OrigDst::new(local_ip, local_port)
        }
        None => {
            count(Counter::OrigDstMissed);
            return false;
        }
    };
    let bytes = sockaddr_in(&orig);
    // SAFETY: 16 bytes fit between optval and optval_end (checked above).
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), optval, bytes.len()) };
    let optlen = answer_optlen(opt.optlen);
    // Separate volatile stores: merged into one 8-byte store, these two
    // adjacent fields are rejected by the verifier.
    // SAFETY: optlen and retval are writable fields of the context.
    unsafe {
        core::ptr::write_volatile(&raw mut opt.optlen, optlen);
        core::ptr::write_volatile(&raw mut opt.retval, 0);
    }
    true
}

/// Whether a connection from `remote_ip` to local port `port` is one the
/// inbound rules capture: an accepted socket of this cgroup with such ends
/// came through [`redirect_sk_lookup`] (which refuses what it cannot hand
/// to the listener), so its local address is the original destination.
#[inline(always)]
fn inbound_captured(remote_ip: u32, port: u16) -> bool {
    let Some((cfg, maps)) = active() else {
        return false;
    };
    let input = InboundInput {
        src_ip: remote_ip,
        dst_port: port,
    };
    decide_inbound(&input, cfg, &maps) == InboundVerdict::Capture
}
