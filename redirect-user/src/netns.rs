//! The network namespace a capture is for: entering it (`--netns`), and
//! its own addresses.

use std::{fs::File, net::Ipv4Addr, os::fd::AsRawFd as _, path::Path};

use anyhow::{Context as _, Result, anyhow};

use crate::host::{Host as _, RealHost, pod_ipv4};

/// Moves this (still single-threaded) process into the network namespace
/// at `path` (a `/proc/PID/ns/net` or `/run/netns/NAME` file).
pub fn enter(path: &Path) -> Result<()> {
    let file = File::open(path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    // SAFETY: setns on a descriptor we own.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!(
                "entering network namespace {} (needs CAP_SYS_ADMIN)",
                path.display()
            )
        });
    }
    Ok(())
}

/// The IPv4 addresses of the calling thread's network namespace outside
/// 127/8: the pod's own addresses when run in the pod.
pub fn pod_addresses() -> Result<Vec<Ipv4Addr>> {
    let all = RealHost::new()
        .addresses()
        .context("listing the pod's addresses")?;
    Ok(pod_ipv4(&all))
}

/// Runs `f` in a new, empty network namespace (on a thread of its own, so
/// this process stays where it is), for child processes it starts: where
/// iptables and nftables mode learn what their rules look like once in
/// the kernel. `Ok(None)` when this process may not create one (no
/// CAP_SYS_ADMIN): the callers then go without.
pub fn in_scratch<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<Option<T>> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: affects only this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EPERM) {
                    return Ok(None);
                }
                return Err(err).context("creating a scratch network namespace");
            }
            f().map(Some)
        })
        .join()
        .map_err(|_| anyhow!("scratch namespace thread panicked"))?
    })
}
