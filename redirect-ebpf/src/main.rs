//! The kernel side of `redirect`: the eBPF programs that replace Istio's nat
//! `OUTPUT` capture.
//!
//! - [`redirect_connect4`] (`cgroup/connect4`) decides every outbound IPv4
//!   `connect()` of the pod's cgroup and rewrites captured ones to
//!   `127.0.0.1:<proxy port>`, recording the original destination in the
//!   socket's own storage. [`redirect_connect6`] does the same for dual-stack sockets
//!   connecting to IPv4-mapped addresses (`::ffff:a.b.c.d`), which send IPv4
//!   packets that Istio's IPv4 rules capture.
//! - [`redirect_sockops`] (`sockops`) copies that record to a map keyed by
//!   the connection's 4-tuple once the connection is established (the
//!   proxy's accepted socket can find it there), and removes it when the
//!   connection closes, so long-running nodes do not fill the maps.
//! - [`redirect_getsockopt`] (`cgroup/getsockopt`) answers the proxy's
//!   `getsockopt(SOL_IP, SO_ORIGINAL_DST)` from that record, as conntrack
//!   does for iptables REDIRECT; every other call is left as the kernel made it.
//! - [`redirect_getpeername4`] / [`redirect_getpeername6`]
//!   (`cgroup/getpeername4/6`) make `getpeername()` on the app's redirected
//!   socket return the original destination.
//! - [`redirect_sk_lookup`] (`sk_lookup`, attached to the pod's network
//!   namespace) hands inbound connections to the proxy's inbound listener,
//!   which [`redirect_sockops`] registers in `RDR_LISTENER` when it calls
//!   `listen()`; the accepted socket keeps the original destination as its
//!   local address, which [`redirect_getsockopt`] reports.
//!
//! Configuration comes from the `RDR_CONFIG` map that user space fills; every
//! decision increments a per-CPU counter in `RDR_STATS`.

#![no_std]
#![no_main]
// The BPF target's `core` has no atomic read-modify-write methods; the
// intrinsic compiles to the BPF atomic add the counters need.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE, bpf_sock,
        bpf_sockopt,
        sk_action::{SK_DROP, SK_PASS},
    },
    btf_maps::SkStorage,
    helpers::{bpf_get_current_uid_gid, generated::bpf_sk_storage_get},
    macros::{btf_map, cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockMap, lpm_trie::Key},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext, SockoptContext},
};
use redirect_common::{
    CFG_INBOUND, CIDR_SLOT_BITS, CONFIG_SLOTS, COUNTER_COUNT, ConnTuple, ConnectInput, Counter,
    Event, InboundInput, InboundVerdict, InstanceMeta, LOCALHOST, LOG_DEBUG, LOG_TRACE, Lookups,
    MAX_CIDRS, MAX_LOCAL_ADDRS, MAX_PORTS, OrigDst, RedirectConfig, SOCK_STREAM, SOCKADDR_IN_LEN,
    SockoptAction, Verdict, active_slot, answer_optlen, cidr_key, classify_getsockopt,
    decide_connect, decide_inbound, local_key, pass_through_optlen, port_key, sockaddr_in,
    to_v4_mapped, tuple_from_client_side, tuple_from_server_side, v4_mapped,
};

/// Largest number of connections whose original destination is tracked at
/// once (user space sets the actual size: `--max-connections`).
const MAX_TRACKED: u32 = 65536;

/// Return value of a cgroup sock_addr program that lets the syscall proceed.
const ALLOW: i32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;

// Every map is pinned by name in the instance's bpffs directory, so that a
// reinstall reuses them and the programs it loads share state with the old ones.

/// The capture configurations, one per slot, written by user space; the
/// one `RDR_ACTIVE` selects is in force (see [`active`]).
#[map]
static RDR_CONFIG: Array<RedirectConfig> = Array::pinned(CONFIG_SLOTS, 0);

/// Which slot of `RDR_CONFIG` (and of every set map) is in force: an
/// upgrade writes the other slot, then switches this one value.
#[map]
static RDR_ACTIVE: Array<u32> = Array::pinned(1, 0);

