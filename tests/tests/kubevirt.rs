//! `-k` (KubeVirt interfaces): Istio's `PREROUTING -i X -j ISTIO_REDIRECT`
//! sends every TCP connection arriving on such an interface (a VM's
//! traffic, to anywhere) to the proxy port, as outbound. eBPF mode does it
//! with tc programs on the interface (TCX, kernel 6.6) that rewrite as
//! REDIRECT does. Compared here whole against iptables with the same
//! flags: where each connection lands, both ends' addresses,
//! SO_ORIGINAL_DST on both ends, errno; IPv4 and IPv6, with and without
//! inbound capture, and an interface without an address (REDIRECT drops).
//!
//! The peer namespace plays the VM: a second link `kv0` from it to the pod
//! is the KubeVirt interface, and the peer routes the "internet"
//! (198.51.100.0/24, 2001:db8:ff::/64) through the pod over it.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};

use redirect_sandbox::{
    APP, Group, Net, POD_IP, POD_IP6, PROXY, ROOT, Sandbox,
    cli::{Outcome, canonical_ports, counter, observe_one, outcome, redirect_bin},
    require_root,
};

const APP_PORT: u16 = 8080;
const UPSTREAM_PORT: u16 = 9080;
const FIXED_PORTS: [u16; 4] = [APP_PORT, UPSTREAM_PORT, 15001, 15006];
const KV: &str = "kv0";
const POD_KV: &str = "203.0.113.1";
const PEER_KV: &str = "203.0.113.2";
const POD_KV6: &str = "2001:db8:1::1";
const PEER_KV6: &str = "2001:db8:1::2";
/// Beyond the pod, as the VM sees it: reached through the pod over `kv0`.
const REMOTE: &str = "198.51.100.7";
const REMOTE6: &str = "2001:db8:ff::7";
/// A second KubeVirt interface without an address, and where the VM
/// reaches through it.
const BARE: &str = "kv1";
const BARE_MAC: &str = "02:00:00:00:00:01";
const BARE_REMOTE: &str = "198.51.100.99";

struct Flags {
    name: &'static str,
    args: &'static [&'static str],
}

const CONFIGS: &[Flags] = &[
    Flags {
        name: "kubevirt-outbound-only",
        args: &["-i", "*", "-b", "", "-k", KV],
    },
    Flags {
        name: "kubevirt-with-inbound",
        args: &["-i", "*", "-b", "*", "-d", "22", "-k", KV],
    },
];

fn istio_iptables(sandbox: &Sandbox, mode: &str, args: &[&str], extra: &[&str]) -> Outcome {
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let mut cmd = Command::new(redirect_bin());
    cmd.args(["istio-iptables", "--ipv6=true", "--mode", mode])
        .args(["--netns", &sandbox.netns_path(Net::Pod)])
        .args(["--cgroup", &cgroup, "--instance", sandbox.name()])
        .args(args)
        .args(extra);
    outcome(&mut cmd).expect("run redirect")
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("address"), port)
}

fn spec(to: SocketAddr) -> String {
    let family = if to.is_ipv6() { 6 } else { 4 };
    format!("to={to} family={family} bind=none dev=none mode=block")
}

/// What every case observes: the VM's connections through `kv0` (beyond
/// the pod, to the pod's own address there, and to the pod's main
/// address, which does not come through `kv0`), and the pod's own
/// connections out through `kv0`, whose replies arrive there.
fn observe_all(sandbox: &Sandbox) -> BTreeMap<String, String> {
    let mut seen = BTreeMap::new();
    let from_vm = [
        addr(REMOTE, UPSTREAM_PORT),
        addr(POD_KV, APP_PORT),
        addr(REMOTE6, UPSTREAM_PORT),
        addr(POD_KV6, APP_PORT),
        SocketAddr::new(POD_IP.into(), APP_PORT),
        SocketAddr::new(POD_IP6.into(), APP_PORT),
    ];
    for to in from_vm {
        let got = observe_one(sandbox.agent(Net::Peer, Group::Outside, ROOT), &spec(to));
        seen.insert(format!("vm -> {to}"), canonical_ports(&got, &FIXED_PORTS));
    }
    for (name, group, who) in [("app", Group::App, APP), ("proxy", Group::Proxy, PROXY)] {
        for to in [addr(PEER_KV, UPSTREAM_PORT), addr(PEER_KV6, UPSTREAM_PORT)] {
            let got = observe_one(sandbox.agent(Net::Pod, group, who), &spec(to));
            seen.insert(
                format!("{name} -> {to}"),
                canonical_ports(&got, &FIXED_PORTS),
            );
        }
    }
    seen
}

