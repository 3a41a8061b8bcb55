//! DNS capture (`--redirect-dns`, `--capture-all-dns`) in eBPF mode,
//! proven against iptables mode with the same flags: every query an app or
//! the proxy makes (unconnected UDP, connected UDP, TCP; AF_INET and
//! dual-stack sockets; to a nameserver of resolv.conf, to a local
//! resolver, to another server; the app also to a multicast group) is observed whole in both modes (where it
//! lands, the source the server sees, the app's own and peer addresses, the
//! answer's source, the DNS listener's SO_ORIGINAL_DST) and must read the
//! same.

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddrV4},
};

use redirect_sandbox::{
    APP, Group, Identity, Net, PEER_IP, POD_IP, PROXY, ROOT, Sandbox,
    cli::{ISTIO_SIDECAR_ARGS, Outcome, canonical_ports, counter, differences, redirect},
    peer_ip, require_root,
};

/// The resolv.conf nameservers: one across the network, one local resolver
/// (as systemd-resolved's 127.0.0.53).
const NAMESERVER: SocketAddrV4 = SocketAddrV4::new(PEER_IP, 53);
const LOCAL_RESOLVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 53), 53);

/// A multicast group's port 53: UDP may send there, TCP may not.
const MULTICAST: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 1, 2, 3), 53);

/// A DNS server resolv.conf does not list.
fn other_server() -> SocketAddrV4 {
    SocketAddrV4::new(peer_ip(1), 53)
}

/// The pod: the proxy's DNS listener on 127.0.0.1:15053 and its outbound
/// listener on 15001 (as the proxy), the local resolver (as root), the
/// nameserver and the other server in the peer.
fn pod() -> Sandbox {
    let sandbox = Sandbox::for_tests().expect("sandbox");
    sandbox.add_peer_addresses(1).expect("peer address");
    let dns = |net: Net, group: Group, who: Identity, listen: SocketAddrV4, name: &str| {
        let mut cmd = sandbox.agent(net, group, who);
        cmd.args([
            "dns-serve",
            "--listen",
            &listen.to_string(),
            "--reply",
            name,
        ]);
        sandbox.start(cmd).expect(name);
    };
    let proxy_dns = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15053);
    dns(Net::Pod, Group::Proxy, PROXY, proxy_dns, "dns-proxy");
    dns(Net::Pod, Group::App, ROOT, LOCAL_RESOLVER, "local-resolver");
    dns(Net::Peer, Group::Outside, ROOT, NAMESERVER, "nameserver");
    dns(
        Net::Peer,
        Group::Outside,
        ROOT,
        other_server(),
        "other-server",
    );
    let mut proxy = sandbox.agent(Net::Pod, Group::Proxy, PROXY);
    proxy
        .args(["serve", "--listen", "127.0.0.1:15001"])
        .args(["--report", "observe", "--reply", "proxy"]);
    sandbox.start(proxy).expect("proxy");
    sandbox
}

/// `redirect istio-iptables` in the pod with `args` and the pod's
/// resolv.conf.
fn istio(sandbox: &Sandbox, mode: &str, args: &[&str], cleanup: bool) -> Outcome {
    let resolv = std::env::temp_dir().join(format!("{}-resolv.conf", sandbox.name()));
    fs::write(
        &resolv,
        format!(
            "nameserver {}\nnameserver {}\n",
            NAMESERVER.ip(),
            LOCAL_RESOLVER.ip()
        ),
    )
    .expect("resolv.conf");
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let resolv = resolv.to_string_lossy().into_owned();
    let mut argv = vec!["istio-iptables", "--ipv6=false", "--mode", mode];
    argv.extend(["--netns", sandbox.pod_netns(), "--cgroup", &cgroup]);
    argv.extend(["--instance", sandbox.name(), "--resolv-conf", &resolv]);
    argv.extend(args);
    if cleanup {
        argv.push("--cleanup-only");
    }
    let out = redirect(&argv).expect("redirect istio-iptables");
    assert!(out.ok(), "{mode} {args:?} (cleanup {cleanup}): {out:?}");
    out
}

/// One query: who makes it, how, from which socket family, from which
/// bound address (or none), to where.
struct Query {
    who: &'static str,
    id: Identity,
    how: &'static str,
    family6: bool,
    bind: Option<Ipv4Addr>,
    to: SocketAddrV4,
}

impl Query {
    /// How the observations name it.
    fn key(&self) -> String {
        format!(
            "{} {}{}{} -> {}",
            self.who,
            self.how,
            if self.family6 { " (dual-stack)" } else { "" },
            if self.bind.is_some() { " bound" } else { "" },
            self.to
        )
    }
}

