//! The capture decisions, pure functions of the connection, the
//! configuration and the set maps (through [`Lookups`]): what the
//! programs apply, unit-tested on the host rule by rule.

use crate::{abi::*, addr::Addr};

/// The facts about one `connect()` that the decision depends on, for an
/// IPv4 (`u32`, network order) or IPv6 ([`crate::Ip6`]) destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectInput<A = u32> {
    /// `bpf_sock_addr.type` (`SOCK_STREAM`, `SOCK_DGRAM`, ...).
    pub sock_type: u32,
    pub uid: u32,
    pub gid: u32,
    /// Destination address.
    pub dst_ip: A,
    /// Destination port, host byte order.
    pub dst_port: u16,
    /// The address the socket is bound to (unspecified: unbound).
    pub src_ip: A,
    /// The socket is bound to the loopback device (`SO_BINDTODEVICE=lo`):
    /// its packets leave through `lo` whatever their destination.
    pub dev_lo: bool,
    /// The device the socket is bound to (`SO_BINDTODEVICE`; 0: none).
    pub bound_dev: u32,
    /// The pod whose configuration decides (below [`crate::MAX_PODS`]).
    pub pod: u32,
}

impl<A: Addr> ConnectInput<A> {
    /// The destination the kernel connects to (see [`Addr::effective_dst`]:
    /// the connect rewrites it before any rule sees a packet).
    #[inline(always)]
    pub fn effective_dst(&self) -> A {
        A::effective_dst(self.dst_ip, self.src_ip)
    }
}

/// What to do with one `connect()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Rewrite the destination to `127.0.0.1:port` (`[::1]:port`) and remember the
    /// original; the counter says which chain sent it there.
    Redirect { port: u16, counter: Counter },
    /// Leave the connect alone; the counter says which rule let it through.
    Bypass(Counter),
}

/// The maps the decision consults: per-port flags, CIDR sets, and the
/// pod's own addresses and routes, of the family of `A`.
pub trait Lookups<A = u32> {
    /// `PORT_*` bits of a destination port listed on its own (0: none).
    fn port_flags(&self, port: u16) -> u8;
    /// `PORT_*` bits of the ranges (`a:b`) a port is in (0: none).
    fn range_flags(&self, port: u16) -> u8;
    /// Whether `gid` is one of the owner groups.
    fn owner_group(&self, gid: u32) -> bool;
    /// Whether `ip` is in an excluded CIDR (`-x`).
    fn excluded(&self, ip: A) -> bool;
    /// Whether `ip` is in an included CIDR (`-i`).
    fn included(&self, ip: A) -> bool;
    /// Whether `ip` is one of the pod's own (non-loopback) addresses.
    fn pod_address(&self, ip: A) -> bool;
    /// The source address the pod's routing table gives `ip`: `None`
    /// without a route, `Some(unspecified)` for a destination the kernel
    /// refuses TCP to (broadcast, multicast, an unreachable route).
    fn route_source(&self, ip: A) -> Option<A>;
    /// Whether the pod's route to `ip` leaves through an interface `-c`
    /// names.
    fn route_excluded(&self, ip: A) -> bool;
    /// The first `-o lo` owner rule of the proxy's UIDs and GIDs that
    /// matches ([`owner_match`], which is what this does unless an
    /// implementation runs it out of line: the eBPF programs run it as a
    /// global function, which the verifier checks once, not once for each
    /// path into it).
    fn owner_match(&self, cfg: &RedirectConfig, facts: OwnerFacts) -> OwnerMatch {
        owner_match(cfg, facts)
    }
    /// Whether `ip` is a nameserver of the pod's resolv.conf (what
    /// [`Addr::is_nameserver`] says, unless run out of line as above).
    fn nameserver(&self, cfg: &RedirectConfig, ip: A) -> bool
    where
        A: Addr,
    {
        ip.is_nameserver(cfg)
    }
    /// The `PORT_*` lists a destination port is in (what [`port_lists`]
    /// says, unless run out of line as above).
    fn port_lists(&self, cfg: &RedirectConfig, port: u16) -> u8
    where
        Self: Sized,
    {
        port_lists(port, cfg.flags & CFG_PORT_RANGES != 0, self)
    }
    /// `-o X -j RETURN` for an interface of `-c` (what [`leaves_excluded`]
    /// says, unless run out of line as above).
    fn interface_excluded(&self, cfg: &RedirectConfig, input: &ConnectInput<A>) -> bool
    where
        A: Addr,
        Self: Sized,
    {
        leaves_excluded(input, cfg, self)
    }
    /// The inbound chain's port rules (what [`inbound_port_rules`] says,
    /// unless run out of line as above).
    fn inbound_ports(&self, cfg: &RedirectConfig, port: u16) -> InboundVerdict
    where
        Self: Sized,
    {
        inbound_port_rules(port, cfg, self)
    }
    /// Where the chain after the owner rules sends the connect (what
    /// [`chain_tail`] says, unless run out of line as above).
    fn chain_tail(&self, cfg: &RedirectConfig, facts: TailFacts<A>) -> ChainTail
    where
        A: Addr,
        Self: Sized,
    {
        chain_tail(cfg, facts, self)
    }
}

