//! `redirect istio-iptables --mode`: eBPF when this node and the flags allow
//! it, iptables otherwise (auto says why), and `--mode ebpf` refusing what
//! eBPF mode cannot honour yet (`-c`, `-k`, DNS capture, IPv6 rules). Both
//! backends take their decisions from the same istio-iptables
//! configuration; auto's choice for each of Istio's golden configurations.

use std::process::Command;

use redirect_sandbox::{
    APP, Group, Net, ROOT, Sandbox,
    cli::{ISTIO_SIDECAR_ARGS, Outcome, UPSTREAM, outcome, redirect_bin},
    require_root,
};

/// `redirect istio-iptables --netns <pod> --cgroup <pod cgroup> --instance <name> ARGS`.
fn istio_iptables(sandbox: &Sandbox, args: &[&str]) -> Outcome {
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let mut cmd = Command::new(redirect_bin());
    cmd.args([
        "istio-iptables",
        "--ipv6=false",
        "--netns",
        &sandbox.netns_path(Net::Pod),
    ])
    .args(["--cgroup", &cgroup, "--instance", sandbox.name()])
    .args(args);
    outcome(&mut cmd).expect("run redirect")
}

/// Whether the pod's network namespace has Istio's iptables chains.
fn has_istio_chains(sandbox: &Sandbox) -> bool {
    let out = sandbox
        .command(Net::Pod, Group::Outside, ROOT, "iptables-nft-save")
        .output()
        .expect("iptables-nft-save");
    String::from_utf8_lossy(&out.stdout).contains(":ISTIO_OUTPUT")
}

const SIDECAR: &[&str] = ISTIO_SIDECAR_ARGS;
const OUTBOUND_ONLY: &[&str] = &["-p", "15001", "-u", "1337", "-i", "*"];

#[test]
fn ebpf_mode_refuses_what_it_cannot_honour_yet() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    let mut args = vec!["--mode", "ebpf"];
    args.extend_from_slice(SIDECAR);
    args.extend_from_slice(&["-k", "eth1"]);
    let out = istio_iptables(&sandbox, &args);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("eBPF mode cannot honour -k eth1 naming an interface the pod does not have"),
        "{out:?}"
    );
    assert!(
        !sandbox.is_pinned() && !has_istio_chains(&sandbox),
        "nothing applied"
    );
}

#[test]
fn ebpf_mode_installs_from_istio_flags_and_cleans_up() {
    require_root!();
    let sandbox = Sandbox::with_upstream_and_proxy().expect("sandbox pod");
    let mut args = vec!["--mode", "ebpf"];
    args.extend_from_slice(OUTBOUND_ONLY);
    let out = istio_iptables(&sandbox, &args);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("with eBPF"), "{out:?}");
    assert_eq!(
        sandbox.lands(Group::App, APP, UPSTREAM).expect("connect"),
        "proxy"
    );
    assert!(
        !has_istio_chains(&sandbox),
        "no iptables rules in eBPF mode"
    );
    args.push("--cleanup-only");
    let out = istio_iptables(&sandbox, &args);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(!sandbox.is_pinned());
    assert_eq!(
        sandbox.lands(Group::App, APP, UPSTREAM).expect("connect"),
        "upstream"
    );
}

#[test]
fn auto_mode_prefers_ebpf_and_falls_back_to_iptables_saying_why() {
    require_root!();
    let sandbox = Sandbox::with_upstream_and_proxy().expect("sandbox pod");
    // Expressible in eBPF on a kernel that has everything: eBPF.
    let out = istio_iptables(&sandbox, OUTBOUND_ONLY);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("with eBPF"), "{out:?}");
    let mut cleanup = OUTBOUND_ONLY.to_vec();
    cleanup.push("--cleanup-only");
    assert_eq!(istio_iptables(&sandbox, &cleanup).code, 0);
    assert!(!sandbox.is_pinned());

    // The same flags on a kernel without cgroup/getsockopt: iptables, and why.
    let mut args = OUTBOUND_ONLY.to_vec();
    args.extend_from_slice(&["--assume-missing", "cgroup/getsockopt"]);
    let out = istio_iptables(&sandbox, &args);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("auto mode: using iptables, because eBPF capture needs cgroup/getsockopt"),
        "{out:?}"
    );
    assert!(has_istio_chains(&sandbox) && !sandbox.is_pinned());
    assert_eq!(
        sandbox.lands(Group::App, APP, UPSTREAM).expect("connect"),
        "proxy",
        "iptables captures too"
    );
    args.push("--cleanup-only");
    assert_eq!(istio_iptables(&sandbox, &args).code, 0);
    assert!(!has_istio_chains(&sandbox));

    // Istio's sidecar flags with a virtual interface the pod lacks, which
    // eBPF mode cannot attach to: iptables, and why.
    let mut virt = SIDECAR.to_vec();
    virt.extend(["-k", "eth1"]);
    let out = istio_iptables(&sandbox, &virt);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains(
            "because eBPF mode cannot honour -k eth1 naming an interface the pod does not have"
        ),
        "{out:?}"
    );
    assert!(has_istio_chains(&sandbox));
    virt.push("--cleanup-only");
    assert_eq!(istio_iptables(&sandbox, &virt).code, 0);
    assert!(!has_istio_chains(&sandbox));

    // Istio's sidecar flags as they are: eBPF, inbound capture included.
    let out = istio_iptables(&sandbox, SIDECAR);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("with eBPF"), "{out:?}");
    let mut cleanup = SIDECAR.to_vec();
    cleanup.push("--cleanup-only");
    assert_eq!(istio_iptables(&sandbox, &cleanup).code, 0);
    assert!(!sandbox.is_pinned());
}

