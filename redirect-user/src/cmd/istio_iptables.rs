//! `redirect istio-iptables`: istio-iptables' command line, resolved into
//! one [`Capture`] and lowered by the backend `--mode` chooses (the
//! netfilter one being Istio's native nftables rules with
//! `--native-nftables`, or in auto mode on a node without iptables but
//! with nft). Exit codes
//! are istio-iptables': 1 for a configuration it refuses or a failed
//! apply, 255 for a bad command line (see `main`), which includes an
//! environment variable that is not UTF-8 (see
//! [`crate::host::ConfigError::not_utf8`]).

use std::process::ExitCode;

use anyhow::{Context as _, Result};

use super::install::{inbound_summary, verb};
use crate::{
    applied::Applied,
    capture::Capture,
    cgroup::{self, Cgroup},
    ebpf::{
        self,
        config::Config,
        features::{self, Mode as Probed},
        loader,
    },
    host::{ConfigError, RealHost},
    instance::InstanceName,
    iptables::{
        self,
        apply::{self, Backend, routes},
        builder::Family,
    },
    istio::{self, Actions, IstioArgs, Mode},
    netns, nftables, validate,
};

pub fn istio_iptables(args: &IstioArgs) -> Result<ExitCode> {
    let refuse = |msg: &dyn std::fmt::Display| {
        eprintln!("redirect: error: {msg}");
        Ok(ExitCode::from(1))
    };
    let reject = |err: ConfigError| {
        eprintln!("redirect: error: {err}");
        Ok(ExitCode::from(err.exit_code))
    };
    let actions = match args.actions(&RealHost::new()) {
        Ok(actions) => actions,
        Err(err) => return reject(err),
    };
    let backend = match Backend::parse(&args.force_iptables_binary) {
        Ok(backend) => backend,
        Err(err) => return refuse(&err),
    };
    if let Some(path) = &args.netns {
        // Before anything else: IPv6 detection and the pod's addresses
        // are this namespace's.
        netns::enter(path)?;
        ebpf::timing::mark(|| "enter the pod's network namespace".into());
    }
    // The pod's interfaces are read once, here, for resolution and the
    // lowering alike.
    let host = RealHost::new();
    let capture = match args.resolve(&host) {
        Ok(capture) => capture,
        Err(err) => return reject(err),
    };
    ebpf::timing::mark(|| "resolve (pod addresses, IPv6)".into());
    if actions.dry_run && actions.native_nftables {
        out!("{}", nftables::rules::rules(&capture).render());
        return Ok(ExitCode::SUCCESS);
    }
    if actions.dry_run {
        let rules = iptables::rules::rules(&capture);
        out!("{}", rules.render(Family::V4));
        out!("{}", rules.render(Family::V6));
        return Ok(ExitCode::SUCCESS);
    }
    if actions.skip_rule_apply {
        return validated(args, &actions, &capture, ExitCode::SUCCESS);
    }
    if let Err(err) = istio::check_owners(&capture, &host) {
        return reject(err);
    }
    let choice = choose_mode(args, &capture, &host);
    ebpf::timing::mark(|| "choose the mode (lowering; probes unless in a node set)".into());
    let fallback_reason = match choice {
        Ok(Choice::Ebpf(config, target)) => {
            let code = match &target {
                EbpfTarget::Cgroup(cgroup) => with_ebpf(args, &actions, &config, cgroup)?,
                EbpfTarget::NodeSet(set) => in_node_set(args, &actions, &config, set)?,
            };
            return validated(args, &actions, &capture, code);
        }
        Ok(Choice::Netfilter { why }) => why,
        Err(err) => return refuse(&format!("{err:#}")),
    };
    // The netfilter backend (looked for only now, eBPF not chosen):
    // Istio's native nftables rules when asked for, or in auto mode on a
    // node with nft but no iptables at all.
    let no_iptables = !actions.native_nftables
        && args.mode == Mode::Auto
        && backend.is_none()
        && ![Backend::Nft, Backend::Legacy]
            .iter()
            .any(|b| b.installed())
        && crate::host::on_path("nft");
    let native = actions.native_nftables || no_iptables;
    if let Some(why) = fallback_reason {
        let fallback = if native {
            "Istio's native nftables rules"
        } else {
            "iptables"
        };
        eprintln!("redirect: auto mode: using {fallback}, because {why}");
    }
    if native {
        if no_iptables {
            eprintln!(
                "redirect: auto mode: no iptables binary here; using Istio's native nftables rules (nft)"
            );
        }
        let code = with_nftables(&actions, &capture)?;
        return validated(args, &actions, &capture, code);
    }
    let backend = match backend {
        Some(forced) => forced,
        None => Backend::detect()?,
    };
    let rules = iptables::rules::rules(&capture);
    let label = format!("iptables-{}", backend.name());
    let code = netfilter(
        &actions,
        &capture,
        (&label, "rules"),
        || apply::cleanup(backend, &rules, capture.ipv6),
        || apply::apply(backend, &rules, capture.ipv6, actions.reconcile),
    )?;
    validated(args, &actions, &capture, code)
}

