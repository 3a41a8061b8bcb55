//! eBPF mode and iptables mode make the same decisions: for each set of
//! istio-iptables flags below, the same connections (every identity to
//! every destination) are made once under Istio's iptables rules and once
//! under the eBPF programs, and where each one lands must be identical.
//! Likewise Istio's native nftables rules (`--native-nftables`) against
//! its iptables rules.
//!
//! The connections come from the pod (outbound: every identity to every
//! destination) and from the peer to the pod's address (inbound, `-b`/`-d`,
//! REDIRECT; TPROXY, which eBPF mode refuses, between iptables and nftables).
//!
//! Where a connection lands names the decision: `proxy` (the outbound
//! listener, 15001: ISTIO_REDIRECT), `inbound` (15006: ISTIO_IN_REDIRECT),
//! `pod` (a server of the pod itself, not captured), `peer` (the real
//! destination outside the pod, not captured) or a connect error (nothing
//! listens there), which must also match.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
};

use redirect_sandbox::{
    APP, Group, Identity, Net, PEER_IP, PEER_NIC2_IP, POD_IP, POD_NIC2_IP, PROXY, ROOT, Sandbox,
    cli::{Outcome, canonical_ports, observe_one, outcome, redirect_bin},
    peer_ip, require_root,
};

/// One istio-iptables configuration: its flags and environment.
struct Flags {
    name: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
}

const CONFIGS: &[Flags] = &[
    Flags {
        name: "default",
        args: &[
            "-p", "15001", "-z", "15006", "-u", "1337", "-g", "1337", "-i", "*", "-b", "*", "-d",
            "81",
        ],
        env: &[],
    },
    Flags {
        name: "cidrs-and-ports",
        args: &[
            "-i",
            "198.19.0.0/24",
            "-x",
            "198.19.0.2/32",
            "-q",
            "22",
            "-o",
            "81",
            "-b",
            "80,22",
        ],
        env: &[],
    },
    Flags {
        name: "owner-groups-only",
        args: &["-i", "*", "-b", "15008,81"],
        env: &[("ISTIO_OUTBOUND_OWNER_GROUPS", "3000")],
    },
    Flags {
        name: "owner-groups-except-and-loopback-included",
        args: &["-i", "127.0.0.0/8,198.19.0.0/16"],
        env: &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "3000")],
    },
    Flags {
        name: "wide-loopback-and-tunnel-81",
        args: &["-i", "*", "-e", "81"],
        env: &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.0/8")],
    },
    Flags {
        name: "nothing-included-but-port-80",
        args: &["-i", "", "-q", "80"],
        env: &[],
    },
    Flags {
        name: "64-owner-groups",
        args: &["-i", "198.19.0.0/24", "-q", "80", "-b", "22,81"],
        env: &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", SIXTY_FOUR_GROUPS)],
    },
    Flags {
        name: "port-ranges",
        args: &[
            "-i",
            "198.19.0.0/24",
            "-q",
            "80:81",
            "-o",
            "15000:15008,22:",
            "-b",
            "22:81",
            "-d",
            "81:",
        ],
        env: &[],
    },
    Flags {
        name: "excluded-interface",
        args: &["-i", "*", "-b", "", "-c", "nic2"],
        env: &[],
    },
    Flags {
        name: INBOUND_EXCLUDED_INTERFACE,
        args: &["-i", "*", "-b", "*", "-d", "22", "-c", "nic2"],
        env: &[],
    },
    Flags {
        name: "40-groups-only-and-wide-ranges",
        args: &["-i", "*", "-o", "1:21,23:79", "-b", "*", "-d", "1:80"],
        env: &[("ISTIO_OUTBOUND_OWNER_GROUPS", FORTY_GROUPS)],
    },
];

/// `-c` with inbound capture: eBPF mode needs sk_lookup's
/// `ingress_ifindex` (kernel 5.17) for it.
const INBOUND_EXCLUDED_INTERFACE: &str = "excluded-interface-inbound";

