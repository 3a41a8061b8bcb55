//! The ABI between the eBPF programs and user space: map layouts (keys,
//! values, sizes), the configuration entry, the counters and the events.
//! A change here is a change of [`ABI_VERSION`].

/// How many proxy UIDs (and, separately, GIDs) the config can hold.
pub const MAX_OWNERS: usize = 8;
/// How many owner groups (`ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`) one
/// configuration can hold: Istio's limit. They are a set map keyed by
/// group (see [`slot_key`]), not a loop over the config: a 64-step loop is
/// refused without CAP_PERFMON by kernel 6.12's verifier.
pub const MAX_GROUPS: usize = 64;

/// Version of the map layouts below. A reinstall reuses pinned maps only when
/// the pinned config carries the same version.
pub const ABI_VERSION: u32 = 17;

/// How many ports one configuration can flag (`-o`, `-q`, `-b` and `-d`
/// ports together).
pub const MAX_PORTS: u32 = 1024;
/// Capacity of the per-port inbound capture counters.
pub const MAX_IN_HITS: u32 = 1024;
/// How many aligned port blocks one configuration's port ranges (`a:b` in
/// `-o`, `-q`, `-b`, `-d`) take (a range is at most 30 blocks, so some 34
/// ranges at the worst, more as they usually are). Kernels before 5.11
/// charge an LPM trie at its full size (about 45 bytes an entry).
pub const MAX_PORT_BLOCKS: u32 = 1024;
/// How many CIDRs one configuration's set (`-x`, `-i`) can hold.
pub const MAX_CIDRS: u32 = 16384;
/// How many IPv6 networks one configuration's `-i` (and, separately, `-x`)
/// can hold: fewer than IPv4's, as Istio configurations list few, and
/// kernels before 5.11 charge an LPM trie at its full size (some 60 bytes
/// an entry for these keys) to every instance, IPv6 rules or not. More
/// send auto mode to iptables.
pub const MAX_CIDRS6: u32 = 1024;
/// How many routes one configuration's IPv6 routing view can hold (a pod
/// has a handful).
pub const MAX_ROUTES6: u32 = 256;
/// How many pod addresses one configuration can hold.
pub const MAX_LOCAL_ADDRS: u32 = 256;
/// How many routes (and fixed broadcast and multicast entries) one
/// configuration's routing view can hold.
pub const MAX_ROUTES: u32 = 1024;
/// How many interfaces `-c` can name (Istio has no limit; more send auto
/// mode to iptables).
pub const MAX_EXCLUDE_IFACES: usize = 8;
/// How many interfaces `-k` can name (Istio has no limit; more send auto
/// mode to iptables).
pub const MAX_VIRT_IFACES: usize = 8;
/// How many nameservers of each family (`--redirect-dns`: resolv.conf's)
/// the config can hold. glibc reads three; more send auto mode to iptables.
pub const MAX_DNS_SERVERS: usize = 8;
/// Istio's DNS proxy port (`istio-iptables` has it fixed): where captured
/// DNS goes.
pub const DNS_PROXY_PORT: u16 = 15053;
/// How many listeners on the inbound port are kept (an `SO_REUSEPORT`
/// group, or listeners on several addresses): any live one receives.
pub const LISTENER_SLOTS: u32 = 16;

/// Configurations each pod holds at once: the active one and the one an
/// upgrade writes beside it. The config array has one entry per slot, and
/// every set map's key starts with its slot, so each set map holds
/// `SLOTS_PER_POD` times its per-configuration capacity for each pod. An
/// upgrade fills the pod's inactive slot and then switches the pod's
/// `RDR_ACTIVE` entry to it in one 4-byte write: a decision reads either
/// the whole old configuration or the whole new one, never a mix.
pub const SLOTS_PER_POD: u32 = 2;

/// Most pods one program set can serve. A per-pod instance serves one,
/// [`INSTANCE_POD`]; the maps are sized by user space for the pods they
/// serve. A pod's index must fit the 12 bits the decision's packed input
/// carries it in (see `ConnectInput::pack`), and its slots the 16 bits
/// the set keys give them.
pub const MAX_PODS: u32 = 4096;

/// The pod of a per-pod instance: the only one its maps hold.
pub const INSTANCE_POD: u32 = 0;

/// Slot `which` (0 or 1) of `pod`'s two configuration slots.
#[inline(always)]
pub const fn pod_slot(pod: u32, which: u32) -> u32 {
    pod * SLOTS_PER_POD + (which & 1)
}

/// Whether `slot` (a value of `RDR_ACTIVE`) is one of `pod`'s: a decision
/// never reads another pod's configuration, whatever the map holds.
#[inline(always)]
pub const fn slot_of_pod(slot: u32, pod: u32) -> bool {
    slot / SLOTS_PER_POD == pod
}

