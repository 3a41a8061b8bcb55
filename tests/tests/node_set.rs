//! Node sets: one program set serves every pod it lists, each by its
//! network namespace, whatever the cgroup of the process (here: the
//! sandbox's pod and peer namespaces, both with processes in the pod
//! cgroup the set is attached to, each with a configuration of its own).
//! The full comparison with iptables is `differential::a_node_set_*`.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsRawFd as _,
    process::Stdio,
};

use redirect_sandbox::{
    APP, Group, Net, PEER_IP, POD_IP, PROXY, ROOT, Sandbox,
    agent::Tally,
    cli::{Outcome, feature_present, redirect},
    require_root,
};

/// A node set loaded for one test, unloaded when dropped (also when the
/// test fails).
struct Set {
    name: String,
}

impl Set {
    fn load(sandbox: &Sandbox) -> Self {
        let set = Set {
            name: format!("{}-set", sandbox.name()),
        };
        let out = set.run(&[
            "load",
            "--cgroup",
            &sandbox.pod_cgroup().to_string_lossy(),
            "--max-pods",
            "2",
        ]);
        assert_eq!(out.code, 0, "node-set load: {out:?}");
        set
    }

    /// `redirect node-set <args> --set <name>`.
    fn run(&self, args: &[&str]) -> Outcome {
        let mut all = vec!["node-set"];
        all.extend_from_slice(args);
        all.extend(["--set", &self.name]);
        redirect(&all).expect("run redirect")
    }

    /// Adds the pod in `netns` as `name` with istio-iptables' flags `flags`.
    fn add(&self, name: &str, netns: &str, flags: &[&str]) -> Outcome {
        let mut args = vec!["add", "--instance", name, "--netns", netns];
        args.extend_from_slice(flags);
        self.run(&args)
    }

    fn status(&self) -> serde_json::Value {
        let out = self.run(&["status", "--json"]);
        assert_eq!(out.code, 0, "node-set status: {out:?}");
        serde_json::from_str(&out.stdout).expect("status JSON")
    }
}

impl Drop for Set {
    fn drop(&mut self) {
        let out = self.run(&["unload"]);
        assert!(
            out.code == 0 || std::thread::panicking(),
            "node-set unload: {out:?}"
        );
    }
}

/// Where one connection from `net` (a process of cgroup `group`) to `to`
/// lands.
fn lands(sandbox: &Sandbox, net: Net, group: Group, to: SocketAddrV4) -> String {
    let mut cmd = sandbox.agent(net, group, APP);
    cmd.args(["connect", "--to", &to.to_string()]);
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .expect("run the agent");
    assert!(out.status.success(), "{cmd:?}: {}", out.status);
    let tally = Tally::parse(&String::from_utf8_lossy(&out.stdout)).expect("tally");
    tally.0.into_keys().next().expect("one connection")
}

/// A sandbox for a test of node sets, or `None` (said why) where the
/// kernel cannot have one.
fn sandbox_for_a_set() -> Option<Sandbox> {
    let sandbox = Sandbox::for_tests().expect("sandbox");
    if feature_present("helper/get_netns_cookie") {
        Some(sandbox)
    } else {
        println!("no node sets on this kernel (see the refusal test)");
        None
    }
}

/// The pod's "proxy": 127.0.0.1:15001, as the proxy's uid.
fn serve_pod_proxy(sandbox: &Sandbox) {
    let proxy = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001);
    sandbox
        .serve(Net::Pod, Group::Proxy, PROXY, proxy, "pod proxy")
        .expect("pod proxy");
}

/// The pod's counter `name` in a node set status.
fn counter(status: &serde_json::Value, pod: &str, name: &str) -> u64 {
    status["pods"]
        .as_array()
        .and_then(|pods| pods.iter().find(|p| p["name"] == pod))
        .and_then(|p| p["counters"][name].as_u64())
        .unwrap_or(0)
}