/// Every query of the test: the app and the proxy to each server, and the
/// app to a multicast group, unbound and from a socket bound to the pod's
/// address (the kernel sends that one out of the address's device without
/// a route, and captured DNS goes to the proxy).
fn queries() -> Vec<Query> {
    let mut all = Vec::new();
    for how in ["sendto", "connected", "tcp"] {
        for family6 in [false, true] {
            for (who, id) in [("app", APP), ("proxy", PROXY)] {
                for to in [NAMESERVER, LOCAL_RESOLVER, other_server()] {
                    all.push(Query {
                        who,
                        id,
                        how,
                        family6,
                        bind: None,
                        to,
                    });
                }
            }
            for bind in [None, Some(POD_IP)] {
                all.push(Query {
                    who: "app",
                    id: APP,
                    how,
                    family6,
                    bind,
                    to: MULTICAST,
                });
            }
        }
    }
    all
}

/// An observation with the client's ephemeral port written `eph`
/// (wherever it appears: the app's view and the server's), so that runs
/// compare.
fn canonical(seen: &str) -> String {
    canonical_ports(seen, &[53, 15001, 15053])
}

/// Every query's observation in the pod's current state.
fn observe(sandbox: &Sandbox) -> BTreeMap<String, String> {
    queries()
        .into_iter()
        .map(|query| {
            let to = query.to.to_string();
            let mut args = vec!["dns-query", "--to", &to, "--how", query.how];
            if query.family6 {
                args.push("--family6");
            }
            let bind = query.bind.map(|ip| ip.to_string());
            if let Some(ip) = &bind {
                args.extend(["--bind", ip]);
            }
            let out = sandbox
                .agent_output(Group::App, query.id, &args)
                .expect("dns-query");
            (query.key(), canonical(out.trim()))
        })
        .collect()
}

/// Applies `args` in eBPF mode, observes, removes; then the same in
/// iptables mode (eBPF first: its run leaves no conntrack entry behind
/// that could meet the iptables run's); every observation must match.
fn ebpf_is_iptables(args: &[&str]) -> BTreeMap<String, String> {
    let sandbox = pod();
    let out = istio(&sandbox, "ebpf", args, false);
    assert!(out.stdout.contains("with eBPF"), "{out:?}");
    let ebpf = observe(&sandbox);
    let status = sandbox.status().expect("status");
    for said in ["dns_redirected", "dns_reply_restored"] {
        assert!(counter(&status, said) > 0, "{said}: {status}");
    }
    istio(&sandbox, "ebpf", args, true);
    istio(&sandbox, "iptables", args, false);
    let iptables = observe(&sandbox);
    istio(&sandbox, "iptables", args, true);
    let differ = differences(&ebpf, &iptables);
    assert!(
        differ.is_empty(),
        "{args:?}: {} of {} queries differ:\n{}",
        differ.len(),
        iptables.len(),
        differ.join("\n")
    );
    eprintln!(
        "{args:?}: {} queries alike; eBPF status: {status}",
        iptables.len()
    );
    iptables
}

/// Istio's sidecar (istio-init's flags) with DNS capture.
fn sidecar_dns() -> Vec<&'static str> {
    let mut args = ISTIO_SIDECAR_ARGS.to_vec();
    args.push("--redirect-dns");
    args
}

#[test]
fn dns_capture_in_ebpf_mode_is_observed_as_with_iptables() {
    require_root!();
    let seen = ebpf_is_iptables(&sidecar_dns());
    // Not vacuous: the app's DNS to both resolv.conf servers reached the
    // proxy's DNS listener over every transport, and the answers read as
    // the nameserver's; the proxy's own DNS reached the nameserver.
    let app = |how: &str, to: SocketAddrV4| seen[&format!("app {how} -> {to}")].clone();
    for how in ["sendto", "connected", "tcp"] {
        for to in [NAMESERVER, LOCAL_RESOLVER] {
            assert!(
                app(how, to).contains("| dns-proxy"),
                "{how} {to}: {}",
                app(how, to)
            );
        }
    }
    assert!(app("sendto", NAMESERVER).contains(&format!("from={NAMESERVER} ")));
    assert!(app("tcp", NAMESERVER).contains(&format!("odst={NAMESERVER}")));
    // DNS elsewhere is not DNS capture's: UDP goes there, TCP is ordinary
    // outbound traffic (-i '*') and goes to the proxy's outbound port.
    assert!(app("sendto", other_server()).contains("| other-server"));
    let tcp_other = app("tcp", other_server());
    let via_proxy = format!(
        "| proxy peer=198.18.0.1:eph local=127.0.0.1:15001 odst={}",
        other_server()
    );
    assert!(tcp_other.contains(&via_proxy), "{tcp_other}");
    assert!(seen[&format!("proxy sendto -> {NAMESERVER}")].contains("| nameserver"));
}

