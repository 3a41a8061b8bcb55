//! End-to-end tests of inbound capture without netfilter (issue: inbound
//! capture): a client in the peer namespace connects to the pod's address,
//! and the sk_lookup program hands the connection to the proxy's inbound
//! listener (15006) in the pod, which learns the original destination and
//! forwards to the app from 127.0.0.6, as Envoy does.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
};

use redirect_sandbox::{
    APP, Group, Net, PEER_IP, POD_IP, PROXY, ROOT, Sandbox,
    cli::{UPSTREAM, UPSTREAM_REPLY, counter, redirect},
    require_root,
};

/// Istio's inbound flags as the sidecar injector passes them.
const SIDECAR_INBOUND: &[&str] = &["-b", "*", "-d", "15090,15021,15020"];

fn pod_addr(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(POD_IP, port)
}

fn any(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)
}

/// What one connection from the peer to `to` gets back.
fn from_peer(sandbox: &Sandbox, to: SocketAddrV4) -> String {
    let out = sandbox
        .peer_output(&["connect", "--to", &to.to_string()])
        .expect("peer connect");
    let (_, reply) = out
        .trim()
        .split_once('\t')
        .unwrap_or_else(|| panic!("one tally line: {out:?}"));
    reply.to_owned()
}

/// The rules of the pod's nat table (`-A` lines), as both iptables
/// backends see them.
fn nat_rules(sandbox: &Sandbox) -> Vec<String> {
    let mut rules = Vec::new();
    for save in ["iptables-nft-save", "iptables-legacy-save"] {
        let mut cmd = sandbox.command(Net::Pod, Group::Outside, ROOT, save);
        let Ok(out) = cmd.args(["-t", "nat"]).output() else {
            continue; // that backend is not installed
        };
        rules.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("-A"))
                .map(|l| format!("{save}: {l}")),
        );
    }
    rules
}

/// The proxy's inbound listener: a transparent relay on 15006 (UID 1337,
/// the pod's proxy cgroup) that forwards to the original destination from
/// 127.0.0.6 and prefixes the reply with that destination.
fn start_inbound_relay(sandbox: &Sandbox) {
    let mut relay = sandbox.agent(Net::Pod, Group::Proxy, PROXY);
    relay.args(["relay", "--listen", "0.0.0.0:15006", "--bind", "127.0.0.6"]);
    sandbox.start(relay).expect("inbound relay");
}

/// The proxy's inbound listener on 15006 (UID 1337, the pod's proxy
/// cgroup), answering as `reply` says (`--reply TEXT` or `--report ...`).
fn start_inbound_listener(sandbox: &Sandbox, reply: &[&str]) {
    let mut proxy = sandbox.agent(Net::Pod, Group::Proxy, PROXY);
    proxy
        .args(["serve", "--listen", "0.0.0.0:15006"])
        .args(reply);
    sandbox.start(proxy).expect("inbound listener");
}

#[test]
fn a_pod_is_fully_captured_without_a_single_nat_rule() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    // The app reports who connected to it: the proxy's passthrough source.
    let mut app = sandbox.agent(Net::Pod, Group::App, APP);
    app.args(["serve", "--listen", "0.0.0.0:9081", "--report", "peer"]);
    sandbox.start(app).expect("app 9081");
    sandbox
        .serve(Net::Peer, Group::Outside, APP, UPSTREAM, UPSTREAM_REPLY)
        .expect("upstream");

    // The real init-step order: capture first, the proxy later.
    let mut args = SIDECAR_INBOUND.to_vec();
    args.extend(["-i", "*"]);
    sandbox.install(&args).expect("install");
    assert_eq!(
        from_peer(&sandbox, pod_addr(9081)),
        "error: connection refused",
        "before the proxy listens, captured connections are refused, not hung or let through"
    );

    start_inbound_relay(&sandbox);
    let mut outbound = sandbox.agent(Net::Pod, Group::Proxy, PROXY);
    outbound.args(["relay", "--listen", "127.0.0.1:15001"]);
    sandbox.start(outbound).expect("outbound relay");

    let reply = from_peer(&sandbox, pod_addr(9081));
    let (orig, app_saw) = reply.split_once(' ').expect("'<orig> <app reply>'");
    assert_eq!(orig, pod_addr(9081).to_string(), "SO_ORIGINAL_DST: {reply}");
    assert!(
        app_saw.starts_with("127.0.0.6:"),
        "the app is reached from the passthrough source: {reply}"
    );
    // And the app's outbound call goes through the proxy's outbound relay.
    let out = sandbox
        .agent_output(Group::App, APP, &["connect", "--to", &UPSTREAM.to_string()])
        .expect("app connect");
    assert_eq!(
        out.trim(),
        format!("1\t{UPSTREAM} {UPSTREAM_REPLY}"),
        "outbound through the proxy"
    );

    assert_eq!(
        nat_rules(&sandbox),
        Vec::<String>::new(),
        "eBPF mode needs no nat rule"
    );
    let status = sandbox.status().expect("status");
    for (name, at_least) in [
        ("inbound_captured", 1),
        ("inbound_refused", 1),
        ("listener_registered", 1),
        ("orig_dst_inbound", 1),
        ("redirected", 1),
        ("bypass_passthrough", 1),
    ] {
        assert!(
            counter(&status, name) >= at_least,
            "{name} < {at_least}: {status}"
        );
    }
    let per_port = &status["instances"][0]["inbound_captured"];
    assert_eq!(
        per_port,
        &serde_json::json!([{"port": 9081, "connections": 1}]),
        "{status}"
    );
    let text = redirect(&["status", "--instance", sandbox.name()]).expect("status");
    assert!(
        text.stdout.contains("sk_lookup    attached"),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("9081: 1"), "{}", text.stdout);

    // Uninstall removes the netns link and the pins: the app is reached
    // directly, even with the proxy still listening.
    sandbox.uninstall().expect("uninstall");
    assert!(!sandbox.is_pinned());
    let reply = from_peer(&sandbox, pod_addr(9081));
    assert!(
        reply.starts_with(&format!("{PEER_IP}:")),
        "after uninstall the app sees the client itself: {reply}"
    );
}

