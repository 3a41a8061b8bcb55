//! Istio's native nftables mode applied for real (`--native-nftables`):
//! Istio's sidecar flags in a sandbox pod's network namespace land the
//! app's connections on the proxy and let the proxy's own through, a re-run
//! changes nothing, and `--cleanup-only` leaves no Istio table. Auto mode
//! on a node with `nft` but no iptables uses it, and says so.
//!
//! Where connections land compared with iptables mode, connection by
//! connection, is the differential test's
//! (`native_nftables_and_iptables_capture_the_same_connections`).

use std::{os::unix::fs::symlink, process::Command};

use redirect_sandbox::{
    APP, Group, Net, PROXY, ROOT, Sandbox,
    cli::{ISTIO_SIDECAR_ARGS, Outcome, UPSTREAM, host_nft_tables, nft, outcome, redirect_bin},
    require_root, skip_or_fail,
};

/// Skips (or fails under `CI=true`) without `nft`.
macro_rules! require_nft {
    () => {
        require_root!();
        if nft().is_none() {
            skip_or_fail("no nft here (install the nftables package)");
            return;
        }
    };
}

/// `redirect istio-iptables --netns <pod> --cgroup <pod> --instance
/// <name> ARGS`, with `env` added.
fn istio_iptables(sandbox: &Sandbox, env: &[(&str, &str)], args: &[&str]) -> Outcome {
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let mut cmd = Command::new(redirect_bin());
    cmd.envs(env.iter().copied())
        .args(["istio-iptables", "--netns", &sandbox.netns_path(Net::Pod)])
        .args(["--cgroup", &cgroup, "--instance", sandbox.name()])
        .args(args);
    outcome(&mut cmd).expect("run redirect")
}

/// Istio's tables in the pod's network namespace.
fn istio_tables(sandbox: &Sandbox) -> Vec<String> {
    sandbox
        .nft_tables(Net::Pod)
        .into_iter()
        .filter(|t| t.contains("istio-proxy"))
        .collect()
}

/// What `program ARGS` prints in the pod's network namespace.
fn pod_output(sandbox: &Sandbox, program: std::path::PathBuf, args: &[&str]) -> String {
    let out = sandbox
        .command(Net::Pod, Group::Outside, ROOT, &program)
        .args(args)
        .output()
        .expect("run in the pod");
    assert!(out.status.success(), "{program:?} {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the pod's network namespace has Istio's iptables chains.
fn has_istio_chains(sandbox: &Sandbox) -> bool {
    let out = sandbox
        .command(Net::Pod, Group::Outside, ROOT, "iptables-nft-save")
        .output()
        .expect("iptables-nft-save");
    String::from_utf8_lossy(&out.stdout).contains("ISTIO_")
}

/// Istio's sidecar flags (IPv4 only) and `extra`.
fn with(extra: &[&'static str]) -> Vec<&'static str> {
    ISTIO_SIDECAR_ARGS
        .iter()
        .chain(&["--ipv6=false"])
        .chain(extra)
        .copied()
        .collect()
}

#[test]
fn istios_sidecar_flags_apply_rerun_and_clean_up() {
    require_nft!();
    let sandbox = Sandbox::with_upstream_and_proxy().expect("sandbox pod");
    let args = with(&["--mode", "iptables", "--native-nftables"]);
    let out = istio_iptables(&sandbox, &[], &args);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout
            .contains("applied the Istio rules (nftables, IPv6 off)"),
        "{out:?}"
    );
    assert_eq!(
        istio_tables(&sandbox),
        ["table inet istio-proxy-nat"],
        "Istio's nat table, in the pod"
    );
    assert!(
        !host_nft_tables().iter().any(|t| t.contains("istio-proxy")),
        "nothing in the host's namespace"
    );
    assert!(!has_istio_chains(&sandbox), "no iptables rules");
    assert_eq!(
        sandbox.lands(Group::App, APP, UPSTREAM).expect("connect"),
        "proxy",
        "the app's connection lands on the proxy"
    );
    assert_eq!(
        sandbox
            .lands(Group::Proxy, PROXY, UPSTREAM)
            .expect("connect"),
        "upstream",
        "the proxy's own reaches the upstream"
    );

    // The same flags again: nothing to change.
    let again = istio_iptables(&sandbox, &[], &args);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stdout.contains("already in place"), "{again:?}");

    // Other flags (TPROXY, which also writes the mangle table, and IPv6):
    // replaced in one transaction; then the sidecar flags again leave the
    // nat table alone, as a fresh apply does.
    let tproxy: Vec<&str> = ISTIO_SIDECAR_ARGS
        .iter()
        .map(|a| if *a == "REDIRECT" { "TPROXY" } else { *a })
        .chain(["--ipv6=true", "--mode", "iptables", "--native-nftables"])
        .collect();
    let out = istio_iptables(&sandbox, &[], &tproxy);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("replaced"), "{out:?}");
    assert_eq!(
        istio_tables(&sandbox),
        [
            "table inet istio-proxy-nat",
            "table inet istio-proxy-mangle"
        ]
    );
    let listed = pod_output(
        &sandbox,
        nft().expect("nft"),
        &["list", "table", "inet", "istio-proxy-mangle"],
    );
    assert!(
        listed.contains("tproxy ip to :15006") && listed.contains("tproxy ip6 to :15006"),
        "IPv4 and IPv6 in the same inet table: {listed}"
    );
    assert!(
        pod_output(&sandbox, "ip".into(), &["rule"]).contains("lookup 133"),
        "TPROXY's policy routing"
    );
    let out = istio_iptables(&sandbox, &[], &args);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("replaced"), "{out:?}");
    assert_eq!(istio_tables(&sandbox), ["table inet istio-proxy-nat"]);
    assert_eq!(
        sandbox.lands(Group::App, APP, UPSTREAM).expect("connect"),
        "proxy"
    );
    // TPROXY's policy routing, which the TPROXY run added.
    let mut cleanup = tproxy.clone();
    cleanup.push("--cleanup-only");
    let out = istio_iptables(&sandbox, &[], &cleanup);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("removed the Istio nftables tables"),
        "{out:?}"
    );
    assert!(istio_tables(&sandbox).is_empty(), "no Istio table left");
    assert!(
        !pod_output(&sandbox, "ip".into(), &["rule"]).contains("lookup 133"),
        "TPROXY's policy routing removed"
    );
    let out = istio_iptables(&sandbox, &[], &cleanup);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("no Istio nftables tables"), "{out:?}");
    assert_eq!(
        sandbox.lands(Group::App, APP, UPSTREAM).expect("connect"),
        "upstream",
        "nothing captured any more"
    );
}

