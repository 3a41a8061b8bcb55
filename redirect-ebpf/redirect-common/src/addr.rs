//! The two address families Istio writes its rules for. The decisions are
//! written once, over [`Addr`]; the IPv4 table's constants (`127.0.0.1/32`
//! or the configured loopback network, `127.0.0.6`) and the IPv6 table's
//! (`::1/128`, `::6`) are the only difference, as between istio-iptables'
//! two restore documents.

use crate::abi::{LOCALHOST, MAX_DNS_SERVERS, PASSTHROUGH_SRC, RedirectConfig};

/// An IPv6 address as the kernel hands it to programs: four words, each
/// in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Ip6(pub [u32; 4]);

impl Ip6 {
    /// `::1`.
    pub const LOOPBACK: Self = Self([0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]);
    /// `::6`: the source of the proxy's inbound passthrough connections.
    pub const PASSTHROUGH: Self = Self([0, 0, 0, u32::from_ne_bytes([0, 0, 0, 6])]);

    /// The address's 16 bytes.
    #[inline(always)]
    pub const fn octets(self) -> [u8; 16] {
        let w = self.0;
        let (a, b, c, d) = (
            w[0].to_ne_bytes(),
            w[1].to_ne_bytes(),
            w[2].to_ne_bytes(),
            w[3].to_ne_bytes(),
        );
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    }

    /// The address of 16 bytes.
    #[inline(always)]
    pub const fn from_octets(o: [u8; 16]) -> Self {
        Self([
            u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
            u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
            u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
            u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
        ])
    }

    /// The two halves as `u64`s (how the decision's global function takes
    /// an address), and back.
    #[inline(always)]
    pub const fn halves(self) -> [u64; 2] {
        let w = self.0;
        [
            (w[0] as u64) << 32 | w[1] as u64,
            (w[2] as u64) << 32 | w[3] as u64,
        ]
    }

    #[inline(always)]
    pub const fn from_halves(hi: u64, lo: u64) -> Self {
        Self([(hi >> 32) as u32, hi as u32, (lo >> 32) as u32, lo as u32])
    }

    #[inline(always)]
    const fn first_byte(self) -> u8 {
        self.0[0].to_ne_bytes()[0]
    }
}

/// What the rules need to know about an address of one family.
pub trait Addr: Copy + PartialEq {
    /// `0.0.0.0`, `::`.
    const UNSPECIFIED: Self;
    /// Whether this is IPv6: its rules exist only with [`crate::CFG_IPV6`].
    const IS_V6: bool;
    /// The address as the records keep it: an IPv6 address, or an IPv4
    /// one mapped (`::ffff:a.b.c.d`).
    fn words(self) -> [u32; 4];
    /// A loopback address, local whatever the interfaces: 127.0.0.0/8, `::1`.
    fn is_loopback(self) -> bool;
    /// 224.0.0.0/4, ff00::/8.
    fn is_multicast(self) -> bool;
    /// 255.255.255.255 (IPv6 has none).
    fn is_broadcast(self) -> bool;
    /// An address a connect must name an interface for (its scope, which
    /// the connect hooks cannot see), unless the socket is bound to one:
    /// link-local unicast (fe80::/10) and interface- or link-local
    /// multicast (ffx1::/16, ffx2::/16), as the kernel's
    /// `__ipv6_addr_needs_scope_id` says. IPv4 has none.
    fn needs_scope(self) -> bool;
    /// `-s 127.0.0.6/32`, `-s ::6/128`: the proxy's passthrough source.
    fn is_passthrough(self) -> bool;
    /// `-d 127.0.0.1/32` (the configured IPv4 loopback network), `-d ::1/128`.
    fn in_loopback_cidr(self, cfg: &RedirectConfig) -> bool;
    /// `-d NS` for a resolv.conf nameserver of this family.
    fn is_nameserver(self, cfg: &RedirectConfig) -> bool;
    /// The source the kernel gives a socket bound to `lo` toward a
    /// non-loopback address (unspecified: the kernel's own choice stands).
    fn lo_source(cfg: &RedirectConfig) -> Self;
    /// The destination the kernel connects to when asked for `dst` by a
    /// socket bound to `src`: `0.0.0.0` is the bound address or 127.0.0.1,
    /// `::` is `::1`.
    fn effective_dst(dst: Self, src: Self) -> Self;
}