/// Decides one outbound `connect()` (or, for UDP, `sendmsg()`) by walking
/// Istio's `ISTIO_OUTPUT` chain in its order (istio-iptables' rules for
/// this configuration; the TPROXY and interface rules are not expressible
/// here and refused before install). `-o lo` is "the destination is local" (127.0.0.0/8 or
/// one of the pod's addresses) or "the socket is bound to `lo`". `LO` is the loopback CIDR, `U`/`G` each
/// proxy UID/GID in turn:
///
/// ```text
/// -A OUTPUT -o X -j RETURN                            for X in -c           (bypass_interface)
/// -A OUTPUT -j ISTIO_OUTPUT            (only DNS capture redirects UDP: not_tcp otherwise)
/// -A ISTIO_OUTPUT -p tcp --dport P -j RETURN          for P in -o           (bypass_port)
/// -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN                           (bypass_passthrough)
/// -A ISTIO_OUTPUT -o lo ! -d LO -p tcp ! --dport 15008 -m owner --uid-owner U -j ISTIO_IN_REDIRECT (hairpin)
/// -A ISTIO_OUTPUT -o lo -m owner ! --uid-owner U -j RETURN  (unless -i has loopback) (bypass_local)
/// -A ISTIO_OUTPUT -m owner --uid-owner U -j RETURN                          (bypass_uid)
///   ... the same three for each G with --gid-owner                         (hairpin, bypass_local, bypass_gid)
/// -A ISTIO_OUTPUT -m owner --gid-owner X -j RETURN    owner groups          (bypass_group)
/// -A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS                 --redirect-dns:
/// -A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d NS -j REDIRECT --to-ports 15053  (dns_redirected)
/// -A ISTIO_OUTPUT_DNS -p udp --dport 53 -d NS -j REDIRECT --to-port 15053   (dns_redirected)
///                       (for NS in resolv.conf; without -d: --capture-all-dns)
/// -A ISTIO_OUTPUT -d LO -j RETURN                                           (bypass_loopback)
/// -A ISTIO_OUTPUT -d C -j RETURN                      for C in -x           (bypass_cidr)
/// -A ISTIO_OUTPUT -p tcp --dport P -j ISTIO_REDIRECT  for P in -q           (redirected)
/// -A ISTIO_OUTPUT -j ISTIO_REDIRECT  (-i '*'), or -d C for C in -i          (redirected)
///                                                     otherwise             (not_included)
/// ```
///
/// With `--redirect-dns` the proxy UIDs' hairpin also spares TCP port 53
/// (`-m multiport ! --dports 53,15008`) and the return of other owners'
/// local traffic is `-o lo -p tcp ! --dport 53 ...`, so that UDP and TCP
/// DNS to a local resolver (127.0.0.53) reach `ISTIO_OUTPUT_DNS`.
///
/// The input's destination is taken as the kernel's route lookup leaves it
/// ([`ConnectInput::effective_dst`]), since the rules see the packet after it.
///
/// An IPv6 connection walks Istio's IPv6 table, the same chain with
/// `::1/128` for the loopback network and `::6` for the passthrough source
/// (see [`Addr`]), when the configuration has IPv6 rules ([`CFG_IPV6`]);
/// without them it is not captured (`not_ipv4`).
#[inline(always)]
pub fn decide_connect<A: Addr>(
    input: &ConnectInput<A>,
    cfg: &RedirectConfig,
    maps: &impl Lookups<A>,
) -> Verdict {
    if A::IS_V6 && !ipv6_rules(cfg) {
        return Verdict::Bypass(Counter::NotIpv4);
    }
    if cfg.flags & CFG_LEGACY != 0 {
        return decide_legacy(input, cfg, maps);
    }
    decide_nat(input, cfg, maps)
}

