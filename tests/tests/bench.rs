//! The benchmarks, run by `cargo xtask bench [--quick]` (ignored by `cargo
//! xtask test`): the cost of capture with eBPF, with Istio's iptables rules
//! and without capture, measured side by side in one sandbox pod.
//!
//! Every figure comes from interleaved rounds (each round measures every
//! setup once, in turn), so that drift of the machine hits all setups
//! alike; a figure is the median of its rounds, with their range as the
//! spread, and every ratio is the median of the per-round ratios. Nothing
//! asserts a duration: the results go to `$REDIRECT_BENCH_OUT` (JSON, one
//! object per figure), which `cargo xtask bench` turns into a table and
//! plots.

use std::{
    io::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    os::fd::OwnedFd,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use redirect_sandbox::{
    APP, Group, Net, PEER_IP, PEER_IP6, PROXY, ROOT, Sandbox,
    cli::{Outcome, outcome, redirect, redirect_bin},
    cni::Plugin,
    require_root,
};
use serde_json::{Value, json};

/// Where the app connects when capture is on: a server in the peer that
/// is never reached while capture works.
const UPSTREAM: SocketAddrV4 = SocketAddrV4::new(PEER_IP, 9080);
/// The same upstream over IPv6.
const UPSTREAM6: SocketAddrV6 = SocketAddrV6::new(PEER_IP6, 9080, 0, 0);
/// The proxy stand-in's IPv6 listener (where ip6tables' REDIRECT and eBPF
/// send IPv6 connections).
const PROXY6: SocketAddrV6 = SocketAddrV6::new(Ipv6Addr::LOCALHOST, 15001, 0, 0);
/// An HTTP server in the peer: the real destination of the request benchmark.
const HTTP_UPSTREAM: SocketAddrV4 = SocketAddrV4::new(PEER_IP, 8080);
/// The proxy stand-in for connection setup: accepts, answers, closes.
const PROXY_PORT: u16 = 15001;
/// The transparent relay for the request benchmark (reads SO_ORIGINAL_DST).
const RELAY_PORT: u16 = 15002;
/// Exclude-CIDR counts of the scaling benchmark.
const CIDR_COUNTS: [usize; 4] = [1, 100, 1_000, 10_000];
/// The proxy's DNS listener (Istio's 127.0.0.1:15053).
const PROXY_DNS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15053);
/// The pod's resolv.conf nameserver, across the network.
const NAMESERVER: SocketAddrV4 = SocketAddrV4::new(PEER_IP, 53);
/// `-k`'s interface in the bench pod: the peer plays a KubeVirt VM behind
/// it, with these addresses.
const KV: &str = "kv0";
const POD_KV: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const PEER_KV: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// Where the VM connects, beyond the pod (routed through it over `kv0`).
const VM_REMOTE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), 9080);
/// The pod UID the CNI plugin is called with.
const POD_UID: &str = "b3c4a1d2-0000-4000-8000-00000000be4c";
/// Pod counts of the per-pod memory figure (`--quick`: the first only).
const POD_COUNTS: [usize; 3] = [1, 110, 500];

/// How much to measure: `--quick` is a smoke test of every figure. Many
/// short rounds rather than few long ones: on a shared machine the speed
/// drifts within seconds, and only what is measured close together
/// compares well.
struct Sizes {
    /// Rounds of the connection-setup comparison (direct, eBPF, iptables).
    setup_rounds: usize,
    /// Connections per setup-round measurement.
    setup_connections: usize,
    /// Rounds of the scaling and request benchmarks (each installs
    /// iptables with up to 10,000 rules).
    rounds: usize,
    /// The pod counts of the per-pod memory figure.
    pod_counts: &'static [usize],
    connections: usize,
    requests: usize,
}

impl Sizes {
    fn from_env() -> Self {
        if std::env::var("REDIRECT_BENCH_QUICK").is_ok_and(|v| v == "1") {
            Self {
                setup_rounds: 5,
                setup_connections: 200,
                rounds: 5,
                pod_counts: &POD_COUNTS[..1],
                connections: 200,
                requests: 100,
            }
        } else {
            Self {
                setup_rounds: 30,
                setup_connections: 1_000,
                rounds: 7,
                pod_counts: &POD_COUNTS,
                connections: 1_000,
                requests: 500,
            }
        }
    }
}

/// One timed run of the agent's `bench` command.
struct Sample {
    rate: f64,
    /// The client's CPU time per connection, µs (see the agent).
    cpu_us: f64,
    p50_us: f64,
    p99_us: f64,
}

/// The values of one figure over the rounds.
#[derive(Default)]
struct Series(Vec<f64>);

impl Series {
    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn spread(&self) -> [f64; 2] {
        let min = self.0.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        [min, max]
    }
}

/// The results, in the order they are reported.
#[derive(Default)]
struct Results(Vec<(String, String, String, Series)>);

impl Results {
    fn add(&mut self, name: &str, mode: &str, unit: &str, value: f64) {
        if let Some(entry) = self
            .0
            .iter_mut()
            .find(|(n, m, _, _)| n == name && m == mode)
        {
            entry.3.0.push(value);
        } else {
            self.0.push((
                name.to_owned(),
                mode.to_owned(),
                unit.to_owned(),
                Series(vec![value]),
            ));
        }
    }

    /// A sample's figures `<prefix>_rate` (`<what>/s`), `_cpu` (µs of the
    /// client's CPU per `<what>`), `_p50` and `_p99` (µs).
    fn add_sample(&mut self, prefix: &str, mode: &str, what: &str, s: &Sample) {
        self.add(
            &format!("{prefix}_rate"),
            mode,
            &format!("{what}/s"),
            s.rate,
        );
        self.add(
            &format!("{prefix}_cpu"),
            mode,
            &format!("us/{what}"),
            s.cpu_us,
        );
        self.add(&format!("{prefix}_p50"), mode, "us", s.p50_us);
        self.add(&format!("{prefix}_p99"), mode, "us", s.p99_us);
    }