/// The other of a pod's two slots: the one an upgrade writes.
#[inline(always)]
pub const fn spare_slot(active: u32) -> u32 {
    active ^ 1
}

/// Index of `counter` of `pod` in the per-CPU counter array.
#[inline(always)]
pub const fn counter_index(pod: u32, counter: u32) -> u32 {
    pod * COUNTER_COUNT + counter
}

/// Index of `pod`'s listener slot `slot` in the inbound listener map.
#[inline(always)]
pub const fn listener_index(pod: u32, slot: u32) -> u32 {
    pod * LISTENER_SLOTS + slot
}

/// Key of the per-port inbound capture counters: the pod, then the port.
#[inline(always)]
pub const fn in_hits_key(pod: u32, port: u16) -> u32 {
    (pod << 16) | port as u32
}

/// Key of the port-flags map: the configuration slot, then the port.
#[inline(always)]
pub const fn port_key(slot: u32, port: u16) -> u32 {
    (slot << 16) | port as u32
}

/// Key of a set map of 32-bit values (the pod's addresses, the owner
/// groups): the slot in the high half, the value in the low half.
#[inline(always)]
pub const fn slot_key(slot: u32, value: u32) -> u64 {
    ((slot as u64) << 32) | value as u64
}

/// Key of `RDR_IN_BYPASS`: the pod, an inbound connection's remote address (an
/// IPv6 one, or an IPv4 one mapped, as in [`OrigDst::ip`]), then its
/// remote port and local port (host order) in one word.
#[inline(always)]
pub const fn in_bypass_key(
    pod: u32,
    remote_ip: [u32; 4],
    remote_port: u16,
    local_port: u16,
) -> [u32; 6] {
    [
        pod,
        remote_ip[0],
        remote_ip[1],
        remote_ip[2],
        remote_ip[3],
        ((remote_port as u32) << 16) | local_port as u32,
    ]
}

/// How many connections from excluded interfaces (`-c`) awaiting their
/// handshake `RDR_IN_BYPASS` remembers (an LRU: a SYN never answered
/// leaves an entry the next ones push out).
pub const MAX_IN_BYPASS: u32 = 1024;

/// Bits of a port-range (LPM trie) key taken by the slot before the port.
pub const PORT_RANGE_SLOT_BITS: u32 = 16;

/// Data of a port-range key: the slot (16 bits, big-endian), then the port
/// big-endian (so that a block of 2^n ports aligned on 2^n is one prefix);
/// the key's prefix length is [`PORT_RANGE_SLOT_BITS`] plus the block's.
#[inline(always)]
pub const fn port_range_key(slot: u32, port: u16) -> [u8; 4] {
    let s = (slot as u16).to_be_bytes();
    let b = port.to_be_bytes();
    [s[0], s[1], b[0], b[1]]
}

/// Bits of a CIDR-set key taken by the slot before the address.
pub const CIDR_SLOT_BITS: u32 = 16;

/// Data of a CIDR-set (LPM trie) key: the slot (16 bits, big-endian), then
/// the address in network order; the key's prefix length is
/// [`CIDR_SLOT_BITS`] plus the CIDR's, so a slot's entries never match
/// another slot's lookups.
#[inline(always)]
pub const fn cidr_key(slot: u32, ip: u32) -> [u8; 8] {
    let s = (slot as u16).to_be_bytes();
    let b = ip.to_ne_bytes();
    [s[0], s[1], b[0], b[1], b[2], b[3], 0, 0]
}

/// The slot a CIDR-set, route or port-range key's data starts with.
#[inline(always)]
pub const fn key_slot(data: &[u8]) -> u32 {
    u16::from_be_bytes([data[0], data[1]]) as u32
}

/// How many entries the LRU original-destination map needs so that
/// `wanted` open connections always keep their records. The kernel's LRU
/// keeps up to 128 free entries in each possible CPU's local free list
/// (`LOCAL_FREE_TARGET`), where no other CPU can take them, and starts
/// evicting once the shared free list runs short: without this headroom an
/// overflow evicts records of live connections while the map is not full.
pub const fn lru_entries(wanted: u32, possible_cpus: u32) -> u32 {
    const LOCAL_FREE_TARGET: u32 = 128;
    wanted.saturating_add(possible_cpus.saturating_mul(LOCAL_FREE_TARGET))
}

/// `SOCK_STREAM`, as in `bpf_sock_addr.type`.
pub const SOCK_STREAM: u32 = 1;
/// `SOCK_DGRAM`, as in `bpf_sock_addr.type`.
pub const SOCK_DGRAM: u32 = 2;

