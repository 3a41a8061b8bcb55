//! The deployment files in `redirect-user/deploy/` parse, and the Istio
//! injection template gives the init container exactly what the README
//! says eBPF mode needs. (Pure file checks: no privileges needed.)

use std::path::PathBuf;

use serde::Deserialize as _;
use serde_yaml::Value;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../redirect-user/deploy")
}

/// Every YAML document of a deploy file.
fn documents(name: &str) -> Vec<Value> {
    let path = deploy_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

/// A deploy file of one YAML document.
fn parse(name: &str) -> Value {
    let mut docs = documents(name);
    assert_eq!(docs.len(), 1, "{name} has one document");
    docs.remove(0)
}

#[test]
fn every_yaml_file_parses() {
    let mut parsed = 0;
    for entry in std::fs::read_dir(deploy_dir())
        .expect("deploy dir")
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") || name.ends_with(".yml") {
            assert!(!documents(&name).is_empty(), "{name} is empty");
            parsed += 1;
        }
    }
    assert!(parsed > 0, "no YAML file in redirect-user/deploy");
}

#[test]
fn the_injection_template_gives_istio_init_what_ebpf_mode_needs() {
    let values = parse("istio-values.yaml");
    assert_eq!(values["global"]["proxy_init"]["image"], "redirect");
    let template = values["sidecarInjectorWebhook"]["templates"]["redirect-ebpf"]
        .as_str()
        .expect("the redirect-ebpf template is a string");
    assert!(!template.contains("{{"), "a static template");
    let patch: Value = serde_yaml::from_str(template).expect("the template is YAML");
    let init = &patch["spec"]["initContainers"][0];
    assert_eq!(
        init["name"], "istio-init",
        "merged into Istio's init container"
    );
    let caps: Vec<&str> = init["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .expect("capabilities")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for cap in ["BPF", "NET_ADMIN", "NET_RAW", "SYS_ADMIN", "PERFMON"] {
        assert!(caps.contains(&cap), "{cap} missing from {caps:?}");
    }
    let mounts: Vec<(&str, &str)> = init["volumeMounts"]
        .as_sequence()
        .expect("volume mounts")
        .iter()
        .filter_map(|m| Some((m["name"].as_str()?, m["mountPath"].as_str()?)))
        .collect();
    assert!(
        mounts.contains(&("redirect-bpffs", "/sys/fs/bpf")),
        "{mounts:?}"
    );
    assert!(
        mounts.contains(&("redirect-cgroup", "/host/sys/fs/cgroup")),
        "{mounts:?}"
    );
    let volumes = patch["spec"]["volumes"].as_sequence().expect("volumes");
    for (name, path) in [
        ("redirect-bpffs", "/sys/fs/bpf"),
        ("redirect-cgroup", "/sys/fs/cgroup"),
    ] {
        assert!(
            volumes
                .iter()
                .any(|v| v["name"] == name && v["hostPath"]["path"] == path),
            "volume {name} -> {path}"
        );
    }
    let env = init["env"].as_sequence().expect("env");
    assert!(env.iter().any(|e| e["name"] == "REDIRECT_MAX_CONNECTIONS"));
}

#[test]
fn the_node_agent_runs_node_run_with_the_host_directories_it_needs() {
    let docs = documents("node-agent.yaml");
    let daemonset = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let account = docs
        .iter()
        .find(|d| d["kind"] == "ServiceAccount")
        .expect("a ServiceAccount");
    // Its role is what the plugin uses: GET of a pod, and nothing else.
    let roles: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
        .collect();
    assert_eq!(roles.len(), 1);
    let rules = roles[0]["rules"].as_sequence().expect("rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["resources"][0], "pods");
    assert_eq!(rules[0]["resources"].as_sequence().map(Vec::len), Some(1));
    assert_eq!(rules[0]["verbs"].as_sequence().map(Vec::len), Some(1));
    assert_eq!(rules[0]["verbs"][0], "get");
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .expect("a ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], roles[0]["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], account["metadata"]["name"]);
    assert_eq!(
        binding["subjects"][0]["namespace"],
        account["metadata"]["namespace"]
    );
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], account["metadata"]["name"]);
    assert_eq!(pod["automountServiceAccountToken"], true);
    assert_eq!(pod["hostNetwork"], true);
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(&args[..2], ["node", "run"]);
    let mounts: Vec<(&str, &str)> = container["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .filter_map(|m| Some((m["name"].as_str()?, m["mountPath"].as_str()?)))
        .collect();
    let volumes = pod["volumes"].as_sequence().expect("volumes");
    for (flag, host) in [
        ("--cni-bin-dir=", "/opt/cni/bin"),
        ("--cni-conf-dir=", "/etc/cni/net.d"),
    ] {
        let inside = args
            .iter()
            .find_map(|a| a.strip_prefix(flag))
            .unwrap_or_else(|| panic!("{flag} missing from {args:?}"));
        let (name, _) = mounts
            .iter()
            .find(|(_, path)| *path == inside)
            .unwrap_or_else(|| panic!("{inside} is not mounted"));
        assert!(
            volumes
                .iter()
                .any(|v| v["name"] == *name && v["hostPath"]["path"] == host),
            "{inside} is not the host's {host}"
        );
    }
    for path in ["/sys/fs/bpf", "/sys/fs/cgroup"] {
        assert!(mounts.iter().any(|(_, p)| *p == path), "{path} not mounted");
    }
    // The plugin's kubeconfig: from the mounted token, named as the host
    // (where the plugin runs) names the conf dir.
    assert!(args.contains(&"--service-account-dir=/var/run/secrets/kubernetes.io/serviceaccount"));
    assert!(args.contains(&"--host-cni-conf-dir=/etc/cni/net.d"));
    // One program set for the node, on the pods' cgroup (seen through the
    // host's cgroup2 mount above).
    assert!(args.contains(&"--node-set=node"), "{args:?}");
    assert!(
        args.iter()
            .any(|a| a.starts_with("--pod-cgroup-root=/sys/fs/cgroup/")),
        "{args:?}"
    );
    let port = args
        .iter()
        .find_map(|a| a.strip_prefix("--metrics-listen="))
        .and_then(|l| l.rsplit_once(':'))
        .map(|(_, p)| p)
        .expect("--metrics-listen");
    assert_eq!(
        daemonset["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
        port
    );
}

#[test]
fn the_cni_values_replace_istio_init_with_validation() {
    let values = parse("istio-cni-values.yaml");
    assert_eq!(values["istio_cni"]["enabled"], true);
    assert_eq!(values["cni"]["enabled"], false);
    assert_eq!(values["global"]["proxy_init"]["image"], "redirect");
}
