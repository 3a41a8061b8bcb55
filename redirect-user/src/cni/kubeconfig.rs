//! The plugin's kubeconfig on a node, written by the node agent from its
//! own service account, as Istio's CNI installer writes one for its
//! plugin: the plugin runs on the host, where the agent's mounted token
//! does not exist, so the kubeconfig carries the token and the CA itself.
//! Tokens are rotated: `node run` writes the file again whenever what it
//! would write changes.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde_json::json;

/// The kubeconfig's name in the CNI conf dir (not a network configuration:
/// runtimes read only `.conf`, `.conflist` and `.json` files there).
pub const FILE: &str = "redirect-cni.kubeconfig";

/// The first line of every kubeconfig [`render`] writes.
const HEADER: &str = "# Written by `redirect node install` from its service account; rewritten when the token rotates.";

/// Whether `text` is a kubeconfig [`render`] wrote (`node uninstall`
/// removes only such a file).
pub fn is_written_by_us(text: &str) -> bool {
    text.lines().next() == Some(HEADER)
}

/// What a pod's service account gives: the API server and credentials.
#[derive(Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    /// `https://host:port` of the API server.
    pub server: String,
    pub token: String,
    /// PEM of the cluster's CA.
    pub ca: Vec<u8>,
}

/// Reads the service account mounted at `dir` (`token`, `ca.crt`) and the
/// API server's address from `env` (`KUBERNETES_SERVICE_HOST` and
/// `_PORT`, which Kubernetes sets in every container).
pub fn read(dir: &Path, env: impl Fn(&str) -> Option<String>) -> Result<ServiceAccount> {
    let file = |name: &str| {
        let path = dir.join(name);
        fs::read(&path).with_context(|| {
            format!(
                "{} is not a service account directory: cannot read {name} (mount the pod's service account token, e.g. automountServiceAccountToken: true)",
                dir.display()
            )
        })
    };
    let token = String::from_utf8(file("token")?)
        .context("the service account token is not text")?
        .trim()
        .to_owned();
    if token.is_empty() {
        bail!("{}/token is empty", dir.display());
    }
    let ca = file("ca.crt")?;
    if !ca.starts_with(b"-----BEGIN ") {
        bail!("{}/ca.crt is not a PEM certificate", dir.display());
    }
    let var = |name: &str| {
        env(name).filter(|v| !v.trim().is_empty()).with_context(|| {
            format!(
                "{name} is not set: the API server's address comes from it (Kubernetes sets it in every container)"
            )
        })
    };
    let host = var("KUBERNETES_SERVICE_HOST")?;
    let port = var("KUBERNETES_SERVICE_PORT")?;
    if port.parse::<u16>().is_err() {
        bail!("KUBERNETES_SERVICE_PORT {port:?} is not a port");
    }
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    Ok(ServiceAccount {
        server: format!("https://{host}:{port}"),
        token,
        ca,
    })
}

/// The kubeconfig text for `account`: one cluster, user and context.
pub fn render(account: &ServiceAccount) -> Result<String> {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(&account.ca);
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": account.server,
            "certificate-authority-data": ca,
        }}],
        "users": [{"name": "redirect-cni", "user": {"token": account.token}}],
        "contexts": [{"name": "redirect-cni", "context": {
            "cluster": "local",
            "user": "redirect-cni",
        }}],
        "current-context": "redirect-cni",
    });
    Ok(format!("{HEADER}\n{}", serde_yaml::to_string(&config)?))
}

/// Writes `text` to `<conf_dir>/redirect-cni.kubeconfig` (mode 0600,
/// atomically) unless it holds that already; returns the path and whether
/// it was written.
pub fn write(conf_dir: &Path, text: &str) -> Result<(PathBuf, bool)> {
    let path = conf_dir.join(FILE);
    if fs::read_to_string(&path).is_ok_and(|old| old == text) {
        return Ok((path, false));
    }
    let tmp = conf_dir.join(format!(".{FILE}.{}.redirect-tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| {
        let _ = fs::remove_file(&tmp);
        format!("replacing {}", path.display())
    })?;
    Ok((path, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn account_dir(test: &str, token: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("redirect-sa-{}-{test}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("token"), token).unwrap();
        fs::write(dir.join("ca.crt"), CA).unwrap();
        dir
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn the_written_kubeconfig_is_what_the_plugin_reads() {
        let dir = account_dir("written", "tok-en\n");
        let account = read(
            &dir,
            env(&[
                ("KUBERNETES_SERVICE_HOST", "fd00::1"),
                ("KUBERNETES_SERVICE_PORT", "443"),
            ]),
        )
        .unwrap();
        assert_eq!(account.server, "https://[fd00::1]:443");
        assert_eq!(account.token, "tok-en");
        let text = render(&account).unwrap();
        let (path, written) = write(&dir, &text).unwrap();
        assert!(written);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Unchanged: not written again.
        assert!(!write(&dir, &text).unwrap().1);
        assert!(is_written_by_us(&fs::read_to_string(&path).unwrap()));
        assert!(!is_written_by_us("apiVersion: v1\n"));
        let cluster = crate::cni::kube::load(&path).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(cluster.server, "https://[fd00::1]:443");
        assert_eq!(cluster.token.as_deref(), Some("tok-en"));
        assert_eq!(cluster.ca.as_deref(), Some(CA.as_bytes()));
        assert!(!cluster.insecure);
    }

    #[test]
    fn a_missing_piece_is_named() {
        let dir = account_dir("missing", "t");
        let full = [
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
        ];
        let no_host = read(&dir, env(&full[1..])).unwrap_err().to_string();
        assert!(
            no_host.contains("KUBERNETES_SERVICE_HOST is not set"),
            "{no_host}"
        );
        let bad_port = read(
            &dir,
            env(&[
                ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
                ("KUBERNETES_SERVICE_PORT", "https"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(bad_port.contains("is not a port"), "{bad_port}");
        fs::write(dir.join("ca.crt"), "not pem").unwrap();
        let bad_ca = read(&dir, env(&full)).unwrap_err().to_string();
        assert!(
            bad_ca.contains("ca.crt is not a PEM certificate"),
            "{bad_ca}"
        );
        fs::remove_file(dir.join("token")).unwrap();
        let no_token = format!("{:#}", read(&dir, env(&full)).unwrap_err());
        fs::remove_dir_all(&dir).unwrap();
        assert!(
            no_token.contains("is not a service account directory: cannot read token"),
            "{no_token}"
        );
    }
}
