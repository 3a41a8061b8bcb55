//! `redirect-cni` through a real container runtime: containerd's CRI
//! creates the pods, calls the Debian CNI plugins and `redirect-cni`
//! (chained by `redirect node install`), and runs the containers with runc,
//! while this test plays the kubelet (see the `redirect_cri_test` crate).
//! Run by `cargo xtask cri-test`, which builds the image archive and passes
//! it in `REDIRECT_CRI_ARCHIVE` (the image's name in `REDIRECT_CRI_IMAGE`,
//! the shipped binary, which becomes the plugin, in `REDIRECT_CNI_BIN`);
//! ignored by a plain `cargo test`.
//!
//! An annotated pod gets its capture at ADD, with no privilege in the pod
//! (Istio's `istio-validation` finds it in place, and fails with 126 where
//! there is none):
//! its app runs as uid 1000 with every capability dropped and no mount; its
//! proxy (uid 1337) learns each connection's original destination. The
//! annotations' exclusions hold, the plugin configured for iptables gives
//! a pod the same landings through Istio's rules, a pod without the sidecar
//! annotation is left alone, a pod with a bad annotation value is not
//! started, removing a pod (DEL) removes its capture, and 100 pods in a
//! row get theirs, each ADD's time recorded by the plugin's log. Then the
//! same with a node set (`node install --node-set`, kernel 5.15): pods
//! are its map entries, observed alike.

use std::{collections::BTreeSet, net::SocketAddrV4, path::PathBuf, time::Instant};

use redirect_cri_test::{Pod, PodSpec, Runtime};
use redirect_sandbox::{
    APP, Group, Net, PEER_IP, Sandbox,
    cli::{ISTIO_SIDECAR_ARGS, redirect},
    require_root,
};

/// Istio's injector marks a pod it injected with this annotation; the
/// plugin captures only such pods.
const STATUS: (&str, &str) = (
    "sidecar.istio.io/status",
    r#"{"initContainers":null,"containers":["istio-proxy"],"volumes":["istio-envoy"]}"#,
);

/// What `cargo xtask cri-test` passes: the image archive, the image's
/// name in it, and the shipped `redirect` binary (installed as the plugin).
fn inputs() -> Result<(PathBuf, String, PathBuf), String> {
    match (
        std::env::var_os("REDIRECT_CRI_ARCHIVE"),
        std::env::var("REDIRECT_CRI_IMAGE"),
        std::env::var_os("REDIRECT_CNI_BIN"),
    ) {
        (Some(archive), Ok(name), Some(bin)) => {
            Ok((PathBuf::from(archive), name, PathBuf::from(bin)))
        }
        _ => Err(
            "REDIRECT_CRI_ARCHIVE, REDIRECT_CRI_IMAGE and REDIRECT_CNI_BIN are not set: \
                  run the CRI test with `cargo xtask cri-test`"
                .to_owned(),
        ),
    }
}

