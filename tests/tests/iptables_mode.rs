//! iptables mode applied for real: every configuration of Istio's golden
//! files, in a sandbox pod's network namespace, with both iptables
//! backends. Applying installs the rules, a re-run changes nothing, and
//! `--cleanup-only` leaves the tables as they were, including rules that
//! were there before.

use std::{fs, process::Command};

use redirect_sandbox::{
    Group, Net, ROOT, Sandbox,
    cli::{ISTIO_SIDECAR_ARGS, Outcome, outcome, redirect_bin},
    conformance, require_root,
};

/// The rules and user chains of a namespace's tables, sorted, duplicates
/// kept (what a cleanup must restore; an emptied nft table object is not a
/// difference).
fn state(sandbox: &Sandbox, backend: &str, family: &str) -> Vec<String> {
    let program = format!("{family}-{backend}-save");
    let out = sandbox
        .command(Net::Pod, Group::Outside, ROOT, &program)
        .output()
        .expect("iptables-save");
    assert!(out.status.success(), "{program}: {out:?}");
    let mut table = String::new();
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            if let Some(t) = l.strip_prefix('*') {
                table = t.to_owned();
                None
            } else if l.starts_with("-A ") || (l.starts_with(':') && l.contains(" - ")) {
                Some(format!("{table} {}", l.split(" [").next().unwrap_or(l)))
            } else {
                None
            }
        })
        .collect();
    lines.sort();
    lines
}

/// `redirect istio-iptables --netns <pod> ARGS` with the case's environment.
fn istio_iptables(sandbox: &Sandbox, env: &[(String, String)], args: &[String]) -> Outcome {
    let mut cmd = Command::new(redirect_bin());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().cloned())
        .args([
            "istio-iptables",
            "--mode",
            "iptables",
            "--netns",
            &sandbox.netns_path(Net::Pod),
        ])
        .args(args);
    outcome(&mut cmd).expect("run redirect")
}

fn owner_names_resolvable(env: &[(String, String)]) -> bool {
    let groups = fs::read_to_string("/etc/group").unwrap_or_default();
    env.iter()
        .filter(|(k, _)| k.starts_with("ISTIO_OUTBOUND_OWNER_GROUPS"))
        .flat_map(|(_, v)| v.split(',').map(str::to_owned).collect::<Vec<_>>())
        .all(|g| {
            g.parse::<u32>().is_ok() || groups.lines().any(|l| l.starts_with(&format!("{g}:")))
        })
}

fn every_golden_configuration_applies_and_cleans_up(backend: &str) {
    let Some(cases) = conformance::cases() else {
        redirect_sandbox::skip_or_fail(&format!(
            "no Istio conformance data at {}",
            conformance::dir().display()
        ));
        return;
    };
    let sandbox = Sandbox::for_tests().expect("sandbox");
    // An unrelated rule that was there before, in a table Istio also uses.
    let mut pre = sandbox.command(
        Net::Pod,
        Group::Outside,
        ROOT,
        format!("iptables-{backend}"),
    );
    pre.args([
        "-w",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        "192.0.2.77/32",
        "-j",
        "RETURN",
    ]);
    assert!(pre.status().expect("iptables").success());
    let scratch = std::env::temp_dir().join(format!("{}-resolv", sandbox.name()));
    fs::create_dir_all(&scratch).expect("scratch");
    let (mut applied, mut skipped) = (0, Vec::new());
    for case in &cases {
        let name = case.name.as_str();
        if !owner_names_resolvable(&case.env) {
            // iptables resolves owner names when it adds a rule: these
            // cases name groups this machine does not have.
            skipped.push(name);
            continue;
        }
        let resolv = scratch.join(name);
        fs::write(&resolv, case.resolv_conf()).expect("resolv.conf");
        let env = case.env.clone();
        let ipv6 = case.ipv6.as_str();
        let mut argv = vec![
            format!("--ipv6={ipv6}"),
            "--resolv-conf".to_owned(),
            resolv.to_string_lossy().into_owned(),
            "--force-iptables-binary".to_owned(),
            backend.to_owned(),
        ];
        argv.extend(case.args.iter().cloned());
        let case = name;
        let families: &[&str] = if ipv6 == "true" {
            &["iptables", "ip6tables"]
        } else {
            &["iptables"]
        };
        let before: Vec<_> = families
            .iter()
            .map(|f| state(&sandbox, backend, f))
            .collect();

        let out = istio_iptables(&sandbox, &env, &argv);
        assert_eq!(out.code, 0, "{case} ({backend}): apply: {out:?}");
        assert!(
            out.stdout.contains("applied the Istio rules"),
            "{case}: {out:?}"
        );
        let after: Vec<_> = families
            .iter()
            .map(|f| state(&sandbox, backend, f))
            .collect();
        for (family, rules) in families.iter().zip(&after) {
            assert!(
                rules.iter().any(|l| l.contains(":ISTIO_OUTPUT")),
                "{case} {family}: {rules:?}"
            );
        }

        let again = istio_iptables(&sandbox, &env, &argv);
        assert_eq!(again.code, 0, "{case} ({backend}): re-run: {again:?}");
        assert!(
            again.stdout.contains("already in place"),
            "{case}: {again:?}"
        );
        let again_state: Vec<_> = families
            .iter()
            .map(|f| state(&sandbox, backend, f))
            .collect();
        assert_eq!(again_state, after, "{case}: the re-run changed nothing");

        let mut cleanup = argv.clone();
        cleanup.push("--cleanup-only".to_owned());
        let out = istio_iptables(&sandbox, &env, &cleanup);
        assert_eq!(out.code, 0, "{case} ({backend}): cleanup: {out:?}");
        let now: Vec<_> = families
            .iter()
            .map(|f| state(&sandbox, backend, f))
            .collect();
        assert_eq!(
            now, before,
            "{case} ({backend}): cleanup restores the tables"
        );
        assert!(
            now[0].iter().any(|l| l.contains("192.0.2.77/32")),
            "the unrelated rule stays"
        );
        applied += 1;
    }
    let _ = fs::remove_dir_all(&scratch);
    eprintln!(
        "iptables-{backend}: {applied} golden configurations applied and removed; skipped (unknown owner names here): {skipped:?}"
    );
    assert!(applied >= 20, "only {applied} cases applied");
}

