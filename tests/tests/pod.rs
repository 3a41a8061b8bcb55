//! The sidecar init step, for real: podman runs a pod whose init container
//! (the `redirect` image) runs Istio's init command line, then a proxy
//! container (UID 1337, reading SO_ORIGINAL_DST on 15001 and 15006) and an
//! app container. Run by `cargo xtask pod-test`, which builds the image and
//! passes it in `REDIRECT_IMAGE` (with podman's settings in
//! `CONTAINERS_CONF`); ignored by a plain `cargo test`.
//!
//! podman 4.3 cannot put a pod in a network namespace the test made, so
//! the test plays the CNI plugin's part: the pod gets no network from
//! podman, and before the init container runs, the test wires a veth pair
//! from the sandbox's peer namespace into the pod's namespace (the infra
//! container's), with addresses on both ends.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use redirect_sandbox::{
    APP, Group, Net, Sandbox,
    cgroup::cgroup2_mount,
    cli::{ISTIO_SIDECAR_ARGS, Outcome, outcome, redirect, redirect_bin},
    require_root,
};

/// Where the agent is mounted in the pod's test containers.
const AGENT: &str = "/agent";

/// The image under test and podman's settings, or why the test cannot run.
fn image() -> Result<String, String> {
    std::env::var("REDIRECT_IMAGE").map_err(|_| {
        "REDIRECT_IMAGE is not set: run the pod tests with `cargo xtask pod-test`".to_owned()
    })
}

fn podman(args: &[&str]) -> Outcome {
    outcome(Command::new("podman").args(args)).expect("run podman (install podman)")
}

fn ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(out.ok(), "podman {args:?}: {out:?}");
    out.stdout.trim().to_owned()
}

/// A podman pod, removed (with its redirect instance, if a test failed
/// before removing it) when dropped.
struct Pod {
    name: String,
    id: String,
    image: String,
}

impl Pod {
    fn create(name: &str, image: &str) -> Self {
        let _ = podman(&["pod", "rm", "--force", "--time", "0", name]);
        let id = ok(&[
            "pod",
            "create",
            "--name",
            name,
            "--network",
            "none",
            "--infra-image",
            image,
            "--infra-command",
            "/pause",
        ]);
        Self {
            name: name.to_owned(),
            id,
            image: image.to_owned(),
        }
    }

    /// Starts the infra container; returns its PID (the pod's namespaces).
    fn start_infra(&self) -> u32 {
        let infra = ok(&[
            "pod",
            "inspect",
            &self.name,
            "--format",
            "{{.InfraContainerID}}",
        ]);
        ok(&["start", &infra]);
        ok(&["inspect", &infra, "--format", "{{.State.Pid}}"])
            .parse()
            .expect("infra PID")
    }

    /// The pod's cgroup, where the kubelet-like layout puts its containers.
    fn cgroup(&self) -> PathBuf {
        cgroup2_mount()
            .expect("cgroup2")
            .join("libpod_parent")
            .join(&self.id)
    }

    /// Runs an init container to completion with `options` and `args`.
    fn init(&self, options: &[&str], args: &[&str]) -> Outcome {
        let name = format!("{}-init", self.name);
        let mut all = vec!["run", "--rm", "--pod", &self.name, "--name", &name];
        all.extend_from_slice(options);
        all.push(&self.image);
        all.extend_from_slice(args);
        podman(&all)
    }

