//! Checks that this process may load and attach eBPF programs, so that a
//! missing privilege is reported as such instead of as a syscall error.

use anyhow::{Result, bail};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The oldest kernel whose verifier accepts every program with CAP_BPF and
/// CAP_NET_ADMIN alone (tested: 6.12 and 7.2). 5.10 and 6.1 refuse a
/// partial overwrite of a stack slot that holds a spilled 4-byte scalar
/// ("attempt to corrupt spilled pointer on stack") unless the loader also
/// has CAP_PERFMON.
const LEAST_PRIVILEGE_KERNEL: (u8, u8) = (6, 12);

/// Effective capability bits of the calling thread (`capget(2)`; 0 when
/// the kernel refuses, which reads as "no capabilities"). A system call
/// instead of `/proc/self/status`, whose text costs each pod's add tens of
/// microseconds.
fn effective() -> u64 {
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: a version-3 header and the two data structs that version
    // fills, both this function's.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    u64::from(data[0].effective) | (u64::from(data[1].effective) << 32)
}

/// Loading and attaching the programs needs CAP_SYS_ADMIN, or CAP_BPF
/// with CAP_NET_ADMIN, plus CAP_PERFMON on kernels older than 6.12 (see
/// [`LEAST_PRIVILEGE_KERNEL`]).
pub fn check_ebpf() -> Result<()> {
    check_capabilities(true)?;
    check_bpf_syscall()
}

/// Writing a loaded node set's maps and linking its pinned sk_lookup
/// program into a pod's namespace (a pod's add or removal) needs
/// CAP_SYS_ADMIN, or CAP_BPF with CAP_NET_ADMIN: nothing is verified, so
/// no CAP_PERFMON, and no probe load (a tenth of a millisecond of each
/// pod's add). A seccomp profile refusing `bpf()` shows in the first map
/// opened: see [`explain_denied`].
pub fn check_map_access() -> Result<()> {
    check_capabilities(false)
}

/// `err` from a `bpf()` call after [`check_map_access`] passed: an EPERM
/// there is a seccomp profile, said as [`check_ebpf`] says it.
pub fn explain_denied(err: anyhow::Error) -> anyhow::Error {
    let denied = err
        .chain()
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| e.raw_os_error() == Some(libc::EPERM));
    if denied {
        anyhow::anyhow!(SECCOMP_DENIED)
    } else {
        err
    }
}

const SECCOMP_DENIED: &str = "permission denied: the bpf() system call is refused although the \
    capabilities are there, so a seccomp profile blocks it: run the container with a profile that \
    allows bpf(), or add CAP_SYS_ADMIN (the runtimes' default profiles allow bpf() with it)";

/// `verifier`: the caller loads programs, which kernels before
/// [`LEAST_PRIVILEGE_KERNEL`] verify only with CAP_PERFMON too.
fn check_capabilities(verifier: bool) -> Result<()> {
    let caps = effective();
    let has = |cap: u32| caps & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) {
        return Ok(());
    }
    if !(has(CAP_BPF) && has(CAP_NET_ADMIN)) {
        bail!(
            "permission denied: loading and attaching eBPF programs needs root, or CAP_BPF and \
             CAP_NET_ADMIN: run as root or grant those capabilities"
        );
    }
    let (major, minor) = LEAST_PRIVILEGE_KERNEL;
    let old = aya::util::KernelVersion::current()
        .is_ok_and(|k| k < aya::util::KernelVersion::new(major, minor, 0));
    if verifier && old && !has(CAP_PERFMON) {
        bail!(
            "permission denied: on kernels older than {major}.{minor} the verifier also needs CAP_PERFMON \
             to accept these programs: grant CAP_PERFMON as well, or run as root"
        );
    }
    Ok(())
}

/// With the capabilities in place, the `bpf()` system call itself can
/// still be refused, by a seccomp profile: the container runtimes' default
/// profiles allow it only to CAP_SYS_ADMIN. Tells that apart from a kernel
/// without the feature (a two-instruction socket filter loads everywhere).
fn check_bpf_syscall() -> Result<()> {
    const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
    // Before 5.11 a load over RLIMIT_MEMLOCK also fails with EPERM.
    raise_memlock();
    match super::sys::probe_hook(BPF_PROG_TYPE_SOCKET_FILTER, 0) {
        Err(err) if err.raw_os_error() == Some(libc::EPERM) && memlock_limited() => bail!(
            "permission denied: kernels before 5.11 charge eBPF programs and maps to \
             RLIMIT_MEMLOCK, and this process's limit is too low and cannot be raised: raise it \
             (`ulimit -l unlimited`, or a container's `--ulimit memlock=-1`) or grant CAP_SYS_RESOURCE"
        ),
        Err(err) if err.raw_os_error() == Some(libc::EPERM) => bail!(SECCOMP_DENIED),
        _ => Ok(()),
    }
}

/// Whether eBPF memory is charged to a finite RLIMIT_MEMLOCK here
/// (kernels before 5.11 charge it; later ones use the memory cgroup).
fn memlock_limited() -> bool {
    let old = aya::util::KernelVersion::current()
        .is_ok_and(|k| k < aya::util::KernelVersion::new(5, 11, 0));
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit buffer.
    let read = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } == 0;
    old && read && limit.rlim_cur != libc::RLIM_INFINITY
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK: lift it when allowed.
pub fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid rlimit struct; failure is harmless (5.11+ does not need it).
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

#[cfg(test)]
mod tests {
    use anyhow::Context as _;

    use super::*;

    /// `capget(2)` gives the capabilities the kernel shows as `CapEff` in
    /// /proc/self/status (what the check read before).
    #[test]
    fn effective_capabilities_are_the_kernels() {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        let shown = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .expect("CapEff in /proc/self/status");
        assert_eq!(effective(), shown);
    }

    #[test]
    fn an_eperm_from_bpf_after_the_capability_check_is_the_seccomp_profile() {
        let denied: Result<()> = Err(std::io::Error::from_raw_os_error(libc::EPERM))
            .context("opening pinned map /sys/fs/bpf/redirect/@set-node/RDR_POD_META");
        let said = explain_denied(denied.unwrap_err()).to_string();
        assert!(said.contains("a seccomp profile blocks it"), "{said}");

        let missing: Result<()> = Err(std::io::Error::from_raw_os_error(libc::ENOENT))
            .context("opening pinned map /sys/fs/bpf/redirect/@set-node/RDR_POD_META");
        let said = format!("{:#}", explain_denied(missing.unwrap_err()));
        assert!(said.starts_with("opening pinned map"), "{said}");
    }
}
