//! Which pods get capture from the CNI plugin, and with which
//! istio-iptables flags: the decisions Istio's own CNI plugin makes for a
//! pod in sidecar mode, as one pure function ([`plan`]) of what it reads
//! of the pod (annotations and labels, container names, and the
//! `istio-proxy` container's arguments, environment and security context).
//!
//! The flags are exactly the configuration Istio's plugin builds (its
//! `NewRedirect`), spelled as an istio-iptables command line, so that every
//! backend takes them through the one istio-iptables resolution: Istio's
//! defaults for a CNI pod (`-i '*'`, `-b '*'`, `-o 15020`, `-d` always
//! extended by `15020,15021,15090`), the proxy's uid and gid from its
//! `runAsUser`/`runAsGroup` (1337 when unset or 0), DNS capture of every
//! server when the proxy's `ISTIO_META_DNS_CAPTURE` is true (the plugin
//! cannot know the pod's nameservers), `--drop-invalid` from its
//! `INVALID_DROP`, `--dual-stack` from its `ISTIO_DUAL_STACK`. A bad
//! annotation value is an error worded as Istio words it, so that ADD fails
//! and the pod does not start.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::capture::parse::parse_bool;

/// The annotation that marks a pod the injector has given a sidecar.
pub const STATUS: &str = "sidecar.istio.io/status";
/// The label (or annotation) that turns injection off.
pub const INJECT: &str = "sidecar.istio.io/inject";
const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
const REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";

/// The inbound ports the plugin never captures, whatever the annotation:
/// the proxy's status, health and metrics ports.
const ALWAYS_EXCLUDED_INBOUND: &str = "15020,15021,15090";
/// The proxy's identity when its security context does not set one.
const DEFAULT_PROXY_ID: i64 = 1337;

/// One container of the pod, as far as the plugin looks at it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Container {
    pub name: String,
    pub args: Vec<String>,
    /// Environment variables with a literal value (`valueFrom` reads as "").
    pub env: BTreeMap<String, String>,
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
}

/// What the plugin knows of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub annotations: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    /// Containers and init containers (native sidecars among them) alike.
    pub containers: Vec<Container>,
}

/// The plugin configuration's say in which pods are in scope.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// Namespaces whose pods are never captured.
    pub exclude_namespaces: Vec<String>,
}

/// What the plugin does with a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing: the pod is not the plugin's (why).
    Skip(String),
    /// Capture with these istio-iptables flags.
    Capture(Vec<String>),
}

