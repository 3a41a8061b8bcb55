//! `--profile legacy`, the rule table of Istio's first init script: the
//! eBPF profile against the same table applied with iptables, twice (by
//! `redirect install --profile legacy --iptables`, and by hand from the
//! table's text with `iptables-restore`). Every connection (the app's and
//! the proxy's uid to 127.0.0.1, to another 127/8 address, to 0.0.0.0, to
//! the pod's own address, from 127.0.0.6 to it, to the peer; and from the
//! peer to the pod) is observed whole in each (where it lands, the
//! server's view of the peer and its own address, SO_ORIGINAL_DST, the
//! client's own addresses and errno) and must read the same.

use std::{collections::BTreeMap, io::Write as _, process::Stdio};

use redirect_sandbox::{
    APP, Group, Identity, Net, PEER_IP, POD_IP, PROXY, ROOT, Sandbox,
    cli::{canonical_ports, counter, observe_one, redirect},
    require_root,
};

/// The table as Istio's first init script left it (`iptables -t nat -v
/// -L` of a pod of that era, in iptables-save form).
const FIRST_TABLE: &str = r#"*nat
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -m comment --comment "istio/install-istio-prerouting" -j ISTIO_REDIRECT
-A OUTPUT -p tcp -m comment --comment "istio/install-istio-output" -j ISTIO_OUTPUT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m comment --comment "istio/redirect-implicit-loopback" -j ISTIO_REDIRECT
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -m comment --comment "istio/bypass-envoy" -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -m comment --comment "istio/bypass-explicit-loopback" -j RETURN
-A ISTIO_OUTPUT -m comment --comment "istio/redirect-default-outbound" -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -m comment --comment "istio/redirect-to-envoy-port" -j REDIRECT --to-ports 15001
COMMIT
"#;

const APP_PORT: u16 = 8080;
const UPSTREAM_PORT: u16 = 9080;

/// The pod: the proxy (uid 1337) on every address's 15001, the app on
/// every address's 8080, an upstream server in the peer; each answers
/// what it saw of the connection.
fn pod() -> Sandbox {
    let sandbox = Sandbox::for_tests().expect("sandbox");
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
                Group::App,
                APP,
                format!("0.0.0.0:{APP_PORT}"),
                "app",
            ),
            (
                Net::Peer,
                Group::Outside,
                ROOT,
                format!("{PEER_IP}:{UPSTREAM_PORT}"),
                "upstream",
            ),
        ])
        .expect("servers");
    sandbox
}

/// Every connection of the test: (label, from the peer?, identity, spec).
fn connections() -> Vec<(String, bool, Identity, String)> {
    let spec = |to: String, bind: &str| format!("to={to} family=4 bind={bind} dev=none mode=block");
    let mut all = Vec::new();
    for (who, id) in [("app", APP), ("proxy", PROXY)] {
        for (to, bind) in [
            (format!("127.0.0.1:{APP_PORT}"), "none"),
            (format!("127.0.0.6:{APP_PORT}"), "none"),
            (format!("127.0.0.9:{APP_PORT}"), "none"),
            (format!("0.0.0.0:{APP_PORT}"), "none"),
            (format!("{POD_IP}:{APP_PORT}"), "none"),
            (format!("{POD_IP}:{APP_PORT}"), "127.0.0.6"),
            (format!("{PEER_IP}:{UPSTREAM_PORT}"), "none"),
            (format!("{PEER_IP}:{APP_PORT}"), "none"),
        ] {
            let label = format!("{who} -> {to} (bind {bind})");
            all.push((label, false, id, spec(to, bind)));
        }
    }
    for port in [APP_PORT, 15001, 9999] {
        let to = format!("{POD_IP}:{port}");
        all.push((format!("peer -> {to}"), true, ROOT, spec(to, "none")));
    }
    all
}

/// An observation with ephemeral ports written `eph`, so that runs compare.
fn canonical(seen: &str) -> String {
    canonical_ports(seen, &[APP_PORT, UPSTREAM_PORT, 15001, 9999])
}

/// Every connection's observation in the pod's current state.
fn observe(sandbox: &Sandbox) -> BTreeMap<String, String> {
    connections()
        .into_iter()
        .map(|(label, from_peer, id, spec)| {
            let agent = if from_peer {
                sandbox.agent(Net::Peer, Group::Outside, ROOT)
            } else {
                sandbox.agent(Net::Pod, Group::App, id)
            };
            (label, canonical(&observe_one(agent, &spec)))
        })
        .collect()
}

/// `redirect ARGS` in the test's pod, which must succeed.
fn run(args: &[&str]) -> String {
    let out = redirect(args).expect("redirect");
    assert!(out.ok(), "{args:?}: {out:?}");
    out.stdout
}

