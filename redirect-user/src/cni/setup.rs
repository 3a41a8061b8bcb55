//! What `redirect-cni` does for one pod ([`super::plugin`] speaks the
//! protocol): the pod as the plugin sees it (from the Kubernetes API or
//! from the runtime and the configuration), its cgroup found by UID, and
//! ADD, CHECK and DEL of its capture.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Parser as _;
use serde_json::Value;

use super::{
    plugin::{CniError, Invocation, POD_ANNOTATIONS, PluginConfig, code},
    pod::{Plan, Pod, plan},
};
use crate::{cli::IstioIptablesCommand, instance::InstanceName};

/// The pod as the plugin sees it: with a kubeconfig, the API's object of
/// the pod `CNI_ARGS` names (ADD fails when it cannot be read); else its
/// name from `CNI_ARGS`, its annotations from the runtime config, its
/// proxy from the plugin configuration.
pub fn pod(inv: &Invocation, conf: &PluginConfig) -> Result<Pod, CniError> {
    let Some(kubeconfig) = &conf.kubeconfig else {
        return Ok(pod_from_runtime(inv, conf));
    };
    let arg = |key: &str| inv.args.get(key).cloned().unwrap_or_default();
    super::kube::load(kubeconfig)
        .and_then(|cluster| {
            super::kube::get_pod(&cluster, &arg("K8S_POD_NAMESPACE"), &arg("K8S_POD_NAME"))
        })
        .map_err(|err| {
            CniError::new(
                code::CAPTURE,
                "the pod could not be read from the Kubernetes API",
                format!("{err:#}"),
            )
        })
}

/// The pod without the API: see [`pod`].
fn pod_from_runtime(inv: &Invocation, conf: &PluginConfig) -> Pod {
    let annotations = inv
        .config
        .get("runtimeConfig")
        .and_then(|r| r.get(POD_ANNOTATIONS))
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let arg = |key: &str| inv.args.get(key).cloned().unwrap_or_default();
    Pod {
        namespace: arg("K8S_POD_NAMESPACE"),
        name: arg("K8S_POD_NAME"),
        annotations,
        labels: BTreeMap::new(),
        containers: vec![conf.proxy.clone()],
    }
}

/// The instance of container `id`: `cni-<id>`.
pub(super) fn instance_name(id: &str) -> Result<InstanceName, CniError> {
    InstanceName::parse(&format!("cni-{id}")).map_err(|err| {
        CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_CONTAINERID cannot name an instance",
            err,
        )
    })
}

/// Why a pod is left alone before anything is read of it: its namespace
/// is excluded. Istio's plugin checks that before it asks the API too, so
/// that an unreachable API server cannot stop, say, kube-system's pods.
fn excluded_namespace(inv: &Invocation, conf: &PluginConfig) -> Option<String> {
    let namespace = inv.args.get("K8S_POD_NAMESPACE")?;
    conf.scope
        .exclude_namespaces
        .contains(namespace)
        .then(|| format!("namespace {namespace} is excluded"))
}

pub(super) fn add(
    inv: &Invocation,
    conf: &PluginConfig,
    instance: &InstanceName,
) -> Result<(), CniError> {
    if let Some(why) = excluded_namespace(inv, conf) {
        eprintln!("redirect-cni: the pod is not captured: {why}");
        return Ok(());
    }
    let pod = pod(inv, conf)?;
    let flags = match plan(&pod, &conf.scope) {
        Err(why) => {
            return Err(CniError::new(
                code::ANNOTATION,
                why,
                "the pod is not started",
            ));
        }
        Ok(Plan::Skip(why)) => {
            eprintln!(
                "redirect-cni: pod {}/{} is not captured: {why}",
                pod.namespace, pod.name
            );
            return Ok(());
        }
        Ok(Plan::Capture(flags)) => flags,
    };
    let uid = inv.args.get("K8S_POD_UID").cloned().unwrap_or_default();
    if let Some(set) = conf.node_set.as_ref().filter(|_| conf.mode != "iptables") {
        // A node set finds the pod by its network namespace: no cgroup.
        let mut argv = istio_argv(flags, &conf.mode, inv, instance);
        argv.extend([OsString::from("--node-set"), OsString::from(set.as_str())]);
        return run_istio_iptables(&argv);
    }
    let cgroup = pod_cgroup(conf.pod_cgroup_root.as_deref(), &uid);
    let mode = match (&cgroup, conf.mode.as_str()) {
        (Some(_), mode) => mode.to_owned(),
        (None, "ebpf") => {
            return Err(CniError::new(
                code::CAPTURE,
                format!("mode ebpf: the cgroup of pod UID {uid:?} was not found"),
                "set pod_cgroup_root to the directory holding pod cgroups, or mode auto",
            ));
        }
        (None, _) => {
            eprintln!(
                "redirect-cni: the cgroup of pod UID {uid:?} was not found: iptables in its network namespace"
            );
            "iptables".to_owned()
        }
    };
    let mut argv = istio_argv(flags, &mode, inv, instance);
    if let Some(cg) = &cgroup {
        argv.extend([OsString::from("--cgroup"), cg.clone().into_os_string()]);
    }
    run_istio_iptables(&argv)
}

