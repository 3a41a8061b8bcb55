//! `redirect probe`: the kernel features eBPF capture needs, and the mode
//! that follows.

use std::process::ExitCode;

use anyhow::Result;

use crate::ebpf::features;

pub fn probe(json: bool) -> Result<ExitCode> {
    features::ask_the_kernel_only();
    let report = features::run();
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        out!("{}", features::render(&report));
    }
    Ok(ExitCode::SUCCESS)
}