/// The pod's nat table (both iptables backends), as iptables-save lists it.
fn nat_rules(sandbox: &Sandbox) -> Vec<String> {
    ["iptables-nft-save", "iptables-legacy-save"]
        .into_iter()
        .flat_map(|save| {
            let out = sandbox
                .command(Net::Pod, Group::Outside, ROOT, save)
                .args(["-t", "nat"])
                .output()
                .expect(save);
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("-A ") || (l.starts_with(':') && l.contains(" - ")))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Lists the observations that differ from `base`.
fn differences(
    base: &BTreeMap<String, String>,
    other: &BTreeMap<String, String>,
    name: &str,
) -> Vec<String> {
    base.iter()
        .filter(|(k, v)| other.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}:\n  iptables: {v}\n  {name}: {}", other[k]))
        .collect()
}

#[test]
fn the_legacy_profile_in_ebpf_is_observed_as_istios_first_table() {
    require_root!();
    let sandbox = pod();
    let netns = sandbox.pod_netns().to_owned();

    // eBPF first: it leaves no conntrack entry the iptables runs could meet.
    let said = sandbox
        .install(&["--profile", "legacy"])
        .expect("install --profile legacy")
        .stdout;
    assert!(said.contains("installed"), "{said}");
    let ebpf = observe(&sandbox);
    let status = sandbox.status().expect("status");
    for (name, rule) in [
        ("loopback_redirected", "istio/redirect-implicit-loopback"),
        ("bypass_uid", "istio/bypass-envoy"),
        ("bypass_loopback", "istio/bypass-explicit-loopback"),
        ("redirected", "istio/redirect-default-outbound"),
        ("inbound_captured", "istio/install-istio-prerouting"),
    ] {
        assert!(counter(&status, name) > 0, "{name}: {status}");
        let shown = status["instances"][0]["counters"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == name))
            .map(|c| c["mirrors"].to_string())
            .unwrap_or_default();
        assert!(shown.contains(rule), "{name} mirrors {shown}");
    }
    assert_eq!(status["instances"][0]["config"]["profile"], "legacy");
    let sk_lookup = status["instances"][0]["programs"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["hook"] == "sk_lookup"))
        .map(|p| p["mirrors"].to_string())
        .unwrap_or_default();
    assert!(
        sk_lookup.contains("istio/install-istio-prerouting"),
        "{sk_lookup}"
    );
    let text = run(&["status", "--instance", sandbox.name()]);
    assert!(
        text.contains("profile legacy (Istio's first table), proxy port 15001, proxy uids")
            && !text.contains("tunnel port"),
        "{text}"
    );
    run(&["uninstall", "--instance", sandbox.name()]);

    // The backend's table.
    let said = run(&[
        "install",
        "--profile",
        "legacy",
        "--iptables",
        "--netns",
        &netns,
    ]);
    assert!(said.contains("profile legacy"), "{said}");
    let applied = nat_rules(&sandbox);
    let iptables = observe(&sandbox);
    let said = run(&["uninstall", "--iptables", "--netns", &netns]);
    assert!(said.contains("removed the Istio rules"), "{said}");
    assert!(nat_rules(&sandbox).is_empty(), "{:?}", nat_rules(&sandbox));

    // The table by hand, from its text.
    let mut restore = sandbox.command(Net::Pod, Group::Outside, ROOT, "iptables-restore");
    let mut child = restore
        .arg("--noflush")
        .stdin(Stdio::piped())
        .spawn()
        .expect("iptables-restore");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(FIRST_TABLE.as_bytes()).expect("the table");
    drop(stdin);
    assert!(child.wait().expect("iptables-restore").success());
    assert_eq!(
        nat_rules(&sandbox),
        applied,
        "the backend applied the table's text"
    );
    let by_hand = observe(&sandbox);
    run(&["uninstall", "--iptables", "--netns", &netns]);
    assert!(nat_rules(&sandbox).is_empty(), "{:?}", nat_rules(&sandbox));

    let mut differ = differences(&iptables, &by_hand, "by hand");
    differ.extend(differences(&iptables, &ebpf, "eBPF"));
    assert!(
        differ.is_empty(),
        "{} of {} connections differ:\n{}",
        differ.len(),
        iptables.len(),
        differ.join("\n")
    );
    // Not vacuous: the table's own decisions, as observed.
    let seen = |label: &str| iptables[label].clone();
    let lands = |label: &str, server: &str| {
        assert!(
            seen(label).contains(&format!("| {server} ")),
            "{label}: {}",
            seen(label)
        );
    };
    lands(&format!("app -> {POD_IP}:{APP_PORT} (bind none)"), "proxy");
    lands(
        &format!("proxy -> {POD_IP}:{APP_PORT} (bind none)"),
        "proxy",
    );
    lands(
        &format!("proxy -> {POD_IP}:{APP_PORT} (bind 127.0.0.6)"),
        "proxy",
    );
    lands(&format!("app -> 127.0.0.6:{APP_PORT} (bind none)"), "proxy");
    lands(&format!("app -> 127.0.0.1:{APP_PORT} (bind none)"), "app");
    lands(
        &format!("app -> {PEER_IP}:{UPSTREAM_PORT} (bind none)"),
        "proxy",
    );
    lands(
        &format!("proxy -> {PEER_IP}:{UPSTREAM_PORT} (bind none)"),
        "upstream",
    );
    lands(&format!("peer -> {POD_IP}:{APP_PORT}"), "proxy");
    for (label, seen) in &iptables {
        eprintln!("{label}: {seen}");
    }
    eprintln!(
        "{} connections alike under iptables (backend and by hand) and eBPF",
        iptables.len()
    );
}

#[test]
fn the_legacy_profile_takes_only_its_own_flags() {
    for flag in [
        &["-b", "*"][..],
        &["-i", "10.0.0.0/8"],
        &["-g", "7"],
        &["-z", "15016"],
    ] {
        let mut args = vec!["install", "--profile", "legacy", "--iptables", "--dry-run"];
        args.extend(flag);
        let out = redirect(&args).expect("redirect");
        assert_eq!(out.code, 1, "{flag:?}: {out:?}");
        assert!(
            out.stderr.contains(&format!("drop {}", flag[0])) && out.stderr.lines().count() == 1,
            "{flag:?}: {}",
            out.stderr
        );
    }
    let out =
        redirect(&["install", "--profile", "legacy", "--iptables", "--dry-run"]).expect("redirect");
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.stdout, FIRST_TABLE);
}