/// Istio's CNI plugin's decision for `pod` (see the module documentation);
/// `Err` is a bad annotation value, in Istio's words.
pub fn plan(pod: &Pod, scope: &Scope) -> Result<Plan, String> {
    if let Some(why) = out_of_scope(pod, scope) {
        return Ok(Plan::Skip(why));
    }
    let proxy = pod
        .containers
        .iter()
        .find(|c| c.name == "istio-proxy")
        .cloned()
        .unwrap_or_default();
    let annotation =
        |key: &str, name: &str, default: &str, valid: fn(&str) -> Result<(), String>| match pod
            .annotations
            .get(key)
        {
            Some(value) => valid(value).map(|()| value.clone()).map_err(|err| {
                format!("annotation value error for value {name}; annotationFound = true: {err}")
            }),
            None => Ok(default.to_owned()),
        };
    let mode = annotation(
        INTERCEPTION_MODE,
        "redirectMode",
        "REDIRECT",
        interception_mode,
    )?;
    let include_cidrs = annotation(INCLUDE_OUTBOUND_IP_RANGES, "includeIPCidrs", "*", |v| {
        if v == "*" {
            return Ok(());
        }
        cidr_list(v).map_err(|e| format!("IPRanges invalid: {e}"))
    })?;
    let exclude_cidrs = annotation(EXCLUDE_OUTBOUND_IP_RANGES, "excludeIPCidrs", "", cidr_list)?;
    let exclude_inbound = annotation(
        EXCLUDE_INBOUND_PORTS,
        "excludeInboundPorts",
        "15020",
        port_list_or_all,
    )?;
    let include_inbound = annotation(
        INCLUDE_INBOUND_PORTS,
        "includeInboundPorts",
        "*",
        port_list_or_all,
    )?;
    let exclude_outbound = annotation(
        EXCLUDE_OUTBOUND_PORTS,
        "excludeOutboundPorts",
        "15020",
        port_list_or_all,
    )?;
    let include_outbound = annotation(
        INCLUDE_OUTBOUND_PORTS,
        "includeOutboundPorts",
        "",
        port_list_or_all,
    )?;
    let exclude_inbound = with_always_excluded(&exclude_inbound);
    let exclude_interfaces =
        annotation(EXCLUDE_INTERFACES, "excludeInterfaces", "", interface_names)?;
    // The deprecated annotation counts only without the new one.
    let virtual_interfaces = if pod.annotations.contains_key(REROUTE_VIRTUAL_INTERFACES) {
        annotation(
            REROUTE_VIRTUAL_INTERFACES,
            "reroute-virtual-interfaces",
            "",
            |_| Ok(()),
        )?
    } else {
        annotation(KUBEVIRT_INTERFACES, "kubevirtInterfaces", "", |_| Ok(()))?
    };
    let id = |set: Option<i64>| match set {
        Some(id) if id != 0 => id.to_string(),
        _ => DEFAULT_PROXY_ID.to_string(),
    };
    // An environment value that is not a boolean counts as off.
    let env_on = |name: &str| {
        proxy
            .env
            .get(name)
            .and_then(|v| parse_bool(v))
            .unwrap_or(false)
    };
    let mut flags: Vec<String> = [
        ("-p", "15001".to_owned()),
        ("-z", "15006".to_owned()),
        ("-e", "15008".to_owned()),
        ("-u", id(proxy.run_as_user)),
        ("-g", id(proxy.run_as_group)),
        ("-t", "1337".to_owned()),
        ("-r", "133".to_owned()),
        ("-b", include_inbound),
        ("-i", include_cidrs),
        ("-m", mode),
        ("-d", exclude_inbound),
        ("-x", exclude_cidrs),
        ("-q", include_outbound),
        ("-o", exclude_outbound),
        ("-k", virtual_interfaces),
        ("-c", exclude_interfaces),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_owned(), value])
    .collect();
    if env_on("ISTIO_META_DNS_CAPTURE") {
        flags.extend(["--redirect-dns".to_owned(), "--capture-all-dns".to_owned()]);
    }
    if env_on("INVALID_DROP") {
        flags.push("--drop-invalid".to_owned());
    }
    if env_on("ISTIO_DUAL_STACK") {
        flags.push("--dual-stack".to_owned());
    }
    Ok(Plan::Capture(flags))
}

/// Why the plugin leaves `pod` alone, in the order Istio's plugin checks.
fn out_of_scope(pod: &Pod, scope: &Scope) -> Option<String> {
    if scope.exclude_namespaces.contains(&pod.namespace) {
        return Some(format!("namespace {} is excluded", pod.namespace));
    }
    if pod.containers.iter().any(|c| c.name == "istio-init") {
        return Some("the pod has an istio-init container (it sets up its own capture)".into());
    }
    let Some(proxy) = pod.containers.iter().find(|c| c.name == "istio-proxy") else {
        return Some("the pod has no istio-proxy container".into());
    };
    if proxy
        .env
        .get("DISABLE_ENVOY")
        .and_then(|v| parse_bool(v))
        .unwrap_or(false)
    {
        return Some("istio-proxy has DISABLE_ENVOY set".into());
    }
    if let [first, kind, ..] = proxy.args.as_slice()
        && first == "proxy"
        && kind != "sidecar"
    {
        return Some(format!("istio-proxy runs as a {kind}, not a sidecar"));
    }
    let inject = pod
        .labels
        .get(INJECT)
        .or_else(|| pod.annotations.get(INJECT));
    if inject.and_then(|v| parse_bool(v)) == Some(false) {
        return Some(format!("{INJECT} is false"));
    }
    if !pod.annotations.contains_key(STATUS) {
        return Some(format!(
            "the pod has no {STATUS} annotation (no sidecar injected)"
        ));
    }
    None
}

