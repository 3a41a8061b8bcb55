//! Bad input and hostile environments: each gets one clear error naming the
//! problem and the fix, a non-zero exit, and leaves nothing installed.

use std::{
    fs, net::SocketAddrV4, os::unix::fs::PermissionsExt as _, path::PathBuf, process::Command,
};

use redirect_sandbox::{
    APP, Group, Net, POD_IP, ROOT, Sandbox,
    cli::{Outcome, UPSTREAM, outcome, redirect, redirect_bin},
    require_root,
    witness::Witness,
};

/// The first line of stderr, which must carry the whole message.
fn first_line(out: &Outcome) -> &str {
    out.stderr.lines().next().unwrap_or_default()
}

fn assert_fails(out: &Outcome, code: i32, needle: &str) {
    assert_eq!(out.code, code, "{out:?}");
    assert!(
        first_line(out).contains(needle),
        "expected {needle:?} in the first stderr line: {out:?}"
    );
}

/// `install` of the sandbox's instance, for a command started in the pod's
/// network namespace.
fn install_here<'a>(sandbox: &'a Sandbox, cgroup: &'a str) -> Vec<&'a str> {
    vec!["install", "--cgroup", cgroup, "--instance", sandbox.name()]
}

/// `install` of the sandbox's instance, from anywhere (`--netns`).
fn install_args<'a>(sandbox: &'a Sandbox, cgroup: &'a str) -> Vec<&'a str> {
    let mut args = install_here(sandbox, cgroup);
    args.extend(["--netns", sandbox.pod_netns()]);
    args
}

#[test]
fn istio_flags_ebpf_cannot_honour_are_refused_with_the_way_out() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    let cg = sandbox.pod_cgroup().to_string_lossy().into_owned();
    for (extra, needle) in [
        (
            &["--redirect-dns"][..],
            "install and run do not read the pod's resolv.conf: capture DNS with `redirect istio-iptables --redirect-dns`",
        ),
        (
            &["-k", "eth1"],
            "-k eth1 naming an interface the pod does not have",
        ),
        (
            &["-c", "eth1"],
            "-c eth1 naming an interface the pod does not have",
        ),
        (
            &["-x", "fd00::/8"],
            "IPv6 networks in -i/-x are rules of Istio's IPv6 table, which install and run add with --dual-stack",
        ),
        (
            &["-b", "9080", "-m", "TPROXY"],
            "-m TPROXY (TPROXY needs netfilter",
        ),
    ] {
        let mut args = install_args(&sandbox, &cg);
        args.extend_from_slice(extra);
        assert_fails(&redirect(&args).expect("run"), 1, needle);
        assert!(!sandbox.is_pinned(), "{extra:?} left a pin");
    }
    // Istio's flags that only matter for those are accepted on their own,
    // and IPv6 networks with IPv6 rules.
    let mut args = install_args(&sandbox, &cg);
    args.extend_from_slice(&["-t", "1337", "-r", "133", "--redirect-dns=false"]);
    args.extend_from_slice(&["--dual-stack", "-x", "fd00::/8"]);
    let out = redirect(&args).expect("run");
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        redirect(&["uninstall", "--instance", sandbox.name()])
            .expect("run")
            .code,
        0
    );
}

#[test]
fn bad_flag_values_are_usage_errors() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    let cg = sandbox.pod_cgroup().to_string_lossy().into_owned();
    for (extra, needle) in [
        (&["-p", "0"][..], "-p: '0' is not a port number (1-65535)"),
        (&["-p", "70000"], "'70000' is not a port number"),
        (&["-p", "http"], "'http' is not a port number"),
        (&["-u", "envoy"], "'envoy' is not a numeric id"),
        (&["-g", "1337,x"], "'x' is not a numeric id"),
        (&["-u", "1,2,3,4,5,6,7,8,9"], "at most 8"),
        (
            &["-x", "*"],
            "cannot be '*' (it would exclude every destination)",
        ),
        (&["-i", "10.0.0.0/33"], "'10.0.0.0/33' is not a CIDR"),
        (&["-q", "70000"], "'70000' is not a port number"),
        (&["-o", "22,ssh"], "'ssh' is not a port number"),
        (&["-b", "9090:9080"], "'9090:9080' is not a port range"),
        (&["-d", "0"], "'0' is not a port number"),
        (
            &["-m", "tproxy"],
            "'tproxy' is not a mode: use REDIRECT or TPROXY",
        ),
        (
            &["--owner-groups", "no-such-group-xyz"],
            "'no-such-group-xyz' is neither a GID nor a group",
        ),
    ] {
        let mut args = install_args(&sandbox, &cg);
        args.extend_from_slice(extra);
        let out = redirect(&args).expect("run");
        assert_fails(&out, 2, needle);
        assert!(!sandbox.is_pinned(), "{extra:?} left a pin");
    }
    let out = redirect(&["install", "--cgroup", &cg, "--instance", "a/b"]).expect("run");
    assert_fails(&out, 2, "not a valid instance name");
}