/// Istio's limit of owner groups, the last one the group the cases use.
const SIXTY_FOUR_GROUPS: &str = "4001,4002,4003,4004,4005,4006,4007,4008,4009,4010,4011,4012,\
    4013,4014,4015,4016,4017,4018,4019,4020,4021,4022,4023,4024,4025,4026,4027,4028,4029,4030,\
    4031,4032,4033,4034,4035,4036,4037,4038,4039,4040,4041,4042,4043,4044,4045,4046,4047,4048,\
    4049,4050,4051,4052,4053,4054,4055,4056,4057,4058,4059,4060,4061,4062,4063,3000";

/// The include form (`ISTIO_OUTBOUND_OWNER_GROUPS`) puts every group in
/// one iptables rule, which iptables-restore cannot parse beyond about 50
/// groups (Istio's own limit in iptables mode): 40, the case's group last.
const FORTY_GROUPS: &str = "4001,4002,4003,4004,4005,4006,4007,4008,4009,4010,4011,4012,\
    4013,4014,4015,4016,4017,4018,4019,4020,4021,4022,4023,4024,4025,4026,4027,4028,4029,4030,\
    4031,4032,4033,4034,4035,4036,4037,4038,4039,3000";

/// Configurations eBPF mode refuses (auto mode takes iptables for them:
/// TPROXY), compared between the netfilter backends only.
const NETFILTER_ONLY: &[Flags] = &[Flags {
    name: "tproxy-inbound",
    args: &["-i", "*", "-b", "*", "-d", "22", "-m", "TPROXY"],
    env: &[],
}];

/// Who connects: the app, the proxy by UID, the proxy by GID only, and a
/// member of the owner group the configurations name.
const IDENTITIES: [Identity; 4] = [
    APP,
    PROXY,
    Identity {
        uid: 4242,
        gid: 1337,
    },
    Identity {
        uid: 2000,
        gid: 3000,
    },
];

/// Ports with a server in the pod and in the peer.
const PORTS: [u16; 4] = [80, 81, 22, 15008];

/// Destinations the kernel treats specially before any rule runs: the
/// unspecified address (127.0.0.1 for an unbound socket), the subnet and
/// limited broadcast, multicast, and an address without a route.
const SPECIAL: [Ipv4Addr; 5] = [
    Ipv4Addr::UNSPECIFIED,
    Ipv4Addr::new(198, 19, 255, 255),
    Ipv4Addr::BROADCAST,
    Ipv4Addr::new(224, 0, 0, 1),
    Ipv4Addr::new(10, 255, 0, 1),
];

fn destinations() -> Vec<SocketAddrV4> {
    let mut out = Vec::new();
    for ip in [
        Ipv4Addr::LOCALHOST,
        Ipv4Addr::new(127, 0, 0, 6),
        Ipv4Addr::new(127, 0, 0, 9),
        POD_IP,
        peer_ip(1),
        peer_ip(2),
        PEER_IP,
        PEER_NIC2_IP,
        POD_NIC2_IP,
    ]
    .into_iter()
    .chain(SPECIAL)
    {
        for port in PORTS {
            out.push(SocketAddrV4::new(ip, port));
        }
    }
    out
}

/// Inbound connections: from the peer to these ports of the pod's address.
const INBOUND_PORTS: [u16; 6] = [80, 81, 22, 15008, 15001, 15006];

/// Connections from a socket bound to a loopback source (the inbound
/// passthrough source, or 127.0.0.1): to the pod, and to the network,
/// which the kernel refuses.
fn bound_destinations() -> Vec<SocketAddrV4> {
    [
        Ipv4Addr::LOCALHOST,
        Ipv4Addr::new(127, 0, 0, 9),
        POD_IP,
        PEER_IP,
        Ipv4Addr::UNSPECIFIED,
    ]
    .into_iter()
    .map(|ip| SocketAddrV4::new(ip, 80))
    .collect()
}

