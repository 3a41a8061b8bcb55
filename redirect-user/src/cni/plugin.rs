//! `redirect-cni`: the CNI plugin (the `redirect` binary run under that
//! name), chained after the pod network's plugins. It speaks the CNI
//! protocol (spec 1.0.0; the 0.3.x and 0.4.0 configurations runtimes still
//! send are accepted): `VERSION`; `ADD` sets up the capture Istio's own
//! CNI plugin would for the pod and passes `prevResult` through; `CHECK`
//! says whether that capture is in place; `DEL` removes it and succeeds
//! when there is nothing.
//!
//! What is captured and how is [`super::pod::plan`] (Istio's decisions),
//! applied through `redirect istio-iptables` with the pod's network
//! namespace, the pod's cgroup when found, and an instance named after
//! the container: auto mode installs eBPF on the pod cgroup (per-pod mode)
//! and Istio's iptables rules in the pod's namespace where it cannot. With
//! a `kubeconfig`, the pod is read from the Kubernetes API, as Istio's
//! plugin reads it ([`super::kube`]); without one, its annotations come
//! from the runtime (`io.kubernetes.cri.pod-annotations`) and what Istio's
//! plugin reads from the pod spec (the `istio-proxy` container's identity
//! and environment) from the configuration's `proxy`. ADD fails closed: an
//! error is returned, and the runtime does not start the pod, whenever the
//! pod cannot be read or the capture the plan asks for is not in place.
//!
//! The plugin configuration (besides the CNI fields):
//!
//! ```json
//! { "type": "redirect-cni",
//!   "mode": "auto",                       // or "ebpf", "iptables"
//!   "exclude_namespaces": ["kube-system"],
//!   "pod_cgroup_root": "/sys/fs/cgroup/kubepods",   // where pod cgroups are found by UID
//!   "node_set": "node",                   // optional: pods go in this node set (no cgroup needed)
//!   "kubeconfig": "/etc/cni/net.d/redirect-cni.kubeconfig", // optional: the pod from the API
//!   "log_file": "/var/log/redirect-cni.log",  // optional: one line per command
//!   "proxy": { "uid": 1337, "gid": 1337, "dns_capture": false,
//!              "invalid_drop": false, "dual_stack": false },
//!   "capabilities": { "io.kubernetes.cri.pod-annotations": true } }
//! ```

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use super::{
    pod::{Container, Scope},
    setup,
};

/// The configuration versions this plugin takes.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// The runtime-config capability the annotations arrive in.
pub const POD_ANNOTATIONS: &str = "io.kubernetes.cri.pod-annotations";

/// The spec's error codes this plugin returns.
pub(super) mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    /// Plugin-specific: the pod's capture could not be set up (or, for
    /// CHECK, is not in place).
    pub const CAPTURE: u32 = 100;
    /// Plugin-specific: a bad annotation value (Istio's wording).
    pub const ANNOTATION: u32 = 101;
}

/// A CNI error: its code, message and details.
#[derive(Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub(super) fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

