//! `redirect-cni` driven as a runtime drives it: the `redirect` binary run
//! under that name with the `CNI_*` environment and a chained network
//! configuration on stdin, for a sandbox pod.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};

use crate::{
    POD_IP, PROXY, Sandbox,
    cli::{Outcome, redirect_bin},
};

/// The plugin (a `redirect-cni` link to the binary) and a pod-cgroup root
/// where `pod<uid>` links to the sandbox's pod cgroup, both in a scratch
/// directory the sandbox removes.
pub struct Plugin {
    pub exe: PathBuf,
    pub cgroup_root: PathBuf,
    /// The instance ADD makes for the sandbox (`cni-<sandbox name>`).
    instance: String,
    /// Variables every command gets besides the `CNI_*` ones.
    pub env: Vec<(&'static str, &'static str)>,
}

impl Drop for Plugin {
    /// Removes the instance a failed test left between ADD and DEL (its
    /// pins: the links go with them).
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(Path::new(crate::PIN_ROOT).join(&self.instance));
    }
}

impl Plugin {
    pub fn new(sandbox: &Sandbox, uid: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-cni", sandbox.name()));
        let cgroup_root = dir.join("kubepods");
        std::fs::create_dir_all(&cgroup_root).expect("scratch dir");
        let exe = dir.join("redirect-cni");
        std::os::unix::fs::symlink(redirect_bin(), &exe).expect("plugin link");
        std::os::unix::fs::symlink(sandbox.pod_cgroup(), cgroup_root.join(format!("pod{uid}")))
            .expect("pod cgroup link");
        Self {
            exe,
            cgroup_root,
            instance: format!("cni-{}", sandbox.name()),
            env: Vec::new(),
        }
    }

    /// Runs one command for `sandbox`'s pod (container id: its name).
    pub fn call(&self, sandbox: &Sandbox, command: &str, uid: &str, config: &Value) -> Outcome {
        self.call_in(sandbox.pod_netns(), sandbox, command, uid, config)
    }

    /// The same with `netns` as the pod's network namespace.
    pub fn call_in(
        &self,
        netns: &str,
        sandbox: &Sandbox,
        command: &str,
        uid: &str,
        config: &Value,
    ) -> Outcome {
        let mut child = Command::new(&self.exe)
            .envs(self.env.iter().copied())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", sandbox.name())
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", self.exe.parent().unwrap_or(Path::new("/")))
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart;K8S_POD_UID={uid}"
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("redirect-cni");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(config.to_string().as_bytes())
            .expect("configuration");
        drop(stdin);
        let out = child.wait_with_output().expect("redirect-cni");
        Outcome {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The chained configuration the runtime sends, with these annotations.
    pub fn config(&self, mode: &str, annotations: Value) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "pods",
            "type": "redirect-cni",
            "mode": mode,
            "pod_cgroup_root": self.cgroup_root,
            "proxy": {"uid": PROXY.uid, "gid": PROXY.gid},
            "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations},
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
                "ips": [{"address": format!("{POD_IP}/15"), "interface": 0}],
            },
        })
    }
}
