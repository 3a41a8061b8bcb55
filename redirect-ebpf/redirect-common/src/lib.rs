//! What the eBPF programs and user space must agree on: the layout of every
//! map key and value, the counter indices, and the capture decision itself.
//!
//! The decision ([`decide_connect`]) is a pure function so that it can be
//! unit-tested on the host; the `cgroup/connect4` program only copies the
//! context fields in and applies the verdict.
//!
//! Byte order: IPv4 addresses are kept as the kernel hands them to eBPF
//! programs, in network byte order inside a `u32` (build one with
//! `u32::from_ne_bytes(addr.octets())`). Ports are always host byte order here;
//! the programs convert at the context boundary.

#![cfg_attr(not(test), no_std)]

/// How many proxy UIDs (and, separately, GIDs) the config can hold.
pub const MAX_OWNERS: usize = 8;

/// Version of the map layouts below. A reinstall reuses pinned maps only when
/// the pinned config carries the same version.
pub const ABI_VERSION: u32 = 6;

/// How many ports one configuration can flag (`-o`, `-q`, `-b` and `-d`
/// ports together), and the capacity of the per-port inbound capture counters.
pub const MAX_PORTS: u32 = 1024;
/// How many CIDRs one configuration's set (`-x`, `-i`) can hold.
pub const MAX_CIDRS: u32 = 16384;
/// How many pod addresses one configuration can hold.
pub const MAX_LOCAL_ADDRS: u32 = 256;

/// Configurations held at once: the active one and the one an upgrade
/// writes beside it. The config array has one entry per slot, and every set
/// map's key starts with its slot, so each set map holds `CONFIG_SLOTS`
/// times its per-configuration capacity. An upgrade fills the inactive slot
/// and then switches `RDR_ACTIVE` to it in one 4-byte write: a decision
/// reads either the whole old configuration or the whole new one, never a
/// mix (see [`active_slot`]).
pub const CONFIG_SLOTS: u32 = 2;

/// The slot a value of `RDR_ACTIVE` selects (always below [`CONFIG_SLOTS`]).
#[inline(always)]
pub const fn active_slot(active: u32) -> u32 {
    active & (CONFIG_SLOTS - 1)
}

/// Key of the port-flags map: the configuration slot, then the port.
#[inline(always)]
pub const fn port_key(slot: u32, port: u16) -> u32 {
    (slot << 16) | port as u32
}

/// Bits of a CIDR-set key taken by the slot byte before the address.
pub const CIDR_SLOT_BITS: u32 = 8;

/// Data of a CIDR-set (LPM trie) key: the slot byte, then the address in
/// network order; the key's prefix length is [`CIDR_SLOT_BITS`] plus the
/// CIDR's, so a slot's entries never match another slot's lookups.
#[inline(always)]
pub const fn cidr_key(slot: u32, ip: u32) -> [u8; 8] {
    let b = ip.to_ne_bytes();
    [slot as u8, b[0], b[1], b[2], b[3], 0, 0, 0]
}