#[test]
fn inbound_ports_excluded_ports_and_the_tunnel_port_decide_like_istio() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    let ports = [9080, 9090, 7000, 15008, 15021, 15090];
    for port in ports {
        sandbox
            .serve(Net::Pod, Group::App, APP, any(port), "app")
            .expect("app listener");
    }
    start_inbound_listener(&sandbox, &["--report", "original-dst"]);
    let targets = ports
        .iter()
        .map(|p| pod_addr(*p).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let lands = || -> Vec<String> {
        let out = sandbox
            .peer_output(&["each", "--to", &targets])
            .expect("peer each");
        out.lines()
            .map(|l| l.split_once('\t').map_or(l, |(_, r)| r).to_owned())
            .collect()
    };
    let captured = |port: u16| pod_addr(port).to_string();

    // The proxy listened before this install: the loader takes its listener over.
    sandbox
        .install(&["-b", "*", "-d", "15090,15021"])
        .expect("install -b *");
    assert_eq!(
        lands(),
        [
            captured(9080),
            captured(9090),
            captured(7000),
            "app".into(),
            "app".into(),
            "app".into()
        ]
    );
    // A list captures only its ports (and -d does not apply to it).
    sandbox
        .install(&["-b", "9080,9090", "-d", "9090"])
        .expect("install -b list");
    assert_eq!(
        lands(),
        [
            captured(9080),
            captured(9090),
            "app".into(),
            "app".into(),
            "app".into(),
            "app".into()
        ]
    );
    // TPROXY needs netfilter (marks, policy routing, CONNMARK): eBPF mode
    // refuses it in one line and the capture in place stays as it was.
    let refused = sandbox
        .install(&["-b", "*", "-d", "15090,15021", "-m", "TPROXY"])
        .expect_err("eBPF mode refuses TPROXY");
    let refused = format!("{refused:#}");
    assert!(
        refused.contains("-m TPROXY (TPROXY needs netfilter")
            && refused.trim().lines().count() == 1,
        "{refused}"
    );
    assert_eq!(lands()[..2], [captured(9080), captured(9090)]);
    sandbox.install(&["-b", ""]).expect("install -b ''");
    assert_eq!(lands(), ["app"; 6]);
    // The inbound link stays attached, inert, and status says so.
    let status = sandbox.status().expect("status");
    let sk_lookup = status["instances"][0]["programs"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["hook"] == "sk_lookup"))
        .expect("sk_lookup listed");
    assert_eq!(sk_lookup["attached"], true, "{status}");
    assert!(
        status["instances"][0]["config"]["inbound"].is_null(),
        "{status}"
    );
    let status = sandbox.status().expect("status");
    assert!(counter(&status, "inbound_not_included") >= 6, "{status}");
    assert!(counter(&status, "inbound_bypass_port") >= 2, "{status}");
    assert!(counter(&status, "inbound_bypass_tunnel") >= 1, "{status}");
    sandbox.uninstall().expect("uninstall");
}

