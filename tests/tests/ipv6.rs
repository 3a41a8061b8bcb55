//! Istio's IPv6 table in eBPF mode. For each configuration below, with
//! IPv6 rules (`--ipv6=true`), every connection the app, the proxy and the
//! peer make is observed whole (where it lands, the app's local and peer
//! addresses, the server's view of both ends, `SO_ORIGINAL_DST` and
//! `IP6T_SO_ORIGINAL_DST` on both ends, errno) under ip6tables and under
//! eBPF, and must read the same. IPv4 connections of the same install are
//! observed too: the IPv4 table is still in force beside the IPv6 one.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    process::Command,
};

use redirect_sandbox::{
    APP, Group, Net, PEER_IP, PEER_IP6, POD_IP, POD_IP6, PROXY, ROOT, Sandbox,
    cli::{Outcome, canonical_ports, observe_one, outcome, redirect_bin},
    require_root,
};

const APP_PORT: u16 = 8080;
const UPSTREAM_PORT: u16 = 9080;
/// Served in the pod and the peer, excluded or listed by the configurations.
const OTHER_PORT: u16 = 8081;
const FIXED_PORTS: [u16; 6] = [APP_PORT, UPSTREAM_PORT, OTHER_PORT, 15001, 15006, 15008];

struct Flags {
    name: &'static str,
    args: &'static [&'static str],
}

const CONFIGS: &[Flags] = &[
    Flags {
        name: "ipv6-sidecar",
        args: &[
            "-p", "15001", "-z", "15006", "-u", "1337", "-g", "1337", "-i", "*", "-b", "*", "-d",
            "8081",
        ],
    },
    Flags {
        name: "ipv6-cidrs-and-ports",
        args: &[
            "-i",
            "fd00:198:18::/64,198.19.0.0/16",
            "-x",
            "fd00:198:18::2/128",
            "-q",
            "9080",
            "-o",
            "8081",
            "-b",
            "8080",
        ],
    },
    Flags {
        name: "ipv6-outbound-ports-only",
        args: &["-i", "", "-q", "9080", "-b", ""],
    },
];

/// Destinations from the pod: the peer and the pod over IPv6, the IPv6
/// loopback and unspecified addresses, and what the kernel refuses before
/// any rule (no route, multicast, link-local without a scope); the peer
/// and the pod over IPv4.
fn destinations() -> Vec<SocketAddr> {
    let v6 = |text: &str| -> IpAddr { text.parse::<Ipv6Addr>().expect("address").into() };
    let mut out = Vec::new();
    for ip in [IpAddr::from(PEER_IP6), IpAddr::from(POD_IP6)] {
        for port in [UPSTREAM_PORT, APP_PORT, OTHER_PORT] {
            out.push(SocketAddr::new(ip, port));
        }
    }
    for ip in [
        v6("::1"),
        v6("::"),
        v6("2001:db8::2"),
        v6("ff02::1"),
        v6("fe80::2"),
    ] {
        out.push(SocketAddr::new(ip, APP_PORT));
    }
    out.push(SocketAddr::new(PEER_IP.into(), UPSTREAM_PORT));
    out.push(SocketAddr::new(POD_IP.into(), APP_PORT));
    out
}

fn istio_iptables(sandbox: &Sandbox, mode: &str, flags: &Flags, extra: &[&str]) -> Outcome {
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let mut cmd = Command::new(redirect_bin());
    cmd.args(["istio-iptables", "--ipv6=true", "--mode", mode])
        .args(["--netns", &sandbox.netns_path(Net::Pod)])
        .args(["--cgroup", &cgroup, "--instance", sandbox.name()])
        .args(flags.args)
        .args(extra);
    outcome(&mut cmd).expect("run redirect")
}