#[test]
fn bad_cgroup_paths_are_refused() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");

    let missing = format!("{}/no-such-child", sandbox.pod_cgroup().display());
    let out = redirect(&install_args(&sandbox, &missing)).expect("run");
    assert_fails(&out, 1, "does not exist");

    let plain = std::env::temp_dir().join(format!("{}-not-a-cgroup", sandbox.name()));
    fs::create_dir_all(&plain).expect("mkdir");
    let out = redirect(&install_args(&sandbox, &plain.to_string_lossy())).expect("run");
    let _ = fs::remove_dir(&plain);
    assert_fails(&out, 1, "is not a cgroup directory");
    assert!(
        first_line(&out).contains("use a directory under"),
        "{out:?}"
    );
    assert!(!sandbox.is_pinned());
}

#[test]
fn cgroup_v1_path_is_refused() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    // A cgroup v1 hierarchy of our own, in a private mount namespace.
    let dir = std::env::temp_dir().join(format!("{}-v1", sandbox.name()));
    fs::create_dir_all(&dir).expect("mkdir");
    let script = format!(
        "mount -t cgroup -o none,name=redirect-test-{name} cgroup {dir} \
         && exec \"$0\" install --cgroup {dir} --instance {name}",
        name = sandbox.name(),
        dir = dir.display()
    );
    let out = in_private_mounts(&script);
    let _ = fs::remove_dir(&dir);
    if out.stderr.contains("mount:") {
        redirect_sandbox::skip_or_fail(&format!(
            "this kernel cannot mount a cgroup v1 hierarchy to test with: {}",
            out.stderr.trim()
        ));
        return;
    }
    assert_fails(
        &out,
        1,
        "is a cgroup v1 directory; eBPF capture needs cgroup v2",
    );
    assert!(!sandbox.is_pinned());
}

#[test]
fn missing_cgroup2_mount_is_explained() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    let script = format!(
        "for m in $(awk '$3 == \"cgroup2\" {{print $2}}' /proc/mounts); do umount -l \"$m\" || exit 99; done; \
         exec \"$0\" install --cgroup self-parent --instance {}",
        sandbox.name()
    );
    let out = in_private_mounts(&script);
    assert_fails(&out, 1, "no cgroup v2 hierarchy is mounted");
    assert!(first_line(&out).contains("mount -t cgroup2"), "{out:?}");
    assert!(!sandbox.is_pinned());
}

/// A bpffs of a private mount namespace dies with it and takes the capture
/// along: redirect refuses to mount one there, and to use one mounted
/// there, naming the fix; nothing reaches the node's bpffs. (Mounting on
/// demand in the node's own mount namespace cannot be tested without
/// unmounting the node's bpffs under every other test.)
#[test]
fn a_bpffs_that_is_not_the_nodes_is_refused() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    let install = format!(
        "\"$0\" install --cgroup {cg} --instance {name} --netns {netns}",
        cg = sandbox.pod_cgroup().display(),
        name = sandbox.name(),
        netns = sandbox.pod_netns(),
    );
    // Every bpffs stacked on /sys/fs/bpf goes (a node may have more than one).
    let unmount = "for i in 1 2 3 4 5 6 7 8; do umount -l /sys/fs/bpf 2>/dev/null || break; done";
    let unmounted = in_private_mounts(&format!("{unmount}; {install}"));
    assert_fails(
        &unmounted,
        1,
        "is not mounted at /sys/fs/bpf in this private mount namespace",
    );
    assert!(first_line(&unmounted).contains("mount --bind /proc/1/root/sys/fs/bpf"));
    let private = in_private_mounts(&format!(
        "{unmount}; mount -t bpf bpf /sys/fs/bpf && {install}"
    ));
    assert_fails(&private, 1, "the bpffs at /sys/fs/bpf is not the node's");
    assert!(!sandbox.is_pinned());
    // The node's bpffs seen from a private mount namespace is still the
    // node's: that install is fine.
    let shared = in_private_mounts(&format!(
        "{install} && exec \"$0\" uninstall --instance {}",
        sandbox.name()
    ));
    assert_eq!(shared.code, 0, "{shared:?}");
    assert!(shared.stdout.contains("removed instance"), "{shared:?}");
}

