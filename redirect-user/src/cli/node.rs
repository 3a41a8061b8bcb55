//! The arguments of `redirect node` and `redirect cni-plan`.

use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum NodeAction {
    /// Copy this binary into the CNI bin dir as `redirect-cni` and chain it
    /// after the plugins of the network configuration the runtime reads
    /// (the first file of the conf dir); again: replaces its entry
    Install(NodeInstallArgs),
    /// Unchain `redirect-cni` from every configuration and remove it
    Uninstall(NodeDirs),
    /// Whether `redirect-cni` is in place and chained; exit 1 when only
    /// one of the two
    Status(NodeDirs),
    /// The node agent (a DaemonSet's process): install as above, then
    /// remove the instances of deleted pods every --gc-interval and serve
    /// every instance's decision counters for Prometheus, until SIGTERM
    Run(NodeRunArgs),
}

#[derive(Subcommand)]
pub enum NodeSetAction {
    /// Load the programs and maps once, attach them to --cgroup, pin them
    /// under /sys/fs/bpf/redirect/@set-<SET>/; again on the same cgroup:
    /// an upgrade in place (this build's programs swapped in on the same
    /// maps, each link atomically; the pods keep their capture)
    Load(NodeSetLoadArgs),
    /// Detach and unpin the node set, and every pod's capture with it
    Unload(SetName),
    /// Capture the pod whose network namespace is --netns (or this
    /// process's) as --instance NAME; again for the same pod: its
    /// configuration replaced in place
    Add(Box<NodeSetAddArgs>),
    /// Stop capturing pod --instance NAME
    Remove {
        #[command(flatten)]
        set: SetName,
        #[arg(long, value_name = "NAME", value_parser = crate::instance::parse_arg)]
        instance: crate::instance::InstanceName,
    },
    /// The node set's pods and their decision counters
    Status {
        #[command(flatten)]
        set: SetName,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

/// Which node set (a node has one; tests load their own).
#[derive(Args)]
pub struct SetName {
    /// The node set's name
    #[arg(long = "set", value_name = "NAME", default_value = "node", value_parser = crate::instance::parse_arg)]
    pub name: crate::instance::InstanceName,
}

#[derive(Args)]
pub struct NodeSetLoadArgs {
    #[command(flatten)]
    pub set: SetName,
    /// The cgroup whose processes the programs see: the one holding the
    /// node's pods (kubepods under the cgroup2 mount)
    #[arg(long, value_name = "PATH")]
    pub cgroup: String,
    /// Most pods the set holds at once (its maps are sized for them: about
    /// 84 KB of kernel memory each)
    #[arg(long, value_name = "N", default_value = "256")]
    pub max_pods: u32,
    /// Redirected handshakes in flight at once on the node
    #[arg(long, value_name = "N", default_value = "16384", value_parser = clap::value_parser!(u32).range(1..=4_194_304))]
    pub max_connections: u32,
}

#[derive(Args)]
pub struct NodeSetAddArgs {
    #[command(flatten)]
    pub set: SetName,
    /// The name the pod is added (and later removed) under
    #[arg(long, value_name = "NAME", value_parser = crate::instance::parse_arg)]
    pub instance: crate::instance::InstanceName,
    /// The pod's network namespace (/proc/PID/ns/net or /run/netns/NAME)
    /// [default: this process's]
    #[arg(long, value_name = "PATH")]
    pub netns: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub capture: super::CaptureArgs,
}

#[derive(Args)]
pub struct NodeRunArgs {
    #[command(flatten)]
    pub install: NodeInstallArgs,
    /// Seconds between garbage collections (`redirect gc`)
    #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub gc_interval: u64,
    /// Where to serve the Prometheus metrics (GET /metrics)
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:9798")]
    pub metrics_listen: std::net::SocketAddr,
}

/// The runtime's CNI directories.
#[derive(Args)]
pub struct NodeDirs {
    /// Where the runtime finds CNI plugins (containerd's `bin_dir`)
    #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: std::path::PathBuf,
    /// Where the runtime reads network configurations (containerd's `conf_dir`)
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: std::path::PathBuf,
}

#[derive(Args)]
pub struct NodeInstallArgs {
    #[command(flatten)]
    pub dirs: NodeDirs,
    /// The plugin's capture: auto (eBPF on the pod cgroup, else iptables),
    /// ebpf (fail the pod rather than use iptables) or iptables
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = ["auto", "ebpf", "iptables"])]
    pub mode: String,
    /// Namespaces whose pods are never captured, comma-separated
    #[arg(long, value_name = "LIST", default_value = "kube-system")]
    pub exclude_namespaces: String,
    /// Where pod cgroups are found by UID [default: kubepods under the
    /// cgroup2 mount]
    #[arg(long, value_name = "DIR")]
    pub pod_cgroup_root: Option<std::path::PathBuf>,
    /// A kubeconfig the plugin reads each pod from the Kubernetes API with
    /// (as Istio's plugin does); without one, the proxy's identity is
    /// --proxy-uid/--proxy-gid and the annotations the runtime's
    #[arg(long, value_name = "FILE", conflicts_with = "service_account_dir")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Write the plugin a kubeconfig from the service account mounted here
    /// (token and CA; the API server from KUBERNETES_SERVICE_HOST/_PORT),
    /// as Istio's CNI installer does, into the conf dir as
    /// redirect-cni.kubeconfig; `node run` rewrites it when the token
    /// rotates
    #[arg(long, value_name = "DIR")]
    pub service_account_dir: Option<std::path::PathBuf>,
    /// The conf dir as the host names it, where the plugin runs (when
    /// --cni-conf-dir is the host's directory mounted elsewhere, as in the
    /// node agent's container) [default: --cni-conf-dir]
    #[arg(long, value_name = "DIR", requires = "service_account_dir")]
    pub host_cni_conf_dir: Option<std::path::PathBuf>,
    /// A file the plugin appends one line to per command (time, command,
    /// container, pod, result, microseconds taken): the runtime keeps a
    /// plugin's stderr only when it fails
    #[arg(long, value_name = "FILE")]
    pub cni_log_file: Option<std::path::PathBuf>,
    /// Capture pods in one program set for the node, loaded (once) as this
    /// set on --node-set-cgroup, where the kernel has what it needs (5.15;
    /// else each pod gets its own programs, as without this flag)
    #[arg(long, value_name = "NAME", value_parser = crate::instance::parse_arg)]
    pub node_set: Option<crate::instance::InstanceName>,
    /// The cgroup holding the node's pods, which the node set's programs
    /// see [default: --pod-cgroup-root, else kubepods under the cgroup2
    /// mount]
    #[arg(long, value_name = "DIR", requires = "node_set")]
    pub node_set_cgroup: Option<std::path::PathBuf>,
    /// Most pods the node set holds at once (its maps are sized for them:
    /// about 84 KB of kernel memory each)
    #[arg(long, value_name = "N", default_value = "256", requires = "node_set")]
    pub node_set_max_pods: u32,
    /// Redirected handshakes in flight at once on the node (the node
    /// set's original-destination map)
    #[arg(long, value_name = "N", default_value = "16384", requires = "node_set", value_parser = clap::value_parser!(u32).range(1..=4_194_304))]
    pub node_set_max_connections: u32,
    /// The proxy's uid (what Istio's plugin reads from the istio-proxy
    /// container's runAsUser)
    #[arg(long, value_name = "UID", default_value = "1337")]
    pub proxy_uid: u32,
    /// The proxy's gid (its runAsGroup)
    #[arg(long, value_name = "GID", default_value = "1337")]
    pub proxy_gid: u32,
}

#[derive(Args)]
pub struct CniPlanArgs {
    /// The pod's Kubernetes object as JSON (`kubectl get pod -o json`), or
    /// `-` for stdin
    #[arg(long, value_name = "FILE")]
    pub pod: std::path::PathBuf,

    /// Namespaces whose pods are never captured (the plugin config's
    /// exclude_namespaces), comma-separated
    #[arg(long, value_name = "LIST", default_value = "")]
    pub exclude_namespaces: String,

    /// istio-iptables flags to run the plan with (after `--`)
    #[arg(last = true, value_name = "ISTIO-IPTABLES-FLAGS")]
    pub istio_iptables: Vec<std::ffi::OsString>,
}