/// `-d` as the plugin passes it: the annotation (or default), trimmed,
/// with the always-excluded ports after it and each port kept once.
fn with_always_excluded(ports: &str) -> String {
    let ports = ports.trim();
    let mut list = ports.to_owned();
    if !list.is_empty() && !list.ends_with(',') {
        list.push(',');
    }
    list.push_str(ALWAYS_EXCLUDED_INBOUND);
    let mut seen = Vec::new();
    for port in list.split(',') {
        if !seen.contains(&port) {
            seen.push(port);
        }
    }
    seen.join(",")
}

fn interception_mode(mode: &str) -> Result<(), String> {
    match mode {
        "REDIRECT" | "TPROXY" => Ok(()),
        other => Err(format!("interceptionMode invalid: {other}")),
    }
}

/// Comma-separated CIDRs (none at all is fine; an empty item is not).
fn cidr_list(cidrs: &str) -> Result<(), String> {
    if cidrs.is_empty() {
        return Ok(());
    }
    for cidr in cidrs.split(',') {
        let valid = cidr.split_once('/').is_some_and(|(addr, bits)| {
            let max = match addr.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(_)) => 32,
                Ok(std::net::IpAddr::V6(_)) => 128,
                Err(_) => return false,
            };
            // Go's netip.ParsePrefix: decimal bits without a sign or leading zero.
            (bits == "0" || !bits.starts_with('0'))
                && bits.bytes().all(|b| b.is_ascii_digit())
                && bits.parse::<u32>().is_ok_and(|b| b <= max)
        });
        if !valid {
            return Err(format!("failed parsing cidr '{cidr}'"));
        }
    }
    Ok(())
}

/// `*`, or comma-separated ports, each trimmed (an empty item is an error).
fn port_list_or_all(ports: &str) -> Result<(), String> {
    if ports == "*" {
        return Ok(());
    }
    let trimmed = ports.trim();
    if trimmed.is_empty() {
        return Ok(());
    }
    for port in trimmed.split(',') {
        let digits = port.trim();
        // Go's ParseUint: decimal digits only (no sign).
        if !digits.bytes().all(|b| b.is_ascii_digit()) || digits.parse::<u16>().is_err() {
            return Err(format!(
                "portList {ports:?} invalid: failed parsing port {port:?}"
            ));
        }
    }
    Ok(())
}

/// Interface names as the kernel takes them: 1 to 15 bytes, no `/`, no
/// whitespace, not `.` or `..` (none at all is fine).
fn interface_names(names: &str) -> Result<(), String> {
    if names.is_empty() {
        return Ok(());
    }
    for name in names.split(',') {
        let valid = (1..=15).contains(&name.len())
            && name != "."
            && name != ".."
            && !name
                .bytes()
                .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace());
        if !valid {
            return Err(format!("interface name {name:?} is not valid"));
        }
    }
    Ok(())
}

impl Pod {
    /// A pod from its Kubernetes object (JSON, as the API serves it):
    /// metadata and every container and init container.
    pub fn from_json(text: &str) -> Result<Self> {
        let pod: Value = serde_json::from_str(text).context("the pod is not JSON")?;
        let Some(meta) = pod.get("metadata") else {
            bail!("the pod has no metadata");
        };
        let text_of = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_owned();
        let map = |v: Option<&Value>| -> BTreeMap<String, String> {
            v.and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .unwrap_or_default()
        };
        let spec = pod.get("spec");
        let containers = ["initContainers", "containers"]
            .iter()
            .filter_map(|list| spec.and_then(|s| s.get(*list)).and_then(Value::as_array))
            .flatten()
            .map(|c| Container {
                name: text_of(c.get("name")),
                args: c
                    .get("args")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().map(|v| text_of(Some(v))).collect())
                    .unwrap_or_default(),
                env: c
                    .get("env")
                    .and_then(Value::as_array)
                    .map(|env| {
                        env.iter()
                            .map(|e| (text_of(e.get("name")), text_of(e.get("value"))))
                            .collect()
                    })
                    .unwrap_or_default(),
                run_as_user: c
                    .get("securityContext")
                    .and_then(|s| s.get("runAsUser"))
                    .and_then(Value::as_i64),
                run_as_group: c
                    .get("securityContext")
                    .and_then(|s| s.get("runAsGroup"))
                    .and_then(Value::as_i64),
            })
            .collect();
        Ok(Self {
            namespace: text_of(meta.get("namespace")),
            name: text_of(meta.get("name")),
            annotations: map(meta.get("annotations")),
            labels: map(meta.get("labels")),
            containers,
        })
    }
}