#[test]
fn unprivileged_install_is_refused() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    // A copy the unprivileged user can execute, wherever the checkout is.
    let dir = std::env::temp_dir().join(format!("{}-bin", sandbox.name()));
    fs::create_dir_all(&dir).expect("mkdir");
    let bin: PathBuf = dir.join("redirect");
    // Copied by `cp`: a write descriptor of ours could leak into a child
    // another test thread forks at that moment, and exec would fail with
    // "text file busy".
    let copied = Command::new("cp")
        .arg(redirect_bin())
        .arg(&bin)
        .status()
        .expect("cp");
    assert!(copied.success(), "copying the binary");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    let cg = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let mut cmd = sandbox.command(Net::Pod, Group::Outside, APP, &bin);
    cmd.args(install_here(&sandbox, &cg));
    let out = outcome(&mut cmd).expect("run");
    let _ = fs::remove_dir_all(&dir);
    assert_fails(&out, 1, "permission denied");
    assert!(first_line(&out).contains("CAP_BPF"), "{out:?}");
    assert!(!sandbox.is_pinned());
}

#[test]
fn an_instance_name_of_another_cgroup_is_not_taken_over() {
    require_root!();
    let first = Sandbox::for_tests().expect("sandbox");
    let second = Sandbox::for_tests().expect("sandbox");
    first.install(&[]).expect("install");
    let cg = second.pod_cgroup().to_string_lossy().into_owned();
    let out = redirect(&[
        "install",
        "--cgroup",
        &cg,
        "--instance",
        first.name(),
        "--netns",
        second.pod_netns(),
    ])
    .expect("run");
    assert_fails(&out, 1, "is installed on another cgroup");
    let status = first.status().expect("status");
    assert_eq!(
        status["instances"][0]["cgroup"],
        first.pod_cgroup().to_string_lossy().as_ref()
    );
    first.uninstall().expect("uninstall");
}

#[test]
fn a_failed_install_rolls_back_everything() {
    require_root!();
    let sandbox = Sandbox::with_upstream_and_proxy().expect("sandbox pod");
    // An exclusive connect4 program makes the kernel refuse ours, after the
    // sockops program was already attached and pinned.
    let blocker = Witness::attach_exclusive(sandbox.pod_cgroup()).expect("exclusive witness");
    let cg = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let out = redirect(&install_args(&sandbox, &cg)).expect("run");
    assert_fails(&out, 1, "attaching the connect4 program to the cgroup");
    assert!(
        first_line(&out).contains("exclusively"),
        "names the cause: {out:?}"
    );
    assert!(!sandbox.is_pinned(), "the sockops pin was rolled back");
    let status = redirect(&["status", "--json", "--instance", sandbox.name()]).expect("status");
    assert!(status.stdout.contains("\"instances\": []"), "{status:?}");
    let landed = sandbox.lands(Group::App, APP, UPSTREAM).expect("connect");
    assert_eq!(landed, "upstream", "nothing captures");
    assert_eq!(
        blocker.count().expect("count"),
        1,
        "the other program is untouched"
    );
}

#[test]
fn self_parent_resolves_to_the_pod_cgroup() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    // Run from the pod's `app` child cgroup, as an init container would.
    let mut cmd = sandbox.command(Net::Pod, Group::App, redirect_sandbox::ROOT, redirect_bin());
    cmd.args([
        "install",
        "--cgroup",
        "self-parent",
        "--instance",
        sandbox.name(),
    ]);
    let out = outcome(&mut cmd).expect("run");
    assert_eq!(out.code, 0, "{out:?}");
    let status = sandbox.status().expect("status");
    assert_eq!(
        status["instances"][0]["cgroup"],
        sandbox.pod_cgroup().to_string_lossy().as_ref()
    );
    sandbox.uninstall().expect("uninstall");
}

/// Runs `sh -c SCRIPT` with `$0` = the redirect binary in a private mount
/// namespace, so that unmounting things there affects nothing else.
fn in_private_mounts(script: &str) -> Outcome {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(redirect_bin());
    outcome(&mut cmd).expect("unshare (util-linux)")
}

