//! Anonymous network namespaces held by a file descriptor.

use std::{fs::File, os::fd::OwnedFd};

use anyhow::{Context as _, Result, anyhow};

/// Creates a new network namespace and returns a descriptor that keeps it
/// alive. It is never named under `/run/netns`: it disappears once this
/// descriptor and every process inside it are gone.
pub fn create() -> Result<OwnedFd> {
    // unshare() only changes the calling thread's namespace: do it on a
    // throw-away thread and keep a descriptor of the namespace it made.
    std::thread::spawn(|| -> Result<OwnedFd> {
        // SAFETY: affects only this short-lived thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET)");
        }
        let file = File::open("/proc/thread-self/ns/net").context("opening the new netns")?;
        Ok(OwnedFd::from(file))
    })
    .join()
    .map_err(|_| anyhow!("netns thread panicked"))?
}
