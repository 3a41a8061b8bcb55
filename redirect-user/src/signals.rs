//! Signals held while the system is being changed.

/// Holds SIGINT, SIGTERM and SIGHUP while it lives: an install or uninstall
/// runs to its end (or its rollback) even when interrupted, and the signal
/// is delivered when this is dropped.
pub struct HoldSignals(libc::sigset_t);

impl HoldSignals {
    pub fn new() -> Self {
        // SAFETY: plain signal-mask calls on initialised sets.
        unsafe {
            let mut set = std::mem::zeroed::<libc::sigset_t>();
            let mut old = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            Self(old)
        }
    }
}

impl Drop for HoldSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}
