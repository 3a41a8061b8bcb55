//! `redirect probe`: each feature is reported present exactly when the
//! running kernel is new enough for it (this runs on every kernel of the
//! VM matrix), and `--assume-missing` moves the mode to iptables when a
//! required feature is missing, or skips an optional hook.

use redirect_sandbox::{
    APP, Group, Sandbox,
    cli::{UPSTREAM, redirect},
    require_root,
};

fn kernel() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

fn probe(extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["probe", "--json"];
    args.extend_from_slice(extra);
    let out = redirect(&args).expect("probe");
    assert_eq!(out.code, 0, "{out:?}");
    serde_json::from_str(&out.stdout).expect("probe --json")
}

#[test]
fn features_are_present_exactly_from_their_first_kernel() {
    require_root!();
    let report = probe(&[]);
    let running = kernel();
    for f in report["features"].as_array().expect("features") {
        let name = f["name"].as_str().unwrap_or("?");
        let Some((major, minor)) = f["first_kernel"].as_str().and_then(|v| v.split_once('.'))
        else {
            continue; // not a kernel feature (privileges, the netfilter tools)
        };
        let first = (
            major.parse::<u32>().unwrap_or(99),
            minor.parse::<u32>().unwrap_or(99),
        );
        assert_eq!(
            f["present"].as_bool(),
            Some(running >= first),
            "{name} (first in {first:?}) on kernel {running:?}: {f}"
        );
    }
    let expected = if running >= (5, 8) {
        "ebpf"
    } else {
        "iptables"
    };
    assert_eq!(report["mode"], expected, "{report}");
}

#[test]
fn a_missing_required_feature_falls_back_to_iptables() {
    require_root!();
    let report = probe(&["--assume-missing", "cgroup/getsockopt"]);
    assert_eq!(report["mode"], "iptables");
    assert!(
        report["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("cgroup/getsockopt"),
        "{report}"
    );
    let out = redirect(&["probe", "--assume-missing", "no-such-feature"]).expect("probe");
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.contains("unknown feature 'no-such-feature'"),
        "{out:?}"
    );
}

#[test]
fn a_missing_optional_hook_is_skipped_and_reported() {
    require_root!();
    let report = probe(&["--assume-missing", "cgroup/getpeername4"]);
    assert_eq!(
        report["mode"], "ebpf",
        "getpeername restore is optional: {report}"
    );
    let sandbox = Sandbox::with_upstream_and_proxy().expect("sandbox pod");
    let cg = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let out = redirect(&[
        "install",
        "--cgroup",
        &cg,
        "--instance",
        sandbox.name(),
        "--netns",
        sandbox.pod_netns(),
        "--assume-missing",
        "cgroup/getpeername4",
    ])
    .expect("install");
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        sandbox.lands(Group::App, APP, UPSTREAM).expect("connect"),
        "proxy"
    );
    let status = redirect(&[
        "status",
        "--instance",
        sandbox.name(),
        "--assume-missing",
        "cgroup/getpeername4",
    ])
    .expect("status");
    assert!(
        status
            .stdout
            .contains("getpeername4 skipped: this kernel is older than 5.8"),
        "{status:?}"
    );
    sandbox.uninstall().expect("uninstall");
}

/// An install records the features it found present, so that the boot's
/// later installs need not ask the kernel again (bpffs lives in memory:
/// the record goes with the boot). The record holds nothing the kernel
/// lacks: every feature it names, `probe` (which always asks the kernel)
/// finds present, on every kernel of the VM matrix. Other tests install
/// beside this one and add to the same record, with the same facts.
#[test]
fn an_install_records_only_features_the_kernel_has() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    sandbox.install(&[]).expect("install");
    // The text names this build's record (one per build layout).
    let out = redirect(&["probe"]).expect("probe");
    let line = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("recorded this boot for installs ("))
        .unwrap_or_else(|| panic!("no record line: {out:?}"));
    let pin = line.split_once("): ").map_or("", |(pin, _)| pin);
    assert!(
        pin.starts_with(&format!("{}/@probes-", redirect_sandbox::PIN_ROOT)),
        "{out:?}"
    );
    assert!(
        std::path::Path::new(pin).exists(),
        "the install pinned its record at {pin}"
    );
    let report = probe(&[]);
    let recorded: Vec<&str> = report["recorded"]
        .as_array()
        .expect("recorded")
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    for attached in ["sockops", "cgroup/connect4", "cgroup/getsockopt"] {
        assert!(recorded.contains(&attached), "{attached}: {report}");
    }
    let features = report["features"].as_array().expect("features");
    // `probe` asks the kernel itself: an answer taken from the record
    // would make the check below compare the record with itself.
    for feature in features {
        let detail = feature["detail"].as_str().unwrap_or_default();
        assert!(
            !detail.contains("earlier this boot"),
            "probe answered from the record: {feature}"
        );
    }
    for name in &recorded {
        let found = features.iter().find(|f| f["name"] == *name);
        assert_eq!(
            found.and_then(|f| f["present"].as_bool()),
            Some(true),
            "recorded {name}, which the kernel does not have: {report}"
        );
    }
    sandbox.uninstall().expect("uninstall");
}