    fn get(&self, name: &str, mode: &str) -> &[f64] {
        self.0
            .iter()
            .find(|(n, m, _, _)| n == name && m == mode)
            .map_or(&[], |e| &e.3.0)
    }

    /// Adds `name` = per-round `a / b`.
    fn ratio(&mut self, name: &str, a: (&str, &str), b: (&str, &str)) {
        let ratios: Vec<f64> = self
            .get(a.0, a.1)
            .iter()
            .zip(self.get(b.0, b.1))
            .map(|(x, y)| x / y)
            .collect();
        for r in ratios {
            self.add(name, "ratio", "x", r);
        }
    }

    fn to_json(&self) -> Value {
        Value::Array(
            self.0
                .iter()
                .map(|(name, mode, unit, series)| {
                    json!({
                        "name": name,
                        "mode": mode,
                        "value": series.median(),
                        "unit": unit,
                        "spread": series.spread(),
                        "rounds": series.0.len(),
                    })
                })
                .collect(),
        )
    }
}

/// The sandbox pod and the commands the benchmarks drive in it.
struct Bench {
    sandbox: Sandbox,
    /// The last install's phases (see [`timing_phases`]).
    phases: std::cell::RefCell<Vec<(String, f64)>>,
    /// The pod's resolv.conf (a scratch file the sandbox removes).
    resolv: String,
}

impl Bench {
    fn new() -> Self {
        let sandbox = Sandbox::for_tests().expect("sandbox");
        // No TIME_WAIT in this namespace: hundreds of thousands of short
        // connections would otherwise pile up and slow every later lookup,
        // and the interleaved rounds would meet each other's: iptables'
        // proxy-side TIME_WAIT (127.0.0.1:15001 <- pod:port) has the very
        // tuple of a later eBPF connection from that port, whose SYN, with
        // an unrelated sequence number, it answers with an ACK, and the
        // client retries a second later. A bench artifact (a live pod moved
        // from iptables to eBPF meets it for at most TIME_WAIT's minute),
        // not a capture cost.
        // The peer too: it plays the VM, whose connections through `kv0`
        // the interleaved rounds compare.
        for net in [Net::Pod, Net::Peer] {
            let tw = sandbox
                .command(net, Group::Outside, redirect_sandbox::ROOT, "sysctl")
                .args(["-q", "-w", "net.ipv4.tcp_max_tw_buckets=0"])
                .status()
                .expect("sysctl");
            assert!(tw.success(), "sysctl tcp_max_tw_buckets");
        }
        sandbox
            .link(KV, &[format!("{POD_KV}/24")], &[format!("{PEER_KV}/24")])
            .expect("the KubeVirt link");
        sandbox
            .ip_batch(
                Net::Peer,
                &format!("route add 198.51.100.0/25 via {POD_KV} dev {KV}\n"),
            )
            .expect("the VM's route");
        sandbox
            .serve(
                Net::Pod,
                Group::Proxy,
                PROXY,
                SocketAddrV4::new(POD_KV, PROXY_PORT),
                "proxy",
            )
            .expect("proxy stand-in on kv0");
        sandbox
            .serve(Net::Peer, Group::Outside, APP, UPSTREAM, "upstream")
            .expect("upstream");
        sandbox
            .serve(Net::Peer, Group::Outside, APP, UPSTREAM6, "upstream")
            .expect("IPv6 upstream");
        sandbox
            .serve(Net::Pod, Group::Proxy, PROXY, PROXY6, "proxy")
            .expect("IPv6 proxy stand-in");
        let mut http = sandbox.agent(Net::Peer, Group::Outside, APP);
        http.args(["serve", "--listen", &HTTP_UPSTREAM.to_string()])
            .args(["--reply", "upstream", "--http"]);
        sandbox.start(http).expect("http upstream");
        sandbox
            .serve(
                Net::Pod,
                Group::Proxy,
                PROXY,
                SocketAddrV4::new(Ipv4Addr::LOCALHOST, PROXY_PORT),
                "proxy",
            )
            .expect("proxy stand-in");
        let mut relay = sandbox.agent(Net::Pod, Group::Proxy, PROXY);
        relay.args(["relay", "--listen", &format!("127.0.0.1:{RELAY_PORT}")]);
        sandbox.start(relay).expect("relay");
        // DNS: the proxy's listener and the nameserver resolv.conf lists.
        for (net, group, who, listen, name) in [
            (Net::Pod, Group::Proxy, PROXY, PROXY_DNS, "dns-proxy"),
            (Net::Peer, Group::Outside, ROOT, NAMESERVER, "nameserver"),
        ] {
            let mut dns = sandbox.agent(net, group, who);
            dns.args([
                "dns-serve",
                "--listen",
                &listen.to_string(),
                "--reply",
                name,
            ]);
            sandbox.start(dns).expect(name);
        }
        let resolv = std::env::temp_dir().join(format!("{}-resolv.conf", sandbox.name()));
        std::fs::write(&resolv, format!("nameserver {}\n", NAMESERVER.ip())).expect("resolv.conf");
        Self {
            sandbox,
            phases: std::cell::RefCell::default(),
            resolv: resolv.to_string_lossy().into_owned(),
        }
    }

    /// `redirect istio-iptables --mode MODE ...` for the pod: the same
    /// command line for every backend (`nftables`: `--mode iptables
    /// --native-nftables`; `node-set`: `--mode ebpf --node-set`, into the
    /// set [`BenchSet`] loads). Returns its wall time.
    fn istio(&self, mode: &str, port: u16, exclude: &str, cleanup: bool) -> Duration {
        self.istio_with(mode, port, exclude, &[], cleanup)
    }

