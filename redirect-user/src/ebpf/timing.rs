//! Where an install's or a pod's ADD's time goes: with `REDIRECT_TIMING=1`
//! each phase's wall time is printed to stderr, one
//! `redirect: timing <phase> <ms>` line each, which `cargo xtask bench`
//! collects into its install and ADD breakdowns.
//!
//! One recorder per process: [`start`] begins it (when the variable says
//! so), [`mark`] ends a phase anywhere below, [`print`] reports them.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

struct Phases {
    last: Instant,
    done: Vec<(String, Duration)>,
}

static PHASES: Mutex<Option<Phases>> = Mutex::new(None);

fn phases() -> std::sync::MutexGuard<'static, Option<Phases>> {
    // A panic while holding it leaves timing data only: still usable.
    PHASES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts timing when `REDIRECT_TIMING` is `1` (dropping phases marked
/// before): the first phase runs from now.
pub fn start() {
    let on = std::env::var_os("REDIRECT_TIMING").is_some_and(|v| v == "1");
    *phases() = on.then(|| Phases {
        last: Instant::now(),
        done: Vec::new(),
    });
}

/// Ends the phase `name` now (nothing unless started). The recorder is
/// held while `name` runs: it must not mark.
pub fn mark(name: impl FnOnce() -> String) {
    if let Some(phases) = phases().as_mut() {
        let now = Instant::now();
        let took = now - phases.last;
        phases.done.push((name(), took));
        phases.last = now;
    }
}

/// Prints every phase marked since [`start`], and stops timing.
pub fn print() {
    let Some(phases) = phases().take() else {
        return;
    };
    // One write for all lines (stderr is unbuffered).
    let text: String = phases
        .done
        .iter()
        .map(|(name, took)| {
            format!(
                "redirect: timing {name} {:.3}\n",
                took.as_secs_f64() * 1000.0
            )
        })
        .collect();
    eprint!("{text}");
}
