//! `redirect`: capture a pod's traffic for its sidecar proxy with eBPF,
//! or with Istio's own iptables rules where eBPF cannot.
//!
//! `main` parses the command line ([`cli`], [`istio`]), dispatches to the
//! command's module ([`cmd`]) and maps errors to exit codes. The module
//! map and the checklist for a rule change are in ARCHITECTURE.md.

/// `println!` that treats a closed stdout (`redirect status | head`) as the
/// reader having seen enough, not as an error: the command still finishes
/// its work (and its cleanup).
/// Under the CNI plugin ([`cni::plugin`]), whose stdout is its result,
/// reports go to stderr instead.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if $crate::REPORTS_TO_STDERR.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = writeln!(std::io::stderr(), $($arg)*);
        } else {
            let _ = writeln!(std::io::stdout(), $($arg)*);
        }
    }};
}

/// `print!` with the same rules as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if $crate::REPORTS_TO_STDERR.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = write!(std::io::stderr(), $($arg)*);
        } else {
            let _ = write!(std::io::stdout(), $($arg)*);
        }
    }};
}

/// Set by the CNI plugin: see [`outln!`].
static REPORTS_TO_STDERR: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

mod applied;
mod bpffs;
mod capture;
mod cgroup;
mod cli;
mod cmd;
mod cni;
mod ebpf;
mod host;
mod ifaddrs;
mod instance;
mod iptables;
mod istio;
mod netns;
mod nftables;
mod pause;
mod signals;
mod userns;
mod validate;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser as _;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    // Called as `pause` (a link in the image), redirect is a pod's infra
    // process: it holds the namespaces and sleeps until told to stop. The
    // pod test runs its pods with the image as their infra image, as no
    // registry is reachable for Kubernetes' own pause image.
    if std::env::args_os()
        .next()
        .is_some_and(|argv0| std::path::Path::new(&argv0).file_name() == Some("pause".as_ref()))
    {
        return ExitCode::from(pause::pause());
    }
    // Called as `redirect-cni` (the link `node install` and the CRI test
    // place in the CNI bin dir), it is the CNI plugin: no command line.
    if std::env::args_os().next().is_some_and(|argv0| {
        std::path::Path::new(&argv0).file_name() == Some("redirect-cni".as_ref())
    }) {
        return cni::plugin::main();
    }
    // As bytes: `std::env::args` panics on an argument that is not UTF-8.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    ebpf::timing::start();
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
        && let Err(err) = ebpf::features::assume_missing(cli.assume_missing.clone())
    {
        eprintln!("redirect: error: {err:#}");
        return ExitCode::from(2);
    }
    ebpf::timing::mark(|| "command line".into());
    let outcome = dispatch(cli.command);
    ebpf::timing::print();
    match outcome {
        Ok(code) => code,
        Err(err) => {
            eprintln!("redirect: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Install(args) => cmd::install::install(&args),
        Command::Uninstall(args) => cmd::uninstall::uninstall(&args),
        Command::Status(args) => cmd::status::status(&args),
        Command::Run(args) => cmd::run::run(&args),
        Command::Gc { dry_run } => cmd::gc::gc(dry_run),
        #[cfg(feature = "sandbox")]
        Command::Demo { profile } => cmd::demo::demo(profile),
        Command::Probe { json } => cmd::probe::probe(json),
        Command::IstioIptables(args) => cmd::istio_iptables::istio_iptables(&args),
        Command::CniPlan(args) => cmd::cni_plan::cni_plan(&args),
        Command::Node { action } => cmd::node::node(&action),
        Command::NodeSet { action } => cmd::node_set::node_set(&action),
        #[cfg(feature = "sandbox")]
        Command::SandboxAgent { args } => {
            let code = redirect_sandbox::agent::main(&args);
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
    }
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