    /// [`Bench::istio`] with `extra` flags.
    fn istio_with(
        &self,
        mode: &str,
        port: u16,
        exclude: &str,
        extra: &[&str],
        cleanup: bool,
    ) -> Duration {
        let cgroup = self.sandbox.pod_cgroup().to_string_lossy().into_owned();
        let mut cmd = Command::new(redirect_bin());
        let set = BenchSet::name(&self.sandbox);
        let backend = match mode {
            "nftables" => ["--mode", "iptables", "--native-nftables"].as_slice(),
            "node-set" => &["--mode", "ebpf", "--node-set", &set],
            _ => &["--mode", mode],
        };
        // `--ipv6=true` in `extra` asks for Istio's IPv6 table too.
        let ipv6 = if extra.contains(&"--ipv6=true") {
            None
        } else {
            Some("--ipv6=false")
        };
        cmd.arg("istio-iptables")
            .args(ipv6)
            .args(backend)
            .args(["--netns", &self.sandbox.netns_path(Net::Pod)])
            .args(["--cgroup", &cgroup, "--instance", self.sandbox.name()])
            .args(["-p", &port.to_string(), "-u", "1337", "-g", "1337"])
            .args(["-i", "*", "-x", exclude])
            .args(extra);
        if cleanup {
            cmd.arg("--cleanup-only");
        }
        // The loader's phase breakdown (stderr; a few clock reads).
        cmd.env("REDIRECT_TIMING", "1");
        let start = Instant::now();
        let out: Outcome = outcome(&mut cmd).expect("run redirect");
        let took = start.elapsed();
        assert_eq!(
            out.code,
            0,
            "{mode} {}: {out:?}",
            if cleanup { "cleanup" } else { "install" }
        );
        self.phases.replace(timing_phases(&out.stderr));
        took
    }

    /// Runs `count` timed connections from the app (`kind`: `""`, or
    /// `--request` or `--dns`: see the agent's `bench`).
    fn sample(
        &self,
        to: impl Into<std::net::SocketAddr>,
        count: usize,
        kind: &str,
        expect: &str,
    ) -> Sample {
        let count = count.to_string();
        let to = to.into().to_string();
        let mut args = vec!["bench", "--to", to.as_str(), "--count", count.as_str()];
        if !kind.is_empty() {
            args.push(kind);
        }
        let out = self
            .sandbox
            .agent_output(Group::App, APP, &args)
            .expect("agent bench");
        sample_of(&out, expect)
    }

    /// [`Bench::sample`] of connections from the VM (the peer) through
    /// `kv0`.
    fn vm_sample(&self, to: SocketAddrV4, count: usize) -> Sample {
        let (to, count) = (to.to_string(), count.to_string());
        let out = self
            .sandbox
            .peer_output(&["bench", "--to", &to, "--count", &count])
            .expect("agent bench");
        sample_of(&out, "proxy")
    }

    /// A VM's connection setup through a `-k` interface with `mode`'s
    /// capture in place (`direct`: no capture, the VM connects to the
    /// proxy stand-in on the interface's address, where REDIRECT sends it).
    fn virt_sample(&self, mode: &str, count: usize) -> Sample {
        if mode == "direct" {
            return self.vm_sample(SocketAddrV4::new(POD_KV, PROXY_PORT), count);
        }
        self.istio_with(mode, PROXY_PORT, "", &["-k", KV], false);
        let sample = self.vm_sample(VM_REMOTE, count);
        self.istio_with(mode, PROXY_PORT, "", &["-k", KV], true);
        sample
    }
}

/// The agent's `bench` report, landed at `expect`.
fn sample_of(out: &str, expect: &str) -> Sample {
    let v: Value = serde_json::from_str(out.trim()).expect("agent bench JSON");
    assert_eq!(v["errors"], 0, "{v}");
    let reply = v["reply"].as_str().unwrap_or("");
    assert!(
        reply.contains(expect),
        "landed at {reply:?}, expected {expect:?}"
    );
    let n = v["count"].as_f64().unwrap_or(0.0);
    Sample {
        rate: n / v["secs"].as_f64().unwrap_or(f64::NAN),
        cpu_us: v["cpu_secs"].as_f64().unwrap_or(f64::NAN) * 1e6 / n,
        p50_us: v["p50_us"].as_f64().unwrap_or(f64::NAN),
        p99_us: v["p99_us"].as_f64().unwrap_or(f64::NAN),
    }
}

impl Bench {
    /// The eBPF programs' run time and run count per redirected request
    /// (the app through the relay to the HTTP upstream) and per bypassed
    /// connection (the proxy's own, straight to the upstream), with the
    /// kernel's run-time statistics on for the measurement only.
    fn program_costs(&self, count: usize, results: &mut Results) {
        let mut args = vec![
            "istio-iptables",
            "--ipv6=false",
            "--mode",
            "ebpf",
            "--netns",
        ];
        let netns = self.sandbox.netns_path(Net::Pod);
        let cgroup = self.sandbox.pod_cgroup().to_string_lossy().into_owned();
        args.extend([netns.as_str(), "--cgroup", &cgroup, "--instance"]);
        args.push(self.sandbox.name());
        // Istio's sidecar flags, with the relay (which reads
        // SO_ORIGINAL_DST and connects upstream) as the outbound proxy.
        let relay = RELAY_PORT.to_string();
        args.extend(["-p", &relay, "-z", "15006", "-u", "1337", "-m", "REDIRECT"]);
        args.extend(["-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"]);
        let out = redirect_sandbox::cli::redirect(&args).expect("install");
        assert!(out.ok(), "{out:?}");
        let status = redirect_sandbox::cli::redirect(&[
            "status",
            "--json",
            "--instance",
            self.sandbox.name(),
        ])
        .expect("status");
        let status: Value = serde_json::from_str(&status.stdout).expect("status JSON");
        let programs: Vec<(String, u32)> = status["instances"][0]["programs"]
            .as_array()
            .expect("programs")
            .iter()
            .filter_map(|p| {
                Some((
                    p["hook"].as_str()?.to_owned(),
                    p["program_id"].as_u64()? as u32,
                ))
            })
            .collect();
        // What verifying each program cost, in the kernel's own count of the
        // instructions it walked (kernel 5.16+; none before).
        for (hook, id) in &programs {
            let verified = aya::programs::loaded_programs()
                .flatten()
                .find(|p| p.id() == *id)
                .and_then(|p| p.verified_instruction_count());
            if let Some(insns) = verified {
                results.add(
                    &format!("verified_insns_{hook}"),
                    "ebpf",
                    "insns",
                    f64::from(insns),
                );
            }
        }
        let snapshot = || -> Vec<(u64, u64)> {
            programs
                .iter()
                .map(|(_, id)| {
                    aya::programs::loaded_programs()
                        .flatten()
                        .find(|p| p.id() == *id)
                        .map_or((0, 0), |p| (p.run_time().as_nanos() as u64, p.run_count()))
                })
                .collect()
        };
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
        let measure = |run: &dyn Fn()| -> Vec<(u64, u64)> {
            let before = snapshot();
            run();
            let after = snapshot();
            before
                .iter()
                .zip(after)
                .map(|(b, a)| (a.0 - b.0, a.1 - b.1))
                .collect()
        };
        let to = HTTP_UPSTREAM.to_string();
        let redirected = measure(&|| {
            let _ = self.sample(HTTP_UPSTREAM, count, "--request", &to);
        });
        let bypassed = measure(&|| {
            let n = count.to_string();
            let _ = self.sandbox.agent_output(
                Group::Proxy,
                PROXY,
                &["bench", "--to", &to, "--count", &n, "--request"],
            );
        });
        drop(stats);
        let per = |v: u64| v as f64 / count as f64;
        for ((hook, _), (ns, runs)) in programs.iter().zip(&redirected) {
            results.add(&format!("bpf_ns_{hook}"), "ebpf", "ns/req", per(*ns));
            results.add(&format!("bpf_runs_{hook}"), "ebpf", "runs/req", per(*runs));
        }
        let total = |costs: &[(u64, u64)]| per(costs.iter().map(|c| c.0).sum());
        results.add(
            "bpf_ns_per_redirected",
            "ebpf",
            "ns/req",
            total(&redirected),
        );
        results.add("bpf_ns_per_bypassed", "ebpf", "ns/conn", total(&bypassed));
        let out =
            redirect_sandbox::cli::redirect(&["uninstall", "--instance", self.sandbox.name()])
                .expect("uninstall");
        assert!(out.ok(), "{out:?}");
    }

