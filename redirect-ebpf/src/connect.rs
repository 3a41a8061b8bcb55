//! `cgroup/connect4` and `cgroup/connect6` (kernel 4.17; socket storage
//! from them 5.10): Istio's nat `OUTPUT -> ISTIO_OUTPUT -> ISTIO_REDIRECT`
//! (and `ISTIO_IN_REDIRECT` for the proxy's calls to its own pod).

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{bpf_sock, sockaddr},
    helpers::{bpf_get_current_uid_gid, generated::bpf_bind},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::{
    Addr, ConnectInput, Counter, Event, Ip6, LOCALHOST, LOG_DEBUG, LOG_TRACE, LOOPBACK_IFINDEX,
    OUTCOME_INACTIVE, OrigDst, Outcome, Source, decide_connect, leaves_excluded, meta_with_slot,
    outcome_of, redirect_source, slot_of_meta, to_v4_mapped, v4_mapped,
};

use crate::{
    maps::{RDR_EVENTS, RDR_SOCK, RDR_SOURCE6, active, count, count_index, in_slot, pod_of, store},
    net::{AF_INET, AF_INET6, ALLOW, read_ip6, write_ip6},
};

/// Mirrors Istio's outbound capture, by default:
///
/// ```text
/// -A OUTPUT -o X -j RETURN                                (each -c interface)
/// -A OUTPUT -p tcp -j ISTIO_OUTPUT
/// -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
/// -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
/// -A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
/// -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
///   (the same three with --gid-owner 1337)
/// -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
/// -A ISTIO_OUTPUT -j ISTIO_REDIRECT
/// -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
/// -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
/// ```
///
/// The decision itself, with every rule istio-iptables can add, is
/// [`redirect_common::decide_connect`]. Always allows the connect: a
/// capture failure must never break the app's connection.
#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/connect4 program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    // SAFETY: `sk` is always a valid socket in a sock_addr context (>= 5.3).
    let sk = unsafe { &*addr.__bindgen_anon_1.sk };
    let src_ip = sk.src_ip4;
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
            keep_source(pod, bind_source(&ctx, sk.family, source));
        }
        addr.user_ip4 = LOCALHOST;
        addr.user_port = u32::from(port.to_be());
    }
    ALLOW
}

/// An AF_INET6 socket's connect. To an IPv4-mapped address its packets
/// are IPv4, and Istio's IPv4 rules (those of [`redirect_connect4`])
/// capture them: it is sent to `::ffff:127.0.0.1:<proxy port>`, which
/// reaches the proxy's IPv4 listener. To an IPv6 address Istio's IPv6
/// table decides (`ip6tables`, the same chain with `::1/128` and `::6`;
/// only with IPv6 rules, see `CFG_IPV6`), and a capture goes to
/// `[::1]:<proxy port>`.
#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/connect6 program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    // SAFETY: `sk` is always a valid socket in a sock_addr context (>= 5.3).
    let sk = unsafe { &*addr.__bindgen_anon_1.sk };
    let dst6 = read_ip6(&raw const addr.user_ip6);
    let Some(pod) = pod_of(ctx.sock_addr) else {
        return ALLOW;
    };
    let Some(dst) = v4_mapped(&dst6) else {
        let src = Ip6(read_ip6(&raw const sk.src_ip6));
        if let Some((port, source)) =
            capture6(&ctx, pod, sk, addr.type_, Ip6(dst6), addr.user_port, src)
        {
            if source != Ip6::UNSPECIFIED {
                keep_source(pod, bind_source6(&ctx, source));
            }
            write_ip6((&raw mut addr.user_ip6).cast(), Ip6::LOOPBACK.0);
            addr.user_port = u32::from(port.to_be());
        }
        return ALLOW;
    };
    connect_mapped(&ctx, pod, dst);
    ALLOW
}