/// `flags` as a shell reads them back: plain words as they are, anything
/// else (the empty string, `*`) in single quotes.
pub fn shell_line(flags: &[String]) -> String {
    flags
        .iter()
        .map(|f| {
            let plain = !f.is_empty()
                && f.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.,:/=@%+".contains(&b));
            if plain {
                f.clone()
            } else {
                format!("'{}'", f.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecar_pod(annotations: &[(&str, &str)]) -> Pod {
        let mut pod = Pod {
            namespace: "testNS".into(),
            name: "testPod".into(),
            containers: vec![
                Container {
                    name: "test".into(),
                    ..Container::default()
                },
                Container {
                    name: "istio-proxy".into(),
                    ..Container::default()
                },
            ],
            ..Pod::default()
        };
        pod.annotations.insert(STATUS.into(), "true".into());
        for (k, v) in annotations {
            pod.annotations.insert((*k).into(), (*v).into());
        }
        pod
    }

    fn flag(plan: &Plan, name: &str) -> String {
        let Plan::Capture(flags) = plan else {
            panic!("not captured: {plan:?}");
        };
        let at = flags.iter().position(|f| f == name).expect("flag");
        flags[at + 1].clone()
    }

    #[test]
    fn pods_outside_the_plugins_scope_are_left_alone() {
        let scope = Scope {
            exclude_namespaces: vec!["testExcludeNS".into()],
        };
        let mut no_status = sidecar_pod(&[]);
        no_status.annotations.clear();
        let mut excluded = sidecar_pod(&[]);
        excluded.namespace = "testExcludeNS".into();
        let mut with_init = sidecar_pod(&[]);
        with_init.containers.push(Container {
            name: "istio-init".into(),
            ..Container::default()
        });
        let mut no_proxy = sidecar_pod(&[]);
        no_proxy.containers.retain(|c| c.name != "istio-proxy");
        let mut router = sidecar_pod(&[]);
        router.containers[1].args = vec!["proxy".into(), "router".into()];
        let mut disabled = sidecar_pod(&[]);
        disabled.containers[1]
            .env
            .insert("DISABLE_ENVOY".into(), "true".into());
        let not_injected = sidecar_pod(&[(INJECT, "false")]);
        let mut label_wins = sidecar_pod(&[(INJECT, "true")]);
        label_wins.labels.insert(INJECT.into(), "false".into());
        for pod in [
            no_status,
            excluded,
            with_init,
            no_proxy,
            router,
            disabled,
            not_injected,
            label_wins,
        ] {
            assert!(matches!(plan(&pod, &scope), Ok(Plan::Skip(_))), "{pod:?}");
        }
        // Not a boolean: ignored, as Istio ignores it.
        let odd = sidecar_pod(&[(INJECT, "maybe")]);
        assert!(matches!(plan(&odd, &scope), Ok(Plan::Capture(_))));
        let mut sidecar = sidecar_pod(&[]);
        sidecar.containers[1].args = vec!["proxy".into(), "sidecar".into()];
        assert!(matches!(plan(&sidecar, &scope), Ok(Plan::Capture(_))));
    }

    #[test]
    fn excluded_inbound_ports_always_end_with_the_proxys_own() {
        let scope = Scope::default();
        for (annotation, expected) in [
            (None, "15020,15021,15090"),
            (Some(""), "15020,15021,15090"),
            (Some("3306"), "3306,15020,15021,15090"),
            (Some(" 15021,80 "), "15021,80,15020,15090"),
        ] {
            let pod = match annotation {
                Some(v) => sidecar_pod(&[(EXCLUDE_INBOUND_PORTS, v)]),
                None => sidecar_pod(&[]),
            };
            assert_eq!(flag(&plan(&pod, &scope).unwrap(), "-d"), expected);
        }
    }

    #[test]
    fn the_proxys_identity_and_environment_become_flags() {
        let mut pod = sidecar_pod(&[]);
        pod.containers[1].run_as_user = Some(0);
        pod.containers[1].run_as_group = Some(7);
        pod.containers[1]
            .env
            .insert("ISTIO_META_DNS_CAPTURE".into(), "yes".into());
        pod.containers[1]
            .env
            .insert("INVALID_DROP".into(), "1".into());
        let planned = plan(&pod, &Scope::default()).unwrap();
        assert_eq!(flag(&planned, "-u"), "1337");
        assert_eq!(flag(&planned, "-g"), "7");
        let Plan::Capture(flags) = planned else {
            unreachable!()
        };
        assert!(
            !flags.contains(&"--redirect-dns".to_owned()),
            "not a bool: off"
        );
        assert!(flags.contains(&"--drop-invalid".to_owned()));
    }

    #[test]
    fn bad_annotation_values_fail_in_istios_words() {
        for (key, value, name) in [
            (INTERCEPTION_MODE, "NONE", "redirectMode"),
            (INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8,", "includeIPCidrs"),
            (EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0", "excludeIPCidrs"),
            (INCLUDE_INBOUND_PORTS, "80,http", "includeInboundPorts"),
            (EXCLUDE_INBOUND_PORTS, "70000", "excludeInboundPorts"),
            (EXCLUDE_OUTBOUND_PORTS, "1,,2", "excludeOutboundPorts"),
            (INCLUDE_OUTBOUND_PORTS, "-1", "includeOutboundPorts"),
            (INCLUDE_OUTBOUND_PORTS, "+1", "includeOutboundPorts"),
            (EXCLUDE_INTERFACES, "eth0,a/b", "excludeInterfaces"),
        ] {
            let err = plan(&sidecar_pod(&[(key, value)]), &Scope::default()).unwrap_err();
            assert!(
                err.starts_with(&format!(
                    "annotation value error for value {name}; annotationFound = true: "
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn the_new_virtual_interfaces_annotation_wins_over_the_deprecated_one() {
        let both = sidecar_pod(&[
            (REROUTE_VIRTUAL_INTERFACES, "eth1"),
            (KUBEVIRT_INTERFACES, "eth2"),
        ]);
        assert_eq!(flag(&plan(&both, &Scope::default()).unwrap(), "-k"), "eth1");
        let old = sidecar_pod(&[(KUBEVIRT_INTERFACES, "eth2")]);
        assert_eq!(flag(&plan(&old, &Scope::default()).unwrap(), "-k"), "eth2");
    }

    #[test]
    fn a_kubernetes_pod_object_reads_with_init_containers_and_literal_env() {
        let pod = Pod::from_json(
            r#"{"metadata":{"namespace":"ns","name":"p","annotations":{"a":"b"},"labels":{"l":"v"}},
                "spec":{"initContainers":[{"name":"istio-proxy","args":["proxy","sidecar"],
                  "env":[{"name":"X","value":"1"},{"name":"Y","valueFrom":{}}],
                  "securityContext":{"runAsUser":5,"runAsGroup":6}}],
                 "containers":[{"name":"app"}]}}"#,
        )
        .unwrap();
        assert_eq!((pod.namespace.as_str(), pod.name.as_str()), ("ns", "p"));
        assert_eq!(pod.annotations["a"], "b");
        assert_eq!(pod.labels["l"], "v");
        let proxy = &pod.containers[0];
        assert_eq!(proxy.name, "istio-proxy");
        assert_eq!(proxy.env["X"], "1");
        assert_eq!(proxy.env["Y"], "");
        assert_eq!((proxy.run_as_user, proxy.run_as_group), (Some(5), Some(6)));
        assert_eq!(pod.containers[1].name, "app");
        assert!(Pod::from_json("[]").is_err());
    }

    #[test]
    fn shell_lines_quote_empty_and_wildcard_values() {
        let flags: Vec<String> = ["-b", "*", "-x", "", "-d", "15020,15021"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(shell_line(&flags), "-b '*' -x '' -d 15020,15021");
    }
}