    /// Connection setup with `mode` in place (`direct`: no capture, the app
    /// connects straight to the proxy port; `node-set`: the pod in a node
    /// set loaded for this sample only, so that its programs never run
    /// beside another mode's).
    fn setup_sample(
        &self,
        mode: &str,
        exclude: &str,
        count: usize,
        results: &mut Results,
    ) -> Sample {
        if mode == "direct" {
            let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, PROXY_PORT);
            return self.sample(to, count, "", "proxy");
        }
        let set = (mode == "node-set")
            .then(|| BenchSet::load(&self.sandbox).expect("a node set on this kernel"));
        let install = self.istio(mode, PROXY_PORT, exclude, false);
        let phases = self.phases.take();
        let sample = self.sample(UPSTREAM, count, "", "proxy");
        let uninstall = self.istio(mode, PROXY_PORT, exclude, true);
        drop(set);
        if exclude.is_empty() {
            results.add("install_time", mode, "ms", install.as_secs_f64() * 1e3);
            results.add("uninstall_time", mode, "ms", uninstall.as_secs_f64() * 1e3);
            for (phase, ms) in phases {
                results.add(&format!("install_phase {phase}"), mode, "ms", ms);
            }
        }
        sample
    }
}

impl Bench {
    /// IPv6 connection setup with `mode`'s IPv6 table in place (`direct`:
    /// no capture, the app connects to the proxy's IPv6 listener).
    /// Records the install's time as `install_time_ipv6`.
    fn setup6_sample(&self, mode: &str, count: usize, results: &mut Results) -> Sample {
        if mode == "direct" {
            return self.sample(PROXY6, count, "", "proxy");
        }
        let install = self.istio_with(mode, PROXY_PORT, "", &["--ipv6=true"], false);
        results.add("install_time_ipv6", mode, "ms", install.as_secs_f64() * 1e3);
        let sample = self.sample(UPSTREAM6, count, "", "proxy");
        self.istio_with(mode, PROXY_PORT, "", &["--ipv6=true"], true);
        sample
    }

    /// DNS queries from the app (a fresh connected UDP socket each, as a
    /// libc resolver sends them) with `mode`'s `--redirect-dns` in place;
    /// `direct`: no capture, the app queries the proxy's DNS listener.
    /// Records the install's time as `install_time_dns`.
    fn dns_sample(&self, mode: &str, count: usize, results: &mut Results) -> Sample {
        if mode == "direct" {
            return self.sample(PROXY_DNS, count, "--dns", "dns-proxy");
        }
        let extra = ["--redirect-dns", "--resolv-conf", self.resolv.as_str()];
        let install = self.istio_with(mode, PROXY_PORT, "", &extra, false);
        results.add("install_time_dns", mode, "ms", install.as_secs_f64() * 1e3);
        let sample = self.sample(NAMESERVER, count, "--dns", "dns-proxy");
        self.istio_with(mode, PROXY_PORT, "", &extra, true);
        sample
    }

