//! `redirect node install|uninstall|status` on scratch CNI directories:
//! the plugin copied in and runnable as `redirect-cni`, chained after the
//! plugins of the file the runtime reads (a `.conf` turned into a
//! `.conflist`), installing again replacing its entry, uninstall restoring
//! the configuration and removing the plugin, and bad directories refused
//! in one line.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use redirect_sandbox::cli::{Outcome, redirect};
use serde_json::{Value, json};

const BRIDGE: &str = r#"{"cniVersion":"1.0.0","name":"pods","plugins":[
    {"type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.88.0.0/16"}},
    {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

/// Scratch bin and conf dirs, removed on drop.
struct Dirs(PathBuf);

impl Dirs {
    fn new(name: &str) -> Self {
        let root =
            std::env::temp_dir().join(format!("redirect-node-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("bin")).expect("bin dir");
        fs::create_dir_all(root.join("net.d")).expect("conf dir");
        Self(root)
    }
    fn bin(&self) -> PathBuf {
        self.0.join("bin")
    }
    fn conf(&self) -> PathBuf {
        self.0.join("net.d")
    }
    fn node(&self, action: &str, extra: &[&str]) -> Outcome {
        let (bin, conf) = (self.bin(), self.conf());
        let mut args = vec!["node", action, "--cni-bin-dir"];
        args.push(bin.to_str().expect("utf-8 path"));
        args.push("--cni-conf-dir");
        args.push(conf.to_str().expect("utf-8 path"));
        args.extend(extra);
        redirect(&args).expect("redirect node")
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn json_of(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).expect("conf")).expect("JSON")
}

#[test]
fn install_chains_the_plugin_and_uninstall_restores_the_configuration() {
    let dirs = Dirs::new("chain");
    let list = dirs.conf().join("10-pods.conflist");
    fs::write(&list, BRIDGE).expect("conflist");
    // Not the runtime's file: later in name order.
    fs::write(dirs.conf().join("99-other.conflist"), BRIDGE).expect("other");

    let out = dirs.node(
        "install",
        &[
            "--pod-cgroup-root",
            "/sys/fs/cgroup/kubepods",
            "--kubeconfig",
            "/etc/cni/net.d/redirect-cni.kubeconfig",
        ],
    );
    assert!(out.ok(), "{out:?}");
    let conf = json_of(&list);
    let plugins = conf["plugins"].as_array().expect("plugins");
    assert_eq!(plugins.len(), 3);
    assert_eq!(
        plugins[2],
        json!({
            "type": "redirect-cni",
            "mode": "auto",
            "exclude_namespaces": ["kube-system"],
            "proxy": {"uid": 1337, "gid": 1337},
            "pod_cgroup_root": "/sys/fs/cgroup/kubepods",
            "kubeconfig": "/etc/cni/net.d/redirect-cni.kubeconfig",
            "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        })
    );
    assert_eq!(
        json_of(&dirs.conf().join("99-other.conflist")),
        serde_json::from_str::<Value>(BRIDGE).unwrap()
    );
    // The plugin runs as a runtime runs it.
    let version = Command::new(dirs.bin().join("redirect-cni"))
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .expect("redirect-cni");
    let said: Value = serde_json::from_slice(&version.stdout).expect("VERSION's JSON");
    assert!(
        said["supportedVersions"]
            .as_array()
            .is_some_and(|v| v.contains(&json!("1.0.0")))
    );
    let status = dirs.node("status", &[]);
    assert!(
        status.ok() && status.stdout.contains("chained  yes"),
        "{status:?}"
    );

    // Again, with another mode: one entry, the new one.
    let out = dirs.node("install", &["--mode", "ebpf"]);
    assert!(out.ok(), "{out:?}");
    let conf = json_of(&list);
    assert_eq!(conf["plugins"].as_array().map(Vec::len), Some(3));
    assert_eq!(conf["plugins"][2]["mode"], "ebpf");

    let out = dirs.node("uninstall", &[]);
    assert!(out.ok(), "{out:?}");
    assert_eq!(
        json_of(&list),
        serde_json::from_str::<Value>(BRIDGE).unwrap()
    );
    assert!(!dirs.bin().join("redirect-cni").exists());
    let again = dirs.node("uninstall", &[]);
    assert!(
        again.ok() && again.stdout.contains("not installed"),
        "{again:?}"
    );
    let status = dirs.node("status", &[]);
    assert!(
        status.ok() && status.stdout.contains("absent"),
        "{status:?}"
    );
}

#[test]
fn a_single_plugin_conf_becomes_a_conflist() {
    let dirs = Dirs::new("single");
    let single = dirs.conf().join("10-net.conf");
    fs::write(
        &single,
        r#"{"cniVersion":"0.4.0","name":"net","type":"bridge"}"#,
    )
    .expect("conf");
    let out = dirs.node("install", &[]);
    assert!(out.ok(), "{out:?}");
    assert!(!single.exists());
    let conf = json_of(&dirs.conf().join("10-net.conflist"));
    assert_eq!(conf["cniVersion"], "0.4.0");
    assert_eq!(conf["plugins"][0]["type"], "bridge");
    assert_eq!(conf["plugins"][1]["type"], "redirect-cni");
    assert!(dirs.node("uninstall", &[]).ok());
}

#[test]
fn directories_it_cannot_use_are_refused_in_one_line() {
    let dirs = Dirs::new("bad");
    // No network configuration yet: nothing to chain after, nothing placed.
    let out = dirs.node("install", &[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("no CNI network configuration"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(!dirs.bin().join("redirect-cni").exists());
    // A conf dir that is not one.
    let out =
        redirect(&["node", "install", "--cni-conf-dir", "/nonexistent/net.d"]).expect("redirect");
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("is not a directory"), "{}", out.stderr);
    // A configuration that is not JSON.
    fs::write(dirs.conf().join("10-broken.conflist"), "{").expect("conf");
    let out = dirs.node("install", &[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("not JSON"), "{}", out.stderr);
    assert!(!dirs.bin().join("redirect-cni").exists());
}

/// A running `redirect node run`, killed when dropped (also when the test
/// fails), its stdout lines read on a thread.
struct Agent {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Agent {
    fn start(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .expect("redirect node run");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The first line it prints that contains `text`, within 30 s.
    fn line_with(&self, text: &str) -> Option<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(text) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// SIGTERM, and how it exited (within 30 s, else it is killed).
    fn stop(mut self) -> Option<std::process::ExitStatus> {
        // SAFETY: signalling the child this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP GET of `path` from `addr`: the status line and the body.
fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

#[test]
fn the_node_agent_installs_and_serves_every_instances_counters() {
    redirect_sandbox::require_root!();
    let dirs = Dirs::new("agent");
    fs::write(dirs.conf().join("10-pods.conflist"), BRIDGE).expect("conflist");
    // A pod with an instance and one redirected connection.
    let sandbox = redirect_sandbox::Sandbox::with_upstream_and_proxy().expect("sandbox");
    sandbox.install(&[]).expect("install");
    let upstream = redirect_sandbox::cli::UPSTREAM;
    sandbox
        .lands(
            redirect_sandbox::Group::App,
            redirect_sandbox::APP,
            upstream,
        )
        .expect("connect");

    // And, where the kernel can have one, a node set the agent loads,
    // with the peer namespace in it as a pod.
    let set = format!("{}-set", sandbox.name());
    let with_set = redirect_sandbox::cli::feature_present("helper/get_netns_cookie");
    let _unload = redirect_sandbox::cli::UnloadSet(set.clone());
    let mut agent_cmd = Command::new(redirect_sandbox::cli::redirect_bin());
    agent_cmd
        .args(["node", "run", "--cni-bin-dir"])
        .arg(dirs.bin())
        .arg("--cni-conf-dir")
        .arg(dirs.conf())
        .args(["--metrics-listen", "127.0.0.1:0", "--gc-interval", "3600"])
        .stdin(Stdio::null());
    if with_set {
        agent_cmd
            .args(["--node-set", &set, "--node-set-cgroup"])
            .arg(sandbox.pod_cgroup());
    }
    let agent = Agent::start(&mut agent_cmd);
    let addr = agent
        .line_with("http://")
        .and_then(|line| {
            line.split("http://")
                .nth(1)
                .and_then(|rest| rest.split('/').next())
                .map(str::to_owned)
        })
        .expect("the agent says where its metrics are");
    let chained = fs::read_to_string(dirs.conf().join("10-pods.conflist")).expect("conflist");
    if with_set {
        let peer = sandbox.netns_path(redirect_sandbox::Net::Peer);
        let out = redirect_sandbox::cli::redirect(&[
            "node-set",
            "add",
            "--set",
            &set,
            "--instance",
            "agent-pod",
            "--netns",
            &peer,
            "-i",
            "*",
        ])
        .expect("node-set add");
        assert!(out.ok(), "{out:?}");
    }
    let (status, body) = http_get(&addr, "/metrics");
    let (missing, _) = http_get(&addr, "/");
    let exit = agent.stop().expect("the agent stops on SIGTERM");
    assert!(chained.contains("redirect-cni"), "{chained}");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    let line = format!(
        "redirect_decisions_total{{instance=\"{}\",decision=\"redirected\"}} 1",
        sandbox.name()
    );
    assert!(body.lines().any(|l| l == line), "{line} in\n{body}");
    assert!(body.contains("# TYPE redirect_instances gauge"), "{body}");
    if with_set {
        for line in [
            format!(
                "redirect_decisions_total{{instance=\"agent-pod\",node_set=\"{set}\",decision=\"redirected\"}} 0"
            ),
            format!("redirect_node_set_pods{{node_set=\"{set}\"}} 1"),
        ] {
            assert!(body.lines().any(|l| l == line), "{line} in\n{body}");
        }
    }
    assert_eq!(missing, "HTTP/1.1 404 Not Found");
    assert!(exit.success(), "{exit:?}");
    // The plugin stays chained after the agent stops.
    let after = fs::read_to_string(dirs.conf().join("10-pods.conflist")).expect("conflist");
    assert!(after.contains("redirect-cni"));
    assert!(dirs.node("uninstall", &[]).ok());
}

/// A service account as Kubernetes mounts it, with token `token`.
fn service_account(dir: &Path, token: &str) {
    fs::create_dir_all(dir).expect("service account dir");
    fs::write(dir.join("token"), token).expect("token");
    fs::write(
        dir.join("ca.crt"),
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .expect("ca.crt");
}

/// `redirect node ACTION` on `dirs` with the API server's address in the
/// environment, as in a pod.
fn node_in_pod(dirs: &Dirs, action: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(redirect_sandbox::cli::redirect_bin());
    cmd.args(["node", action, "--cni-bin-dir"])
        .arg(dirs.bin())
        .arg("--cni-conf-dir")
        .arg(dirs.conf())
        .args(extra)
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .env("KUBERNETES_SERVICE_PORT", "443")
        .stdin(Stdio::null());
    cmd
}

#[test]
fn the_agent_writes_the_plugin_a_kubeconfig_from_its_service_account() {
    let dirs = Dirs::new("account");
    let list = dirs.conf().join("10-pods.conflist");
    fs::write(&list, BRIDGE).expect("conflist");
    let account = dirs.0.join("serviceaccount");
    let account_arg = account.to_str().expect("utf-8 path");

    // No token mounted: refused in one line, nothing placed.
    let out = redirect_sandbox::cli::outcome(&mut node_in_pod(
        &dirs,
        "install",
        &["--service-account-dir", account_arg],
    ))
    .expect("node install");
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    assert!(
        out.stderr.contains("is not a service account directory"),
        "{out:?}"
    );
    assert!(!dirs.bin().join("redirect-cni").exists());
    assert_eq!(fs::read_to_string(&list).expect("conflist"), BRIDGE);

    service_account(&account, "first-token\n");
    let out = redirect_sandbox::cli::outcome(&mut node_in_pod(
        &dirs,
        "install",
        &[
            "--service-account-dir",
            account_arg,
            "--host-cni-conf-dir",
            "/etc/cni/net.d",
        ],
    ))
    .expect("node install");
    assert!(out.ok(), "{out:?}");
    let entry = &json_of(&list)["plugins"][2];
    // The plugin, on the host, reads it where the host has it.
    assert_eq!(
        entry["kubeconfig"],
        "/etc/cni/net.d/redirect-cni.kubeconfig"
    );
    let kubeconfig = dirs.conf().join("redirect-cni.kubeconfig");
    let text = fs::read_to_string(&kubeconfig).expect("kubeconfig");
    assert!(text.contains("server: https://10.96.0.1:443"), "{text}");
    assert!(text.contains("token: first-token\n"), "{text}");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = fs::metadata(&kubeconfig)
        .expect("kubeconfig")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    if redirect_sandbox::missing_privilege().is_none() {
        // The agent follows the token's rotation.
        let agent = Agent::start(&mut node_in_pod(
            &dirs,
            "run",
            &[
                "--service-account-dir",
                account_arg,
                "--metrics-listen",
                "127.0.0.1:0",
                "--gc-interval",
                "1",
            ],
        ));
        // Once it runs (its install wrote the first token), rotate.
        let running = agent.line_with("metrics on").is_some();
        let before = fs::read_to_string(&kubeconfig).expect("kubeconfig");
        service_account(&account, "rotated-token");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut rotated = false;
        while !rotated && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(200));
            rotated =
                fs::read_to_string(&kubeconfig).is_ok_and(|t| t.contains("token: rotated-token\n"));
        }
        let exit = agent.stop().expect("the agent stops on SIGTERM");
        assert!(running, "the agent started");
        assert!(before.contains("token: first-token\n"), "{before}");
        assert!(rotated, "the kubeconfig follows the rotated token");
        assert!(exit.success(), "{exit:?}");
    }

    let out = dirs.node("uninstall", &[]);
    assert!(out.ok(), "{out:?}");
    assert!(out.stdout.contains("removed"), "{out:?}");
    assert!(!kubeconfig.exists(), "uninstall removes the kubeconfig");
    let bridge: Value = serde_json::from_str(BRIDGE).expect("JSON");
    assert_eq!(json_of(&list), bridge);
    // An operator's own file of that name (for --kubeconfig) stays.
    fs::write(&kubeconfig, "apiVersion: v1\nkind: Config\n").expect("own kubeconfig");
    assert!(dirs.node("uninstall", &[]).ok());
    assert!(
        kubeconfig.exists(),
        "uninstall leaves a kubeconfig it did not write"
    );
}

#[test]
fn concurrent_installs_all_succeed_and_chain_the_plugin_once() {
    // A DaemonSet's rolling update can run two agents' installs at once.
    let dirs = Dirs::new("concurrent");
    let list = dirs.conf().join("10-pods.conflist");
    fs::write(&list, BRIDGE).expect("conflist");
    let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| dirs.node("install", &[])))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("install thread"))
            .collect()
    });
    for out in &outcomes {
        assert!(out.ok(), "{out:?}");
    }
    let plugins = json_of(&list)["plugins"]
        .as_array()
        .expect("plugins")
        .clone();
    let ours = plugins
        .iter()
        .filter(|p| p["type"] == "redirect-cni")
        .count();
    assert_eq!((plugins.len(), ours), (3, 1), "{plugins:?}");
    assert!(dirs.bin().join("redirect-cni").is_file());
    let stray: Vec<String> = fs::read_dir(dirs.conf())
        .expect("conf dir")
        .chain(fs::read_dir(dirs.bin()).expect("bin dir"))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".redirect-tmp"))
        .collect();
    assert!(stray.is_empty(), "temporary files left: {stray:?}");
}

/// `node install --node-set`: the set loaded once on the pods' cgroup and
/// named in the plugin's entry (and unloaded again when the install fails
/// after loading it); installing again finds it loaded;
/// uninstall leaves it (its pods keep their capture) until `node-set
/// unload`. Where the kernel cannot have one, the entry names none and
/// install says why.
#[test]
fn install_with_a_node_set_loads_it_once_and_names_it_to_the_plugin() {
    redirect_sandbox::require_root!();
    let sandbox = redirect_sandbox::Sandbox::for_tests().expect("sandbox");
    let dirs = Dirs::new("set");
    fs::write(dirs.conf().join("10-pods.conflist"), BRIDGE).expect("conf");
    let set = format!("{}-set", sandbox.name());
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let args = [
        "--node-set",
        set.as_str(),
        "--node-set-cgroup",
        cgroup.as_str(),
    ];
    let pinned = || {
        Path::new(redirect_sandbox::PIN_ROOT)
            .join(format!("@set-{set}"))
            .is_dir()
    };
    let unload = || redirect(&["node-set", "unload", "--set", &set]).expect("unload");
    let present = redirect_sandbox::cli::feature_present("helper/get_netns_cookie");
    // An install that fails after loading the set (the plugin's place is
    // a directory) takes the set back.
    let blocker = dirs.bin().join("redirect-cni");
    fs::create_dir(&blocker).expect("blocker");
    let failed = dirs.node("install", &args);
    let left_by_failure = pinned();
    fs::remove_dir(&blocker).expect("blocker removed");
    let first = dirs.node("install", &args);
    let second = dirs.node("install", &args);
    let entry = json_of(&dirs.conf().join("10-pods.conflist"))["plugins"][2].clone();
    let status = dirs.node("status", &[]);
    let uninstall = dirs.node("uninstall", &[]);
    let left = pinned();
    // Installed again, then the set unloaded under the entry naming it.
    let reinstall = dirs.node("install", &args);
    let unloaded = unload();
    let orphaned = dirs.node("status", &[]);
    let _ = dirs.node("uninstall", &[]);
    assert!(
        failed.code == 1 && failed.stderr.contains("placing") && failed.stderr.lines().count() == 1,
        "{failed:?}"
    );
    assert!(
        !left_by_failure,
        "a failed install left node set {set} loaded"
    );
    assert!(first.ok() && second.ok(), "{first:?} {second:?}");
    assert!(reinstall.ok(), "{reinstall:?}");
    assert!(uninstall.ok(), "{uninstall:?}");
    if present {
        assert_eq!(entry["node_set"], json!(set), "{entry}");
        assert!(
            first.stdout.contains(&format!("in node set {set}")),
            "{first:?}"
        );
        assert!(left, "uninstall leaves the set");
        assert!(unloaded.stdout.contains("unloaded"), "{unloaded:?}");
        assert!(
            status.ok()
                && status
                    .stdout
                    .contains(&format!("node set {set}: loaded, 0 pods")),
            "{status:?}"
        );
        assert!(
            orphaned.code == 1
                && orphaned
                    .stdout
                    .contains(&format!("node set {set}: not loaded")),
            "{orphaned:?}"
        );
    } else {
        assert!(entry.get("node_set").is_none(), "{entry}");
        assert!(first.stdout.contains("no node set here"), "{first:?}");
        assert!(!left);
    }
    assert!(!pinned());
}