#[test]
fn capture_all_dns_in_ebpf_mode_is_observed_as_with_iptables() {
    require_root!();
    let mut args = sidecar_dns();
    args.push("--capture-all-dns");
    let seen = ebpf_is_iptables(&args);
    let other = seen[&format!("app sendto -> {}", other_server())].clone();
    assert!(other.contains("| dns-proxy"), "{other}");
    // UDP to a multicast group is DNS too: from a bound socket (the kernel
    // finds no route for an unbound one in this pod), sent and connected.
    for how in ["sendto", "connected"] {
        let group = seen[&format!("app {how} bound -> {MULTICAST}")].clone();
        assert!(group.contains("| dns-proxy"), "{how}: {group}");
    }
    let tcp = seen[&format!("app tcp bound -> {MULTICAST}")].clone();
    assert!(tcp.starts_with("connect=ENETUNREACH"), "{tcp}");
}

#[test]
fn dns_capture_without_outbound_capture_in_ebpf_mode_is_observed_as_with_iptables() {
    require_root!();
    let mut args = sidecar_dns();
    let at = 1 + args.iter().position(|a| *a == "-i").expect("-i");
    args[at] = "";
    ebpf_is_iptables(&args);
}

/// The hooks the eBPF instance in the sandbox has attached.
fn attached_hooks(sandbox: &Sandbox) -> Vec<String> {
    let status = sandbox.status().expect("status");
    assert_eq!(status["incomplete"], serde_json::json!([]), "{status}");
    status["instances"][0]["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .filter(|p| p["attached"] == true)
        .map(|p| p["hook"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// The DNS programs are loaded for a configuration with DNS capture only:
/// Istio's sidecar flags leave them out, and the app's DNS reads as with
/// iptables and the same flags. The instance updated in place with
/// `--redirect-dns` attaches them (before the new configuration is in
/// force) and reads as iptables with DNS capture; updated back, they stay
/// attached until uninstall, doing nothing, and it reads as without again.
#[test]
fn dns_programs_come_with_dns_capture_in_place_and_stay_until_uninstall() {
    require_root!();
    const DNS_HOOKS: [&str; 4] = ["sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6"];
    let sandbox = pod();
    let plain = ISTIO_SIDECAR_ARGS;
    let dns = sidecar_dns();
    istio(&sandbox, "ebpf", plain, false);
    let hooks = attached_hooks(&sandbox);
    assert!(hooks.iter().any(|h| h == "connect4"), "{hooks:?}");
    assert!(
        !hooks.iter().any(|h| DNS_HOOKS.contains(&h.as_str())),
        "{hooks:?}"
    );
    let ebpf_plain = observe(&sandbox);
    istio(&sandbox, "ebpf", &dns, false);
    let hooks = attached_hooks(&sandbox);
    for hook in DNS_HOOKS {
        assert!(hooks.iter().any(|h| h == hook), "{hook}: {hooks:?}");
    }
    let ebpf_dns = observe(&sandbox);
    istio(&sandbox, "ebpf", plain, false);
    let hooks = attached_hooks(&sandbox);
    for hook in DNS_HOOKS {
        assert!(hooks.iter().any(|h| h == hook), "kept {hook}: {hooks:?}");
    }
    let ebpf_back = observe(&sandbox);
    istio(&sandbox, "ebpf", plain, true);
    istio(&sandbox, "iptables", plain, false);
    let iptables_plain = observe(&sandbox);
    istio(&sandbox, "iptables", plain, true);
    istio(&sandbox, "iptables", &dns, false);
    let iptables_dns = observe(&sandbox);
    istio(&sandbox, "iptables", &dns, true);
    // Not vacuous: DNS capture changes what the app sees.
    assert_ne!(iptables_plain, iptables_dns);
    for (what, ebpf, iptables) in [
        ("without DNS capture", &ebpf_plain, &iptables_plain),
        (
            "with DNS capture, updated in place",
            &ebpf_dns,
            &iptables_dns,
        ),
        ("without it again", &ebpf_back, &iptables_plain),
    ] {
        let differ = differences(ebpf, iptables);
        assert!(differ.is_empty(), "{what}: {}", differ.join("\n"));
    }
}