/// `redirect istio-iptables FLAGS --mode MODE --netns <the pod's>
/// --instance INSTANCE`.
fn istio_argv(
    flags: Vec<String>,
    mode: &str,
    inv: &Invocation,
    instance: &InstanceName,
) -> Vec<OsString> {
    let mut argv = vec![OsString::from("istio-iptables")];
    argv.extend(flags.into_iter().map(OsString::from));
    argv.extend(
        [
            "--mode",
            mode,
            "--netns",
            &inv.netns,
            "--instance",
            instance.as_str(),
        ]
        .map(OsString::from),
    );
    argv
}

/// Runs istio-iptables in this process with `argv`: the pod's capture in
/// place, or the error that fails ADD.
fn run_istio_iptables(argv: &[OsString]) -> Result<(), CniError> {
    let capture_error = |detail: String| {
        CniError::new(
            code::CAPTURE,
            "the pod's capture could not be set up",
            detail,
        )
    };
    crate::ebpf::timing::mark(|| "pod and plan".into());
    let command =
        IstioIptablesCommand::try_parse_from(argv).map_err(|err| capture_error(err.to_string()))?;
    crate::ebpf::timing::mark(|| "istio-iptables command line".into());
    match crate::cmd::istio_iptables::istio_iptables(&command.args) {
        Ok(code) if code == ExitCode::SUCCESS => Ok(()),
        Ok(_) => Err(capture_error(
            "istio-iptables refused it (its message is on stderr)".into(),
        )),
        Err(err) => Err(capture_error(format!("{err:#}"))),
    }
}

pub(super) fn check(
    inv: &Invocation,
    conf: &PluginConfig,
    instance: &InstanceName,
) -> Result<(), CniError> {
    if matches!(conf.version.as_str(), "0.3.0" | "0.3.1") {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "CHECK needs cniVersion 0.4.0 or later",
            conf.version.clone(),
        ));
    }
    if excluded_namespace(inv, conf).is_some() {
        return Ok(());
    }
    let pod = pod(inv, conf)?;
    match plan(&pod, &conf.scope) {
        Err(why) => return Err(CniError::new(code::ANNOTATION, why, "")),
        Ok(Plan::Skip(_)) => return Ok(()),
        Ok(Plan::Capture(_)) => {}
    }
    let not_in_place =
        |detail: String| CniError::new(code::CAPTURE, "the pod's capture is not in place", detail);
    if let Some(set) = &conf.node_set
        && crate::ebpf::node_set::has_pod(set, instance)
            .map_err(|e| not_in_place(format!("{e:#}")))?
    {
        return Ok(());
    }
    if crate::bpffs::instance_dir(instance).exists() {
        let status = crate::cmd::status::collect(Some(instance))
            .map_err(|e| not_in_place(format!("{e:#}")))?;
        return match status.incomplete.first() {
            Some(broken) => Err(not_in_place(broken.problem.clone())),
            None if status.instances.is_empty() => {
                Err(not_in_place(format!("instance {instance} is gone")))
            }
            None => Ok(()),
        };
    }
    crate::netns::enter(Path::new(&inv.netns)).map_err(|e| not_in_place(format!("{e:#}")))?;
    let backend =
        crate::iptables::apply::Backend::detect().map_err(|e| not_in_place(format!("{e:#}")))?;
    let rules = crate::iptables::apply::save(backend, crate::iptables::builder::Family::V4)
        .map_err(|e| not_in_place(format!("{e:#}")))?;
    if rules.lines().any(|l| l.starts_with(":ISTIO_OUTPUT ")) {
        Ok(())
    } else {
        Err(not_in_place(format!(
            "no eBPF instance {instance} and no Istio rules in {}",
            inv.netns
        )))
    }
}

pub(super) fn del(
    inv: &Invocation,
    conf: &PluginConfig,
    instance: &InstanceName,
) -> Result<(), CniError> {
    let failed = |detail: String| {
        CniError::new(
            code::CAPTURE,
            "the pod's capture could not be removed",
            detail,
        )
    };
    // Out of the node set first (a map write), when it is in one.
    let mut in_ebpf = false;
    if let Some(set) = &conf.node_set
        && crate::ebpf::node_set::is_loaded(set)
    {
        in_ebpf =
            crate::ebpf::node_set::remove(set, instance).map_err(|e| failed(format!("{e:#}")))?;
    }
    // Only a pod captured with eBPF has an instance (and needs the bpf
    // privileges and lock its removal takes).
    if crate::ebpf::loader::is_installed(instance) {
        crate::ebpf::loader::uninstall(instance).map_err(|e| failed(format!("{e:#}")))?;
        in_ebpf = true;
    }
    // ADD captured the pod one way: with eBPF there are no rules to look
    // for (a dozen iptables processes, ~15 ms of a node-set pod's DEL).
    if in_ebpf {
        return Ok(());
    }
    // The rules go with the namespace when it is gone already.
    if inv.netns.is_empty() || !Path::new(&inv.netns).exists() {
        return Ok(());
    }
    crate::netns::enter(Path::new(&inv.netns)).map_err(|e| failed(format!("{e:#}")))?;
    // A node without iptables has no rules to remove.
    if crate::iptables::apply::Backend::detect().is_ok() {
        crate::iptables::apply::remove_istio_rules().map_err(|e| failed(format!("{e:#}")))?;
    }
    Ok(())
}

