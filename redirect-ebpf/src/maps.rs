//! Every map the programs share, pinned by name in the instance's bpffs
//! directory (so that a reinstall reuses them and the programs it loads
//! share state with the old ones), and the helpers that read and write
//! them: the configuration in force, the set lookups, the counters, the
//! original-destination records.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, bpf_sock},
    btf_maps::SkStorage,
    helpers::generated::{bpf_get_netns_cookie, bpf_sk_storage_get},
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockMap, lpm_trie::Key},
};
use redirect_common::{
    Addr, CFG_PORT_RANGES, CIDR_SLOT_BITS, COUNTER_COUNT, ChainTail, ConnTuple, ConnectInput,
    Counter, INSTANCE_POD, InboundVerdict, InstanceMeta, Ip6, LISTENER_SLOTS, Lookups, MAX_CIDRS,
    MAX_CIDRS6, MAX_GROUPS, MAX_IN_BYPASS, MAX_IN_HITS, MAX_LOCAL_ADDRS, MAX_PORT_BLOCKS,
    MAX_PORTS, MAX_ROUTES, MAX_ROUTES6, OrigDst, OwnerFacts, OwnerMatch, PORT_RANGE_SLOT_BITS,
    PodMeta, ROUTE_EXCLUDED_IFACE, RedirectConfig, RouteEntry, RouteEntry6, SLOTS_PER_POD,
    TailFacts, cidr_key, cidr6_key, counter_index, inbound_port_rules, local6_key, owner_match,
    port_key, port_range_key, slot_key, slot_of_pod,
};

/// Largest number of redirected handshakes in flight at once (user space
/// sets the actual size: `--max-connections`).
const MAX_TRACKED: u32 = 65536;

// Sizes below are those of a per-pod instance (one pod); user space sizes
// the maps of a program set for the pods it serves.

/// The capture configurations, two slots per pod (see
/// [`redirect_common::pod_slot`]), written by user space; the one a pod's
/// `RDR_ACTIVE` entry selects is in force for it (see [`active`]).
#[map]
pub(crate) static RDR_CONFIG: Array<RedirectConfig> = Array::pinned(SLOTS_PER_POD, 0);

/// Which slot of `RDR_CONFIG` (and of every set map) is in force for each
/// pod: an upgrade writes the pod's other slot, then switches this one
/// value.
#[map]
pub(crate) static RDR_ACTIVE: Array<u32> = Array::pinned(1, 0);

/// The configuration in force for `pod` and the view of the set maps that
/// goes with it; `None` before the first install finished writing one.
#[inline(always)]
pub(crate) fn active(pod: u32) -> Option<(&'static RedirectConfig, Maps)> {
    in_slot(*RDR_ACTIVE.get(pod)?, pod)
}

/// The configuration in `slot` and its view of the set maps, if the slot
/// is one of `pod`'s and written: what a global function of the decision
/// reads, given the slot its caller's [`active`] chose, so that one
/// decision reads one configuration whatever an upgrade switches in
/// between.
#[inline(always)]
pub(crate) fn in_slot(slot: u32, pod: u32) -> Option<(&'static RedirectConfig, Maps)> {
    if !slot_of_pod(slot, pod) {
        return None;
    }
    let cfg = RDR_CONFIG.get(slot)?;
    if cfg.abi_version == 0 {
        return None;
    }
    Some((cfg, Maps { slot }))
}

/// Set to 1 by the loader in a node's program set, which serves every pod
/// of the node whose network namespace [`RDR_PODS`] lists; 0 (a per-pod
/// instance) serves [`INSTANCE_POD`] only. A frozen read-only global, so
/// the verifier of a per-pod instance never sees the node branch (whose
/// helper sockops and cgroup sockopt programs only have from 5.15).
#[unsafe(no_mangle)]
static NODE_SET: u32 = 0;

/// Flags of the hash maps that hold sets: entries are allocated as they
/// are added, so a map costs what its entries need, not its capacity
/// (a node set's capacity is its pods' times theirs).
const SET_FLAGS: u32 = BPF_F_NO_PREALLOC;

/// A node set's pods by network namespace cookie (`SO_NETNS_COOKIE`).
#[map]
pub(crate) static RDR_PODS: HashMap<u64, u32> = HashMap::pinned(1, SET_FLAGS);