#[test]
fn pods_of_one_set_are_decided_by_their_own_network_namespace() {
    require_root!();
    let Some(sandbox) = sandbox_for_a_set() else {
        return;
    };
    let local = |port| SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    // Each namespace's "proxy", and a server on 80 and 81 in each.
    serve_pod_proxy(&sandbox);
    sandbox
        .serve(Net::Peer, Group::Proxy, PROXY, local(15001), "peer proxy")
        .expect("peer proxy");
    for port in [80, 81] {
        for (net, ip, name) in [(Net::Pod, POD_IP, "pod"), (Net::Peer, PEER_IP, "peer")] {
            sandbox
                .serve(
                    net,
                    Group::Outside,
                    ROOT,
                    SocketAddrV4::new(ip, port),
                    &format!("{name} {port}"),
                )
                .expect("server");
        }
    }
    let (to_peer, to_pod) = (
        |port| SocketAddrV4::new(PEER_IP, port),
        |port| SocketAddrV4::new(POD_IP, port),
    );
    let set = Set::load(&sandbox);
    let peer_netns = sandbox.netns_path(Net::Peer);
    let a = set.add("pod-a", sandbox.pod_netns(), &["-i", "*", "-b", ""]);
    assert_eq!(a.code, 0, "{a:?}");
    let b = set.add("pod-b", &peer_netns, &["-i", "", "-q", "81", "-b", ""]);
    assert_eq!(b.code, 0, "{b:?}");

    // Each namespace by its own configuration, in the same cgroup.
    assert_eq!(
        lands(&sandbox, Net::Pod, Group::App, to_peer(80)),
        "pod proxy"
    );
    assert_eq!(lands(&sandbox, Net::Peer, Group::App, to_pod(80)), "pod 80");
    assert_eq!(
        lands(&sandbox, Net::Peer, Group::App, to_pod(81)),
        "peer proxy"
    );
    // A process outside the set's cgroup runs none of its programs.
    assert_eq!(
        lands(&sandbox, Net::Peer, Group::Outside, to_pod(81)),
        "pod 81"
    );
    let status = set.status();
    assert_eq!(counter(&status, "pod-a", "redirected"), 1, "{status}");
    assert_eq!(counter(&status, "pod-b", "redirected"), 1, "{status}");

    // Bad input, refused with one line each, nothing changed.
    let third = redirect_sandbox::netns::create().expect("a third namespace");
    let third_netns = format!("/proc/{}/fd/{}", std::process::id(), third.as_raw_fd());
    for (why, needle, out) in [
        (
            "a namespace added twice",
            "already, as pod pod-a",
            set.add("pod-c", sandbox.pod_netns(), &["-i", "*"]),
        ),
        (
            "-k",
            "-k is not supported in a node set",
            set.add("pod-a", sandbox.pod_netns(), &["-k", "eth0"]),
        ),
        (
            "a set not loaded",
            "is not loaded",
            redirect(&[
                "node-set",
                "add",
                "--set",
                &format!("{}-none", sandbox.name()),
                "--instance",
                "pod-c",
                "--netns",
                sandbox.pod_netns(),
            ])
            .expect("run redirect"),
        ),
        (
            "a third pod in a set of two",
            "holds 2 pods already",
            set.add("pod-c", &third_netns, &["-i", "*"]),
        ),
    ] {
        assert_ne!(out.code, 0, "{why}: {out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{why}: {out:?}");
        assert!(out.stderr.contains(needle), "{why}: {out:?}");
    }
    assert_eq!(set.status()["pods"].as_array().map(Vec::len), Some(2));

    // Pod B's configuration replaced in place, then B removed: A stays.
    let b = set.add("pod-b", &peer_netns, &["-i", "", "-q", "80", "-b", ""]);
    assert_eq!(b.code, 0, "{b:?}");
    assert!(b.stdout.contains("updated pod pod-b"), "{b:?}");
    assert_eq!(lands(&sandbox, Net::Peer, Group::App, to_pod(81)), "pod 81");
    assert_eq!(
        lands(&sandbox, Net::Peer, Group::App, to_pod(80)),
        "peer proxy"
    );
    let removed = set.run(&["remove", "--instance", "pod-b"]);
    assert_eq!(removed.code, 0, "{removed:?}");
    assert_eq!(lands(&sandbox, Net::Peer, Group::App, to_pod(80)), "pod 80");
    assert_eq!(
        lands(&sandbox, Net::Pod, Group::App, to_peer(80)),
        "pod proxy"
    );
    let again = set.run(&["remove", "--instance", "pod-b"]);
    assert!(
        again.code == 0 && again.stdout.contains("not in node set"),
        "{again:?}"
    );
    // The removed pod's index (released, or cleared by a gc running
    // beside) starts clean for the next pod: the set is full, so the add
    // clears it first.
    let b = set.add("pod-b", &peer_netns, &["-i", "", "-b", ""]);
    assert_eq!(b.code, 0, "{b:?}");
    assert_eq!(counter(&set.status(), "pod-b", "redirected"), 0);
    assert_eq!(lands(&sandbox, Net::Peer, Group::App, to_pod(80)), "pod 80");
}