/// The capture configuration, one entry in the `RDR_CONFIG` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RedirectConfig {
    /// [`ABI_VERSION`] of the loader that wrote this entry; 0 = not configured.
    pub abi_version: u32,
    /// Port the proxy listens on for outbound traffic (Istio `-p`, 15001).
    pub proxy_port: u16,
    /// Which decisions are reported as [`Event`]s: [`LOG_DEBUG`] redirects,
    /// [`LOG_TRACE`] every decision, anything lower none.
    pub log_level: u8,
    pub _pad: u8,
    /// Destinations inside this network are never captured (Istio's
    /// `-d 127.0.0.1/32 -j RETURN`). Network byte order.
    pub loopback_addr: u32,
    /// Netmask of `loopback_addr`, network byte order.
    pub loopback_mask: u32,
    /// Number of valid entries in `proxy_uids`.
    pub uid_count: u32,
    /// Number of valid entries in `proxy_gids`.
    pub gid_count: u32,
    /// Sockets of these UIDs are the proxy's own and are never captured.
    pub proxy_uids: [u32; MAX_OWNERS],
    /// Sockets of these GIDs are the proxy's own and are never captured.
    pub proxy_gids: [u32; MAX_OWNERS],
    /// Port of the proxy's inbound listener (Istio `-z`, 15006): where the
    /// proxy's own calls to its pod's address go (`ISTIO_IN_REDIRECT`).
    pub inbound_port: u16,
    /// Inbound tunnel port (Istio `-e`, 15008), never redirected.
    pub tunnel_port: u16,
    /// `CFG_*` bits.
    pub flags: u32,
    /// Number of owner groups (in the group set map).
    pub group_count: u32,
    /// The source the kernel picks for a socket bound to `lo`
    /// (`SO_BINDTODEVICE`) sending to a non-loopback address: the pod's
    /// first address (`lo`'s own are host-scoped). Network order; 0: none.
    pub lo_source: u32,
    /// Where captured DNS goes (`127.0.0.1:<dns_port>`, Istio's 15053),
    /// with [`CFG_DNS`].
    pub dns_port: u16,
    /// Number of valid entries in `dns_servers`.
    pub dns_server_count: u16,
    /// The resolv.conf nameservers whose port 53 is captured (without
    /// [`CFG_DNS_ALL`]). Network order.
    pub dns_servers: [u32; MAX_DNS_SERVERS],
    /// Number of valid entries in `exclude_ifindex`.
    pub exclude_iface_count: u32,
    /// `-c`: the interfaces (their indexes in the pod's network namespace
    /// at install) through which nothing is captured, with
    /// [`CFG_EXCLUDE_IFACES`].
    pub exclude_ifindex: [u32; MAX_EXCLUDE_IFACES],
    /// `lo_source` for IPv6 destinations (with [`CFG_IPV6`]): the source
    /// the pod's kernel picked at install for a socket bound to `lo`
    /// (`::`: none).
    pub lo_source6: [u32; 4],
    /// Number of valid entries in `dns_servers6`.
    pub dns_server6_count: u32,
    /// resolv.conf's IPv6 nameservers whose port 53 is captured (with
    /// [`CFG_IPV6`], without [`CFG_DNS_ALL`]), as [`crate::Ip6`] words.
    pub dns_servers6: [[u32; 4]; MAX_DNS_SERVERS],
    /// Number of valid entries in `virt_ifaces`.
    pub virt_iface_count: u32,
    /// `-k`: the KubeVirt interfaces whose inbound TCP is sent to the
    /// proxy port as outbound, with [`CFG_VIRT_IFACES`].
    pub virt_ifaces: [VirtIface; MAX_VIRT_IFACES],
}

/// One `-k` interface as REDIRECT in `PREROUTING` sees it: where it sends a
/// connection that arrives there (the interface's first address of the
/// connection's family, read at install).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct VirtIface {
    /// The interface's index in the pod's network namespace at install.
    pub ifindex: u32,
    /// Its first IPv4 address (network order); 0: none, and REDIRECT drops
    /// what arrives.
    pub addr4: u32,
    /// Its first usable IPv6 address ([`crate::Ip6`] words; `::`: none).
    pub addr6: [u32; 4],
    /// Its first usable link-local IPv6 address, for link-local
    /// destinations (`::`: none).
    pub addr6_link: [u32; 4],
}

