//! Anonymous network namespaces held by a file descriptor.

use std::{
    fs::File,
    os::fd::{AsRawFd as _, BorrowedFd, OwnedFd},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, anyhow, bail};

/// TIME_WAIT sockets a sandbox namespace may hold. A namespace gets its
/// limit from the size of the kernel's socket hash, which is small in a
/// VM of the kernel matrix: the connect loops (thousands of connections a
/// second, both ends in the pod) overflowed it
/// (`TcpExt:TCPTimeWaitOverflow` by tens of thousands), and then the
/// kernel closes a socket without TIME_WAIT and answers the peer's late
/// ACK with a reset, which a client still in `connect()` sees as EPIPE
/// (`Tcp:EstabResets`), with or without capture. That is a limit of the
/// test machine, not what the tests measure. 262,144 is what the kernel
/// gives a host with a few GB of memory.
const MAX_TIME_WAIT: &str = "262144";

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
        // The thread's own namespace, as /proc/sys/net is its opener's.
        std::fs::write("/proc/sys/net/ipv4/tcp_max_tw_buckets", MAX_TIME_WAIT)
            .context("raising the new netns's TIME_WAIT limit")?;
        let file = File::open("/proc/thread-self/ns/net").context("opening the new netns")?;
        Ok(OwnedFd::from(file))
    })
    .join()
    .map_err(|_| anyhow!("netns thread panicked"))?
}

/// Runs `ip -batch -` with `commands` in network namespace `ns` (iproute2's
/// `ip`, entered by this process's child itself: a VM's busybox `nsenter`
/// or shell would run busybox's own `ip`).
pub fn ip_batch(ns: BorrowedFd<'_>, commands: &str) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new("ip");
    // SAFETY: the closure only makes an async-signal-safe system call.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    run_ip_batch(cmd, commands)
}

/// Runs `cmd` (an `ip` made to enter its namespace) as `ip -batch -` with
/// `commands` on its input.
pub(crate) fn run_ip_batch(mut cmd: Command, commands: &str) -> Result<()> {
    use std::io::Write as _;
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting ip (install iproute2)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(commands.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip -batch failed: {}\n{commands}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
