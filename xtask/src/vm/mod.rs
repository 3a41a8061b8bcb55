//! `cargo xtask vm-test`: boot real Debian kernels under QEMU and run the
//! end-to-end suite inside each, then print and save the kernel x test matrix.

mod doc;
mod initramfs;
mod kernels;
mod qemu;
mod results;

use std::{collections::BTreeMap, fs, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde_json::json;

use crate::{
    build::cargo,
    sysdeps::{self, TEST_TOOLS, Tool, workspace_root},
};
use results::Outcome;

/// Host tools the VM test needs besides the test suite's own.
const VM_TOOLS: &[Tool] = &[
    Tool {
        program: "qemu-system-x86_64",
        package: "qemu-system-x86",
        why: "boots each kernel of the matrix",
    },
    Tool {
        program: "busybox",
        package: "busybox-static",
        why: "the shell and utilities inside the test VM",
    },
    Tool {
        program: "strip",
        package: "binutils",
        why: "shrinks the binaries copied into the VM",
    },
    Tool {
        program: "xz",
        package: "xz-utils",
        why: "decompresses .ko.xz modules",
    },
    Tool {
        program: "zstd",
        package: "zstd",
        why: "decompresses .ko.zst modules",
    },
];

pub struct Options {
    /// Kernel names (`5.10`, `6.1`, `6.12`, `sid`); empty = all.
    pub kernels: Vec<String>,
    /// Keep each kernel's root tree and initramfs under target/vm-test/.
    pub keep: bool,
    /// Time limit for one kernel's boot and suite.
    pub timeout: Duration,
    /// Only write `docs/kernels.md` again from the last `matrix.json`.
    pub render_docs: bool,
    /// The test binaries to run (empty: every one that runs in the VM). A
    /// run of a subset keeps its own work directory and leaves the
    /// matrix files and `docs/kernels.md` to full runs.
    pub tests: Vec<String>,
}

/// The end-to-end binaries `cargo xtask test` runs on the oldest kernel
/// (5.10), about five minutes under software emulation: together they load
/// every program through that kernel's verifier and exercise each hook
/// (connect, sockops, getsockopt and getpeername in `original_dst`;
/// sendmsg and recvmsg in `dns`; sk_lookup in `legacy`), the probe, the
/// run loop, the hostile-input checks, gc, the node agent and node sets'
/// refusal there.
pub const OLDEST_KERNEL_TESTS: &[&str] = &[
    "original_dst",
    "dns",
    "legacy",
    "probe",
    "run_mode",
    "hostile_input",
    "gc",
    "node",
    "node_set",
];

/// The oldest kernel of the matrix, which `cargo xtask test` also boots.
pub const OLDEST_KERNEL: &str = "5.10";

/// `cargo xtask test`'s kernel check: [`OLDEST_KERNEL_TESTS`] on
/// [`OLDEST_KERNEL`], so that a verifier regression on old kernels cannot
/// land.
pub fn oldest_kernel() -> Result<()> {
    vm_test(&Options {
        kernels: vec![OLDEST_KERNEL.to_owned()],
        keep: false,
        timeout: Duration::from_secs(20 * 60),
        render_docs: false,
        tests: OLDEST_KERNEL_TESTS.iter().map(|&t| t.to_owned()).collect(),
    })
    .with_context(|| {
        format!(
            "the eBPF tests on kernel {OLDEST_KERNEL} failed (the console is under \
             target/vm-test/runs/{OLDEST_KERNEL}-subset/)"
        )
    })
}

/// One kernel's run.
pub(crate) struct KernelRun {
    name: String,
    release: String,
    ending: String,
    seconds: f64,
    notes: Vec<String>,
    results: BTreeMap<String, Outcome>,
}

pub fn vm_test(opts: &Options) -> Result<()> {
    let root = workspace_root().join("target/vm-test");
    if opts.render_docs {
        let path = root.join("matrix.json");
        let text = fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {}: run `cargo xtask vm-test` first",
                path.display()
            )
        })?;
        let (runs, commit, date) = doc::from_json(&serde_json::from_str(&text)?);
        doc::write(&runs, &commit, &date)?;
        eprintln!("xtask: docs/kernels.md written from {}", path.display());
        return Ok(());
    }
    sysdeps::ensure_tools(VM_TOOLS)?;
    sysdeps::ensure_tools(TEST_TOOLS)?;
    let specs: Vec<_> = if opts.kernels.is_empty() {
        kernels::KERNELS.to_vec()
    } else {
        opts.kernels
            .iter()
            .map(|name| {
                kernels::KERNELS
                    .iter()
                    .find(|k| k.name == name)
                    .copied()
                    .with_context(|| {
                        let known: Vec<_> = kernels::KERNELS.iter().map(|k| k.name).collect();
                        format!("unknown kernel '{name}': choose from {}", known.join(", "))
                    })
            })
            .collect::<Result<_>>()?
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]);
    let date = git(&["log", "-1", "--format=%cs"]);
    fs::create_dir_all(&root)?;
    // The binaries as built now, copied: every kernel of the run tests
    // the same build, even if the tree is rebuilt meanwhile (a `cargo
    // test` overwrites target/debug/deps in place).
    let snapshot = root.join(format!("payload-{}", std::process::id()));
    let payload = snapshot_payload(payload(&opts.tests)?, &snapshot)?;
    let mut runs = Vec::new();
    let mut accel = qemu::Accel::detect();
    for spec in &specs {
        eprintln!("xtask: kernel {}: preparing", spec.name);
        let run = match run_kernel(&root, spec, &payload, opts, &mut accel) {
            Ok(run) => run,
            Err(err) => KernelRun {
                name: spec.name.to_owned(),
                release: "?".to_owned(),
                ending: "error".to_owned(),
                seconds: 0.0,
                notes: vec![format!("{err:#}")],
                results: BTreeMap::new(),
            },
        };
        eprintln!(
            "xtask: kernel {} ({}): {} in {:.0} s",
            run.name, run.release, run.ending, run.seconds
        );
        runs.push(run);
    }
    let _ = fs::remove_dir_all(&snapshot);
    let table = matrix_markdown(&runs);
    println!("{table}");
    if !opts.tests.is_empty() {
        return verdict(&runs);
    }
    fs::write(root.join("matrix.md"), &table)?;
    let mut json = matrix_json(&runs);
    json["commit"] = json!(commit);
    json["date"] = json!(date);
    fs::write(
        root.join("matrix.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    if opts.kernels.is_empty() {
        doc::write(&runs, &commit, &date)?;
        eprintln!("xtask: docs/kernels.md written");
    }
    eprintln!(
        "xtask: matrix written to {}",
        root.join("matrix.md").display()
    );
    verdict(&runs)
}