/// [`redirect_connect6`] for a pod without Istio's IPv6 table, which
/// leaves every native IPv6 connection alone: an IPv4-mapped address is
/// decided as there, and an IPv6 one is only counted, as
/// [`decide_connect`]'s first rule counts it without IPv6 rules
/// ([`pass_ipv6`]). Without the IPv6 decision its verification is a third
/// of the other's. The loader attaches it only while neither the
/// configuration in force nor the one being put in force has IPv6 rules,
/// where the two programs decide alike.
#[cgroup_sock_addr(connect6)]
pub fn redirect_conn6_v4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/connect6 program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    let dst6 = read_ip6(&raw const addr.user_ip6);
    let Some(pod) = pod_of(ctx.sock_addr) else {
        return ALLOW;
    };
    match v4_mapped(&dst6) {
        Some(dst) => connect_mapped(&ctx, pod, dst),
        None => pass_ipv6(pod, dst6, addr.user_port),
    }
    ALLOW
}

/// An AF_INET6 socket's connect to `::ffff:<dst>`, decided by Istio's
/// IPv4 rules and sent to `::ffff:127.0.0.1:<proxy port>` when captured.
#[inline(always)]
fn connect_mapped(ctx: &SockAddrContext, pod: u32, dst: u32) {
    // SAFETY: the kernel hands every cgroup/connect6 program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    // SAFETY: `sk` is always a valid socket in a sock_addr context (>= 5.3).
    let sk = unsafe { &*addr.__bindgen_anon_1.sk };
    let src_ip = v4_mapped(&read_ip6(&raw const sk.src_ip6)).unwrap_or(0);
    if let Some((port, source)) = capture(ctx, pod, sk, addr.type_, dst, addr.user_port, src_ip) {
        if source != 0 {
            keep_source(pod, bind_source(ctx, sk.family, source));
        }
        write_ip6((&raw mut addr.user_ip6).cast(), to_v4_mapped(LOCALHOST));
        addr.user_port = u32::from(port.to_be());
    }
}

/// A native IPv6 connect or send of a pod whose configuration in force
/// has no IPv6 rules: left alone and counted as `not_ipv4`, reported at
/// trace level, exactly as [`capture6`] does for the decision's
/// `Bypass(NotIpv4)` (nothing for a pod with no configuration in force).
#[inline(always)]
pub(crate) fn pass_ipv6(pod: u32, dst: [u32; 4], user_port: u32) {
    let Some((cfg, _)) = active(pod) else {
        return;
    };
    count(pod, Counter::NotIpv4);
    if cfg.log_level >= LOG_TRACE {
        let uid_gid = bpf_get_current_uid_gid();
        let event = Event {
            counter: Counter::NotIpv4 as u32,
            uid: uid_gid as u32,
            gid: (uid_gid >> 32) as u32,
            dst_ip: dst,
            dst_port: u16::from_be(user_port as u16),
            proxy_port: 0,
        };
        let _ = RDR_EVENTS.output::<Event>(&event, 0);
    }
}

/// The whole outbound decision ([`redirect_common::decide_outcome`]:
/// [`decide_connect`], then for a redirect [`redirect_source4`], a global
/// function of its own) as a BPF global function (kernel 5.6): the
/// verifier checks it once per program, for any
/// input, and the paths of the program around it once, instead of every
/// path of the decision times every path after it (which took 0.4 s of an
/// install). It takes and returns scalars only, as global functions must
/// (see [`ConnectInput::pack`] and [`Outcome::pack`]).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn redirect_decide(owner: u64, dst: u64, src: u64) -> u64 {
    let input = ConnectInput::<u32>::unpack(owner, dst, src);
    let Some((cfg, maps)) = active(input.pod) else {
        return OUTCOME_INACTIVE;
    };
    let verdict = decide_connect(&input, cfg, &maps);
    let slot = u64::from(maps.slot);
    outcome_of(verdict, || Source::unpack(redirect_source4(slot, dst, src))).pack(cfg.log_level)
}

