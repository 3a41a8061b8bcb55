//! `cargo xtask fuzz-diff [--cases N] [--seed S]`: the differential fuzzer
//! (`tests/tests/fuzz_diff.rs`): random istio-iptables configurations ×
//! random connections, each applied in iptables mode and in eBPF mode on
//! the same sandbox pod, and every observation compared. `cargo xtask
//! test` runs a short seeded run of the same test (its defaults); this
//! runs as many pairs as asked and reports how many were compared.

use std::fs;

use anyhow::{Context as _, Result, bail};

use crate::{
    build::{self, cargo},
    sysdeps::{self, SANDBOX_TOOLS, Tool, is_root, run_checked},
    test::leftovers,
};

/// iptables mode is one side of every comparison.
const IPTABLES: &[Tool] = &[Tool {
    program: "iptables",
    package: "iptables",
    why: "iptables mode, one side of every comparison",
}];

/// What to run.
pub struct Options {
    /// (config, connection) pairs to compare.
    pub cases: u64,
    /// The seed (the test's fixed default when `None`).
    pub seed: Option<u64>,
    /// Connections per configuration (the test's default when `None`).
    pub per_config: Option<u64>,
    /// Replay only this round (configuration) of the seed.
    pub round: Option<u64>,
    /// Also the extended connection space (switched credentials, fixed
    /// source ports, SO_BINDTODEVICE=eth0), where eBPF mode has known
    /// differences.
    pub extended: bool,
}

pub fn fuzz_diff(opts: &Options) -> Result<()> {
    sysdeps::ensure_tools(SANDBOX_TOOLS)?;
    sysdeps::ensure_tools(IPTABLES)?;
    if !is_root() {
        bail!(
            "the fuzzer builds sandbox pods (namespaces, cgroups, eBPF) and needs root: run `sudo -E cargo xtask fuzz-diff`"
        );
    }
    // The binary the test drives (and whose sandbox agent it runs).
    build::build(false)?;
    let dir = build::target_dir().join("fuzz-diff");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let summary = dir.join("summary.txt");
    let _ = fs::remove_file(&summary);
    let mut cmd = cargo(&[
        "test",
        "--package",
        "redirect-sandbox",
        "--test",
        "fuzz_diff",
        "--",
        "--nocapture",
    ])?;
    cmd.env("FUZZ_DIFF_CASES", opts.cases.to_string())
        .env("FUZZ_DIFF_SUMMARY", &summary)
        .env(
            "FUZZ_DIFF_EXTENDED",
            if opts.extended { "on" } else { "off" },
        );
    for (name, value) in [
        ("FUZZ_DIFF_SEED", opts.seed),
        ("FUZZ_DIFF_PER_CONFIG", opts.per_config),
        ("FUZZ_DIFF_ROUND", opts.round),
    ] {
        match value {
            Some(value) => cmd.env(name, value.to_string()),
            None => cmd.env_remove(name),
        };
    }
    let ran = run_checked(&mut cmd);
    let left = leftovers();
    let text = fs::read_to_string(&summary).ok();
    if let Some(text) = &text {
        println!("\nxtask: {}", text.trim_end());
    }
    ran.context(
        "the differential fuzzer failed (above: the differences and their reproductions, or why)",
    )?;
    if !left.is_empty() {
        bail!("the fuzzer left state behind: {}", left.join("; "));
    }
    if text.is_none() {
        bail!("the fuzzer compared nothing (was it skipped?)");
    }
    Ok(())
}