    /// Starts a long-running container running the sandbox agent as `user`
    /// and waits until it says "ready".
    fn start(&self, name: &str, user: &str, agent: &[&str]) -> String {
        let ctr = format!("{}-{name}", self.name);
        // The shipped image has no test agent: the workspace's build (with
        // the `sandbox` feature) is mounted in, on the image's libraries.
        let mount = format!("{}:{AGENT}:ro", redirect_bin().display());
        let mut all = vec![
            "run",
            "--detach",
            "--pod",
            &self.name,
            "--name",
            &ctr,
            "--user",
            user,
            "--volume",
            &mount,
            "--entrypoint",
            AGENT,
        ];
        all.push(&self.image);
        all.push("sandbox-agent");
        all.extend_from_slice(agent);
        ok(&all);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !podman(&["logs", &ctr]).stdout.contains("ready") {
            assert!(Instant::now() < deadline, "{ctr} did not become ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        ctr
    }

    /// What one connection from container `ctr` to `to` lands on.
    fn connect_from(&self, ctr: &str, to: SocketAddrV4) -> String {
        ok(&[
            "exec",
            ctr,
            AGENT,
            "sandbox-agent",
            "connect",
            "--to",
            &to.to_string(),
        ])
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let cgroup = self.cgroup().to_string_lossy().into_owned();
        let _ = redirect(&["uninstall", "--cgroup", &cgroup]);
        let _ = podman(&["pod", "rm", "--force", "--time", "0", &self.name]);
        remove_cgroup_tree(&self.cgroup());
    }
}

/// Removes what podman leaves of a deleted pod's cgroup. On this hybrid
/// host (cgroup v1 controllers, cgroup2 at /sys/fs/cgroup/unified) podman
/// with runc removes the pod's v1 cgroups but leaves its empty cgroup2
/// directories; a kubelet removes the pod cgroup, so the test does too.
fn remove_cgroup_tree(dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Runs `program args` in the network namespace of process `pid`.
fn in_netns(pid: u32, program: &str, args: &[&str]) -> Outcome {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/proc/{pid}/ns/net"))
        .arg(program)
        .args(args);
    outcome(&mut cmd).expect("nsenter (util-linux)")
}

/// The pod's network: a veth pair from the sandbox's peer namespace (the
/// rest of the network) into the pod's namespace. Returns (pod, peer)
/// addresses.
fn wire(sandbox: &Sandbox, pid: u32, subnet: u8) -> (Ipv4Addr, Ipv4Addr) {
    let pod = Ipv4Addr::new(198, 19, subnet, 1);
    let peer = Ipv4Addr::new(198, 19, subnet, 2);
    sandbox
        .ip_batch(
            Net::Peer,
            &format!(
                "link add pod{subnet} type veth peer name eth0 netns {pid}\n\
                 addr add {peer}/24 dev pod{subnet}\n\
                 link set pod{subnet} up\n"
            ),
        )
        .expect("veth into the pod");
    for args in [
        &["addr", "add", &format!("{pod}/24"), "dev", "eth0"][..],
        &["link", "set", "eth0", "up"],
        &["link", "set", "lo", "up"],
    ] {
        let out = in_netns(pid, "ip", args);
        assert!(out.ok(), "ip {args:?}: {out:?}");
    }
    (pod, peer)
}

/// The rules of the pod's nat table.
fn nat_rules(pid: u32) -> Vec<String> {
    let out = in_netns(pid, "iptables-nft-save", &["-t", "nat"]);
    out.stdout
        .lines()
        .filter(|l| l.starts_with("-A"))
        .map(str::to_owned)
        .collect()
}

fn kernel_before_6_12() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = release
        .split(['.', '-'])
        .map(|p| p.trim().parse::<u32>().unwrap_or(0));
    (v.next().unwrap_or(0), v.next().unwrap_or(0)) < (6, 12)
}

/// One pod through its whole life with Istio's init command line in
/// `mode`; `init_options` are the init container's privileges and mounts.
fn pod_lifecycle(mode: &str, subnet: u8) {
    require_root!();
    let image = match image() {
        Ok(image) => image,
        Err(why) => {
            redirect_sandbox::skip_or_fail(&why);
            return;
        }
    };
    let sandbox = Sandbox::for_tests().expect("sandbox");
    let pod = Pod::create(&format!("rdr-{}-{mode}", sandbox.name()), &image);
    let infra = pod.start_infra();
    let (pod_ip, peer_ip) = wire(&sandbox, infra, subnet);
    let upstream = SocketAddrV4::new(peer_ip, 8080);
    sandbox
        .serve(Net::Peer, Group::Outside, APP, upstream, "upstream")
        .expect("upstream");

    let mut args = vec!["istio-iptables"];
    args.extend_from_slice(ISTIO_SIDECAR_ARGS);
    if mode == "nftables" {
        // Istio's native nftables mode, as its injector passes it.
        args.extend(["--mode", "iptables", "--native-nftables"]);
    } else {
        args.extend(["--mode", mode]);
    }
    let cgroup2 = cgroup2_mount().expect("cgroup2");
    let cgroup_volume = format!("{0}:{0}", cgroup2.display());
    let perfmon = if kernel_before_6_12() { ",PERFMON" } else { "" };
    let ebpf_caps = format!("BPF,NET_ADMIN{perfmon}");
    let ebpf_caps_admin = format!("{ebpf_caps},SYS_ADMIN");
    let ebpf_init = |caps: &str, bpffs: bool| {
        let mut options = vec![
            "--cgroupns",
            "host",
            "--cap-drop",
            "all",
            "--cap-add",
            caps,
            "--volume",
            &cgroup_volume,
        ];
        if bpffs {
            options.extend(["--volume", "/sys/fs/bpf:/sys/fs/bpf"]);
        }
        pod.init(&options, &args)
    };
    let init = if mode == "ebpf" {
        // What is missing is named: the seccomp gate on bpf() (the default
        // profile allows it only with CAP_SYS_ADMIN), then the bpffs mount.
        let out = ebpf_init(&ebpf_caps, true);
        assert_eq!(out.code, 1, "{out:?}");
        assert!(
            out.stderr.contains("a seccomp profile blocks it"),
            "{out:?}"
        );
        let out = ebpf_init(&ebpf_caps_admin, false);
        assert_eq!(out.code, 1, "{out:?}");
        assert!(
            out.stderr
                .contains("the host's bpffs is not mounted at /sys/fs/bpf"),
            "{out:?}"
        );
        ebpf_init(&ebpf_caps_admin, true)
    } else {
        // Istio's own init container privileges.
        pod.init(
            &["--cap-drop", "all", "--cap-add", "NET_ADMIN,NET_RAW"],
            &args,
        )
    };
    assert_eq!(init.code, 0, "init container: {init:?}");
    let expected = match mode {
        "ebpf" => "with eBPF",
        "nftables" => "applied the Istio rules (nftables",
        _ => "applied the Istio rules (iptables-",
    };
    assert!(init.stdout.contains(expected), "{init:?}");

    // The init container has exited; the proxy and the app start.
    pod.start(
        "proxy",
        "1337:1337",
        &[
            "serve",
            "--listen",
            "0.0.0.0:15001,0.0.0.0:15006",
            "--report",
            "original-dst",
        ],
    );
    let app = pod.start(
        "app",
        "1000:1000",
        &["serve", "--listen", "0.0.0.0:9080", "--reply", "app"],
    );

    // Outbound: the app's call reaches the proxy, which learns where it went.
    assert_eq!(pod.connect_from(&app, upstream), format!("1\t{upstream}"));
    // Inbound: a call from the network to the app's port reaches 15006.
    let inbound = SocketAddrV4::new(pod_ip, 9080);
    assert_eq!(
        sandbox.lands_from_peer(inbound).expect("connect"),
        inbound.to_string()
    );
    // -d ports are not captured (nothing listens on 15021 here).
    assert_eq!(
        sandbox
            .lands_from_peer(SocketAddrV4::new(pod_ip, 15021))
            .expect("connect"),
        "error: connection refused"
    );

    let rules = nat_rules(infra);
    let cgroup = pod.cgroup().to_string_lossy().into_owned();
    if mode == "nftables" {
        assert_eq!(rules, Vec::<String>::new(), "no iptables rule");
        let tables = in_netns(infra, "nft", &["list", "tables"]).stdout;
        assert!(tables.contains("inet istio-proxy-nat"), "{tables}");
    } else if mode == "ebpf" {
        assert_eq!(rules, Vec::<String>::new(), "no nat rule in eBPF mode");
        let status = redirect(&["status", "--json"]).expect("status");
        assert!(
            status.stdout.contains(&cgroup),
            "instance on the pod cgroup: {status:?}"
        );
    } else {
        assert!(
            rules.iter().any(|r| r.contains("ISTIO_REDIRECT")),
            "{rules:?}"
        );
    }

    // Deleting the pod: the cgroup goes, its links go defunct, and gc
    // removes the pins; nothing stays attached or pinned.
    ok(&["pod", "rm", "--force", "--time", "0", &pod.name]);
    remove_cgroup_tree(&pod.cgroup());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let gc = redirect(&["gc"]).expect("gc");
        assert!(gc.ok(), "{gc:?}");
        let status = redirect(&["status", "--json"]).expect("status");
        if !status.stdout.contains(&cgroup) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pod's instance stays: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!pod.cgroup().exists(), "the pod cgroup is gone");
}

#[test]
#[ignore = "needs the image: run with `cargo xtask pod-test`"]
fn pod_ebpf_mode() {
    pod_lifecycle("ebpf", 101);
}

#[test]
#[ignore = "needs the image: run with `cargo xtask pod-test`"]
fn pod_iptables_mode() {
    pod_lifecycle("iptables", 102);
}

#[test]
#[ignore = "needs the image: run with `cargo xtask pod-test`"]
fn pod_nftables_mode() {
    pod_lifecycle("nftables", 103);
}
