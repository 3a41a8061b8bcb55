//! The deployment files in `redirect-user/deploy/` parse, and the Istio
//! injection template gives the init container exactly what the README
//! says eBPF mode needs. (Pure file checks: no privileges needed.)

use std::path::PathBuf;

use serde_yaml::Value;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../redirect-user/deploy")
}

fn parse(name: &str) -> Value {
    let path = deploy_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
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
            parse(&name);
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
