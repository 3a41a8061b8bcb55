//! End-to-end tests of the original destination (issue: SO_ORIGINAL_DST and
//! getpeername): a real transparent proxy (squid) and a Rust test proxy
//! learn where each redirected connection was going, exactly as they do
//! behind iptables REDIRECT.

use std::{
    fs,
    net::SocketAddrV4,
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use redirect_sandbox::{
    APP, Group, Net, PEER_IP, POD_IP, PROXY, ROOT, Sandbox,
    agent::Tally,
    cli::{PROXY_ADDR, UPSTREAM, counter, observe_one, redirect},
    peer_ip, require_root,
};

/// A sandbox with the upstream server and the original-dst test proxy.
fn pod_with_orig_dst_proxy() -> Sandbox {
    Sandbox::with_upstream_and_orig_dst_proxy().expect("sandbox pod")
}

fn check(
    sandbox: &Sandbox,
    targets: &[SocketAddrV4],
    count: usize,
    concurrent: bool,
    direct: Option<SocketAddrV4>,
) -> Tally {
    let list: Vec<String> = targets.iter().map(ToString::to_string).collect();
    let list = list.join(",");
    let count = count.to_string();
    let direct = direct.map(|d| d.to_string());
    let mut args = vec!["check", "--to", &list, "--count", &count];
    if concurrent {
        args.push("--concurrent");
    }
    if let Some(direct) = &direct {
        args.extend(["--direct", direct]);
    }
    Tally::parse(&sandbox.agent_output(Group::App, APP, &args).expect("check")).expect("tally")
}

/// 50 distinct original destinations: different addresses and ports.
fn fifty_destinations() -> Vec<SocketAddrV4> {
    (1..=50u8)
        .map(|i| SocketAddrV4::new(peer_ip(i), 8000 + u16::from(i)))
        .collect()
}

#[test]
fn concurrent_connections_each_learn_their_own_original_destination() {
    require_root!();
    let sandbox = pod_with_orig_dst_proxy();
    sandbox.install(&[]).expect("install");
    let tally = check(&sandbox, &fifty_destinations(), 2000, true, None);
    assert_eq!(
        tally.get("ok"),
        2000,
        "zero mix-ups, zero misses: {tally:?}"
    );
    let status = sandbox.status().expect("status");
    assert_eq!(counter(&status, "orig_dst_answered"), 2000);
    assert_eq!(counter(&status, "orig_dst_missed"), 0);
    sandbox.uninstall().expect("uninstall");
}

#[test]
fn churn_with_reused_ports_never_gets_a_stale_answer() {
    require_root!();
    let sandbox = pod_with_orig_dst_proxy();
    // 100 ephemeral ports for 20,000 connections: each port is reused ~200
    // times, each time towards another destination.
    let mut sh = sandbox.command(Net::Pod, Group::Outside, ROOT, "sh");
    sh.args([
        "-c",
        "echo '40000 40099' > /proc/sys/net/ipv4/ip_local_port_range",
    ]);
    assert!(sh.status().expect("sysctl").success());
    sandbox.install(&[]).expect("install");
    // Every other connection goes straight to the proxy on a port the
    // previous, redirected one just used: if that one's record outlived it,
    // the proxy would read a stale original destination.
    let tally = check(
        &sandbox,
        &fifty_destinations()[..7],
        20_000,
        false,
        Some(PROXY_ADDR),
    );
    assert_eq!(tally.get("ok"), 10_000, "{tally:?}");
    assert_eq!(tally.get("direct-ok"), 10_000, "no stale answer: {tally:?}");
    let status = sandbox.status().expect("status");
    assert_eq!(counter(&status, "tuple_recorded"), 10_000);
    let tracked = &status["instances"][0]["tracked"];
    assert!(
        tracked["handshakes"].as_u64().is_some_and(|n| n <= 5),
        "the maps stay bounded: {tracked}"
    );
    sandbox.uninstall().expect("uninstall");
}

#[test]
fn getpeername_shows_the_original_destination_to_the_app_only() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    sandbox
        .serve(Net::Peer, Group::Outside, APP, UPSTREAM, "upstream")
        .expect("upstream");
    // The proxy reports its accepted socket's peer: the app's real address.
    sandbox.start_reporting_proxy("peer").expect("test proxy");
    sandbox.install(&[]).expect("install");
    let to = UPSTREAM.to_string();
    let app = sandbox
        .agent_output(Group::App, APP, &["connect", "--to", &to, "--peer"])
        .expect("app");
    let app = Tally::parse(&app).expect("tally");
    let (line, _) = app.0.iter().next().expect("one connection");
    assert!(
        line.starts_with(&format!("peer={UPSTREAM} {POD_IP}:")),
        "the app sees {UPSTREAM}; the proxy sees the app's own address, as with iptables: {line}"
    );
    let own = sandbox
        .agent_output(Group::Proxy, PROXY, &["connect", "--to", &to, "--peer"])
        .expect("proxy's own connection");
    assert_eq!(own.trim(), format!("1\tpeer={UPSTREAM} upstream"));
    let status = sandbox.status().expect("status");
    assert_eq!(counter(&status, "peername_restored"), 1);
    sandbox.uninstall().expect("uninstall");
}