/// `-i '*'`: every destination not excluded is captured.
pub const CFG_INCLUDE_ALL: u32 = 1;
/// `-i` lists a loopback network: local traffic of other owners is not
/// returned early (Istio drops those rules).
pub const CFG_INCLUDE_LOOPBACK: u32 = 2;
/// The owner groups are the only groups captured (else: the groups never captured).
pub const CFG_GROUPS_ONLY: u32 = 4;
/// Inbound capture is on (`-b` is not empty).
pub const CFG_INBOUND: u32 = 8;
/// `-b '*'`: every inbound port not excluded (`-d`) is captured; else only
/// the ports flagged [`PORT_IN_INCLUDE`].
pub const CFG_INBOUND_ALL: u32 = 16;

/// `--redirect-dns`: DNS to the nameservers (or, with [`CFG_DNS_ALL`],
/// anywhere) goes to the proxy's DNS port, and the `-o lo` owner rules
/// take Istio's DNS forms.
pub const CFG_DNS: u32 = 32;
/// `--capture-all-dns`: port 53 of every destination.
pub const CFG_DNS_ALL: u32 = 64;

/// Some `-o`, `-q`, `-b` or `-d` entry is a range (`a:b`): the port-range
/// map is consulted too.
pub const CFG_PORT_RANGES: u32 = 128;

/// `--profile legacy`: Istio's first rule table decides outbound
/// connects ([`crate::decide_connect`]) and `status` mirrors its rules.
pub const CFG_LEGACY: u32 = 256;

/// `-c` names interfaces: `OUTPUT -o X -j RETURN` and `PREROUTING -i X -j
/// RETURN` come before every other rule.
pub const CFG_EXCLUDE_IFACES: u32 = 512;

/// IPv6 rules (`--ipv6`, `--dual-stack`, or a pod with an IPv6 address):
/// IPv6 connections are decided by Istio's IPv6 table (`::1/128`, `::6`,
/// the IPv6 CIDRs) and sent to `[::1]:<port>`. Without it they are left
/// alone, as Istio leaves them without ip6tables rules.
pub const CFG_IPV6: u32 = 1024;

/// `-k` names interfaces: `PREROUTING -i X -j ISTIO_REDIRECT` comes first,
/// so TCP arriving there goes to the proxy port, as outbound.
pub const CFG_VIRT_IFACES: u32 = 2048;

/// One entry of the routing view (`RDR_ROUTE`): connects to its prefix
/// leave from `src` (network order; 0: the kernel refuses them), through
/// an interface `-c` excludes when `flags` has [`ROUTE_EXCLUDED_IFACE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RouteEntry {
    pub src: u32,
    pub flags: u32,
}

/// The route's device is one `-c` names.
pub const ROUTE_EXCLUDED_IFACE: u32 = 1;

/// One entry of the IPv6 routing view (`RDR_ROUTE6`): as [`RouteEntry`],
/// the source an IPv6 address (`::`: the kernel refuses these connects).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RouteEntry6 {
    pub src: [u32; 4],
    pub flags: u32,
}

/// Data of an IPv6 CIDR-set or route (LPM trie) key: the slot (16 bits,
/// big-endian), the address's 16 bytes, then padding; the key's prefix
/// length is [`CIDR_SLOT_BITS`] plus the network's.
#[inline(always)]
pub const fn cidr6_key(slot: u32, ip: crate::Ip6) -> [u8; 20] {
    let s = (slot as u16).to_be_bytes();
    let o = ip.octets();
    [
        s[0], s[1], o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8], o[9], o[10], o[11],
        o[12], o[13], o[14], o[15], 0, 0,
    ]
}

/// Key of the IPv6 pod-address set: the slot, then the address's words.
#[inline(always)]
pub const fn local6_key(slot: u32, ip: crate::Ip6) -> [u32; 5] {
    [slot, ip.0[0], ip.0[1], ip.0[2], ip.0[3]]
}

/// `-o`: an outbound port never captured.
pub const PORT_EXCLUDE: u8 = 1;
/// `-q`: an outbound port always captured.
pub const PORT_INCLUDE: u8 = 2;
/// `-b` (a list): an inbound port captured.
pub const PORT_IN_INCLUDE: u8 = 4;
/// `-d`: an inbound port never captured (with `-b '*'`).
pub const PORT_IN_EXCLUDE: u8 = 8;

/// 127.0.0.6 in network byte order: the source of the proxy's inbound
/// passthrough connections (never captured).
pub const PASSTHROUGH_SRC: u32 = u32::from_ne_bytes([127, 0, 0, 6]);

