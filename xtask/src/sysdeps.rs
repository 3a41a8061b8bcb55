//! Debian packages the tasks need, installed with apt-get when absent, and
//! small process helpers shared by the tasks.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// A program a task runs, and the Debian package that provides it.
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
    pub why: &'static str,
}

/// Tools every end-to-end test or the demo uses.
pub const SANDBOX_TOOLS: &[Tool] = &[
    Tool {
        program: "ip",
        package: "iproute2",
        why: "creates the sandbox pod's veth pair and addresses",
    },
    Tool {
        program: "unshare",
        package: "util-linux",
        why: "private mount namespaces for the missing-cgroup2/bpffs tests",
    },
];

/// The protobuf compiler: the CRI test's client (`k8s-cri`) generates its
/// code with it when it builds (clippy builds it too).
pub const PROTOC: Tool = Tool {
    program: "protoc",
    package: "protobuf-compiler",
    why: "builds the CRI client of the CRI test (k8s-cri's generated code)",
};

/// Tools the test suite uses on top of [`SANDBOX_TOOLS`].
pub const TEST_TOOLS: &[Tool] = &[
    PROTOC,
    Tool {
        program: "iptables-legacy-save",
        package: "iptables",
        why: "the iptables REDIRECT comparison and the large-getsockopt test",
    },
    Tool {
        program: "nft",
        package: "nftables",
        why: "Istio's native nftables mode (--native-nftables) in the nftables_mode and differential tests",
    },
    Tool {
        program: "squid",
        package: "squid",
        why: "a real transparent proxy that reads SO_ORIGINAL_DST",
    },
    Tool {
        program: "curl",
        package: "curl",
        why: "a real HTTP client inside the sandbox pod",
    },
];

/// Installs the packages of every tool that is not on `PATH`.
pub fn ensure_tools(tools: &[Tool]) -> Result<()> {
    let missing: Vec<&Tool> = tools.iter().filter(|t| !on_path(t.program)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
    packages.dedup();
    for tool in &missing {
        eprintln!(
            "xtask: installing Debian package {} for `{}` ({})",
            tool.package, tool.program, tool.why
        );
    }
    if !is_root() {
        bail!(
            "missing {}; install them with `sudo apt-get install {}`",
            missing
                .iter()
                .map(|t| t.program)
                .collect::<Vec<_>>()
                .join(", "),
            packages.join(" ")
        );
    }
    run_checked(Command::new("apt-get").args(["update", "-q"])).context("apt-get update failed")?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get install failed")?;
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        || Path::new("/usr/sbin").join(program).is_file()
        || Path::new("/sbin").join(program).is_file()
}

/// Runs a command with inherited stdio; a non-zero exit is an error naming it.
pub fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Runs a command and returns its stdout; a non-zero exit is an error with its stderr.
pub fn command_output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{cmd:?} printed non-UTF-8"))
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}
