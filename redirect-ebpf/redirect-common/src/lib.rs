//! What the eBPF programs and user space share: the ABI ([`abi`]: every
//! map key and value, the configuration entry, the counters), the capture
//! decisions ([`decide`]) and the socket-level answers ([`sockopt`]).
//!
//! The decisions are pure functions so that they can be unit-tested on the
//! host; the programs only copy the context fields in and apply the verdict.
//!
//! Byte order: IPv4 addresses are kept as the kernel hands them to eBPF
//! programs, in network byte order inside a `u32` (build one with
//! `u32::from_ne_bytes(addr.octets())`); IPv6 ones as four such words
//! ([`Ip6`]). Records and tuples hold either as IPv6, an IPv4 address
//! mapped (`::ffff:a.b.c.d`). Ports are always host byte order here; the
//! programs convert at the context boundary.

#![cfg_attr(not(test), no_std)]

pub mod abi;
pub mod addr;
pub mod decide;
pub mod outcome;
pub mod sockopt;
pub mod virt;

pub use abi::*;
pub use addr::*;
pub use decide::*;
pub use outcome::*;
pub use sockopt::*;
pub use virt::*;

#[cfg(feature = "user")]
mod user {
    // SAFETY: all three are #[repr(C)] plain integers without padding
    // (bytemuck::Pod's derive checks this at compile time).
    unsafe impl aya::Pod for super::RedirectConfig {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ConnTuple {}
    unsafe impl aya::Pod for super::RouteEntry6 {}
    unsafe impl aya::Pod for super::InstanceMeta {}
    unsafe impl aya::Pod for super::PodMeta {}
    unsafe impl aya::Pod for super::VirtIface {}
}

#[cfg(test)]
mod tests;