/// The names of the instances `redirect status` lists.
fn instances() -> BTreeSet<String> {
    let out = redirect(&["status", "--json"]).expect("redirect status");
    let status: serde_json::Value = serde_json::from_str(&out.stdout).expect("status JSON");
    status["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|i| i["instance"].as_str().map(str::to_owned))
        .collect()
}

/// The instance the plugin names after a pod's sandbox (its container id).
fn instance_of(pod: &Pod) -> String {
    format!("cni-{}", pod.id)
}

/// A connection from a container to `to`: the agent's tally line.
fn lands_from(runtime: &Runtime, container: &str, to: SocketAddrV4) -> String {
    runtime
        .exec(
            container,
            &["sandbox-agent", "connect", "--to", &to.to_string()],
        )
        .expect("exec connect")
        .trim()
        .to_owned()
}

/// What Istio's injector runs in CNI mode before the pod's containers
/// (`istio-validation`, with the values of
/// redirect-user/deploy/istio-cni-values.yaml: this image's `redirect`,
/// as the proxy's user, no capability): its exit code and log.
fn validation(runtime: &Runtime, pod: &Pod) -> (i32, String) {
    let mut args = vec!["istio-iptables"];
    args.extend_from_slice(ISTIO_SIDECAR_ARGS);
    args.extend([
        "--log_output_level=default:info",
        "--run-validation",
        "--skip-rule-apply",
    ]);
    runtime
        .run_to_completion(
            pod,
            "istio-validation",
            1337,
            "/usr/local/bin/redirect",
            &args,
        )
        .expect("istio-validation container")
}

/// The pod's proxy: uid 1337, answering on 15001 and 15006 with each
/// connection's SO_ORIGINAL_DST.
fn start_proxy(runtime: &Runtime, pod: &Pod) -> String {
    runtime
        .start_container(
            pod,
            "istio-proxy",
            1337,
            &[
                "sandbox-agent",
                "serve",
                "--listen",
                "0.0.0.0:15001,0.0.0.0:15006",
                "--report",
                "original-dst",
            ],
        )
        .expect("proxy container")
}

/// The pod's app: uid 1000, answering `reply` on `listen`.
fn start_app(runtime: &Runtime, pod: &Pod, listen: &str, reply: &str) -> String {
    runtime
        .start_container(
            pod,
            "app",
            1000,
            &[
                "sandbox-agent",
                "serve",
                "--listen",
                listen,
                "--reply",
                reply,
            ],
        )
        .expect("app container")
}

/// What an injected pod with `excludeOutboundPorts: 8081` and
/// `excludeInboundPorts: 9081` shows once its containers run: Istio's
/// validation passes, the app's outbound reaches the proxy with its
/// original destination, the excluded port and the proxy's own call go
/// straight out, inbound reaches 15006 with its destination, the excluded
/// inbound port reaches the app.
fn observe_captured(
    sandbox: &Sandbox,
    runtime: &Runtime,
    pod: &Pod,
    upstream: SocketAddrV4,
    excluded: SocketAddrV4,
) {
    // Istio's validation, as the injector runs it before the pod's
    // containers, finds the capture in place.
    let (code, log) = validation(runtime, pod);
    assert_eq!(code, 0, "istio-validation in the captured pod: {log}");
    let proxy = start_proxy(runtime, pod);
    let app = start_app(runtime, pod, "0.0.0.0:9080,0.0.0.0:9081", "app");
    // Outbound: the app's call reaches the proxy, which learns where it went.
    assert_eq!(
        lands_from(runtime, &app, upstream),
        format!("1\t{upstream}")
    );
    // excludeOutboundPorts: not captured.
    assert_eq!(lands_from(runtime, &app, excluded), "1\texcluded-port");
    // The proxy's own connections leave as they are.
    assert_eq!(lands_from(runtime, &proxy, upstream), "1\tupstream");
    // Inbound: a call from the network reaches 15006 with its destination.
    let inbound = SocketAddrV4::new(pod.ip, 9080);
    assert_eq!(
        sandbox.lands_from_peer(inbound).expect("inbound"),
        inbound.to_string()
    );
    // excludeInboundPorts: straight to the app.
    assert_eq!(
        sandbox
            .lands_from_peer(SocketAddrV4::new(pod.ip, 9081))
            .expect("inbound"),
        "app"
    );
}

/// The pods of node set `set` (`redirect node-set status`).
fn set_pods(set: &str) -> BTreeSet<String> {
    let out = redirect(&["node-set", "status", "--json", "--set", set]).expect("node-set status");
    let status: serde_json::Value = serde_json::from_str(&out.stdout).expect("status JSON");
    status["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect()
}

/// 100 injected pods `<prefix>-N` created in a row, each captured (named
/// in `captures()`), with the plugin's own ADD times and the runtime's
/// RunPodSandbox times printed; then removed, a DEL each, leaving no
/// capture. Returns the pods (removed) for the final pin check.
fn hundred_pods(
    runtime: &mut Runtime,
    prefix: &str,
    how: &str,
    captures: impl Fn() -> BTreeSet<String>,
) -> Vec<Pod> {
    let block = if prefix == "load" { 1000 } else { 2000 };
    let started = Instant::now();
    let mut pods = Vec::new();
    let mut run_ms = Vec::new();
    for i in 0..100u32 {
        let name = format!("{prefix}-{i}");
        let uid = format!("7a1c0e52-{block}-4000-8000-{i:012}");
        let t = Instant::now();
        let pod = runtime
            .run_pod(&PodSpec {
                name: &name,
                uid: &uid,
                annotations: &[STATUS],
            })
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}"));
        run_ms.push(t.elapsed().as_millis() as u64);
        pods.push(pod);
    }
    let elapsed = started.elapsed();
    let now = captures();
    let count = pods
        .iter()
        .filter(|p| now.contains(&instance_of(p)))
        .count();
    assert_eq!(count, 100, "every pod has its capture");
    let ours = format!("\tpod=default/{prefix}-");
    let mut add_us: Vec<u64> = runtime
        .cni_log_lines("ADD")
        .iter()
        .filter(|l| l.contains(&ours))
        .map(|l| {
            assert!(l.ends_with("\tok"), "{l}");
            l.split('\t')
                .find_map(|f| f.strip_prefix("micros="))
                .and_then(|m| m.parse().ok())
                .expect("micros")
        })
        .collect();
    assert_eq!(add_us.len(), 100, "one ADD per pod");
    add_us.sort_unstable();
    run_ms.sort_unstable();
    println!(
        "cri: 100 pods in {:.1} s; redirect-cni ADD (shipped build, {how}, process start excluded): \
         p50 {} us, p90 {} us, max {} us; RunPodSandbox p50 {} ms, p90 {} ms",
        elapsed.as_secs_f64(),
        percentile(&add_us, 50),
        percentile(&add_us, 90),
        add_us[99],
        percentile(&run_ms, 50),
        percentile(&run_ms, 90),
    );
    for p in &pods {
        runtime.remove_pod(p).expect("remove pod");
    }
    let dels = runtime
        .cni_log_lines("DEL")
        .iter()
        .filter(|l| l.contains(&ours) && l.ends_with("\tok"))
        .count();
    assert!(dels >= 100, "a DEL per pod: {dels}");
    let now = captures();
    let left: Vec<&Pod> = pods
        .iter()
        .filter(|p| now.contains(&instance_of(p)))
        .collect();
    assert!(left.is_empty(), "captures left after DEL: {left:?}");
    pods
}

/// The plugin with a node set (`node install --node-set`): an injected
/// pod is a set entry, not an instance, and is observed as in per-pod
/// mode; DEL takes it out; then 100 pods. Skipped, saying so, where the
/// kernel cannot have a set (before 5.15).
fn node_set_pods(
    sandbox: &Sandbox,
    runtime: &mut Runtime,
    upstream: SocketAddrV4,
    excluded: SocketAddrV4,
) {
    if !redirect_sandbox::cli::feature_present("helper/get_netns_cookie") {
        println!("cri: no node set on this kernel (helper/get_netns_cookie, 5.15)");
        return;
    }
    let set = format!("{}-cri", sandbox.name());
    let _unload = redirect_sandbox::cli::UnloadSet(set.clone());
    runtime
        .node_install(&["--node-set", &set])
        .expect("node install --node-set");
    let pod = runtime
        .run_pod(&PodSpec {
            name: "web-set",
            uid: "7a1c0e52-0005-4000-8000-000000000005",
            annotations: &[
                STATUS,
                ("traffic.sidecar.istio.io/excludeOutboundPorts", "8081"),
                ("traffic.sidecar.istio.io/excludeInboundPorts", "9081"),
            ],
        })
        .expect("RunPodSandbox in a node set");
    assert!(
        set_pods(&set).contains(&instance_of(&pod)),
        "ADD put the pod in the set"
    );
    assert!(
        !instances().contains(&instance_of(&pod)),
        "and loaded no programs of its own"
    );
    observe_captured(sandbox, runtime, &pod, upstream, excluded);
    runtime.remove_pod(&pod).expect("remove pod");
    assert!(
        !set_pods(&set).contains(&instance_of(&pod)),
        "DEL took it out"
    );
    hundred_pods(runtime, "set", "a node set's map entries", || {
        set_pods(&set)
    });
    runtime
        .node_install(&[])
        .expect("node install (per pod again)");
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

#[test]
#[ignore = "needs the image archive: run with `cargo xtask cri-test`"]
fn pods_through_containerd_cri() {
    require_root!();
    let (archive, image, plugin) = match inputs() {
        Ok(found) => found,
        Err(why) => {
            redirect_sandbox::skip_or_fail(&why);
            return;
        }
    };
    let sandbox = Sandbox::for_tests().expect("sandbox");
    // The rest of the network: servers in the peer namespace, where the
    // runtime and its pod bridge live.
    let upstream = SocketAddrV4::new(PEER_IP, 8080);
    let excluded = SocketAddrV4::new(PEER_IP, 8081);
    for (addr, reply) in [(upstream, "upstream"), (excluded, "excluded-port")] {
        sandbox
            .serve(Net::Peer, Group::Outside, APP, addr, reply)
            .expect("upstream server");
    }
    let mut runtime = Runtime::start(&sandbox, &archive, &image, &plugin).expect("containerd");

    // An injected pod: captured at ADD, nothing privileged in it.
    let pod = runtime
        .run_pod(&PodSpec {
            name: "web",
            uid: "7a1c0e52-0001-4000-8000-000000000001",
            annotations: &[
                STATUS,
                ("traffic.sidecar.istio.io/excludeOutboundPorts", "8081"),
                ("traffic.sidecar.istio.io/excludeInboundPorts", "9081"),
            ],
        })
        .expect("RunPodSandbox of an injected pod");
    assert!(
        instances().contains(&instance_of(&pod)),
        "ADD installed the pod's eBPF capture: {:?}",
        instances()
    );
    observe_captured(&sandbox, &runtime, &pod, upstream, excluded);

    // A pod without the sidecar annotation: no capture.
    let plain = runtime
        .run_pod(&PodSpec {
            name: "plain",
            uid: "7a1c0e52-0002-4000-8000-000000000002",
            annotations: &[],
        })
        .expect("RunPodSandbox of a plain pod");
    assert!(!instances().contains(&instance_of(&plain)));
    // Without capture, validation fails as Istio's does: exit 126.
    let (code, log) = validation(&runtime, &plain);
    assert_eq!(code, 126, "istio-validation in the uncaptured pod: {log}");
    let plain_app = start_app(&runtime, &plain, "0.0.0.0:9080", "plain");
    assert_eq!(lands_from(&runtime, &plain_app, upstream), "1\tupstream");
    assert_eq!(
        sandbox
            .lands_from_peer(SocketAddrV4::new(plain.ip, 9080))
            .expect("inbound"),
        "plain"
    );

    // The plugin configured for iptables (as where eBPF cannot run): the
    // same pod gets Istio's rules in its namespace, no eBPF instance, and
    // every socket lands as before.
    runtime
        .node_install(&["--mode", "iptables"])
        .expect("node install --mode iptables");
    let by_rules = runtime
        .run_pod(&PodSpec {
            name: "web-iptables",
            uid: "7a1c0e52-0004-4000-8000-000000000004",
            annotations: &[
                STATUS,
                ("traffic.sidecar.istio.io/excludeOutboundPorts", "8081"),
            ],
        })
        .expect("RunPodSandbox with the iptables plugin");
    assert!(!instances().contains(&instance_of(&by_rules)));
    let (code, log) = validation(&runtime, &by_rules);
    assert_eq!(code, 0, "istio-validation with Istio's rules: {log}");
    start_proxy(&runtime, &by_rules);
    let rules_app = start_app(&runtime, &by_rules, "0.0.0.0:9080", "app");
    assert_eq!(
        lands_from(&runtime, &rules_app, upstream),
        format!("1\t{upstream}")
    );
    assert_eq!(
        lands_from(&runtime, &rules_app, excluded),
        "1\texcluded-port"
    );
    let inbound = SocketAddrV4::new(by_rules.ip, 9080);
    assert_eq!(
        sandbox.lands_from_peer(inbound).expect("inbound"),
        inbound.to_string()
    );
    runtime.remove_pod(&by_rules).expect("remove pod");
    runtime
        .node_install(&[])
        .expect("node install (auto again)");

    // A bad annotation value: ADD fails with Istio's wording, so the
    // runtime does not start the pod, and nothing is installed for it.
    let before = instances();
    let refused = runtime
        .run_pod(&PodSpec {
            name: "bad",
            uid: "7a1c0e52-0003-4000-8000-000000000003",
            annotations: &[
                STATUS,
                ("traffic.sidecar.istio.io/excludeOutboundPorts", "http"),
            ],
        })
        .expect_err("RunPodSandbox of a pod with a bad annotation fails");
    assert!(
        refused.message().contains(
            "annotation value error for value excludeOutboundPorts; annotationFound = true"
        ),
        "{refused:?}"
    );
    assert_eq!(instances(), before, "nothing installed for the refused pod");
    assert!(
        runtime
            .cni_log_lines("ADD")
            .iter()
            .any(|l| l.contains("\tpod=default/bad\t") && l.contains("\terror 101: ")),
        "the plugin logged the refusal"
    );

    // Removing the pods: DEL takes the capture away, pins and all.
    for p in [&pod, &plain] {
        runtime.remove_pod(p).expect("remove pod");
    }
    let after = instances();
    assert!(!after.contains(&instance_of(&pod)), "{after:?}");
    assert!(
        !std::path::Path::new(redirect_sandbox::PIN_ROOT)
            .join(instance_of(&pod))
            .exists()
    );

    // 100 injected pods in a row, each ADD timed by the plugin itself.
    let pods = hundred_pods(&mut runtime, "load", "per-pod eBPF install", instances);

    // Node mode: one program set for the node's pods (where the kernel
    // can have one), the same pod observed the same way, then 100 pods.
    node_set_pods(&sandbox, &mut runtime, upstream, excluded);
    drop(runtime);
    let pins: Vec<String> = pods
        .iter()
        .chain([&pod, &plain])
        .map(instance_of)
        .filter(|i| {
            std::path::Path::new(redirect_sandbox::PIN_ROOT)
                .join(i)
                .exists()
        })
        .collect();
    assert!(pins.is_empty(), "pins left: {pins:?}");
}
