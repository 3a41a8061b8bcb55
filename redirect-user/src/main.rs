//! `redirect`: capture a pod's outbound TCP for its sidecar proxy with eBPF.
//!
//! Module map: [`cli`] parses the command line into a validated
//! [`config::Config`] and a [`cgroup::Cgroup`]; [`ebpf::loader`] installs and
//! removes instances; [`status`] reads them back; [`run`] is the foreground
//! mode; [`demo`] shows the whole thing in a throw-away pod.

/// `println!` that treats a closed stdout (`redirect status | head`) as the
/// reader having seen enough, not as an error: the command still finishes
/// its work (and its cleanup).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `print!` with the same rule as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

mod bpffs;
mod cgroup;
mod cli;
mod config;
mod demo;
mod ebpf;
mod instance;
mod iptables;
mod istio;
mod privilege;
mod probe;
mod run;
mod status;
mod userns;

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Parser as _;

use crate::{
    cli::{Cli, Command, InstallArgs, UninstallArgs},
    ebpf::loader,
};

fn main() -> ExitCode {
    // Called as `pause` (a link in the image), redirect is a pod's infra
    // process: it holds the namespaces and sleeps until told to stop. The
    // pod test runs its pods with the image as their infra image, as no
    // registry is reachable for Kubernetes' own pause image.
    if std::env::args_os()
        .next()
        .is_some_and(|argv0| std::path::Path::new(&argv0).file_name() == Some("pause".as_ref()))
    {
        let code = redirect_sandbox::agent::main(&["pause".to_owned()]);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    // As bytes: `std::env::args` panics on an argument that is not UTF-8.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(err) => {
            if err.kind() == clap::error::ErrorKind::InvalidUtf8 {
                eprintln!("redirect: error: {}", cli::invalid_utf8(&argv));
            } else if instance_rejected(&err) {
                // One name check for every command, one line and exit 2,
                // istio-iptables included (--instance is redirect's own flag).
                let text = err.to_string();
                eprintln!("redirect: {}", text.lines().next().unwrap_or_default());
                return ExitCode::from(2);
            } else {
                let _ = err.print();
            }
            // istio-iptables exits 255 on a bad command line; an init
            // container's scripts may check for it.
            let istio = argv.iter().any(|a| a == "istio-iptables");
            return match err.exit_code() {
                0 => ExitCode::SUCCESS,
                _ if istio => ExitCode::from(255),
                code => ExitCode::from(u8::try_from(code).unwrap_or(2)),
            };
        }
    };
    if !cli.assume_missing.is_empty()
        && let Err(err) = probe::assume_missing(cli.assume_missing.clone())
    {
        eprintln!("redirect: error: {err:#}");
        return ExitCode::from(2);
    }
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("redirect: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Install(args) => install(&args),
        Command::Uninstall(args) => uninstall(&args),
        Command::Status(args) => {
            let status = status::collect(args.instance.as_ref())?;
            if args.json {
                outln!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                out!("{}", status::render(&status));
            }
            // Like a failed check: something is installed but not whole.
            Ok(if status.healthy() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Run(args) => run::run(&args),
        Command::Gc { dry_run } => {
            let removed = loader::gc(dry_run)?;
            if removed.is_empty() {
                outln!("redirect: no instance of a deleted pod");
            }
            for (name, why) in removed {
                outln!(
                    "redirect: {} instance {name}: {why}",
                    if dry_run { "would remove" } else { "removed" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => demo::demo(),
        Command::Probe { json } => {
            let report = probe::run();
            if json {
                outln!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                out!("{}", probe::render(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::IstioIptables(args) => istio_iptables(&args),
        Command::SandboxAgent { args } => {
            let code = redirect_sandbox::agent::main(&args);
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
    }
}

fn install(args: &InstallArgs) -> Result<ExitCode> {
    args.target.enter_netns()?;
    let config = args.capture.to_kernel_config()?;
    let cgroup = cgroup::resolve(&args.target.cgroup)?;
    let instance = args
        .target
        .instance
        .clone()
        .unwrap_or_else(|| instance::InstanceName::for_cgroup(&cgroup));
    let installed = loader::install(&loader::Request {
        config: &config,
        cgroup: &cgroup,
        instance: &instance,
        log_level: 0,
    })?;
    installed.print_notes();
    outln!(
        "redirect: {} instance {instance} on {}: outbound TCP -> 127.0.0.1:{}{} (proxy uids {:?}, gids {:?})",
        if installed.upgraded {
            "updated"
        } else {
            "installed"
        },
        cgroup.path.display(),
        config.proxy_port,
        inbound_summary(&config),
        config.proxy_uids,
        config.proxy_gids,
    );
    Ok(ExitCode::SUCCESS)
}

/// ", inbound TCP to ports ... -> the inbound listener on :15006", or
/// nothing without inbound capture.
fn inbound_summary(config: &config::Config) -> String {
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

/// `redirect istio-iptables`: istio-iptables' command line. Exit codes are
/// istio-iptables': 1 for a configuration it refuses or a failed apply,
/// 255 for a bad command line (see `main`), which includes an environment
/// variable that is not UTF-8 (see [`istio::ConfigError::not_utf8`]).
fn istio_iptables(args: &istio::IstioArgs) -> Result<ExitCode> {
    use iptables::{
        apply::{self, Applied, Backend, routes},
        builder::Family,
    };
    let refuse = |msg: &dyn std::fmt::Display| {
        eprintln!("redirect: error: {msg}");
        Ok(ExitCode::from(1))
    };
    let reject = |err: istio::ConfigError| {
        eprintln!("redirect: error: {err}");
        Ok(ExitCode::from(err.exit_code))
    };
    let actions = match args.actions(&istio::RealHost) {
        Ok(actions) => actions,
        Err(err) => return reject(err),
    };
    if actions.skip_rule_apply {
        return Ok(ExitCode::SUCCESS);
    }
    if actions.native_nftables {
        return refuse(
            &"Istio's native nftables mode is not supported: drop --native-nftables to program nftables through iptables-nft",
        );
    }
    let backend = match Backend::parse(&args.force_iptables_binary) {
        Ok(backend) => backend,
        Err(err) => return refuse(&err),
    };
    if let Some(netns) = &args.netns {
        // Before anything else: IPv6 detection reads this namespace's addresses.
        apply::enter_netns(netns)?;
    }
    let config = match args.resolve(&istio::RealHost) {
        Ok(config) => config,
        Err(err) => return reject(err),
    };
    let rules = iptables::capture::rules(&config);
    if actions.dry_run {
        out!("{}", rules.render(Family::V4));
        out!("{}", rules.render(Family::V6));
        return Ok(ExitCode::SUCCESS);
    }
    if let Err(err) = config.check_owners(&istio::RealHost) {
        return reject(err);
    }
    let ebpf = match choose_mode(args, &config) {
        Ok(choice) => choice,
        Err(err) => return refuse(&format!("{err:#}")),
    };
    if let Some((ebpf_config, cgroup)) = ebpf {
        return istio_ebpf(args, &actions, &ebpf_config, &cgroup);
    }
    if actions.run_validation {
        eprintln!(
            "redirect: note: --run-validation is accepted, but redirect does not run Istio's validator"
        );
    }
    let backend = match backend {
        Some(forced) => forced,
        None => Backend::detect()?,
    };
    let _hold = privilege::HoldSignals::new();
    if actions.cleanup_only {
        let removed = apply::cleanup(backend, &rules, config.ipv6)?;
        if config.tproxy {
            routes::remove(&config.tproxy_mark, &config.tproxy_route_table, config.ipv6);
        }
        outln!(
            "redirect: {} (iptables-{})",
            if removed {
                "removed the Istio rules"
            } else {
                "no Istio rules to remove"
            },
            backend.name()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let applied = apply::apply(backend, &rules, config.ipv6, actions.reconcile)?;
    if config.tproxy {
        routes::add(&config.tproxy_mark, &config.tproxy_route_table, config.ipv6)
            .context("setting up TPROXY's policy routing")?;
    }
    outln!(
        "redirect: {} (iptables-{}, IPv6 {})",
        match applied {
            Applied::Installed => "applied the Istio rules",
            Applied::Replaced => "replaced the Istio rules that were in place",
            Applied::AlreadyPresent => "the Istio rules are already in place; nothing changed",
        },
        backend.name(),
        if config.ipv6 { "on" } else { "off" }
    );
    Ok(ExitCode::SUCCESS)
}

/// `--mode`: the eBPF configuration and pod cgroup when eBPF capture is
/// chosen, `None` for iptables (auto mode says why on stderr). `--mode
/// ebpf` errs with what stands in the way.
fn choose_mode(
    args: &istio::IstioArgs,
    config: &istio::IstioConfig,
) -> Result<Option<(config::Config, cgroup::Cgroup)>> {
    use istio::Mode;
    if args.mode == Mode::Iptables {
        return Ok(None);
    }
    let why_not = || -> Result<(config::Config, cgroup::Cgroup), String> {
        let ebpf = config::Config::from_istio(config, &istio::RealHost)
            .map_err(|flags| format!("eBPF mode cannot honour {} yet", flags.join(", ")))?;
        let report = probe::run();
        if report.mode != "ebpf" {
            return Err(report.reason);
        }
        if ebpf.inbound.is_some()
            && let Some(missing) = report
                .features
                .iter()
                .find(|f| f.name == "sk_lookup" && !f.present)
        {
            return Err(format!(
                "inbound capture (-b) needs sk_lookup (kernel {}), missing here",
                missing.first_kernel
            ));
        }
        let cgroup = cgroup::resolve(&args.cgroup).map_err(|err| format!("{err:#}"))?;
        Ok((ebpf, cgroup))
    };
    match (args.mode, why_not()) {
        (_, Ok(choice)) => Ok(Some(choice)),
        (Mode::Ebpf, Err(why)) => {
            anyhow::bail!("--mode ebpf: {why}: use --mode iptables (or auto)")
        }
        (_, Err(why)) => {
            eprintln!("redirect: auto mode: using iptables, because {why}");
            Ok(None)
        }
    }
}

/// `istio-iptables` in eBPF mode: install (or with --cleanup-only, remove)
/// the eBPF capture on the pod cgroup.
fn istio_ebpf(
    args: &istio::IstioArgs,
    actions: &istio::Actions,
    ebpf: &config::Config,
    cgroup: &cgroup::Cgroup,
) -> Result<ExitCode> {
    let instance = args
        .instance
        .clone()
        .unwrap_or_else(|| instance::InstanceName::for_cgroup(cgroup));
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
    let mut kernel_config = userns::config_to_host(ebpf)?;
    kernel_config.max_connections = args.max_connections;
    // `-o lo` covers the pod's own addresses: those of this network
    // namespace (the pod's, or --netns).
    kernel_config.local_addrs = config::pod_addresses()?;
    let installed = loader::install(&loader::Request {
        config: &kernel_config,
        cgroup,
        instance: &instance,
        log_level: 0,
    })?;
    installed.print_notes();
    outln!(
        "redirect: {} the capture with eBPF on {} (instance {instance}): outbound TCP -> 127.0.0.1:{}{}",
        if installed.upgraded {
            "updated"
        } else {
            "installed"
        },
        cgroup.path.display(),
        ebpf.proxy_port,
        inbound_summary(ebpf)
    );
    Ok(ExitCode::SUCCESS)
}

fn uninstall(args: &UninstallArgs) -> Result<ExitCode> {
    let names = match (&args.instance, &args.cgroup) {
        (Some(name), _) => vec![name.clone()],
        (None, Some(cg)) => {
            let cg = cgroup::resolve(cg).map_err(|err| {
                err.context("cannot find the cgroup; remove its instance with --instance NAME (see `redirect status`)")
            })?;
            privilege::check_ebpf()?;
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

/// Whether clap refused the value of `--instance` (see [`instance`]).
fn instance_rejected(err: &clap::Error) -> bool {
    use clap::error::{ContextKind, ContextValue};
    err.kind() == clap::error::ErrorKind::ValueValidation
        && matches!(
            err.get(ContextKind::InvalidArg),
            Some(ContextValue::String(arg)) if arg.starts_with("--instance")
        )
}