/// [`redirect_source`] for a redirected IPv4 connect, as a global function
/// of its own: the verifier checks it once, not once for every rule of
/// the decision that redirects. Returns [`Source::pack`]. It takes the
/// slot the decision read (see [`in_slot`]) and the packed input but its
/// owner, which the source does not depend on: the compiler may pass an
/// argument the callee never reads as whatever the register holds, a
/// pointer the verifier refuses as a global function's argument.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn redirect_source4(slot: u64, dst: u64, src: u64) -> u64 {
    let input = ConnectInput::<u32>::unpack(0, dst, src);
    let Some((cfg, maps)) = in_slot(slot as u32, input.pod) else {
        return Source::<u32>::Refused.pack();
    };
    redirect_source(&input, cfg, &maps).pack()
}

/// `-o X -j RETURN` for the interfaces of `-c`
/// ([`redirect_common::leaves_excluded`]: the device a connect's packets
/// leave through) as a global function of its own, for the reason
/// [`redirect_source4`] is one: the verifier checks its loop over the
/// interfaces and its lookups once, and each of the paths out of it is
/// one scalar to the decision, where they were as many states for every
/// rule after it. Takes what [`redirect_source4`] takes; 1 (excluded) or 0.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn redirect_interface_excluded4(slot: u64, dst: u64, src: u64) -> u64 {
    let input = ConnectInput::<u32>::unpack(0, dst, src);
    match in_slot(slot as u32, input.pod) {
        Some((cfg, maps)) => u64::from(leaves_excluded(&input, cfg, &maps)),
        None => 0,
    }
}

/// [`redirect_decide`] for IPv6 destinations: five scalars in (the input
/// but its owner, which this function reads itself), the outcome out, and
/// the source of a redirect left in `RDR_SOURCE6` (a global function
/// returns one scalar).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn redirect_decide6(
    meta: u64,
    dst_hi: u64,
    dst_lo: u64,
    src_hi: u64,
    src_lo: u64,
) -> u64 {
    // This CPU's entry holds the last bind's address until cleared: clear
    // it, so that only this decision's bind is read back.
    if let Some(bind) = RDR_SOURCE6.get_ptr_mut(0) {
        write_ip6(bind.cast(), Ip6::UNSPECIFIED.0);
    }
    let input = ConnectInput::<Ip6>::unpack(
        bpf_get_current_uid_gid(),
        [meta, dst_hi, dst_lo, src_hi, src_lo],
    );
    let Some((cfg, maps)) = active(input.pod) else {
        return OUTCOME_INACTIVE;
    };
    let verdict = decide_connect(&input, cfg, &maps);
    let outcome = outcome_of(verdict, || {
        let meta = meta_with_slot(meta, maps.slot);
        let kind = redirect_source6(meta, dst_hi, dst_lo, src_hi, src_lo);
        Source::from_kind(kind, source6())
    });
    outcome.pack_head(cfg.log_level)
}

/// [`redirect_source4`] for IPv6: returns [`Source::kind`] and leaves the
/// address to bind in `RDR_SOURCE6` (see [`source6`]). `meta` carries the
/// slot the decision read in its port's bits ([`meta_with_slot`]).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn redirect_source6(
    meta: u64,
    dst_hi: u64,
    dst_lo: u64,
    src_hi: u64,
    src_lo: u64,
) -> u64 {
    // The source reads no uid or gid: none is asked.
    let input = ConnectInput::<Ip6>::unpack(0, [meta, dst_hi, dst_lo, src_hi, src_lo]);
    let Some((cfg, maps)) = in_slot(slot_of_meta(meta), input.pod) else {
        return Source::<Ip6>::Refused.kind();
    };
    let source = redirect_source(&input, cfg, &maps);
    // Written for a bind only: any other kind leaves its (undefined)
    // address alone, which the verifier would refuse to see read.
    if let Source::Bind(addr) = source {
        let Some(bind) = RDR_SOURCE6.get_ptr_mut(0) else {
            return Source::<Ip6>::Refused.kind();
        };
        // This CPU's entry, valid for the program's run.
        write_ip6(bind.cast(), addr.0);
    }
    source.kind()
}

/// The address [`redirect_source6`] left on this CPU.
#[inline(always)]
fn source6() -> Ip6 {
    match RDR_SOURCE6.get_ptr(0) {
        Some(bind) => Ip6(read_ip6(bind.cast())),
        None => Ip6::UNSPECIFIED,
    }
}