/// Whether the configuration has Istio's IPv6 table (`--profile legacy`
/// never has one).
#[inline(always)]
fn ipv6_rules(cfg: &RedirectConfig) -> bool {
    cfg.flags & CFG_IPV6 != 0 && cfg.flags & CFG_LEGACY == 0
}

/// `--profile legacy`: the `ISTIO_OUTPUT` chain of Istio's first init
/// script, in its order (`-p` and `-u` in place of 15001 and 1337;
/// `loopback_*` is 127.0.0.1/32):
///
/// ```text
/// -A OUTPUT -p tcp -j ISTIO_OUTPUT                                        (not_tcp)
/// -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ISTIO_REDIRECT               (loopback_redirected)
/// -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN                     (bypass_uid)
/// -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN                               (bypass_loopback)
/// -A ISTIO_OUTPUT -j ISTIO_REDIRECT                                       (redirected)
/// -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
/// ```
#[inline(always)]
fn decide_legacy<A: Addr>(
    input: &ConnectInput<A>,
    cfg: &RedirectConfig,
    maps: &impl Lookups<A>,
) -> Verdict {
    if input.sock_type != SOCK_STREAM {
        return Verdict::Bypass(Counter::NotTcp);
    }
    let dst = input.effective_dst();
    let loopback = dst.in_loopback_cidr(cfg);
    if !loopback && leaves_by_lo(input, dst, maps) {
        return Verdict::Redirect {
            port: cfg.proxy_port,
            counter: Counter::LoopbackRedirected,
        };
    }
    if contains(&cfg.proxy_uids, cfg.uid_count, input.uid) {
        return Verdict::Bypass(Counter::BypassUid);
    }
    if loopback {
        return Verdict::Bypass(Counter::BypassLoopback);
    }
    Verdict::Redirect {
        port: cfg.proxy_port,
        counter: Counter::Redirected,
    }
}

/// Where a redirected connect leaves from: what the kernel would have
/// picked for the original destination, since iptables rewrites the
/// destination only after the route lookup chose the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source<A = u32> {
    /// Leave the socket as it is: it is bound already, or the kernel's
    /// choice for 127.0.0.1 is its choice for the original destination.
    Kernel,
    /// Bind the socket to this address, port 0, first.
    Bind(A),
    /// The kernel refuses this connect before any rule runs (no route, a
    /// broadcast destination, a multicast one for TCP, a loopback source
    /// to the network): do not redirect it, so that it fails as it would.
    Refused,
    /// An IPv6 link-local destination: the connect names its interface,
    /// which decides the source and which the hook cannot see (without
    /// one the kernel refuses it). Not redirected (`link_local`).
    LinkLocal,
}