/// Where a redirected connection was going: in the app's socket storage
/// from its connect, under the connection's tuple from its SYN until the
/// proxy's end is established, then in the proxy socket's storage. In a socket's storage with another [`OrigDst::kind`],
/// the mark of an accepted socket. Each copy lives as long as its socket,
/// as conntrack's entry lives as long as the connection; no close has to
/// be watched.
///
/// The programs copy it field by field (`maps::store`):
/// a plain copy of one that is mostly zeros compiles to a `memset` loop,
/// which the verifier refuses without CAP_PERFMON.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct OrigDst {
    /// Original destination address: an IPv6 one, or an IPv4 one mapped
    /// (`::ffff:a.b.c.d`), four network-order words.
    pub ip: [u32; 4],
    /// Original destination port, host byte order.
    pub port: u16,
    /// The port the connection was sent to on 127.0.0.1 (REDIRECT's
    /// `--to-ports`: the proxy, inbound or DNS port); 0 in an accepted mark.
    pub via: u16,
    /// [`OrigDst::REDIRECTED`], [`OrigDst::PROXY`], [`OrigDst::ACCEPTED`]
    /// or [`OrigDst::INBOUND`].
    pub kind: u16,
    pub _pad: u16,
}

impl OrigDst {
    /// `kind` of the record in the app's redirected socket.
    pub const REDIRECTED: u16 = 0;
    /// `kind` of the storage of a socket accepted in the cgroup that is not
    /// the proxy's end of a redirected connection: conntrack answers
    /// `SO_ORIGINAL_DST` on it with its own local address (the connection's
    /// original destination), where a connecting socket gets its peer.
    pub const ACCEPTED: u16 = 1;
    /// `kind` of an accepted socket that came through the inbound capture
    /// (the proxy's end): like [`OrigDst::ACCEPTED`], and its local port
    /// reads as the inbound port, where REDIRECT would have sent it.
    pub const INBOUND: u16 = 2;
    /// `kind` of the record in the proxy's end of a redirected connection,
    /// moved there from the tuple map when that end was established.
    pub const PROXY: u16 = 3;

    /// A fresh record of a connect to `ip:port` (see [`OrigDst::ip`];
    /// host-order port) sent to `127.0.0.1:via` (`[::1]:via`).
    pub const fn new(ip: [u32; 4], port: u16, via: u16) -> Self {
        Self {
            ip,
            port,
            via,
            kind: Self::REDIRECTED,
            _pad: 0,
        }
    }

    /// This record as the proxy's end keeps it.
    pub const fn for_proxy(self) -> Self {
        Self {
            kind: Self::PROXY,
            ..self
        }
    }

    /// The mark of an accepted socket (`kind`: [`OrigDst::ACCEPTED`] or
    /// [`OrigDst::INBOUND`]).
    pub const fn accepted(kind: u16) -> Self {
        Self {
            ip: [0; 4],
            port: 0,
            via: 0,
            kind,
            _pad: 0,
        }
    }
}

/// A TCP connection as seen from its client (the app's socket): key of the
/// original-destination-by-tuple map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ConnTuple {
    /// Client (app) address (an IPv4 one mapped, as in [`OrigDst::ip`]).
    pub client_ip: [u32; 4],
    /// Server (proxy) address, likewise.
    pub server_ip: [u32; 4],
    /// Client port, host byte order.
    pub client_port: u16,
    /// Server port, host byte order.
    pub server_port: u16,
    /// The pod whose network namespace holds the connection: two pods can
    /// hold the same tuple at once (both from 127.0.0.1, say).
    pub pod: u32,
}

