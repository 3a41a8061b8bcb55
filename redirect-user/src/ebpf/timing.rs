//! Where an install's time goes: with `REDIRECT_TIMING=1` the loader
//! prints the wall time of each phase to stderr, one
//! `redirect: timing <phase> <ms>` line each, which `cargo xtask bench`
//! collects into its install breakdown.

use std::time::{Duration, Instant};

/// The phases measured so far, each from the end of the one before.
pub struct Phases {
    enabled: bool,
    last: Instant,
    done: Vec<(String, Duration)>,
}

impl Phases {
    /// Starts timing when `REDIRECT_TIMING` is `1`.
    pub fn start() -> Self {
        Self {
            enabled: std::env::var_os("REDIRECT_TIMING").is_some_and(|v| v == "1"),
            last: Instant::now(),
            done: Vec::new(),
        }
    }

    /// Ends the phase `name` now.
    pub fn mark(&mut self, name: impl FnOnce() -> String) {
        if self.enabled {
            let now = Instant::now();
            self.done.push((name(), now - self.last));
            self.last = now;
        }
    }

    /// Prints every phase (nothing unless enabled).
    pub fn print(&self) {
        for (name, took) in &self.done {
            eprintln!("redirect: timing {name} {:.3}", took.as_secs_f64() * 1000.0);
        }
    }
}
