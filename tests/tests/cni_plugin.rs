//! `redirect-cni`, the CNI plugin, driven as a runtime drives it: the
//! `redirect` binary run under that name with the `CNI_*` environment and
//! a chained network configuration on stdin (the pod's annotations in its
//! runtime config, the previous plugin's result), against a sandbox pod.
//! ADD captures an annotated pod (eBPF on its cgroup when the cgroup is
//! found by UID, Istio's iptables rules in its namespace when not), passes
//! the previous result through, and a second ADD changes nothing; CHECK
//! says whether the capture is in place; DEL removes it and succeeds again
//! when there is nothing; a pod without the sidecar annotation is left
//! alone; a bad annotation fails ADD with Istio's wording and installs
//! nothing.

use std::{io::Write as _, net::SocketAddrV4, path::Path};

use redirect_sandbox::{
    APP, Group, Net, PEER_IP, POD_IP, Sandbox, cli::UPSTREAM, cni::Plugin, require_root,
};
use serde_json::{Value, json};

/// A port of the peer the annotations exclude from capture.
const EXCLUDED: SocketAddrV4 = SocketAddrV4::new(PEER_IP, 9999);
const APP_PORT: u16 = 8080;

/// The pod: upstream servers in the peer (one on the excluded port), the
/// stand-in proxy on 127.0.0.1:15001 and its inbound listener on 15006
/// (each answering with SO_ORIGINAL_DST), the app on 8080.
fn pod() -> Sandbox {
    let sandbox = Sandbox::with_upstream_and_orig_dst_proxy().expect("sandbox");
    sandbox
        .serve(Net::Peer, Group::Outside, APP, EXCLUDED, "excluded")
        .expect("excluded server");
    sandbox
        .start_inbound_listener("original-dst")
        .expect("inbound listener");
    let app = SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, APP_PORT);
    sandbox
        .serve(Net::Pod, Group::App, APP, app, "app")
        .expect("app");
    sandbox
}

fn sidecar() -> Value {
    json!({
        "sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}",
        "traffic.sidecar.istio.io/excludeOutboundPorts": EXCLUDED.port().to_string(),
    })
}

/// Where the app's connections land: (to upstream, to the excluded port,
/// from the peer to the app).
fn landings(sandbox: &Sandbox) -> (String, String, String) {
    let app = SocketAddrV4::new(POD_IP, APP_PORT);
    (
        sandbox.lands(Group::App, APP, UPSTREAM).expect("upstream"),
        sandbox.lands(Group::App, APP, EXCLUDED).expect("excluded"),
        sandbox.lands_from_peer(app).expect("inbound"),
    )
}

fn captured() -> (String, String, String) {
    (
        UPSTREAM.to_string(),
        "excluded".into(),
        SocketAddrV4::new(POD_IP, APP_PORT).to_string(),
    )
}

fn direct() -> (String, String, String) {
    ("upstream".into(), "excluded".into(), "app".into())
}

fn istio_chains(sandbox: &Sandbox) -> bool {
    ["iptables-nft-save", "iptables-legacy-save"]
        .iter()
        .any(|save| {
            let out = sandbox
                .command(Net::Pod, Group::Outside, redirect_sandbox::ROOT, save)
                .output()
                .expect(save);
            String::from_utf8_lossy(&out.stdout).contains(":ISTIO_OUTPUT")
        })
}

fn pinned(sandbox: &Sandbox) -> bool {
    Path::new(redirect_sandbox::PIN_ROOT)
        .join(format!("cni-{}", sandbox.name()))
        .exists()
}