#[test]
fn a_thousand_concurrent_inbound_connections_keep_their_destinations() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    sandbox.install(SIDECAR_INBOUND).expect("install");
    start_inbound_listener(&sandbox, &["--report", "original-dst"]);
    // No app listens on these ports: only the proxy can answer.
    let targets = (0..20)
        .map(|i| pod_addr(8000 + i).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let out = sandbox
        .peer_output(&["check", "--to", &targets, "--count", "1000", "--concurrent"])
        .expect("peer check");
    assert_eq!(out.trim(), "1000\tok", "{out}");
    let status = sandbox.status().expect("status");
    assert_eq!(counter(&status, "orig_dst_inbound"), 1000, "{status}");
    let ports = status["instances"][0]["inbound_captured"]
        .as_array()
        .expect("per-port counts")
        .len();
    assert_eq!(ports, 20, "{status}");
    sandbox.uninstall().expect("uninstall");
}

#[test]
fn the_pod_talking_to_itself_is_not_inbound() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    sandbox
        .serve(Net::Pod, Group::App, APP, any(9080), "app")
        .expect("app");
    start_inbound_listener(&sandbox, &["--reply", "inbound"]);
    sandbox.install(SIDECAR_INBOUND).expect("install");
    let app = pod_addr(9080).to_string();
    let from_pod = |group, who, bind: Option<&str>| {
        let mut args = vec!["each", "--to", app.as_str()];
        args.extend(bind.map(|b| ["--bind", b]).into_iter().flatten());
        let out = sandbox.agent_output(group, who, &args).expect("agent each");
        out.trim()
            .split_once('\t')
            .map(|(_, r)| r.to_owned())
            .unwrap_or(out)
    };
    // The app's own call to its pod address: Istio's `-o lo` RETURN, and
    // nat PREROUTING never sees local traffic.
    assert_eq!(from_pod(Group::App, APP, None), "app");
    // The proxy's call to its pod address: the hairpin to 15006.
    assert_eq!(from_pod(Group::Proxy, PROXY, None), "inbound");
    // From the passthrough source: the app.
    assert_eq!(from_pod(Group::Proxy, PROXY, Some("127.0.0.6")), "app");
    let status = sandbox.status().expect("status");
    assert!(counter(&status, "inbound_local") >= 3, "{status}");
    assert_eq!(counter(&status, "inbound_captured"), 0, "{status}");
    sandbox.uninstall().expect("uninstall");
}

#[test]
fn istio_iptables_installs_inbound_capture_with_ebpf() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    sandbox
        .serve(Net::Pod, Group::App, APP, any(9080), "app")
        .expect("app");
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let netns = sandbox.netns_path(Net::Pod);
    let mut cmd = Command::new(redirect_sandbox::cli::redirect_bin());
    cmd.args(["istio-iptables", "--ipv6=false", "--netns", &netns])
        .args(["--cgroup", &cgroup, "--instance", sandbox.name()])
        .args(redirect_sandbox::cli::ISTIO_SIDECAR_ARGS);
    let out = redirect_sandbox::cli::outcome(&mut cmd).expect("run");
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("with eBPF") && out.stdout.contains("inbound TCP to every port but"),
        "the sidecar's flags are all honoured by eBPF now: {out:?}"
    );
    start_inbound_listener(&sandbox, &["--report", "original-dst"]);
    assert_eq!(
        from_peer(&sandbox, pod_addr(9080)),
        pod_addr(9080).to_string()
    );
    assert!(nat_rules(&sandbox).is_empty());
    // --assume-missing sk_lookup: auto mode falls back to iptables for it.
    cmd.arg("--cleanup-only");
    assert_eq!(
        redirect_sandbox::cli::outcome(&mut cmd).expect("run").code,
        0
    );
    assert!(!sandbox.is_pinned());
    let mut cmd = Command::new(redirect_sandbox::cli::redirect_bin());
    cmd.args([
        "--assume-missing",
        "sk_lookup",
        "istio-iptables",
        "--ipv6=false",
    ])
    .args([
        "--netns",
        &netns,
        "--cgroup",
        &cgroup,
        "--instance",
        sandbox.name(),
    ])
    .args(redirect_sandbox::cli::ISTIO_SIDECAR_ARGS);
    let out = redirect_sandbox::cli::outcome(&mut cmd).expect("run");
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("using iptables, because inbound capture (-b) needs sk_lookup (kernel 5.9)"),
        "{out:?}"
    );
    assert!(!nat_rules(&sandbox).is_empty());
    cmd.arg("--cleanup-only");
    assert_eq!(
        redirect_sandbox::cli::outcome(&mut cmd).expect("run").code,
        0
    );
    assert!(nat_rules(&sandbox).is_empty());
}