/// `--run-validation` (after the rules are applied, or alone with
/// `--skip-rule-apply`, as Istio's `istio-validation` container runs it):
/// `code` when it passes or is not asked for, Istio's 126 when it fails.
fn validated(
    args: &IstioArgs,
    actions: &Actions,
    capture: &Capture,
    code: ExitCode,
) -> Result<ExitCode> {
    if !actions.run_validation || actions.cleanup_only || code != ExitCode::SUCCESS {
        return Ok(code);
    }
    let ports = [capture.proxy_port.value, capture.inbound_port.value];
    match validate::run(ports, args.iptables_probe_port, args.probe_timeout) {
        Ok(()) => {
            outln!("redirect: validation passed");
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            eprintln!("redirect: error: {err:#}");
            Ok(ExitCode::from(validate::FAILED))
        }
    }
}

/// Where eBPF mode puts a pod's capture.
enum EbpfTarget {
    /// Programs of its own, on its cgroup.
    Cgroup(Cgroup),
    /// Entries of a loaded node set (`--node-set`).
    NodeSet(InstanceName),
}

/// What `--mode` chose for a pod.
enum Choice {
    /// eBPF capture: its configuration (boxed: the larger variant by far)
    /// and where it goes.
    Ebpf(Box<Config>, EbpfTarget),
    /// A netfilter backend, with auto mode's reason for not using eBPF
    /// (`None`: `--mode iptables` asked for it).
    Netfilter { why: Option<String> },
}

/// `--mode`'s [`Choice`]; `--mode ebpf` errs with what stands in the way.
fn choose_mode(args: &IstioArgs, capture: &Capture, host: &RealHost) -> Result<Choice> {
    if args.mode == Mode::Iptables {
        return Ok(Choice::Netfilter { why: None });
    }
    let why_not = || -> Result<(Config, EbpfTarget), String> {
        let config = ebpf::lower::lower(capture, host)
            .map_err(|flags| format!("eBPF mode cannot honour {} yet", flags.join(", ")))?;
        if let Some(set) = &args.node_set {
            // A loaded set is the kernel's proof: a pod's ADD runs none of
            // the probes below (they cost tens of milliseconds).
            if let Some(why) = ebpf::node_set::refusal(set, &config) {
                return Err(why);
            }
            return Ok((config, EbpfTarget::NodeSet(set.clone())));
        }
        let report = features::run();
        if report.mode != Probed::Ebpf {
            return Err(report.reason);
        }
        if config.inbound.is_some()
            && let Some(missing) = report
                .features
                .iter()
                .find(|f| f.name == ebpf::SK_LOOKUP.feature && !f.present)
        {
            return Err(format!(
                "inbound capture (-b) needs sk_lookup (kernel {}), missing here",
                missing.first_kernel
            ));
        }
        if config.inbound.is_some()
            && !config.exclude_ifindexes.is_empty()
            && let Some(missing) = report
                .features
                .iter()
                .find(|f| f.name == features::INGRESS_IFINDEX && !f.present)
        {
            return Err(format!(
                "-c with inbound capture (-b) needs sk_lookup's ingress_ifindex (kernel {}), \
                 missing here",
                missing.first_kernel
            ));
        }
        if !config.virt_ifaces.is_empty()
            && let Some(missing) = report
                .features
                .iter()
                .find(|f| ebpf::VIRT_HOOKS.iter().any(|h| h.feature == f.name) && !f.present)
        {
            return Err(format!(
                "-k needs tc programs on TCX links ({}, kernel {}), missing here",
                missing.name, missing.first_kernel
            ));
        }
        let cgroup = cgroup::resolve(&args.cgroup).map_err(|err| format!("{err:#}"))?;
        Ok((config, EbpfTarget::Cgroup(cgroup)))
    };
    match (args.mode, why_not()) {
        (_, Ok((config, target))) => Ok(Choice::Ebpf(Box::new(config), target)),
        (Mode::Ebpf, Err(why)) => {
            anyhow::bail!("--mode ebpf: {why}: use --mode iptables (or auto)")
        }
        (_, Err(why)) => Ok(Choice::Netfilter { why: Some(why) }),
    }
}

