//! `cgroup/getsockopt` (kernel 5.3; `optlen` 0 as "keep the kernel's
//! answer" 5.8): conntrack's `SO_ORIGINAL_DST` (and, for IPv6,
//! `IP6T_SO_ORIGINAL_DST`) answer for the `-j REDIRECT --to-ports 15001`
//! and `ISTIO_IN_REDIRECT` rules.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sockopt},
    macros::cgroup_sockopt,
    programs::SockoptContext,
};
use redirect_common::{
    CFG_IPV6, Counter, OrigDst, SOCKADDR_IN_LEN, SOCKADDR_IN6_LEN, SockoptAction, answer_optlen,
    classify_getsockopt, pass_through_optlen, sockaddr_in, sockaddr_in6, tuple_from_server_side,
    v4_mapped,
};

use crate::{
    maps::{RDR_ORIG_TUPLE, active, count, load, pod_of, sock_record},
    net::{IPPROTO_TCP, sock_ends},
};

/// Answers `getsockopt(SOL_IP, SO_ORIGINAL_DST)` as conntrack does once
/// Istio's nat rules are loaded: the original destination of the asking
/// socket's connection (see [`original`]). Every other call, and one
/// without an answer, comes back exactly as the kernel (or a program that
/// ran before this one) produced it (see [`SockoptAction`]).
///
/// No pointer arithmetic beyond a constant bounds check: subtracting the
/// buffer pointers needs CAP_PERFMON, which an init container lacks.
#[cgroup_sockopt(getsockopt)]
pub fn redirect_getsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/getsockopt program a valid context.
    let opt = unsafe { &mut *ctx.sockopt };
    let answered = match classify_getsockopt(opt.level, opt.optname) {
        SockoptAction::AnswerOriginalDst => {
            pod_of(ctx.sockopt).is_some_and(|pod| answer_original_dst::<false>(pod, opt))
        }
        SockoptAction::AnswerOriginalDst6 => {
            pod_of(ctx.sockopt).is_some_and(|pod| answer_original_dst::<true>(pod, opt))
        }
        SockoptAction::PassThrough => false,
    };
    if answered {
        return 1;
    }
    if let Some(optlen) = pass_through_optlen(opt.retval, opt.optlen) {
        // SAFETY: optlen is a writable field of the context.
        unsafe { core::ptr::write_volatile(&raw mut opt.optlen, optlen) };
    }
    1
}

/// Writes the answer's `sockaddr_in` (`sockaddr_in6` for `V6`) for a
/// socket of `pod` and clears the error; `false` when there is none (or no room), leaving the call to
/// the kernel. Each family's option answers for connections of its family
/// only: conntrack finds no IPv4 entry for an IPv6 socket's connection, and
/// no IPv6 one for an IPv4 connection of a dual-stack socket, nor any IPv6
/// one without Istio's IPv6 rules.
#[inline(always)]
fn answer_original_dst<const V6: bool>(pod: u32, opt: &mut bpf_sockopt) -> bool {
    let len = if V6 {
        SOCKADDR_IN6_LEN
    } else {
        SOCKADDR_IN_LEN
    };
    // SAFETY: reading the union members the kernel filled in.
    let (optval, optval_end, sk) = unsafe {
        (
            opt.__bindgen_anon_2.optval as *mut u8,
            opt.__bindgen_anon_3.optval_end as *mut u8,
            opt.__bindgen_anon_1.sk,
        )
    };
    if optval.wrapping_add(len as usize) > optval_end {
        return false;
    }
    let Some((local_ip, local_port, remote_ip, remote_port)) = sock_ends(sk) else {
        return false;
    };
    if v4_mapped(&local_ip).is_none() != V6
        || (V6 && !active(pod).is_some_and(|(cfg, _)| cfg.flags & CFG_IPV6 != 0))
    {
        return false;
    }
    // SAFETY: copied out before use.
    let kernel_answered = opt.retval == 0;
    let orig = match original(
        pod,
        sk,
        kernel_answered,
        local_ip,
        local_port,
        remote_ip,
        remote_port,
    ) {
        Some(orig) => orig,
        // An answer is already there (conntrack's, or a program's that
        // ran before this one) and this capture knows no better: keep it.
        None if kernel_answered => return false,
        None => {
            count(pod, Counter::OrigDstMissed);
            return false;
        }
    };
    if V6 {
        let words = sockaddr_in6(&orig);
        // SAFETY: 28 bytes fit between optval and optval_end (checked above).
        unsafe { core::ptr::copy_nonoverlapping(words.as_ptr().cast::<u8>(), optval, 28) };
    } else {
        let bytes = sockaddr_in(&orig);
        // SAFETY: 16 bytes fit between optval and optval_end (checked above).
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), optval, bytes.len()) };
    }
    let optlen = answer_optlen(opt.optlen, len);
    // Separate volatile stores: merged into one 8-byte store, these two
    // adjacent fields are rejected by the verifier.
    // SAFETY: optlen and retval are writable fields of the context.
    unsafe {
        core::ptr::write_volatile(&raw mut opt.optlen, optlen);
        core::ptr::write_volatile(&raw mut opt.retval, 0);
    }
    true
}

