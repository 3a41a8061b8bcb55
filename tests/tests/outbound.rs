//! End-to-end tests of outbound capture (issue: foundation). Each test
//! builds its own sandbox pod, drives the real `redirect` binary against the
//! real kernel, and checks where real connections land.

use std::{
    net::{Ipv4Addr, SocketAddrV4, SocketAddrV6},
    thread,
    time::Duration,
};

use redirect_sandbox::{
    APP, Group, Identity, Net, PEER_IP6, PROXY, Sandbox,
    cli::{PROXY_REPLY, UPSTREAM as UPSTREAM_ADDR, UPSTREAM_REPLY as UPSTREAM, counter, redirect},
    require_root,
    witness::Witness,
};

fn upstream_addr() -> SocketAddrV4 {
    UPSTREAM_ADDR
}

fn local(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)
}

fn pod() -> Sandbox {
    Sandbox::with_upstream_and_proxy().expect("sandbox pod")
}

/// Where one connection from `group` as `who` to `to` lands.
fn lands(sandbox: &Sandbox, group: Group, who: Identity, to: SocketAddrV4) -> String {
    sandbox.lands(group, who, to).expect("connect")
}

#[test]
fn app_connection_lands_on_the_proxy_port() {
    require_root!();
    let sandbox = pod();
    assert_eq!(lands(&sandbox, Group::App, APP, upstream_addr()), UPSTREAM);
    sandbox.install(&[]).expect("install");
    let before = counter(&sandbox.status().expect("status"), "redirected");
    assert_eq!(
        lands(&sandbox, Group::App, APP, upstream_addr()),
        PROXY_REPLY
    );
    let after = counter(&sandbox.status().expect("status"), "redirected");
    assert_eq!(
        after,
        before + 1,
        "the redirected counter counts each capture"
    );
    sandbox.uninstall().expect("uninstall");
}

#[test]
fn proxy_uid_and_gid_reach_the_real_destination() {
    require_root!();
    let sandbox = pod();
    sandbox.install(&[]).expect("install");
    assert_eq!(
        lands(&sandbox, Group::Proxy, PROXY, upstream_addr()),
        UPSTREAM
    );
    // The proxy's UID from the app's cgroup too: the owner decides, not the cgroup child.
    assert_eq!(
        lands(&sandbox, Group::App, PROXY, upstream_addr()),
        UPSTREAM
    );
    // GID 1337 with another UID (Istio's --gid-owner rule).
    let gid_only = Identity {
        uid: 4242,
        gid: 1337,
    };
    assert_eq!(
        lands(&sandbox, Group::App, gid_only, upstream_addr()),
        UPSTREAM
    );
    let status = sandbox.status().expect("status");
    assert_eq!(counter(&status, "bypass_uid"), 2);
    assert_eq!(counter(&status, "bypass_gid"), 1);
    assert_eq!(counter(&status, "redirected"), 0);
    // Configured lists: another proxy UID, and GIDs are honoured too.
    sandbox
        .install(&["-u", "2000,3000", "-g", "5000"])
        .expect("reinstall");
    let other = Identity {
        uid: 3000,
        gid: 3000,
    };
    assert_eq!(
        lands(&sandbox, Group::App, other, upstream_addr()),
        UPSTREAM
    );
    assert_eq!(
        lands(&sandbox, Group::App, PROXY, upstream_addr()),
        PROXY_REPLY
    );
    sandbox.uninstall().expect("uninstall");
}

#[test]
fn loopback_and_outside_the_cgroup_are_not_redirected() {
    require_root!();
    let sandbox = pod();
    sandbox
        .serve(Net::Pod, Group::Outside, APP, local(8081), "local app")
        .expect("local listener");
    sandbox.install(&[]).expect("install");
    assert_eq!(lands(&sandbox, Group::App, APP, local(8081)), "local app");
    assert_eq!(
        lands(&sandbox, Group::Outside, APP, upstream_addr()),
        UPSTREAM
    );
    let status = sandbox.status().expect("status");
    // Istio's `-o lo -m owner ! --uid-owner 1337 -j RETURN` matches first.
    assert_eq!(counter(&status, "bypass_local"), 1);
    assert_eq!(counter(&status, "redirected"), 0);
    sandbox.uninstall().expect("uninstall");
}