/// Lists as istio-iptables takes them (spaces after commas, a trailing
/// comma) are the same in both backends: auto mode installs eBPF for them,
/// and the ports they name are honoured. (Auto mode used to fall back to
/// iptables for `-q "4000, 5000"`, refusing `' 5000'`.)
#[test]
fn lists_with_spaces_and_trailing_commas_stay_in_ebpf() {
    require_root!();
    let sandbox = Sandbox::with_upstream_and_proxy().expect("sandbox pod");
    let out = istio_iptables(
        &sandbox,
        &[
            "--mode",
            "auto",
            "-p",
            "15001",
            "-u",
            "1337",
            "-i",
            "",
            "-q",
            "4000, 9080,",
            "-o",
            " 22,",
        ],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("with eBPF"), "{out:?}");
    assert!(!out.stderr.contains("using iptables"), "{out:?}");
    assert_eq!(
        sandbox.lands(Group::App, APP, UPSTREAM).expect("connect"),
        "proxy",
        "-q ' 9080' captures the upstream's port"
    );
}

/// `--run-validation --skip-rule-apply`, as Istio's `istio-validation`
/// init container runs it in the pod (as the proxy's user), passes when
/// either backend's capture is in place and exits 126 when none is.
#[test]
fn istios_validation_passes_under_both_backends_and_fails_without_capture() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    let validate = |timeout: &str| {
        let mut cmd = sandbox.command(
            Net::Pod,
            Group::Proxy,
            redirect_sandbox::PROXY,
            redirect_bin(),
        );
        cmd.args([
            "istio-iptables",
            "--ipv6=false",
            "--skip-rule-apply",
            "--run-validation",
            "--probe-timeout",
            timeout,
        ])
        .args(SIDECAR);
        outcome(&mut cmd).expect("run the validation")
    };
    let out = validate("1s");
    assert_eq!(out.code, 126, "no capture yet: {out:?}");
    assert!(out.stderr.contains("validation failed"), "{out:?}");
    for mode in ["iptables", "ebpf"] {
        let mut args = vec!["--mode", mode];
        args.extend_from_slice(SIDECAR);
        let out = istio_iptables(&sandbox, &args);
        assert_eq!(out.code, 0, "{mode}: {out:?}");
        let out = validate("10s");
        assert_eq!(out.code, 0, "{mode}: {out:?}");
        assert!(out.stdout.contains("validation passed"), "{mode}: {out:?}");
        args.push("--cleanup-only");
        let out = istio_iptables(&sandbox, &args);
        assert_eq!(out.code, 0, "{mode}: {out:?}");
    }
    assert_eq!(validate("1s").code, 126, "removed again");
}