/// A node set's pods by their addresses (IPv4 mapped), for `sk_lookup`,
/// which has no namespace cookie: it runs on a SYN for one of the pod's
/// own addresses, and pod addresses are unique on a node.
#[map]
pub(crate) static RDR_POD_ADDRS: HashMap<[u32; 4], u32> = HashMap::pinned(1, SET_FLAGS);

/// A node set's record of each pod (user space only; see `PodMeta`). A
/// node set's is created memory-mappable by user space before the object
/// loads (`node_set::load_object` in redirect-user), so that a per-pod
/// instance does not pay the mapping's pages for it.
#[map]
pub(crate) static RDR_POD_META: Array<PodMeta> = Array::pinned(1, 0);

#[inline(always)]
fn node_set() -> bool {
    // SAFETY: a global of this program, read as the kernel froze it.
    let node = unsafe { core::ptr::read_volatile(&raw const NODE_SET) };
    node != 0
}

/// The pod a program's context (a `bpf_sock_addr`, `bpf_sock_ops` or
/// `bpf_sockopt`) belongs to: a per-pod instance's one, or the pod of a
/// node set whose network namespace it is in; `None` for any other
/// namespace's sockets, which a node set leaves alone.
#[inline(always)]
pub(crate) fn pod_of<T>(ctx: *mut T) -> Option<u32> {
    if !node_set() {
        return Some(INSTANCE_POD);
    }
    // SAFETY: the program's own context, as the helper takes it.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.cast()) };
    // SAFETY: copied out at once.
    unsafe { RDR_PODS.get(cookie) }.copied()
}

/// The pod whose address `ip` (IPv4 mapped) is, for a program that has no
/// namespace cookie (see [`RDR_POD_ADDRS`]).
#[inline(always)]
pub(crate) fn pod_at(ip: [u32; 4]) -> Option<u32> {
    if !node_set() {
        return Some(INSTANCE_POD);
    }
    // SAFETY: copied out at once.
    unsafe { RDR_POD_ADDRS.get(ip) }.copied()
}

/// Decision counters, each pod's indexed by [`Counter`] from
/// [`counter_index`]`(pod, 0)`.
#[map]
pub(crate) static RDR_STATS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_COUNT, 0);

/// Original destination of a redirected connection, in the storage of the
/// app's socket and then of the proxy's (see [`OrigDst`]), or the mark of an
/// accepted socket: the kernel frees it with the socket, so nothing is left
/// behind and there is no map to fill. (A BTF map: user space pins it
/// with the others, by name.)
#[btf_map]
pub(crate) static RDR_SOCK: SkStorage<OrigDst> = SkStorage::new();

/// The storage map, as the helpers take it.
#[inline(always)]
pub(crate) fn sock_map() -> *mut core::ffi::c_void {
    (&raw const RDR_SOCK).cast_mut().cast()
}

/// Writes a record field by field: a struct copy compiles to a `memcpy`
/// call whose pointer arithmetic the verifier refuses without CAP_PERFMON.
#[inline(always)]
pub(crate) fn store(slot: *mut OrigDst, orig: &OrigDst) {
    // SAFETY: `slot` is a valid map value of this type.
    unsafe {
        let ip = (&raw mut (*slot).ip).cast::<u32>();
        core::ptr::write_volatile(ip, orig.ip[0]);
        core::ptr::write_volatile(ip.add(1), orig.ip[1]);
        core::ptr::write_volatile(ip.add(2), orig.ip[2]);
        core::ptr::write_volatile(ip.add(3), orig.ip[3]);
        core::ptr::write_volatile(&raw mut (*slot).port, orig.port);
        core::ptr::write_volatile(&raw mut (*slot).via, orig.via);
        core::ptr::write_volatile(&raw mut (*slot).kind, orig.kind);
        core::ptr::write_volatile(&raw mut (*slot)._pad, 0);
    }
}

