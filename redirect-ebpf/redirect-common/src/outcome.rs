//! One outbound connect's decision as plain integers: the programs decide
//! through a BPF global function, which the verifier checks once, for any
//! input, instead of once for every path of the program around it. Such a
//! function takes and returns scalars only (at most five), so an IPv4
//! input travels as three `u64`s and its answer as one; an IPv6 input as
//! five, its answer as one and, for a source to bind, an address the
//! function leaves where the caller reads it.

use crate::{
    Addr, ConnectInput, Counter, Ip6, Lookups, RedirectConfig, Source, Verdict, decide_connect,
    redirect_source,
};

/// What a program does with one connect (or UDP send).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome<A = u32> {
    /// The port on 127.0.0.1 (`::1`) to send it to; 0: leave it alone.
    pub port: u16,
    /// The counter of the rule that decided it (a [`Counter`] as its index).
    pub counter: u32,
    /// The source to bind the socket to first; unspecified: the kernel's
    /// choice (see [`redirect_source`]).
    pub source: A,
}

/// [`decide_connect`], then for a redirect [`redirect_source`]: a connect
/// the kernel refuses before any rule runs is left alone, to fail as it
/// would (`kernel_refuses`).
#[inline(always)]
pub fn decide_outcome<A: Addr>(
    input: &ConnectInput<A>,
    cfg: &RedirectConfig,
    maps: &impl Lookups<A>,
) -> Outcome<A> {
    outcome_of(decide_connect(input, cfg, maps), || {
        redirect_source(input, cfg, maps)
    })
}

/// The outcome of `verdict`, asking `source` ([`redirect_source`]) only for
/// a redirect (the programs ask it through a global function of its own,
/// which the verifier then checks once, not once per rule that redirects).
#[inline(always)]
pub fn outcome_of<A: Addr>(verdict: Verdict, source: impl FnOnce() -> Source<A>) -> Outcome<A> {
    let left = |counter: Counter| Outcome {
        port: 0,
        counter: counter as u32,
        source: A::UNSPECIFIED,
    };
    match verdict {
        Verdict::Bypass(counter) => left(counter),
        Verdict::Redirect { port, counter } => match source() {
            Source::Refused => left(Counter::KernelRefuses),
            Source::LinkLocal => left(Counter::LinkLocal),
            Source::Bind(source) => Outcome {
                port,
                counter: counter as u32,
                source,
            },
            Source::Kernel => Outcome {
                port,
                counter: counter as u32,
                source: A::UNSPECIFIED,
            },
        },
    }
}

/// What the decision's global function returns when no configuration is in
/// force (no counter index packs to it).
pub const OUTCOME_INACTIVE: u64 = u64::MAX;

impl<A> Outcome<A> {
    /// Port in bits 0-15, counter 16-23, the configuration's log level
    /// 24-31 (for the caller's event report).
    #[inline(always)]
    const fn head(&self, log_level: u8) -> u64 {
        self.port as u64 | (self.counter as u64) << 16 | (log_level as u64) << 24
    }
}

impl Outcome<Ip6> {
    /// The port, counter and log level, as [`Outcome::pack`] packs them;
    /// the source travels apart.
    #[inline(always)]
    pub const fn pack_head(&self, log_level: u8) -> u64 {
        self.head(log_level)
    }

    /// The outcome [`Outcome::pack_head`] packed, with `source`; `None`
    /// for [`OUTCOME_INACTIVE`].
    #[inline(always)]
    pub const fn unpack_head(packed: u64, source: Ip6) -> Option<(Self, u8)> {
        match Outcome::unpack(packed) {
            Some((head, level)) => Some((
                Self {
                    port: head.port,
                    counter: head.counter,
                    source,
                },
                level,
            )),
            None => None,
        }
    }
}

impl Outcome {
    /// Port in bits 0-15, counter 16-23, the configuration's log level
    /// 24-31 (for the caller's event report), source 32-63.
    #[inline(always)]
    pub const fn pack(self, log_level: u8) -> u64 {
        self.head(log_level) | (self.source as u64) << 32
    }

    /// The outcome and log level [`Outcome::pack`] packed; `None` for
    /// [`OUTCOME_INACTIVE`].
    #[inline(always)]
    pub const fn unpack(packed: u64) -> Option<(Self, u8)> {
        if packed == OUTCOME_INACTIVE {
            return None;
        }
        Some((
            Self {
                port: packed as u16,
                counter: ((packed >> 16) & 0xff) as u32,
                source: (packed >> 32) as u32,
            },
            (packed >> 24) as u8,
        ))
    }
}

impl ConnectInput {
    /// This input as the decision's global function takes it: the
    /// `bpf_get_current_uid_gid()` value (gid << 32 | uid), the destination
    /// (address << 32 | port << 16 | [`type_and_pod`]) and the socket's
    /// own end (bound address << 32 | bound device).
    #[inline(always)]
    pub const fn pack(&self) -> [u64; 3] {
        [
            (self.gid as u64) << 32 | self.uid as u64,
            (self.dst_ip as u64) << 32
                | (self.dst_port as u64) << 16
                | type_and_pod(self.sock_type, self.pod) as u64,
            (self.src_ip as u64) << 32 | self.bound_dev as u64,
        ]
    }

