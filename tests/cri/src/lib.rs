//! A container runtime for the CRI test: Debian's containerd with its CRI
//! plugin, private in every path (socket, root, state, runc root, CNI
//! directories, IPAM data) and run in the peer network namespace of a
//! [`Sandbox`], so that the bridge the CNI plugins make, and every pod
//! address, exist only there; and a CRI v1 client that calls it as a
//! kubelet does.
//!
//! The network configuration is the Debian CNI plugins `bridge` and
//! `host-local` (plus `loopback`, which containerd runs itself), and
//! `redirect node install` chains `redirect-cni` after them, as on a node.
//! The pod cgroups are made by the harness before `RunPodSandbox`, as a
//! kubelet makes them, under a directory of the sandbox's own, and removed
//! (in every cgroup hierarchy runc wrote to) when the runtime is dropped.

use std::{
    collections::HashMap,
    fs,
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    self as cri, image_service_client::ImageServiceClient,
    runtime_service_client::RuntimeServiceClient,
};
use redirect_sandbox::{Group, Net, ROOT, Sandbox, cgroup::cgroup2_mount};
use tonic::transport::{Channel, Endpoint, Uri};

/// The Debian CNI plugins the network configuration uses.
const CNI_PLUGINS: &str = "/usr/lib/cni";

/// The pods' subnet and the bridge's address (their gateway), inside the
/// peer namespace.
const SUBNET: &str = "10.244.0.0/24";
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);

/// How long a CRI call may take (a sandbox start includes the CNI ADD).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Where containerd 1.6's shims put their sockets (`s/`), whatever its
/// configuration says.
const SHIM_DIR: &str = "/run/containerd";

/// A private containerd and a CRI client to it. Dropping it stops every
/// pod it made, stops containerd and removes its files, mounts and cgroups.
pub struct Runtime {
    dir: PathBuf,
    /// The pod cgroups' parent, relative to each cgroup hierarchy's root.
    cgroup_parent: PathBuf,
    /// The plugin's log (`redirect node install --cni-log-file`).
    cni_log: PathBuf,
    /// The `redirect` binary `node install` runs as and installs as the
    /// plugin (the shipped build).
    plugin_binary: PathBuf,
    /// The image the containers run (also the sandbox image).
    image: String,
    containerd: Option<Child>,
    /// A CRI call timed out: containerd is wedged, and cleanup makes no
    /// more calls (each would wait the whole timeout).
    wedged: std::cell::Cell<bool>,
    /// Whether `/run/containerd` existed before (the shims make it).
    run_dir_existed: bool,
    rt: tokio::runtime::Runtime,
    /// Set once containerd answers.
    runtime: Option<RuntimeServiceClient<Channel>>,
    pods: Vec<String>,
}

/// A pod as the test asks for it.
pub struct PodSpec<'a> {
    pub name: &'a str,
    pub uid: &'a str,
    pub annotations: &'a [(&'a str, &'a str)],
}

/// A running pod sandbox.
#[derive(Clone, Debug)]
pub struct Pod {
    pub id: String,
    pub uid: String,
    pub ip: Ipv4Addr,
    config: cri::PodSandboxConfig,
}