/// The [`Source`] of a connect [`decide_connect`] redirects, from the
/// kernel's route lookup (`ip_route_connect`) for its original
/// destination: local destinations leave through `lo` from the destination
/// itself (or 127.0.0.1 for 127/8), a socket bound to `lo` from
/// `lo_source`, anything else from its route's source address.
#[inline(always)]
pub fn redirect_source<A: Addr>(
    input: &ConnectInput<A>,
    cfg: &RedirectConfig,
    maps: &impl Lookups<A>,
) -> Source<A> {
    let dst = input.effective_dst();
    if dst.is_loopback() {
        return Source::Kernel;
    }
    if dst.needs_scope() && input.bound_dev == 0 {
        return Source::LinkLocal;
    }
    // The limited broadcast address: `tcp_v4_connect` refuses it, and
    // `udp_sendmsg` too without SO_BROADCAST (which no hook can read).
    // Multicast: TCP only; UDP connects and sends to it by its route.
    if dst.is_broadcast() {
        return Source::Refused;
    }
    let multicast = dst.is_multicast();
    if multicast && separate_load(&input.sock_type) != SOCK_DGRAM {
        return Source::Refused;
    }
    let local = maps.pod_address(dst);
    let routed = |src: Option<A>| match src {
        Some(src) if src != A::UNSPECIFIED => Some(src),
        _ => None,
    };
    if input.src_ip != A::UNSPECIFIED {
        // A bound socket sends to a multicast group out of its address's
        // device, with or without a route (`__ip_route_output_key`).
        if local || input.dev_lo || multicast {
            return Source::Kernel;
        }
        if input.src_ip.is_loopback() {
            return Source::Refused;
        }
        return match routed(maps.route_source(dst)) {
            None => Source::Refused,
            Some(_) => Source::Kernel,
        };
    }
    if local {
        return Source::Bind(dst);
    }
    if input.dev_lo {
        // IPv4: routed through `lo` whatever the tables say ("assume on
        // link"). IPv6: the source the kernel gave such a socket at
        // install, where it found a route at all (none: it refuses).
        let src = A::lo_source(cfg);
        return if src != A::UNSPECIFIED {
            Source::Bind(src)
        } else if A::IS_V6 {
            Source::Refused
        } else {
            Source::Kernel
        };
    }
    match routed(maps.route_source(dst)) {
        None => Source::Refused,
        Some(src) => Source::Bind(src),
    }
}

/// The nat `ISTIO_OUTPUT` chain (see [`decide_connect`]).
#[inline(always)]
fn decide_nat<A: Addr>(
    input: &ConnectInput<A>,
    cfg: &RedirectConfig,
    maps: &impl Lookups<A>,
) -> Verdict {
    if cfg.flags & CFG_EXCLUDE_IFACES != 0 && maps.interface_excluded(cfg, input) {
        return Verdict::Bypass(Counter::BypassInterface);
    }
    let tcp = input.sock_type == SOCK_STREAM;
    let dns = cfg.flags & CFG_DNS != 0;
    // Only DNS capture redirects anything but TCP.
    let dns_udp = dns && input.sock_type == SOCK_DGRAM;
    if !tcp && !dns_udp {
        return Verdict::Bypass(Counter::NotTcp);
    }
    let ports = maps.port_lists(cfg, input.dst_port);
    if ports & PORT_EXCLUDE != 0 {
        return Verdict::Bypass(Counter::BypassPort);
    }
    let dst = input.effective_dst();
    let local = leaves_by_lo(input, dst, maps);
    // `-s` sees the source the kernel picks. An unbound IPv6 socket
    // connecting to one of the pod's addresses leaves from that address
    // (RFC 6724's first rule), so from `::6` to `::6`; IPv4 leaves 127/8
    // from 127.0.0.1 (the preferred source of its local route) and any
    // other address of the pod from itself, never from 127.0.0.6.
    let passthrough = input.src_ip.is_passthrough()
        || (A::IS_V6
            && input.src_ip == A::UNSPECIFIED
            && dst.is_passthrough()
            && maps.pod_address(dst));
    if local && passthrough {
        return Verdict::Bypass(Counter::BypassPassthrough);
    }
    let in_loopback = dst.in_loopback_cidr(cfg);
    let hairpin = tcp && local && !in_loopback && input.dst_port != cfg.tunnel_port;
    let facts = OwnerFacts {
        uid: input.uid,
        gid: input.gid,
        // With DNS capture the UID form also spares TCP DNS
        // (`-m multiport ! --dports 53,15008`); the GID form does not.
        hairpin_uid: hairpin && !(dns && input.dst_port == DNS_PORT),
        hairpin_gid: hairpin,
        // With DNS capture: `-o lo -p tcp ! --dport 53 -m owner ! ... -j RETURN`.
        return_others: local
            && cfg.flags & CFG_INCLUDE_LOOPBACK == 0
            && (!dns || (tcp && input.dst_port != DNS_PORT)),
    };
    match maps.owner_match(cfg, facts) {
        OwnerMatch::None => {}
        OwnerMatch::Hairpin => {
            return Verdict::Redirect {
                port: separate_load(&cfg.inbound_port),
                counter: Counter::Hairpin,
            };
        }
        OwnerMatch::ReturnOthers => return Verdict::Bypass(Counter::BypassLocal),
        OwnerMatch::ProxyUid => return Verdict::Bypass(Counter::BypassUid),
        OwnerMatch::ProxyGid => return Verdict::Bypass(Counter::BypassGid),
    }
    let tail = TailFacts {
        gid: input.gid,
        dst,
        dst_port: input.dst_port,
        tcp,
        in_loopback,
        port_include: ports & PORT_INCLUDE != 0,
    };
    maps.chain_tail(cfg, tail).verdict(cfg)
}