/// Key of the pod-address map: the slot in the high half, the address
/// (network order) in the low half.
#[inline(always)]
pub const fn local_key(slot: u32, ip: u32) -> u64 {
    ((slot as u64) << 32) | ip as u64
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
    /// Number of valid entries in `owner_groups`.
    pub group_count: u32,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS` (with [`CFG_GROUPS_ONLY`]) or
    /// `..._EXCLUDE` (without): numeric group ids.
    pub owner_groups: [u32; MAX_OWNERS],
}

/// `-i '*'`: every destination not excluded is captured.
pub const CFG_INCLUDE_ALL: u32 = 1;
/// `-i` lists a loopback network: local traffic of other owners is not
/// returned early (Istio drops those rules).
pub const CFG_INCLUDE_LOOPBACK: u32 = 2;
/// `owner_groups` lists the only groups captured (else: the groups never captured).
pub const CFG_GROUPS_ONLY: u32 = 4;
/// Inbound capture is on (`-b` is not empty).
pub const CFG_INBOUND: u32 = 8;
/// `-b '*'`: every inbound port not excluded (`-d`) is captured; else only
/// the ports flagged [`PORT_IN_INCLUDE`].
pub const CFG_INBOUND_ALL: u32 = 16;
/// `-m TPROXY`: Istio's TPROXY rules, which have no tunnel-port exception.
pub const CFG_TPROXY: u32 = 32;

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

/// Where a redirected connection was going. Value of both original-destination maps.
///
/// Field order matters to the verifier: constructing this struct must not
/// put zero stores next to each other, or LLVM fuses them into a `memset`
/// call whose loop the verifier refuses without CAP_PERFMON.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct OrigDst {
    /// Original destination address, network byte order.
    pub ip: u32,
    /// Lifetime state, one byte per writer (see [`OrigDst::PROXY_SEEN`]).
    pub state: u32,
    /// Original destination port, host byte order.
    pub port: u16,
    pub _pad: u16,
}

impl OrigDst {
    /// State byte set once the proxy's accepted socket of this connection
    /// was seen in the cgroup. A record lives until both ends of its
    /// connection closed, or only the app's end when the proxy's end is
    /// never seen (a proxy outside the cgroup). Each byte has one writer,
    /// so no two sockets' callbacks write the same byte.
    pub const PROXY_SEEN: usize = 0;
    /// State byte set once the app's socket closed.
    pub const APP_CLOSED: usize = 1;
    /// State byte set once the proxy's socket closed.
    pub const PROXY_CLOSED: usize = 2;
    /// State byte of the record in the app socket's own storage, set once
    /// the connection is established (its copy is then in the tuple map):
    /// at close, a socket whose storage lacks it never connected, and one
    /// that has it but whose tuple record is gone lost it to eviction.
    pub const ESTABLISHED: usize = 3;

    /// A fresh record of `ip:port` (network-order address, host-order port).
    pub const fn new(ip: u32, port: u16) -> Self {
        Self {
            ip,
            state: 0,
            port,
            _pad: 0,
        }
    }

    /// One state byte.
    pub const fn flag(&self, which: usize) -> u8 {
        self.state.to_ne_bytes()[which]
    }
}

/// A TCP connection as seen from its client (the app's socket): key of the
/// original-destination-by-tuple map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ConnTuple {
    /// Client (app) address, network byte order.
    pub client_ip: u32,
    /// Server (proxy) address, network byte order.
    pub server_ip: u32,
    /// Client port, host byte order.
    pub client_port: u16,
    /// Server port, host byte order.
    pub server_port: u16,
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
    /// sockops copied a socket's record to the tuple map (handshake done).
    TupleRecorded = 6,
    /// A tuple record was removed because its connection closed.
    TupleReleased = 7,
    /// A redirected socket closed before its handshake completed (its
    /// record went with the socket's storage).
    ConnectAborted = 8,
    /// `getsockopt(SO_ORIGINAL_DST)` answered from a record.
    OrigDstAnswered = 9,
    /// `getsockopt(SO_ORIGINAL_DST)` on a socket without a record (left to the kernel).
    OrigDstMissed = 10,
    /// `getpeername()` of a redirected app socket answered with the original destination.
    PeernameRestored = 11,
    /// An IPv6 destination that is not IPv4-mapped: not captured (IPv4-only config).
    NotIpv4 = 12,
    /// The proxy's call to its own pod's address, sent to the inbound port.
    Hairpin = 13,
    /// `-o`: the destination port is never captured.
    BypassPort = 14,
    /// The inbound passthrough source (127.0.0.6) on loopback.
    BypassPassthrough = 15,
    /// Local (loopback-routed) traffic of a process that is not the proxy.
    BypassLocal = 16,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`: the caller's group is not captured.
    BypassGroup = 17,
    /// `-x`: the destination is in an excluded CIDR.
    BypassCidr = 18,
    /// The destination is in no included CIDR (`-i`) and no included port (`-q`).
    NotIncluded = 19,
    /// An inbound connection handed to the proxy's inbound listener.
    InboundCaptured = 20,
    /// An inbound connection to capture while no inbound listener exists:
    /// refused, as REDIRECT to a port nobody listens on refuses it.
    InboundRefused = 21,
    /// A connection from the pod to itself: local traffic does not
    /// traverse `PREROUTING` (its outbound rules decided it).
    InboundLocal = 22,
    /// `--dport 15008 -j RETURN`: the tunnel port is not captured.
    InboundBypassTunnel = 23,
    /// `-d`: the port is never captured.
    InboundBypassPort = 24,
    /// The port is not in the `-b` list.
    InboundNotIncluded = 25,
    /// A listener on the inbound port was registered for inbound capture.
    ListenerRegistered = 26,
    /// `getsockopt(SO_ORIGINAL_DST)` on an inbound-captured connection,
    /// answered with its own local address.
    OrigDstInbound = 27,
    /// An established redirected connection closed and found its record
    /// gone: the LRU map evicted it (more connections were open than
    /// `--max-connections`), and SO_ORIGINAL_DST and getpeername() on that
    /// connection had no answer after the eviction.
    RecordEvicted = 28,
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
        Self::ConnectAborted,
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
        Self::RecordEvicted,
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
            Self::ConnectAborted => "connect_aborted",
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
            Self::RecordEvicted => "record_evicted",
        }
    }
}

