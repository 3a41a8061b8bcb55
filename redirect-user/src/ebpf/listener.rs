//! Finding the proxy's inbound listener when it was already listening
//! before the install (a reinstall from iptables mode, or `redirect
//! install` on a running pod).
//!
//! In the init-step order the proxy starts after the install, and the
//! sockops program registers its listener when it calls `listen()`. A
//! listener that already exists never makes that callback, so the loader
//! takes it over instead: it finds the socket listening on the inbound port
//! in the pod's network namespace (`/proc/thread-self/net/tcp{,6}`), the
//! process holding it (`/proc/<pid>/fd`), and duplicates it with
//! `pidfd_getfd` (kernel 5.6, needs ptrace rights over that process) to put
//! it in the listener map.

use std::{
    collections::HashSet,
    fs,
    os::fd::{FromRawFd as _, OwnedFd},
    os::unix::fs::MetadataExt as _,
};

use anyhow::{Result, bail};

/// The inodes of the TCP sockets listening on `port` in the calling
/// thread's network namespace.
fn listening_inodes(port: u16) -> HashSet<u64> {
    let mut found = HashSet::new();
    for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if *state == "0A"
                && local_port == Some(port)
                && let Ok(inode) = inode.parse()
            {
                found.insert(inode);
            }
        }
    }
    found.remove(&0);
    found
}

/// Duplicates of the sockets listening on `port` in the calling thread's
/// network namespace (several with `SO_REUSEPORT`, at most `limit`); empty
/// when nothing listens there. Errs when listeners exist but no process
/// holding one can be reached.
pub fn take_over(port: u16, limit: usize) -> Result<Vec<OwnedFd>> {
    let mut inodes = listening_inodes(port);
    let mut taken = Vec::new();
    if inodes.is_empty() {
        return Ok(taken);
    }
    let netns = fs::metadata("/proc/thread-self/ns/net")?.ino();
    let mut last_error = None;
    for entry in fs::read_dir("/proc")?.flatten() {
        if inodes.is_empty() || taken.len() == limit {
            break;
        }
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if fs::metadata(format!("/proc/{pid}/ns/net"))
            .map(|m| m.ino())
            .ok()
            != Some(netns)
        {
            continue;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = fs::read_link(fd.path()) else {
                continue;
            };
            let link = link.to_string_lossy();
            let Some(inode) = link
                .strip_prefix("socket:[")
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|l| l.parse::<u64>().ok())
            else {
                continue;
            };
            if !inodes.contains(&inode) || taken.len() == limit {
                continue;
            }
            let Ok(target) = fd.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            match duplicate(pid, target) {
                Ok(socket) => {
                    inodes.remove(&inode);
                    taken.push(socket);
                }
                Err(err) => last_error = Some(format!("process {pid}: {err}")),
            }
        }
    }
    if !taken.is_empty() {
        return Ok(taken);
    }
    match last_error {
        Some(err) => {
            bail!("cannot take over the listener on port {port} ({err}; needs CAP_SYS_PTRACE)")
        }
        None => bail!(
            "a socket listens on port {port} but no process of this network namespace holds it"
        ),
    }
}

/// `pidfd_getfd(pidfd_open(pid), fd)`.
fn duplicate(pid: i32, fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain system calls; each descriptor returned is new and ours.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let dup = libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            fd,
            0,
        );
        if dup < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(dup as i32))
    }
}