/// The facts the chain after the owner rules depends on ([`chain_tail`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TailFacts<A = u32> {
    pub gid: u32,
    /// The effective destination ([`ConnectInput::effective_dst`]).
    pub dst: A,
    pub dst_port: u16,
    pub tcp: bool,
    /// The destination is in the loopback CIDR (`-d LO`).
    pub in_loopback: bool,
    /// The destination port is one `-q` names.
    pub port_include: bool,
}

impl TailFacts<u32> {
    /// As two scalars, for a BPF global function (IPv4 only, see
    /// `redirect_chain_tail4`): `extra` (which the caller passes through)
    /// and the GID; the destination, the port and the flags.
    #[inline(always)]
    pub fn pack(self, extra: u32) -> (u64, u64) {
        let low = u64::from(self.dst_port) << 16
            | u64::from(self.tcp)
            | u64::from(self.in_loopback) << 1
            | u64::from(self.port_include) << 2;
        (
            u64::from(extra) << 32 | u64::from(self.gid),
            u64::from(self.dst) << 32 | low,
        )
    }

    /// The facts of [`Self::pack`], and its `extra`.
    #[inline(always)]
    pub fn unpack(head: u64, rest: u64) -> (Self, u32) {
        let facts = Self {
            gid: head as u32,
            dst: (rest >> 32) as u32,
            dst_port: (rest >> 16) as u16,
            tcp: rest & 1 != 0,
            in_loopback: rest & 2 != 0,
            port_include: rest & 4 != 0,
        };
        (facts, (head >> 32) as u32)
    }
}

/// Where the rest of the chain after the owner rules sends a connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ChainTail {
    /// `-m owner --gid-owner G -j RETURN` for an owner group (with
    /// `--include-groups`: `! --gid-owner`).
    BypassGroup = 0,
    /// `-d NS -p udp --dport 53 -j REDIRECT --to-ports 15053` (and TCP).
    Dns = 1,
    /// Not TCP: the rest of the chain jumps only to `-p tcp` rules.
    NotTcp = 2,
    /// `-d LO -j RETURN`.
    Loopback = 3,
    /// `-d X -j RETURN` for a CIDR of `-x`.
    ExcludedCidr = 4,
    /// `-j ISTIO_REDIRECT` for a CIDR of `-i` or a port of `-q`.
    Redirect = 5,
    /// The end of the chain: left alone.
    NotIncluded = 6,
}

impl ChainTail {
    /// The tail a global function returned as [`ChainTail`]`as u64`
    /// (anything else: [`ChainTail::NotIncluded`]).
    #[inline(always)]
    pub fn from_u64(value: u64) -> Self {
        match value {
            0 => Self::BypassGroup,
            1 => Self::Dns,
            2 => Self::NotTcp,
            3 => Self::Loopback,
            4 => Self::ExcludedCidr,
            5 => Self::Redirect,
            _ => Self::NotIncluded,
        }
    }

    /// The connect's verdict. The two ports are read before the match, so
    /// that no path reads a port through a pointer chosen by the path
    /// (see [`separate_load`]; the verifier refuses that without
    /// CAP_PERFMON).
    #[inline(always)]
    pub fn verdict(self, cfg: &RedirectConfig) -> Verdict {
        let dns_port = separate_load(&cfg.dns_port);
        let proxy_port = separate_load(&cfg.proxy_port);
        match self {
            Self::BypassGroup => Verdict::Bypass(Counter::BypassGroup),
            Self::Dns => Verdict::Redirect {
                port: dns_port,
                counter: Counter::DnsRedirected,
            },
            Self::NotTcp => Verdict::Bypass(Counter::NotTcp),
            Self::Loopback => Verdict::Bypass(Counter::BypassLoopback),
            Self::ExcludedCidr => Verdict::Bypass(Counter::BypassCidr),
            Self::Redirect => Verdict::Redirect {
                port: proxy_port,
                counter: Counter::Redirected,
            },
            Self::NotIncluded => Verdict::Bypass(Counter::NotIncluded),
        }
    }
}