/// Fails naming every kernel that did not complete its suite or failed a
/// test.
fn verdict(runs: &[KernelRun]) -> Result<()> {
    let failed: Vec<String> = runs
        .iter()
        .filter(|r| {
            r.ending != "completed" || r.results.values().any(|o| matches!(o, Outcome::Fail(_)))
        })
        .map(|r| r.name.clone())
        .collect();
    if !failed.is_empty() {
        bail!("failures on kernel(s): {}", failed.join(", "));
    }
    Ok(())
}

fn run_kernel(
    root: &std::path::Path,
    spec: &kernels::KernelSpec,
    payload: &initramfs::Payload,
    opts: &Options,
    accel: &mut qemu::Accel,
) -> Result<KernelRun> {
    let kernel = kernels::prepare(root, spec)?;
    let work = root.join("runs").join(if opts.tests.is_empty() {
        spec.name.to_owned()
    } else {
        format!("{}-subset", spec.name)
    });
    fs::create_dir_all(&work)?;
    let archive = initramfs::build(&kernel, payload, &work)?;
    eprintln!("xtask: kernel {} ({}): booting", spec.name, kernel.release);
    let boot = qemu::boot_with_fallback(
        accel,
        &kernel.vmlinuz,
        &archive,
        opts.timeout,
        &work.join("console.log"),
    )?;
    if !opts.keep {
        let _ = fs::remove_dir_all(work.join("root"));
        let _ = fs::remove_file(&archive);
    }
    let mut notes: Vec<String> = boot
        .console
        .lines()
        .filter(|l| l.starts_with("VMTEST module-failed") || l.starts_with("VMTEST dmesg"))
        .map(str::to_owned)
        .collect();
    let ending = match boot.ending {
        qemu::Ending::Completed => "completed",
        qemu::Ending::Panic => "kernel panic",
        qemu::Ending::Timeout => "timeout",
        qemu::Ending::Stopped => "stopped early",
    };
    if boot.ending != qemu::Ending::Completed {
        let tail: Vec<&str> = boot.console.lines().rev().take(15).collect();
        notes.extend(tail.into_iter().rev().map(str::to_owned));
    }
    Ok(KernelRun {
        name: spec.name.to_owned(),
        release: kernel.release,
        ending: ending.to_owned(),
        seconds: boot.seconds,
        notes,
        results: results::parse(&boot.console),
    })
}