/// The configuration in force and the view of the set maps that goes with
/// it; `None` before the first install finished writing one.
#[inline(always)]
fn active() -> Option<(&'static RedirectConfig, Maps)> {
    let slot = active_slot(*RDR_ACTIVE.get(0)?);
    let cfg = RDR_CONFIG.get(slot)?;
    if cfg.abi_version == 0 {
        return None;
    }
    Some((cfg, Maps { slot }))
}

/// Decision counters, indexed by [`Counter`].
#[map]
static RDR_STATS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_COUNT, 0);

/// Original destination of a redirected socket between connect() and the
/// end of its handshake, in the socket's local storage: the kernel frees it
/// with the socket, so a connect that never completes leaves nothing
/// behind, and there is no map to fill. (A BTF map: user space pins it
/// with the others, by name.)
#[btf_map]
static RDR_SOCK: SkStorage<OrigDst> = SkStorage::new();

/// The storage map, as the helpers take it.
#[inline(always)]
fn sock_map() -> *mut core::ffi::c_void {
    (&raw const RDR_SOCK).cast_mut().cast()
}

/// Writes a record field by field: a struct copy compiles to a `memcpy`
/// call whose pointer arithmetic the verifier refuses without CAP_PERFMON.
#[inline(always)]
fn store(slot: *mut OrigDst, orig: &OrigDst) {
    // SAFETY: `slot` is a valid map value of this type.
    unsafe {
        core::ptr::write_volatile(&raw mut (*slot).ip, orig.ip);
        core::ptr::write_volatile(&raw mut (*slot).state, orig.state);
        core::ptr::write_volatile(&raw mut (*slot).port, orig.port);
    }
}

/// Reads a record field by field (see [`store`]).
#[inline(always)]
fn load(slot: *const OrigDst) -> OrigDst {
    // SAFETY: `slot` is a valid map value of this type.
    unsafe {
        OrigDst {
            ip: core::ptr::read_volatile(&raw const (*slot).ip),
            state: core::ptr::read_volatile(&raw const (*slot).state),
            port: core::ptr::read_volatile(&raw const (*slot).port),
            _pad: 0,
        }
    }
}

/// The record in `sk`'s storage, or null.
#[inline(always)]
fn sock_record(sk: *mut bpf_sock) -> *mut OrigDst {
    if sk.is_null() {
        return core::ptr::null_mut();
    }
    // SAFETY: a full socket from the context; no value is created.
    unsafe { bpf_sk_storage_get(sock_map(), sk.cast(), core::ptr::null_mut(), 0) }.cast()
}

/// Original destination of an established redirected connection, keyed by
/// its tuple as seen from the app (client) side.
#[map]
static RDR_ORIG_TUPLE: LruHashMap<ConnTuple, OrigDst> = LruHashMap::pinned(MAX_TRACKED, 0);

// The set maps below hold each configuration slot's entries under keys
// that start with the slot (see `redirect_common::port_key`, `cidr_key`,
// `local_key`).

/// `PORT_*` flags of ports (Istio `-o`, `-q`, `-b`, `-d`).
#[map]
static RDR_PORTS: HashMap<u32, u8> = HashMap::pinned(MAX_PORTS * CONFIG_SLOTS, 0);

/// Excluded destination networks (Istio `-x`); any value means "in the set".
#[map]
static RDR_EXCLUDE: LpmTrie<[u8; 8], u8> = LpmTrie::pinned(MAX_CIDRS * CONFIG_SLOTS, 0);

/// Included destination networks (Istio `-i`, unless it is `*`).
#[map]
static RDR_INCLUDE: LpmTrie<[u8; 8], u8> = LpmTrie::pinned(MAX_CIDRS * CONFIG_SLOTS, 0);

/// The pod's own non-loopback addresses: connects to them leave through
/// `lo`, which Istio's `-o lo` rules test.
#[map]
static RDR_LOCAL: HashMap<u64, u8> = HashMap::pinned(MAX_LOCAL_ADDRS * CONFIG_SLOTS, 0);

/// The proxy's inbound listener (key 0), put here by [`redirect_sockops`]
/// when a socket of the cgroup listens on the inbound port (or by user
/// space, for a listener that existed before the install).
#[map]
static RDR_LISTENER: SockMap = SockMap::pinned(1, 0);