/// Reads a record field by field (see [`store`]).
#[inline(always)]
pub(crate) fn load(slot: *const OrigDst) -> OrigDst {
    // SAFETY: `slot` is a valid map value of this type.
    unsafe {
        let ip = (&raw const (*slot).ip).cast::<u32>();
        OrigDst {
            ip: [
                core::ptr::read_volatile(ip),
                core::ptr::read_volatile(ip.add(1)),
                core::ptr::read_volatile(ip.add(2)),
                core::ptr::read_volatile(ip.add(3)),
            ],
            port: core::ptr::read_volatile(&raw const (*slot).port),
            via: core::ptr::read_volatile(&raw const (*slot).via),
            kind: core::ptr::read_volatile(&raw const (*slot).kind),
            _pad: 0,
        }
    }
}

/// The record in `sk`'s storage, or null.
#[inline(always)]
pub(crate) fn sock_record(sk: *mut bpf_sock) -> *mut OrigDst {
    if sk.is_null() {
        return core::ptr::null_mut();
    }
    // SAFETY: a full socket from the context; no value is created.
    unsafe { bpf_sk_storage_get(sock_map(), sk.cast(), core::ptr::null_mut(), 0) }.cast()
}

/// Creates `sk`'s storage holding `value` (an accepted socket's mark, or
/// the record the proxy's end of a redirected connection keeps). `false`
/// when the kernel could not create it.
#[inline(always)]
pub(crate) fn keep_in_socket(sk: *mut bpf_sock, value: &OrigDst) -> bool {
    if sk.is_null() {
        return false;
    }
    // Copied onto the stack field by field (see [`store`]), into the very
    // buffer the helper reads: a plain copy of a record that is mostly
    // zeros (an accepted socket's mark) compiles to a `memset` loop, which
    // the verifier refuses without CAP_PERFMON.
    let mut copy = core::mem::MaybeUninit::<OrigDst>::uninit();
    store(copy.as_mut_ptr(), value);
    // SAFETY: a full socket from the context; the value (every byte
    // written) is copied in.
    let slot = unsafe {
        bpf_sk_storage_get(
            sock_map(),
            sk.cast(),
            copy.as_mut_ptr().cast(),
            u64::from(aya_ebpf::bindings::BPF_SK_STORAGE_GET_F_CREATE),
        )
    };
    !slot.is_null()
}

/// Original destination of a redirected connection from the app's SYN
/// until its proxy end is established, keyed by its tuple as seen from the
/// app (client) side: the handshake's only link between the two sockets.
/// The proxy's end takes the record into its own storage; a connect that
/// fails leaves its record to the LRU, as conntrack leaves an unanswered
/// SYN's entry to its timeout.
#[map]
pub(crate) static RDR_ORIG_TUPLE: LruHashMap<ConnTuple, OrigDst> =
    LruHashMap::pinned(MAX_TRACKED, 0);

// The set maps below hold each configuration slot's entries under keys
// that start with the slot (see `redirect_common::port_key`, `cidr_key`,
// `local_key`).

/// `PORT_*` flags of ports (Istio `-o`, `-q`, `-b`, `-d`).
#[map]
pub(crate) static RDR_PORTS: HashMap<u32, u8> =
    HashMap::pinned(MAX_PORTS * SLOTS_PER_POD, SET_FLAGS);

/// `PORT_*` flags of port ranges (`a:b` in `-o`, `-q`, `-b`, `-d`), as
/// aligned blocks of ports that do not overlap (user space merges the
/// lists' ranges first), so the longest match is the only one.
#[map]
pub(crate) static RDR_PORT_RANGES: LpmTrie<[u8; 4], u8> =
    LpmTrie::pinned(MAX_PORT_BLOCKS * SLOTS_PER_POD, 0);

/// The owner groups (`ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`); any value
/// means "in the set".
#[map]
pub(crate) static RDR_GROUPS: HashMap<u64, u8> =
    HashMap::pinned(MAX_GROUPS as u32 * SLOTS_PER_POD, SET_FLAGS);

/// Excluded destination networks (Istio `-x`); any value means "in the set".
#[map]
pub(crate) static RDR_EXCLUDE: LpmTrie<[u8; 8], u8> = LpmTrie::pinned(MAX_CIDRS * SLOTS_PER_POD, 0);

/// Included destination networks (Istio `-i`, unless it is `*`).
#[map]
pub(crate) static RDR_INCLUDE: LpmTrie<[u8; 8], u8> = LpmTrie::pinned(MAX_CIDRS * SLOTS_PER_POD, 0);