    /// One pod's set-up as the CNI plugin does it at ADD, by the plugin's
    /// own log (process start excluded), per-pod eBPF and iptables; and
    /// `iptables-restore` of the rules the plugin's plan gives the pod (a
    /// process, as Istio applies them; its start included). Milliseconds.
    fn pod_setup(
        &self,
        plugin: &Plugin,
        rules: &str,
        node_set: Option<&str>,
        results: &mut Results,
    ) {
        let log = std::env::temp_dir().join(format!("{}-cni.log", self.sandbox.name()));
        let modes = ["ebpf", "iptables", "node-set"];
        for mode in modes
            .into_iter()
            .filter(|m| *m != "node-set" || node_set.is_some())
        {
            let mut config =
                plugin.config(if mode == "node-set" { "ebpf" } else { mode }, injected());
            if mode == "node-set" {
                config["node_set"] = json!(node_set);
            }
            config["log_file"] = json!(log);
            let _ = std::fs::remove_file(&log);
            let add = plugin.call(&self.sandbox, "ADD", POD_UID, &config);
            assert!(add.ok(), "ADD {mode}: {add:?}");
            let text = std::fs::read_to_string(&log).expect("the plugin's log");
            let micros: f64 = text
                .split('\t')
                .find_map(|f| f.strip_prefix("micros="))
                .and_then(|m| m.parse().ok())
                .expect("micros in the plugin's log");
            let del = plugin.call(&self.sandbox, "DEL", POD_UID, &config);
            assert!(del.ok(), "DEL {mode}: {del:?}");
            results.add("pod_setup", &format!("cni-{mode}"), "ms", micros / 1e3);
            if mode == "node-set" {
                for (phase, ms) in timing_phases(&add.stderr) {
                    results.add(&format!("add_phase {phase}"), "cni-node-set", "ms", ms);
                }
            }
        }
        let mut restore = self
            .sandbox
            .command(Net::Pod, Group::Outside, ROOT, "iptables-restore");
        restore
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stdout(Stdio::null());
        let start = Instant::now();
        let mut child = restore.spawn().expect("iptables-restore");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("rules");
        let status = child.wait().expect("iptables-restore");
        let took = start.elapsed();
        assert!(status.success(), "iptables-restore: {status}");
        self.istio("iptables", PROXY_PORT, "", true);
        results.add(
            "pod_setup",
            "iptables-restore",
            "ms",
            took.as_secs_f64() * 1e3,
        );
    }

    /// Kernel memory per pod with `count` pods in per-pod mode (each its
    /// own instance on its own cgroup, Istio's sidecar flags, outbound
    /// only): the maps' and programs' memory as the kernel accounts it
    /// (fdinfo memlock), summed over the pods' instances, per pod.
    fn pod_memory(&self, count: usize, results: &mut Results) {
        let mut pods = MemoryPods::default();
        let netns = self.sandbox.netns_path(Net::Pod);
        for i in 0..count {
            let cgroup = self.sandbox.pod_cgroup().join(format!("mem{i}"));
            std::fs::create_dir_all(&cgroup).expect("pod cgroup");
            let name = format!("{}-mem{i}", self.sandbox.name());
            pods.0.push((name.clone(), cgroup.clone()));
            let cg = cgroup.to_string_lossy().into_owned();
            let mut args = vec![
                "istio-iptables",
                "--ipv6=false",
                "--mode",
                "ebpf",
                "--netns",
                &netns,
                "--cgroup",
                &cg,
                "--instance",
                &name,
            ];
            args.extend(MEMORY_POD_FLAGS);
            let out = redirect(&args).expect("install");
            assert!(out.ok(), "pod {i}: {out:?}");
        }
        let status = redirect(&["status", "--json"]).expect("status");
        let status: Value = serde_json::from_str(&status.stdout).expect("status JSON");
        // Every loaded program's memory, read once.
        let program_memory: std::collections::HashMap<u64, u64> = aya::programs::loaded_programs()
            .flatten()
            .map(|p| (u64::from(p.id()), p.memory_locked().map_or(0, u64::from)))
            .collect();
        let mut bytes = 0u64;
        let mut seen = 0;
        for instance in status["instances"].as_array().expect("instances") {
            if !instance["instance"]
                .as_str()
                .is_some_and(|n| pods.0.iter().any(|(name, _)| name == n))
            {
                continue;
            }
            seen += 1;
            bytes += instance["map_memory_bytes"].as_u64().expect("map memory");
            for program in instance["programs"].as_array().expect("programs") {
                let Some(id) = program["program_id"].as_u64() else {
                    continue;
                };
                bytes += program_memory.get(&id).copied().unwrap_or(0);
            }
        }
        drop(pods);
        assert_eq!(seen, count, "every pod's instance in status");
        results.add(
            &format!("pod_memory_at_{count}_pods"),
            "per-pod",
            "bytes/pod",
            bytes as f64 / count as f64,
        );
    }
}

impl Bench {
    /// Kernel memory per pod with `count` pods in node set `set` (each pod
    /// a network namespace of its own, with only `lo`; Istio's sidecar
    /// flags, outbound only): what the set's maps grew by, per pod. Also
    /// the milliseconds of one `node-set add` (process start included).
    fn pod_memory_in_set(&self, set: &str, count: usize, results: &mut Results) {
        let memory = || {
            let out = redirect(&["node-set", "status", "--json", "--set", set]).expect("status");
            let status: Value = serde_json::from_str(&out.stdout).expect("status JSON");
            status["map_memory_bytes"].as_u64().expect("map memory")
        };
        let before = memory();
        // What the set costs before any pod: its maps, sized for
        // SET_PODS pods (arrays whole, hash maps their buckets).
        results.add(
            "node_set_memory",
            &format!("{SET_PODS}-pod set"),
            "bytes",
            before as f64,
        );
        let mut namespaces = Vec::new();
        let started = Instant::now();
        for i in 0..count {
            let ns = redirect_sandbox::netns::create().expect("a pod namespace");
            let path = format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                std::os::fd::AsRawFd::as_raw_fd(&ns)
            );
            namespaces.push(ns);
            let name = format!("mem{i}");
            let mut args = vec![
                "node-set",
                "add",
                "--set",
                set,
                "--instance",
                &name,
                "--netns",
                &path,
            ];
            args.extend(MEMORY_POD_FLAGS);
            let out = redirect(&args).expect("node-set add");
            assert!(out.ok(), "pod {i}: {out:?}");
        }
        let took = started.elapsed();
        let after = memory();
        for i in 0..count {
            let out = redirect(&[
                "node-set",
                "remove",
                "--set",
                set,
                "--instance",
                &format!("mem{i}"),
            ])
            .expect("node-set remove");
            assert!(out.ok(), "pod {i}: {out:?}");
        }
        results.add(
            &format!("pod_memory_at_{count}_pods"),
            "node-set",
            "bytes/pod",
            after.saturating_sub(before) as f64 / count as f64,
        );
        results.add(
            "node_set_add",
            "process",
            "ms",
            took.as_secs_f64() * 1e3 / count as f64,
        );
    }
}

/// The capture of the memory benchmarks' pods: Istio's sidecar flags,
/// outbound only.
const MEMORY_POD_FLAGS: [&str; 10] = [
    "-p", "15001", "-u", "1337", "-g", "1337", "-i", "*", "-b", "",
];