/// Indices of the per-CPU decision counters (`RDR_STATS`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect() rewritten to the proxy port.
    Redirected = 0,
    /// The caller's UID is a proxy UID.
    BypassUid = 1,
    /// The caller's GID is a proxy GID.
    BypassGid = 2,
    /// The destination is in the loopback bypass network.
    BypassLoopback = 3,
    /// Not a TCP (SOCK_STREAM) socket.
    NotTcp = 4,
    /// The redirect record could not be stored; the connect was left alone.
    RecordFailed = 5,
    /// sockops copied a redirected socket's record to the tuple map, as its
    /// SYN was about to leave.
    TupleRecorded = 6,
    /// A tuple record moved into the storage of the proxy's end of its
    /// connection, once that end was established.
    TupleReleased = 7,
    /// `getsockopt(SO_ORIGINAL_DST)` answered from a record.
    OrigDstAnswered = 8,
    /// `getsockopt(SO_ORIGINAL_DST)` on a socket without a record (left to the kernel).
    OrigDstMissed = 9,
    /// `getpeername()` of a redirected app socket answered with the original destination.
    PeernameRestored = 10,
    /// An IPv6 destination (not IPv4-mapped) without IPv6 rules: not
    /// captured, as Istio captures none without its ip6tables rules.
    NotIpv4 = 11,
    /// The proxy's call to its own pod's address, sent to the inbound port.
    Hairpin = 12,
    /// `-o`: the destination port is never captured.
    BypassPort = 13,
    /// The inbound passthrough source (127.0.0.6) on loopback.
    BypassPassthrough = 14,
    /// Local (loopback-routed) traffic of a process that is not the proxy.
    BypassLocal = 15,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`: the caller's group is not captured.
    BypassGroup = 16,
    /// `-x`: the destination is in an excluded CIDR.
    BypassCidr = 17,
    /// The destination is in no included CIDR (`-i`) and no included port (`-q`).
    NotIncluded = 18,
    /// An inbound connection handed to the proxy's inbound listener.
    InboundCaptured = 19,
    /// An inbound connection to capture while no inbound listener exists:
    /// refused, as REDIRECT to a port nobody listens on refuses it.
    InboundRefused = 20,
    /// A connection from the pod to itself: local traffic does not
    /// traverse `PREROUTING` (its outbound rules decided it).
    InboundLocal = 21,
    /// `--dport 15008 -j RETURN`: the tunnel port is not captured.
    InboundBypassTunnel = 22,
    /// `-d`: the port is never captured.
    InboundBypassPort = 23,
    /// The port is not in the `-b` list.
    InboundNotIncluded = 24,
    /// A listener on the inbound port was registered for inbound capture.
    ListenerRegistered = 25,
    /// `getsockopt(SO_ORIGINAL_DST)` on an accepted socket (an inbound
    /// capture or any connection the pod accepted without a redirect),
    /// answered with its own local address, as conntrack answers it.
    OrigDstInbound = 26,
    /// A connect the rules would redirect but the kernel refuses before nat
    /// `OUTPUT` sees a packet (no route, a broadcast or multicast
    /// destination, a loopback source to the network): left to the kernel,
    /// which fails it as it does under iptables.
    KernelRefuses = 27,
    /// A redirected connect could not keep the source address the kernel
    /// would have chosen (`bpf_bind` failed): it leaves from 127.0.0.1.
    SourceNotKept = 28,
    /// `getsockopt(SO_ORIGINAL_DST)` on a connecting socket that was not
    /// redirected, answered with its peer, as conntrack answers it.
    OrigDstUnredirected = 29,
    /// `getsockname()` of the proxy's end of an inbound capture answered
    /// with the inbound port, as after REDIRECT.
    SocknameRedirected = 30,
    /// DNS (UDP or TCP port 53) sent to the proxy's DNS port
    /// (`ISTIO_OUTPUT_DNS`).
    DnsRedirected = 31,
    /// A datagram from the proxy's DNS port to a socket whose DNS was
    /// captured, shown as coming from the nameserver it was sent to (what
    /// conntrack's reverse NAT does).
    DnsReplyRestored = 32,
    /// `--profile legacy`: a connect leaving through `lo` to anything but
    /// 127.0.0.1, sent to the proxy port whoever makes it
    /// (`istio/redirect-implicit-loopback`).
    LoopbackRedirected = 33,
    /// `-c`: the connection leaves through an excluded interface
    /// (`OUTPUT -o X -j RETURN`).
    BypassInterface = 34,
    /// `-c`: the connection arrived on an excluded interface
    /// (`PREROUTING -i X -j RETURN`).
    InboundBypassInterface = 35,
    /// An IPv6 link-local destination: its connect names the interface
    /// (the scope), which the connect hooks cannot see, so it is left to
    /// the kernel (which refuses it without a scope; ip6tables captures
    /// it with one).
    LinkLocal = 36,
    /// `-k`: a TCP connection arriving on a KubeVirt interface sent to the
    /// proxy port (`PREROUTING -i X -j ISTIO_REDIRECT`).
    VirtRedirected = 37,
    /// `-k`: a TCP connection arriving on a KubeVirt interface without an
    /// address of its family, dropped as REDIRECT drops it.
    VirtDropped = 38,
}

impl Counter {
    pub const ALL: [Self; COUNTER_COUNT as usize] = [
        Self::Redirected,
        Self::BypassUid,
        Self::BypassGid,
        Self::BypassLoopback,
        Self::NotTcp,
        Self::RecordFailed,
        Self::TupleRecorded,
        Self::TupleReleased,
        Self::OrigDstAnswered,
        Self::OrigDstMissed,
        Self::PeernameRestored,
        Self::NotIpv4,
        Self::Hairpin,
        Self::BypassPort,
        Self::BypassPassthrough,
        Self::BypassLocal,
        Self::BypassGroup,
        Self::BypassCidr,
        Self::NotIncluded,
        Self::InboundCaptured,
        Self::InboundRefused,
        Self::InboundLocal,
        Self::InboundBypassTunnel,
        Self::InboundBypassPort,
        Self::InboundNotIncluded,
        Self::ListenerRegistered,
        Self::OrigDstInbound,
        Self::KernelRefuses,
        Self::SourceNotKept,
        Self::OrigDstUnredirected,
        Self::SocknameRedirected,
        Self::DnsRedirected,
        Self::DnsReplyRestored,
        Self::LoopbackRedirected,
        Self::BypassInterface,
        Self::InboundBypassInterface,
        Self::LinkLocal,
        Self::VirtRedirected,
        Self::VirtDropped,
    ];

    /// Stable name used in `redirect status` and its JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Redirected => "redirected",
            Self::BypassUid => "bypass_uid",
            Self::BypassGid => "bypass_gid",
            Self::BypassLoopback => "bypass_loopback",
            Self::NotTcp => "not_tcp",
            Self::RecordFailed => "record_failed",
            Self::TupleRecorded => "tuple_recorded",
            Self::TupleReleased => "tuple_released",
            Self::OrigDstAnswered => "orig_dst_answered",
            Self::OrigDstMissed => "orig_dst_missed",
            Self::PeernameRestored => "peername_restored",
            Self::NotIpv4 => "not_ipv4",
            Self::Hairpin => "hairpin",
            Self::BypassPort => "bypass_port",
            Self::BypassPassthrough => "bypass_passthrough",
            Self::BypassLocal => "bypass_local",
            Self::BypassGroup => "bypass_group",
            Self::BypassCidr => "bypass_cidr",
            Self::NotIncluded => "not_included",
            Self::InboundCaptured => "inbound_captured",
            Self::InboundRefused => "inbound_refused",
            Self::InboundLocal => "inbound_local",
            Self::InboundBypassTunnel => "inbound_bypass_tunnel",
            Self::InboundBypassPort => "inbound_bypass_port",
            Self::InboundNotIncluded => "inbound_not_included",
            Self::ListenerRegistered => "listener_registered",
            Self::OrigDstInbound => "orig_dst_inbound",
            Self::KernelRefuses => "kernel_refuses",
            Self::SourceNotKept => "source_not_kept",
            Self::OrigDstUnredirected => "orig_dst_unredirected",
            Self::SocknameRedirected => "sockname_redirected",
            Self::DnsRedirected => "dns_redirected",
            Self::DnsReplyRestored => "dns_reply_restored",
            Self::LoopbackRedirected => "loopback_redirected",
            Self::BypassInterface => "bypass_interface",
            Self::InboundBypassInterface => "inbound_bypass_interface",
            Self::LinkLocal => "link_local",
            Self::VirtRedirected => "virt_redirected",
            Self::VirtDropped => "virt_dropped",
        }
    }
}

/// Number of entries in the counter array.
pub const COUNTER_COUNT: u32 = 39;

/// 127.0.0.1 in network byte order: where redirected connects are sent.
pub const LOCALHOST: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// `log_level` at which redirects are reported.
pub const LOG_DEBUG: u8 = 4;
/// `log_level` at which every decision is reported.
pub const LOG_TRACE: u8 = 5;

/// One decision of the connect programs, reported through the `RDR_EVENTS`
/// ring buffer when the config's log level asks for it. A fixed-size record
/// (not a formatted log line): every verifier bounds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Event {
    /// The [`Counter`] the decision counted in.
    pub counter: u32,
    pub uid: u32,
    pub gid: u32,
    /// Destination address (an IPv4 one mapped, as in [`OrigDst::ip`]).
    pub dst_ip: [u32; 4],
    /// Destination port, host byte order.
    pub dst_port: u16,
    /// Proxy port it was sent to (redirects only).
    pub proxy_port: u16,
}

/// Longest cgroup path (relative to the cgroup2 mount) an instance records.
pub const META_PATH_MAX: usize = 1024;

/// Longest name a node set's pod is added under: an instance name's
/// longest (the CNI plugin's are `cni-` and a 64-hex-digit container id).
pub const POD_NAME_MAX: usize = 200;

/// How many of a pod's addresses its record keeps ([`PodMeta::addrs`]):
/// an IPv4 and an IPv6 one, and one more. A pod with more is found by
/// walking `RDR_POD_ADDRS` instead.
pub const POD_ADDRS_KEPT: usize = 3;

/// [`PodMeta::addrs_kept`]: `addrs` holds every address of the pod's in
/// `RDR_POD_ADDRS`, the first `addr_count`.
pub const POD_ADDRS_LISTED: u32 = 1;

/// Size of a [`PodMeta`], as every build since node sets began pins it:
/// the addresses took bytes the name never used, so sets loaded by an
/// older build are read and written by this one, and the other way round.
pub const POD_META_SIZE: usize = 288;

/// A free pod index of a node set: never used, or its pod removed whole.
pub const POD_FREE: u32 = 0;
/// A pod index an add has claimed and not finished: under the install
/// lock, an add in progress; seen by anyone else who holds the lock, one
/// that was killed, whose entries must be cleared before the index is used.
/// With a zero `netns_cookie` (no namespace has cookie 0), a removed pod's
/// index: the removal took the pod out of every decision and left its
/// entries for gc, or an add that needs the index, to clear (builds before
/// this one clear it as a killed add's).
pub const POD_CLAIMED: u32 = 1;
/// A pod index holding a pod.
pub const POD_ACTIVE: u32 = 2;

/// A node set's record of one of its pods, one entry of the pinned
/// `RDR_POD_META` array per pod index. Only user space reads or writes it.
#[repr(C)]
#[derive(Clone, Copy)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PodMeta {
    /// The pod's network namespace cookie (`SO_NETNS_COOKIE`), the key
    /// the programs find the pod by.
    pub netns_cookie: u64,
    /// Inode number of the pod's network namespace (for `status` and gc).
    pub netns_ino: u64,
    /// Seconds since the Unix epoch of the pod's last add.
    pub added_at: u64,
    /// Number of valid bytes in `name`.
    pub name_len: u32,
    /// `POD_FREE`, `POD_CLAIMED` or `POD_ACTIVE`.
    pub state: u32,
    /// The name the pod was added under.
    pub name: [u8; POD_NAME_MAX],
    /// The pod's addresses, as `RDR_POD_ADDRS` keys them (an IPv4 one
    /// mapped), when [`Self::addrs_kept`] says they are all here: a
    /// removal deletes them without walking that map.
    pub addrs: [[u32; 4]; POD_ADDRS_KEPT],
    /// Number of valid entries in `addrs`.
    pub addr_count: u32,
    /// [`POD_ADDRS_LISTED`], or 0: not listed (a record of a build before
    /// this field, a pod with more than [`POD_ADDRS_KEPT`] addresses, or
    /// an add in progress changing them), so found by walking
    /// `RDR_POD_ADDRS` for entries of the pod's index.
    pub addrs_kept: u32,
}

const _: () = assert!(core::mem::size_of::<PodMeta>() == POD_META_SIZE);

/// What `redirect status` needs to know about an installed instance and that
/// must survive the loader's exit: one entry in the pinned `RDR_META` array.
/// Only user space reads or writes it.
#[repr(C)]
#[derive(Clone, Copy)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct InstanceMeta {
    /// Inode number of the cgroup directory (the kernel's cgroup id).
    pub cgroup_id: u64,
    /// Seconds since the Unix epoch of the last install.
    pub installed_at: u64,
    /// Number of valid bytes in `cgroup_path`.
    pub cgroup_path_len: u32,
    /// Inode number of the network namespace the inbound hook is attached
    /// to (0: none).
    pub netns_ino: u32,
    /// The `--max-connections` the instance was installed with (its
    /// original-destination map is larger: see [`lru_entries`]).
    pub max_connections: u32,
    pub _pad: u32,
    /// Absolute path of the cgroup directory, UTF-8.
    pub cgroup_path: [u8; META_PATH_MAX],
}

/// The maps' names: the programs' statics and the pins' file names under
/// the instance directory (user space opens them by these).
pub mod map_names {
    pub const CONFIG: &str = "RDR_CONFIG";
    pub const ACTIVE: &str = "RDR_ACTIVE";
    pub const STATS: &str = "RDR_STATS";
    pub const SOCK: &str = "RDR_SOCK";
    pub const ORIG_TUPLE: &str = "RDR_ORIG_TUPLE";
    pub const META: &str = "RDR_META";
    pub const PORTS: &str = "RDR_PORTS";
    pub const EXCLUDE: &str = "RDR_EXCLUDE";
    pub const INCLUDE: &str = "RDR_INCLUDE";
    pub const LOCAL: &str = "RDR_LOCAL";
    pub const LISTENER: &str = "RDR_LISTENER";
    pub const ROUTE: &str = "RDR_ROUTE";
    pub const IN_HITS: &str = "RDR_IN_HITS";
    pub const GROUPS: &str = "RDR_GROUPS";
    pub const PORT_RANGES: &str = "RDR_PORT_RANGES";
    pub const IN_BYPASS: &str = "RDR_IN_BYPASS";
    pub const LOCAL6: &str = "RDR_LOCAL6";
    pub const EXCLUDE6: &str = "RDR_EXCLUDE6";
    pub const INCLUDE6: &str = "RDR_INCLUDE6";
    pub const ROUTE6: &str = "RDR_ROUTE6";
    pub const PODS: &str = "RDR_PODS";
    pub const POD_ADDRS: &str = "RDR_POD_ADDRS";
    pub const POD_META: &str = "RDR_POD_META";
}