/// Gives the namespace `ns` exactly `addr`, on `d0`.
fn readdress(ns: &std::os::fd::OwnedFd, addr: Ipv4Addr) {
    use std::os::fd::AsFd as _;
    let batch = format!("addr flush dev d0\naddr add {addr}/32 dev d0\n");
    redirect_sandbox::netns::ip_batch(ns.as_fd(), &batch).expect("the twin's address");
}

/// Changes the peer namespace's extra addresses ([`peer_ip`]`(n)`).
fn peer_addresses(sandbox: &Sandbox, verb: &str, ns: std::ops::RangeInclusive<u8>) {
    let batch: String = ns
        .map(|n| format!("addr {verb} {}/32 dev eth0\n", redirect_sandbox::peer_ip(n)))
        .collect();
    sandbox.ip_batch(Net::Peer, &batch).expect("peer addresses");
}

/// A pod's addresses are its own in the set for as long as it is there
/// (inbound capture finds the pod by them): a namespace with one of them
/// is refused, and is added once the pod is removed or no longer has it.
/// Each path that takes them out is taken: a removal deleting the ones its
/// record lists, a removal walking the map for a pod with more than its
/// record holds or whose add failed midway, and a pod added again with
/// fewer (its record listing them, or not).
#[test]
fn a_pods_addresses_are_its_own_until_it_is_removed() {
    require_root!();
    let Some(sandbox) = sandbox_for_a_set() else {
        return;
    };
    let set = Set::load(&sandbox);
    let peer_netns = sandbox.netns_path(Net::Peer);
    let twin = redirect_sandbox::netns::create().expect("a namespace");
    let twin_netns = format!("/proc/{}/fd/{}", std::process::id(), twin.as_raw_fd());
    redirect_sandbox::netns::ip_batch(
        std::os::fd::AsFd::as_fd(&twin),
        "link add d0 type veth peer name d1\nlink set d0 up\nlink set d1 up\n",
    )
    .expect("the twin's link");
    let flags = ["-i", "*", "-b", ""];
    let refused = |why: &str| {
        let out = set.add("twin", &twin_netns, &flags);
        assert_ne!(out.code, 0, "{why}: {out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{why}: {out:?}");
        assert!(
            out.stderr
                .contains("pod addresses must be unique on a node"),
            "{why}: {out:?}"
        );
    };
    let added = |why: &str| {
        let out = set.add("twin", &twin_netns, &flags);
        assert_eq!(out.code, 0, "{why}: {out:?}");
        let out = set.run(&["remove", "--instance", "twin"]);
        assert_eq!(out.code, 0, "{why}: {out:?}");
    };
    let remove = |name: &str| {
        let out = set.run(&["remove", "--instance", name]);
        assert_eq!(out.code, 0, "{out:?}");
    };

    // A pod with one address, listed in its record. A refused add is
    // rolled back without taking the owner's address: refused twice.
    let a = set.add("pod-a", sandbox.pod_netns(), &flags);
    assert_eq!(a.code, 0, "{a:?}");
    readdress(&twin, POD_IP);
    refused("the pod's address");
    refused("the pod's address, after a refused add");
    remove("pod-a");
    added("the removed pod's address");

    // A pod with five addresses, more than its record holds.
    peer_addresses(&sandbox, "add", 1..=4);
    let b = set.add("pod-b", &peer_netns, &flags);
    assert_eq!(b.code, 0, "{b:?}");
    readdress(&twin, redirect_sandbox::peer_ip(4));
    refused("the fifth address");
    // Added again with two (found by the walk: its record listed none):
    // the three it lost are free at once.
    let readd = || {
        let b = set.add("pod-b", &peer_netns, &flags);
        assert!(
            b.code == 0 && b.stdout.contains("updated pod pod-b"),
            "{b:?}"
        );
    };
    peer_addresses(&sandbox, "del", 2..=4);
    readd();
    added("an address the pod lost");
    readdress(&twin, redirect_sandbox::peer_ip(1));
    refused("an address the pod kept");
    // Added again with one (its record listed two): the other is free.
    peer_addresses(&sandbox, "del", 1..=1);
    readd();
    added("an address the listed pod lost");
    // An add changing its addresses that fails midway leaves the record
    // listing none (not the old ones): the removal finds the new one.
    peer_addresses(&sandbox, "add", 1..=1);
    let failed = std::process::Command::new(redirect_sandbox::cli::redirect_bin())
        .args(["node-set", "add", "--set", &set.name, "--instance", "pod-b"])
        .args(["--netns", &peer_netns])
        .args(flags)
        .env("REDIRECT_TEST_FAULT", "node-set-add-after-link")
        .output()
        .expect("run redirect");
    assert!(
        !failed.status.success()
            && String::from_utf8_lossy(&failed.stderr).contains("injected fault"),
        "{failed:?}"
    );
    refused("an address a failed add wrote");
    remove("pod-b");
    added("an address a failed add wrote, its pod removed");

    // Five again, then removed: found by the walk.
    peer_addresses(&sandbox, "add", 2..=4);
    let b = set.add("pod-b", &peer_netns, &flags);
    assert_eq!(b.code, 0, "{b:?}");
    readdress(&twin, redirect_sandbox::peer_ip(3));
    refused("the third address of five");
    remove("pod-b");
    added("an address of a removed pod of five");
}