#[test]
fn add_check_del_with_ebpf_on_the_pods_cgroup() {
    require_root!();
    let sandbox = pod();
    let uid = "5f1c-ebpf";
    let plugin = Plugin::new(&sandbox, uid);
    let config = plugin.config("ebpf", sidecar());
    assert_eq!(landings(&sandbox), direct());

    let add = plugin.call(&sandbox, "ADD", uid, &config);
    assert!(add.ok(), "{add:?}");
    let result: Value = serde_json::from_str(&add.stdout).expect("ADD's result");
    assert_eq!(result, config["prevResult"], "prevResult passes through");
    assert!(pinned(&sandbox) && !istio_chains(&sandbox));
    assert_eq!(landings(&sandbox), captured());

    let again = plugin.call(&sandbox, "ADD", uid, &config);
    assert!(again.ok(), "a second ADD: {again:?}");
    let check = plugin.call(&sandbox, "CHECK", uid, &config);
    assert!(check.ok() && check.stdout.is_empty(), "{check:?}");

    let del = plugin.call(&sandbox, "DEL", uid, &config);
    assert!(del.ok() && del.stdout.is_empty(), "{del:?}");
    assert!(!pinned(&sandbox));
    assert_eq!(landings(&sandbox), direct());
    let del = plugin.call(&sandbox, "DEL", uid, &config);
    assert!(del.ok(), "DEL with nothing to delete: {del:?}");
    let check = plugin.call(&sandbox, "CHECK", uid, &config);
    assert_eq!(check.code, 1, "{check:?}");
    let error: Value = serde_json::from_str(&check.stdout).expect("CHECK's error");
    assert_eq!(error["code"], 100, "{error}");
    assert_eq!(error["cniVersion"], "1.0.0");
}

#[test]
fn add_check_del_with_iptables_when_the_pods_cgroup_is_not_found() {
    require_root!();
    let sandbox = pod();
    let plugin = Plugin::new(&sandbox, "5f1c-linked");
    // Another UID: no cgroup of that pod is under the root.
    let uid = "5f1c-unknown";
    let config = plugin.config("auto", sidecar());
    let add = plugin.call(&sandbox, "ADD", uid, &config);
    assert!(add.ok(), "{add:?}");
    assert!(add.stderr.contains("was not found"), "{}", add.stderr);
    assert!(istio_chains(&sandbox) && !pinned(&sandbox));
    assert_eq!(landings(&sandbox), captured());
    let check = plugin.call(&sandbox, "CHECK", uid, &config);
    assert!(check.ok(), "{check:?}");
    let del = plugin.call(&sandbox, "DEL", uid, &config);
    assert!(del.ok(), "{del:?}");
    assert!(!istio_chains(&sandbox));
    assert_eq!(landings(&sandbox), direct());
    // Mode ebpf fails closed instead.
    let strict = plugin.call(&sandbox, "ADD", uid, &plugin.config("ebpf", sidecar()));
    assert_eq!(strict.code, 1, "{strict:?}");
    assert!(!istio_chains(&sandbox) && !pinned(&sandbox));
}

#[test]
fn pods_without_a_sidecar_and_bad_annotations_get_nothing() {
    require_root!();
    let sandbox = pod();
    let uid = "5f1c-scope";
    let plugin = Plugin::new(&sandbox, uid);
    let plain = plugin.call(&sandbox, "ADD", uid, &plugin.config("auto", json!({})));
    assert!(plain.ok(), "{plain:?}");
    assert!(plain.stderr.contains("is not captured"), "{}", plain.stderr);
    assert!(!pinned(&sandbox) && !istio_chains(&sandbox));
    assert_eq!(landings(&sandbox), direct());

    // A network namespace that vanished: ADD fails, nothing is left.
    let gone = plugin.call_in(
        "/proc/4194304/ns/net",
        &sandbox,
        "ADD",
        uid,
        &plugin.config("auto", sidecar()),
    );
    assert_eq!(gone.code, 1, "{gone:?}");
    let error: Value = serde_json::from_str(&gone.stdout).expect("ADD's error");
    assert_eq!(error["code"], 100, "{error}");
    assert!(!pinned(&sandbox) && !istio_chains(&sandbox));

    let mut bad = sidecar();
    bad["traffic.sidecar.istio.io/excludeOutboundPorts"] = json!("80,x");
    let add = plugin.call(&sandbox, "ADD", uid, &plugin.config("auto", bad));
    assert_eq!(add.code, 1, "{add:?}");
    let error: Value = serde_json::from_str(&add.stdout).expect("ADD's error");
    assert_eq!(error["code"], 101, "{error}");
    let msg = error["msg"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with("annotation value error for value excludeOutboundPorts"),
        "{msg}"
    );
    assert!(!pinned(&sandbox) && !istio_chains(&sandbox));
}