#[test]
fn capture_outlives_the_installer_and_uninstall_removes_everything() {
    require_root!();
    let sandbox = pod();
    // `redirect install` is a process that has exited by now.
    sandbox.install(&[]).expect("install");
    assert!(sandbox.is_pinned());
    assert_eq!(
        lands(&sandbox, Group::App, APP, upstream_addr()),
        PROXY_REPLY
    );
    let status = sandbox.status().expect("status");
    let programs = status["instances"][0]["programs"]
        .as_array()
        .expect("programs");
    let hooks: Vec<_> = programs
        .iter()
        .map(|p| p["hook"].as_str().unwrap_or("?"))
        .collect();
    // The hooks this configuration gives work: no DNS capture (sendmsg,
    // recvmsg) and no inbound capture (getsockname, sk_lookup).
    assert_eq!(
        hooks,
        [
            "sockops",
            "getsockopt",
            "getpeername4",
            "getpeername6",
            "connect6",
            "connect4"
        ]
    );
    assert!(
        programs
            .iter()
            .all(|p| p["attached"] == true || p["available"] == false),
        "every hook the kernel has is attached: {status}"
    );

    let out = sandbox.uninstall().expect("uninstall");
    assert!(out.stdout.contains("removed instance"), "{out:?}");
    assert!(
        !sandbox.is_pinned(),
        "nothing stays under /sys/fs/bpf/redirect/"
    );
    assert_eq!(lands(&sandbox, Group::App, APP, upstream_addr()), UPSTREAM);

    // Uninstalling again is not an error, and says so.
    let again = redirect(&["uninstall", "--instance", sandbox.name()]).expect("uninstall");
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stdout.contains("not installed"), "{again:?}");
}

#[test]
fn uninstall_by_cgroup_finds_the_instance() {
    require_root!();
    let sandbox = pod();
    sandbox.install(&[]).expect("install");
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let out = redirect(&["uninstall", "--cgroup", &cgroup]).expect("uninstall");
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains(sandbox.name()), "{out:?}");
    assert!(!sandbox.is_pinned());
    assert_eq!(lands(&sandbox, Group::App, APP, upstream_addr()), UPSTREAM);
}

#[test]
fn reinstall_under_load_never_lets_a_connection_escape() {
    require_root!();
    let sandbox = pod();
    sandbox
        .serve(Net::Pod, Group::Proxy, PROXY, local(15002), "proxy-15002")
        .expect("second proxy");
    sandbox.install(&[]).expect("install");
    // The loop runs until the reinstall has returned and a little longer
    // (bounded: 60 s, 200,000 connections), however slow the machine.
    let stop = std::env::temp_dir().join(format!("{}-stop", sandbox.name()));
    let _ = std::fs::remove_file(&stop);
    let load = thread::scope(|s| {
        let load = s.spawn(|| {
            let mut cmd = sandbox.agent(Net::Pod, Group::App, APP);
            cmd.args([
                "connect",
                "--to",
                &upstream_addr().to_string(),
                "--count",
                "200000",
                "--duration-ms",
                "60000",
                "--until-file",
                &stop.to_string_lossy(),
            ]);
            let out = cmd.output().expect("load loop");
            redirect_sandbox::agent::Tally::parse(&String::from_utf8_lossy(&out.stdout))
                .expect("tally")
        });
        thread::sleep(Duration::from_millis(500));
        sandbox
            .install(&["-p", "15002"])
            .expect("reinstall with another port");
        thread::sleep(Duration::from_millis(500));
        std::fs::write(&stop, "").expect("stop file");
        load.join().expect("load thread")
    });
    let _ = std::fs::remove_file(&stop);
    assert!(
        load.get(PROXY_REPLY) > 0,
        "connections before the reinstall: {load:?}"
    );
    assert!(
        load.get("proxy-15002") > 0,
        "connections after the reinstall: {load:?}"
    );
    assert_eq!(
        load.get(PROXY_REPLY) + load.get("proxy-15002"),
        load.total(),
        "every connection lands on the old or the new port, none escapes: {load:?}"
    );
    eprintln!("reinstall under load: {load:?}");
    let status = sandbox.status().expect("status");
    assert_eq!(status["instances"][0]["config"]["proxy_port"], 15002);
    sandbox.uninstall().expect("uninstall");
}