/// Inbound connections captured, per destination port. When every slot is
/// taken, further ports are only counted in `inbound_captured`.
#[map]
static RDR_IN_HITS: HashMap<u16, u64> = HashMap::pinned(MAX_PORTS, 0);

/// The decision's view of the set maps above: one slot's entries.
struct Maps {
    slot: u32,
}

impl Lookups for Maps {
    #[inline(always)]
    fn port_flags(&self, port: u16) -> u8 {
        // SAFETY: the value is copied out at once, before any update can free it.
        unsafe { RDR_PORTS.get(port_key(self.slot, port)) }
            .copied()
            .unwrap_or(0)
    }

    #[inline(always)]
    fn excluded(&self, ip: u32) -> bool {
        RDR_EXCLUDE
            .get(Key::new(CIDR_SLOT_BITS + 32, cidr_key(self.slot, ip)))
            .is_some()
    }

    #[inline(always)]
    fn included(&self, ip: u32) -> bool {
        RDR_INCLUDE
            .get(Key::new(CIDR_SLOT_BITS + 32, cidr_key(self.slot, ip)))
            .is_some()
    }

    #[inline(always)]
    fn pod_address(&self, ip: u32) -> bool {
        // SAFETY: only presence is used.
        unsafe { RDR_LOCAL.get(local_key(self.slot, ip)) }.is_some()
    }
}

/// Which cgroup this instance belongs to (user space only; see `InstanceMeta`).
#[map]
static RDR_META: Array<InstanceMeta> = Array::pinned(1, 0);

/// Decisions reported to `redirect run --log` (see [`Event`]); written only
/// when the config's log level asks for them.
#[map]
static RDR_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = RDR_STATS.get_ptr_mut(counter as u32) {
        // Atomic (a BPF XADD, the result unused): a sockops callback in
        // softirq can interrupt a syscall-context increment on this CPU.
        // SAFETY: a valid, aligned map value that lives as long as the map.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1) };
    }
}

/// Reads an IPv6 address from a context, one 4-byte load per word (the
/// verifier refuses wider loads of these fields on older kernels).
#[inline(always)]
fn read_ip6(words: *const [u32; 4]) -> [u32; 4] {
    let w = words.cast::<u32>();
    // SAFETY: `words` points at a readable 16-byte context field.
    unsafe {
        [
            core::ptr::read_volatile(w),
            core::ptr::read_volatile(w.add(1)),
            core::ptr::read_volatile(w.add(2)),
            core::ptr::read_volatile(w.add(3)),
        ]
    }
}

/// Mirrors Istio's outbound capture, by default:
///
/// ```text
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
/// [`decide_connect`]. Always allows the connect: a
/// capture failure must never break the app's connection.
#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/connect4 program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    // SAFETY: `sk` is always a valid socket in a sock_addr context (>= 5.3).
    let src_ip = unsafe { (*addr.__bindgen_anon_1.sk).src_ip4 };
    if let Some(port) = capture(&ctx, addr.type_, addr.user_ip4, addr.user_port, src_ip) {
        addr.user_ip4 = LOCALHOST;
        addr.user_port = u32::from(port.to_be());
    }
    ALLOW
}

/// The same rules as [`redirect_connect4`] for a dual-stack (AF_INET6)
/// socket connecting to an IPv4-mapped address: its packets are IPv4, and
/// Istio's IPv4 rules capture them. It is sent to `::ffff:127.0.0.1:<proxy
/// port>`, which reaches the proxy's IPv4 listener. Real IPv6 destinations
/// are left alone, as Istio leaves them without `--ipv6` rules.
#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/connect6 program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    let Some(dst) = v4_mapped(&read_ip6(&raw const addr.user_ip6)) else {
        if addr.type_ == SOCK_STREAM {
            count(Counter::NotIpv4);
        }
        return ALLOW;
    };
    // SAFETY: `sk` is always a valid socket in a sock_addr context (>= 5.3).
    let src = read_ip6(unsafe { &raw const (*addr.__bindgen_anon_1.sk).src_ip6 });
    let src_ip = v4_mapped(&src).unwrap_or(0);
    if let Some(port) = capture(&ctx, addr.type_, dst, addr.user_port, src_ip) {
        let proxy = to_v4_mapped(LOCALHOST);
        let w = (&raw mut addr.user_ip6).cast::<u32>();
        // SAFETY: four 4-byte stores into the writable user_ip6 field.
        unsafe {
            core::ptr::write_volatile(w, proxy[0]);
            core::ptr::write_volatile(w.add(1), proxy[1]);
            core::ptr::write_volatile(w.add(2), proxy[2]);
            core::ptr::write_volatile(w.add(3), proxy[3]);
        }
        addr.user_port = u32::from(port.to_be());
    }
    ALLOW
}