/// Istio passes the pod's network namespace as `NETWORK_NAMESPACE` too.
#[test]
fn the_network_namespace_comes_from_istios_variable() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let run = |extra: &[&str]| {
        let mut cmd = Command::new(redirect_bin());
        cmd.env("NETWORK_NAMESPACE", sandbox.netns_path(Net::Pod))
            .args(["istio-iptables", "--ipv6=false", "--mode", "iptables"])
            .args(["--cgroup", &cgroup, "--instance", sandbox.name()])
            .args(OUTBOUND_ONLY)
            .args(extra);
        outcome(&mut cmd).expect("run redirect")
    };
    let out = run(&[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(has_istio_chains(&sandbox), "applied in the pod's namespace");
    let out = run(&["--cleanup-only"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(!has_istio_chains(&sandbox));
}

/// The golden configurations auto mode installs with eBPF on a kernel that
/// has every eBPF feature (the others name, in auto's reason, what eBPF
/// mode lacks for them: TPROXY).
const EBPF_GOLDENS: &[&str] = &[
    "basic-exclude-nic",
    "ipv6-empty-inbound-ports",
    "ipv6-outbound-ports",
    "ipv6-inbound-ports",
    "ipv6-dns-uid-gid",
    "dns-uid-gid",
    "ipv6-dns-outbound-owner-groups",
    "ipv6-dns-outbound-owner-groups-exclude",
    "empty",
    "ipnets",
    "inbound-ports-include",
    "inbound-ports-wildcard",
    "outbound-owner-groups",
    "outbound-ports-include",
    "outbound-owner-groups-exclude",
    "drop-invalid",
    "host-ipv4-loopback-cidr",
    "ip-range",
    "loopback-outbound-iprange",
];

/// The golden configurations with `-k`: eBPF where the kernel has TCX
/// links (6.6), else iptables, auto's reason naming TCX.
const TCX_GOLDENS: &[&str] = &[
    "kube-virt-interfaces",
    "ipnets-with-kube-virt-interfaces",
    "ipv6-virt-interfaces",
    "ipv6-ipnets",
    "ipv6-uid-gid",
];

/// Each of Istio's golden configurations with `--mode auto` in a sandbox
/// pod on this machine: what auto installs, and its reason when that is
/// not eBPF. Owner group names the goldens use and this machine lacks
/// (`java`, `ftp`) are given to the run in a private mount namespace, so
/// that every configuration applies.
#[test]
fn auto_mode_over_istios_golden_configurations() {
    require_root!();
    let Some(cases) = redirect_sandbox::conformance::cases() else {
        redirect_sandbox::skip_or_fail(&format!(
            "no Istio conformance data at {}",
            redirect_sandbox::conformance::dir().display()
        ));
        return;
    };
    let sandbox = Sandbox::for_tests().expect("sandbox");
    // The interfaces `-c` and `-k` name in the goldens (besides the pod's
    // eth0), as a pod that names them has them.
    sandbox
        .ip_batch(
            Net::Pod,
            "link add not-istio-nic type veth peer name not-istio-peer\n\
             link add eth1 type veth peer name eth1-peer\n\
             link add eth2 type veth peer name eth2-peer\n",
        )
        .expect("not-istio-nic, eth1, eth2");
    let scratch = std::env::temp_dir().join(format!("{}-goldens", sandbox.name()));
    std::fs::create_dir_all(&scratch).expect("scratch");
    // This machine's groups, and the goldens' names it lacks.
    let mut groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    for (name, gid) in [("java", 60_101), ("ftp", 60_102)] {
        if !groups.lines().any(|l| l.starts_with(&format!("{name}:"))) {
            groups.push_str(&format!("{name}:x:{gid}:\n"));
        }
    }
    let group_file = scratch.join("group");
    std::fs::write(&group_file, groups).expect("group file");
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let run = |case: &redirect_sandbox::conformance::Case, cleanup: bool| -> Outcome {
        let resolv = scratch.join(format!("{}.resolv", case.name));
        std::fs::write(&resolv, case.resolv_conf()).expect("resolv.conf");
        let mut cmd = Command::new("unshare");
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(case.env.iter().cloned())
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount --bind \"$0\" /etc/group && exec \"$@\"")
            .arg(&group_file)
            .arg(redirect_bin())
            .args(["istio-iptables", "--mode", "auto"])
            .arg(format!("--ipv6={}", case.ipv6))
            .args(["--netns", &sandbox.netns_path(Net::Pod)])
            .args(["--cgroup", &cgroup, "--instance", sandbox.name()])
            .arg("--resolv-conf")
            .arg(&resolv)
            .args(&case.args);
        if cleanup {
            cmd.arg("--cleanup-only");
        }
        outcome(&mut cmd).expect("run redirect")
    };
    let (mut ebpf, mut report) = (Vec::new(), Vec::new());
    for case in &cases {
        let out = run(case, false);
        assert_eq!(out.code, 0, "{}: {out:?}", case.name);
        if out.stdout.contains("with eBPF") {
            assert!(
                sandbox.is_pinned() && !has_istio_chains(&sandbox),
                "{}",
                case.name
            );
            ebpf.push(case.name.as_str());
            report.push(format!("  {}: eBPF", case.name));
        } else {
            let why = out
                .stderr
                .lines()
                .find_map(|l| l.strip_prefix("redirect: auto mode: "))
                .unwrap_or_else(|| panic!("{}: auto gave no reason: {out:?}", case.name));
            assert!(!sandbox.is_pinned(), "{}", case.name);
            report.push(format!("  {}: {why}", case.name));
        }
        let out = run(case, true);
        assert_eq!(out.code, 0, "{} cleanup: {out:?}", case.name);
        assert!(
            !sandbox.is_pinned() && !has_istio_chains(&sandbox),
            "{}: cleaned up",
            case.name
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
    eprintln!(
        "auto chose eBPF for {}/{} golden configurations:\n{}",
        ebpf.len(),
        cases.len(),
        report.join("\n")
    );
    let tcx = redirect_sandbox::cli::feature_present("tcx/ingress");
    let expected: Vec<&str> = EBPF_GOLDENS
        .iter()
        .chain(TCX_GOLDENS.iter().filter(|_| tcx))
        .copied()
        .collect();
    if !tcx {
        for case in TCX_GOLDENS {
            let line = report
                .iter()
                .find(|l| l.trim_start().starts_with(&format!("{case}:")))
                .unwrap_or_else(|| panic!("{case} is a golden"));
            assert!(line.contains("TCX links"), "{line}");
        }
    }
    let missing: Vec<&&str> = expected.iter().filter(|c| !ebpf.contains(c)).collect();
    assert!(missing.is_empty(), "no longer eBPF: {missing:?}");
    let unlisted: Vec<&&str> = ebpf.iter().filter(|c| !expected.contains(c)).collect();
    assert!(
        unlisted.is_empty(),
        "eBPF now, add to EBPF_GOLDENS: {unlisted:?}"
    );
}