#[test]
fn concurrent_adds_for_different_pods_each_capture_their_own() {
    require_root!();
    let pods: Vec<(Sandbox, Plugin, String)> = (0..4)
        .map(|i| {
            let sandbox = pod();
            let uid = format!("5f1c-par-{i}");
            let plugin = Plugin::new(&sandbox, &uid);
            (sandbox, plugin, uid)
        })
        .collect();
    std::thread::scope(|scope| {
        for (sandbox, plugin, uid) in &pods {
            scope.spawn(move || {
                let add = plugin.call(sandbox, "ADD", uid, &plugin.config("ebpf", sidecar()));
                assert!(add.ok(), "{add:?}");
            });
        }
    });
    for (sandbox, plugin, uid) in &pods {
        assert!(pinned(sandbox), "{}", sandbox.name());
        assert_eq!(landings(sandbox), captured());
        let del = plugin.call(sandbox, "DEL", uid, &plugin.config("ebpf", sidecar()));
        assert!(del.ok() && !pinned(sandbox), "{del:?}");
    }
}

/// A stand-in of the Kubernetes API's pod GET (no API server runs here):
/// answers `GET /api/v1/namespaces/shop/pods/cart` carrying the bearer
/// token with `pod`, anything else with 404 or 401; for `seconds` at most.
fn api_stand_in(pod: Value, seconds: u64) -> (u16, std::thread::JoinHandle<usize>) {
    use std::io::{BufRead as _, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("stand-in");
    let port = listener.local_addr().expect("port").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let serve = move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
        let mut served = 0;
        while std::time::Instant::now() < deadline {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            };
            let _ = stream.set_nonblocking(false);
            let mut reader = BufReader::new(&stream);
            let mut head = Vec::new();
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                head.push(line.trim_end().to_owned());
                line.clear();
            }
            let authorized = head
                .iter()
                .any(|h| h.eq_ignore_ascii_case("authorization: Bearer s3cret"));
            let (status, body) = match (head.first().map(String::as_str), authorized) {
                (_, false) => ("401 Unauthorized", json!({"kind": "Status", "code": 401})),
                (Some("GET /api/v1/namespaces/shop/pods/cart HTTP/1.1"), true) => {
                    ("200 OK", pod.clone())
                }
                _ => ("404 Not Found", json!({"kind": "Status", "code": 404})),
            };
            let body = body.to_string();
            let mut out = &stream;
            let _ = write!(
                out,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            served += 1;
        }
        served
    };
    (port, std::thread::spawn(serve))
}