impl Runtime {
    /// Starts containerd in `sandbox`'s peer namespace with the OCI
    /// `archive` imported (holding `image_name`: the project's image plus
    /// the test agent at `/agent`, `/pause` its entrypoint), which is also
    /// its sandbox image, and `redirect-cni` chained into its network
    /// configuration by `plugin_binary node install`.
    pub fn start(
        sandbox: &Sandbox,
        archive: &Path,
        image_name: &str,
        plugin_binary: &Path,
    ) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("redirect-cri-{}", sandbox.name()));
        let _ = fs::remove_dir_all(&dir);
        let cgroup_parent =
            Path::new(redirect_sandbox::cgroup::PARENT).join(format!("{}-cri", sandbox.name()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("a tokio runtime for the CRI client")?;
        // The runtime exists from here on, so that a failed start cleans up.
        let mut this = Self {
            cni_log: dir.join("cni.log"),
            plugin_binary: plugin_binary.to_owned(),
            dir,
            cgroup_parent,
            image: image_name.to_owned(),
            containerd: None,
            wedged: std::cell::Cell::new(false),
            run_dir_existed: Path::new(SHIM_DIR).exists(),
            rt,
            runtime: None,
            pods: Vec::new(),
        };
        this.prepare_dirs()?;
        this.node_install(&[])?;
        this.spawn(sandbox, image_name)?;
        this.import(archive)?;
        Ok(this)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn socket(&self) -> PathBuf {
        self.path("containerd.sock")
    }

    fn prepare_dirs(&self) -> Result<()> {
        for sub in ["root", "state", "runc", "bin", "net.d", "ipam", "logs"] {
            fs::create_dir_all(self.path(sub))
                .with_context(|| format!("creating {}", self.path(sub).display()))?;
        }
        for plugin in ["bridge", "host-local", "loopback"] {
            let from = Path::new(CNI_PLUGINS).join(plugin);
            if !from.is_file() {
                bail!(
                    "{} is missing: install Debian's containernetworking-plugins",
                    from.display()
                );
            }
            std::os::unix::fs::symlink(&from, self.path("bin").join(plugin))?;
        }
        // The pod network, as a cluster's network plugin would install it.
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "pods",
            "plugins": [{
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "isDefaultGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": self.path("ipam"),
                    "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY.to_string()}]],
                },
            }],
        });
        fs::write(
            self.path("net.d/10-pods.conflist"),
            serde_json::to_string_pretty(&conflist)?,
        )?;
        Ok(())
    }

    /// `redirect node install [MODE...]` into the private CNI directories
    /// (again: the plugin's entry is replaced, as on a node).
    pub fn node_install(&self, extra: &[&str]) -> Result<()> {
        let root = cgroup2_mount()?.join(&self.cgroup_parent);
        fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let bin = self.path("bin");
        let conf = self.path("net.d");
        let mut args = vec![
            "install".to_owned(),
            "--cni-bin-dir".to_owned(),
            bin.to_string_lossy().into_owned(),
            "--cni-conf-dir".to_owned(),
            conf.to_string_lossy().into_owned(),
            "--pod-cgroup-root".to_owned(),
            root.to_string_lossy().into_owned(),
            "--cni-log-file".to_owned(),
            self.cni_log.to_string_lossy().into_owned(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.node(&args)?;
        if !out.ok() {
            bail!("redirect node install failed: {out:?}");
        }
        Ok(())
    }

    /// Runs `<plugin binary> node ARGS`.
    fn node(&self, args: &[&str]) -> Result<redirect_sandbox::cli::Outcome> {
        redirect_sandbox::cli::outcome(Command::new(&self.plugin_binary).arg("node").args(args))
    }

    fn config_toml(&self, image_name: &str) -> String {
        let p = |name: &str| self.path(name).display().to_string();
        format!(
            r#"# Written by the CRI test: every path private to this run.
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{image_name}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = p("root"),
            state = p("state"),
            sock = self.socket().display(),
            runc = p("runc"),
            bin = p("bin"),
            conf = p("net.d"),
            opt = p("opt"),
        )
    }

    /// Starts containerd in the peer namespace and waits until its CRI
    /// answers (at most 30 s).
    fn spawn(&mut self, sandbox: &Sandbox, image_name: &str) -> Result<()> {
        let config = self.path("config.toml");
        fs::write(&config, self.config_toml(image_name))?;
        let log = fs::File::create(self.path("containerd.log"))?;
        let mut cmd = sandbox.command(Net::Peer, Group::Outside, ROOT, "containerd");
        private_var_lib(&mut cmd);
        cmd.arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.containerd = Some(
            cmd.spawn()
                .context("starting containerd (install Debian's containerd)")?,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.containerd.as_mut().and_then(|c| c.try_wait().ok()?) {
                bail!(
                    "containerd exited ({status}): {}",
                    self.tail("containerd.log")
                );
            }
            if self.socket().exists()
                && let Ok(client) = self.connect()
            {
                self.runtime = Some(RuntimeServiceClient::new(client));
                let status = self.rt.block_on(async {
                    let mut client = self.runtime.clone()?;
                    let request = client.status(cri::StatusRequest { verbose: false });
                    tokio::time::timeout(Duration::from_secs(2), request)
                        .await
                        .ok()?
                        .ok()
                });
                if status.is_some() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd's CRI did not answer within 30 s: {}",
                    self.tail("containerd.log")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn connect(&self) -> Result<Channel> {
        let socket = self.socket();
        let channel = self.rt.block_on(
            Endpoint::from_static("http://[::]")
                .timeout(CALL_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(socket).await?,
                        ))
                    }
                })),
        )?;
        Ok(channel)
    }

    /// The last lines of one of the runtime's files, for an error.
    fn tail(&self, name: &str) -> String {
        let text = fs::read_to_string(self.path(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Imports the OCI archive into the CRI's namespace (`k8s.io`).
    fn import(&self, archive: &Path) -> Result<()> {
        let log = self.path("import.log");
        let mut ctr = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io", "images", "import"])
            .arg(archive)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("running ctr (Debian's containerd)")?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(status) = ctr.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = ctr.kill();
                let _ = ctr.wait();
                bail!("ctr images import took over 120 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if !status.success() {
            bail!(
                "ctr images import {} failed: {}",
                archive.display(),
                self.tail("import.log")
            );
        }
        let channel = self.connect()?;
        let images = self.rt.block_on(async {
            let mut client = ImageServiceClient::new(channel);
            anyhow::Ok(
                client
                    .list_images(cri::ListImagesRequest { filter: None })
                    .await?
                    .into_inner()
                    .images,
            )
        })?;
        if !images
            .iter()
            .any(|i| i.repo_tags.iter().any(|t| t == &self.image))
        {
            bail!(
                "the CRI does not list {} after the import (the archive holds another name)",
                self.image
            );
        }
        Ok(())
    }

    /// One call on the runtime service, bounded by [`CALL_TIMEOUT`].
    pub fn call<T, F>(
        &self,
        f: impl FnOnce(RuntimeServiceClient<Channel>) -> F,
    ) -> Result<T, tonic::Status>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_within(CALL_TIMEOUT, f)
    }

    /// One call on the runtime service, bounded by `limit`; after a call
    /// timed out, none is made.
    fn call_within<T, F>(
        &self,
        limit: Duration,
        f: impl FnOnce(RuntimeServiceClient<Channel>) -> F,
    ) -> Result<T, tonic::Status>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let Some(client) = self.runtime.clone() else {
            return Err(tonic::Status::unavailable("containerd is not running"));
        };
        if self.wedged.get() {
            return Err(tonic::Status::unavailable(
                "an earlier CRI call timed out: containerd is wedged",
            ));
        }
        let outcome = self.rt.block_on(async move {
            match tokio::time::timeout(limit, f(client)).await {
                Ok(result) => result.map(tonic::Response::into_inner),
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "the CRI call took over {} s",
                    limit.as_secs()
                ))),
            }
        });
        if outcome
            .as_ref()
            .is_err_and(|e| e.code() == tonic::Code::DeadlineExceeded)
        {
            self.wedged.set(true);
        }
        outcome
    }

    /// `RunPodSandbox` as a kubelet sends it: the pod cgroup made first
    /// (cgroupfs driver: `pod<uid>` under the parent), metadata, the
    /// annotations (which reach CNI plugins as the runtime config's
    /// `io.kubernetes.cri.pod-annotations`), the pod's own network.
    pub fn run_pod(&mut self, spec: &PodSpec<'_>) -> Result<Pod, tonic::Status> {
        let cgroup = self.cgroup_parent.join(format!("pod{}", spec.uid));
        let internal = |e: anyhow::Error| tonic::Status::internal(format!("{e:#}"));
        let v2 = cgroup2_mount().map_err(internal)?.join(&cgroup);
        fs::create_dir_all(&v2)
            .map_err(|e| tonic::Status::internal(format!("creating {}: {e}", v2.display())))?;
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: spec.name.to_owned(),
                uid: spec.uid.to_owned(),
                namespace: "default".to_owned(),
                attempt: 0,
            }),
            hostname: spec.name.to_owned(),
            log_directory: self.path("logs").join(spec.uid).display().to_string(),
            annotations: spec
                .annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<HashMap<_, _>>(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: Path::new("/").join(&cgroup).display().to_string(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let request = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let id = self
            .call(|mut c| async move { c.run_pod_sandbox(request).await })?
            .pod_sandbox_id;
        self.pods.push(id.clone());
        let status = self
            .call(|mut c| {
                let pod_sandbox_id = id.clone();
                async move {
                    c.pod_sandbox_status(cri::PodSandboxStatusRequest {
                        pod_sandbox_id,
                        verbose: false,
                    })
                    .await
                }
            })?
            .status
            .ok_or_else(|| tonic::Status::internal("no sandbox status"))?;
        let ip = status
            .network
            .and_then(|n| n.ip.parse().ok())
            .ok_or_else(|| tonic::Status::internal("the sandbox has no IPv4 address"))?;
        Ok(Pod {
            id,
            uid: spec.uid.to_owned(),
            ip,
            config,
        })
    }

    /// Creates and starts a container in `pod` running `/agent <args>` as
    /// `uid:gid`, every capability dropped, no mount, no privilege gain;
    /// waits until it prints `ready` (at most 30 s). Returns its id.
    pub fn start_container(
        &self,
        pod: &Pod,
        name: &str,
        uid: i64,
        args: &[&str],
    ) -> Result<String> {
        let (id, log) = self.create_and_start(pod, name, uid, "/agent", args)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        // The CRI log format: `<time> stdout F ready`.
        while !fs::read_to_string(&log).is_ok_and(|t| t.contains(" stdout F ready")) {
            if Instant::now() > deadline {
                bail!(
                    "container {name} did not become ready within 30 s: {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(id)
    }

    /// Runs `command args` in `pod` as an init container does (as
    /// `uid:gid`, every capability dropped) until it exits (at most 60 s);
    /// its exit code and log.
    pub fn run_to_completion(
        &self,
        pod: &Pod,
        name: &str,
        uid: i64,
        command: &str,
        args: &[&str],
    ) -> Result<(i32, String)> {
        let (id, log) = self.create_and_start(pod, name, uid, command, args)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let container_id = id.clone();
            let status = self
                .call(|mut c| async move {
                    c.container_status(cri::ContainerStatusRequest {
                        container_id,
                        verbose: false,
                    })
                    .await
                })
                .with_context(|| format!("ContainerStatus {name}"))?
                .status
                .context("no container status")?;
            if status.state == i32::from(cri::ContainerState::ContainerExited) {
                return Ok((
                    status.exit_code,
                    fs::read_to_string(&log).unwrap_or_default(),
                ));
            }
            if Instant::now() > deadline {
                bail!("container {name} did not exit within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `CreateContainer` and `StartContainer` as a kubelet sends them for a
    /// container of `pod` running `command args` as `uid:gid`, every
    /// capability dropped, no mount, no privilege gain. Its id and log.
    fn create_and_start(
        &self,
        pod: &Pod,
        name: &str,
        uid: i64,
        command: &str,
        args: &[&str],
    ) -> Result<(String, PathBuf)> {
        let log = format!("{name}.log");
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.to_owned(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: self.image.clone(),
                ..Default::default()
            }),
            command: vec![command.to_owned()],
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            log_path: log.clone(),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    capabilities: Some(cri::Capability {
                        drop_capabilities: vec!["ALL".to_owned()],
                        ..Default::default()
                    }),
                    namespace_options: Some(namespaces()),
                    run_as_user: Some(cri::Int64Value { value: uid }),
                    run_as_group: Some(cri::Int64Value { value: uid }),
                    no_new_privs: true,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        };
        let id = self
            .call(|mut c| async move { c.create_container(request).await })
            .with_context(|| format!("CreateContainer {name}"))?
            .container_id;
        let container_id = id.clone();
        self.call(|mut c| async move {
            c.start_container(cri::StartContainerRequest { container_id })
                .await
        })
        .with_context(|| format!("StartContainer {name}"))?;
        Ok((id, Path::new(&pod.config.log_directory).join(log)))
    }

    /// `ExecSync` of `/agent <args>` in a container; its stdout.
    pub fn exec(&self, container: &str, args: &[&str]) -> Result<String> {
        let mut cmd = vec!["/agent".to_owned()];
        cmd.extend(args.iter().map(|a| (*a).to_owned()));
        let request = cri::ExecSyncRequest {
            container_id: container.to_owned(),
            cmd,
            timeout: 30,
        };
        let out = self
            .call(|mut c| async move { c.exec_sync(request).await })
            .context("ExecSync")?;
        if out.exit_code != 0 {
            bail!(
                "exec {args:?} exited {}: {}",
                out.exit_code,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `StopPodSandbox` (the CNI DEL) and `RemovePodSandbox`, then the pod
    /// cgroup, as a kubelet removes it.
    pub fn remove_pod(&mut self, pod: &Pod) -> Result<()> {
        self.remove_sandbox(&pod.id)?;
        self.pods.retain(|p| p != &pod.id);
        remove_cgroup_everywhere(&self.cgroup_parent.join(format!("pod{}", pod.uid)));
        Ok(())
    }

    fn remove_sandbox(&self, id: &str) -> Result<()> {
        let pod_sandbox_id = id.to_owned();
        self.call(|mut c| async move {
            c.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id })
                .await
        })
        .with_context(|| format!("StopPodSandbox {id}"))?;
        let pod_sandbox_id = id.to_owned();
        self.call(|mut c| async move {
            c.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id })
                .await
        })
        .with_context(|| format!("RemovePodSandbox {id}"))?;
        Ok(())
    }

    /// The plugin's log lines for `command` (see `--cni-log-file`).
    pub fn cni_log_lines(&self, command: &str) -> Vec<String> {
        fs::read_to_string(&self.cni_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.split('\t').nth(1) == Some(command))
            .map(str::to_owned)
            .collect()
    }
}

/// A pod's namespaces as a kubelet asks for them: its own network and IPC,
/// each container its own PID namespace.
fn namespaces() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Pod.into(),
        pid: cri::NamespaceMode::Container.into(),
        ipc: cri::NamespaceMode::Pod.into(),
        ..Default::default()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for id in std::mem::take(&mut self.pods) {
            if let Err(err) = self.remove_sandbox(&id) {
                eprintln!("cri cleanup: {err:#}");
            }
            // The capture of a pod whose DEL did not run.
            let instance = format!("cni-{id}");
            if Path::new(redirect_sandbox::PIN_ROOT)
                .join(&instance)
                .exists()
            {
                let _ = Command::new(&self.plugin_binary)
                    .args(["uninstall", "--instance", &instance])
                    .output();
            }
        }
        let conf = self.path("net.d");
        let bin = self.path("bin");
        let _ = self.node(&[
            "uninstall",
            "--cni-bin-dir",
            &bin.to_string_lossy(),
            "--cni-conf-dir",
            &conf.to_string_lossy(),
        ]);
        if let Some(mut child) = self.containerd.take() {
            // SIGTERM, then SIGKILL after 10 s.
            let pid = child.id() as libc::pid_t;
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        kill_shims(&self.socket());
        if let Err(err) = fs::remove_dir_all(&self.dir) {
            eprintln!("cri cleanup: removing {}: {err}", self.dir.display());
        }
        remove_cgroup_everywhere(&self.cgroup_parent);
        // The shared parent, where no other sandbox uses it any more.
        for hierarchy in cgroup_hierarchies() {
            let _ = fs::remove_dir(hierarchy.join(redirect_sandbox::cgroup::PARENT));
        }
        // containerd's shims put their sockets here whatever its config.
        if !self.run_dir_existed {
            let _ = fs::remove_dir(Path::new(SHIM_DIR).join("s"));
            let _ = fs::remove_dir(SHIM_DIR);
        }
        let _ = std::io::stderr().flush();
    }
}

/// Runs `cmd` in a mount namespace of its own with an empty tmpfs on
/// `/var/lib`: containerd's CNI library caches every pod's result under
/// `/var/lib/cni` whatever the configuration says, and the host's must not
/// change. Its own mounts (snapshots, network namespaces) stay private too
/// and go with its last process.
fn private_var_lib(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    let tmpfs = c"tmpfs";
    let var_lib = c"/var/lib";
    let root = c"/";
    // SAFETY: only async-signal-safe system calls on static C strings.
    unsafe {
        cmd.pre_exec(move || {
            let ok = libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
                && libc::mount(
                    tmpfs.as_ptr(),
                    var_lib.as_ptr(),
                    tmpfs.as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    c"mode=0755".as_ptr().cast(),
                ) == 0;
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// Kills shims left by this runtime (after a failure): those started with
/// `-address <socket>`.
fn kill_shims(socket: &Path) {
    let Ok(procs) = fs::read_dir("/proc") else {
        return;
    };
    let socket = socket.to_string_lossy().into_owned();
    for entry in procs.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.contains("containerd-shim"))
            && args.iter().any(|a| a == &socket)
        {
            // SAFETY: killing a process this test's containerd started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Removes `rel` (a cgroup path relative to each hierarchy's root) from
/// every cgroup hierarchy, children first: runc writes pod and container
/// cgroups into each v1 controller's hierarchy as well as cgroup2 on a
/// hybrid host. Bounded: a cgroup still busy after 5 s is reported.
fn remove_cgroup_everywhere(rel: &Path) {
    for hierarchy in cgroup_hierarchies() {
        remove_tree(&hierarchy.join(rel));
    }
}

/// Where each cgroup hierarchy (v1 controllers and cgroup2) is mounted.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
            matches!(kind, "cgroup" | "cgroup2").then(|| PathBuf::from(dir))
        })
        .collect()
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    // Containers a failed run left (their shim killed): kill them.
    while let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        let pids: Vec<libc::pid_t> = procs.lines().filter_map(|l| l.parse().ok()).collect();
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in pids {
            // SAFETY: killing a process in a cgroup this test made.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    while dir.exists() {
        match fs::remove_dir(dir) {
            Ok(()) => break,
            Err(err) if Instant::now() > deadline => {
                eprintln!("cri cleanup: removing cgroup {}: {err}", dir.display());
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
