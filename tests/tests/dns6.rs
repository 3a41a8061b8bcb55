//! DNS capture with Istio's IPv6 rules in eBPF mode, proven against
//! iptables mode (ip6tables) with the same flags: every query the app and
//! the proxy make (unconnected UDP, connected UDP, TCP) to an IPv6
//! nameserver of resolv.conf, to another IPv6 server and, from AF_INET and
//! dual-stack sockets, to an IPv4 nameserver is observed whole in both
//! modes (where it lands, the source the server sees, the app's own and
//! peer addresses, the answer's source, the DNS listener's
//! SO_ORIGINAL_DST and IP6T_SO_ORIGINAL_DST) and must read the same.

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use redirect_sandbox::{
    APP, Group, Identity, Net, PEER_IP, PEER_IP6, PROXY, ROOT, Sandbox,
    cli::{ISTIO_SIDECAR_ARGS, canonical_ports, counter, differences, redirect},
    require_root,
};

/// A second IPv6 address of the peer: a DNS server resolv.conf does not list.
fn other6() -> Ipv6Addr {
    "fd00:198:18::3".parse().expect("address")
}

/// The pod: the proxy's DNS listeners on `127.0.0.1:15053` and
/// `[::1]:15053` and its outbound listener on `[::]:15001` (dual-stack), as
/// the proxy; the nameservers in
/// the peer: the IPv6 one and the IPv4 one of resolv.conf, and another.
fn pod() -> Sandbox {
    let sandbox = Sandbox::for_tests().expect("sandbox");
    sandbox
        .ip_batch(
            Net::Peer,
            &format!("addr add {}/64 dev eth0 nodad\n", other6()),
        )
        .expect("peer address");
    let dns = |net: Net, group: Group, who: Identity, listen: SocketAddr, name: &str| {
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
    // Istio's DNS proxy listens on localhost, one socket per family (a
    // wildcard socket would answer from the pod's address, which neither
    // conntrack nor eBPF mode turns back into the nameserver's).
    let local = |ip: IpAddr| SocketAddr::new(ip, 15053);
    dns(
        Net::Pod,
        Group::Proxy,
        PROXY,
        local(Ipv6Addr::LOCALHOST.into()),
        "dns-proxy6",
    );
    dns(
        Net::Pod,
        Group::Proxy,
        PROXY,
        local(std::net::Ipv4Addr::LOCALHOST.into()),
        "dns-proxy",
    );
    dns(
        Net::Peer,
        Group::Outside,
        ROOT,
        SocketAddr::new(PEER_IP6.into(), 53),
        "nameserver6",
    );
    dns(
        Net::Peer,
        Group::Outside,
        ROOT,
        SocketAddr::new(PEER_IP.into(), 53),
        "nameserver4",
    );
    dns(
        Net::Peer,
        Group::Outside,
        ROOT,
        SocketAddr::new(other6().into(), 53),
        "other6",
    );
    let mut proxy = sandbox.agent(Net::Pod, Group::Proxy, PROXY);
    proxy
        .args(["serve", "--listen", "[::]:15001"])
        .args(["--report", "observe", "--reply", "proxy"]);
    sandbox.start(proxy).expect("proxy");
    sandbox
}

/// `redirect istio-iptables --ipv6=true` in the pod with `args` and a
/// resolv.conf naming the peer's IPv6 and IPv4 addresses.
fn istio(sandbox: &Sandbox, mode: &str, args: &[&str], cleanup: bool) {
    istio_ipv6(sandbox, mode, true, args, cleanup);
}

/// [`istio`] with IPv6 rules or without (`--ipv6=<ipv6>`).
fn istio_ipv6(sandbox: &Sandbox, mode: &str, ipv6: bool, args: &[&str], cleanup: bool) {
    let resolv = std::env::temp_dir().join(format!("{}-resolv6.conf", sandbox.name()));
    fs::write(
        &resolv,
        format!("nameserver {PEER_IP6}\nnameserver {PEER_IP}\n"),
    )
    .expect("resolv.conf");
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let resolv_path = resolv.to_string_lossy().into_owned();
    let family = if ipv6 { "--ipv6=true" } else { "--ipv6=false" };
    let mut argv = vec!["istio-iptables", family, "--mode", mode];
    argv.extend(["--netns", sandbox.pod_netns(), "--cgroup", &cgroup]);
    argv.extend(["--instance", sandbox.name(), "--resolv-conf", &resolv_path]);
    argv.extend(args);
    if cleanup {
        argv.push("--cleanup-only");
    }
    let out = redirect(&argv).expect("redirect istio-iptables");
    assert!(out.ok(), "{mode} {args:?} (cleanup {cleanup}): {out:?}");
    if !cleanup && mode == "ebpf" {
        assert!(out.stdout.contains("with eBPF"), "{out:?}");
    }
    let _ = fs::remove_file(&resolv);
}

/// Every query's observation: "<who> <how> [(dual-stack)] -> <to>".
fn observe(sandbox: &Sandbox) -> BTreeMap<String, String> {
    let mut seen = BTreeMap::new();
    let targets: [(SocketAddr, bool); 4] = [
        (SocketAddr::new(PEER_IP6.into(), 53), false),
        (SocketAddr::new(IpAddr::V6(other6()), 53), false),
        (SocketAddr::new(PEER_IP.into(), 53), false),
        (SocketAddr::new(PEER_IP.into(), 53), true),
    ];
    for how in ["sendto", "connected", "tcp"] {
        for (who, id) in [("app", APP), ("proxy", PROXY)] {
            for (to, family6) in targets {
                let to_text = to.to_string();
                let mut args = vec!["dns-query", "--to", &to_text, "--how", how];
                if family6 {
                    args.push("--family6");
                }
                let out = sandbox
                    .agent_output(Group::App, id, &args)
                    .expect("dns-query");
                let dual = if family6 { " (dual-stack)" } else { "" };
                seen.insert(
                    format!("{who} {how}{dual} -> {to}"),
                    canonical_ports(out.trim(), &[53, 15001, 15053]),
                );
            }
        }
    }
    seen
}

/// `args` in eBPF mode, then in iptables mode: every observation alike.
fn ebpf_is_iptables(args: &[&str]) -> BTreeMap<String, String> {
    let sandbox = pod();
    istio(&sandbox, "ebpf", args, false);
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
    eprintln!("{args:?}: {} queries alike: {iptables:#?}", iptables.len());
    iptables
}

#[test]
fn ipv6_dns_capture_in_ebpf_mode_is_observed_as_with_ip6tables() {
    require_root!();
    let mut args = ISTIO_SIDECAR_ARGS.to_vec();
    args.push("--redirect-dns");
    let seen = ebpf_is_iptables(&args);
    // Not vacuous: the app's UDP to the IPv6 nameserver reached the proxy's
    // DNS listener and its answer reads as the nameserver's.
    let query = &seen[&format!("app sendto -> [{PEER_IP6}]:53")];
    assert!(query.contains("| dns-proxy6"), "{query}");
    assert!(query.contains(&format!("from=[{PEER_IP6}]:53")), "{query}");
    let other = &seen[&format!("app sendto -> [{}]:53", other6())];
    assert!(other.contains("| other6"), "not a nameserver: {other}");
}

#[test]
fn ipv6_capture_all_dns_in_ebpf_mode_is_observed_as_with_ip6tables() {
    require_root!();
    let mut args = ISTIO_SIDECAR_ARGS.to_vec();
    args.extend(["--redirect-dns", "--capture-all-dns"]);
    let seen = ebpf_is_iptables(&args);
    let other = &seen[&format!("app tcp -> [{}]:53", other6())];
    assert!(other.contains("| dns-proxy6"), "every server's: {other}");
}

/// The kernel's name (its first 15 bytes) of the program `hook` runs in
/// the sandbox's instance.
fn running_program(sandbox: &Sandbox, hook: &str) -> String {
    let status = sandbox.status().expect("status");
    let id = status["instances"][0]["programs"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["hook"] == hook))
        .and_then(|p| p["program_id"].as_u64())
        .unwrap_or_else(|| panic!("no {hook} program in {status}"));
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| u64::from(p.id()) == id)
        .and_then(|p| p.name_as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("program {id} of {hook} not found"))
}