#[test]
fn with_a_kubeconfig_the_pod_comes_from_the_api() {
    require_root!();
    let sandbox = pod();
    let uid = "5f1c-api";
    let plugin = Plugin::new(&sandbox, uid);
    // The API's pod: a proxy running as 1500, an annotation the runtime
    // did not pass.
    let api_pod = json!({
        "metadata": {"namespace": "shop", "name": "cart", "annotations": sidecar()},
        "spec": {"containers": [
            {"name": "app"},
            {"name": "istio-proxy", "args": ["proxy", "sidecar"],
             "securityContext": {"runAsUser": 1500, "runAsGroup": 1500}},
        ]},
    });
    // Two ADDs and a DEL: seconds here, over a minute under software
    // emulation with the host busy (a 20 s bound ran out on 6.1).
    let (port, server) = api_stand_in(api_pod, 180);
    let dir = plugin.exe.parent().expect("scratch dir").to_path_buf();
    let kubeconfig = |token: &str| {
        let path = dir.join(format!("kubeconfig-{token}"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: cni\n\
                 contexts: [{{name: cni, context: {{cluster: stand-in, user: plugin}}}}]\n\
                 clusters: [{{name: stand-in, cluster: {{server: \"http://127.0.0.1:{port}\"}}}}]\n\
                 users: [{{name: plugin, user: {{token: {token}}}}}]\n"
            ),
        )
        .expect("kubeconfig");
        path
    };
    let mut config = plugin.config("ebpf", json!({}));
    config["kubeconfig"] = json!(kubeconfig("s3cret"));
    let add = plugin.call(&sandbox, "ADD", uid, &config);
    assert!(add.ok(), "{add:?}");
    assert!(pinned(&sandbox));
    let status = redirect_sandbox::cli::redirect(&[
        "status",
        "--json",
        "--instance",
        &format!("cni-{}", sandbox.name()),
    ])
    .expect("status");
    let status: Value = serde_json::from_str(&status.stdout).expect("status JSON");
    assert_eq!(
        status["instances"][0]["config"]["proxy_uids"],
        json!([1500]),
        "{status}"
    );
    assert!(plugin.call(&sandbox, "DEL", uid, &config).ok());

    // A token the API refuses: ADD fails, nothing installed.
    config["kubeconfig"] = json!(kubeconfig("wrong"));
    let add = plugin.call(&sandbox, "ADD", uid, &config);
    assert_eq!(add.code, 1, "{add:?}");
    let error: Value = serde_json::from_str(&add.stdout).expect("ADD's error");
    assert!(
        error["details"].as_str().is_some_and(|d| d.contains("401")),
        "{error}"
    );
    assert!(!pinned(&sandbox) && !istio_chains(&sandbox));
    drop(server);
}

/// With `node_set` in its configuration, the plugin puts the pod in that
/// node set (map entries, no programs of its own: nothing pinned for it)
/// when the set is loaded, and auto mode falls back to Istio's iptables
/// rules when it is not; DEL takes the pod out of the set.
#[test]
fn add_check_del_in_a_node_set() {
    require_root!();
    if !redirect_sandbox::cli::feature_present("helper/get_netns_cookie") {
        println!("no node sets on this kernel (5.15)");
        return;
    }
    let sandbox = pod();
    let uid = "5f1c-set";
    let plugin = Plugin::new(&sandbox, uid);
    let set = format!("{}-set", sandbox.name());
    let mut config = plugin.config("auto", sidecar());
    config["node_set"] = json!(set);

    // The set is not loaded: auto mode says so and uses iptables.
    let add = plugin.call(&sandbox, "ADD", uid, &config);
    assert!(add.ok(), "{add:?}");
    assert!(add.stderr.contains("is not loaded"), "{add:?}");
    assert!(istio_chains(&sandbox) && !pinned(&sandbox));
    assert_eq!(landings(&sandbox), captured());
    let del = plugin.call(&sandbox, "DEL", uid, &config);
    assert!(del.ok(), "{del:?}");
    assert!(!istio_chains(&sandbox));

    let load = redirect_sandbox::cli::redirect(&[
        "node-set",
        "load",
        "--set",
        &set,
        "--cgroup",
        &sandbox.pod_cgroup().to_string_lossy(),
        "--max-pods",
        "4",
    ])
    .expect("run redirect");
    assert!(load.ok(), "{load:?}");
    let unload = redirect_sandbox::cli::UnloadSet(set.clone());
    let add = plugin.call(&sandbox, "ADD", uid, &config);
    assert!(add.ok(), "{add:?}");
    let result: Value = serde_json::from_str(&add.stdout).expect("ADD's result");
    assert_eq!(result, config["prevResult"], "prevResult passes through");
    assert!(!pinned(&sandbox) && !istio_chains(&sandbox));
    assert_eq!(landings(&sandbox), captured());
    let again = plugin.call(&sandbox, "ADD", uid, &config);
    assert!(again.ok(), "a second ADD: {again:?}");
    let check = plugin.call(&sandbox, "CHECK", uid, &config);
    assert!(check.ok() && check.stdout.is_empty(), "{check:?}");

    let del = plugin.call(&sandbox, "DEL", uid, &config);
    assert!(del.ok() && del.stdout.is_empty(), "{del:?}");
    assert_eq!(landings(&sandbox), direct());
    let del = plugin.call(&sandbox, "DEL", uid, &config);
    assert!(del.ok(), "DEL with nothing to delete: {del:?}");
    let check = plugin.call(&sandbox, "CHECK", uid, &config);
    assert_eq!(check.code, 1, "{check:?}");
    // The pod again at once (a restarted sandbox keeps its address): the
    // DEL let go of its addresses, though its index waits for gc, so the
    // ADD takes a free index with them.
    let add = plugin.call(&sandbox, "ADD", uid, &config);
    assert!(add.ok(), "ADD after DEL: {add:?}");
    assert_eq!(landings(&sandbox), captured());
    let del = plugin.call(&sandbox, "DEL", uid, &config);
    assert!(del.ok(), "{del:?}");
    assert_eq!(landings(&sandbox), direct());
    drop(unload);
}
