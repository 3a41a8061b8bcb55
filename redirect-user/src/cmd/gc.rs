//! `redirect gc`: remove the instances of deleted pods, and what killed
//! installs and uninstalls left.

use std::process::ExitCode;

use anyhow::Result;

use crate::ebpf::loader;

pub fn gc(dry_run: bool) -> Result<ExitCode> {
    let removed = loader::gc(dry_run)?;
    if removed.is_empty() {
        outln!("redirect: no instance or node-set pod of a deleted pod");
    }
    for (name, why) in removed {
        outln!(
            "redirect: {} {name}: {why}",
            if dry_run { "would remove" } else { "removed" }
        );
    }
    Ok(ExitCode::SUCCESS)
}
