//! `cargo xtask build`: the eBPF object and the `redirect` binary embedding it.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use crate::{
    sysdeps::{run_checked, workspace_root},
    toolchain,
};

/// A `cargo` command run from the workspace root with bpf-linker on `PATH`,
/// so that redirect-user's build script can build the eBPF object.
pub fn cargo(args: &[&str]) -> Result<Command> {
    let path = toolchain::ensure()?;
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root())
        .env("PATH", path)
        .args(args);
    Ok(cmd)
}

/// A `cargo +nightly` command (through rustup) for the eBPF crate itself.
pub fn nightly_cargo(args: &[&str]) -> Result<Command> {
    let path = toolchain::ensure()?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .env("PATH", path)
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .arg("+nightly")
        .args(args);
    Ok(cmd)
}

/// Builds everything and returns the path of the `redirect` binary.
pub fn build(release: bool) -> Result<PathBuf> {
    let mut args = vec!["build", "--package", "redirect-user"];
    if release {
        args.push("--release");
    }
    run_checked(&mut cargo(&args)?).context("building redirect failed")?;
    let profile = if release { "release" } else { "debug" };
    Ok(workspace_root()
        .join("target")
        .join(profile)
        .join("redirect"))
}

/// Builds the release `redirect` and returns its path.
pub fn release_binary() -> Result<PathBuf> {
    build(true)
}

/// Builds the release `redirect` as shipped in the image: without the
/// `sandbox` feature (the demo's throw-away pods and the test agent), in
/// a target directory of its own so that the other builds keep theirs.
pub fn shipped_binary() -> Result<PathBuf> {
    let dir = target_dir().join("shipped");
    let dir_arg = dir.to_string_lossy().into_owned();
    run_checked(&mut cargo(&[
        "build",
        "--package",
        "redirect-user",
        "--release",
        "--no-default-features",
        "--target-dir",
        &dir_arg,
    ])?)
    .context("building the shipped redirect failed")?;
    Ok(dir.join("release").join("redirect"))
}

/// The workspace's `target/` directory.
pub fn target_dir() -> PathBuf {
    let dir = workspace_root().join("target");
    dir.canonicalize().unwrap_or(dir)
}