/// The pod's own non-loopback addresses: connects to them leave through
/// `lo`, which Istio's `-o lo` rules test.
#[map]
pub(crate) static RDR_LOCAL: HashMap<u64, u8> =
    HashMap::pinned(MAX_LOCAL_ADDRS * SLOTS_PER_POD, SET_FLAGS);

/// The pod's routing view for redirected connects: each route's source
/// address (network order) under the route's destination, 0 for a
/// destination the kernel refuses TCP to (a subnet broadcast), and whether
/// its device is one `-c` names.
#[map]
pub(crate) static RDR_ROUTE: LpmTrie<[u8; 8], RouteEntry> =
    LpmTrie::pinned(MAX_ROUTES * SLOTS_PER_POD, 0);

/// [`RDR_LOCAL`] for the pod's IPv6 addresses (with IPv6 rules).
#[map]
pub(crate) static RDR_LOCAL6: HashMap<[u32; 5], u8> =
    HashMap::pinned(MAX_LOCAL_ADDRS * SLOTS_PER_POD, SET_FLAGS);

/// [`RDR_EXCLUDE`] for IPv6 networks.
#[map]
pub(crate) static RDR_EXCLUDE6: LpmTrie<[u8; 20], u8> =
    LpmTrie::pinned(MAX_CIDRS6 * SLOTS_PER_POD, 0);

/// [`RDR_INCLUDE`] for IPv6 networks.
#[map]
pub(crate) static RDR_INCLUDE6: LpmTrie<[u8; 20], u8> =
    LpmTrie::pinned(MAX_CIDRS6 * SLOTS_PER_POD, 0);

/// [`RDR_ROUTE`] for IPv6: each route's source as the pod's kernel picked
/// it at install.
#[map]
pub(crate) static RDR_ROUTE6: LpmTrie<[u8; 20], RouteEntry6> =
    LpmTrie::pinned(MAX_ROUTES6 * SLOTS_PER_POD, 0);

/// Where the IPv6 decision's global function leaves the source of a
/// redirect (a global function returns one scalar), for its caller on the
/// same CPU to read at once.
#[map]
pub(crate) static RDR_SOURCE6: PerCpuArray<Ip6> = PerCpuArray::with_max_entries(1, 0);

/// The proxy's inbound listeners, put here by [`redirect_sockops`] when a
/// socket of the cgroup listens on the inbound port (or by user space, for
/// listeners that existed before the install), each in its pod's first
/// free slot (see [`redirect_common::listener_index`]); the kernel empties
/// a slot when its socket closes.
#[map]
pub(crate) static RDR_LISTENER: SockMap = SockMap::pinned(LISTENER_SLOTS, 0);

/// Inbound connections captured, per pod and destination port (see
/// [`redirect_common::in_hits_key`]). When every entry is taken, further
/// ports are only counted in `inbound_captured`.
#[map]
pub(crate) static RDR_IN_HITS: HashMap<u32, u64> = HashMap::pinned(MAX_IN_HITS, SET_FLAGS);

/// Inbound connections [`crate::sk_lookup`] left alone because they arrived
/// on an interface `-c` names, under [`redirect_common::in_bypass_key`],
/// until [`crate::sockops`] sees them accepted: the interface is known at
/// the SYN only, and such a connection must not read as the proxy's end
/// of a capture.
#[map]
pub(crate) static RDR_IN_BYPASS: LruHashMap<[u32; 6], u8> = LruHashMap::pinned(MAX_IN_BYPASS, 0);

/// The decision's view of the set maps above: one slot's entries.
pub(crate) struct Maps {
    pub(crate) slot: u32,
}

impl Maps {
    #[inline(always)]
    fn ports(&self, port: u16) -> u8 {
        // SAFETY: the value is copied out at once, before any update can free it.
        unsafe { RDR_PORTS.get(port_key(self.slot, port)) }
            .copied()
            .unwrap_or(0)
    }

    #[inline(always)]
    fn ranges(&self, port: u16) -> u8 {
        RDR_PORT_RANGES
            .get(Key::new(
                PORT_RANGE_SLOT_BITS + 16,
                port_range_key(self.slot, port),
            ))
            .copied()
            .unwrap_or(0)
    }

    #[inline(always)]
    fn group(&self, gid: u32) -> bool {
        // SAFETY: only presence is used.
        unsafe { RDR_GROUPS.get(slot_key(self.slot, gid)) }.is_some()
    }