/// Number of entries in the counter array.
pub const COUNTER_COUNT: u32 = 29;

/// The facts about one `connect()` that the decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct ConnectInput {
    /// `bpf_sock_addr.type` (`SOCK_STREAM`, `SOCK_DGRAM`, ...).
    pub sock_type: u32,
    pub uid: u32,
    pub gid: u32,
    /// Destination address, network byte order.
    pub dst_ip: u32,
    /// Destination port, host byte order.
    pub dst_port: u16,
    /// The address the socket is bound to, network byte order (0: unbound).
    pub src_ip: u32,
}

/// What to do with one `connect()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Rewrite the destination to `127.0.0.1:port` and remember the
    /// original; the counter says which chain sent it there.
    Redirect { port: u16, counter: Counter },
    /// Leave the connect alone; the counter says which rule let it through.
    Bypass(Counter),
}

/// The maps the decision consults: per-port flags, CIDR sets, and the
/// pod's own addresses.
pub trait Lookups {
    /// `PORT_*` bits of a destination port (0: none).
    fn port_flags(&self, port: u16) -> u8;
    /// Whether `ip` is in an excluded CIDR (`-x`).
    fn excluded(&self, ip: u32) -> bool;
    /// Whether `ip` is in an included CIDR (`-i`).
    fn included(&self, ip: u32) -> bool;
    /// Whether `ip` is one of the pod's own (non-127/8) addresses.
    fn pod_address(&self, ip: u32) -> bool;
}

