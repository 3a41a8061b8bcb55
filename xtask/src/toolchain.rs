//! The Rust toolchain pieces the eBPF build needs, installed on demand.
//!
//! aya-build compiles `redirect-ebpf` with `cargo +nightly build --target
//! bpfel-unknown-none -Z build-std=core`, which needs the nightly toolchain,
//! its `rust-src` component, and `bpf-linker` on `PATH`. bpf-linker must be
//! linked against the *same* LLVM as that nightly rustc, so it is built here
//! from the Rust crate registry against the nightly toolchain's own `libLLVM`, into
//! `target/tools/`, with a stamp recording which LLVM it was built for: when
//! nightly's LLVM changes, it is rebuilt.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::sysdeps::{command_output, run_checked, workspace_root};

const NIGHTLY: &str = "nightly";

/// Makes sure nightly + rust-src + a matching bpf-linker are installed and
/// returns the `PATH` value under which the eBPF build finds bpf-linker.
pub fn ensure() -> Result<OsString> {
    ensure_nightly()?;
    let bin_dir = ensure_bpf_linker()?;
    let mut paths = vec![bin_dir];
    if let Some(path) = env::var_os("PATH") {
        paths.extend(env::split_paths(&path));
    }
    env::join_paths(paths).context("building PATH for the eBPF build")
}

fn ensure_nightly() -> Result<()> {
    let toolchains = command_output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is required to build the eBPF programs (https://rustup.rs)")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("xtask: installing the nightly Rust toolchain (needed for -Z build-std)");
        run_checked(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let components = command_output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: installing rust-src for nightly (needed for -Z build-std=core)");
        run_checked(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))?;
    }
    Ok(())
}

/// Nightly's sysroot and the LLVM major version its rustc was built with.
fn nightly_llvm() -> Result<(PathBuf, String)> {
    let sysroot = command_output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let verbose =
        command_output(Command::new("rustc").args(["+nightly", "--version", "--verbose"]))?;
    let llvm = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly --version --verbose` printed no LLVM version")?;
    let major = llvm.split('.').next().unwrap_or(llvm).to_owned();
    Ok((PathBuf::from(sysroot.trim()), major))
}

fn ensure_bpf_linker() -> Result<PathBuf> {
    let (sysroot, llvm_major) = nightly_llvm()?;
    let tools = workspace_root().join("target/tools");
    let root = tools.join("bpf-linker");
    let bin_dir = root.join("bin");
    let stamp = root.join("llvm-version");
    let have = fs::read_to_string(&stamp).unwrap_or_default();
    if bin_dir.join("bpf-linker").is_file() && have.trim() == llvm_major {
        return Ok(bin_dir);
    }

    let libllvm = find_libllvm(&sysroot.join("lib"))?;
    let prefix = tools.join("llvm-prefix");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let link = prefix_lib.join("libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {} -> {}", link.display(), libllvm.display()))?;

    eprintln!(
        "xtask: building bpf-linker from the crate registry against nightly's LLVM {llvm_major} ({}); this takes about a minute",
        libllvm.display()
    );
    run_checked(
        Command::new("cargo")
            .args(["+nightly", "install", "bpf-linker", "--locked", "--force"])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm_major}"),
            ])
            .arg("--root")
            .arg(&root)
            .env("LLVM_PREFIX", &prefix)
            .env(
                "RUSTFLAGS",
                format!("-C link-args=-Wl,-rpath,{}", sysroot.join("lib").display()),
            ),
    )
    .context("building bpf-linker failed")?;
    fs::write(&stamp, &llvm_major).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(bin_dir)
}

fn find_libllvm(lib: &Path) -> Result<PathBuf> {
    let entries = fs::read_dir(lib).with_context(|| format!("reading {}", lib.display()))?;
    for entry in entries {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("libLLVM.so.") && name.contains("-rust-") {
            return Ok(path);
        }
    }
    bail!(
        "no libLLVM.so.*-rust-* in {}: the nightly toolchain ships it; reinstall nightly with `rustup toolchain install nightly`",
        lib.display()
    )
}
