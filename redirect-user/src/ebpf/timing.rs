//! Where an install's or a pod's ADD's time goes: with `REDIRECT_TIMING=1`
//! each phase's wall time is printed to stderr, one
//! `redirect: timing <phase> <ms>` line each, which `cargo xtask bench`
//! collects into its install and ADD breakdowns.
//!
//! One recorder per thread: [`start`] begins it (when the variable says
//! so), [`mark`] ends a phase anywhere below on the same thread, [`print`]
//! reports them. Per thread so that the node agent, which runs each
//! plugin request on a thread of its own ([`crate::cni::agent`]), times
//! each request apart; a command's phases all run on its calling thread.

use std::{
    cell::RefCell,
    time::{Duration, Instant},
};

struct Phases {
    last: Instant,
    done: Vec<(String, Duration)>,
}

thread_local! {
    static PHASES: RefCell<Option<Phases>> = const { RefCell::new(None) };
}

/// Starts timing when `REDIRECT_TIMING` is `1` (dropping phases marked
/// before): the first phase runs from now.
pub fn start() {
    start_if(std::env::var_os("REDIRECT_TIMING").is_some_and(|v| v == "1"));
}

/// Starts timing on this thread when `on` (else stops it).
pub fn start_if(on: bool) {
    PHASES.with_borrow_mut(|phases| {
        *phases = on.then(|| Phases {
            last: Instant::now(),
            done: Vec::new(),
        });
    });
}

/// Ends the phase `name` now (nothing unless started).
pub fn mark(name: impl FnOnce() -> String) {
    // Named before the recorder is borrowed: `name` may not mark, but
    // should it, nothing panics.
    if !PHASES.with_borrow(Option::is_some) {
        return;
    }
    let name = name();
    PHASES.with_borrow_mut(|phases| {
        if let Some(phases) = phases.as_mut() {
            let now = Instant::now();
            phases.done.push((name, now - phases.last));
            phases.last = now;
        }
    });
}

/// Every phase marked since [`start`] as `redirect: timing` lines, and
/// stops timing (empty when it was not started).
pub fn take() -> String {
    let Some(phases) = PHASES.with_borrow_mut(Option::take) else {
        return String::new();
    };
    phases
        .done
        .iter()
        .map(|(name, took)| {
            format!(
                "redirect: timing {name} {:.3}\n",
                took.as_secs_f64() * 1000.0
            )
        })
        .collect()
}

/// Prints [`take`] to stderr in one write (stderr is unbuffered).
pub fn print() {
    let text = take();
    if !text.is_empty() {
        eprint!("{text}");
    }
}
