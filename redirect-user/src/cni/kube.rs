//! The pod from the Kubernetes API, as Istio's CNI plugin reads it when its
//! configuration names a kubeconfig: one `GET
//! /api/v1/namespaces/<ns>/pods/<name>` with the kubeconfig's current
//! context (server, CA, bearer token or client certificate), through
//! `ureq` over rustls. The answer is the pod object [`Pod::from_json`]
//! reads, so the plan sees the `istio-proxy` container's identity and
//! environment as Istio's plugin does.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde_json::Value;

use super::pod::Pod;

/// How long one request may take; the runtime waits on ADD meanwhile.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts for a server that is not reachable or answers 5xx (a pod's
/// object is visible before the runtime creates its sandbox).
const ATTEMPTS: u32 = 3;

/// Where and how to reach the API server.
#[derive(Debug, PartialEq, Eq)]
pub struct Cluster {
    pub server: String,
    /// PEM of the CA that signs the server's certificate (none: the
    /// server is plain HTTP, or TLS is not verified).
    pub ca: Option<Vec<u8>>,
    pub insecure: bool,
    pub token: Option<String>,
    /// PEM of a client certificate and its key.
    pub client_cert: Option<(Vec<u8>, Vec<u8>)>,
}

/// Reads the kubeconfig at `path`: its current context's cluster and user.
pub fn load(path: &Path) -> Result<Cluster> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
    let config: Value = serde_yaml::from_str(&text)
        .with_context(|| format!("{} is not a kubeconfig (YAML)", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("/"));
    parse(&config, dir).with_context(|| format!("kubeconfig {}", path.display()))
}

/// The current context's cluster and user of a parsed kubeconfig; relative
/// file names are `dir`'s.
pub fn parse(config: &Value, dir: &Path) -> Result<Cluster> {
    let named = |list: &str, name: &str, field: &str| -> Result<Value> {
        config
            .get(list)
            .and_then(Value::as_array)
            .and_then(|items| {
                items
                    .iter()
                    .find(|i| i.get("name").and_then(Value::as_str) == Some(name))
            })
            .and_then(|item| item.get(field))
            .cloned()
            .with_context(|| format!("no {list} entry named {name:?}"))
    };
    let current = config
        .get("current-context")
        .and_then(Value::as_str)
        .context("no current-context")?;
    let context = named("contexts", current, "context")?;
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
    let cluster_name = text(&context, "cluster").context("the context names no cluster")?;
    let cluster = named("clusters", &cluster_name, "cluster")?;
    let user = match text(&context, "user") {
        Some(name) => named("users", &name, "user")?,
        None => Value::Null,
    };
    // A `-data` field holds base64 of the PEM; the other names a file.
    let pem = |v: &Value, key: &str| -> Result<Option<Vec<u8>>> {
        if let Some(data) = text(v, &format!("{key}-data")) {
            return base64_decode(&data)
                .map(Some)
                .with_context(|| format!("{key}-data is not base64"));
        }
        match text(v, key) {
            Some(file) => {
                let file = dir.join(file);
                std::fs::read(&file)
                    .map(Some)
                    .with_context(|| format!("reading {}", file.display()))
            }
            None => Ok(None),
        }
    };
    let token = match (text(&user, "token"), text(&user, "tokenFile")) {
        (Some(token), _) => Some(token),
        (None, Some(file)) => Some(
            std::fs::read_to_string(dir.join(&file))
                .with_context(|| format!("reading tokenFile {file}"))?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    let client_cert = match (pem(&user, "client-certificate")?, pem(&user, "client-key")?) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => bail!(
            "the user has a client certificate without its key, or a key without its certificate"
        ),
    };
    Ok(Cluster {
        server: text(&cluster, "server").context("the cluster has no server")?,
        ca: pem(&cluster, "certificate-authority")?,
        insecure: cluster
            .get("insecure-skip-tls-verify")
            .and_then(Value::as_bool)
            == Some(true),
        token,
        client_cert,
    })
}

/// GETs the pod `namespace/name`.
pub fn get_pod(cluster: &Cluster, namespace: &str, name: &str) -> Result<Pod> {
    let valid = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    if !valid(namespace) || !valid(name) {
        bail!("pod {namespace:?}/{name:?} is not a Kubernetes name");
    }
    let url = format!(
        "{}/api/v1/namespaces/{namespace}/pods/{name}",
        cluster.server.trim_end_matches('/')
    );
    let agent = agent(cluster)?;
    let mut last = None;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
        let mut request = agent.get(&url).set("Accept", "application/json");
        if let Some(token) = &cluster.token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        match request.call() {
            Ok(response) => {
                let body = response.into_string().context("reading the pod")?;
                return Pod::from_json(&body).context("the API's pod object");
            }
            Err(ureq::Error::Status(code, response)) if code < 500 => {
                let body = response.into_string().unwrap_or_default();
                bail!(
                    "GET {url}: {code} {}",
                    body.chars().take(200).collect::<String>()
                );
            }
            Err(err) => last = Some(err),
        }
    }
    match last {
        Some(err) => {
            Err(anyhow::Error::new(err).context(format!("GET {url} ({ATTEMPTS} attempts)")))
        }
        None => bail!("GET {url}: no attempt made"),
    }
}