/// `--mode auto --native-nftables`: eBPF when it can, Istio's nftables
/// rules (saying why) when it cannot.
#[test]
fn auto_mode_with_native_nftables_prefers_ebpf_then_nftables() {
    require_nft!();
    let sandbox = Sandbox::with_upstream_and_proxy().expect("sandbox pod");
    let mut args = with(&["--mode", "auto", "--native-nftables"]);
    let out = istio_iptables(&sandbox, &[], &args);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("with eBPF"), "{out:?}");
    assert!(istio_tables(&sandbox).is_empty());
    args.push("--cleanup-only");
    assert_eq!(istio_iptables(&sandbox, &[], &args).code, 0);
    assert!(!sandbox.is_pinned());

    // A virtual interface the pod lacks, which eBPF mode cannot attach
    // to: nftables, and why.
    let mut args = with(&["--mode", "auto", "--native-nftables", "-k", "eth1"]);
    let out = istio_iptables(&sandbox, &[], &args);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains(
            "auto mode: using Istio's native nftables rules, because eBPF mode cannot honour -k"
        ),
        "{out:?}"
    );
    assert!(out.stdout.contains("(nftables"), "{out:?}");
    assert_eq!(istio_tables(&sandbox), ["table inet istio-proxy-nat"]);
    assert!(!sandbox.is_pinned() && !has_istio_chains(&sandbox));
    assert_eq!(
        sandbox.lands(Group::App, APP, UPSTREAM).expect("connect"),
        "proxy"
    );
    args.push("--cleanup-only");
    assert_eq!(istio_iptables(&sandbox, &[], &args).code, 0);
    assert!(istio_tables(&sandbox).is_empty());
}

/// `--mode auto` on a node with `nft` but neither iptables-nft nor
/// iptables-legacy: Istio's native nftables rules, saying so. The node is
/// simulated by a `PATH` holding only `nft`, and the debug build's
/// `REDIRECT_TEST_PATH_ONLY=1`, which keeps redirect from also looking in
/// /usr/sbin and /sbin.
#[test]
fn auto_mode_without_iptables_uses_nft() {
    require_nft!();
    let sandbox = Sandbox::with_upstream_and_proxy().expect("sandbox pod");
    let dir = std::env::temp_dir().join(format!("{}-only-nft", sandbox.name()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bin dir");
    symlink(nft().expect("nft"), dir.join("nft")).expect("nft link");
    let path = dir.to_string_lossy().into_owned();
    let env = [("PATH", path.as_str()), ("REDIRECT_TEST_PATH_ONLY", "1")];
    // eBPF mode cannot attach to a virtual interface the pod lacks: the
    // netfilter fallback.
    let mut args = with(&["--mode", "auto", "-k", "eth1"]);
    let out = istio_iptables(&sandbox, &env, &args);
    args.push("--cleanup-only");
    let tables = istio_tables(&sandbox);
    let iptables = has_istio_chains(&sandbox);
    let lands = sandbox.lands(Group::App, APP, UPSTREAM).expect("connect");
    let removed = istio_iptables(&sandbox, &env, &args);
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains(
            "auto mode: no iptables binary here; using Istio's native nftables rules (nft)"
        ),
        "{out:?}"
    );
    assert_eq!(tables, ["table inet istio-proxy-nat"]);
    assert!(!iptables, "no iptables rules");
    assert_eq!(lands, "proxy");
    assert_eq!(removed.code, 0, "{removed:?}");
    assert!(istio_tables(&sandbox).is_empty());

    // With iptables there, auto mode's fallback stays iptables.
    let mut args = with(&["--mode", "auto", "-k", "eth1"]);
    let out = istio_iptables(&sandbox, &[], &args);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("auto mode: using iptables"), "{out:?}");
    assert!(has_istio_chains(&sandbox) && istio_tables(&sandbox).is_empty());
    args.push("--cleanup-only");
    assert_eq!(istio_iptables(&sandbox, &[], &args).code, 0);
    assert!(!has_istio_chains(&sandbox));
}

/// Without `nft`, `--native-nftables` fails, naming the package, and
/// changes nothing.
#[test]
fn without_nft_native_nftables_names_the_package() {
    // Runs with or without nft installed: the PATH it gives redirect has none.
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    let dir = std::env::temp_dir().join(format!("{}-no-nft", sandbox.name()));
    std::fs::create_dir_all(&dir).expect("bin dir");
    let path = dir.to_string_lossy().into_owned();
    let env = [("PATH", path.as_str()), ("REDIRECT_TEST_PATH_ONLY", "1")];
    let out = istio_iptables(
        &sandbox,
        &env,
        &with(&["--mode", "iptables", "--native-nftables"]),
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("install the nftables package"),
        "{out:?}"
    );
    if nft().is_some() {
        assert!(istio_tables(&sandbox).is_empty());
    }
}
