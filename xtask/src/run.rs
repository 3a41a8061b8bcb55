//! `cargo xtask run`: build, then show the redirect working (`redirect demo`).

use std::process::Command;

use anyhow::{Result, bail};

use crate::{
    build,
    sysdeps::{self, SANDBOX_TOOLS, is_root},
};

pub fn run(args: &[String]) -> Result<()> {
    let binary = build::build(false)?;
    if !is_root() {
        bail!(
            "redirect attaches eBPF programs to cgroups and needs root: run `sudo -E cargo xtask run`"
        );
    }
    let args: Vec<String> = if args.is_empty() {
        sysdeps::ensure_tools(SANDBOX_TOOLS)?;
        vec!["demo".to_owned()]
    } else {
        args.to_vec()
    };
    let status = Command::new(&binary).args(&args).status()?;
    if !status.success() {
        bail!("`redirect {}` exited with {status}", args.join(" "));
    }
    Ok(())
}