fn istio_iptables(sandbox: &Sandbox, mode: &str, flags: &Flags, extra: &[&str]) -> Outcome {
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let mut cmd = Command::new(redirect_bin());
    cmd.args(["istio-iptables", "--ipv6=false", "--mode", mode])
        .args(["--netns", &sandbox.netns_path(Net::Pod)])
        .args(["--cgroup", &cgroup, "--instance", sandbox.name()])
        .args(flags.args)
        .args(extra)
        .envs(flags.env.iter().copied());
    outcome(&mut cmd).expect("run redirect")
}

/// Where every case lands: "<uid>/<gid> [from 127.0.0.6] -> dst" -> reply.
fn land_all(sandbox: &Sandbox) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let join = |list: &[SocketAddrV4]| {
        list.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let (all, bound) = (join(&destinations()), join(&bound_destinations()));
    let inbound: Vec<SocketAddrV4> = [POD_IP, POD_NIC2_IP]
        .iter()
        .flat_map(|ip| INBOUND_PORTS.iter().map(|p| SocketAddrV4::new(*ip, *p)))
        .collect();
    let text = sandbox
        .peer_output(&["each", "--to", &join(&inbound)])
        .expect("peer each");
    for line in text.lines() {
        let (target, reply) = line.split_once('\t').expect("target\treply");
        out.insert(format!("peer -> {target}"), reply.to_owned());
    }
    for who in IDENTITIES {
        for (bind, targets) in [
            (None, &all),
            (Some("127.0.0.6"), &bound),
            (Some("127.0.0.1"), &bound),
            (Some("198.18.0.1"), &bound),
        ] {
            let mut args = vec!["each", "--to", targets.as_str()];
            if let Some(bind) = bind {
                args.extend(["--bind", bind]);
            }
            let text = sandbox
                .agent_output(Group::App, who, &args)
                .expect("agent each");
            for line in text.lines() {
                let (target, reply) = line.split_once('\t').expect("target\\treply");
                let from = bind.map_or(String::new(), |b| format!(" from {b}"));
                out.insert(
                    format!("{}/{}{from} -> {target}", who.uid, who.gid),
                    reply.to_owned(),
                );
            }
        }
    }
    out
}

/// One backend under comparison: its name, `--mode` and extra flags, and
/// what its apply prints.
struct Backend {
    name: &'static str,
    mode: &'static str,
    extra: &'static [&'static str],
    says: &'static str,
}

const IPTABLES: Backend = Backend {
    name: "iptables",
    mode: "iptables",
    extra: &[],
    says: "(iptables-",
};

/// A sandbox pod with the listeners every case may land on: the proxy's
/// two (transparent), and a server on each of [`PORTS`] in the pod and in
/// the peer.
fn pod_with_servers() -> Sandbox {
    let sandbox = Sandbox::for_tests().expect("sandbox");
    sandbox.add_peer_addresses(2).expect("peer addresses");
    sandbox.add_second_link().expect("second link");
    for (port, reply) in [(15001, "proxy"), (15006, "inbound")] {
        // Transparent, as Envoy's listeners are in TPROXY mode (iptables'
        // TPROXY target only delivers to such sockets).
        let mut cmd = sandbox.agent(Net::Pod, Group::Outside, ROOT);
        cmd.args([
            "serve",
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--reply",
            reply,
        ])
        .arg("--transparent");
        sandbox.start(cmd).expect("pod listener");
    }
    for port in PORTS {
        for (net, reply) in [(Net::Pod, "pod"), (Net::Peer, "peer")] {
            sandbox
                .serve(
                    net,
                    Group::Outside,
                    ROOT,
                    (Ipv4Addr::UNSPECIFIED, port),
                    reply,
                )
                .expect("listener");
        }
    }
    sandbox
}