/// Waits (at most 10 s) until no address of `kv0` is still in duplicate
/// address detection: REDIRECT picks among the usable ones when a packet
/// arrives, eBPF mode when it installs, and both must see the same. Read
/// from `/proc/net/if_inet6` (flag 0x40, `IFA_F_TENTATIVE`): older `ip`
/// has no filter for it.
fn wait_for_dad(sandbox: &Sandbox) {
    let started = Instant::now();
    loop {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", sandbox.netns_path(Net::Pod)))
            .args(["cat", "/proc/net/if_inet6"])
            .output()
            .expect("if_inet6");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let tentative = text.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(5) == Some(&KV)
                && fields
                    .get(4)
                    .and_then(|f| u32::from_str_radix(f, 16).ok())
                    .is_some_and(|flags| flags & 0x40 != 0)
        });
        if !tentative {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{KV}'s addresses are still tentative after 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kubevirt_pod() -> Sandbox {
    let sandbox = Sandbox::for_tests().expect("sandbox");
    sandbox
        .link(
            KV,
            &[format!("{POD_KV}/24"), format!("{POD_KV6}/64")],
            &[format!("{PEER_KV}/24"), format!("{PEER_KV6}/64")],
        )
        .expect("the KubeVirt link");
    sandbox
        .link(BARE, &[], &[])
        .expect("the KubeVirt link without addresses");
    sandbox
        .ip_batch(Net::Pod, &format!("link set {BARE} address {BARE_MAC}\n"))
        .expect("kv1's address");
    sandbox
        .ip_batch(
            Net::Peer,
            &format!(
                "route add 198.51.100.0/25 via {POD_KV} dev {KV}\n\
                 route add 2001:db8:ff::/64 via {POD_KV6} dev {KV}\n\
                 route add {BARE_REMOTE}/32 dev {BARE}\n\
                 neigh add {BARE_REMOTE} lladdr {BARE_MAC} dev {BARE} nud permanent\n"
            ),
        )
        .expect("the VM's routes");
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
    wait_for_dad(&sandbox);
    sandbox
}

/// Whether this kernel has TCX links (6.6). Without them eBPF mode
/// refuses `-k` with one line naming the kernel, and auto mode takes
/// iptables: checked here instead.
fn tcx_present(sandbox: &Sandbox) -> bool {
    if redirect_sandbox::cli::feature_present("tcx/ingress") {
        return true;
    }
    let args = ["-i", "*", "-b", "", "-k", KV];
    let refused = istio_iptables(sandbox, "ebpf", &args, &[]);
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("-k needs tc programs on TCX links (tcx/ingress, kernel 6.6)"),
        "{refused:?}"
    );
    assert!(!sandbox.is_pinned());
    let auto = istio_iptables(sandbox, "auto", &args, &[]);
    assert_eq!(auto.code, 0, "{auto:?}");
    assert!(
        auto.stderr.contains("auto mode: using iptables"),
        "{auto:?}"
    );
    let removed = istio_iptables(sandbox, "auto", &args, &["--cleanup-only"]);
    assert_eq!(removed.code, 0, "{removed:?}");
    println!("no TCX links here (6.6): eBPF mode refuses -k and auto mode takes iptables");
    false
}