/// The programs of every hook and every pod's sk_lookup link (ids), from
/// `node-set status --json`.
fn programs(status: &serde_json::Value) -> (serde_json::Value, Vec<serde_json::Value>) {
    let pods = status["pods"]
        .as_array()
        .map(|pods| {
            pods.iter()
                .map(|p| p["sk_lookup_program"].clone())
                .collect()
        })
        .unwrap_or_default();
    (status["programs"].clone(), pods)
}

/// Loading a set again on its cgroup upgrades it in place: this build's
/// programs replace every hook's and every pod's link's, one atomic swap
/// each, while an app connects in a loop (bounded: 10 upgrades or 60 s):
/// every connection reaches the proxy, and the pod and its counters stay.
/// An upgrade that fails midway (an injected fault after the first swap)
/// puts the old programs back and says nothing changed.
#[test]
fn loading_a_set_again_upgrades_it_in_place_under_load() {
    require_root!();
    let Some(sandbox) = sandbox_for_a_set() else {
        return;
    };
    serve_pod_proxy(&sandbox);
    let set = Set::load(&sandbox);
    let a = set.add("pod-a", sandbox.pod_netns(), &["-i", "*", "-b", ""]);
    assert_eq!(a.code, 0, "{a:?}");
    let to_peer = SocketAddrV4::new(PEER_IP, 80);
    assert_eq!(lands(&sandbox, Net::Pod, Group::App, to_peer), "pod proxy");
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let load_again = |fault: Option<&str>| {
        let mut cmd = std::process::Command::new(redirect_sandbox::cli::redirect_bin());
        cmd.args(["node-set", "load", "--set", &set.name, "--cgroup", &cgroup]);
        cmd.args(["--max-pods", "2"]);
        if let Some(point) = fault {
            cmd.env("REDIRECT_TEST_FAULT", point);
        }
        let out = cmd.output().expect("run redirect");
        Outcome {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };

    let before = programs(&set.status());
    assert!(before.1.iter().all(serde_json::Value::is_u64), "{before:?}");
    let failed = load_again(Some("node-set-upgrade-after-swap"));
    assert_ne!(failed.code, 0, "{failed:?}");
    assert_eq!(failed.stderr.lines().count(), 1, "{failed:?}");
    assert!(failed.stderr.contains("nothing changed"), "{failed:?}");
    assert_eq!(programs(&set.status()), before, "the old programs are back");
    assert_eq!(lands(&sandbox, Net::Pod, Group::App, to_peer), "pod proxy");
    let redirected = counter(&set.status(), "pod-a", "redirected");

    let stop = std::env::temp_dir().join(format!("{}-stop", sandbox.name()));
    let _ = std::fs::remove_file(&stop);
    let mut upgrades = 0;
    let load = std::thread::scope(|s| {
        let load = s.spawn(|| {
            let mut cmd = sandbox.agent(Net::Pod, Group::App, APP);
            cmd.args(["connect", "--to", &to_peer.to_string()]);
            cmd.args(["--count", "20000000", "--duration-ms", "120000"]);
            cmd.args(["--until-file", &stop.to_string_lossy()]);
            let out = cmd.output().expect("load loop");
            Tally::parse(&String::from_utf8_lossy(&out.stdout)).expect("tally")
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while upgrades < 10 && std::time::Instant::now() < deadline {
            let out = load_again(None);
            assert_eq!(out.code, 0, "{out:?}");
            assert!(
                out.stdout.contains("upgraded in place")
                    && out.stdout.contains("its 1 pod kept its capture"),
                "{out:?}"
            );
            upgrades += 1;
        }
        std::fs::write(&stop, "").expect("stop file");
        load.join().expect("load thread")
    });
    let _ = std::fs::remove_file(&stop);
    eprintln!("{upgrades} set upgrades under load: {load:?}");
    assert!(load.total() > 0);
    assert_eq!(
        load.get("pod proxy"),
        load.total(),
        "every connection reaches the proxy, none escapes or fails: {load:?}"
    );
    let after = programs(&set.status());
    assert_ne!(after.0, before.0, "every hook runs new programs");
    assert!(
        after
            .1
            .iter()
            .zip(&before.1)
            .all(|(a, b)| a.is_u64() && a != b),
        "the pod's sk_lookup link runs the new program: {after:?} {before:?}"
    );
    assert_eq!(after.1.first(), after.0.get("sk_lookup"));
    assert!(
        counter(&set.status(), "pod-a", "redirected") >= redirected + load.total(),
        "the counters stay"
    );
}

/// `istio-iptables --node-set` and `node-set add` decide alike what a set
/// cannot do for a pod (one function): `-c` with inbound capture where
/// sk_lookup has no interface index (kernel 5.17; told so here) makes auto
/// mode take iptables, saying why, and `--mode ebpf` and `node-set add`
/// refuse in one line; the set gets no pod.
#[test]
fn what_a_set_cannot_do_for_a_pod_is_auto_modes_fallback_and_adds_refusal() {
    require_root!();
    let Some(sandbox) = sandbox_for_a_set() else {
        return;
    };
    let set = Set::load(&sandbox);
    let netns = sandbox.pod_netns().to_owned();
    let why = "-c with inbound capture (-b) needs the interface an inbound connection arrived \
               on, which sk_lookup gives from kernel 5.17";
    let istio = |mode: &str, cleanup: bool| {
        let mut args = vec![
            "--assume-missing",
            "sk_lookup/ingress_ifindex",
            "istio-iptables",
            "--ipv6=false",
            "--mode",
            mode,
            "--netns",
            &netns,
            "--node-set",
            &set.name,
            "--instance",
            "pod-a",
            "-i",
            "*",
            "-b",
            "*",
            "-c",
            "eth0",
        ];
        if cleanup {
            args.push("--cleanup-only");
        }
        redirect(&args).expect("run redirect")
    };
    let refused = istio("ebpf", false);
    assert_ne!(refused.code, 0, "{refused:?}");
    assert_eq!(refused.stderr.lines().count(), 1, "{refused:?}");
    assert!(refused.stderr.contains(why), "{refused:?}");

    let mut add = vec![
        "--assume-missing",
        "sk_lookup/ingress_ifindex",
        "node-set",
        "add",
    ];
    add.extend(["--set", &set.name, "--instance", "pod-a", "--netns", &netns]);
    add.extend(["-i", "*", "-b", "*", "-c", "eth0"]);
    let refused = redirect(&add).expect("run redirect");
    assert_ne!(refused.code, 0, "{refused:?}");
    assert_eq!(refused.stderr.lines().count(), 1, "{refused:?}");
    assert!(refused.stderr.contains(why), "{refused:?}");
    assert_eq!(set.status()["pods"].as_array().map(Vec::len), Some(0));

    let auto = istio("auto", false);
    assert_eq!(auto.code, 0, "{auto:?}");
    assert!(
        auto.stderr
            .contains(&format!("auto mode: using iptables, because {why}")),
        "{auto:?}"
    );
    assert_eq!(set.status()["pods"].as_array().map(Vec::len), Some(0));
    assert!(
        auto.stdout.contains("applied the Istio rules (iptables"),
        "{auto:?}"
    );
    assert_eq!(istio("auto", true).code, 0);
}

/// Where sockops cannot ask a socket's namespace (kernels before 5.15, or
/// told so), loading a set is refused with one line naming the kernel and
/// the way out, and nothing is pinned.
#[test]
fn a_kernel_without_the_namespace_cookie_refuses_a_node_set() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    let name = format!("{}-set", sandbox.name());
    let out = redirect(&[
        "--assume-missing",
        "helper/get_netns_cookie",
        "node-set",
        "load",
        "--set",
        &name,
        "--cgroup",
        &sandbox.pod_cgroup().to_string_lossy(),
    ])
    .expect("run redirect");
    assert_ne!(out.code, 0, "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    assert!(
        out.stderr.contains("too old for a node set") && out.stderr.contains("5.15"),
        "{out:?}"
    );
    assert!(
        !std::path::Path::new(redirect_sandbox::PIN_ROOT)
            .join(format!("@set-{name}"))
            .exists()
    );
}

/// A pod whose network namespace goes away (deleted without a CNI DEL) is
/// taken out of the set by `redirect gc`, as the node agent runs it: the
/// kernel detached its sk_lookup link when the namespace went. A live pod
/// of the same set stays. gc also clears what removals left.
#[test]
fn gc_takes_out_the_pods_whose_namespace_is_gone() {
    require_root!();
    let Some(sandbox) = sandbox_for_a_set() else {
        return;
    };
    let set = Set::load(&sandbox);
    let live = set.add("live", sandbox.pod_netns(), &["-i", "*", "-b", ""]);
    assert_eq!(live.code, 0, "{live:?}");
    // An add killed midway (SIGKILL while it holds its claim on an index)
    // is not a pod; gc, or the next add, clears what it left.
    let held = redirect_sandbox::netns::create().expect("a namespace");
    let held_netns = format!("/proc/{}/fd/{}", std::process::id(), held.as_raw_fd());
    killed_midway(&set, "killed", &held_netns);
    let dry = redirect(&["gc", "--dry-run"]).expect("gc --dry-run");
    assert!(
        dry.stdout.contains(&format!(
            "would remove pod #1 of node set {}: left by an interrupted add",
            set.name
        )),
        "{dry:?}"
    );
    assert_eq!(set.status()["pods"].as_array().map(Vec::len), Some(1));

    let doomed = redirect_sandbox::netns::create().expect("a namespace");
    let doomed_netns = format!("/proc/{}/fd/{}", std::process::id(), doomed.as_raw_fd());
    // Outbound only: the pod has the link all the same. Named as the CNI
    // plugin names pods (cni-<64 hex digits>), whole in its record.
    let doomed_name = format!("cni-{}", "0123456789abcdef".repeat(4));
    let out = set.add(&doomed_name, &doomed_netns, &["-i", "*", "-b", ""]);
    assert_eq!(out.code, 0, "{out:?}");
    let line = format!("pod {doomed_name} of node set {}", set.name);
    let dry = redirect(&["gc", "--dry-run"]).expect("gc --dry-run");
    assert!(!dry.stdout.contains(&line), "a live namespace: {dry:?}");

    drop(doomed);
    // The kernel frees a namespace in a work item after its last
    // reference: poll, bounded, until gc sees it gone.
    let mut gone = false;
    for _ in 0..50 {
        let dry = redirect(&["gc", "--dry-run"]).expect("gc --dry-run");
        if dry.stdout.contains(&format!("would remove {line}")) {
            gone = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(gone, "the namespace was freed within 5 s");
    // Its link is severed and the pod not yet removed: an upgrade of the
    // set goes past it (nothing runs there to upgrade).
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let again = set.run(&["load", "--cgroup", &cgroup, "--max-pods", "2"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stdout.contains("upgraded in place"), "{again:?}");
    let mut collected = None;
    for _ in 0..50 {
        let out = redirect(&["gc"]).expect("gc");
        assert_eq!(out.code, 0, "{out:?}");
        if out.stdout.contains(&line) {
            collected = Some(out);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = collected.expect("gc removed the pod within 5 s");
    assert!(
        out.stdout
            .contains(&format!("removed {line}: its network namespace is gone")),
        "{out:?}"
    );
    let pods: Vec<String> = set.status()["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(pods, ["live"]);
    // The next add (doomed's, which took that index) cleared the claim:
    // the namespace it held can be added, and gets that index again.
    let revived = set.add("revived", &held_netns, &["-i", "*", "-b", ""]);
    assert_eq!(revived.code, 0, "{revived:?}");
    let status = set.status();
    let index = status["pods"]
        .as_array()
        .and_then(|pods| pods.iter().find(|p| p["name"] == "revived"))
        .and_then(|p| p["index"].as_u64());
    assert_eq!(index, Some(1), "{status}");

    // A removal releases the pod's index: the pod is out of every
    // decision at once, and its entries are left for gc, which clears
    // them without listing them as a pod taken out. Another test's gc (or
    // node agent) may clear them first, so this is tried a few times and
    // must be seen once.
    let mut released_seen = false;
    for _ in 0..5 {
        let removed = set.run(&["remove", "--instance", "revived"]);
        assert_eq!(removed.code, 0, "{removed:?}");
        released_seen |= set.status()["released_indexes"] == 1;
        let out = redirect(&["gc"]).expect("gc");
        assert_eq!(out.code, 0, "{out:?}");
        assert!(
            !out.stdout.contains(&format!("of node set {}", set.name)),
            "{out:?}"
        );
        assert_eq!(set.status()["released_indexes"], 0);
        let revived = set.add("revived", &held_netns, &["-i", "*", "-b", ""]);
        assert_eq!(revived.code, 0, "{revived:?}");
        if released_seen {
            break;
        }
    }
    assert!(released_seen, "a removal left its index released");
}

/// Runs `node-set add` of the pod in `netns` as `name` and kills it with
/// SIGKILL once it has attached the pod's link (the test pause there).
fn killed_midway(set: &Set, name: &str, netns: &str) {
    use std::io::{BufRead as _, BufReader};
    let mut child = std::process::Command::new(redirect_sandbox::cli::redirect_bin())
        .args(["node-set", "add", "--set", &set.name, "--instance", name])
        .args(["--netns", netns, "-i", "*"])
        .env("REDIRECT_TEST_PAUSE", "node-set-add-after-link")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn redirect");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("test pause at") {
                let _ = tx.send(());
            }
        }
    });
    let paused = rx.recv_timeout(std::time::Duration::from_secs(30));
    let _ = child.kill();
    let _ = child.wait();
    paused.expect("the add reached its pause");
}

/// Creates a hash map (`key`- and `value`-byte entries, `entries` of them)
/// and pins it at `path` (`BPF_MAP_CREATE`, `BPF_OBJ_PIN`).
fn pin_hash_map(path: &std::path::Path, key: u32, value: u32, entries: u32) {
    use std::os::unix::ffi::OsStrExt as _;
    #[repr(C)]
    struct Create {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    #[repr(C)]
    struct Pin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    let mut create = Create {
        map_type: BPF_MAP_TYPE_HASH,
        key_size: key,
        value_size: value,
        max_entries: entries,
        map_flags: 0,
    };
    // SAFETY: a BPF_MAP_CREATE attribute prefix and its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &mut create as *mut Create,
            size_of::<Create>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    let mut pin = Pin {
        pathname: name.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
    };
    // SAFETY: a BPF_OBJ_PIN attribute prefix naming a NUL-terminated path
    // that outlives the call.
    let pinned = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &mut pin as *mut Pin,
            size_of::<Pin>(),
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: the descriptor BPF_MAP_CREATE returned, closed once.
    unsafe { libc::close(fd as libc::c_int) };
    assert_eq!(pinned, 0, "BPF_OBJ_PIN {}: {err}", path.display());
}

#[test]
fn an_upgrade_over_maps_of_other_sizes_is_refused_before_anything_changes() {
    require_root!();
    let Some(sandbox) = sandbox_for_a_set() else {
        return;
    };
    let set = Set::load(&sandbox);
    let before = programs(&set.status());
    // The ports map as a release with another per-pod port limit sized it.
    let ports = std::path::Path::new(redirect_sandbox::PIN_ROOT)
        .join(format!("@set-{}", set.name))
        .join("RDR_PORTS");
    std::fs::remove_file(&ports).expect("unpinning RDR_PORTS");
    pin_hash_map(&ports, 4, 1, 7);
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let again = set.run(&["load", "--cgroup", &cgroup, "--max-pods", "2"]);
    assert_eq!(again.code, 1, "{again:?}");
    assert_eq!(again.stderr.lines().count(), 1, "{again:?}");
    assert!(
        again.stderr.contains(
            "is loaded by another release of redirect (its map RDR_PORTS holds 7 entries"
        ),
        "{again:?}"
    );
    assert!(again.stderr.contains("node-set unload --set"), "{again:?}");
    assert_eq!(programs(&set.status()), before, "nothing changed");
}

#[test]
fn a_set_whose_cgroup_is_gone_says_so_and_unloads() {
    require_root!();
    let Some(sandbox) = sandbox_for_a_set() else {
        return;
    };
    // Removed by the test; the guard removes it too if the test fails
    // before that (the sandbox's cgroup cannot go while it is there).
    struct Cgroup(std::path::PathBuf);
    impl Drop for Cgroup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let gone = Cgroup(sandbox.pod_cgroup().join("set-gone"));
    std::fs::create_dir(&gone.0).expect("a cgroup for the set");
    let set = Set {
        name: format!("{}-set", sandbox.name()),
    };
    let out = set.run(&[
        "load",
        "--cgroup",
        &gone.0.to_string_lossy(),
        "--max-pods",
        "2",
    ]);
    assert_eq!(out.code, 0, "node-set load: {out:?}");
    std::fs::remove_dir(&gone.0).expect("removing the set's cgroup");
    // The kernel detaches the set's links once the cgroup is released,
    // shortly after the rmdir: asked again until it has (bounded: 10 s).
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let again = loop {
        let again = set.run(&["load", "--cgroup", &cgroup, "--max-pods", "2"]);
        if !again.stderr.contains("on another cgroup") || std::time::Instant::now() > deadline {
            break again;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(again.code, 1, "{again:?}");
    assert_eq!(again.stderr.lines().count(), 1, "{again:?}");
    assert!(
        again
            .stderr
            .contains("the cgroup it was attached to is gone (its programs no longer run)"),
        "{again:?}"
    );
    // `set` unloads when dropped, and asserts that it could.
}