/// `redirect` under `setpriv` with only the given capabilities (as root, so
/// that file permissions on bpffs are not what is tested), in the pod's
/// network namespace, as an init container runs.
fn with_caps(sandbox: &Sandbox, caps: &str, args: &[&str]) -> Outcome {
    let mut cmd = sandbox.command(Net::Pod, Group::Outside, ROOT, "setpriv");
    // A rejection then carries the verifier's whole log (for the kernel matrix).
    cmd.env("REDIRECT_VERIFIER_LOG", "1")
        .args([
            "--bounding-set",
            &format!("-all,{caps}"),
            "--inh-caps",
            "-all",
            "--",
        ])
        .arg(redirect_bin())
        .args(args);
    outcome(&mut cmd).expect("setpriv (util-linux)")
}

#[test]
fn capture_of_the_node_itself_is_refused() {
    require_root!();
    // Only meaningful where this test runs in the node's own namespace,
    // known as the kernel names it (fixed inode, 6.18+) or as PID 1's.
    let ino = |p: &str| {
        fs::metadata(p)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .ok()
    };
    let own = ino("/proc/self/ns/net");
    let host = own == Some(0xEFFF_FFF9)
        || (ino("/proc/self/ns/pid") == Some(0xEFFF_FFFC) && ino("/proc/1/ns/net") == own);
    if !host {
        redirect_sandbox::skip_or_fail("this test does not run in the node's network namespace");
        return;
    }
    let sandbox = Sandbox::for_tests().expect("sandbox");
    let cg = sandbox.pod_cgroup().to_string_lossy().into_owned();
    // Outbound and inbound alike, run here without --netns.
    for extra in [&[][..], &["-b", "*"]] {
        let mut args = vec!["install", "--cgroup", &cg, "--instance", sandbox.name()];
        args.extend_from_slice(extra);
        let out = redirect(&args).expect("run");
        assert_fails(&out, 1, "this is the node's own network namespace");
        assert!(
            first_line(&out).contains("--netns"),
            "names the fix: {out:?}"
        );
        assert!(!sandbox.is_pinned(), "nothing stays installed");
    }
}

/// Held by the tests whose installs must not wait on a long one: under
/// QEMU, kernel 6.12 verifies every program without CAP_PERFMON for over
/// a minute in `cap_bpf_and_cap_net_admin_are_enough`, holding the node's
/// install lock past another command's 30 s wait.
static LONG_INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn apart_from_the_long_install() -> std::sync::MutexGuard<'static, ()> {
    LONG_INSTALL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn cap_bpf_and_cap_net_admin_are_enough() {
    require_root!();
    let _apart = apart_from_the_long_install();
    let sandbox = Sandbox::with_upstream_and_proxy().expect("sandbox pod");
    let cg = sandbox.pod_cgroup().to_string_lossy().into_owned();
    // What the README tells an init container to grant, and no more: every
    // program must pass the verifier without CAP_SYS_ADMIN (and, from
    // kernel 6.12 on, without CAP_PERFMON).
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut version = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let running = (version.next().unwrap_or(0), version.next().unwrap_or(0));
    let caps = if running >= (6, 12) {
        "+bpf,+net_admin"
    } else {
        "+bpf,+net_admin,+perfmon"
    };
    // Istio's sidecar flags: outbound and inbound programs alike.
    let mut install = install_here(&sandbox, &cg);
    install.extend(["-b", "*", "-d", "15090,15021,15020"]);
    if running < (6, 12) {
        let out = with_caps(&sandbox, "+bpf,+net_admin", &install);
        assert_fails(&out, 1, "also needs CAP_PERFMON");
        assert!(!sandbox.is_pinned());
    }
    let out = with_caps(&sandbox, caps, &install);
    assert_eq!(out.code, 0, "{out:?}");
    // Run again (an init container restarted after its install): the
    // programs are replaced in place, each link's old program held open for
    // a rollback from its own pin, which needs no CAP_SYS_ADMIN.
    let out = with_caps(&sandbox, caps, &install);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        sandbox.lands(Group::App, APP, UPSTREAM).expect("connect"),
        "proxy"
    );
    sandbox
        .start_inbound_listener("original-dst")
        .expect("inbound listener");
    let app = SocketAddrV4::new(POD_IP, 9080);
    assert_eq!(
        sandbox.lands_from_peer(app).expect("connect"),
        app.to_string()
    );
    let status = with_caps(
        &sandbox,
        caps,
        &["status", "--json", "--instance", sandbox.name()],
    );
    assert!(status.stdout.contains("\"redirected\""), "{status:?}");
    let out = with_caps(&sandbox, caps, &["uninstall", "--instance", sandbox.name()]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(!sandbox.is_pinned());
    // With one of the two missing, the refusal names what to grant.
    let out = with_caps(&sandbox, "+bpf", &install_here(&sandbox, &cg));
    assert_fails(&out, 1, "permission denied");
    assert!(!sandbox.is_pinned());
}