/// The pods the benchmarks' node set is sized for: the largest of
/// `POD_COUNTS` fits.
const SET_PODS: u32 = 512;

/// A node set loaded for the benchmarks on the sandbox's pod cgroup,
/// unloaded when dropped.
struct BenchSet(String);

impl BenchSet {
    /// The set's name for `sandbox`.
    fn name(sandbox: &Sandbox) -> String {
        format!("{}-set", sandbox.name())
    }

    /// Whether this kernel can have one (5.15).
    fn possible() -> bool {
        redirect_sandbox::cli::feature_present("helper/get_netns_cookie")
    }

    /// `None` where the kernel cannot have one.
    fn load(sandbox: &Sandbox) -> Option<Self> {
        if !Self::possible() {
            return None;
        }
        let name = Self::name(sandbox);
        let out = redirect(&[
            "node-set",
            "load",
            "--set",
            &name,
            "--cgroup",
            &sandbox.pod_cgroup().to_string_lossy(),
            "--max-pods",
            &SET_PODS.to_string(),
        ])
        .expect("node-set load");
        assert!(out.ok(), "{out:?}");
        Some(Self(name))
    }
}

impl Drop for BenchSet {
    fn drop(&mut self) {
        let _ = redirect(&["node-set", "unload", "--set", &self.0]);
    }
}

/// A pod of a [`BenchSet`] in a network namespace of its own (the memory
/// pods' capture), removed when dropped.
struct ResidentPod {
    set: String,
    _netns: OwnedFd,
}

impl BenchSet {
    const RESIDENT: &str = "resident";

    fn resident_pod(&self) -> ResidentPod {
        let netns = redirect_sandbox::netns::create().expect("a pod namespace");
        let path = format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            std::os::fd::AsRawFd::as_raw_fd(&netns)
        );
        let mut args = vec![
            "node-set",
            "add",
            "--set",
            &self.0,
            "--instance",
            Self::RESIDENT,
            "--netns",
            &path,
        ];
        args.extend(MEMORY_POD_FLAGS);
        let out = redirect(&args).expect("node-set add");
        assert!(out.ok(), "the resident pod: {out:?}");
        ResidentPod {
            set: self.0.clone(),
            _netns: netns,
        }
    }
}

impl Drop for ResidentPod {
    fn drop(&mut self) {
        let _ = redirect(&[
            "node-set",
            "remove",
            "--set",
            &self.set,
            "--instance",
            BenchSet::RESIDENT,
        ]);
    }
}

/// The instances and cgroups of [`Bench::pod_memory`]'s pods, removed when
/// dropped (also when the benchmark fails midway).
#[derive(Default)]
struct MemoryPods(Vec<(String, PathBuf)>);

impl Drop for MemoryPods {
    fn drop(&mut self) {
        for (name, cgroup) in &self.0 {
            match redirect(&["uninstall", "--instance", name]) {
                Ok(out) if out.ok() => {}
                other => eprintln!("bench cleanup: uninstall {name}: {other:?}"),
            }
            let _ = std::fs::remove_dir(cgroup);
        }
    }
}

/// A pod Istio's injector marked (what the plugin captures).
fn injected() -> Value {
    json!({"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"})
}

/// The iptables rules the plugin's plan gives an injected pod with the
/// proxy as uid/gid 1337 (`redirect cni-plan ... -- --dry-run`).
fn planned_rules(sandbox: &Sandbox) -> String {
    let pod = std::env::temp_dir().join(format!("{}-pod.json", sandbox.name()));
    let object = json!({
        "metadata": {"name": "pod", "namespace": "bench", "annotations": injected()},
        "spec": {"containers": [{
            "name": "istio-proxy",
            "securityContext": {"runAsUser": PROXY.uid, "runAsGroup": PROXY.gid},
        }]},
    });
    std::fs::write(&pod, object.to_string()).expect("pod JSON");
    let pod = pod.to_string_lossy().into_owned();
    let out = redirect(&["cni-plan", "--pod", &pod, "--", "--dry-run", "--ipv6=false"])
        .expect("cni-plan");
    assert!(out.ok(), "{out:?}");
    assert!(out.stdout.starts_with("* nat"), "{out:?}");
    out.stdout
}

/// The install (or ADD) phases `REDIRECT_TIMING=1` printed (`redirect: timing
/// <phase> <ms>`), the attaches summed as `attach`.
fn timing_phases(stderr: &str) -> Vec<(String, f64)> {
    let mut phases: Vec<(String, f64)> = Vec::new();
    for line in stderr.lines() {
        let Some((phase, ms)) = line
            .strip_prefix("redirect: timing ")
            .and_then(|rest| rest.rsplit_once(' '))
        else {
            continue;
        };
        let Ok(ms) = ms.parse::<f64>() else { continue };
        let phase = if phase.starts_with("attach ") {
            "attach"
        } else {
            phase
        };
        match phases.iter_mut().find(|(p, _)| p == phase) {
            Some((_, total)) => *total += ms,
            None => phases.push((phase.to_owned(), ms)),
        }
    }
    phases
}