/// The pod's cgroup below `root` (by default the cgroup2 mount's
/// `kubepods`): the directory named for its UID as the cgroupfs driver
/// names it (`pod<uid>`) or the systemd driver (`kubepods-<qos>-pod<uid
/// with _>.slice`), at most three levels down.
pub fn pod_cgroup(root: Option<&Path>, uid: &str) -> Option<PathBuf> {
    if uid.is_empty() || !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return None;
    }
    let root = match root {
        Some(root) => root.to_path_buf(),
        None => crate::cgroup::cgroup2_mounts()
            .ok()?
            .first()?
            .join("kubepods"),
    };
    let names = [
        format!("pod{uid}"),
        format!("pod{}.slice", uid.replace('-', "_")),
    ];
    let mut level = vec![root];
    for _ in 0..3 {
        let mut next = Vec::new();
        for dir in &level {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                // Following links: a cgroup tree has none, and a root of
                // links lets pod cgroups be named from elsewhere.
                if !entry.path().is_dir() {
                    continue;
                }
                if names
                    .iter()
                    .any(|n| name == *n || name.ends_with(&format!("-{n}")))
                {
                    return Some(entry.path());
                }
                next.push(entry.path());
            }
        }
        level = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::plugin::{env, invocation, plugin_config};

    const CONF: &str = r#"{"cniVersion":"1.0.0","name":"net","type":"redirect-cni",
        "exclude_namespaces":["kube-system"],
        "proxy":{"uid":1337,"gid":1337,"dns_capture":true},
        "runtimeConfig":{"io.kubernetes.cri.pod-annotations":{
            "sidecar.istio.io/status":"{}",
            "traffic.sidecar.istio.io/excludeOutboundPorts":"9000"}},
        "prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.5/24"}]}}"#;

    #[test]
    fn an_excluded_namespace_is_left_alone_before_the_api_is_asked() {
        let conf_text = CONF.replace(
            r#""exclude_namespaces""#,
            r#""kubeconfig":"/nonexistent/redirect-cni.kubeconfig","exclude_namespaces""#,
        );
        let call = |namespace: &str| {
            let args = format!("K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=p;K8S_POD_UID=u");
            let inv = invocation(&conf_text, env(&[("CNI_ARGS", args.as_str())])).unwrap();
            let conf = plugin_config(&inv.config).unwrap();
            let instance = instance_name("c1").unwrap();
            (
                add(&inv, &conf, &instance).map_err(|e| e.code),
                check(&inv, &conf, &instance).map_err(|e| e.code),
            )
        };
        // No API request: the kubeconfig does not even exist.
        assert_eq!(call("kube-system"), (Ok(()), Ok(())));
        // Any other pod is read from the API: that fails closed.
        assert_eq!(call("shop"), (Err(code::CAPTURE), Err(code::CAPTURE)));
    }

    #[test]
    fn the_pod_is_its_annotations_and_the_configured_proxy() {
        let inv = invocation(
            CONF,
            env(&[(
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1;K8S_POD_UID=u-1",
            )]),
        )
        .unwrap();
        let conf = plugin_config(&inv.config).unwrap();
        let pod = pod(&inv, &conf).unwrap();
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("shop", "cart-1")
        );
        let Plan::Capture(flags) = plan(&pod, &conf.scope).unwrap() else {
            panic!("not captured")
        };
        let text = flags.join(" ");
        assert!(text.contains("-o 9000 "), "{text}");
        assert!(text.contains("--redirect-dns --capture-all-dns"), "{text}");
        // Out of scope: the excluded namespace, a pod without the status annotation.
        let mut other = pod.clone();
        other.namespace = "kube-system".into();
        assert!(matches!(plan(&other, &conf.scope), Ok(Plan::Skip(_))));
        let mut plain = pod;
        plain.annotations.clear();
        assert!(matches!(plan(&plain, &conf.scope), Ok(Plan::Skip(_))));
    }

    #[test]
    fn pod_cgroups_are_found_by_uid_under_either_driver() {
        let root = std::env::temp_dir().join(format!("redirect-cni-cg-{}", std::process::id()));
        let cgroupfs = root.join("burstable/pod12ab-34cd");
        let systemd = root.join("kubepods-besteffort.slice/kubepods-besteffort-pod56ef_78ab.slice");
        std::fs::create_dir_all(&cgroupfs).unwrap();
        std::fs::create_dir_all(&systemd).unwrap();
        assert_eq!(pod_cgroup(Some(&root), "12ab-34cd"), Some(cgroupfs));
        assert_eq!(pod_cgroup(Some(&root), "56ef-78ab"), Some(systemd));
        assert_eq!(pod_cgroup(Some(&root), "0000"), None);
        assert_eq!(pod_cgroup(Some(&root), "../x"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
