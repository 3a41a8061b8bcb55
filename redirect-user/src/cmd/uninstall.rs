//! `redirect uninstall`: detach and unpin instances, by name or by cgroup.

use std::process::ExitCode;

use anyhow::Result;

use crate::{cgroup, cli::UninstallArgs, ebpf::loader, iptables};

pub fn uninstall(args: &UninstallArgs) -> Result<ExitCode> {
    let what = &args.what;
    if what.iptables {
        return without_iptables(args);
    }
    let names = match (&what.instance, &what.cgroup) {
        (Some(name), _) => vec![name.clone()],
        (None, Some(cg)) => {
            let cg = cgroup::resolve(cg).map_err(|err| {
                err.context("cannot find the cgroup; remove its instance with --instance NAME (see `redirect status`)")
            })?;
            crate::ebpf::privilege::check_ebpf()?;
            loader::instances_on(&cg)?
        }
        (None, None) => anyhow::bail!("pass --cgroup PATH, --instance NAME or --iptables"),
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

/// `uninstall --iptables`: Istio's chains and the jumps into them, removed
/// from the network namespace (IPv6 too where the kernel has it).
fn without_iptables(args: &UninstallArgs) -> Result<ExitCode> {
    if let Some(path) = &args.netns {
        crate::netns::enter(path)?;
    }
    let _hold = crate::signals::HoldSignals::new();
    let (backend, removed) = iptables::apply::remove_istio_rules()?;
    outln!(
        "redirect: {} (iptables-{})",
        if removed {
            "removed the Istio rules"
        } else {
            "no Istio rules to remove"
        },
        backend.name()
    );
    Ok(ExitCode::SUCCESS)
}