#[test]
fn golden_configurations_apply_with_iptables_nft() {
    require_root!();
    every_golden_configuration_applies_and_cleans_up("nft");
}

#[test]
fn golden_configurations_apply_with_iptables_legacy() {
    require_root!();
    every_golden_configuration_applies_and_cleans_up("legacy");
}

#[test]
fn bad_istio_input_is_refused_with_istios_exit_codes() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    let before = state(&sandbox, "nft", "iptables");
    for (args, code, needle) in [
        (&["-x", "*"][..], 1, "cannot be '*'"),
        (&["-i", "10.0.0/8"], 1, "is not a CIDR"),
        (&["-p", "70000"], 1, "'70000' is not a port number"),
        (&["-m", "NAT"], 1, "is not a mode"),
        (
            &["-g", "no-such-group-here"],
            1,
            "neither a number nor a name in /etc/group",
        ),
        (&["--no-such-flag"], 255, "--no-such-flag"),
    ] {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let out = istio_iptables(&sandbox, &[], &args);
        assert_eq!(out.code, code, "{args:?}: {out:?}");
        assert!(out.stderr.contains(needle), "{args:?}: {out:?}");
        assert_eq!(
            state(&sandbox, "nft", "iptables"),
            before,
            "{args:?} changed nothing"
        );
    }
}

#[test]
fn istio_init_command_line_and_capabilities_are_enough() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    // istio-init runs in the pod's network namespace with NET_ADMIN and
    // NET_RAW only.
    let mut cmd = sandbox.command(Net::Pod, Group::Outside, ROOT, "setpriv");
    cmd.args([
        "--bounding-set",
        "-all,+net_admin,+net_raw",
        "--inh-caps",
        "-all",
        "--",
    ])
    .arg(redirect_bin())
    .arg("istio-iptables")
    .args(ISTIO_SIDECAR_ARGS)
    .arg("--log_output_level=default:info");
    let out = outcome(&mut cmd).expect("setpriv");
    assert_eq!(out.code, 0, "{out:?}");
    let rules = state(&sandbox, "nft", "iptables");
    assert!(
        rules.iter().any(|l| l.contains("--dport 15090 -j RETURN")),
        "{rules:?}"
    );
}

#[test]
fn reruns_with_other_flags_are_refused_or_reconciled_and_cleanup_takes_everything() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    let before = state(&sandbox, "nft", "iptables");
    let with = |extra: &[&str]| -> Vec<String> {
        ISTIO_SIDECAR_ARGS
            .iter()
            .chain(&["--log_output_level=default:info"])
            .chain(extra)
            .map(|a| (*a).to_owned())
            .collect()
    };
    assert_eq!(istio_iptables(&sandbox, &[], &with(&[])).code, 0);
    // Without -d: a different configuration, not "already in place".
    let mut other = with(&[]);
    let d = other.iter().position(|a| a == "-d").expect("-d");
    other.drain(d..=d + 1);
    let out = istio_iptables(&sandbox, &[], &other);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("different Istio rules are already in place"),
        "{out:?}"
    );
    other.push("--reconcile".into());
    let out = istio_iptables(&sandbox, &[], &other);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("replaced"), "{out:?}");
    assert!(
        !state(&sandbox, "nft", "iptables")
            .iter()
            .any(|l| l.contains("15090"))
    );
    // Cleanup with no flags at all removes Istio's rules, whatever installed them.
    let out = istio_iptables(&sandbox, &[], &["--cleanup-only".to_owned()]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(state(&sandbox, "nft", "iptables"), before);
}

#[test]
fn boolean_flags_and_variables_follow_istio() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    let drop_rules = |env: &[(&str, &str)], args: &[&str]| {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut argv = vec!["--dry-run".to_owned(), "--ipv6=false".to_owned()];
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        let out = istio_iptables(&sandbox, &env, &argv);
        assert_eq!(out.code, 0, "{env:?} {args:?}: {out:?}");
        out.stdout.contains("ISTIO_DROP")
    };
    assert!(
        drop_rules(&[("DROP_INVALID", "1")], &[]),
        "Go's ParseBool accepts 1"
    );
    assert!(drop_rules(&[("DROP_INVALID", "T")], &[]));
    assert!(
        !drop_rules(&[("DROP_INVALID", "yes")], &[]),
        "an unparsable value is ignored"
    );
    assert!(
        !drop_rules(&[("DROP_INVALID", "true"), ("INVALID_DROP", "false")], &[]),
        "the secondary variable wins"
    );
    assert!(
        !drop_rules(&[("DROP_INVALID", "true")], &["--drop-invalid=false"]),
        "the command line wins"
    );
    let out = istio_iptables(&sandbox, &[], &["--drop-invalid=maybe".to_owned()]);
    assert_eq!(out.code, 255, "a bad bool on the command line: {out:?}");
}
