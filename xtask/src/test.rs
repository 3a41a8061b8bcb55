//! `cargo xtask test`: lint, unit tests and the end-to-end suite, then a check
//! that the suite left nothing behind on the machine, the benchmarks'
//! smoke test (`cargo xtask bench --quick`: every figure is produced) and
//! the pod tests (`cargo xtask pod-test`: the init-container image in real
//! podman pods; `cargo xtask cri-test`: the CNI plugin through containerd's
//! CRI), then the eBPF tests on the oldest kernel of the matrix under QEMU
//! (`cargo xtask vm-test --kernel 5.10` with a subset of the binaries).

use std::{fs, path::Path};

use anyhow::{Context as _, Result, bail};

use crate::{
    build::{self, cargo},
    sysdeps::{self, SANDBOX_TOOLS, TEST_TOOLS, run_checked},
};

/// What `cargo xtask test` runs besides the unit and end-to-end tests.
pub struct Options<'a> {
    /// Passed to `cargo test`; a filtered run is only that.
    pub filter: Option<&'a str>,
    /// `cargo fmt --check` and clippy (three builds).
    pub lint: bool,
    /// `cargo xtask bench --quick`.
    pub bench: bool,
    /// `cargo xtask pod-test` and `cargo xtask cri-test`.
    pub pods: bool,
    /// The eBPF tests on the oldest kernel of the matrix, under QEMU.
    pub oldest_kernel: bool,
}

pub fn test(opts: &Options) -> Result<()> {
    let Options {
        filter,
        lint,
        bench,
        pods,
        oldest_kernel,
    } = *opts;
    sysdeps::ensure_tools(SANDBOX_TOOLS)?;
    let _records = ProbeRecords::now();
    sysdeps::ensure_tools(TEST_TOOLS)?;
    if lint {
        run_checked(&mut cargo(&["fmt", "--all", "--", "--check"])?)
            .context("code is not formatted: run `cargo fmt --all`")?;
        run_checked(&mut cargo(&[
            "clippy",
            "--workspace",
            "--exclude",
            "redirect-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])?)
        .context("clippy found problems")?;
        // The shipped binary: without the `sandbox` feature (see the image).
        run_checked(&mut cargo(&[
            "clippy",
            "--package",
            "redirect-user",
            "--no-default-features",
            "--",
            "-D",
            "warnings",
        ])?)
        .context("clippy found problems in the shipped build (no sandbox feature)")?;
        run_checked(&mut build::nightly_cargo(&[
            "clippy",
            "--package",
            "redirect-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
            "--",
            "-D",
            "warnings",
        ])?)
        .context("clippy found problems in the eBPF programs")?;
    }
    // Build the binary the end-to-end tests drive before they start.
    run_checked(&mut cargo(&["build", "--package", "redirect-user"])?)?;
    // redirect-ebpf only builds for the BPF target (redirect-user's build
    // script compiles it); its decision logic is tested in redirect-common.
    let mut args = vec![
        "test",
        "--no-fail-fast",
        "--workspace",
        "--exclude",
        "redirect-ebpf",
    ];
    if let Some(filter) = filter {
        args.push(filter);
    }
    let result = run_checked(&mut cargo(&args)?).context("tests failed");
    with_leftovers("the tests", result, leftovers())?;
    if bench && filter.is_none() {
        crate::bench::bench(true).context("the benchmarks' smoke test failed")?;
    }
    if pods && filter.is_none() {
        crate::image::pod_test()?;
        crate::cri::cri_test()?;
    }
    if oldest_kernel && filter.is_none() {
        crate::vm::oldest_kernel()?;
    }
    Ok(())
}

/// The pin directories of instances whose name `matches` (and the staging
/// directories, `@new-` and `@del-`, of such instances).
pub fn pinned_instances(matches: impl Fn(&str) -> bool) -> Vec<String> {
    pin_names()
        .into_iter()
        .filter_map(|name| {
            let base = ["@new-", "@del-"]
                .iter()
                .find_map(|prefix| name.strip_prefix(prefix))
                .unwrap_or(&name);
            // A node set (tests name theirs after their sandbox).
            let base = base.strip_prefix("@set-").unwrap_or(base);
            matches(base).then(|| format!("pin directory {PIN_ROOT}/{name}"))
        })
        .collect()
}

/// Where redirect pins its instances, node sets and probe records.
const PIN_ROOT: &str = "/sys/fs/bpf/redirect";

/// The names in [`PIN_ROOT`] (none when it is not there).
fn pin_names() -> Vec<String> {
    let Ok(entries) = fs::read_dir(PIN_ROOT) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The kernel-feature records (`@probes-<revision>` pins, the user
/// space's `ebpf::probe_record`) present when the run starts. The suite's
/// installs write one, which a later install on this boot would take its
/// answers from; dropping this removes those the run wrote, so the
/// machine is left as the run found it (a record there before stays).
struct ProbeRecords(Vec<String>);

impl ProbeRecords {
    const PREFIX: &str = "@probes-";

    fn list() -> Vec<String> {
        pin_names()
            .into_iter()
            .filter(|name| name.starts_with(Self::PREFIX))
            .collect()
    }

    fn now() -> Self {
        Self(Self::list())
    }
}

impl Drop for ProbeRecords {
    fn drop(&mut self) {
        for name in Self::list() {
            if !self.0.contains(&name) {
                let path = Path::new(PIN_ROOT).join(&name);
                if let Err(err) = fs::remove_file(&path) {
                    eprintln!("xtask: could not remove {}: {err}", path.display());
                }
            }
        }
    }
}

/// `ran`, failed also when `what` left state behind; a failed run names
/// what it left too (a failure is when that matters most).
pub fn with_leftovers(what: &str, ran: Result<()>, left: Vec<String>) -> Result<()> {
    match (ran, left.is_empty()) {
        (ran, true) => ran,
        (Ok(()), false) => bail!("{what} left state behind: {}", left.join("; ")),
        (Err(err), false) => Err(err.context(format!(
            "{what} failed and left state behind: {}",
            left.join("; ")
        ))),
    }
}

/// State the sandbox creates and must always remove: its cgroups and the
/// pins of its instances.
pub fn leftovers() -> Vec<String> {
    // A sandbox's own instance, or the CNI plugin's for it.
    let mut found =
        pinned_instances(|name| name.starts_with("sbx-") || name.starts_with("cni-sbx-"));
    if let Ok(mounts) = fs::read_to_string("/proc/mounts") {
        for line in mounts.lines() {
            let mut fields = line.split_whitespace();
            let (Some(_), Some(dir), Some("cgroup2")) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let parent = Path::new(dir).join("redirect-sandbox");
            if let Ok(entries) = fs::read_dir(&parent) {
                for entry in entries.flatten() {
                    if entry.path().is_dir() {
                        found.push(format!("cgroup {}", entry.path().display()));
                    }
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_run_also_names_what_it_left() {
        let left = || vec!["cgroup /x".to_owned()];
        assert!(with_leftovers("t", Ok(()), Vec::new()).is_ok());
        let err = with_leftovers("t", Ok(()), left()).unwrap_err();
        assert_eq!(err.to_string(), "t left state behind: cgroup /x");
        let err = with_leftovers("t", Err(anyhow::anyhow!("tests failed")), left()).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("cgroup /x") && text.contains("tests failed"),
            "{text}"
        );
        let err =
            with_leftovers("t", Err(anyhow::anyhow!("tests failed")), Vec::new()).unwrap_err();
        assert_eq!(err.to_string(), "tests failed");
    }
}