#[test]
fn a_failed_upgrade_restores_the_previous_programs_and_config() {
    require_root!();
    let sandbox = Sandbox::with_upstream_and_proxy().expect("sandbox pod");
    sandbox.install(&[]).expect("install");
    let programs = |status: &serde_json::Value| -> Vec<u64> {
        status["instances"][0]["programs"]
            .as_array()
            .expect("programs")
            .iter()
            .map(|p| p["program_id"].as_u64().unwrap_or(0))
            .collect()
    };
    let before = sandbox.status().expect("status");
    // The debug build fails on purpose after replacing the first program.
    let cg = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let mut args = install_args(&sandbox, &cg);
    args.extend_from_slice(&["-p", "15002"]);
    let out = outcome(
        Command::new(redirect_bin())
            .env("REDIRECT_TEST_FAULT", "after-first-link-update")
            .args(&args),
    )
    .expect("run");
    assert_fails(&out, 1, "injected fault");
    let after = sandbox.status().expect("status");
    assert_eq!(
        programs(&after),
        programs(&before),
        "the old programs are back"
    );
    assert_eq!(after["instances"][0]["config"]["proxy_port"], 15001);
    assert_eq!(
        sandbox.lands(Group::App, APP, UPSTREAM).expect("connect"),
        "proxy"
    );
    sandbox.uninstall().expect("uninstall");
}

#[test]
fn inbound_capture_without_sk_lookup_is_refused_with_the_way_out() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    let cg = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let mut args = vec!["--assume-missing", "sk_lookup"];
    args.extend(install_args(&sandbox, &cg));
    args.extend(["-b", "*"]);
    assert_fails(
        &redirect(&args).expect("run"),
        1,
        "inbound capture (-b) needs the sk_lookup hook of kernel 5.9 or later: use `redirect istio-iptables`",
    );
    assert!(!sandbox.is_pinned(), "nothing stays installed");
}

/// `-c` with inbound capture needs sk_lookup's `ingress_ifindex` (kernel
/// 5.17): without it install refuses with the way out, and auto mode takes
/// iptables, saying why.
#[test]
fn excluded_interfaces_with_inbound_capture_without_ingress_ifindex() {
    require_root!();
    let _apart = apart_from_the_long_install();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    let cg = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let mut args = vec!["--assume-missing", "sk_lookup/ingress_ifindex"];
    args.extend(install_args(&sandbox, &cg));
    args.extend(["-b", "*", "-c", "eth0"]);
    assert_fails(
        &redirect(&args).expect("run"),
        1,
        "-c with inbound capture (-b) needs the interface an inbound connection arrived on, \
         which sk_lookup gives from kernel 5.17",
    );
    assert!(!sandbox.is_pinned(), "nothing stays installed");
    // Without inbound capture -c needs nothing more.
    let mut args = vec!["--assume-missing", "sk_lookup/ingress_ifindex"];
    args.extend(install_args(&sandbox, &cg));
    args.extend(["-c", "eth0"]);
    let out = redirect(&args).expect("run");
    assert_eq!(out.code, 0, "{out:?}");
    assert!(sandbox.is_pinned());
    assert_eq!(
        redirect(&["uninstall", "--instance", sandbox.name()])
            .expect("run")
            .code,
        0
    );
    let netns = sandbox.pod_netns().to_owned();
    let auto = |cleanup: bool| {
        let mut args = vec![
            "--assume-missing",
            "sk_lookup/ingress_ifindex",
            "istio-iptables",
            "--ipv6=false",
            "--netns",
            &netns,
            "--cgroup",
            &cg,
            "--instance",
            sandbox.name(),
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
        redirect(&args).expect("run")
    };
    let out = auto(false);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains(
            "auto mode: using iptables, because -c with inbound capture (-b) needs sk_lookup's \
             ingress_ifindex (kernel 5.17), missing here"
        ),
        "{out:?}"
    );
    assert!(!sandbox.is_pinned());
    assert_eq!(auto(true).code, 0);
}