/// 127.0.0.1 in network byte order: where redirected connects are sent.
pub const LOCALHOST: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// Decides one outbound TCP `connect()` by walking Istio's `ISTIO_OUTPUT`
/// chain in its order (istio-iptables' rules for this configuration; the
/// DNS, TPROXY and interface rules are not expressible here and refused
/// before install). `-o lo` is "the destination is local": 127.0.0.0/8 or
/// one of the pod's addresses. `LO` is the loopback CIDR, `U`/`G` each
/// proxy UID/GID in turn:
///
/// ```text
/// -A OUTPUT -p tcp -j ISTIO_OUTPUT                                          (not_tcp otherwise)
/// -A ISTIO_OUTPUT -p tcp --dport P -j RETURN          for P in -o           (bypass_port)
/// -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN                           (bypass_passthrough)
/// -A ISTIO_OUTPUT -o lo ! -d LO -p tcp ! --dport 15008 -m owner --uid-owner U -j ISTIO_IN_REDIRECT (hairpin)
/// -A ISTIO_OUTPUT -o lo -m owner ! --uid-owner U -j RETURN  (unless -i has loopback) (bypass_local)
/// -A ISTIO_OUTPUT -m owner --uid-owner U -j RETURN                          (bypass_uid)
///   ... the same three for each G with --gid-owner                         (hairpin, bypass_local, bypass_gid)
/// -A ISTIO_OUTPUT -m owner --gid-owner X -j RETURN    owner groups          (bypass_group)
/// -A ISTIO_OUTPUT -d LO -j RETURN                                           (bypass_loopback)
/// -A ISTIO_OUTPUT -d C -j RETURN                      for C in -x           (bypass_cidr)
/// -A ISTIO_OUTPUT -p tcp --dport P -j ISTIO_REDIRECT  for P in -q           (redirected)
/// -A ISTIO_OUTPUT -j ISTIO_REDIRECT  (-i '*'), or -d C for C in -i          (redirected)
///                                                     otherwise             (not_included)
/// ```
///
/// With `-m TPROXY` and inbound capture, Istio also marks the proxy's
/// (UID or GID) loopback connections to anything but the loopback CIDR
/// (`-A OUTPUT ! -d LO -p tcp -o lo -m owner --uid-owner U -j MARK
/// --set-mark 1338`), and its mangle `ISTIO_INBOUND` sends those, unless
/// from 127.0.0.6, through the inbound port rules to TPROXY: a connection
/// the chain above lets through is then sent to the inbound port if those
/// rules capture its port (hairpin).
#[inline(always)]
pub fn decide_connect(input: &ConnectInput, cfg: &RedirectConfig, maps: &impl Lookups) -> Verdict {
    // Read up front, once: left to the optimiser, the choice between this
    // field and `proxy_port` becomes pointer arithmetic on the map value,
    // which the verifier refuses without CAP_PERFMON.
    // SAFETY: a valid, aligned field of a live reference.
    let inbound_port = unsafe { core::ptr::read_volatile(&raw const cfg.inbound_port) };
    let verdict = decide_nat(input, cfg, maps);
    if matches!(verdict, Verdict::Bypass(_)) && tproxy_hairpin(input, cfg, maps) {
        return Verdict::Redirect {
            port: inbound_port,
            counter: Counter::Hairpin,
        };
    }
    verdict
}

/// Whether Istio's TPROXY rules send this connect to the inbound port (see
/// [`decide_connect`]).
#[inline(always)]
fn tproxy_hairpin(input: &ConnectInput, cfg: &RedirectConfig, maps: &impl Lookups) -> bool {
    let wanted = CFG_TPROXY | CFG_INBOUND;
    if cfg.flags & wanted != wanted
        || input.sock_type != SOCK_STREAM
        || input.src_ip == PASSTHROUGH_SRC
        || !is_local(input.dst_ip, maps)
        || input.dst_ip & cfg.loopback_mask == cfg.loopback_addr & cfg.loopback_mask
    {
        return false;
    }
    let proxy = contains(&cfg.proxy_uids, cfg.uid_count, input.uid)
        || contains(&cfg.proxy_gids, cfg.gid_count, input.gid);
    proxy && inbound_port_rules(input.dst_port, cfg, maps) == InboundVerdict::Capture
}

/// The nat `ISTIO_OUTPUT` chain (see [`decide_connect`]).
#[inline(always)]
fn decide_nat(input: &ConnectInput, cfg: &RedirectConfig, maps: &impl Lookups) -> Verdict {
    if input.sock_type != SOCK_STREAM {
        return Verdict::Bypass(Counter::NotTcp);
    }
    let ports = maps.port_flags(input.dst_port);
    if ports & PORT_EXCLUDE != 0 {
        return Verdict::Bypass(Counter::BypassPort);
    }
    let dst = input.dst_ip;
    let local = is_local(dst, maps);
    if local && input.src_ip == PASSTHROUGH_SRC {
        return Verdict::Bypass(Counter::BypassPassthrough);
    }
    let in_loopback = dst & cfg.loopback_mask == cfg.loopback_addr & cfg.loopback_mask;
    let lo = LoRules {
        hairpin: local && !in_loopback && input.dst_port != cfg.tunnel_port,
        return_others: local && cfg.flags & CFG_INCLUDE_LOOPBACK == 0,
        inbound_port: cfg.inbound_port,
    };
    // Two calls rather than a loop over (ids, ...) pairs: an array of
    // references on the stack trips the verifier without CAP_PERFMON.
    if let Some(verdict) = lo.owner_rules(
        &cfg.proxy_uids,
        cfg.uid_count,
        input.uid,
        Counter::BypassUid,
    ) {
        return verdict;
    }
    if let Some(verdict) = lo.owner_rules(
        &cfg.proxy_gids,
        cfg.gid_count,
        input.gid,
        Counter::BypassGid,
    ) {
        return verdict;
    }
    let in_groups = contains(&cfg.owner_groups, cfg.group_count, input.gid);
    if cfg.flags & CFG_GROUPS_ONLY != 0 {
        if !in_groups {
            return Verdict::Bypass(Counter::BypassGroup);
        }
    } else if in_groups {
        return Verdict::Bypass(Counter::BypassGroup);
    }
    if in_loopback {
        return Verdict::Bypass(Counter::BypassLoopback);
    }
    if maps.excluded(dst) {
        return Verdict::Bypass(Counter::BypassCidr);
    }
    if ports & PORT_INCLUDE != 0 || cfg.flags & CFG_INCLUDE_ALL != 0 || maps.included(dst) {
        return Verdict::Redirect {
            port: cfg.proxy_port,
            counter: Counter::Redirected,
        };
    }
    Verdict::Bypass(Counter::NotIncluded)
}