    /// The input [`ConnectInput::pack`] packed.
    #[inline(always)]
    pub const fn unpack(owner: u64, dst: u64, src: u64) -> Self {
        let bound_dev = src as u32;
        let (sock_type, pod) = type_and_pod_of(dst as u16);
        Self {
            sock_type,
            uid: owner as u32,
            gid: (owner >> 32) as u32,
            dst_ip: (dst >> 32) as u32,
            dst_port: (dst >> 16) as u16,
            src_ip: (src >> 32) as u32,
            dev_lo: bound_dev == crate::LOOPBACK_IFINDEX,
            bound_dev,
            pod,
        }
    }
}

/// The first word of [`ConnectInput::<Ip6>::pack`] with its port's bits
/// carrying `slot` instead: what the IPv6 source's global function takes
/// (it has no sixth argument for the slot, and the source does not
/// depend on the port), so that it reads the configuration the decision
/// read. Slots are below 2 × [`crate::MAX_PODS`], well within 16 bits.
#[inline(always)]
pub const fn meta_with_slot(meta: u64, slot: u32) -> u64 {
    meta & !(0xffff << 32) | ((slot & 0xffff) as u64) << 32
}

/// The slot [`meta_with_slot`] put in `meta`.
#[inline(always)]
pub const fn slot_of_meta(meta: u64) -> u32 {
    (meta >> 32) as u16 as u32
}

/// The socket type (4 bits, the kernel's `SOCK_TYPE_MASK`) and the pod (12 bits, below [`crate::MAX_PODS`]) in one 16-bit field of
/// the decision's packed input.
#[inline(always)]
pub const fn type_and_pod(sock_type: u32, pod: u32) -> u16 {
    ((pod & 0xfff) << 4 | (sock_type & 0xf)) as u16
}

/// The socket type and pod [`type_and_pod`] packed.
#[inline(always)]
pub const fn type_and_pod_of(packed: u16) -> (u32, u32) {
    ((packed & 0xf) as u32, (packed >> 4) as u32)
}

impl ConnectInput<Ip6> {
    /// This input as the IPv6 decision's global function takes it (the
    /// caller's uid and gid it reads itself): the socket type and pod, port
    /// and bound device ([`type_and_pod`] << 48 | port << 32 | device),
    /// then the destination's and the bound address's halves.
    #[inline(always)]
    pub const fn pack(&self) -> [u64; 5] {
        let [dst_hi, dst_lo] = self.dst_ip.halves();
        let [src_hi, src_lo] = self.src_ip.halves();
        [
            (type_and_pod(self.sock_type, self.pod) as u64) << 48
                | (self.dst_port as u64) << 32
                | self.bound_dev as u64,
            dst_hi,
            dst_lo,
            src_hi,
            src_lo,
        ]
    }

    /// The input [`ConnectInput::<Ip6>::pack`] packed, with the caller's
    /// `bpf_get_current_uid_gid()` value.
    #[inline(always)]
    pub const fn unpack(owner: u64, packed: [u64; 5]) -> Self {
        let [meta, dst_hi, dst_lo, src_hi, src_lo] = packed;
        let bound_dev = meta as u32;
        let (sock_type, pod) = type_and_pod_of((meta >> 48) as u16);
        Self {
            sock_type,
            uid: owner as u32,
            gid: (owner >> 32) as u32,
            dst_ip: Ip6::from_halves(dst_hi, dst_lo),
            dst_port: (meta >> 32) as u16,
            src_ip: Ip6::from_halves(src_hi, src_lo),
            dev_lo: bound_dev == crate::LOOPBACK_IFINDEX,
            bound_dev,
            pod,
        }
    }
}

impl<A> Source<A> {
    /// This source's kind as the source's global function returns it (the
    /// address apart): 0 kernel, 1 bind, 2 refused, 3 link-local.
    #[inline(always)]
    pub const fn kind(&self) -> u64 {
        match self {
            Self::Kernel => 0,
            Self::Bind(_) => 1,
            Self::Refused => 2,
            Self::LinkLocal => 3,
        }
    }

    /// The source of kind `kind` ([`Source::kind`]) binding to `addr`.
    #[inline(always)]
    pub fn from_kind(kind: u64, addr: A) -> Self {
        match kind {
            0 => Self::Kernel,
            1 => Self::Bind(addr),
            3 => Self::LinkLocal,
            _ => Self::Refused,
        }
    }
}

impl Source {
    /// An IPv4 source as one scalar: its kind in the low byte, its address
    /// in the high half.
    #[inline(always)]
    pub const fn pack(&self) -> u64 {
        let addr = match self {
            Self::Bind(addr) => *addr,
            _ => 0,
        };
        self.kind() | (addr as u64) << 32
    }

    /// The source [`Source::pack`] packed.
    #[inline(always)]
    pub fn unpack(packed: u64) -> Self {
        Self::from_kind(packed & 0xff, (packed >> 32) as u32)
    }
}