/// One line of `git` output in the workspace ("?" when git cannot tell).
fn git(args: &[&str]) -> String {
    std::process::Command::new("git")
        .args(args)
        .current_dir(workspace_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "?".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}

/// Builds `redirect` and the end-to-end test binaries.
/// Test binaries that run on the host only: `deploy` reads the source
/// tree (absent in the VM); `fuzz_diff`'s seeded run takes minutes under
/// emulation, where `differential` compares the backends on every kernel;
/// `istio_cni_conformance` prints rules (no kernel is involved) from data
/// the VM does not carry.
const HOST_ONLY_TESTS: &[&str] = &["deploy", "fuzz_diff", "istio_cni_conformance"];

/// `only`: the binaries to run (empty: all but [`HOST_ONLY_TESTS`]); a
/// name that is not a VM test binary is an error.
fn payload(only: &[String]) -> Result<initramfs::Payload> {
    sysdeps::run_checked(&mut cargo(&["build", "--package", "redirect-user"])?)?;
    let out = cargo(&[
        "test",
        "--package",
        "redirect-sandbox",
        "--tests",
        "--no-run",
        "--message-format=json",
    ])?
    .output()
    .context("building the test binaries")?;
    if !out.status.success() {
        bail!(
            "building the test binaries failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|v| v == "test"));
        if let (true, Some(exe), Some(name)) = (
            is_test,
            msg["executable"].as_str(),
            msg["target"]["name"].as_str(),
        ) && !HOST_ONLY_TESTS.contains(&name)
        {
            tests.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    if tests.is_empty() {
        bail!("no end-to-end test binaries were built");
    }
    if !only.is_empty() {
        if let Some(unknown) = only.iter().find(|n| !tests.iter().any(|(t, _)| t == *n)) {
            let mut known: Vec<&str> = tests.iter().map(|(t, _)| t.as_str()).collect();
            known.sort_unstable();
            bail!(
                "--test {unknown}: no such VM test binary; choose from {}",
                known.join(", ")
            );
        }
        tests.retain(|(t, _)| only.contains(t));
    }
    let data = workspace_root().join("../shared/conformance");
    let conformance = [
        ("istio", "conformance", "REDIRECT_CONFORMANCE_DIR"),
        (
            "istio-nftables",
            "nftables-conformance",
            "REDIRECT_NFTABLES_CONFORMANCE_DIR",
        ),
    ]
    .into_iter()
    .map(|(dir, name, env)| (data.join(dir), name, env))
    .filter(|(dir, ..)| dir.is_dir())
    .collect();
    Ok(initramfs::Payload {
        redirect: workspace_root().join("target/debug/redirect"),
        tests,
        conformance,
    })
}

/// `payload` with its binaries copied into `dir`.
fn snapshot_payload(
    payload: initramfs::Payload,
    dir: &std::path::Path,
) -> Result<initramfs::Payload> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let copy = |from: &std::path::Path, name: &str| -> Result<PathBuf> {
        let to = dir.join(name);
        fs::copy(from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        Ok(to)
    };
    Ok(initramfs::Payload {
        redirect: copy(&payload.redirect, "redirect")?,
        tests: payload
            .tests
            .iter()
            .map(|(name, exe)| Ok((name.clone(), copy(exe, &format!("test-{name}"))?)))
            .collect::<Result<_>>()?,
        conformance: payload.conformance,
    })
}

pub(crate) fn matrix_markdown(runs: &[KernelRun]) -> String {
    let mut out = String::from("| test |");
    for r in runs {
        out.push_str(&format!(" {} ({}) |", r.name, r.release));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(runs.len()));
    out.push_str("\n| boot and suite |");
    for r in runs {
        out.push_str(&format!(" {} ({:.0} s) |", r.ending, r.seconds));
    }
    let tests: std::collections::BTreeSet<&String> =
        runs.iter().flat_map(|r| r.results.keys()).collect();
    for test in tests {
        out.push_str(&format!("\n| {test} |"));
        for r in runs {
            let cell = r
                .results
                .get(test)
                .map_or_else(|| "not run".to_owned(), Outcome::cell);
            out.push_str(&format!(" {} |", cell.replace('|', "/")));
        }
    }
    out.push('\n');
    for r in runs.iter().filter(|r| !r.notes.is_empty()) {
        out.push_str(&format!(
            "\nNotes for {} ({}):\n\n```text\n{}\n```\n",
            r.name,
            r.release,
            r.notes.join("\n")
        ));
    }
    out
}

fn matrix_json(runs: &[KernelRun]) -> serde_json::Value {
    json!({
        "kernels": runs.iter().map(|r| json!({
            "name": r.name,
            "release": r.release,
            "ending": r.ending,
            "seconds": r.seconds,
            "notes": r.notes,
            "tests": r.results.iter().map(|(name, o)| (name.clone(), json!({
                "status": o.status(),
                "reason": match o { Outcome::Pass => String::new(), Outcome::Fail(w) | Outcome::Skip(w) => w.clone() },
            }))).collect::<serde_json::Map<_, _>>(),
        })).collect::<Vec<_>>(),
    })
}
