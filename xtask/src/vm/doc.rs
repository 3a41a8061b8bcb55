//! `docs/kernels.md`, written by `cargo xtask vm-test` from its run (never
//! pasted by hand): what the matrix is, how it is made, and the latest
//! full run's table.

use std::{collections::BTreeMap, fs};

use anyhow::{Context as _, Result};

use super::{KernelRun, matrix_markdown, results::Outcome};
use crate::sysdeps::workspace_root;

const HEAD: &str = "\
# Kernels

This file is written by `cargo xtask vm-test` after a run of every kernel;
do not edit it by hand.

`cargo xtask vm-test [--kernel 5.10|6.1|6.12|sid ...] [--test BINARY ...]
[--keep]` boots real Debian kernels under QEMU and runs the end-to-end suite
(or the named test binaries) inside each. `cargo xtask test` runs nine of
the binaries on 5.10 (see [testing.md](testing.md)). For each kernel it:
1. resolves the newest cloud kernel of its Debian suite with apt, through a
   private configuration under `target/vm-test/apt/` (nothing is installed
   on the host), and caches the download;
2. builds an initramfs: busybox-static, the `redirect` and test binaries,
   iproute2, iptables, squid, curl and util-linux's setpriv with their
   libraries, and the kernel modules the tests need;
3. boots it with KVM when KVM works (a guest that stops with a KVM error,
   or says nothing for a minute, is booted again under TCG), else
   `qemu-system-x86_64 -accel tcg,thread=single -cpu max -m 1G -smp 2`
   (multi-threaded TCG can oops a guest that patches its own code).

A kernel panic, a hang or a verifier rejection fails that kernel, and the
relevant console lines are reported. The benchmarks and the podman pod test
are ignored in the VM (they run under `cargo xtask bench` and `cargo xtask
pod-test` on the host); the deployment-file checks run on the host only.
Loops bounded by time (the chaos tests' upgrade loop, gc rounds) do less
work under emulation; their assertions are about correctness, not counts.
";

/// Writes `docs/kernels.md` for `runs`, run at `commit` on `date`.
pub fn write(runs: &[KernelRun], commit: &str, date: &str) -> Result<()> {
    let path = workspace_root().join("docs/kernels.md");
    let passed = runs
        .iter()
        .filter(|r| {
            r.ending == "completed" && !r.results.values().any(|o| matches!(o, Outcome::Fail(_)))
        })
        .count();
    let text = format!(
        "{HEAD}\n## Latest run\n\n{date}, commit `{commit}`: {passed} of {} kernels pass every test.\n\n{}",
        runs.len(),
        matrix_markdown(runs)
    );
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// The runs recorded in a `matrix.json`, with the commit and date it names.
pub fn from_json(v: &serde_json::Value) -> (Vec<KernelRun>, String, String) {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_owned();
    let runs = v["kernels"]
        .as_array()
        .map(|kernels| {
            kernels
                .iter()
                .map(|k| KernelRun {
                    name: text(&k["name"]),
                    release: text(&k["release"]),
                    ending: text(&k["ending"]),
                    seconds: k["seconds"].as_f64().unwrap_or(0.0),
                    notes: k["notes"]
                        .as_array()
                        .map(|n| n.iter().map(text).collect())
                        .unwrap_or_default(),
                    results: k["tests"]
                        .as_object()
                        .map(|tests| {
                            tests
                                .iter()
                                .map(|(name, t)| {
                                    let reason = text(&t["reason"]);
                                    let outcome = match t["status"].as_str() {
                                        Some("pass") => Outcome::Pass,
                                        Some("skip") => Outcome::Skip(reason),
                                        _ => Outcome::Fail(reason),
                                    };
                                    (name.clone(), outcome)
                                })
                                .collect::<BTreeMap<_, _>>()
                        })
                        .unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    let commit = v["commit"]
        .as_str()
        .unwrap_or("not recorded (run by an older xtask)")
        .to_owned();
    let date = v["date"].as_str().unwrap_or("date not recorded").to_owned();
    (runs, commit, date)
}