/// Decides one connect (or UDP send) to `dst_ip` (network order;
/// `user_port` as the context holds it, the __be16 in its low 16 bits)
/// and, when it is captured, records the original destination in the
/// socket's storage. `src_ip` is the address the socket is bound to (0:
/// none). Returns the port to rewrite to, and the source the kernel would
/// have chosen for the original destination when the caller must set it
/// (see [`redirect_common::redirect_source`]), 0 when it need not: a plain
/// `u32` rather than an `Option`, whose undefined payload LLVM may copy in
/// a register the verifier then finds unread.
#[inline(always)]
pub(crate) fn capture(
    ctx: &SockAddrContext,
    pod: u32,
    sk: &bpf_sock,
    sock_type: u32,
    dst_ip: u32,
    user_port: u32,
    src_ip: u32,
) -> Option<(u16, u32)> {
    let uid_gid = bpf_get_current_uid_gid();
    let input = ConnectInput {
        sock_type,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        dst_ip,
        dst_port: u16::from_be(user_port as u16),
        src_ip,
        dev_lo: sk.bound_dev_if == LOOPBACK_IFINDEX,
        bound_dev: sk.bound_dev_if,
        pod,
    };
    let [owner, dst, src] = input.pack();
    let (outcome, level) = Outcome::unpack(redirect_decide(owner, dst, src))?;
    let report = |counter: u32, proxy_port: u16| {
        if level >= LOG_TRACE || (level >= LOG_DEBUG && proxy_port != 0) {
            let event = Event {
                counter,
                uid: input.uid,
                gid: input.gid,
                dst_ip: dst_ip.words(),
                dst_port: input.dst_port,
                proxy_port,
            };
            let _ = RDR_EVENTS.output::<Event>(&event, 0);
        }
    };
    if outcome.port == 0 {
        count_index(pod, outcome.counter);
        report(outcome.counter, 0);
        return None;
    }
    if !record(
        ctx,
        pod,
        input.effective_dst(),
        input.dst_port,
        outcome.port,
    ) {
        return None;
    }
    count_index(pod, outcome.counter);
    report(outcome.counter, outcome.port);
    Some((outcome.port, outcome.source))
}

/// [`capture`] for an IPv6 destination (the decision's IPv6 global
/// function): the port to rewrite to, and the source to bind first
/// (unspecified: the kernel's choice stands).
#[inline(always)]
pub(crate) fn capture6(
    ctx: &SockAddrContext,
    pod: u32,
    sk: &bpf_sock,
    sock_type: u32,
    dst_ip: Ip6,
    user_port: u32,
    src_ip: Ip6,
) -> Option<(u16, Ip6)> {
    let input = ConnectInput {
        sock_type,
        uid: 0,
        gid: 0,
        dst_ip,
        dst_port: u16::from_be(user_port as u16),
        src_ip,
        dev_lo: sk.bound_dev_if == LOOPBACK_IFINDEX,
        bound_dev: sk.bound_dev_if,
        pod,
    };
    let [meta, dst_hi, dst_lo, src_hi, src_lo] = input.pack();
    let packed = redirect_decide6(meta, dst_hi, dst_lo, src_hi, src_lo);
    let (outcome, level) = Outcome::<Ip6>::unpack_head(packed, source6())?;
    let source = if outcome.port != 0 && outcome.source != Ip6::UNSPECIFIED {
        outcome.source
    } else {
        Ip6::UNSPECIFIED
    };
    if outcome.port != 0
        && !record(
            ctx,
            pod,
            input.effective_dst(),
            input.dst_port,
            outcome.port,
        )
    {
        return None;
    }
    count_index(pod, outcome.counter);
    if level >= LOG_TRACE || (level >= LOG_DEBUG && outcome.port != 0) {
        let uid_gid = bpf_get_current_uid_gid();
        let event = Event {
            counter: outcome.counter,
            uid: uid_gid as u32,
            gid: (uid_gid >> 32) as u32,
            dst_ip: dst_ip.0,
            dst_port: input.dst_port,
            proxy_port: outcome.port,
        };
        let _ = RDR_EVENTS.output::<Event>(&event, 0);
    }
    (outcome.port != 0).then_some((outcome.port, source))
}