/// `ISTIO_OUTPUT` after the owner rules (see [`decide_connect`]): the
/// owner groups, the DNS rules, then (TCP only) the loopback CIDR, `-x`,
/// and `-i`/`-q`.
#[inline(always)]
pub fn chain_tail<A: Addr>(
    cfg: &RedirectConfig,
    facts: TailFacts<A>,
    maps: &impl Lookups<A>,
) -> ChainTail {
    let in_groups = cfg.group_count != 0 && maps.owner_group(facts.gid);
    if cfg.flags & CFG_GROUPS_ONLY != 0 {
        if !in_groups {
            return ChainTail::BypassGroup;
        }
    } else if in_groups {
        return ChainTail::BypassGroup;
    }
    if cfg.flags & CFG_DNS != 0
        && facts.dst_port == DNS_PORT
        && (cfg.flags & CFG_DNS_ALL != 0 || maps.nameserver(cfg, facts.dst))
    {
        return ChainTail::Dns;
    }
    if !facts.tcp {
        return ChainTail::NotTcp;
    }
    if facts.in_loopback {
        return ChainTail::Loopback;
    }
    if maps.excluded(facts.dst) {
        return ChainTail::ExcludedCidr;
    }
    if facts.port_include || cfg.flags & CFG_INCLUDE_ALL != 0 || maps.included(facts.dst) {
        return ChainTail::Redirect;
    }
    ChainTail::NotIncluded
}

/// Reads a config field with a load of its own. Without it the compiler
/// may merge the loads of two fields on different paths into one load at
/// a computed offset, which the verifier refuses without CAP_PERFMON
/// ("pointer arithmetic ... prohibited for !root").
#[inline(always)]
fn separate_load<T: Copy>(field: &T) -> T {
    // SAFETY: a reference is valid for reads.
    unsafe { core::ptr::read_volatile(field) }
}

/// The port DNS capture takes (`--dport 53`).
pub const DNS_PORT: u16 = 53;

/// The `PORT_*` lists (`-o`, `-q`, `-b`, `-d`) `port` is in: as a port of
/// its own, or in a range (looked up only when the configuration has one,
/// `ranges`: [`CFG_PORT_RANGES`]).
#[inline(always)]
pub fn port_lists<A>(port: u16, ranges: bool, maps: &impl Lookups<A>) -> u8 {
    let single = maps.port_flags(port);
    if ranges {
        single | maps.range_flags(port)
    } else {
        single
    }
}

/// Whether `ip` is one of the pod's own addresses: 127.0.0.0/8 (`::1`) or
/// an address of its interfaces (what `-o lo` tests for a destination).
#[inline(always)]
fn is_local<A: Addr>(ip: A, maps: &impl Lookups<A>) -> bool {
    ip.is_loopback() || maps.pod_address(ip)
}

/// `-o lo`: the packet to `dst` leaves through `lo`: a local destination,
/// a socket bound to `lo`, or a datagram to a multicast group from a
/// socket bound to a 127/8 address (the kernel sends multicast out of the
/// bound address's device).
#[inline(always)]
fn leaves_by_lo<A: Addr>(input: &ConnectInput<A>, dst: A, maps: &impl Lookups<A>) -> bool {
    input.dev_lo
        || is_local(dst, maps)
        || (input.src_ip.is_loopback() && dst.is_multicast() && input.sock_type == SOCK_DGRAM)
}

/// `-o X` for an `X` that `-c` names: the device the connection's packets
/// leave through: `lo` for what [`leaves_by_lo`] sends there, else the
/// device the socket is bound to, else its route's.
#[inline(always)]
pub fn leaves_excluded<A: Addr>(
    input: &ConnectInput<A>,
    cfg: &RedirectConfig,
    maps: &impl Lookups<A>,
) -> bool {
    let dst = input.effective_dst();
    if leaves_by_lo(input, dst, maps) {
        excluded_iface(cfg, LOOPBACK_IFINDEX)
    } else if input.bound_dev != 0 {
        excluded_iface(cfg, input.bound_dev)
    } else {
        maps.route_excluded(dst)
    }
}