/// Istio's native nftables mode: apply (or with --cleanup-only, remove)
/// its tables in this network namespace with `nft`, and TPROXY's policy
/// routing as iptables mode does.
fn with_nftables(actions: &Actions, capture: &Capture) -> Result<ExitCode> {
    netfilter(
        actions,
        capture,
        ("nftables", "nftables tables"),
        nftables::apply::cleanup,
        || nftables::apply::apply(&nftables::rules::rules(capture)),
    )
}

/// The netfilter backends' shared steps around their own `cleanup` and
/// `apply`: signals held, TPROXY's policy routing beside the rules, one
/// report line naming the backend (`label`) and what was removed (`what`).
fn netfilter(
    actions: &Actions,
    capture: &Capture,
    (label, what): (&str, &str),
    cleanup: impl FnOnce() -> Result<bool>,
    apply: impl FnOnce() -> Result<Applied>,
) -> Result<ExitCode> {
    let (mark, table) = (
        capture.tproxy_mark.text.as_str(),
        capture.tproxy_route_table.text.as_str(),
    );
    let _hold = crate::signals::HoldSignals::new();
    if actions.cleanup_only {
        let removed = cleanup()?;
        if capture.tproxy {
            routes::remove(mark, table, capture.ipv6);
        }
        outln!(
            "redirect: {} ({label})",
            if removed {
                format!("removed the Istio {what}")
            } else {
                format!("no Istio {what} to remove")
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    let applied = apply()?;
    if capture.tproxy {
        routes::add(mark, table, capture.ipv6).context("setting up TPROXY's policy routing")?;
    }
    outln!(
        "redirect: {} ({label}, IPv6 {})",
        applied.describe(),
        if capture.ipv6 { "on" } else { "off" }
    );
    Ok(ExitCode::SUCCESS)
}

/// eBPF mode in a node set: add the pod (or with --cleanup-only, remove
/// it).
fn in_node_set(
    args: &IstioArgs,
    actions: &Actions,
    config: &Config,
    set: &InstanceName,
) -> Result<ExitCode> {
    let Some(instance) = &args.instance else {
        anyhow::bail!("--node-set needs --instance NAME, the name the pod is added under");
    };
    if actions.cleanup_only {
        let removed = ebpf::node_set::remove(set, instance)?;
        outln!(
            "redirect: {} (eBPF, node set {set}, pod {instance})",
            if removed {
                "removed the capture"
            } else {
                "no capture to remove"
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    let replaced = ebpf::node_set::add(set, instance, config)?;
    outln!(
        "redirect: {} the capture with eBPF in node set {set} (pod {instance}): outbound TCP -> 127.0.0.1:{}{}",
        if replaced { "updated" } else { "installed" },
        config.proxy_port,
        inbound_summary(config)
    );
    Ok(ExitCode::SUCCESS)
}

/// eBPF mode: install (or with --cleanup-only, remove) the capture on the
/// pod cgroup.
fn with_ebpf(
    args: &IstioArgs,
    actions: &Actions,
    config: &Config,
    cgroup: &Cgroup,
) -> Result<ExitCode> {
    let instance = args
        .instance
        .clone()
        .unwrap_or_else(|| InstanceName::for_cgroup(cgroup));
    if actions.cleanup_only {
        let removed = loader::uninstall(&instance)?;
        outln!(
            "redirect: {} (eBPF, instance {instance})",
            if removed {
                "removed the capture"
            } else {
                "no capture to remove"
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    let installed = loader::install(&loader::Request {
        config,
        cgroup,
        instance: &instance,
    })?;
    installed.print_notes();
    outln!(
        "redirect: {} the capture with eBPF on {} (instance {instance}): outbound TCP -> 127.0.0.1:{}{}",
        verb(&installed),
        cgroup.path.display(),
        config.proxy_port,
        inbound_summary(config)
    );
    Ok(ExitCode::SUCCESS)
}