/// Records in the socket's storage that its connect to `dst:port` was sent
/// to `via`; `false` (counted) when the kernel could not create the
/// storage: without a record the proxy could not learn the original
/// destination, so the connect is left alone rather than broken.
#[inline(always)]
fn record<A: Addr>(ctx: &SockAddrContext, pod: u32, dst: A, port: u16, via: u16) -> bool {
    let orig = OrigDst::new(dst.words(), port, via);
    // Field by field into the buffer the helper reads (see `maps::store`).
    let mut copy = core::mem::MaybeUninit::<OrigDst>::uninit();
    store(copy.as_mut_ptr(), &orig);
    // SAFETY: the context's socket; the value (every byte written) is
    // copied in when created.
    let slot = unsafe { RDR_SOCK.get_or_insert_ptr_mut(ctx, Some(copy.assume_init_mut())) };
    if slot.is_null() {
        count(pod, Counter::RecordFailed);
        return false;
    }
    // A socket that connects (or sends) again keeps its storage:
    // overwrite it.
    store(slot, &orig);
    true
}

/// Counts a redirected socket of `pod` that could not be given its source
/// (`rc`: what setting it returned, 0 for success).
#[inline(always)]
pub(crate) fn keep_source(pod: u32, rc: i64) {
    if rc != 0 {
        count(pod, Counter::SourceNotKept);
    }
}

/// `bpf_bind([src]:0)` for an AF_INET6 socket and an IPv6 source.
#[inline(always)]
fn bind_source6(ctx: &SockAddrContext, src: Ip6) -> i64 {
    bind_words(
        ctx,
        [AF_INET6, 0, src.0[0], src.0[1], src.0[2], src.0[3], 0],
        28,
    )
}

/// `bpf_bind(src:0)` (kernel 4.17): the socket leaves from `src`, with an
/// ephemeral port chosen at connect. An AF_INET6 socket is bound to
/// `::ffff:src`. Returns the helper's result (0: bound).
#[inline(always)]
fn bind_source(ctx: &SockAddrContext, family: u32, src: u32) -> i64 {
    let (words, len) = if family == AF_INET6 {
        let m = to_v4_mapped(src);
        ([AF_INET6, 0, m[0], m[1], m[2], m[3], 0], 28)
    } else {
        ([AF_INET, src, 0, 0, 0, 0, 0], 16)
    };
    bind_words(ctx, words, len)
}

/// `bpf_bind` of the sockaddr whose words are `words` (a `sockaddr_in` in
/// the first four, or a `sockaddr_in6`), `len` bytes of it.
#[inline(always)]
fn bind_words(ctx: &SockAddrContext, words: [u32; 7], len: i32) -> i64 {
    // Room for a sockaddr_in6 (family, port, flowinfo, address, scope),
    // every word stored separately: a zeroed array would be a memset loop,
    // which the verifier refuses without CAP_PERFMON.
    let mut buf = MaybeUninit::<[u32; 7]>::uninit();
    let w = buf.as_mut_ptr().cast::<u32>();
    // SAFETY: seven 4-byte stores inside the stack buffer.
    unsafe {
        core::ptr::write_volatile(w, words[0]);
        core::ptr::write_volatile(w.add(1), words[1]);
        core::ptr::write_volatile(w.add(2), words[2]);
        core::ptr::write_volatile(w.add(3), words[3]);
        core::ptr::write_volatile(w.add(4), words[4]);
        core::ptr::write_volatile(w.add(5), words[5]);
        core::ptr::write_volatile(w.add(6), words[6]);
    }
    // SAFETY: the context is the kernel's; the buffer holds `len` bytes,
    // all written above.
    unsafe { bpf_bind(ctx.sock_addr, w.cast::<sockaddr>(), len) }
}