    /// [`redirect_common::owner_match`], run by [`redirect_owner_match`].
    #[inline(always)]
    fn owners(&self, facts: OwnerFacts) -> OwnerMatch {
        let (owner, flags) = facts.pack(self.slot);
        OwnerMatch::from_u64(redirect_owner_match(owner, flags))
    }
}

/// The owner rules of the proxy's UIDs and GIDs
/// ([`redirect_common::owner_match`]: per UID and GID
/// `-o lo ... -j ISTIO_IN_REDIRECT`, `-o lo ! --uid-owner -j RETURN`,
/// `--uid-owner -j RETURN`) as a BPF global function (kernel 5.6): its
/// loops over the owner lists are verified once per program, not once for
/// every path of the decision that reaches them (which was a third of an
/// install's verification). Scalars in ([`OwnerFacts::pack`], with the
/// slot in force), the [`OwnerMatch`] out.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn redirect_owner_match(owner: u64, flags: u64) -> u64 {
    let (facts, slot) = OwnerFacts::unpack(owner, flags);
    match RDR_CONFIG.get(slot) {
        Some(cfg) => owner_match(cfg, facts) as u64,
        None => OwnerMatch::None as u64,
    }
}

/// `-d NS` for each nameserver of the pod's resolv.conf (Istio's
/// `ISTIO_OUTPUT_DNS` rules, [`Addr::is_nameserver`]) as a global
/// function, for the reason [`redirect_owner_match`] is one: the slot in
/// force << 32 | the IPv4 address in, 1 (a nameserver) or 0 out.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn redirect_nameserver4(slot_and_ip: u64) -> u64 {
    RDR_CONFIG
        .get((slot_and_ip >> 32) as u32)
        .is_some_and(|cfg| (slot_and_ip as u32).is_nameserver(cfg)) as u64
}

/// [`redirect_nameserver4`] for IPv6: the slot, then the address's halves
/// ([`Ip6::halves`]).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn redirect_nameserver6(slot: u64, hi: u64, lo: u64) -> u64 {
    RDR_CONFIG
        .get(slot as u32)
        .is_some_and(|cfg| Ip6::from_halves(hi, lo).is_nameserver(cfg)) as u64
}

/// The chain after the owner rules ([`redirect_common::chain_tail`]: the
/// owner groups, DNS, the loopback CIDR, `-x`, `-i`) as a global function,
/// for the reason [`redirect_owner_match`] is one: its lookups are
/// verified once, not once for every path of the chain's head that reaches
/// them. [`TailFacts::pack`] in, with the slot in force; the
/// [`ChainTail`] out.
///
/// IPv4 only. Kernel 5.10 counts the stack of every frame of a chain of
/// calls, global functions included, against BPF's 512 bytes: the IPv6
/// program's frame, the IPv6 decision's and this function's with its
/// 20-byte CIDR keys come to 512, with the nameserver test below it 544,
/// which 5.10 refuses ("combined stack size of 4 calls"). The IPv6
/// decision runs the tail in line.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn redirect_chain_tail4(head: u64, rest: u64) -> u64 {
    let (facts, slot) = TailFacts::<u32>::unpack(head, rest);
    match RDR_CONFIG.get(slot) {
        Some(cfg) => redirect_common::chain_tail(cfg, facts, &Maps { slot }) as u64,
        None => ChainTail::NotIncluded as u64,
    }
}

/// The `PORT_*` lists of a destination port
/// ([`redirect_common::port_lists`]: its own entry, then the ranges when
/// the configuration has some) as a global function, for the reason
/// [`redirect_owner_match`] is one: each way into the port rules differs
/// from the others in constants the verifier keeps exactly (the socket
/// type's class, what the interface test found), so their lookups were
/// walked once for each of them. The slot << 32 | the [`CFG_PORT_RANGES`]
/// bit << 16 | the port in, the lists out.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn redirect_port_lists(key: u64) -> u64 {
    let maps = Maps {
        slot: (key >> 32) as u32,
    };
    let ranges = key & PORT_LISTS_RANGES != 0;
    u64::from(redirect_common::port_lists::<u32>(
        key as u16, ranges, &maps,
    ))
}