/// Whether `ip` is one of the pod's own addresses: 127.0.0.0/8 or an
/// address of its interfaces (what `-o lo` tests for a destination).
#[inline(always)]
fn is_local(ip: u32, maps: &impl Lookups) -> bool {
    ip.to_ne_bytes()[0] == 127 || maps.pod_address(ip)
}

/// The facts about one inbound TCP connection (its SYN) that the inbound
/// decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct InboundInput {
    /// Source address, network byte order.
    pub src_ip: u32,
    /// Destination (local) port, host byte order.
    pub dst_port: u16,
}

/// What to do with one inbound connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundVerdict {
    /// Hand it to the proxy's inbound listener (`ISTIO_IN_REDIRECT`).
    Capture,
    /// Leave it to the socket it was sent to; the counter says which rule.
    Bypass(Counter),
}

/// Decides one inbound TCP connection by walking Istio's inbound chain
/// (`-p tcp -j ISTIO_INBOUND` from `PREROUTING`) in its order:
///
/// ```text
/// REDIRECT (nat):
/// -A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN                          (inbound_bypass_tunnel)
/// -A ISTIO_INBOUND -p tcp --dport P -j RETURN         for P in -d, -b '*'  (inbound_bypass_port)
/// -A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT        -b '*'               (inbound_captured)
/// -A ISTIO_INBOUND -p tcp --dport P -j ISTIO_IN_REDIRECT  for P in -b      (inbound_captured)
///                                                     otherwise            (inbound_not_included)
/// -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
/// TPROXY (mangle): the same without the tunnel-port rule, -j ISTIO_TPROXY
/// ```
///
/// A connection from the pod to itself (source 127.0.0.0/8 or a pod
/// address) is never captured here: locally generated traffic does not
/// traverse nat `PREROUTING`, and Istio's TPROXY rules return `-i lo`
/// traffic but the proxy's own hairpin, which connect4 already sends to the
/// inbound port (inbound_local).
#[inline(always)]
pub fn decide_inbound(
    input: &InboundInput,
    cfg: &RedirectConfig,
    maps: &impl Lookups,
) -> InboundVerdict {
    if cfg.flags & CFG_INBOUND == 0 {
        return InboundVerdict::Bypass(Counter::InboundNotIncluded);
    }
    if is_local(input.src_ip, maps) {
        return InboundVerdict::Bypass(Counter::InboundLocal);
    }
    inbound_port_rules(input.dst_port, cfg, maps)
}