/// Conntrack's answer for a TCP connection: it looks the socket's (local,
/// remote) up in either direction and answers the original direction's
/// destination. So both ends of a redirected connection get its original
/// destination (the app's socket from its storage, the proxy's from the
/// record its end took, or from the tuple map if it could not), an
/// accepted socket its own local address (an inbound capture kept it, see
/// [`crate::sk_lookup`]), and any other connected socket its peer. `None`
/// (the kernel's ENOENT) for sockets that are not connected, and for the
/// proxy's end of a redirected connection whose record is gone.
///
/// When the kernel answered already (`kernel_answered`), this capture
/// answers only for the sockets it knows better than anyone: those it
/// redirected and those accepted on any port but the proxy's. There the
/// kernel's answer can only come from a conntrack entry of an older
/// connection with the same tuple (left by iptables mode before a switch
/// to eBPF). A socket accepted on the proxy's port may have been sent there
/// by another capture or a netfilter rule, and a socket nobody redirected
/// gets the same answer from conntrack as from here: the kernel's stands.
#[inline(always)]
fn original(
    pod: u32,
    sk: *mut bpf_sock,
    kernel_answered: bool,
    local_ip: [u32; 4],
    local_port: u16,
    remote_ip: [u32; 4],
    remote_port: u16,
) -> Option<OrigDst> {
    // SAFETY: `sock_ends` checked it is not null.
    if unsafe { (*sk).protocol } != IPPROTO_TCP || remote_port == 0 {
        return None;
    }
    let own = sock_record(sk);
    if !own.is_null() {
        let record = load(own);
        if record.kind == OrigDst::REDIRECTED || record.kind == OrigDst::PROXY {
            count(pod, Counter::OrigDstAnswered);
            return Some(record);
        }
        if kernel_answered && active(pod).is_some_and(|(cfg, _)| local_port == cfg.proxy_port) {
            return None;
        }
        count(pod, Counter::OrigDstInbound);
        return Some(OrigDst::new(local_ip, local_port, 0));
    }
    let tuple = tuple_from_server_side(pod, local_ip, local_port, remote_ip, remote_port);
    // SAFETY: copied out before use.
    if let Some(orig) = unsafe { RDR_ORIG_TUPLE.get(tuple) }.copied() {
        count(pod, Counter::OrigDstAnswered);
        return Some(orig);
    }
    let (cfg, _) = active(pod)?;
    if kernel_answered || local_port == cfg.proxy_port {
        return None;
    }
    count(pod, Counter::OrigDstUnredirected);
    Some(OrigDst::new(remote_ip, remote_port, 0))
}
