//! `redirect demo`: the capture shown end to end in a throw-away pod.
//!
//! Builds a sandbox pod (network namespace + cgroup, with a peer namespace
//! as "the network"), starts an upstream server in the peer and a stand-in
//! proxy on 127.0.0.1:15001 as UID 1337 in the pod, installs the redirect on
//! the pod's cgroup and network namespace, and shows where an app's
//! connection, the proxy's own connection and a connection from the network
//! to the pod land, the status, and that uninstall restores direct traffic.
//! Everything is removed at the end, also on error.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::ExitCode,
};

use anyhow::{Context as _, Result, bail};
use redirect_sandbox::{APP, Group, Identity, Net, PEER_IP, POD_IP, PROXY, Sandbox};

use clap::Parser as _;

use super::{install, status};
use crate::{
    cli::{Cli, Command, ProfileArg},
    ebpf::loader,
};

const UPSTREAM_PORT: u16 = 9080;
/// Istio's outbound and inbound proxy ports (install's default `-p`, `-z`).
const PROXY_PORT: u16 = 15001;
const INBOUND_PORT: u16 = 15006;
/// Where the pod's app listens for inbound connections.
const APP_PORT: u16 = 8080;

pub fn demo(profile: ProfileArg) -> Result<ExitCode> {
    crate::ebpf::privilege::check_ebpf()?;
    let legacy = profile == ProfileArg::Legacy;
    let exe = std::env::current_exe().context("locating the redirect binary")?;
    let sandbox = Sandbox::new(exe, &["sandbox-agent"]).context("creating the demo pod")?;
    let upstream = SocketAddrV4::new(PEER_IP, UPSTREAM_PORT);
    // The legacy table sends inbound connections to the proxy port too,
    // where REDIRECT makes them the pod address's: the proxy listens on
    // every address.
    let proxy_ip = if legacy {
        Ipv4Addr::UNSPECIFIED
    } else {
        Ipv4Addr::LOCALHOST
    };
    let proxy = SocketAddrV4::new(proxy_ip, PROXY_PORT);

    outln!("redirect demo: a throw-away pod");
    outln!(
        "  pod:   netns with {POD_IP}, cgroup {}",
        sandbox.pod_cgroup().display()
    );
    outln!("  peer:  netns with {PEER_IP} (stands for the rest of the network)");
    let upstream_reply = format!("upstream server {upstream}");
    sandbox.serve(Net::Peer, Group::Outside, APP, upstream, &upstream_reply)?;
    // The stand-in proxy answers with what getsockopt(SO_ORIGINAL_DST)
    // tells it, as a transparent proxy reads it.
    let mut proxy_cmd = sandbox.agent(Net::Pod, Group::Proxy, PROXY);
    proxy_cmd.args([
        "serve",
        "--listen",
        &proxy.to_string(),
        "--report",
        "original-dst",
    ]);
    sandbox.start(proxy_cmd)?;
    let inbound_port = if legacy { PROXY_PORT } else { INBOUND_PORT };
    let inbound = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, inbound_port);
    if !legacy {
        let mut inbound_cmd = sandbox.agent(Net::Pod, Group::Proxy, PROXY);
        inbound_cmd.args([
            "serve",
            "--listen",
            &inbound.to_string(),
            "--report",
            "original-dst",
        ]);
        sandbox.start(inbound_cmd)?;
    }
    let app = SocketAddrV4::new(POD_IP, APP_PORT);
    let app_reply = format!("app {app}");
    sandbox.serve(
        Net::Pod,
        Group::App,
        APP,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP_PORT),
        &app_reply,
    )?;
    let proxy_reply = upstream.to_string();
    outln!("  an upstream server listens on {upstream} in the peer, the app on {app};");
    outln!("  stand-in proxies listen on {proxy} (outbound) and {inbound} (inbound) as");
    outln!("  uid 1337 in the pod and answer each connection with its original");
    outln!("  destination (getsockopt SO_ORIGINAL_DST)\n");

    outln!("1. before install");
    let first = show(&sandbox, "app   (uid 1000)", APP, upstream)?;
    expect(&first, &upstream_reply)?;
    let first = show(&sandbox, "app   (uid 1000)", APP, app)?;
    expect(&first, &app_reply)?;
    let first = show_inbound(&sandbox, app)?;
    expect(&first, &app_reply)?;

    // Istio's sidecar flags, inbound capture included (or the legacy
    // table), resolved and lowered exactly as `redirect install` does it.
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let netns = sandbox.netns_path(Net::Pod);
    let mut argv = vec![
        "redirect",
        "install",
        "--cgroup",
        &cgroup,
        "--instance",
        sandbox.name(),
        "--netns",
        &netns,
    ];
    let flags: &[&str] = if legacy {
        &["--profile", "legacy"]
    } else {
        &["-b", "*", "-d", "15090,15021,15020"]
    };
    argv.extend(flags);
    outln!(
        "\n2. $ redirect install --cgroup {cgroup} --instance {} --netns <pod> {}",
        sandbox.name(),
        flags
            .iter()
            .map(|f| if *f == "*" { "'*'" } else { f })
            .collect::<Vec<_>>()
            .join(" ")
    );
    let Command::Install(args) = Cli::try_parse_from(argv)?.command else {
        bail!("the demo's install command line did not parse as install");
    };
    let (capture, cg, instance) = install::resolve(&args.target, &args.capture, 0)?;
    let config = install::lower(&capture)?;
    loader::install(&loader::Request {
        config: &config,
        cgroup: &cg,
        instance: &instance,
    })?;
    let captured = show(&sandbox, "app   (uid 1000)", APP, upstream)?;
    expect(&captured, &proxy_reply)?;
    let escaped = show(&sandbox, "proxy (uid 1337)", PROXY, upstream)?;
    expect(&escaped, &upstream_reply)?;
    let own = show(&sandbox, "app   (uid 1000)", APP, app)?;
    let captured = show_inbound(&sandbox, app)?;
    expect(&captured, &app.to_string())?;
    outln!(
        "   -> the app's connection was captured and the proxy learned where it was going;\n      the proxy's own traffic escapes the loop; the connection from the network\n      reached the proxy's {} listener, which learned it was for {app}",
        if legacy { "only" } else { "inbound" }
    );
    if legacy {
        expect(&own, &app.to_string())?;
        outln!(
            "      the app's call to its own address left through lo and went to the proxy\n      too (istio/redirect-implicit-loopback), as Istio's first table sends it"
        );
    } else {
        expect(&own, &app_reply)?;
        outln!("      the app's call to its own address stayed local, as today's Istio leaves it");
    }

    outln!("\n3. $ redirect status --instance {}", sandbox.name());
    let status = status::collect(Some(&instance))?;
    for line in status::render(&status).lines() {
        outln!("   {line}");
    }

    outln!("\n4. $ redirect uninstall --instance {}", sandbox.name());
    loader::uninstall(&instance)?;
    let after = show(&sandbox, "app   (uid 1000)", APP, upstream)?;
    expect(&after, &upstream_reply)?;
    let after = show(&sandbox, "app   (uid 1000)", APP, app)?;
    expect(&after, &app_reply)?;
    let after = show_inbound(&sandbox, app)?;
    expect(&after, &app_reply)?;
    outln!("\nredirect demo: done; the pod, its cgroup and every pin are removed");
    Ok(ExitCode::SUCCESS)
}

/// Connects once from the pod's app cgroup as `who` and prints where it landed.
fn show(sandbox: &Sandbox, label: &str, who: Identity, to: SocketAddrV4) -> Result<String> {
    let reply = sandbox.lands(Group::App, who, to)?;
    outln!("   {label} connects to {to}: answered by \"{reply}\"");
    Ok(reply)
}

/// Connects once from the peer to `to` (the pod's app) and prints where it landed.
fn show_inbound(sandbox: &Sandbox, to: SocketAddrV4) -> Result<String> {
    let reply = sandbox.lands_from_peer(to)?;
    outln!("   a client in the peer connects to {to}: answered by \"{reply}\"");
    Ok(reply)
}

fn expect(got: &str, want: &str) -> Result<()> {
    if got != want {
        bail!("demo check failed: expected \"{want}\", got \"{got}\"");
    }
    Ok(())
}