fn agent(cluster: &Cluster) -> Result<ureq::Agent> {
    let builder = ureq::AgentBuilder::new().timeout(TIMEOUT);
    if !cluster.server.starts_with("https://") {
        return Ok(builder.build());
    }
    if cluster.insecure {
        bail!(
            "insecure-skip-tls-verify is not supported: give the cluster's certificate-authority"
        );
    }
    let mut roots = rustls::RootCertStore::empty();
    let ca = cluster
        .ca
        .as_deref()
        .context("an https server needs the cluster's certificate-authority")?;
    for cert in CertificateDer::pem_slice_iter(ca) {
        roots.add(cert.context("the certificate-authority is not PEM")?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let tls = match &cluster.client_cert {
        Some((cert, key)) => {
            let certs = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .context("the client certificate is not PEM")?;
            let key = PrivateKeyDer::from_pem_slice(key).context("the client key is not PEM")?;
            builder_tls.with_client_auth_cert(certs, key)?
        }
        None => builder_tls.with_no_client_auth(),
    };
    Ok(builder.tls_config(Arc::new(tls)).build())
}

/// A kubeconfig `-data` field: standard base64 (whitespace ignored).
fn base64_decode(text: &str) -> Result<Vec<u8>> {
    use base64::Engine as _;
    let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    Ok(base64::engine::general_purpose::STANDARD.decode(compact)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_kubeconfigs_write_it() {
        assert_eq!(base64_decode("aGVsbG8gd29ybGQ=").unwrap(), b"hello world");
        assert_eq!(base64_decode("YQ==\n").unwrap(), b"a");
        assert!(base64_decode("a*b").is_err());
    }

    #[test]
    fn the_current_context_is_read() {
        let config: Value = serde_yaml::from_str(
            r#"
apiVersion: v1
kind: Config
current-context: cni
contexts:
- name: other
  context: {cluster: other, user: other}
- name: cni
  context: {cluster: local, user: plugin}
clusters:
- name: local
  cluster:
    server: https://10.96.0.1:443
    certificate-authority-data: aGVsbG8=
users:
- name: plugin
  user: {token: abc}
"#,
        )
        .unwrap();
        let cluster = parse(&config, Path::new("/")).unwrap();
        assert_eq!(cluster.server, "https://10.96.0.1:443");
        assert_eq!(cluster.ca.as_deref(), Some(&b"hello"[..]));
        assert_eq!(cluster.token.as_deref(), Some("abc"));
        assert!(cluster.client_cert.is_none());
        let mut broken = config.clone();
        broken["current-context"] = "missing".into();
        assert!(parse(&broken, Path::new("/")).is_err());
    }

    #[test]
    fn names_that_are_not_kubernetes_names_are_not_sent() {
        let cluster = Cluster {
            server: "http://127.0.0.1:1".into(),
            ca: None,
            insecure: false,
            token: None,
            client_cert: None,
        };
        assert!(get_pod(&cluster, "ns", "../secrets").is_err());
        assert!(get_pod(&cluster, "", "p").is_err());
    }
}