/// The port rules of the inbound chain (after its source rules).
#[inline(always)]
fn inbound_port_rules(port: u16, cfg: &RedirectConfig, maps: &impl Lookups) -> InboundVerdict {
    if cfg.flags & CFG_TPROXY == 0 && port == cfg.tunnel_port {
        return InboundVerdict::Bypass(Counter::InboundBypassTunnel);
    }
    let ports = maps.port_flags(port);
    if cfg.flags & CFG_INBOUND_ALL != 0 {
        if ports & PORT_IN_EXCLUDE != 0 {
            return InboundVerdict::Bypass(Counter::InboundBypassPort);
        }
        return InboundVerdict::Capture;
    }
    if ports & PORT_IN_INCLUDE != 0 {
        return InboundVerdict::Capture;
    }
    InboundVerdict::Bypass(Counter::InboundNotIncluded)
}

/// What the `-o lo` owner rules need to know about one connect.
struct LoRules {
    /// `-o lo ! -d LO -p tcp ! --dport TUNNEL` holds.
    hairpin: bool,
    /// `-o lo -m owner ! --uid-owner X -j RETURN` is in the chain (and `-o lo` holds).
    return_others: bool,
    inbound_port: u16,
}

impl LoRules {
    /// The three rules istio-iptables adds for each proxy UID (or GID) `X`,
    /// in order, for each of the first `count` entries of `ids`: the
    /// hairpin to the inbound port, the return of other owners' local
    /// traffic, the return of the proxy's own. `None`: no rule matched.
    #[inline(always)]
    fn owner_rules(
        &self,
        ids: &[u32; MAX_OWNERS],
        count: u32,
        id: u32,
        bypass: Counter,
    ) -> Option<Verdict> {
        let mut i = 0;
        while i < MAX_OWNERS {
            if (i as u32) < count {
                let owner = ids[i] == id;
                if owner && self.hairpin {
                    return Some(Verdict::Redirect {
                        port: self.inbound_port,
                        counter: Counter::Hairpin,
                    });
                }
                if !owner && self.return_others {
                    return Some(Verdict::Bypass(Counter::BypassLocal));
                }
                if owner {
                    return Some(Verdict::Bypass(bypass));
                }
            }
            i += 1;
        }
        None
    }
}

/// Whether `id` is among the first `count` entries of `set` (a bounded loop
/// the verifier accepts on every supported kernel).
#[inline(always)]
fn contains(set: &[u32; MAX_OWNERS], count: u32, id: u32) -> bool {
    let mut i = 0;
    while i < MAX_OWNERS {
        if (i as u32) < count && set[i] == id {
            return true;
        }
        i += 1;
    }
    false
}

/// The client-side tuple of a connection given the tuple of the socket asking
/// (local, remote), for a socket that is the *server* side (the proxy's
/// accepted socket): its remote end is the client.
#[inline(always)]
pub const fn tuple_from_server_side(
    local_ip: u32,
    local_port: u16,
    remote_ip: u32,
    remote_port: u16,
) -> ConnTuple {
    ConnTuple {
        client_ip: remote_ip,
        server_ip: local_ip,
        client_port: remote_port,
        server_port: local_port,
    }
}

/// `SOL_IP`, the level of `SO_ORIGINAL_DST`.
pub const SOL_IP: i32 = 0;
/// `SO_ORIGINAL_DST` (`linux/netfilter_ipv4.h`).
pub const SO_ORIGINAL_DST: i32 = 80;
/// Size of `struct sockaddr_in`, what `SO_ORIGINAL_DST` returns.
pub const SOCKADDR_IN_LEN: i32 = 16;

/// Largest `optlen` the program keeps when it answers: below this, the
/// buffer it writes is exactly the caller's length (the kernel hands the
/// program min(caller's length, page size) bytes).
pub const MAX_KEPT_OPTLEN: i32 = SOCKOPT_PAGE;

/// What the getsockopt program does with one `getsockopt()` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockoptAction {
    /// Not ours: hand the caller what the kernel, or a program that ran
    /// before this one, produced (see [`pass_through_optlen`]).
    PassThrough,
    /// `SO_ORIGINAL_DST`: answer it from the record of this connection, if
    /// there is one (else pass through).
    AnswerOriginalDst,
}

/// The page size the kernel caps a getsockopt program's buffer at (the
/// smallest Linux page; on larger pages the cap is only reached later).
pub const SOCKOPT_PAGE: i32 = 4096;