/// Applies `flags` with `backend`, lands every case, and removes it again.
fn land_with(sandbox: &Sandbox, backend: &Backend, flags: &Flags) -> BTreeMap<String, String> {
    let applied = istio_iptables(sandbox, backend.mode, flags, backend.extra);
    assert_eq!(
        applied.code, 0,
        "{} {}: {applied:?}",
        backend.name, flags.name
    );
    assert!(
        applied.stdout.contains(backend.says),
        "{} {}: {applied:?}",
        backend.name,
        flags.name
    );
    let landed = land_all(sandbox);
    let mut cleanup = backend.extra.to_vec();
    cleanup.push("--cleanup-only");
    let removed = istio_iptables(sandbox, backend.mode, flags, &cleanup);
    assert_eq!(
        removed.code, 0,
        "{} {}: {removed:?}",
        backend.name, flags.name
    );
    landed
}

/// Every configuration under both backends: every connection lands alike,
/// and the cases exercise every decision, so agreement is not vacuous.
fn same_connections(
    sandbox: &Sandbox,
    configs: &[&Flags],
    (a, b): (&Backend, &Backend),
    after_b: impl Fn(),
) {
    let mut compared = 0;
    let mut seen = BTreeMap::<String, usize>::new();
    let mut seen_inbound = BTreeMap::<String, usize>::new();
    for flags in configs {
        let first = land_with(sandbox, a, flags);
        let second = land_with(sandbox, b, flags);
        after_b();
        let differ: Vec<String> = first
            .iter()
            .filter(|(case, reply)| second.get(*case) != Some(*reply))
            .map(|(case, reply)| {
                format!(
                    "  {case}: {} {reply}, {} {:?}",
                    a.name,
                    b.name,
                    second.get(case)
                )
            })
            .collect();
        assert!(
            differ.is_empty(),
            "{}: {} decides {} of {} connections differently:\n{}",
            flags.name,
            b.name,
            differ.len(),
            first.len(),
            differ.join("\n")
        );
        assert_eq!(first.len(), second.len());
        compared += first.len();
        for (case, reply) in &first {
            *seen.entry(reply.clone()).or_default() += 1;
            if case.starts_with("peer ") {
                *seen_inbound.entry(reply.clone()).or_default() += 1;
            }
        }
    }
    println!(
        "{compared} connections decided alike by {} and {}: {seen:?}, of which from the peer: {seen_inbound:?}",
        a.name, b.name
    );
    for reply in ["proxy", "inbound", "pod", "peer"] {
        assert!(
            seen.contains_key(reply),
            "no case landed at {reply}: {seen:?}"
        );
    }
    for reply in ["inbound", "pod"] {
        assert!(
            seen_inbound.contains_key(reply),
            "no inbound case landed at {reply}: {seen_inbound:?}"
        );
    }
}

#[test]
fn ebpf_and_iptables_capture_the_same_connections() {
    require_root!();
    let sandbox = pod_with_servers();
    let ebpf = Backend {
        name: "eBPF",
        mode: "ebpf",
        extra: &[],
        says: "with eBPF",
    };
    let ifindex = redirect_sandbox::cli::feature_present("sk_lookup/ingress_ifindex");
    if !ifindex {
        println!(
            "{INBOUND_EXCLUDED_INTERFACE} not compared: this kernel does not give sk_lookup the \
             interface (5.17), so eBPF mode refuses it"
        );
    }
    let configs: Vec<&Flags> = CONFIGS
        .iter()
        .filter(|f| ifindex || f.name != INBOUND_EXCLUDED_INTERFACE)
        .collect();
    same_connections(&sandbox, &configs, (&IPTABLES, &ebpf), || {
        assert!(!sandbox.is_pinned());
    });
}