#[test]
fn other_connect4_programs_on_the_cgroup_keep_running() {
    require_root!();
    let sandbox = pod();
    let before = Witness::attach_legacy_multi(sandbox.pod_cgroup()).expect("legacy witness");
    sandbox
        .install(&[])
        .expect("install next to a multi-attached program");
    let after = Witness::attach_link(sandbox.pod_cgroup()).expect("link witness");
    assert_eq!(
        lands(&sandbox, Group::App, APP, upstream_addr()),
        PROXY_REPLY
    );
    assert_eq!(
        before.count().expect("count"),
        1,
        "the earlier program still runs"
    );
    assert_eq!(
        after.count().expect("count"),
        1,
        "the later program runs too"
    );

    sandbox.uninstall().expect("uninstall");
    assert_eq!(lands(&sandbox, Group::App, APP, upstream_addr()), UPSTREAM);
    assert_eq!(
        before.count().expect("count"),
        2,
        "uninstall leaves others attached"
    );
    assert_eq!(after.count().expect("count"), 2);
}

#[test]
fn tight_loop_is_fully_redirected_and_the_tuple_map_stays_bounded() {
    require_root!();
    let sandbox = pod();
    sandbox.install(&[]).expect("install");
    let tally = sandbox
        .connect(Group::App, APP, upstream_addr(), 2000)
        .expect("2000 connections");
    assert_eq!(tally.get(PROXY_REPLY), 2000, "{tally:?}");
    let status = sandbox.status().expect("status");
    assert_eq!(counter(&status, "redirected"), 2000);
    assert_eq!(counter(&status, "tuple_recorded"), 2000);
    // Each proxy end took its record into its own storage.
    assert_eq!(counter(&status, "tuple_released"), 2000, "{status}");
    let tracked = &status["instances"][0]["tracked"];
    let handshakes = tracked["handshakes"].as_u64().expect("handshakes");
    assert_eq!(
        handshakes, 0,
        "no record is left in the tuple map: {tracked}"
    );
    sandbox.uninstall().expect("uninstall");
}

#[test]
fn records_a_proxy_outside_the_cgroup_never_takes_stay_within_the_map() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    sandbox
        .serve(Net::Peer, Group::Outside, APP, upstream_addr(), UPSTREAM)
        .expect("upstream");
    // The proxy outside the pod cgroup: sockops never sees its side.
    sandbox
        .serve(Net::Pod, Group::Outside, PROXY, local(15001), PROXY_REPLY)
        .expect("proxy outside the pod cgroup");
    sandbox
        .install(&["--max-connections", "256"])
        .expect("install");
    let capacity = tuple_map_entries(&sandbox.status().expect("status"));
    // More connections than the map holds: no proxy end takes a record
    // (nor could that proxy ask SO_ORIGINAL_DST through this capture).
    let count = capacity + 200;
    let tally = sandbox
        .connect(
            Group::App,
            APP,
            upstream_addr(),
            u32::try_from(count).expect("count"),
        )
        .expect("connect");
    assert_eq!(tally.get(PROXY_REPLY), count, "{tally:?}");
    let status = sandbox.status().expect("status");
    assert_eq!(counter(&status, "tuple_recorded"), count, "{status}");
    assert_eq!(counter(&status, "tuple_released"), 0, "{status}");
    let handshakes = status["instances"][0]["tracked"]["handshakes"]
        .as_u64()
        .expect("handshakes");
    assert!(
        handshakes > 0 && handshakes <= capacity,
        "the LRU map reuses the oldest records' room: {handshakes} of {capacity}"
    );
    sandbox.uninstall().expect("uninstall");
}

#[test]
fn connects_that_never_complete_leave_only_their_tuple_record_to_the_lru() {
    require_root!();
    // No proxy listening: the redirected connect is refused.
    let sandbox = Sandbox::for_tests().expect("sandbox");
    sandbox.install(&[]).expect("install");
    let tally = sandbox
        .connect(Group::App, APP, upstream_addr(), 20)
        .expect("connect");
    assert_eq!(tally.get("error: connection refused"), 20, "{tally:?}");
    let status = sandbox.status().expect("status");
    // Each SYN filed a tuple record that no proxy end took: they stay until
    // the LRU map reuses their room, as conntrack keeps an unanswered
    // SYN's entry until it times out; the socket's own copy went with it.
    assert_eq!(counter(&status, "redirected"), 20, "{status}");
    assert_eq!(counter(&status, "tuple_recorded"), 20, "{status}");
    assert_eq!(counter(&status, "tuple_released"), 0, "{status}");
    assert_eq!(
        status["instances"][0]["tracked"]["handshakes"], 20,
        "{status}"
    );
    sandbox.uninstall().expect("uninstall");
}