/// The bit of [`redirect_port_lists`]'s argument that asks for the ranges.
const PORT_LISTS_RANGES: u64 = 1 << 16;

impl Maps {
    /// [`redirect_port_lists`] for this slot.
    #[inline(always)]
    fn lists(&self, cfg: &RedirectConfig, port: u16) -> u8 {
        let ranges = if cfg.flags & CFG_PORT_RANGES != 0 {
            PORT_LISTS_RANGES
        } else {
            0
        };
        redirect_port_lists(u64::from(self.slot) << 32 | ranges | u64::from(port)) as u8
    }
}

/// The inbound chain's port rules ([`redirect_common::inbound_port_rules`]:
/// the tunnel port, `-d`, `-b`) as a global function, for the reason
/// [`redirect_owner_match`] is one: `sockops` and `sk_lookup` run them for
/// an IPv4 and an IPv6 source, each path of the source rules with its own
/// copy, which the verifier walked once for each. The slot << 32 | the
/// port in, [`InboundVerdict::port_rule_code`] out.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn redirect_inbound_ports(key: u64) -> u64 {
    let slot = (key >> 32) as u32;
    match RDR_CONFIG.get(slot) {
        Some(cfg) => inbound_port_rules::<u32>(key as u16, cfg, &Maps { slot }).port_rule_code(),
        None => InboundVerdict::Bypass(Counter::InboundNotIncluded).port_rule_code(),
    }
}

impl Maps {
    /// [`redirect_inbound_ports`] for this slot.
    #[inline(always)]
    fn inbound(&self, port: u16) -> InboundVerdict {
        let code = redirect_inbound_ports(u64::from(self.slot) << 32 | u64::from(port));
        InboundVerdict::from_port_rule_code(code)
    }
}

impl Lookups for Maps {
    #[inline(always)]
    fn port_flags(&self, port: u16) -> u8 {
        self.ports(port)
    }

    #[inline(always)]
    fn inbound_ports(&self, _: &RedirectConfig, port: u16) -> InboundVerdict {
        self.inbound(port)
    }

    #[inline(always)]
    fn port_lists(&self, cfg: &RedirectConfig, port: u16) -> u8 {
        self.lists(cfg, port)
    }

    #[inline(always)]
    fn interface_excluded(&self, _: &RedirectConfig, input: &ConnectInput) -> bool {
        let [_, dst, src] = input.pack();
        crate::connect::redirect_interface_excluded4(u64::from(self.slot), dst, src) != 0
    }

    #[inline(always)]
    fn range_flags(&self, port: u16) -> u8 {
        self.ranges(port)
    }

    #[inline(always)]
    fn owner_group(&self, gid: u32) -> bool {
        self.group(gid)
    }

    #[inline(always)]
    fn owner_match(&self, _: &RedirectConfig, facts: OwnerFacts) -> OwnerMatch {
        self.owners(facts)
    }

    #[inline(always)]
    fn nameserver(&self, _: &RedirectConfig, ip: u32) -> bool {
        redirect_nameserver4(u64::from(self.slot) << 32 | u64::from(ip)) != 0
    }

    #[inline(always)]
    fn chain_tail(&self, _: &RedirectConfig, facts: TailFacts) -> ChainTail {
        let (head, rest) = facts.pack(self.slot);
        ChainTail::from_u64(redirect_chain_tail4(head, rest))
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
        unsafe { RDR_LOCAL.get(slot_key(self.slot, ip)) }.is_some()
    }

    #[inline(always)]
    fn route_source(&self, ip: u32) -> Option<u32> {
        self.route(ip).map(|route| route.src)
    }

    #[inline(always)]
    fn route_excluded(&self, ip: u32) -> bool {
        // The flags, or 0 without a route, then the test: `is_some_and`
        // may compile to "found & flags", reading the flags' register
        // on the path that loaded none, which the verifier refuses.
        let flags = self.route(ip).map_or(0, |route| route.flags);
        flags & ROUTE_EXCLUDED_IFACE != 0
    }
}

impl Lookups<Ip6> for Maps {
    #[inline(always)]
    fn port_flags(&self, port: u16) -> u8 {
        self.ports(port)
    }

    #[inline(always)]
    fn inbound_ports(&self, _: &RedirectConfig, port: u16) -> InboundVerdict {
        self.inbound(port)
    }