/// Decides one connect to `dst_ip` (network order; `user_port` as the
/// context holds it, the __be16 in its low 16 bits) and, when it is
/// captured, records the original destination in the socket's storage.
/// `src_ip` is the address the socket is bound to (0: none). Returns the
/// proxy port to rewrite to.
#[inline(always)]
fn capture(
    ctx: &SockAddrContext,
    sock_type: u32,
    dst_ip: u32,
    user_port: u32,
    src_ip: u32,
) -> Option<u16> {
    let (cfg, maps) = active()?;
    let uid_gid = bpf_get_current_uid_gid();
    let input = ConnectInput {
        sock_type,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        dst_ip,
        dst_port: u16::from_be(user_port as u16),
        src_ip,
    };
    let verdict = decide_connect(&input, cfg, &maps);
    let level = cfg.log_level;
    let report = |counter: Counter, proxy_port: u16| {
        let redirect = matches!(counter, Counter::Redirected | Counter::Hairpin);
        if level >= LOG_TRACE || (level >= LOG_DEBUG && redirect) {
            let event = Event {
                counter: counter as u32,
                uid: input.uid,
                gid: input.gid,
                dst_ip,
                dst_port: input.dst_port,
                proxy_port,
            };
            let _ = RDR_EVENTS.output::<Event>(&event, 0);
        }
    };
    match verdict {
        Verdict::Bypass(counter) => {
            count(counter);
            report(counter, 0);
            None
        }
        Verdict::Redirect { port, counter } => {
            let mut orig = OrigDst::new(dst_ip, input.dst_port);
            // SAFETY: the context's socket; the value is copied in when created.
            let slot = unsafe { RDR_SOCK.get_or_insert_ptr_mut(ctx, Some(&mut orig)) };
            if slot.is_null() {
                // Without a record the proxy could not learn the original
                // destination: leave the connect alone rather than break it.
                count(Counter::RecordFailed);
                return None;
            }
            // A socket that connects again keeps its storage: overwrite it.
            store(slot, &orig);
            count(counter);
            report(counter, port);
            Some(port)
        }
    }
}

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
/// capture port (and inbound capture is on), it becomes the listener that
/// [`redirect_sk_lookup`] hands inbound connections to. This is how the
/// proxy's listener, which appears after the init step has exited, is
/// found without a daemon. The newest listener wins; the kernel removes a
/// socket from the map when it closes.
#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    let Some((cfg, _)) = active() else {
        return;
    };
    if cfg.flags & CFG_INBOUND == 0 || ctx.local_port() != u32::from(cfg.inbound_port) {
        return;
    }
    // SAFETY: the context is the listening socket's, valid for this call.
    if unsafe { RDR_LISTENER.update(0, ctx.ops, u64::from(BPF_ANY)) }.is_ok() {
        count(Counter::ListenerRegistered);
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
#[inline(always)]
fn on_passive_established(ctx: &SockOpsContext, ends: &Ends) {
    if let Some(orig) = RDR_ORIG_TUPLE.get_ptr_mut(ends.as_proxy()) {
        set_flag(orig, OrigDst::PROXY_SEEN);
        watch_close(ctx);
    }
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

/// Sets one state byte of a record in place (volatile: ordered before the
/// reads that follow it).
#[inline(always)]
fn set_flag(orig: *mut OrigDst, which: usize) {
    // SAFETY: a valid map value pointer; `which` < 4 stays inside `state`.
    unsafe { core::ptr::write_volatile((&raw mut (*orig).state).cast::<u8>().add(which), 1) };
}

/// Reads one state byte of a record in place.
#[inline(always)]
fn flag(orig: *mut OrigDst, which: usize) -> u8 {
    // SAFETY: as in `set_flag`.
    unsafe { core::ptr::read_volatile((&raw const (*orig).state).cast::<u8>().add(which)) }
}

#[inline(always)]
fn release(tuple: &ConnTuple) {
    if RDR_ORIG_TUPLE.remove(tuple).is_ok() {
        count(Counter::TupleReleased);
    }
}

/// The local and remote ends of a socket seen from a cgroup hook, as IPv4
/// (AF_INET, or AF_INET6 with IPv4-mapped ends): (local ip, local port,
/// remote ip, remote port) with host-order ports.
#[inline(always)]
fn sock_ends(sk: *const bpf_sock) -> Option<(u32, u16, u32, u16)> {
    if sk.is_null() {
        return None;
    }
    // SAFETY: non-null socket pointer from the context.
    let sk = unsafe { &*sk };
    let (local, remote) = match sk.family {
        AF_INET => (sk.src_ip4, sk.dst_ip4),
        AF_INET6 => (
            v4_mapped(&read_ip6(&raw const sk.src_ip6))?,
            v4_mapped(&read_ip6(&raw const sk.dst_ip6))?,
        ),
        _ => return None,
    };
    Some((local, sk.src_port as u16, remote, u16::from_be(sk.dst_port)))
}

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
/// (the whole decision, with `-b` lists and TPROXY, is [`decide_inbound`]).
/// Runs when a TCP SYN finds no established socket in the pod's network
/// namespace: a captured connection is assigned to the proxy's inbound
/// listener and keeps its destination address and port, which is what the
/// proxy reads back (getsockname, or SO_ORIGINAL_DST). With no listener
/// registered the connection is refused (a reset), as REDIRECT to a port
/// nobody listens on refuses it: captured traffic never reaches the app
/// behind the proxy's back.
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
            if RDR_LISTENER.redirect_sk_lookup(&ctx, 0, 0).is_err() {
                count(Counter::InboundRefused);
                return SK_DROP;
            }
            count(Counter::InboundCaptured);
            count_port(input.dst_port);
            SK_PASS
        }
    }
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

