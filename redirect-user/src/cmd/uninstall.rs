//! `redirect uninstall`: detach and unpin instances, by name or by cgroup.

use std::process::ExitCode;

use anyhow::Result;

use crate::{cgroup, cli::UninstallArgs, ebpf::loader};

pub fn uninstall(args: &UninstallArgs) -> Result<ExitCode> {
    let names = match (&args.instance, &args.cgroup) {
        (Some(name), _) => vec![name.clone()],
        (None, Some(cg)) => {
            let cg = cgroup::resolve(cg).map_err(|err| {
                err.context("cannot find the cgroup; remove its instance with --instance NAME (see `redirect status`)")
            })?;
            crate::ebpf::privilege::check_ebpf()?;
            loader::instances_on(&cg)?
        }
        (None, None) => anyhow::bail!("pass --cgroup PATH or --instance NAME"),
    };
    if names.is_empty() {
        outln!("redirect: nothing is installed on that cgroup");
    }
    for name in names {
        if loader::uninstall(&name)? {
            outln!("redirect: removed instance {name}");
        } else {
            outln!("redirect: instance {name} is not installed");
        }
    }
    Ok(ExitCode::SUCCESS)
}