#[test]
fn dual_stack_sockets_to_v4_mapped_addresses_are_captured_like_ipv4() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    sandbox
        .serve(Net::Peer, Group::Outside, APP, UPSTREAM_ADDR, UPSTREAM)
        .expect("upstream");
    let v6_upstream = SocketAddrV6::new(PEER_IP6, 9080, 0, 0);
    sandbox
        .serve(Net::Peer, Group::Outside, APP, v6_upstream, "upstream-v6")
        .expect("IPv6 upstream");
    sandbox
        .start_reporting_proxy("original-dst")
        .expect("proxy");
    sandbox.install(&[]).expect("install");

    // An AF_INET6 socket to ::ffff:198.18.0.2 sends IPv4: captured, and the
    // proxy learns the IPv4 original destination.
    let mapped = SocketAddrV6::new(UPSTREAM_ADDR.ip().to_ipv6_mapped(), 9080, 0, 0).to_string();
    let out = sandbox
        .agent_output(Group::App, APP, &["connect", "--to", &mapped, "--peer"])
        .expect("connect");
    assert_eq!(out.trim(), format!("1\tpeer={mapped} {UPSTREAM_ADDR}"));
    // The proxy's own dual-stack connection escapes, as with IPv4.
    let own = sandbox
        .agent_output(Group::App, PROXY, &["connect", "--to", &mapped])
        .expect("connect");
    assert_eq!(own.trim(), format!("1\t{UPSTREAM}"));
    // Real IPv6 is not captured (no IPv6 rules, as istio-iptables without --ipv6).
    let v6 = sandbox
        .agent_output(
            Group::App,
            APP,
            &["connect", "--to", &v6_upstream.to_string()],
        )
        .expect("connect");
    assert_eq!(v6.trim(), "1\tupstream-v6");
    let status = sandbox.status().expect("status");
    assert_eq!(counter(&status, "redirected"), 1);
    assert_eq!(counter(&status, "orig_dst_answered"), 1);
    assert_eq!(counter(&status, "peername_restored"), 1);
    assert_eq!(counter(&status, "not_ipv4"), 1);
    sandbox.uninstall().expect("uninstall");
}

#[test]
fn install_takes_istio_outbound_flags() {
    require_root!();
    let sandbox = pod();
    let other = SocketAddrV4::new(redirect_sandbox::PEER_IP, 9081);
    sandbox
        .serve(Net::Peer, Group::Outside, APP, other, "other")
        .expect("second upstream");
    // -x takes the upstream's address out of capture; the other port stays captured.
    sandbox
        .install(&["-x", "198.18.0.2/32", "-q", "9081"])
        .expect("install");
    assert_eq!(lands(&sandbox, Group::App, APP, upstream_addr()), UPSTREAM);
    assert_eq!(lands(&sandbox, Group::App, APP, other), "other");
    let status = sandbox.status().expect("status");
    assert_eq!(counter(&status, "bypass_cidr"), 2, "-x comes before -q");
    // Reinstall in place: nothing included but port 9081 (-i '' -q 9081).
    sandbox
        .install(&["-i", "", "-q", "9081"])
        .expect("reinstall");
    assert_eq!(lands(&sandbox, Group::App, APP, upstream_addr()), UPSTREAM);
    assert_eq!(lands(&sandbox, Group::App, APP, other), PROXY_REPLY);
    // -o beats everything.
    sandbox
        .install(&["-o", "9081,9080", "-q", "9081"])
        .expect("reinstall");
    assert_eq!(lands(&sandbox, Group::App, APP, upstream_addr()), UPSTREAM);
    assert_eq!(lands(&sandbox, Group::App, APP, other), "other");
    let status = sandbox.status().expect("status");
    assert_eq!(counter(&status, "not_included"), 1);
    assert_eq!(counter(&status, "bypass_port"), 2);
    let text = status.to_string();
    assert!(
        text.contains("-A ISTIO_OUTPUT -p tcp --dport 9080,9081 -j RETURN"),
        "status names the -o rule: {text}"
    );
    sandbox.uninstall().expect("uninstall");
}