/// Every observation: "<who> [from SRC] -> DST" -> what was seen.
fn observe_all(sandbox: &Sandbox) -> BTreeMap<String, String> {
    let mut seen = BTreeMap::new();
    let spec = |to: SocketAddr, bind: Option<IpAddr>| {
        let bind = bind.map_or_else(|| "none".to_owned(), |b| b.to_string());
        format!("to={to} family=6 bind={bind} dev=none mode=block")
    };
    let passthrough: IpAddr = "::6".parse::<Ipv6Addr>().expect("::6").into();
    for (name, group, who) in [("app", Group::App, APP), ("proxy", Group::Proxy, PROXY)] {
        for to in destinations() {
            let got = observe_one(sandbox.agent(Net::Pod, group, who), &spec(to, None));
            seen.insert(
                format!("{name} -> {to}"),
                canonical_ports(&got, &FIXED_PORTS),
            );
        }
        // The proxy's inbound passthrough source, and a bound pod address.
        for bind in [passthrough, IpAddr::from(POD_IP6)] {
            for to in [
                SocketAddr::new(POD_IP6.into(), APP_PORT),
                SocketAddr::new(PEER_IP6.into(), UPSTREAM_PORT),
            ] {
                let got = observe_one(sandbox.agent(Net::Pod, group, who), &spec(to, Some(bind)));
                seen.insert(
                    format!("{name} from {bind} -> {to}"),
                    canonical_ports(&got, &FIXED_PORTS),
                );
            }
        }
    }
    for port in [APP_PORT, OTHER_PORT, 15008] {
        let to = SocketAddr::new(POD_IP6.into(), port);
        let got = observe_one(
            sandbox.agent(Net::Peer, Group::Outside, ROOT),
            &spec(to, None),
        );
        seen.insert(format!("peer -> {to}"), canonical_ports(&got, &FIXED_PORTS));
    }
    seen
}

#[test]
fn ipv6_connections_are_observed_as_with_ip6tables() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    // Istio's inbound passthrough source on lo, as in an IPv6 pod.
    sandbox
        .ip_batch(Net::Pod, "addr add ::6/128 dev lo\n")
        .expect("::6 on lo");
    let dual = |port: u16| format!("[::]:{port}");
    sandbox
        .serve_observing(&[
            (Net::Pod, Group::Proxy, PROXY, dual(15001), "proxy"),
            (Net::Pod, Group::Proxy, PROXY, dual(15006), "inbound"),
            (Net::Pod, Group::App, APP, dual(APP_PORT), "app"),
            (Net::Pod, Group::App, APP, dual(OTHER_PORT), "app-8081"),
            (
                Net::Peer,
                Group::Outside,
                ROOT,
                dual(UPSTREAM_PORT),
                "upstream",
            ),
            (
                Net::Peer,
                Group::Outside,
                ROOT,
                dual(OTHER_PORT),
                "upstream-8081",
            ),
        ])
        .expect("servers");
    let mut compared = 0;
    let mut landed = BTreeMap::<String, usize>::new();
    for flags in CONFIGS {
        let mut views = Vec::new();
        for (mode, says) in [("iptables", "(iptables-"), ("ebpf", "with eBPF")] {
            let applied = istio_iptables(&sandbox, mode, flags, &[]);
            assert_eq!(applied.code, 0, "{mode} {}: {applied:?}", flags.name);
            assert!(
                applied.stdout.contains(says),
                "{mode} {}: {applied:?}",
                flags.name
            );
            views.push(observe_all(&sandbox));
            let removed = istio_iptables(&sandbox, mode, flags, &["--cleanup-only"]);
            assert_eq!(removed.code, 0, "{removed:?}");
        }
        let differ: Vec<String> = views[0]
            .iter()
            .filter(|(case, seen)| views[1].get(*case) != Some(*seen))
            .map(|(case, seen)| {
                format!(
                    "  {case}:\n    ip6tables {seen}\n    eBPF      {}",
                    views[1].get(case).map_or("(none)", String::as_str)
                )
            })
            .collect();
        assert!(
            differ.is_empty(),
            "{}: eBPF differs from ip6tables in {} of {} observations:\n{}",
            flags.name,
            differ.len(),
            views[0].len(),
            differ.join("\n")
        );
        compared += views[0].len();
        for seen in views[0].values() {
            // "<the app's view> | <the server's name and view>", or an error.
            let at = seen.split_once("| ").map_or(seen.as_str(), |(_, server)| {
                server.split_whitespace().next().unwrap_or(server)
            });
            *landed.entry(at.to_owned()).or_default() += 1;
        }
        println!("{}: {:#?}", flags.name, views[0]);
        let sidecar = |case: &str| views[0][case].clone();
        if flags.name == "ipv6-sidecar" {
            let to_peer = format!("app -> [{PEER_IP6}]:{UPSTREAM_PORT}");
            assert!(
                sidecar(&to_peer).contains("| proxy"),
                "{}",
                sidecar(&to_peer)
            );
            let hairpin = format!("proxy -> [{POD_IP6}]:{APP_PORT}");
            assert!(
                sidecar(&hairpin).contains("| inbound"),
                "{}",
                sidecar(&hairpin)
            );
            let inbound = format!("peer -> [{POD_IP6}]:{APP_PORT}");
            assert!(
                sidecar(&inbound).contains("| inbound"),
                "{}",
                sidecar(&inbound)
            );
        }
    }
    println!("{compared} observations alike under ip6tables and eBPF: {landed:?}");
}