/// `count` excluded networks, none of which holds the upstream: /24s in
/// 7.0.0.0/8, written short enough for one argv string.
fn exclude_cidrs(count: usize) -> String {
    (0..count)
        .map(|i| format!("7.{}.{}.0/24", i / 100, i % 100))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
#[ignore = "benchmark: run with `cargo xtask bench`"]
fn bench_capture_costs() {
    require_root!();
    let sizes = Sizes::from_env();
    let bench = Bench::new();
    let mut results = Results::default();
    let cidr_lists: Vec<(usize, String)> =
        CIDR_COUNTS.iter().map(|&n| (n, exclude_cidrs(n))).collect();

    // Warm-up: caches, the first install's page faults.
    bench.setup_sample("ebpf", "", sizes.connections / 4, &mut results);
    results = Results::default();

    // 1 and 4: connection setup, install and uninstall.
    for round in 1..=sizes.setup_rounds {
        // Each round starts with another setup, so that no setup always
        // runs first (or last) in a round.
        let mut modes = vec!["direct", "ebpf", "iptables", "nftables"];
        if BenchSet::possible() {
            modes.push("node-set");
        }
        let first = round % modes.len();
        modes.rotate_left(first);
        for mode in modes {
            let s = bench.setup_sample(mode, "", sizes.setup_connections, &mut results);
            results.add_sample("connect", mode, "conn", &s);
        }
        let last = |mode| *results.get("connect_rate", mode).last().unwrap_or(&0.0);
        println!(
            "setup round {round}/{}: connect/s direct {:.0}, ebpf {:.0}, iptables {:.0}, nftables {:.0}, node set {:.0}",
            sizes.setup_rounds,
            last("direct"),
            last("ebpf"),
            last("iptables"),
            last("nftables"),
            last("node-set")
        );
    }
    for round in 1..=sizes.rounds {
        // 2: scaling with exclude rules.
        let direct = bench.setup_sample("direct", "", sizes.connections, &mut results);
        results.add("scaling_direct", "direct", "conn/s", direct.rate);
        for (n, list) in &cidr_lists {
            for mode in ["ebpf", "iptables"] {
                let s = bench.setup_sample(mode, list, sizes.connections, &mut results);
                results.add(&format!("scaling_{n}"), mode, "conn/s", s.rate);
            }
        }
        // 3: small requests through the relay (SO_ORIGINAL_DST, forward).
        for mode in ["ebpf", "iptables"] {
            bench.istio(mode, RELAY_PORT, "", false);
            let s = bench.sample(
                HTTP_UPSTREAM,
                sizes.requests,
                "--request",
                &HTTP_UPSTREAM.to_string(),
            );
            bench.istio(mode, RELAY_PORT, "", true);
            results.add("request_p50", mode, "us", s.p50_us);
            results.add("request_p99", mode, "us", s.p99_us);
            results.add("request_rate", mode, "req/s", s.rate);
        }
        let last = |mode| *results.get("scaling_10000", mode).last().unwrap_or(&0.0);
        println!(
            "round {round}/{}: connect/s direct {:.0}; at 10,000 CIDRs ebpf {:.0}, iptables {:.0}",
            sizes.rounds,
            direct.rate,
            last("ebpf"),
            last("iptables")
        );
    }
    // 6: IPv6 connection setup (Istio's IPv6 table), interleaved.
    for round in 1..=sizes.rounds {
        let mut modes = ["direct", "ebpf", "iptables"];
        let first = round % modes.len();
        modes.rotate_left(first);
        for mode in modes {
            let s = bench.setup6_sample(mode, sizes.setup_connections, &mut results);
            results.add_sample("connect6", mode, "conn", &s);
        }
        let last = |mode| *results.get("connect6_rate", mode).last().unwrap_or(&0.0);
        println!(
            "ipv6 round {round}/{}: connect/s direct {:.0}, ebpf {:.0}, iptables {:.0}",
            sizes.rounds,
            last("direct"),
            last("ebpf"),
            last("iptables")
        );
    }
    // 7: DNS query round trip (--redirect-dns), interleaved.
    for round in 1..=sizes.rounds {
        let mut modes = ["direct", "ebpf", "iptables"];
        let first = round % modes.len();
        modes.rotate_left(first);
        for mode in modes {
            let s = bench.dns_sample(mode, sizes.requests, &mut results);
            results.add_sample("dns_query", mode, "query", &s);
        }
        let last = |mode| *results.get("dns_query_p50", mode).last().unwrap_or(&0.0);
        println!(
            "dns round {round}/{}: query p50 direct {:.0} us, ebpf {:.0} us, iptables {:.0} us",
            sizes.rounds,
            last("direct"),
            last("ebpf"),
            last("iptables")
        );
    }

    // 7b: a KubeVirt VM's connection setup through a `-k` interface
    // (kernel 6.6 for eBPF mode's TCX links), interleaved.
    if redirect_sandbox::cli::feature_present("tcx/ingress") {
        for round in 1..=sizes.rounds {
            let mut modes = ["direct", "ebpf", "iptables"];
            let first = round % modes.len();
            modes.rotate_left(first);
            for mode in modes {
                let s = bench.virt_sample(mode, sizes.setup_connections);
                results.add_sample("virt_connect", mode, "conn", &s);
            }
            let last = |mode| {
                *results
                    .get("virt_connect_rate", mode)
                    .last()
                    .unwrap_or(&0.0)
            };
            println!(
                "-k round {round}/{}: VM connect/s direct {:.0}, ebpf {:.0}, iptables {:.0}",
                sizes.rounds,
                last("direct"),
                last("ebpf"),
                last("iptables")
            );
        }
    } else {
        println!("-k not measured: this kernel has no TCX links (6.6)");
    }

    // 8: one pod's set-up by the CNI plugin, and iptables-restore.
    let mut plugin = Plugin::new(&bench.sandbox, POD_UID);
    plugin.env.push(("REDIRECT_TIMING", "1"));
    let rules = planned_rules(&bench.sandbox);
    let set = BenchSet::load(&bench.sandbox);
    let set_name = set.as_ref().map(|s| s.0.as_str());
    // Another pod in the set while the pod's ADD is timed, as on a node
    // with pods: the first sk_lookup link on a node also switches the
    // kernel's sk_lookup dispatch on (a code patch on every CPU), once.
    let resident = set.as_ref().map(BenchSet::resident_pod);
    for round in 1..=sizes.rounds {
        bench.pod_setup(&plugin, &rules, set_name, &mut results);
        let last = |mode| *results.get("pod_setup", mode).last().unwrap_or(&0.0);
        println!(
            "pod set-up round {round}/{}: ADD ebpf {:.1} ms, ADD in a node set {:.2} ms, ADD iptables {:.1} ms, iptables-restore {:.1} ms",
            sizes.rounds,
            last("cni-ebpf"),
            last("cni-node-set"),
            last("cni-iptables"),
            last("iptables-restore")
        );
    }

    drop(resident);

    // 9: kernel memory per pod in per-pod mode and in a node set at each
    // pod count.
    for &count in sizes.pod_counts {
        bench.pod_memory(count, &mut results);
        let key = format!("pod_memory_at_{count}_pods");
        println!(
            "{count} pods: {:.0} bytes of kernel memory per pod",
            results.get(&key, "per-pod").last().unwrap_or(&0.0)
        );
        if let Some(set) = set_name.filter(|_| count <= SET_PODS as usize) {
            bench.pod_memory_in_set(set, count, &mut results);
            let set_bytes = *results
                .get("node_set_memory", &format!("{SET_PODS}-pod set"))
                .last()
                .unwrap_or(&0.0);
            println!(
                "{count} pods in a node set: a set for {SET_PODS} pods holds {:.1} MB of maps ({:.0} bytes a pod), \
                 each pod added grows them by {:.0} bytes; node-set add {:.1} ms",
                set_bytes / 1e6,
                set_bytes / f64::from(SET_PODS),
                results.get(&key, "node-set").last().unwrap_or(&0.0),
                results
                    .get("node_set_add", "process")
                    .last()
                    .unwrap_or(&0.0)
            );
        }
    }
    drop(set);

    results.ratio(
        "ebpf_over_direct_connect_rate",
        ("connect_rate", "ebpf"),
        ("connect_rate", "direct"),
    );
    results.ratio(
        "ebpf_over_direct_connect_cpu",
        ("connect_cpu", "ebpf"),
        ("connect_cpu", "direct"),
    );
    results.ratio(
        "iptables_over_direct_connect_cpu",
        ("connect_cpu", "iptables"),
        ("connect_cpu", "direct"),
    );
    results.ratio(
        "ebpf_over_iptables_connect_rate",
        ("connect_rate", "ebpf"),
        ("connect_rate", "iptables"),
    );
    results.ratio(
        "ebpf_over_nftables_connect_rate",
        ("connect_rate", "ebpf"),
        ("connect_rate", "nftables"),
    );
    // A node set's connections against per-pod eBPF and no capture (none
    // where the kernel cannot have a set).
    results.ratio(
        "node_set_over_direct_connect_rate",
        ("connect_rate", "node-set"),
        ("connect_rate", "direct"),
    );
    results.ratio(
        "node_set_over_ebpf_connect_rate",
        ("connect_rate", "node-set"),
        ("connect_rate", "ebpf"),
    );
    results.ratio(
        "node_set_over_direct_connect_cpu",
        ("connect_cpu", "node-set"),
        ("connect_cpu", "direct"),
    );
    for n in CIDR_COUNTS {
        let name = format!("scaling_{n}");
        results.ratio(
            &format!("ebpf_over_direct_at_{n}_cidrs"),
            (&name, "ebpf"),
            ("scaling_direct", "direct"),
        );
        results.ratio(
            &format!("ebpf_over_iptables_at_{n}_cidrs"),
            (&name, "ebpf"),
            (&name, "iptables"),
        );
    }
    results.ratio(
        "ebpf_over_direct_connect6_rate",
        ("connect6_rate", "ebpf"),
        ("connect6_rate", "direct"),
    );
    results.ratio(
        "ebpf_over_iptables_connect6_rate",
        ("connect6_rate", "ebpf"),
        ("connect6_rate", "iptables"),
    );
    results.ratio(
        "ebpf_over_direct_dns_rate",
        ("dns_query_rate", "ebpf"),
        ("dns_query_rate", "direct"),
    );
    results.ratio(
        "ebpf_over_iptables_dns_rate",
        ("dns_query_rate", "ebpf"),
        ("dns_query_rate", "iptables"),
    );
    if !results.get("virt_connect_rate", "ebpf").is_empty() {
        results.ratio(
            "ebpf_over_direct_virt_connect_rate",
            ("virt_connect_rate", "ebpf"),
            ("virt_connect_rate", "direct"),
        );
        results.ratio(
            "ebpf_over_iptables_virt_connect_rate",
            ("virt_connect_rate", "ebpf"),
            ("virt_connect_rate", "iptables"),
        );
    }
    results.ratio(
        "iptables_over_ebpf_request_p50",
        ("request_p50", "iptables"),
        ("request_p50", "ebpf"),
    );

    // 5: map memory of an installed instance (Istio's sidecar flags).
    bench.istio("ebpf", PROXY_PORT, "", false);
    let status =
        redirect_sandbox::cli::redirect(&["status", "--json", "--instance", bench.sandbox.name()])
            .expect("status");
    bench.istio("ebpf", PROXY_PORT, "", true);
    let status: Value = serde_json::from_str(&status.stdout).expect("status JSON");
    let instance = &status["instances"][0];
    let bytes = instance["map_memory_bytes"]
        .as_f64()
        .expect("map_memory_bytes");
    results.add("map_memory", "ebpf", "bytes", bytes);
    // The handshakes its tuple map holds at once (--max-connections; the
    // map is larger by the kernel LRU's per-CPU headroom). Open
    // connections keep their records in socket storage, without limit.
    let handshakes = instance["max_connections"]
        .as_f64()
        .expect("max_connections");
    results.add(
        "max_handshakes_in_flight",
        "ebpf",
        "connections",
        handshakes,
    );

    // 6: the programs' own cost, by the kernel's accounting (bpf_stats),
    // with Istio's sidecar flags: per redirected request through the
    // relay (the app's connect, the proxy's accept and SO_ORIGINAL_DST,
    // its connect upstream), and per connection the proxy makes itself.
    for round in 1..=sizes.rounds {
        bench.program_costs(sizes.requests, &mut results);
        println!(
            "program cost round {round}/{}: {:.0} ns of eBPF per redirected request",
            sizes.rounds,
            results
                .get("bpf_ns_per_redirected", "ebpf")
                .last()
                .unwrap_or(&0.0)
        );
    }

    let json = serde_json::to_string_pretty(&results.to_json()).expect("JSON");
    let out = std::env::var("REDIRECT_BENCH_OUT").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench/results.json").into()
    });
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).expect("create the results directory");
    }
    std::fs::write(&out, json).expect("write the results");
    println!("results written to {out}");
}
