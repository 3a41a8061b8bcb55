//! `tc` on each `-k` interface (TCX links, kernel 6.6): Istio's
//!
//! ```text
//! -I PREROUTING 1 -i X -j ISTIO_REDIRECT
//! -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
//! ```
//!
//! as the packet rewrite REDIRECT is: a TCP connection arriving on a
//! KubeVirt interface (a VM's traffic, bound anywhere) has its destination
//! changed to the interface's address and the proxy port, and the replies
//! their source changed back, as conntrack does. So the proxy's accepted
//! socket shows what it shows under iptables (its local address is the
//! interface's, its peer the VM), and `SO_ORIGINAL_DST` answers from the
//! record filed here. Everything else arriving there (other protocols,
//! replies to the pod's own connections) is left alone, as nat sees only a
//! connection's first packet.

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use redirect_common::{
    CFG_IPV6, CFG_VIRT_IFACES, ConnTuple, Counter, INSTANCE_POD, OrigDst, is_loopback6,
    redirect_target, to_v4_mapped, v4_mapped, virt_iface, virt_nat_key,
};

use crate::maps::{RDR_ORIG_TUPLE, active, count};

// What REDIRECT changed for each connection it took from a `-k` interface
// (conntrack's NAT entry, for both directions) is kept in the tuple map
// under `virt_nat_key`: an LRU map, so an entry outlives its connection
// until its room is reused, as a conntrack entry outlives it until its
// timeout.

/// "Not decided here": the next program of the interface, or the kernel,
/// goes on with the packet (`TCX_NEXT`, `TC_ACT_UNSPEC`).
const NEXT: i32 = -1;
const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// Offset of the checksum in the TCP header.
const TCP_CSUM: usize = 16;

/// A TCP segment's addresses (IPv4 ones mapped), host-order ports, flags,
/// and where its fields are.
struct Segment {
    v6: bool,
    src: [u32; 4],
    dst: [u32; 4],
    sport: u16,
    dport: u16,
    flags: u8,
    /// Offset of the TCP header.
    tcp: usize,
}

impl Segment {
    /// Offset of the source address (the destination's follows it).
    const fn src_at(&self) -> usize {
        if self.v6 { ETH_HLEN + 8 } else { ETH_HLEN + 12 }
    }

    const fn dst_at(&self) -> usize {
        if self.v6 {
            ETH_HLEN + 24
        } else {
            ETH_HLEN + 16
        }
    }
}

/// The TCP segment of an Ethernet frame; `None` for anything else (and for
/// IPv4 fragments and IPv6 extension headers, which conntrack would
/// reassemble or walk first: left alone).
#[inline(always)]
fn segment(ctx: &TcContext) -> Option<Segment> {
    let proto = u16::from_be(ctx.load::<u16>(12).ok()?);
    let (v6, src, dst, tcp) = if proto == ETH_P_IP {
        let ver_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
        let ihl = usize::from(ver_ihl & 0x0f) * 4;
        let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
        if ihl < 20 || frag & 0x3fff != 0 || ctx.load::<u8>(ETH_HLEN + 9).ok()? != IPPROTO_TCP {
            return None;
        }
        let src: u32 = ctx.load(ETH_HLEN + 12).ok()?;
        let dst: u32 = ctx.load(ETH_HLEN + 16).ok()?;
        (false, to_v4_mapped(src), to_v4_mapped(dst), ETH_HLEN + ihl)
    } else if proto == ETH_P_IPV6 {
        if ctx.load::<u8>(ETH_HLEN + 6).ok()? != IPPROTO_TCP {
            return None;
        }
        let src: [u32; 4] = ctx.load(ETH_HLEN + 8).ok()?;
        let dst: [u32; 4] = ctx.load(ETH_HLEN + 24).ok()?;
        (true, src, dst, ETH_HLEN + 40)
    } else {
        return None;
    };
    Some(Segment {
        v6,
        src,
        dst,
        sport: u16::from_be(ctx.load::<u16>(tcp).ok()?),
        dport: u16::from_be(ctx.load::<u16>(tcp + 2).ok()?),
        flags: ctx.load(tcp + 13).ok()?,
        tcp,
    })
}

/// The configuration's `-k` interface this packet crosses and the proxy
/// port, when the configuration in force has one and the packet's family
/// has rules.
#[inline(always)]
fn on_virt_iface(ctx: &TcContext, seg: &Segment) -> Option<(redirect_common::VirtIface, u16)> {
    let (cfg, _) = active(INSTANCE_POD)?;
    if cfg.flags & CFG_VIRT_IFACES == 0 || (seg.v6 && cfg.flags & CFG_IPV6 == 0) {
        return None;
    }
    // SAFETY: the context's socket buffer, valid for this run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Some((*virt_iface(cfg, ifindex)?, cfg.proxy_port))
}