/// The record of the app's redirected socket `sk` whose peer is `peer_ip:peer_port`.
#[inline(always)]
fn peer_record(sk: *const bpf_sock, peer_ip: u32, user_port: u32) -> Option<OrigDst> {
    let (local_ip, local_port, _, _) = sock_ends(sk)?;
    let tuple = tuple_from_client_side(
        local_ip,
        local_port,
        peer_ip,
        u16::from_be(user_port as u16),
    );
    // SAFETY: copied out before use.
    unsafe { RDR_ORIG_TUPLE.get(tuple) }.copied()
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
    if let Some(orig) = peer_record(sk, addr.user_ip4, addr.user_port) {
        addr.user_ip4 = orig.ip;
        addr.user_port = u32::from(orig.port.to_be());
        count(Counter::PeernameRestored);
    }
    ALLOW
}

/// [`redirect_getpeername4`] for dual-stack sockets redirected by
/// [`redirect_connect6`]: the peer reads `::ffff:<original address>`.
#[cgroup_sock_addr(getpeername6)]
pub fn redirect_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/getpeername6 program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    let Some(peer) = v4_mapped(&read_ip6(&raw const addr.user_ip6)) else {
        return ALLOW;
    };
    // SAFETY: reading the union member the kernel filled in.
    let sk = unsafe { addr.__bindgen_anon_1.sk };
    if let Some(orig) = peer_record(sk, peer, addr.user_port) {
        let w = (&raw mut addr.user_ip6).cast::<u32>();
        // SAFETY: a 4-byte store into the writable user_ip6 field; the
        // first three words already hold the ::ffff: prefix.
        unsafe { core::ptr::write_volatile(w.add(3), orig.ip) };
        addr.user_port = u32::from(orig.port.to_be());
        count(Counter::PeernameRestored);
    }
    ALLOW
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}
