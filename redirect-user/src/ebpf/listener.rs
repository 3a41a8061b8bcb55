//! Finding the proxy's inbound listener when it was already listening
//! before the install (a reinstall from iptables mode, or `redirect
//! install` on a running pod).
//!
//! In the init-step order the proxy starts after the install, and the
//! sockops program registers its listener when it calls `listen()`. A
//! listener that already exists never makes that callback, so the loader
//! takes it over instead: it finds the socket listening on the inbound port
//! in the pod's network namespace (`sock_diag`; `/proc/net/tcp` where the
//! kernel has no `tcp_diag`), the process holding it (`/proc/<pid>/fd`),
//! and duplicates it with
//! `pidfd_getfd` (kernel 5.6, needs ptrace rights over that process) to put
//! it in the listener map.

use std::{
    collections::HashSet,
    fs,
    os::fd::{FromRawFd as _, OwnedFd},
    os::unix::fs::MetadataExt as _,
};

use anyhow::{Context as _, Result, bail};

/// The inodes of the TCP sockets listening on `port` in the calling
/// thread's network namespace, asked of `sock_diag` (IPv4 and IPv6). The
/// kernel walks only its listening sockets for a LISTEN-only dump filtered
/// by source port, where `/proc/net/tcp` walks every socket of the host
/// (milliseconds on a busy node, each pod's ADD).
/// Where the kernel has no TCP sock_diag (its `tcp_diag` module missing
/// and not loadable), `/proc/thread-self/net/tcp{,6}` instead.
fn listening_inodes(port: u16) -> Result<HashSet<u64>> {
    let mut found = HashSet::new();
    let asked = diag_socket().and_then(|socket| {
        for family in [libc::AF_INET, libc::AF_INET6] {
            dump_listeners(&socket, family as u8, port, &mut found)?;
        }
        Ok(())
    });
    if asked.is_err() {
        found = proc_listening_inodes(port)?;
    }
    found.remove(&0);
    Ok(found)
}

/// [`listening_inodes`] from `/proc/thread-self/net/tcp{,6}`.
fn proc_listening_inodes(port: u16) -> Result<HashSet<u64>> {
    let mut found = HashSet::new();
    for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let text = fs::read_to_string(table).with_context(|| format!("reading {table}"))?;
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
    Ok(found)
}

fn diag_socket() -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a sock_diag socket");
    }
    // SAFETY: a descriptor this call just opened.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `SOCK_DIAG_BY_FAMILY` with an `inet_diag_req_v2` asking for TCP
/// sockets in LISTEN with source port `port`.
fn diag_request(family: u8, port: u16) -> [u8; 72] {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const TCP_LISTEN: u32 = 10;
    let mut req = [0u8; 72];
    req[0..4].copy_from_slice(&72u32.to_ne_bytes()); // nlmsg_len
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    // inet_diag_req_v2 at 16: family, protocol, ext, pad, states, id.
    req[16] = family;
    req[17] = libc::IPPROTO_TCP as u8;
    req[20..24].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    req[24..26].copy_from_slice(&port.to_be_bytes()); // id.idiag_sport
    req
}

fn dump_listeners(socket: &OwnedFd, family: u8, port: u16, found: &mut HashSet<u64>) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let req = diag_request(family, port);
    // SAFETY: the buffer and its length are this function's; the kernel
    // is the default destination of a netlink socket.
    let sent = unsafe { libc::send(socket.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut buf = vec![0u8; 32 * 1024];
    // A dump ends with NLMSG_DONE; bounded in case the kernel never says so.
    for _ in 0..10_000 {
        // SAFETY: as above, into this function's buffer.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let mut msgs = &buf[..n as usize];
        while msgs.len() >= 16 {
            let len = u32::from_ne_bytes(msgs[0..4].try_into()?) as usize;
            let kind = u16::from_ne_bytes(msgs[4..6].try_into()?);
            if len < 16 || len > msgs.len() {
                bail!("a malformed sock_diag reply");
            }
            match i32::from(kind) {
                libc::NLMSG_DONE => return Ok(()),
                libc::NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(msgs[16..20].try_into()?);
                    return Err(std::io::Error::from_raw_os_error(-errno).into());
                }
                // inet_diag_msg: the inode is its last field, at 68.
                _ if len >= 16 + 72 => {
                    let inode = u32::from_ne_bytes(msgs[16 + 68..16 + 72].try_into()?);
                    found.insert(u64::from(inode));
                }
                _ => {}
            }
            msgs = &msgs[((len + 3) & !3).min(msgs.len())..];
        }
    }
    bail!("the sock_diag dump did not end")
}

/// Duplicates of the sockets listening on `port` in the calling thread's
/// network namespace (several with `SO_REUSEPORT`, at most `limit`); empty
/// when nothing listens there. Errs when listeners exist but no process
/// holding one can be reached.
pub fn take_over(port: u16, limit: usize) -> Result<Vec<OwnedFd>> {
    let mut inodes = listening_inodes(port)?;
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
