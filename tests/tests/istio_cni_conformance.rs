//! Conformance with Istio's CNI plugin: for each pod of Istio's plugin
//! goldens (`../shared/conformance/istio-cni/`: its annotations and
//! containers, the rules Istio's plugin installs for it), `redirect
//! cni-plan` gives the plugin's istio-iptables configuration and, with
//! `-- --dry-run`, prints exactly the golden rules. Without the data the
//! test says so and skips, and fails under `CI=true`.

use std::fs;

use redirect_sandbox::{
    cli::{outcome, redirect_bin},
    conformance::{assert_all_match, cni_dir, shell_words},
};
use serde_json::{Value, json};

/// The case's pod as the Kubernetes API serves it.
fn pod_object(case: &Value) -> Value {
    json!({
        "metadata": {
            "namespace": case["pod"]["namespace"],
            "name": case["pod"]["name"],
            "annotations": case["annotations"],
            "labels": case["labels"],
        },
        "spec": { "containers": case["containers"] },
    })
}

#[test]
fn cni_plan_matches_every_istio_cni_golden() {
    let dir = cni_dir();
    let Ok(text) = fs::read_to_string(dir.join("cases.json")) else {
        redirect_sandbox::skip_or_fail(&format!(
            "no Istio CNI conformance data at {}",
            dir.display()
        ));
        return;
    };
    let cases: Vec<Value> = serde_json::from_str(&text).expect("cases.json");
    let scratch =
        std::env::temp_dir().join(format!("redirect-cni-conformance-{}", std::process::id()));
    fs::create_dir_all(&scratch).expect("scratch dir");
    let (mut failures, mut compared) = (Vec::new(), 0);
    for case in cases.iter().filter(|c| c["stale"] != true) {
        let name = case["case"].as_str().expect("case name");
        let pod = scratch.join(format!("{name}.json"));
        fs::write(&pod, pod_object(case).to_string()).expect("pod file");
        let exclude = case["plugin_config"]["exclude_namespaces"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let plan = |extra: &[&str]| {
            let mut cmd = std::process::Command::new(redirect_bin());
            cmd.args(["cni-plan", "--pod"])
                .arg(&pod)
                .args(["--exclude-namespaces", &exclude]);
            if !extra.is_empty() {
                cmd.arg("--").args(extra);
            }
            outcome(&mut cmd).expect("run redirect")
        };
        // The configuration: Istio's equivalent istio-iptables flags.
        let flags = plan(&[]);
        let expected_flags = shell_words(
            case["equivalent_istio_iptables_args"]
                .as_str()
                .expect("args"),
        );
        let got_flags = flags
            .stdout
            .trim()
            .strip_prefix("istio-iptables ")
            .map(shell_words)
            .unwrap_or_default();
        if flags.code != 0 || got_flags != expected_flags {
            failures.push(format!(
                "{name}: flags {flags:?}, expected {expected_flags:?}"
            ));
        }
        // The rules.
        let golden = fs::read_to_string(dir.join(case["golden"].as_str().expect("golden")))
            .expect("golden file");
        let rules = plan(&["--dry-run", "--ipv6=false"]);
        if rules.code != 0 || rules.stdout != golden {
            failures.push(format!(
                "{name}: exit {}, stderr {:?}\n--- expected\n{golden}--- got\n{}",
                rules.code, rules.stderr, rules.stdout
            ));
        }
        compared += 1;
    }
    let _ = fs::remove_dir_all(&scratch);
    eprintln!("istio-cni conformance: {compared} pods, rules and flags compared");
    assert_all_match("istio-cni conformance", compared, 9, &failures);
}