/// What the plugin was asked, from its environment and stdin.
#[derive(Debug)]
pub struct Invocation {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS`, `K=V;K=V`.
    pub args: BTreeMap<String, String>,
    pub config: Value,
}

/// The plugin's own configuration keys.
#[derive(Debug, PartialEq, Eq)]
pub struct PluginConfig {
    pub version: String,
    pub mode: String,
    pub scope: Scope,
    pub pod_cgroup_root: Option<PathBuf>,
    /// Capture pods in this node set (`redirect node-set`) rather than with
    /// programs of their own, when it is loaded.
    pub node_set: Option<crate::instance::InstanceName>,
    /// Read the pod from the Kubernetes API with this kubeconfig (else:
    /// annotations from the runtime, the proxy from `proxy`).
    pub kubeconfig: Option<PathBuf>,
    /// Append one line per command here ([`log_command`]).
    pub log_file: Option<PathBuf>,
    pub proxy: Container,
}

/// Entry point when run as `redirect-cni`: one command, its result or
/// error JSON on stdout, reports on stderr; exit 0 or 1.
pub fn main() -> ExitCode {
    crate::REPORTS_TO_STDERR.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut stdin = String::new();
    let read = std::io::stdin().read_to_string(&mut stdin);
    let invocation = read
        .map_err(|err| {
            CniError::new(
                code::DECODE,
                "reading the configuration from stdin",
                err.to_string(),
            )
        })
        .and_then(|_| invocation(&stdin, |name| std::env::var(name).ok()));
    let version = invocation
        .as_ref()
        .ok()
        .and_then(|i| i.config.get("cniVersion").and_then(Value::as_str))
        .unwrap_or("1.0.0")
        .to_owned();
    let started = Instant::now();
    crate::ebpf::timing::start();
    let outcome = match &invocation {
        Ok(inv) => {
            let outcome = run(inv);
            let took = started.elapsed();
            crate::ebpf::timing::print();
            log_command(inv, &outcome, took);
            outcome
        }
        Err(err) => Err(CniError::new(err.code, &err.msg, &err.details)),
    };
    let mut out = std::io::stdout();
    match outcome {
        Ok(Some(result)) => {
            let _ = writeln!(out, "{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("redirect-cni: error: {}: {}", err.msg, err.details);
            let _ = writeln!(
                out,
                "{}",
                json!({"cniVersion": version, "code": err.code, "msg": err.msg, "details": err.details})
            );
            ExitCode::FAILURE
        }
    }
}

/// Appends one line for the command to the configuration's `log_file`,
/// if it names one: the time, the command, the container, the pod, the
/// microseconds the command took (from the configuration read to its
/// result, process start excluded) and its result. Best effort: a log that
/// cannot be written never fails a pod.
fn log_command(inv: &Invocation, outcome: &Result<Option<Value>, CniError>, took: Duration) {
    if inv.command == "VERSION" {
        return;
    }
    let Some(path) = plugin_config(&inv.config).ok().and_then(|c| c.log_file) else {
        return;
    };
    let arg = |key: &str| inv.args.get(key).map_or("-", String::as_str);
    let result = match outcome {
        Ok(_) => "ok".to_owned(),
        Err(err) => format!("error {}: {}: {}", err.code, err.msg, err.details),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let line = format!(
        "{now:.3}\t{}\tcontainer={}\tpod={}/{}\tuid={}\tmicros={}\t{}\n",
        inv.command,
        inv.container_id,
        arg("K8S_POD_NAMESPACE"),
        arg("K8S_POD_NAME"),
        arg("K8S_POD_UID"),
        took.as_micros(),
        result.replace(['\n', '\t'], " "),
    );
    // One write of an O_APPEND file: concurrent commands' lines do not mix.
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| file.write_all(line.as_bytes()));
}

/// Reads the invocation: `CNI_*` from `env`, the configuration from `stdin`.
pub fn invocation(
    stdin: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Invocation, CniError> {
    let command = env("CNI_COMMAND").unwrap_or_default();
    let config: Value = if stdin.trim().is_empty() && command == "VERSION" {
        json!({})
    } else {
        serde_json::from_str(stdin).map_err(|err| {
            CniError::new(
                code::DECODE,
                "the network configuration is not JSON",
                err.to_string(),
            )
        })?
    };
    let args = env("CNI_ARGS")
        .unwrap_or_default()
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Ok(Invocation {
        command,
        container_id: env("CNI_CONTAINERID").unwrap_or_default(),
        netns: env("CNI_NETNS").unwrap_or_default(),
        ifname: env("CNI_IFNAME").unwrap_or_default(),
        args,
        config,
    })
}

/// Runs one invocation: the JSON to print (none for DEL and CHECK).
pub fn run(inv: &Invocation) -> Result<Option<Value>, CniError> {
    if inv.command == "VERSION" {
        return Ok(Some(json!({
            "cniVersion": "1.0.0",
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let conf = plugin_config(&inv.config)?;
    let required = |name: &str, value: &str| {
        if value.is_empty() {
            Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("{name} is not set"),
                "the runtime sets it for ADD, CHECK and DEL",
            ))
        } else {
            Ok(())
        }
    };
    required("CNI_CONTAINERID", &inv.container_id)?;
    required("CNI_IFNAME", &inv.ifname)?;
    let instance = setup::instance_name(&inv.container_id)?;
    match inv.command.as_str() {
        "ADD" => {
            required("CNI_NETNS", &inv.netns)?;
            let Some(prev) = inv.config.get("prevResult") else {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    "redirect-cni is a chained plugin and got no prevResult",
                    "list it after the pod network's plugins in the conflist",
                ));
            };
            setup::add(inv, &conf, &instance)?;
            let mut result = prev.clone();
            if let Some(fields) = result.as_object_mut() {
                fields.insert("cniVersion".into(), json!(conf.version));
            }
            Ok(Some(result))
        }
        "CHECK" => {
            required("CNI_NETNS", &inv.netns)?;
            setup::check(inv, &conf, &instance).map(|()| None)
        }
        "DEL" => setup::del(inv, &conf, &instance).map(|()| None),
        other => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("unknown CNI_COMMAND {other:?}"),
            "ADD, CHECK, DEL or VERSION",
        )),
    }
}

/// The plugin's keys of the network configuration.
pub fn plugin_config(config: &Value) -> Result<PluginConfig, CniError> {
    let invalid = |msg: String| CniError::new(code::INVALID_CONFIG, msg, "see docs/cni.md");
    let version = config
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {version:?} is not supported"),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let mode = match config.get("mode") {
        None => "auto".to_owned(),
        Some(Value::String(m)) if ["auto", "ebpf", "iptables"].contains(&m.as_str()) => m.clone(),
        Some(other) => {
            return Err(invalid(format!(
                "mode {other} is not auto, ebpf or iptables"
            )));
        }
    };
    let strings = |key: &str| -> Result<Vec<String>, CniError> {
        match config.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| invalid(format!("{key}: {i} is not a string")))
                })
                .collect(),
            Some(other) => Err(invalid(format!("{key}: {other} is not a list of strings"))),
        }
    };
    let absolute = |key: &str| -> Result<Option<PathBuf>, CniError> {
        match config.get(key) {
            None => Ok(None),
            Some(Value::String(path)) if Path::new(path).is_absolute() => {
                Ok(Some(PathBuf::from(path)))
            }
            Some(other) => Err(invalid(format!("{key} {other} is not an absolute path"))),
        }
    };
    let kubeconfig = absolute("kubeconfig")?;
    let pod_cgroup_root = absolute("pod_cgroup_root")?;
    let node_set = match config.get("node_set") {
        None => None,
        Some(Value::String(name)) => Some(
            crate::instance::InstanceName::parse(name)
                .map_err(|why| invalid(format!("node_set {name:?}: {why}")))?,
        ),
        Some(other) => return Err(invalid(format!("node_set {other} is not a set name"))),
    };
    let log_file = absolute("log_file")?;
    let proxy = config.get("proxy").cloned().unwrap_or_else(|| json!({}));
    let id = |key: &str| -> Result<Option<i64>, CniError> {
        match proxy.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .filter(|id| (0..=i64::from(u32::MAX)).contains(id))
                .map(Some)
                .ok_or_else(|| invalid(format!("proxy.{key}: {v} is not a user or group id"))),
        }
    };
    let flag = |key: &str| -> Result<Option<(String, String)>, CniError> {
        match proxy.get(key) {
            None => Ok(None),
            Some(Value::Bool(on)) => Ok(Some((key.to_owned(), on.to_string()))),
            Some(other) => Err(invalid(format!(
                "proxy.{key}: {other} is not true or false"
            ))),
        }
    };
    let env = [
        ("dns_capture", "ISTIO_META_DNS_CAPTURE"),
        ("invalid_drop", "INVALID_DROP"),
        ("dual_stack", "ISTIO_DUAL_STACK"),
    ]
    .into_iter()
    .map(|(key, var)| flag(key).map(|set| set.map(|(_, on)| (var.to_owned(), on))))
    .collect::<Result<Vec<_>, _>>()?
    .into_iter()
    .flatten()
    .collect();
    Ok(PluginConfig {
        version,
        mode,
        scope: Scope {
            exclude_namespaces: strings("exclude_namespaces")?,
        },
        pod_cgroup_root,
        node_set,
        kubeconfig,
        log_file,
        proxy: Container {
            name: "istio-proxy".into(),
            args: Vec::new(),
            env,
            run_as_user: id("uid")?,
            run_as_group: id("gid")?,
        },
    })
}

/// The `CNI_*` environment of a test, as [`invocation`] reads it.
#[cfg(test)]
pub(super) fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_lists_what_it_takes() {
        let inv = invocation("", env(&[("CNI_COMMAND", "VERSION")])).unwrap();
        let out = run(&inv).unwrap().unwrap();
        assert_eq!(out["cniVersion"], "1.0.0");
        assert_eq!(
            out["supportedVersions"].as_array().unwrap().len(),
            SUPPORTED_VERSIONS.len()
        );
    }

    #[test]
    fn bad_configurations_are_cni_errors_with_their_codes() {
        let cases: [(&str, u32); 7] = [
            ("not json", code::DECODE),
            (r#"{"cniVersion":"0.2.0"}"#, code::INCOMPATIBLE_VERSION),
            (
                r#"{"cniVersion":"1.0.0","mode":"fast"}"#,
                code::INVALID_CONFIG,
            ),
            (
                r#"{"cniVersion":"1.0.0","proxy":{"uid":-1}}"#,
                code::INVALID_CONFIG,
            ),
            (
                r#"{"cniVersion":"1.0.0","kubeconfig":"etc/k"}"#,
                code::INVALID_CONFIG,
            ),
            (
                r#"{"cniVersion":"1.0.0","pod_cgroup_root":"rel"}"#,
                code::INVALID_CONFIG,
            ),
            (
                r#"{"cniVersion":"1.0.0","log_file":"cni.log"}"#,
                code::INVALID_CONFIG,
            ),
        ];
        for (conf, want) in cases {
            let vars = [
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
            ];
            let got = invocation(conf, env(&vars)).and_then(|inv| run(&inv));
            assert_eq!(got.err().map(|e| e.code), Some(want), "{conf}");
        }
        // Missing environment, and a chained plugin without prevResult.
        let inv = invocation(r#"{"cniVersion":"1.0.0"}"#, env(&[("CNI_COMMAND", "ADD")])).unwrap();
        assert_eq!(
            run(&inv).err().map(|e| e.code),
            Some(code::INVALID_ENVIRONMENT)
        );
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/x"),
        ];
        let inv = invocation(r#"{"cniVersion":"1.0.0"}"#, env(&vars)).unwrap();
        assert_eq!(run(&inv).err().map(|e| e.code), Some(code::INVALID_CONFIG));
    }

    #[test]
    fn the_log_file_gets_one_line_per_command_with_its_result() {
        let dir = std::env::temp_dir().join(format!("redirect-cni-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("cni.log");
        let conf = json!({"cniVersion": "1.0.0", "log_file": log}).to_string();
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/x"),
            (
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web;K8S_POD_UID=u1",
            ),
        ];
        let inv = invocation(&conf, env(&vars)).unwrap();
        // No prevResult: ADD fails before it touches anything.
        let outcome = run(&inv);
        log_command(&inv, &outcome, Duration::from_micros(1234));
        let version = invocation("", env(&[("CNI_COMMAND", "VERSION")])).unwrap();
        log_command(&version, &run(&version), Duration::ZERO);
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let fields: Vec<&str> = lines[0].split('\t').collect();
        assert_eq!(
            fields[1..],
            [
                "ADD",
                "container=c1",
                "pod=ns/web",
                "uid=u1",
                "micros=1234",
                "error 7: redirect-cni is a chained plugin and got no prevResult: \
                 list it after the pod network's plugins in the conflist",
            ]
        );
    }
}
