//! A pod's infra process: `redirect` called as `pause` (a link in the
//! image) holds the pod's namespaces and sleeps until told to stop, as
//! Kubernetes' pause image does (no registry is reachable for that one).

/// Waits for SIGTERM or SIGINT; returns the exit code (0).
pub fn pause() -> u8 {
    // SAFETY: plain signal-set calls on a set of our own; with the two
    // signals blocked, sigwait returns when one of them arrives.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut signal = 0;
        while libc::sigwait(&set, &mut signal) != 0 {}
    }
    0
}