/// Istio's native nftables rules (`--native-nftables`) land every
/// connection as its iptables rules do.
#[test]
fn native_nftables_and_iptables_capture_the_same_connections() {
    require_root!();
    if !redirect_sandbox::cli::nft_installed() {
        redirect_sandbox::skip_or_fail("no nft here (install the nftables package)");
        return;
    }
    let sandbox = pod_with_servers();
    let nftables = Backend {
        name: "native nftables",
        mode: "iptables",
        extra: &["--native-nftables"],
        says: "(nftables",
    };
    let configs: Vec<&Flags> = CONFIGS.iter().chain(NETFILTER_ONLY).collect();
    same_connections(&sandbox, &configs, (&IPTABLES, &nftables), || {
        assert!(
            !sandbox
                .nft_tables(Net::Pod)
                .iter()
                .any(|t| t.contains("istio-proxy")),
            "--cleanup-only removed Istio's nftables tables"
        );
    });
}

/// `-c nic2` observed whole (landing, both ends' addresses,
/// SO_ORIGINAL_DST, errno) under both backends: the app's calls through
/// `nic2` and `eth0`, the peer's calls to the pod's address on each, with
/// and without inbound capture; alike, and not vacuous (through `nic2`
/// nothing is captured, through `eth0` everything is).
#[test]
fn an_excluded_interface_is_observed_as_with_iptables() {
    require_root!();
    const APP_PORT: u16 = 8080;
    const UPSTREAM_PORT: u16 = 9080;
    let sandbox = Sandbox::for_tests().expect("sandbox");
    sandbox.add_second_link().expect("second link");
    sandbox
        .serve_observing(&[
            (
                Net::Pod,
                Group::Proxy,
                PROXY,
                "0.0.0.0:15001".into(),
                "proxy",
            ),
            (
                Net::Pod,
                Group::Proxy,
                PROXY,
                "0.0.0.0:15006".into(),
                "inbound",
            ),
            (
                Net::Pod,
                Group::App,
                APP,
                format!("0.0.0.0:{APP_PORT}"),
                "app",
            ),
            (
                Net::Peer,
                Group::Outside,
                ROOT,
                format!("0.0.0.0:{UPSTREAM_PORT}"),
                "upstream",
            ),
        ])
        .expect("servers");
    let spec = |to: SocketAddrV4| format!("to={to} family=4 bind=none dev=none mode=block");
    let observe = || -> BTreeMap<String, String> {
        let mut seen = BTreeMap::new();
        for ip in [PEER_NIC2_IP, PEER_IP] {
            let to = SocketAddrV4::new(ip, UPSTREAM_PORT);
            let agent = sandbox.agent(Net::Pod, Group::App, APP);
            let got = observe_one(agent, &spec(to));
            seen.insert(
                format!("app -> {to}"),
                canonical_ports(&got, &[APP_PORT, UPSTREAM_PORT, 15001, 15006]),
            );
        }
        for ip in [POD_NIC2_IP, POD_IP] {
            let to = SocketAddrV4::new(ip, APP_PORT);
            let agent = sandbox.agent(Net::Peer, Group::Outside, ROOT);
            let got = observe_one(agent, &spec(to));
            seen.insert(
                format!("peer -> {to}"),
                canonical_ports(&got, &[APP_PORT, UPSTREAM_PORT, 15001, 15006]),
            );
        }
        seen
    };
    let ebpf = Backend {
        name: "eBPF",
        mode: "ebpf",
        extra: &[],
        says: "with eBPF",
    };
    let outbound_only = Flags {
        name: "excluded-interface",
        args: &["-i", "*", "-b", "", "-c", "nic2"],
        env: &[],
    };
    let inbound = Flags {
        name: INBOUND_EXCLUDED_INTERFACE,
        args: &["-i", "*", "-b", "*", "-c", "nic2"],
        env: &[],
    };
    let mut configs = vec![&outbound_only];
    if redirect_sandbox::cli::feature_present("sk_lookup/ingress_ifindex") {
        configs.push(&inbound);
    } else {
        println!("-c with -b not compared: eBPF mode needs kernel 5.17 for it");
    }
    for flags in configs {
        let mut views = Vec::new();
        for backend in [&IPTABLES, &ebpf] {
            let applied = istio_iptables(&sandbox, backend.mode, flags, &[]);
            assert_eq!(
                applied.code, 0,
                "{} {}: {applied:?}",
                backend.name, flags.name
            );
            views.push(observe());
            let removed = istio_iptables(&sandbox, backend.mode, flags, &["--cleanup-only"]);
            assert_eq!(removed.code, 0, "{removed:?}");
        }
        println!("{}: {:#?}", flags.name, views[0]);
        assert_eq!(views[0], views[1], "{}: iptables, then eBPF", flags.name);
        let seen = |case: String| views[0][&case].clone();
        assert!(seen(format!("app -> {PEER_NIC2_IP}:{UPSTREAM_PORT}")).contains("| upstream"));
        assert!(seen(format!("app -> {PEER_IP}:{UPSTREAM_PORT}")).contains("| proxy"));
        assert!(seen(format!("peer -> {POD_NIC2_IP}:{APP_PORT}")).contains("| app"));
        let through_eth0 = if flags.name == INBOUND_EXCLUDED_INTERFACE {
            "| inbound"
        } else {
            "| app"
        };
        assert!(seen(format!("peer -> {POD_IP}:{APP_PORT}")).contains(through_eth0));
    }
}