#[test]
fn unrelated_getsockopt_calls_are_untouched() {
    require_root!();
    let sandbox = pod_with_orig_dst_proxy();
    // A filter table far larger than a page: iptables-legacy-save reads it
    // with getsockopt(IPT_SO_GET_ENTRIES) and a buffer of that size.
    let rules: String = (0..300)
        .map(|i| {
            format!(
                "-A INPUT -s 10.{}.{}.0/24 -p tcp --dport {} -j ACCEPT\n",
                i / 250,
                i % 250,
                1000 + i
            )
        })
        .collect();
    let mut restore = sandbox.command(Net::Pod, Group::Outside, ROOT, "iptables-legacy-restore");
    restore.stdin(Stdio::piped());
    let mut child = restore.spawn().expect("iptables-legacy-restore");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        write!(stdin, "*filter\n{rules}COMMIT\n").expect("write rules");
    }
    assert!(child.wait().expect("restore").success());

    sandbox.install(&[]).expect("install");
    let save = |group: Group| {
        let mut cmd = sandbox.command(Net::Pod, group, ROOT, "iptables-legacy-save");
        let out = cmd.output().expect("iptables-legacy-save");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let inside = save(Group::App);
    assert_eq!(inside.matches("-j ACCEPT").count(), 300, "{inside}");
    assert_eq!(
        inside,
        save(Group::Outside),
        "a >4 KiB getsockopt answer is unchanged"
    );

    // SO_RCVBUF and TCP_INFO: the same inside the cgroup as outside.
    // SO_ORIGINAL_DST of a connection that was not redirected: conntrack
    // answers its own destination, its peer, once nat rules are loaded;
    // eBPF mode answers so inside the cgroup (outside, without conntrack,
    // the kernel has no answer).
    let to = PROXY_ADDR.to_string();
    let probe = |group| {
        sandbox
            .agent_output(group, APP, &["sockopts", "--to", &to])
            .expect("sockopts")
    };
    let (inside, outside) = (probe(Group::App), probe(Group::Outside));
    let without = |text: &str| {
        text.lines()
            .filter(|l| !l.starts_with("SO_ORIGINAL_DST"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(without(&inside), without(&outside));
    assert!(
        inside.contains(&format!("SO_ORIGINAL_DST {to}\n")),
        "{inside}"
    );
    assert!(outside.contains("SO_ORIGINAL_DST error: os 2"), "{outside}");
    // Conntrack on, as Istio's REDIRECT rules turn it on (a NAT target is
    // what makes the kernel track connections), with a rule that matches
    // nothing here: the kernel's own answer, now conntrack's, is the same,
    // and eBPF mode keeps it rather than write its own.
    let mut nat = sandbox.command(Net::Pod, Group::Outside, ROOT, "iptables-legacy");
    nat.args(["-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "9"])
        .args(["-j", "REDIRECT", "--to-ports", "9"])
        .stdout(Stdio::null());
    assert!(nat.status().expect("iptables-legacy").success());
    let inside = probe(Group::App);
    assert!(
        inside.contains(&format!("SO_ORIGINAL_DST {to}\n")),
        "{inside}"
    );
    assert_eq!(inside, probe(Group::Outside));
    let status = sandbox.status().expect("status");
    assert_eq!(counter(&status, "orig_dst_answered"), 0);
    assert_eq!(counter(&status, "orig_dst_unredirected"), 1, "{status}");
    sandbox.uninstall().expect("uninstall");
}

#[test]
fn the_answer_survives_the_loader_and_goes_with_uninstall() {
    require_root!();
    let sandbox = pod_with_orig_dst_proxy();
    sandbox.install(&[]).expect("install"); // the installer has exited
    assert_eq!(
        sandbox.lands(Group::App, APP, UPSTREAM).expect("connect"),
        UPSTREAM.to_string()
    );
    sandbox.uninstall().expect("uninstall");
    assert!(!sandbox.is_pinned());
    // Not captured any more, and the proxy's own answer is the kernel's again.
    assert_eq!(
        sandbox.lands(Group::App, APP, UPSTREAM).expect("connect"),
        "upstream"
    );
    let direct = sandbox.lands(Group::App, APP, PROXY_ADDR).expect("connect");
    assert!(direct.starts_with("error: os "), "{direct}");
}

/// A pod switched from iptables mode to eBPF mode keeps the conntrack
/// entries of the connections made before (a closed one for seconds, an
/// established one for days), and the kernel still answers SO_ORIGINAL_DST
/// from them. A later connection that reuses the ports of one has its
/// tuple, and would get the old connection's destination. eBPF mode
/// answers for the sockets it redirected and those accepted outside the
/// proxy's port itself, whatever the kernel said.
#[test]
fn after_a_switch_from_iptables_old_conntrack_entries_do_not_answer() {
    require_root!();
    let sandbox = pod_with_orig_dst_proxy();
    let mut inbound = sandbox.agent(Net::Pod, Group::Proxy, PROXY);
    inbound.args([
        "serve",
        "--listen",
        "0.0.0.0:15006",
        "--report",
        "observe",
        "--reply",
        "inbound",
    ]);
    sandbox.start(inbound).expect("inbound listener");
    let istio = |mode: &str, cleanup: bool| {
        let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
        let mut args = vec!["istio-iptables", "--ipv6=false", "--mode", mode];
        args.extend(["--netns", sandbox.pod_netns(), "--cgroup", &cgroup]);
        args.extend(["--instance", sandbox.name(), "-p", "15001", "-z", "15006"]);
        args.extend(["-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*"]);
        if cleanup {
            args.push("--cleanup-only");
        }
        let out = redirect(&args).expect("redirect istio-iptables");
        assert!(out.ok(), "{mode} (cleanup {cleanup}): {out:?}");
    };
    let spec = |to: &str, bind: &str, sport: u16| {
        format!("to={to} family=4 bind={bind} dev=none mode=block sport={sport}")
    };
    let from_peer = || sandbox.agent(Net::Peer, Group::Outside, ROOT);
    // The proxy's own connection to a loopback address other than
    // 127.0.0.1 goes to the inbound port (ISTIO_IN_REDIRECT).
    let proxy = || sandbox.agent(Net::Pod, Group::App, PROXY);
    let (inbound_port, to_pod) = (format!("{POD_IP}:15006"), format!("{POD_IP}:80"));

    istio("iptables", false);
    // Entries: peer:41001 -> pod:80 redirected to pod:15006; the app's
    // 127.0.0.1:41002 -> 127.0.0.1:15006, not redirected.
    let seen = observe_one(from_peer(), &spec(&to_pod, "none", 41001));
    assert!(seen.ends_with(&format!("odst={to_pod}")), "{seen}");
    let seen = observe_one(
        sandbox.agent(Net::Pod, Group::App, APP),
        &spec("127.0.0.1:15006", "127.0.0.1", 41002),
    );
    assert!(seen.contains("odst=127.0.0.1:15006 "), "{seen}");
    istio("iptables", true);

    istio("ebpf", false);
    // The same tuples again: the inbound listener reached directly answers
    // its own address (not the old pod:80), the proxy's redirected socket
    // its own original destination (not the old 127.0.0.1:15006).
    let seen = observe_one(from_peer(), &spec(&inbound_port, "none", 41001));
    assert!(seen.ends_with(&format!("odst={inbound_port}")), "{seen}");
    let seen = observe_one(proxy(), &spec("127.0.0.9:9090", "127.0.0.1", 41002));
    assert!(
        seen.contains("odst=127.0.0.9:9090 ") && seen.ends_with("odst=127.0.0.9:9090"),
        "{seen}"
    );
    istio("ebpf", true);
}

// ---- squid, a real transparent proxy ----------------------------------

const PAGE: &str = "hello from the upstream server";

/// How the pod's outbound traffic reaches squid.
#[derive(Clone, Copy, Debug)]
enum Capture {
    Ebpf,
    /// The rule istio-iptables' chains boil down to for this case.
    IptablesRedirect,
}

/// A squid in intercept mode, as UID 1337 in the pod's proxy cgroup.
struct Squid {
    dir: PathBuf,
}

impl Squid {
    fn start(sandbox: &Sandbox) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-squid", sandbox.name()));
        fs::create_dir_all(&dir).expect("squid dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
        let d = dir.display().to_string();
        // DNS goes to an address inside the pod where nothing listens: squid
        // must never reach outside the sandbox.
        let conf = format!(
            "http_port 127.0.0.1:15001 intercept\n\
             http_port 127.0.0.1:3129\n\
             http_access allow all\n\
             cache deny all\n\
             dns_nameservers 127.0.0.53\n\
             visible_hostname redirect-test\n\
             pid_filename {d}/squid.pid\n\
             access_log stdio:{d}/access.log\n\
             cache_log {d}/cache.log\n\
             cache_store_log none\n\
             coredump_dir {d}\n\
             netdb_filename none\n\
             icp_port 0\n\
             htcp_port 0\n\
             shutdown_lifetime 0 seconds\n"
        );
        fs::write(dir.join("squid.conf"), conf).expect("squid.conf");
        let squid = Self { dir };
        let mut cmd = sandbox.command(Net::Pod, Group::Proxy, PROXY, "squid");
        // A service name of its own: squid names its shared memory segments
        // after it, and parallel tests must not share them.
        let service: String = sandbox
            .name()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        cmd.args(["-N", "-n", &service, "-f"])
            .arg(squid.dir.join("squid.conf"));
        // `start` waits for a first line on stdout; squid prints none, so
        // a shell prints "ready" once squid's log says it intercepts.
        let script = format!(
            "\"$@\" & pid=$!; log={d}/cache.log; \
             for i in $(seq 550); do \
               grep -q 'Accepting NAT intercepted' $log 2>/dev/null && {{ echo ready; wait $pid; exit; }}; \
               kill -0 $pid 2>/dev/null || {{ echo \"squid exited: $(tail -n 3 $log | tr '\\n' ' ')\"; exit 1; }}; \
               sleep 0.1; \
             done; \
             echo \"squid did not start: $(tail -n 3 $log | tr '\\n' ' ')\"; kill $pid"
        );
        let mut sh = sandbox.command(Net::Pod, Group::Proxy, PROXY, "sh");
        sh.arg("-c")
            .arg(script)
            .arg("sh")
            .arg(cmd.get_program())
            .args(cmd.get_args());
        sandbox.start(sh).expect("squid");
        squid
    }

    /// squid's access log once it mentions `needle` (waits up to 10 s).
    fn access_log_with(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
            if log.contains(needle) || Instant::now() > deadline {
                return log;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn squid_serves_the_app_through(capture: Capture) {
    let sandbox = Sandbox::for_tests().expect("sandbox");
    let upstream = SocketAddrV4::new(PEER_IP, 8080);
    let mut http = sandbox.agent(Net::Peer, Group::Outside, APP);
    http.args([
        "serve",
        "--listen",
        &upstream.to_string(),
        "--reply",
        PAGE,
        "--http",
    ]);
    sandbox.start(http).expect("upstream HTTP server");
    let squid = Squid::start(&sandbox);
    match capture {
        Capture::Ebpf => {
            sandbox.install(&[]).expect("install");
        }
        Capture::IptablesRedirect => redirect_with_iptables(&sandbox, "-A"),
    }
    let mut curl = sandbox.command(Net::Pod, Group::App, APP, "curl");
    curl.args(["-sS", "--max-time", "15", &format!("http://{upstream}/")]);
    let out = curl.output().expect("curl");
    assert!(
        out.status.success(),
        "curl through squid ({capture:?}): {out:?}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), PAGE);
    let log = squid.access_log_with("ORIGINAL_DST");
    assert!(
        log.contains(&format!("ORIGINAL_DST/{}", upstream.ip())),
        "squid forwarded to the original destination ({capture:?}): {log}"
    );
    if let Capture::Ebpf = capture {
        let status = sandbox.status().expect("status");
        assert!(counter(&status, "orig_dst_answered") >= 1, "{status}");
        sandbox.uninstall().expect("uninstall");
    }
}

#[test]
fn squid_intercepts_the_app_through_ebpf() {
    require_root!();
    squid_serves_the_app_through(Capture::Ebpf);
}

#[test]
fn squid_intercepts_the_app_through_iptables_redirect() {
    require_root!();
    squid_serves_the_app_through(Capture::IptablesRedirect);
}

/// Adds (`-A`) or deletes (`-D`) the rule istio-iptables' chains boil down
/// to for the app's outbound TCP: REDIRECT to 15001 unless UID 1337.
fn redirect_with_iptables(sandbox: &Sandbox, action: &str) {
    let mut iptables = sandbox.command(Net::Pod, Group::Outside, ROOT, "iptables");
    iptables.args([
        "-t",
        "nat",
        action,
        "OUTPUT",
        "-p",
        "tcp",
        "-m",
        "owner",
        "!",
        "--uid-owner",
        "1337",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ]);
    let out = iptables.output().expect("iptables");
    assert!(out.status.success(), "{out:?}");
}

/// The pod's `TcpExt: TCPFastOpenPassive`: connections its listeners
/// accepted from a SYN that carried data.
fn fast_open_passive(sandbox: &Sandbox) -> u64 {
    let out = sandbox
        .command(Net::Pod, Group::Outside, ROOT, "cat")
        .arg("/proc/net/netstat")
        .output()
        .expect("netstat");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let [names, values] = lines.as_slice() else {
        panic!("no TcpExt lines: {text}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "TCPFastOpenPassive")
        .and_then(|(_, value)| value.parse().ok())
        .expect("TCPFastOpenPassive")
}

#[test]
fn tcp_fast_open_gets_the_original_destination_as_with_iptables() {
    require_root!();
    let sandbox = Sandbox::for_tests().expect("sandbox");
    // Fast Open on both ends without a cookie (client 0x1 + 0x4, server
    // 0x2 + 0x200): the first SYN carries the request, and the proxy's
    // end is established by it, before the app's end sees the SYN-ACK.
    let sysctl = sandbox
        .command(Net::Pod, Group::Outside, ROOT, "sysctl")
        .args(["-qw", "net.ipv4.tcp_fastopen=519"])
        .output()
        .expect("sysctl");
    assert!(sysctl.status.success(), "{sysctl:?}");
    sandbox
        .start_reporting_proxy_with("original-dst", &["--http", "--fastopen"])
        .expect("proxy");
    let target = UPSTREAM.to_string();
    let request = || {
        let before = fast_open_passive(&sandbox);
        let out = sandbox
            .agent_output(Group::App, APP, &["fastopen", "--to", &target])
            .expect("fastopen");
        assert_eq!(
            fast_open_passive(&sandbox),
            before + 1,
            "the SYN established the proxy's end"
        );
        out.trim().to_owned()
    };
    redirect_with_iptables(&sandbox, "-A");
    let iptables = request();
    redirect_with_iptables(&sandbox, "-D");
    sandbox.install(&[]).expect("install");
    let ebpf = request();
    assert_eq!(iptables, target);
    assert_eq!(ebpf, iptables);
    let status = sandbox.status().expect("status");
    assert_eq!(counter(&status, "tuple_released"), 1, "{status}");
    sandbox.uninstall().expect("uninstall");
}