/// `PREROUTING -i X -j ISTIO_REDIRECT` on a `-k` interface's ingress: a
/// connection's SYN is sent to the interface's address and the proxy port
/// (or dropped when the interface has no address of its family, as
/// REDIRECT drops it), and the rest of that connection follows it.
#[classifier]
pub fn redirect_virt_ingress(ctx: TcContext) -> i32 {
    let Some(seg) = segment(&ctx) else {
        return NEXT;
    };
    let Some((iface, proxy_port)) = on_virt_iface(&ctx, &seg) else {
        return NEXT;
    };
    if seg.v6 && is_loopback6(&seg.dst) {
        return NEXT; // the kernel drops it before any rule would see it
    }
    let Some(to) = redirect_target(&iface, &seg.dst) else {
        if seg.flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            count(INSTANCE_POD, Counter::VirtDropped);
            return TC_ACT_SHOT;
        }
        return NEXT;
    };
    let nat = virt_nat_key(INSTANCE_POD, seg.src, seg.sport, to, proxy_port);
    if seg.flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        let orig = OrigDst::new(seg.dst, seg.dport, proxy_port);
        if RDR_ORIG_TUPLE.insert(nat, orig, 0).is_err() {
            return NEXT;
        }
        // The record the proxy's end takes when it is established, as it
        // takes a redirected app connection's.
        let tuple = ConnTuple {
            client_ip: seg.src,
            server_ip: to,
            client_port: seg.sport,
            server_port: proxy_port,
            pod: INSTANCE_POD,
        };
        if RDR_ORIG_TUPLE.insert(tuple, orig, 0).is_ok() {
            count(INSTANCE_POD, Counter::TupleRecorded);
        }
        count(INSTANCE_POD, Counter::VirtRedirected);
    } else {
        // SAFETY: copied out before use.
        let Some(orig) = (unsafe { RDR_ORIG_TUPLE.get(nat) }).copied() else {
            return NEXT;
        };
        if orig.ip != seg.dst || orig.port != seg.dport {
            return NEXT;
        }
    }
    let _ = rewrite(
        &ctx,
        &seg,
        seg.dst_at(),
        seg.tcp + 2,
        seg.dst,
        to,
        proxy_port,
    );
    NEXT
}

/// Conntrack's reverse NAT on a `-k` interface's egress: what the proxy
/// sends on a connection REDIRECT took leaves from the original
/// destination, as the VM addressed it.
#[classifier]
pub fn redirect_virt_egress(ctx: TcContext) -> i32 {
    let Some(seg) = segment(&ctx) else {
        return NEXT;
    };
    let Some((_, proxy_port)) = on_virt_iface(&ctx, &seg) else {
        return NEXT;
    };
    if seg.sport != proxy_port {
        return NEXT;
    }
    let nat = virt_nat_key(INSTANCE_POD, seg.dst, seg.dport, seg.src, seg.sport);
    // SAFETY: copied out before use.
    let Some(orig) = (unsafe { RDR_ORIG_TUPLE.get(nat) }).copied() else {
        return NEXT;
    };
    let _ = rewrite(
        &ctx,
        &seg,
        seg.src_at(),
        seg.tcp,
        seg.src,
        orig.ip,
        orig.port,
    );
    NEXT
}

/// Replaces the address at `addr_at` (`from` -> `to`) and the port at
/// `port_at` with `port`, keeping the IPv4 header's and the TCP checksums
/// right (the addresses are in TCP's pseudo-header).
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    seg: &Segment,
    addr_at: usize,
    port_at: usize,
    from: [u32; 4],
    to: [u32; 4],
    port: u16,
) -> Result<(), aya_ebpf::cty::c_long> {
    let csum = seg.tcp + TCP_CSUM;
    let pseudo = u64::from(BPF_F_PSEUDO_HDR);
    if let (Some(old), Some(new)) = (v4_mapped(&from), v4_mapped(&to)) {
        ctx.l4_csum_replace(csum, u64::from(old), u64::from(new), pseudo | 4)?;
        ctx.l3_csum_replace(ETH_HLEN + 10, u64::from(old), u64::from(new), 4)?;
        ctx.store(addr_at, &new, 0)?;
    } else {
        let mut i = 0;
        while i < 4 {
            ctx.l4_csum_replace(csum, u64::from(from[i]), u64::from(to[i]), pseudo | 4)?;
            i += 1;
        }
        ctx.store(addr_at, &to, 0)?;
    }
    let old_port: u16 = ctx.load(port_at)?;
    let new_port = port.to_be();
    ctx.l4_csum_replace(csum, u64::from(old_port), u64::from(new_port), 2)?;
    ctx.store(port_at, &new_port, 0)?;
    Ok(())
}