/// A node set loaded on `cgroup` for one test, unloaded when dropped
/// (also when the test fails).
struct NodeSet(String);

impl NodeSet {
    fn load(name: &str, cgroup: &std::path::Path) -> Self {
        let set = NodeSet(name.to_owned());
        let cgroup = cgroup.to_string_lossy();
        let out = redirect_sandbox::cli::redirect(&[
            "node-set",
            "load",
            "--set",
            name,
            "--cgroup",
            &cgroup,
            "--max-pods",
            "4",
        ])
        .expect("run redirect");
        assert_eq!(out.code, 0, "node-set load: {out:?}");
        set
    }
}

impl Drop for NodeSet {
    fn drop(&mut self) {
        let out = redirect_sandbox::cli::redirect(&["node-set", "unload", "--set", &self.0]);
        assert!(
            out.as_ref().is_ok_and(|o| o.code == 0) || std::thread::panicking(),
            "node-set unload: {out:?}"
        );
    }
}

/// A node set (one program set for the node, the pod found by its network
/// namespace) decides every connection as iptables does, for every
/// configuration; each configuration adds the pod to the set and removes
/// it again, so the pod's slots are reused. (Kernels before 5.15 have no
/// node sets.)
#[test]
fn a_node_set_and_iptables_capture_the_same_connections() {
    require_root!();
    let sandbox = pod_with_servers();
    let name = format!("{}-set", sandbox.name());
    if !redirect_sandbox::cli::feature_present("helper/get_netns_cookie") {
        println!("no node sets on this kernel (node_set's refusal test checks that)");
        return;
    }
    let _set = NodeSet::load(&name, sandbox.pod_cgroup());
    let extra: &'static [&'static str] =
        Box::leak(vec!["--node-set", Box::leak(name.clone().into_boxed_str())].into_boxed_slice());
    let node_set = Backend {
        name: "node set",
        mode: "ebpf",
        extra,
        says: "with eBPF in node set",
    };
    let ifindex = redirect_sandbox::cli::feature_present("sk_lookup/ingress_ifindex");
    let configs: Vec<&Flags> = CONFIGS
        .iter()
        .filter(|f| ifindex || f.name != INBOUND_EXCLUDED_INTERFACE)
        .collect();
    same_connections(&sandbox, &configs, (&IPTABLES, &node_set), || {
        let status =
            redirect_sandbox::cli::redirect(&["node-set", "status", "--json", "--set", &name])
                .expect("run redirect");
        let status: serde_json::Value = serde_json::from_str(&status.stdout).expect("status json");
        assert_eq!(
            status["pods"],
            serde_json::json!([]),
            "the pod left the set"
        );
    });
}