#[test]
fn kubevirt_interfaces_are_observed_as_with_iptables() {
    require_root!();
    let sandbox = kubevirt_pod();
    if !tcx_present(&sandbox) {
        return;
    }
    for flags in CONFIGS {
        let mut views = Vec::new();
        for (mode, says) in [("iptables", "(iptables-"), ("ebpf", "with eBPF")] {
            let applied = istio_iptables(&sandbox, mode, flags.args, &[]);
            assert_eq!(applied.code, 0, "{mode} {}: {applied:?}", flags.name);
            assert!(
                applied.stdout.contains(says),
                "{mode} {}: {applied:?}",
                flags.name
            );
            views.push(observe_all(&sandbox));
            if mode == "ebpf" {
                let status = sandbox.status().expect("status");
                assert!(counter(&status, "virt_redirected") >= 4, "{status}");
                let programs = status["instances"][0]["programs"]
                    .as_array()
                    .expect("programs");
                for hook in ["virt_ingress", "virt_egress"] {
                    assert!(
                        programs.iter().any(|p| p["hook"] == hook
                            && p["attached"] == true
                            && p["interface"].is_u64()),
                        "{hook}: {status}"
                    );
                }
            }
            let removed = istio_iptables(&sandbox, mode, flags.args, &["--cleanup-only"]);
            assert_eq!(removed.code, 0, "{removed:?}");
        }
        println!("{}: {:#?}", flags.name, views[0]);
        assert_eq!(views[0], views[1], "{}: iptables, then eBPF", flags.name);
        let seen = |case: String| views[0][&case].clone();
        for to in [
            addr(REMOTE, UPSTREAM_PORT),
            addr(POD_KV, APP_PORT),
            addr(REMOTE6, UPSTREAM_PORT),
            addr(POD_KV6, APP_PORT),
        ] {
            assert!(seen(format!("vm -> {to}")).contains("| proxy"), "{to}");
        }
        let main = if flags.name == "kubevirt-with-inbound" {
            "| inbound"
        } else {
            "| app"
        };
        assert!(seen(format!("vm -> {POD_IP}:{APP_PORT}")).contains(main));
        assert!(seen(format!("proxy -> {PEER_KV}:{UPSTREAM_PORT}")).contains("| upstream"));
        assert!(seen(format!("app -> {PEER_KV}:{UPSTREAM_PORT}")).contains("| proxy"));
    }
    // Removed whole: the VM's connections are no longer captured (the pod
    // does not forward, so this one goes nowhere).
    let got = observe_one(
        sandbox.agent(Net::Peer, Group::Outside, ROOT),
        &spec(addr(REMOTE, UPSTREAM_PORT)),
    );
    assert!(!got.contains("| proxy"), "{got}");
    assert!(!sandbox.is_pinned());
}

/// REDIRECT drops what arrives on an interface without an address of its
/// family; so does eBPF mode (counted in `virt_dropped`). The VM's
/// connection fails alike under both.
#[test]
fn an_interface_without_an_address_drops_as_with_iptables() {
    require_root!();
    let sandbox = kubevirt_pod();
    if !tcx_present(&sandbox) {
        return;
    }
    let args = ["-i", "*", "-b", "", "-k", BARE];
    let to = addr(BARE_REMOTE, UPSTREAM_PORT);
    let mut views = Vec::new();
    for mode in ["iptables", "ebpf"] {
        let applied = istio_iptables(&sandbox, mode, &args, &[]);
        assert_eq!(applied.code, 0, "{mode}: {applied:?}");
        let got = observe_one(sandbox.agent(Net::Peer, Group::Outside, ROOT), &spec(to));
        views.push(canonical_ports(&got, &FIXED_PORTS));
        if mode == "ebpf" {
            let status = sandbox.status().expect("status");
            assert!(counter(&status, "virt_dropped") >= 1, "{status}");
        }
        let removed = istio_iptables(&sandbox, mode, &args, &["--cleanup-only"]);
        assert_eq!(removed.code, 0, "{removed:?}");
    }
    println!("vm -> {to} through {BARE}: {}", views[0]);
    assert_eq!(views[0], views[1], "iptables, then eBPF");
    assert!(!views[0].contains("| proxy"), "{}", views[0]);
}