/// Whether `-c` names the interface of index `ifindex`.
#[inline(always)]
fn excluded_iface(cfg: &RedirectConfig, ifindex: u32) -> bool {
    contains(&cfg.exclude_ifindex, cfg.exclude_iface_count, ifindex)
}

/// `lo` is interface 1 in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// The facts about one inbound TCP connection (its SYN) that the inbound
/// decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct InboundInput<A = u32> {
    /// Source address.
    pub src_ip: A,
    /// Destination (local) port, host byte order.
    pub dst_port: u16,
    /// The interface it arrived on (0: unknown, before kernel 5.17 or
    /// after the SYN).
    pub ifindex: u32,
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
/// -A PREROUTING -i X -j RETURN                        for X in -c          (inbound_bypass_interface)
/// -A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN                          (inbound_bypass_tunnel)
/// -A ISTIO_INBOUND -p tcp --dport P -j RETURN         for P in -d, -b '*'  (inbound_bypass_port)
/// -A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT        -b '*'               (inbound_captured)
/// -A ISTIO_INBOUND -p tcp --dport P -j ISTIO_IN_REDIRECT  for P in -b      (inbound_captured)
///                                                     otherwise            (inbound_not_included)
/// -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
/// ```
///
/// A connection from the pod to itself (source 127.0.0.0/8 or a pod
/// address) is never captured here: locally generated traffic does not
/// traverse nat `PREROUTING` (inbound_local).
#[inline(always)]
pub fn decide_inbound<A: Addr>(
    input: &InboundInput<A>,
    cfg: &RedirectConfig,
    maps: &impl Lookups<A>,
) -> InboundVerdict {
    if cfg.flags & CFG_INBOUND == 0 {
        return InboundVerdict::Bypass(Counter::InboundNotIncluded);
    }
    if A::IS_V6 && !ipv6_rules(cfg) {
        return InboundVerdict::Bypass(Counter::NotIpv4);
    }
    if cfg.flags & CFG_EXCLUDE_IFACES != 0 && excluded_iface(cfg, input.ifindex) {
        return InboundVerdict::Bypass(Counter::InboundBypassInterface);
    }
    if is_local(input.src_ip, maps) {
        return InboundVerdict::Bypass(Counter::InboundLocal);
    }
    maps.inbound_ports(cfg, input.dst_port)
}

/// The port rules of the inbound chain (after its source rules).
#[inline(always)]
pub fn inbound_port_rules<A>(
    port: u16,
    cfg: &RedirectConfig,
    maps: &impl Lookups<A>,
) -> InboundVerdict {
    if port == cfg.tunnel_port {
        return InboundVerdict::Bypass(Counter::InboundBypassTunnel);
    }
    let ports = port_lists(port, cfg.flags & CFG_PORT_RANGES != 0, maps);
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

impl InboundVerdict {
    /// What [`inbound_port_rules`] returned, as one scalar (for a BPF
    /// global function): 0 capture, 1 the tunnel port, 2 a port of `-d`,
    /// 3 not included.
    #[inline(always)]
    pub fn port_rule_code(self) -> u64 {
        match self {
            Self::Capture => 0,
            Self::Bypass(Counter::InboundBypassTunnel) => 1,
            Self::Bypass(Counter::InboundBypassPort) => 2,
            Self::Bypass(_) => 3,
        }
    }

    /// The verdict of [`Self::port_rule_code`] (anything else: not
    /// included).
    #[inline(always)]
    pub fn from_port_rule_code(code: u64) -> Self {
        match code {
            0 => Self::Capture,
            1 => Self::Bypass(Counter::InboundBypassTunnel),
            2 => Self::Bypass(Counter::InboundBypassPort),
            _ => Self::Bypass(Counter::InboundNotIncluded),
        }
    }
}

/// What the `-o lo` owner rules need to know about one connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerFacts {
    pub uid: u32,
    pub gid: u32,
    /// `-o lo ! -d LO -p tcp ! --dport TUNNEL` (and, with DNS capture,
    /// `! --dport 53`) holds, in the UID form.
    pub hairpin_uid: bool,
    /// The same in the GID form.
    pub hairpin_gid: bool,
    /// `-o lo -m owner ! --uid-owner X -j RETURN` is in the chain (and `-o lo` holds).
    pub return_others: bool,
}