impl Addr for u32 {
    const UNSPECIFIED: Self = 0;
    const IS_V6: bool = false;

    #[inline(always)]
    fn words(self) -> [u32; 4] {
        crate::to_v4_mapped(self)
    }

    #[inline(always)]
    fn is_loopback(self) -> bool {
        self.to_ne_bytes()[0] == 127
    }

    #[inline(always)]
    fn is_multicast(self) -> bool {
        self.to_ne_bytes()[0] & 0xf0 == 224
    }

    #[inline(always)]
    fn is_broadcast(self) -> bool {
        self == u32::MAX
    }

    #[inline(always)]
    fn needs_scope(self) -> bool {
        false
    }

    #[inline(always)]
    fn is_passthrough(self) -> bool {
        self == PASSTHROUGH_SRC
    }

    #[inline(always)]
    fn in_loopback_cidr(self, cfg: &RedirectConfig) -> bool {
        self & cfg.loopback_mask == cfg.loopback_addr & cfg.loopback_mask
    }

    #[inline(always)]
    fn is_nameserver(self, cfg: &RedirectConfig) -> bool {
        crate::decide::contains(&cfg.dns_servers, u32::from(cfg.dns_server_count), self)
    }

    #[inline(always)]
    fn lo_source(cfg: &RedirectConfig) -> Self {
        cfg.lo_source
    }

    #[inline(always)]
    fn effective_dst(dst: Self, src: Self) -> Self {
        match (dst, src) {
            (0, 0) => LOCALHOST,
            (0, src) => src,
            (dst, _) => dst,
        }
    }
}

impl Addr for Ip6 {
    const UNSPECIFIED: Self = Self([0; 4]);
    const IS_V6: bool = true;

    #[inline(always)]
    fn words(self) -> [u32; 4] {
        self.0
    }

    #[inline(always)]
    fn is_loopback(self) -> bool {
        self == Self::LOOPBACK
    }

    #[inline(always)]
    fn is_multicast(self) -> bool {
        self.first_byte() == 0xff
    }

    #[inline(always)]
    fn is_broadcast(self) -> bool {
        false
    }

    #[inline(always)]
    fn needs_scope(self) -> bool {
        let b = self.0[0].to_ne_bytes();
        let link_local = b[0] == 0xfe && b[1] & 0xc0 == 0x80;
        let scope = b[1] & 0x0f;
        link_local || (b[0] == 0xff && (scope == 1 || scope == 2))
    }

    #[inline(always)]
    fn is_passthrough(self) -> bool {
        self == Self::PASSTHROUGH
    }

    #[inline(always)]
    fn in_loopback_cidr(self, _cfg: &RedirectConfig) -> bool {
        self == Self::LOOPBACK
    }

    #[inline(always)]
    fn is_nameserver(self, cfg: &RedirectConfig) -> bool {
        let mut i = 0;
        while i < MAX_DNS_SERVERS {
            if (i as u32) < cfg.dns_server6_count && cfg.dns_servers6[i] == self.0 {
                return true;
            }
            i += 1;
        }
        false
    }

    #[inline(always)]
    fn lo_source(cfg: &RedirectConfig) -> Self {
        Self(cfg.lo_source6)
    }

    #[inline(always)]
    fn effective_dst(dst: Self, _src: Self) -> Self {
        if dst == Self::UNSPECIFIED {
            Self::LOOPBACK
        } else {
            dst
        }
    }
}