/// A redirect the kernel picks the source of (an IPv6 DNS query to `::`,
/// which is `::1`) right after one bound to the route's source (a
/// connection to the peer), many times over on one thread: each keeps the
/// source ip6tables gives it, `::1`, never the earlier one's (the IPv6
/// decision hands its source over in a per-CPU slot, cleared per decision).
#[test]
fn an_ipv6_redirect_never_takes_an_earlier_ones_source() {
    require_root!();
    use std::io::Write as _;
    let sandbox = Sandbox::for_tests().expect("sandbox");
    let resolv = std::env::temp_dir().join(format!("{}-resolv6.conf", sandbox.name()));
    std::fs::write(&resolv, format!("nameserver {PEER_IP6}\n")).expect("resolv.conf");
    let mut dns = sandbox.agent(Net::Pod, Group::Proxy, PROXY);
    dns.args([
        "dns-serve",
        "--listen",
        "[::1]:15053",
        "--reply",
        "dns-proxy",
    ]);
    sandbox.start(dns).expect("DNS proxy");
    sandbox
        .serve_observing(&[(Net::Pod, Group::Proxy, PROXY, "[::]:15001".into(), "proxy")])
        .expect("proxy");
    let resolv_path = resolv.to_string_lossy().into_owned();
    let flags = Flags {
        name: "ipv6-capture-all-dns",
        args: &["-i", "*", "-b", "", "--redirect-dns", "--capture-all-dns"],
    };
    let out = istio_iptables(&sandbox, "ebpf", &flags, &["--resolv-conf", &resolv_path]);
    assert_eq!(out.code, 0, "{out:?}");
    let pairs = 20;
    let specs: String = (0..pairs)
        .map(|_| {
            format!(
                "to=[{PEER_IP6}]:{UPSTREAM_PORT} family=6 bind=none dev=none mode=block\n\
                 to=[::]:53 family=6 bind=none dev=none mode=udp\n"
            )
        })
        .collect();
    let mut agent = sandbox.agent(Net::Pod, Group::App, APP);
    let mut child = agent
        .args(["observe", "--parallel", "1", "--timeout-ms", "3000"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("agent observe");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(specs.as_bytes())
        .expect("specs");
    let seen = child.wait_with_output().expect("agent observe");
    let text = String::from_utf8_lossy(&seen.stdout);
    let queries: Vec<&str> = text.lines().filter(|l| l.contains("udp-connect")).collect();
    assert_eq!(queries.len(), pairs, "{text}");
    for query in &queries {
        assert!(query.contains("local=[::1]:"), "{query}\n{text}");
        assert!(query.contains("| dns-proxy"), "{query}");
    }
    let bound = text.lines().filter(|l| l.contains("| proxy")).count();
    assert_eq!(
        bound, pairs,
        "every connection to the peer was captured: {text}"
    );
    let out = istio_iptables(
        &sandbox,
        "ebpf",
        &flags,
        &["--cleanup-only", "--resolv-conf", &resolv_path],
    );
    assert_eq!(out.code, 0, "{out:?}");
    let _ = std::fs::remove_file(&resolv);
}

/// `-c nic2` with IPv6 rules, observed whole under ip6tables and eBPF: the
/// app's calls through `nic2` and `eth0`, the peer's calls to the pod's
/// IPv6 address on each, with and without inbound capture; alike, and not
/// vacuous (through `nic2` nothing is captured, through `eth0` everything
/// is).
#[test]
fn an_excluded_interface_is_observed_as_with_ip6tables() {
    require_root!();
    const NIC2: &str = "nic2";
    const POD_NIC2: &str = "fd00:192:2::1";
    const PEER_NIC2: &str = "fd00:192:2::2";
    let sandbox = Sandbox::for_tests().expect("sandbox");
    sandbox
        .link(
            NIC2,
            &[format!("{POD_NIC2}/64")],
            &[format!("{PEER_NIC2}/64")],
        )
        .expect("second link");
    let dual = |port: u16| format!("[::]:{port}");
    sandbox
        .serve_observing(&[
            (Net::Pod, Group::Proxy, PROXY, dual(15001), "proxy"),
            (Net::Pod, Group::Proxy, PROXY, dual(15006), "inbound"),
            (Net::Pod, Group::App, APP, dual(APP_PORT), "app"),
            (
                Net::Peer,
                Group::Outside,
                ROOT,
                dual(UPSTREAM_PORT),
                "upstream",
            ),
        ])
        .expect("servers");
    let v6 = |text: &str, port: u16| {
        SocketAddr::new(text.parse::<Ipv6Addr>().expect("address").into(), port)
    };
    let spec = |to: SocketAddr| format!("to={to} family=6 bind=none dev=none mode=block");
    let observe = || -> BTreeMap<String, String> {
        let mut seen = BTreeMap::new();
        for to in [
            v6(PEER_NIC2, UPSTREAM_PORT),
            SocketAddr::new(PEER_IP6.into(), UPSTREAM_PORT),
        ] {
            let got = observe_one(sandbox.agent(Net::Pod, Group::App, APP), &spec(to));
            seen.insert(format!("app -> {to}"), canonical_ports(&got, &FIXED_PORTS));
        }
        for to in [
            v6(POD_NIC2, APP_PORT),
            SocketAddr::new(POD_IP6.into(), APP_PORT),
        ] {
            let got = observe_one(sandbox.agent(Net::Peer, Group::Outside, ROOT), &spec(to));
            seen.insert(format!("peer -> {to}"), canonical_ports(&got, &FIXED_PORTS));
        }
        seen
    };
    let outbound_only = Flags {
        name: "ipv6-excluded-interface",
        args: &["-i", "*", "-b", "", "-c", NIC2],
    };
    let inbound = Flags {
        name: "ipv6-excluded-interface-inbound",
        args: &["-i", "*", "-b", "*", "-c", NIC2],
    };
    let mut configs = vec![&outbound_only];
    if redirect_sandbox::cli::feature_present("sk_lookup/ingress_ifindex") {
        configs.push(&inbound);
    } else {
        println!("-c with -b not compared: eBPF mode needs kernel 5.17 for it");
    }
    for flags in configs {
        let mut views = Vec::new();
        for (mode, says) in [("iptables", "(iptables-"), ("ebpf", "with eBPF")] {
            let applied = istio_iptables(&sandbox, mode, flags, &[]);
            assert_eq!(applied.code, 0, "{mode} {}: {applied:?}", flags.name);
            assert!(
                applied.stdout.contains(says),
                "{mode} {}: {applied:?}",
                flags.name
            );
            views.push(observe());
            let removed = istio_iptables(&sandbox, mode, flags, &["--cleanup-only"]);
            assert_eq!(removed.code, 0, "{removed:?}");
        }
        println!("{}: {:#?}", flags.name, views[0]);
        assert_eq!(views[0], views[1], "{}: ip6tables, then eBPF", flags.name);
        let seen = |case: String| views[0][&case].clone();
        assert!(seen(format!("app -> {}", v6(PEER_NIC2, UPSTREAM_PORT))).contains("| upstream"));
        assert!(seen(format!("app -> [{PEER_IP6}]:{UPSTREAM_PORT}")).contains("| proxy"));
        assert!(seen(format!("peer -> {}", v6(POD_NIC2, APP_PORT))).contains("| app"));
        let through_eth0 = if flags.name == inbound.name {
            "| inbound"
        } else {
            "| app"
        };
        assert!(seen(format!("peer -> [{POD_IP6}]:{APP_PORT}")).contains(through_eth0));
    }
}