/// Envoy listens on 15006 with one `SO_REUSEPORT` socket per worker: while
/// any of them lives, inbound connections reach one, whichever closes
/// first (iptables' REDIRECT reaches whatever still listens).
#[test]
fn reuseport_listeners_keep_receiving_when_one_closes() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    sandbox
        .serve(Net::Pod, Group::App, APP, any(9080), "app")
        .expect("app");
    sandbox.install(&["-b", "*"]).expect("install");
    let listener = |reply: &str| {
        let mut cmd = sandbox.agent(Net::Pod, Group::Proxy, PROXY);
        cmd.args(["serve", "--listen", "0.0.0.0:15006", "--reuseport"])
            .args(["--reply", reply]);
        sandbox.start(cmd).expect("listener")
    };
    let (first, second, third) = (listener("first"), listener("second"), listener("third"));
    let lands = |n: usize| -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            *seen.entry(from_peer(&sandbox, pod_addr(9080))).or_default() += 1;
        }
        seen
    };
    let all = lands(60);
    assert!(
        all.keys()
            .all(|k| ["first", "second", "third"].contains(&k.as_str())),
        "{all:?}"
    );
    // The newest closes, then the oldest: the one left takes everything.
    sandbox.stop(third).expect("stop the newest");
    let two = lands(30);
    assert!(
        two.keys()
            .all(|k| ["first", "second"].contains(&k.as_str())),
        "{two:?}"
    );
    sandbox.stop(first).expect("stop the oldest");
    assert_eq!(lands(20), BTreeMap::from([("second".to_owned(), 20)]));
    sandbox.stop(second).expect("stop the last");
    assert_eq!(
        lands(3),
        BTreeMap::from([("error: connection refused".to_owned(), 3)])
    );
    let status = sandbox.status().expect("status");
    assert_eq!(counter(&status, "listener_registered"), 3, "{status}");
    sandbox.uninstall().expect("uninstall");
}

/// `--drop-invalid` (Istio's `INVALID_DROP`): a segment conntrack calls
/// INVALID (here: data a gigabyte ahead of the window) in a connection
/// iptables redirected skips the connection's NAT, reaches the original
/// port untranslated, and that port's listener resets the connection;
/// Istio's mangle rule drops such segments. eBPF mode translates nothing:
/// the segment reaches the connection's own socket (sk_lookup kept the
/// tuple), which answers it as TCP does (a duplicate ACK), so it behaves as
/// iptables mode with `--drop-invalid`, with or without the flag.
#[test]
fn an_invalid_segment_resets_a_connection_only_under_iptables_without_drop_invalid() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    for (port, reply, group, who) in [
        (15006, "inbound", Group::Proxy, PROXY),
        (80, "app", Group::App, ROOT),
    ] {
        let mut cmd = sandbox.agent(Net::Pod, group, who);
        cmd.args(["serve", "--listen", &any(port).to_string()])
            .args(["--report", "observe", "--reply", reply]);
        sandbox.start(cmd).expect("listener");
    }
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let istio = |mode: &str, extra: &[&str], cleanup: bool| {
        let mut args = vec!["istio-iptables", "--ipv6=false", "--mode", mode];
        args.extend(["--netns", sandbox.pod_netns(), "--cgroup", &cgroup]);
        args.extend(["--instance", sandbox.name(), "-p", "15001", "-z", "15006"]);
        args.extend(["-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*"]);
        args.extend(extra);
        if cleanup {
            args.push("--cleanup-only");
        }
        let out = redirect(&args).expect("redirect istio-iptables");
        assert!(out.ok(), "{mode} {extra:?} (cleanup {cleanup}): {out:?}");
    };
    let to = pod_addr(80).to_string();
    let mut seen = BTreeMap::new();
    for (mode, extra) in [
        ("iptables", &[][..]),
        ("iptables", &["--drop-invalid"][..]),
        ("ebpf", &[][..]),
        ("ebpf", &["--drop-invalid"][..]),
    ] {
        istio(mode, extra, false);
        let out = sandbox
            .peer_output(&["invalid-segment", "--to", &to])
            .expect("invalid-segment");
        // What became of the connection (`answer=<server>` or `reset=`),
        // and the server's view: peer (its port is not compared), local
        // address and SO_ORIGINAL_DST.
        let words: Vec<&str> = out.split_whitespace().collect();
        let view: Vec<String> = words
            .iter()
            .map(|w| match w.strip_prefix("peer=") {
                Some(peer) => format!("peer={}", peer.split(':').next().unwrap_or(peer)),
                None => (*w).to_owned(),
            })
            .collect();
        seen.insert(format!("{mode} {extra:?}"), view.join(" "));
        istio(mode, extra, true);
    }
    let expect = |key: &str, what: &str| {
        assert_eq!(seen[key], what, "{key}: {seen:#?}");
    };
    let survived = format!("answer=inbound peer={PEER_IP} local={POD_IP}:15006 odst={to}");
    expect("iptables []", "reset=ECONNRESET");
    expect("iptables [\"--drop-invalid\"]", &survived);
    expect("ebpf []", &survived);
    expect("ebpf [\"--drop-invalid\"]", &survived);
}