/// What a getsockopt program with nothing to say must store in `optlen`,
/// `None` meaning "leave `optlen` and `retval` exactly as found".
///
/// The kernel's cgroup-sockopt rules (kernel/bpf/cgroup.c): the program's
/// buffer holds the answer so far, the kernel's own or one a program that
/// ran earlier on this or a descendant cgroup wrote, and is copied back
/// unless `optlen` is 0. Left alone it is copied back unchanged, so an
/// earlier program's answer survives. Only two cases need `optlen = 0`
/// (the kernel then keeps the caller's buffer as the kernel's getsockopt
/// left it): an answer longer than the page the program sees (`optlen`
/// beyond it is an `EFAULT` before kernel 6.5), and a failing call
/// (`retval` set: the kernel did not copy the caller's buffer in, so
/// copying the program's zeroed buffer back would overwrite it).
#[inline(always)]
pub const fn pass_through_optlen(retval: i32, optlen: i32) -> Option<i32> {
    if retval != 0 || optlen > SOCKOPT_PAGE {
        Some(0)
    } else {
        None
    }
}

/// Classifies a `getsockopt()` call by its level and option.
#[inline(always)]
pub fn classify_getsockopt(level: i32, optname: i32) -> SockoptAction {
    if level == SOL_IP && optname == SO_ORIGINAL_DST {
        SockoptAction::AnswerOriginalDst
    } else {
        SockoptAction::PassThrough
    }
}

/// The `optlen` to report with an answer: the caller's, as conntrack leaves
/// it, when it is a length the program's buffer matches; else the size of
/// the `sockaddr_in`.
#[inline(always)]
pub const fn answer_optlen(optlen: i32) -> i32 {
    if optlen >= SOCKADDR_IN_LEN && optlen <= MAX_KEPT_OPTLEN {
        optlen
    } else {
        SOCKADDR_IN_LEN
    }
}

/// The `struct sockaddr_in` bytes that `SO_ORIGINAL_DST` returns for `orig`:
/// family AF_INET (host order), port and address in network order, zero padding.
#[inline(always)]
pub fn sockaddr_in(orig: &OrigDst) -> [u8; 16] {
    let family = 2u16.to_ne_bytes();
    let port = orig.port.to_be_bytes();
    let ip = orig.ip.to_ne_bytes();
    [
        family[0], family[1], port[0], port[1], ip[0], ip[1], ip[2], ip[3], 0, 0, 0, 0, 0, 0, 0, 0,
    ]
}

/// The IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`),
/// as the kernel's `u32[4]` of network-order words; `None` for real IPv6.
/// A dual-stack socket connecting to such an address sends IPv4 packets,
/// which Istio's IPv4 nat rules capture: so must connect6.
#[inline(always)]
pub fn v4_mapped(ip6: &[u32; 4]) -> Option<u32> {
    (ip6[0] == 0 && ip6[1] == 0 && ip6[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]))
        .then_some(ip6[3])
}

/// `::ffff:a.b.c.d` for a network-order IPv4 address.
#[inline(always)]
pub fn to_v4_mapped(ip: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip]
}

/// The tuple of a client-side socket (the app's connected socket).
#[inline(always)]
pub const fn tuple_from_client_side(
    local_ip: u32,
    local_port: u16,
    remote_ip: u32,
    remote_port: u16,
) -> ConnTuple {
    ConnTuple {
        client_ip: local_ip,
        server_ip: remote_ip,
        client_port: local_port,
        server_port: remote_port,
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all three are #[repr(C)] plain integers without padding
    // (bytemuck::Pod's derive checks this at compile time).
    unsafe impl aya::Pod for super::RedirectConfig {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ConnTuple {}
    unsafe impl aya::Pod for super::InstanceMeta {}
}

#[cfg(test)]
mod tests;

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
    /// Destination address, network byte order.
    pub dst_ip: u32,
    /// Destination port, host byte order.
    pub dst_port: u16,
    /// Proxy port it was sent to (redirects only).
    pub proxy_port: u16,
}

/// Longest cgroup path (relative to the cgroup2 mount) an instance records.
pub const META_PATH_MAX: usize = 1024;

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