/// Without IPv6 rules, connect6 and sendmsg6 run the programs without the
/// IPv6 decision; updated in place with `--ipv6=true` they run the whole
/// ones, which stay through an update back (the configuration in force
/// until it lands has IPv6 rules) and give way at the next. At each step
/// every query reads as iptables mode's with the same IPv6 setting, and
/// the native IPv6 queries are counted as not captured (`not_ipv4`) alike
/// by both programs.
#[test]
fn the_ipv6_decision_runs_while_ipv6_rules_may_be_in_force() {
    require_root!();
    let mut args = ISTIO_SIDECAR_ARGS.to_vec();
    args.push("--redirect-dns");
    let sandbox = pod();
    let kernel_name = |program: &str| program[..program.len().min(15)].to_owned();
    let without = [
        kernel_name("redirect_conn6_v4"),
        kernel_name("redirect_send6_v4"),
    ];
    let whole = [
        kernel_name("redirect_connect6"),
        kernel_name("redirect_sendmsg6"),
    ];
    let mut ebpf = Vec::new();
    let mut not_captured = Vec::new();
    for (step, ipv6, programs) in [
        ("without IPv6 rules", false, &without),
        ("with them, updated in place", true, &whole),
        ("without them again", false, &whole),
        ("without them, updated once more", false, &without),
    ] {
        istio_ipv6(&sandbox, "ebpf", ipv6, &args, false);
        let running = [
            running_program(&sandbox, "connect6"),
            running_program(&sandbox, "sendmsg6"),
        ];
        assert_eq!(&running, programs, "{step}");
        let before = counter(&sandbox.status().expect("status"), "not_ipv4");
        let seen = observe(&sandbox);
        let after = counter(&sandbox.status().expect("status"), "not_ipv4");
        if !ipv6 {
            not_captured.push(after - before);
        }
        ebpf.push((step, ipv6, seen));
    }
    istio_ipv6(&sandbox, "ebpf", false, &args, true);
    let mut iptables = BTreeMap::new();
    for ipv6 in [false, true] {
        istio_ipv6(&sandbox, "iptables", ipv6, &args, false);
        iptables.insert(ipv6, observe(&sandbox));
        istio_ipv6(&sandbox, "iptables", ipv6, &args, true);
    }
    // Not vacuous: IPv6 rules change what the app sees.
    assert_ne!(iptables[&false], iptables[&true]);
    for (step, ipv6, seen) in &ebpf {
        let differ = differences(seen, &iptables[ipv6]);
        assert!(differ.is_empty(), "{step}: {}", differ.join("\n"));
    }
    assert!(not_captured[0] > 0, "{not_captured:?}");
    assert!(
        not_captured.iter().all(|n| *n == not_captured[0]),
        "counted alike by both programs: {not_captured:?}"
    );
}