    #[inline(always)]
    fn port_lists(&self, cfg: &RedirectConfig, port: u16) -> u8 {
        self.lists(cfg, port)
    }

    #[inline(always)]
    fn range_flags(&self, port: u16) -> u8 {
        self.ranges(port)
    }

    #[inline(always)]
    fn owner_group(&self, gid: u32) -> bool {
        self.group(gid)
    }

    #[inline(always)]
    fn owner_match(&self, _: &RedirectConfig, facts: OwnerFacts) -> OwnerMatch {
        self.owners(facts)
    }

    #[inline(always)]
    fn nameserver(&self, _: &RedirectConfig, ip: Ip6) -> bool {
        let [hi, lo] = ip.halves();
        redirect_nameserver6(u64::from(self.slot), hi, lo) != 0
    }

    #[inline(always)]
    fn excluded(&self, ip: Ip6) -> bool {
        RDR_EXCLUDE6
            .get(Key::new(CIDR_SLOT_BITS + 128, cidr6_key(self.slot, ip)))
            .is_some()
    }

    #[inline(always)]
    fn included(&self, ip: Ip6) -> bool {
        RDR_INCLUDE6
            .get(Key::new(CIDR_SLOT_BITS + 128, cidr6_key(self.slot, ip)))
            .is_some()
    }

    #[inline(always)]
    fn pod_address(&self, ip: Ip6) -> bool {
        // SAFETY: only presence is used.
        unsafe { RDR_LOCAL6.get(local6_key(self.slot, ip)) }.is_some()
    }

    #[inline(always)]
    fn route_source(&self, ip: Ip6) -> Option<Ip6> {
        self.route6(ip).map(|route| Ip6(route.src))
    }

    #[inline(always)]
    fn route_excluded(&self, ip: Ip6) -> bool {
        self.route6(ip)
            .is_some_and(|route| route.flags & ROUTE_EXCLUDED_IFACE != 0)
    }
}

impl Maps {
    /// The IPv6 route to `ip` in this slot's routing view.
    #[inline(always)]
    fn route6(&self, ip: Ip6) -> Option<RouteEntry6> {
        RDR_ROUTE6
            .get(Key::new(CIDR_SLOT_BITS + 128, cidr6_key(self.slot, ip)))
            .copied()
    }

    /// The route to `ip` in this slot's routing view.
    #[inline(always)]
    fn route(&self, ip: u32) -> Option<RouteEntry> {
        RDR_ROUTE
            .get(Key::new(CIDR_SLOT_BITS + 32, cidr_key(self.slot, ip)))
            .copied()
    }
}

/// Which cgroup this instance belongs to (user space only; see `InstanceMeta`).
#[map]
pub(crate) static RDR_META: Array<InstanceMeta> = Array::pinned(1, 0);

/// Decisions reported to `redirect run --log` (see [`Event`]); written only
/// when the config's log level asks for them.
#[map]
pub(crate) static RDR_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// Counts one decision of `pod`.
#[inline(always)]
pub(crate) fn count(pod: u32, counter: Counter) {
    count_index(pod, counter as u32);
}

/// Counts under `pod`'s [`Counter`] index `counter` (an out-of-range one
/// counts nothing), through [`redirect_count`].
#[inline(always)]
pub(crate) fn count_index(pod: u32, counter: u32) {
    redirect_count(u64::from(pod) << 32 | u64::from(counter));
}

/// Counts one decision (the pod << 32 | its [`Counter`] index) as a
/// global function: each counter is a constant to the verifier, so the
/// paths that count different ones could not be taken for one another
/// after the count, and an increment in line was walked again for each
/// (20 times on one `sk_lookup` path). Returns 0.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn redirect_count(key: u64) -> u64 {
    let (pod, counter) = ((key >> 32) as u32, key as u32);
    if counter >= COUNTER_COUNT {
        return 0;
    }
    if let Some(slot) = RDR_STATS.get_ptr_mut(counter_index(pod, counter)) {
        // Atomic (a BPF XADD, the result unused): a sockops callback in
        // softirq can interrupt a syscall-context increment on this CPU.
        // SAFETY: a valid, aligned map value that lives as long as the map.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1) };
    }
    0
}
