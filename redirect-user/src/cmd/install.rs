//! `redirect install`: the eBPF capture of a pod, pinned, and exit.

use std::process::ExitCode;

use anyhow::{Result, anyhow, bail};

use crate::{
    capture::{Capture, Profile},
    cgroup::{self, Cgroup},
    cli::{InstallArgs, TargetArgs},
    ebpf::{self, config::Config, loader},
    host::RealHost,
    instance::InstanceName,
    iptables::{self, apply::Backend, builder::Family},
    netns,
};

pub fn install(args: &InstallArgs) -> Result<ExitCode> {
    if args.iptables {
        return with_iptables(args);
    }
    let (capture, cgroup, instance) = resolve(&args.target, &args.capture, 0)?;
    let config = lower(&capture)?;
    let installed = loader::install(&loader::Request {
        config: &config,
        cgroup: &cgroup,
        instance: &instance,
    })?;
    installed.print_notes();
    outln!(
        "redirect: {} instance {instance} on {}: outbound TCP -> 127.0.0.1:{}{} (proxy uids {:?}, gids {:?})",
        verb(&installed),
        cgroup.path.display(),
        config.proxy_port,
        inbound_summary(&config),
        config.proxy_uids,
        config.proxy_gids,
    );
    Ok(ExitCode::SUCCESS)
}

/// What `install` and `run` capture, and where: the pod's network
/// namespace entered (`--netns`), its addresses read, its cgroup found,
/// the instance named.
pub fn resolve(
    target: &TargetArgs,
    capture: &crate::cli::CaptureArgs,
    log_level: u8,
) -> Result<(Capture, Cgroup, InstanceName)> {
    target.enter_netns()?;
    let capture = checked(capture.resolve(netns::pod_addresses()?, log_level)?)?;
    let cgroup = cgroup::resolve(target.cgroup()?)?;
    let instance = target
        .instance
        .clone()
        .unwrap_or_else(|| InstanceName::for_cgroup(&cgroup));
    Ok((capture, cgroup, instance))
}

/// What no lowering of `install` and `run` takes: DNS capture (they do
/// not read resolv.conf).
pub fn checked(capture: Capture) -> Result<Capture> {
    if capture.dns.is_some() {
        bail!(
            "install and run do not read the pod's resolv.conf: capture DNS with `redirect istio-iptables --redirect-dns` (eBPF mode included)"
        );
    }
    // istio-iptables takes them silently and leaves them unused without
    // its IPv6 table; a command of this project's own says so.
    if !capture.ipv6 && (!capture.include.v6.is_empty() || !capture.exclude.v6.is_empty()) {
        bail!(
            "IPv6 networks in -i/-x are rules of Istio's IPv6 table, which install and run add with --dual-stack: add --dual-stack, or drop them"
        );
    }
    Ok(capture)
}

/// `install --iptables`: the same capture lowered to iptables rules and
/// applied in the pod's network namespace (or, with `--dry-run`, printed).
fn with_iptables(args: &InstallArgs) -> Result<ExitCode> {
    if args.target.cgroup.is_some() || args.target.instance.is_some() {
        bail!(
            "install --iptables programs the pod's network namespace (--netns), not a cgroup: drop --cgroup and --instance"
        );
    }
    let capture = checked(args.capture.resolve(Vec::new(), 0)?)?;
    if capture.tproxy {
        bail!(
            "install --iptables does not set up TPROXY's policy routing: run `redirect istio-iptables --mode iptables -m TPROXY`"
        );
    }
    let plan = iptables::rules::rules(&capture);
    if args.dry_run {
        out!("{}", plan.render(Family::V4));
        out!("{}", plan.render(Family::V6));
        return Ok(ExitCode::SUCCESS);
    }
    args.target.enter_netns()?;
    let backend = Backend::detect()?;
    let _hold = crate::signals::HoldSignals::new();
    let applied = iptables::apply::apply(backend, &plan, capture.ipv6, false)?;
    outln!(
        "redirect: {} (iptables-{}, profile {})",
        applied.describe(),
        backend.name(),
        profile_name(&capture)
    );
    Ok(ExitCode::SUCCESS)
}

/// `istio` or `legacy`.
pub fn profile_name(capture: &Capture) -> &'static str {
    match capture.profile {
        Profile::Istio => "istio",
        Profile::Legacy => "legacy",
    }
}

/// The eBPF lowering, or one error naming what it cannot honour and the
/// way out (`install` and `run` are eBPF only).
pub fn lower(capture: &Capture) -> Result<Config> {
    ebpf::lower::lower(capture, &RealHost::new()).map_err(|why| {
        anyhow!(
            "eBPF capture cannot honour {} yet: run `redirect istio-iptables` with the same flags (its auto mode programs iptables for them)",
            why.join(", ")
        )
    })
}

/// "installed", or "updated" for an upgrade in place.
pub fn verb(installed: &loader::Installed) -> &'static str {
    if installed.upgraded {
        "updated"
    } else {
        "installed"
    }
}

/// ", inbound TCP to ports ... -> the inbound listener on :15006", or
/// nothing without inbound capture.
pub fn inbound_summary(config: &Config) -> String {
    let Some(inbound) = &config.inbound else {
        return String::new();
    };
    let list = |ports: &[u16]| {
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let ports = match (inbound.all, inbound.exclude.is_empty()) {
        (true, true) => "every port".to_owned(),
        (true, false) => format!("every port but {}", list(&inbound.exclude)),
        (false, _) => format!("ports {}", list(&inbound.ports)),
    };
    format!(
        ", inbound TCP to {ports} -> the listener on :{}",
        config.inbound_port
    )
}