impl OwnerFacts {
    /// As two scalars, for a BPF global function: the owner, and the
    /// flags beside `extra` (which the caller passes through).
    #[inline(always)]
    pub fn pack(self, extra: u32) -> (u64, u64) {
        let flags = u64::from(self.hairpin_uid)
            | u64::from(self.hairpin_gid) << 1
            | u64::from(self.return_others) << 2;
        (
            u64::from(self.uid) << 32 | u64::from(self.gid),
            u64::from(extra) << 8 | flags,
        )
    }

    /// The facts of [`Self::pack`], and its `extra`.
    #[inline(always)]
    pub fn unpack(owner: u64, flags: u64) -> (Self, u32) {
        let facts = Self {
            uid: (owner >> 32) as u32,
            gid: owner as u32,
            hairpin_uid: flags & 1 != 0,
            hairpin_gid: flags & 2 != 0,
            return_others: flags & 4 != 0,
        };
        (facts, (flags >> 8) as u32)
    }
}

/// Which of the proxy's owner rules a connect meets first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum OwnerMatch {
    /// None: the chain goes on.
    None = 0,
    /// `-o lo ! -d LO -m owner --uid-owner X -j ISTIO_IN_REDIRECT` (or
    /// `--gid-owner`).
    Hairpin = 1,
    /// `-o lo -m owner ! --uid-owner X -j RETURN` (or `--gid-owner`).
    ReturnOthers = 2,
    /// `-m owner --uid-owner X -j RETURN`.
    ProxyUid = 3,
    /// `-m owner --gid-owner X -j RETURN`.
    ProxyGid = 4,
}

impl OwnerMatch {
    /// The match a global function returned as [`OwnerMatch`]`as u64`.
    #[inline(always)]
    pub fn from_u64(value: u64) -> Self {
        match value {
            1 => Self::Hairpin,
            2 => Self::ReturnOthers,
            3 => Self::ProxyUid,
            4 => Self::ProxyGid,
            _ => Self::None,
        }
    }
}

/// The three rules istio-iptables adds for each proxy UID `X`, in order
/// (the hairpin to the inbound port when `hairpin_uid` holds, the return
/// of other owners' local traffic, the return of the proxy's own), then
/// the same three for each proxy GID: the first that matches.
#[inline(always)]
pub fn owner_match(cfg: &RedirectConfig, facts: OwnerFacts) -> OwnerMatch {
    let by_uid = owner_rules(
        (&cfg.proxy_uids, cfg.uid_count, facts.uid),
        facts.hairpin_uid,
        facts.return_others,
        OwnerMatch::ProxyUid,
    );
    if by_uid != OwnerMatch::None {
        return by_uid;
    }
    owner_rules(
        (&cfg.proxy_gids, cfg.gid_count, facts.gid),
        facts.hairpin_gid,
        facts.return_others,
        OwnerMatch::ProxyGid,
    )
}

/// The three rules for each of the first `count` entries of `ids`, walked
/// in order (`owners_own`: the last one's match), come down to this: with the return of other owners' traffic
/// in the chain, the first entry decides (its own rules if it is the
/// owner, else `! --uid-owner X -j RETURN`); without it, any entry that is
/// the owner does. (Written so rather than as the walk, whose three exits
/// per entry the verifier followed for every path into it; the walk is
/// the reference of a property test.)
#[inline(always)]
fn owner_rules(
    (ids, count, id): (&[u32; MAX_OWNERS], u32, u32),
    hairpin: bool,
    return_others: bool,
    owners_own: OwnerMatch,
) -> OwnerMatch {
    if count == 0 {
        return OwnerMatch::None;
    }
    let owner = if return_others {
        ids[0] == id
    } else {
        contains(ids, count, id)
    };
    if !owner {
        if return_others {
            OwnerMatch::ReturnOthers
        } else {
            OwnerMatch::None
        }
    } else if hairpin {
        OwnerMatch::Hairpin
    } else {
        owners_own
    }
}

/// Whether `id` is among the first `count` entries of `set` (a bounded loop
/// the verifier accepts on every supported kernel).
#[inline(always)]
pub(crate) fn contains<const N: usize>(set: &[u32; N], count: u32, id: u32) -> bool {
    let mut i = 0;
    while i < N {
        if (i as u32) < count && set[i] == id {
            return true;
        }
        i += 1;
    }
    false
}