#[test]
fn install_takes_istio_owner_groups() {
    require_root!();
    let sandbox = pod();
    let member = Identity {
        uid: 2000,
        gid: 3000,
    };
    // Only group 3000 is captured.
    sandbox
        .install(&["--owner-groups", "3000"])
        .expect("install");
    assert_eq!(lands(&sandbox, Group::App, APP, upstream_addr()), UPSTREAM);
    assert_eq!(
        lands(&sandbox, Group::App, member, upstream_addr()),
        PROXY_REPLY
    );
    // Every group but 3000.
    sandbox
        .install(&["--owner-groups-exclude", "3000"])
        .expect("reinstall");
    assert_eq!(
        lands(&sandbox, Group::App, APP, upstream_addr()),
        PROXY_REPLY
    );
    assert_eq!(
        lands(&sandbox, Group::App, member, upstream_addr()),
        UPSTREAM
    );
    assert_eq!(
        counter(&sandbox.status().expect("status"), "bypass_group"),
        2
    );
    sandbox.uninstall().expect("uninstall");
}

#[test]
fn max_connections_sizes_the_maps_and_is_fixed_at_first_install() {
    require_root!();
    let sandbox = pod();
    sandbox
        .install(&["--max-connections", "1024"])
        .expect("install");
    let status = sandbox.status().expect("status");
    let instance = &status["instances"][0];
    let tuple = tuple_map(&status);
    assert_eq!(instance["max_connections"], 1024, "{status}");
    // The map is larger by the kernel LRU's per-CPU free lists (128 a CPU).
    let entries = tuple_map_entries(&status);
    assert!(
        (1024 + 128..=1024 + 128 * 1024).contains(&entries),
        "{status}"
    );
    // The tuple map's records are 100 bytes or so each; how the kernel rounds
    // its accounting differs between versions, so only the order of
    // magnitude is checked. Kernels before 5.11 charge the LPM tries at
    // their full size: the two CIDR sets (2 x 16,384 entries a slot) alone
    // are about 3 MB there, the port ranges and routes some 0.2 MB more,
    // the IPv6 CIDR sets (2 x 1,024 a slot) and routes about 0.3 MB.
    let bytes = instance["map_memory_bytes"].as_u64().expect("bytes");
    assert!(bytes < 5_000_000, "a small instance: {bytes} bytes");
    let tuple_bytes = tuple["bytes"].as_u64().expect("tuple map bytes");
    assert!(
        tuple_bytes < 1_000_000,
        "{tuple_bytes} bytes for 1,024 records"
    );
    assert_eq!(
        lands(&sandbox, Group::App, APP, upstream_addr()),
        PROXY_REPLY
    );
    // Another size needs a fresh install, and nothing changes meanwhile.
    let err = sandbox
        .install(&["--max-connections", "2048"])
        .expect_err("a different size is refused");
    assert!(
        err.to_string()
            .contains("holds 1024 connections and --max-connections asks for 2048"),
        "{err:#}"
    );
    assert_eq!(
        lands(&sandbox, Group::App, APP, upstream_addr()),
        PROXY_REPLY
    );
    let out = redirect(&[
        "install",
        "--cgroup",
        "/nonexistent",
        "--max-connections",
        "10",
    ])
    .expect("run");
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.contains("'10' is not a connection count"),
        "{out:?}"
    );
    sandbox.uninstall().expect("uninstall");
}

/// The instance's original-destination tuple map, from `status --json`.
fn tuple_map(status: &serde_json::Value) -> &serde_json::Value {
    status["instances"][0]["maps"]
        .as_array()
        .and_then(|maps| maps.iter().find(|m| m["name"] == "RDR_ORIG_TUPLE"))
        .expect("the tuple map")
}

/// How many records that map holds: `--max-connections` and the kernel
/// LRU's per-CPU room.
fn tuple_map_entries(status: &serde_json::Value) -> u64 {
    tuple_map(status)["max_entries"]
        .as_u64()
        .expect("max_entries")
}
