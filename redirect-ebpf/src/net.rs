//! Socket addresses as the programs read them from their contexts.

use aya_ebpf::bindings::bpf_sock;
use redirect_common::to_v4_mapped;

/// Return value of a cgroup sock_addr program that lets the syscall proceed.
pub(crate) const ALLOW: i32 = 1;
pub(crate) const AF_INET: u32 = 2;
pub(crate) const AF_INET6: u32 = 10;
pub(crate) const IPPROTO_TCP: u32 = 6;

/// Reads an IPv6 address from a context, one 4-byte load per word (the
/// verifier refuses wider loads of these fields on older kernels).
#[inline(always)]
pub(crate) fn read_ip6(words: *const [u32; 4]) -> [u32; 4] {
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

/// Writes an IPv6 address into a context field, one 4-byte store per word.
#[inline(always)]
pub(crate) fn write_ip6(w: *mut u32, ip: [u32; 4]) {
    // SAFETY: `w` points at a writable 16-byte context field.
    unsafe {
        core::ptr::write_volatile(w, ip[0]);
        core::ptr::write_volatile(w.add(1), ip[1]);
        core::ptr::write_volatile(w.add(2), ip[2]);
        core::ptr::write_volatile(w.add(3), ip[3]);
    }
}

/// The local and remote ends of a socket seen from a cgroup hook, each
/// address as IPv6 (an AF_INET socket's mapped, `::ffff:a.b.c.d`, as a
/// dual-stack socket's IPv4 ends are): (local ip, local port, remote ip,
/// remote port) with host-order ports.
#[inline(always)]
pub(crate) fn sock_ends(sk: *const bpf_sock) -> Option<([u32; 4], u16, [u32; 4], u16)> {
    if sk.is_null() {
        return None;
    }
    // SAFETY: non-null socket pointer from the context.
    let sk = unsafe { &*sk };
    let (local, remote) = match sk.family {
        AF_INET => (to_v4_mapped(sk.src_ip4), to_v4_mapped(sk.dst_ip4)),
        AF_INET6 => (
            read_ip6(&raw const sk.src_ip6),
            read_ip6(&raw const sk.dst_ip6),
        ),
        _ => return None,
    };
    Some((local, sk.src_port as u16, remote, u16::from_be(sk.dst_port)))
}
