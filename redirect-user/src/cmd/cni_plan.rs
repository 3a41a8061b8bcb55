//! `redirect cni-plan`: what Istio's CNI plugin does for a pod (see
//! [`crate::cni::pod`]), shown as an istio-iptables command line, or run
//! as one (`-- --dry-run` prints its rules; other istio-iptables flags,
//! such as `--netns` and `--cgroup`, apply it to a pod).

use std::{ffi::OsString, io::Read as _, process::ExitCode};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Parser as _;

use crate::{
    cli::{Cli, CniPlanArgs, Command},
    cni::pod::{Plan, Pod, Scope, plan, shell_line},
};

pub fn cni_plan(args: &CniPlanArgs) -> Result<ExitCode> {
    let text = if args.pod.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the pod from stdin")?;
        text
    } else {
        std::fs::read_to_string(&args.pod)
            .with_context(|| format!("reading the pod from {}", args.pod.display()))?
    };
    let pod = Pod::from_json(&text).with_context(|| format!("{}", args.pod.display()))?;
    let scope = Scope {
        exclude_namespaces: crate::capture::parse::split(&args.exclude_namespaces),
    };
    let flags = match plan(&pod, &scope).map_err(|err| anyhow!("{err}"))? {
        Plan::Skip(why) => {
            outln!(
                "redirect: pod {}/{} is not captured: {why}",
                pod.namespace,
                pod.name
            );
            return Ok(ExitCode::SUCCESS);
        }
        Plan::Capture(flags) => flags,
    };
    if args.istio_iptables.is_empty() {
        outln!("istio-iptables {}", shell_line(&flags));
        return Ok(ExitCode::SUCCESS);
    }
    let mut argv: Vec<OsString> = vec!["redirect".into(), "istio-iptables".into()];
    argv.extend(flags.into_iter().map(OsString::from));
    argv.extend(args.istio_iptables.iter().cloned());
    let cli = Cli::try_parse_from(&argv).map_err(|err| {
        anyhow!(
            "the istio-iptables flags after `--`: {}",
            err.to_string().lines().next().unwrap_or_default()
        )
    })?;
    match cli.command {
        Command::IstioIptables(istio) => crate::cmd::istio_iptables::istio_iptables(&istio),
        _ => bail!("the istio-iptables flags after `--` did not parse as istio-iptables"),
    }
}
