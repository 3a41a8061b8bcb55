//! Throw-away pods for the demo, the end-to-end tests and the benchmarks.
//!
//! A [`Sandbox`] is what a Kubernetes node gives a pod, made from scratch:
//!
//! - a "pod" network namespace and a "peer" namespace standing for the rest
//!   of the network, joined by a veth pair (`eth0` on both sides, pod
//!   [`POD_IP`], peer [`PEER_IP`] plus any extra [`peer_ip`] addresses);
//! - a pod cgroup (cgroup v2) with `app` and `proxy` child cgroups, the
//!   layout a kubelet creates for a pod's containers;
//! - helpers to start processes inside it as a given UID/GID
//!   ([`Sandbox::command`], [`Sandbox::agent`]).
//!
//! Namespaces exist only as file descriptors of this process (never named
//! under `/run/netns`), so they vanish with it even if it is killed. The
//! cgroups, the processes and the bpffs pins of the sandbox's redirect
//! instance, and scratch files named `<temp>/<sandbox name>-*`, are removed
//! when the `Sandbox` is dropped, also when a test panics. Every sandbox is
//! independent: tests can run in parallel.

/// Where redirect pins its instances and node sets (bpffs).
pub const PIN_ROOT: &str = "/sys/fs/bpf/redirect";

pub mod agent;
pub mod cgroup;
pub mod cli;
pub mod cni;
pub mod conformance;
pub mod dns;
pub mod netns;
pub mod segment;
pub mod witness;

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// The pod's address on its `eth0`.
pub const POD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The peer namespace's main address on its `eth0`.
pub const PEER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Prefix length of the link between pod and peer (198.18.0.0/15: the
/// benchmarking range, which exists only inside the sandbox).
pub const LINK_PREFIX: u8 = 15;
/// The pod's IPv6 address (a unique-local address, inside the sandbox only).
pub const POD_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 1);
/// The peer's IPv6 address.
pub const PEER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 2);

/// The pod's address on its second link, `nic2` ([`Sandbox::add_second_link`]:
/// 192.0.2.0/24, a documentation range, inside the sandbox only).
pub const POD_NIC2_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The peer's address on the second link.
pub const PEER_NIC2_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The second link's name on both sides.
pub const NIC2: &str = "nic2";

/// The `n`-th extra peer address (`n` in 1..=250), added by
/// [`Sandbox::add_peer_addresses`].
pub fn peer_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, n)
}

/// The proxy's conventional identity (Istio's `-u 1337 -g 1337`).
pub const PROXY: Identity = Identity {
    uid: 1337,
    gid: 1337,
};
/// An ordinary application identity.
pub const APP: Identity = Identity {
    uid: 1000,
    gid: 1000,
};
/// root, for processes that keep the caller's identity.
pub const ROOT: Identity = Identity { uid: 0, gid: 0 };

/// The credentials a sandbox process runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

/// Which network namespace a process runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    Pod,
    Peer,
}

/// Which cgroup a process runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    /// `<pod>/app`: captured by a redirect installed on the pod cgroup.
    App,
    /// `<pod>/proxy`: the sidecar's container cgroup.
    Proxy,
    /// The caller's own cgroup: outside the pod.
    Outside,
}

/// Why a root-only test cannot run here, or `None` when it can.
pub fn missing_privilege() -> Option<String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, cgroups and eBPF)".into());
    }
    if cgroup::cgroup2_mount().is_err() {
        return Some("no cgroup2 hierarchy is mounted".into());
    }
    None
}

/// Prints why the calling test skips, or panics under `CI=true`, where a
/// test that cannot run is a failure. The caller returns afterwards.
pub fn skip_or_fail(reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("cannot run under CI=true: {reason}");
    }
    eprintln!("skipped: {reason}");
}

/// Skips the calling test with a printed reason when it cannot run here,
/// except under `CI=true`, where not being able to run is a failure.
#[macro_export]
macro_rules! require_root {
    () => {
        if let Some(reason) = $crate::missing_privilege() {
            $crate::skip_or_fail(&reason);
            return;
        }
    };
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// One throw-away pod. See the module documentation.
pub struct Sandbox {
    name: String,
    pod_ns: OwnedFd,
    /// `/proc/<pid>/fd/<n>` of `pod_ns`, for `--netns`.
    pod_netns: String,
    peer_ns: OwnedFd,
    cgroup: PathBuf,
    agent_exe: PathBuf,
    agent_args: Vec<String>,
    children: Mutex<Vec<Child>>,
}

impl Sandbox {
    /// Builds a sandbox whose agent processes run `agent_exe agent_args...
    /// <agent arguments>` (see [`agent::main`]).
    pub fn new(agent_exe: impl Into<PathBuf>, agent_args: &[&str]) -> Result<Self> {
        let name = format!(
            "sbx-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let pod_ns = netns::create().context("creating the pod network namespace")?;
        let peer_ns = netns::create().context("creating the peer network namespace")?;
        let cgroup = cgroup::create_pod(&name)?;
        let pod_netns = format!("/proc/{}/fd/{}", std::process::id(), pod_ns.as_raw_fd());
        let sandbox = Self {
            name,
            pod_ns,
            pod_netns,
            peer_ns,
            cgroup,
            agent_exe: agent_exe.into(),
            agent_args: agent_args.iter().map(|s| (*s).to_owned()).collect(),
            children: Mutex::new(Vec::new()),
        };
        sandbox.wire().context("wiring the sandbox's veth pair")?;
        Ok(sandbox)
    }

    /// Unique name of this sandbox; also the redirect instance name its tests use.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A path naming a network namespace of the sandbox, for tools that
    /// take one (`redirect istio-iptables --netns`, `ip netns exec`-like).
    /// Valid while the sandbox lives.
    pub fn netns_path(&self, net: Net) -> String {
        format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.ns(net).as_raw_fd()
        )
    }

    /// [`Sandbox::netns_path`] of the pod, borrowed (for argument lists).
    pub fn pod_netns(&self) -> &str {
        &self.pod_netns
    }

    /// The pod cgroup: where redirect is installed.
    pub fn pod_cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The cgroup a [`Group`] stands for (`None` for [`Group::Outside`]).
    pub fn group_path(&self, group: Group) -> Option<PathBuf> {
        match group {
            Group::App => Some(self.cgroup.join("app")),
            Group::Proxy => Some(self.cgroup.join("proxy")),
            Group::Outside => None,
        }
    }

    fn ns(&self, net: Net) -> &OwnedFd {
        match net {
            Net::Pod => &self.pod_ns,
            Net::Peer => &self.peer_ns,
        }
    }

    fn wire(&self) -> Result<()> {
        self.link(
            "eth0",
            &[format!("{POD_IP}/{LINK_PREFIX}"), format!("{POD_IP6}/64")],
            &[format!("{PEER_IP}/{LINK_PREFIX}"), format!("{PEER_IP6}/64")],
        )?;
        for net in [Net::Pod, Net::Peer] {
            self.ip_batch(net, "link set lo up\n")?;
        }
        Ok(())
    }

    /// A second veth pair between the pod and the peer, [`NIC2`] on both
    /// sides ([`POD_NIC2_IP`] and [`PEER_NIC2_IP`], /24): the pod reaches
    /// the peer through another interface (what `-c` names).
    pub fn add_second_link(&self) -> Result<()> {
        self.link(
            NIC2,
            &[format!("{POD_NIC2_IP}/24")],
            &[format!("{PEER_NIC2_IP}/24")],
        )
    }

    /// A veth pair named `name` on both sides, from the pod to the peer,
    /// with these addresses (IPv6 ones without duplicate detection), up.
    pub fn link(&self, name: &str, pod: &[String], peer: &[String]) -> Result<()> {
        let peer_ns = format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.peer_ns.as_raw_fd()
        );
        let side = |addrs: &[String]| -> String {
            let mut batch: String = addrs
                .iter()
                .map(|a| {
                    let nodad = if a.contains(':') { " nodad" } else { "" };
                    format!("addr add {a} dev {name}{nodad}\n")
                })
                .collect();
            batch.push_str(&format!("link set {name} up\n"));
            batch
        };
        self.ip_batch(
            Net::Pod,
            &format!(
                "link add {name} type veth peer name {name} netns {peer_ns}\n{}",
                side(pod)
            ),
        )?;
        self.ip_batch(Net::Peer, &side(peer))
    }

    /// Starts each server of `servers`: on `listen` (`addr:port`) in `net`,
    /// cgroup `group`, as `who`, answering each connection with `name` and
    /// what it observes of it (peer, local address, SO_ORIGINAL_DST).
    pub fn serve_observing(&self, servers: &[(Net, Group, Identity, String, &str)]) -> Result<()> {
        for (net, group, who, listen, name) in servers {
            let mut cmd = self.agent(*net, *group, *who);
            cmd.args(["serve", "--listen", listen, "--report", "observe"])
                .args(["--reply", name]);
            self.start(cmd)
                .with_context(|| format!("starting {name} on {listen}"))?;
        }
        Ok(())
    }

    /// Adds [`peer_ip`]`(1..=count)` to the peer's `eth0`.
    pub fn add_peer_addresses(&self, count: u8) -> Result<()> {
        let batch: String = (1..=count)
            .map(|n| format!("addr add {}/32 dev eth0\n", peer_ip(n)))
            .collect();
        self.ip_batch(Net::Peer, &batch)
    }

    /// Runs `ip -batch -` with `commands` inside a namespace.
    pub fn ip_batch(&self, net: Net, commands: &str) -> Result<()> {
        netns::run_ip_batch(self.command(net, Group::Outside, ROOT, "ip"), commands)
    }

    /// A command that starts `program` in network namespace `net`, cgroup
    /// `group` and with identity `who` (no supplementary groups).
    pub fn command(
        &self,
        net: Net,
        group: Group,
        who: Identity,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Command {
        let mut cmd = Command::new(program);
        self.enter(&mut cmd, net, group, Some(who));
        cmd
    }

    /// Arranges for `cmd`'s process to enter the sandbox before it executes.
    fn enter(&self, cmd: &mut Command, net: Net, group: Group, who: Option<Identity>) {
        use std::os::unix::process::CommandExt as _;
        let ns_fd = self.ns(net).as_raw_fd();
        let procs = self
            .group_path(group)
            .map(|dir| dir.join("cgroup.procs").to_string_lossy().into_owned());
        let procs = procs.map(|p| std::ffi::CString::new(p).unwrap_or_default());
        // SAFETY: the closure only makes async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(procs) = &procs {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                    libc::close(fd);
                    if !ok {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(who) = who {
                    let gid = who.gid;
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setresgid(gid, gid, gid) != 0
                        || libc::setresuid(who.uid, who.uid, who.uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }

    /// A command running the sandbox agent in `net`/`group` as `who`. The
    /// agent drops to `who` itself after it started, so its executable need
    /// not be reachable by that user.
    pub fn agent(&self, net: Net, group: Group, who: Identity) -> Command {
        let mut cmd = Command::new(&self.agent_exe);
        cmd.args(&self.agent_args).args([
            "--uid",
            &who.uid.to_string(),
            "--gid",
            &who.gid.to_string(),
        ]);
        self.enter(&mut cmd, net, group, None);
        cmd
    }

    /// Starts a long-running process (typically `agent serve`) and waits
    /// until it prints its first line (`ready`); at most 60 s, which only a
    /// broken start or a slow emulated VM comes near. It is killed when the
    /// sandbox is dropped, or by [`Sandbox::stop`] with the pid returned.
    pub fn start(&self, mut cmd: Command) -> Result<u32> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60));
        let pid = child.id();
        self.children
            .lock()
            .map_err(|_| anyhow::anyhow!("sandbox lock poisoned"))?
            .push(child);
        match line {
            Ok(line) if line.trim() == "ready" => Ok(pid),
            Ok(line) => bail!("{cmd:?} (pid {pid}) did not become ready: {line:?}"),
            Err(_) => bail!("{cmd:?} (pid {pid}) was not ready within 60 s"),
        }
    }

    /// Kills and reaps the process [`Sandbox::start`] started as `pid`.
    pub fn stop(&self, pid: u32) -> Result<()> {
        let mut children = self
            .children
            .lock()
            .map_err(|_| anyhow::anyhow!("sandbox lock poisoned"))?;
        let i = children
            .iter()
            .position(|c| c.id() == pid)
            .with_context(|| format!("no process {pid} in this sandbox"))?;
        let mut child = children.remove(i);
        let killed = child.kill();
        child.wait().context("reaping")?;
        killed.context("killing")
    }

    /// Starts `agent serve` listening on `addr` and replying `reply`.
    pub fn serve(
        &self,
        net: Net,
        group: Group,
        who: Identity,
        addr: impl Into<SocketAddr>,
        reply: &str,
    ) -> Result<()> {
        let mut cmd = self.agent(net, group, who);
        let addr: SocketAddr = addr.into();
        cmd.args(["serve", "--listen", &addr.to_string(), "--reply", reply]);
        self.start(cmd).map(drop)
    }

    /// What answers one connection from the pod (cgroup `group`, identity
    /// `who`) to `to`: the reply text, or `error: <kind>`.
    pub fn lands(&self, group: Group, who: Identity, to: SocketAddrV4) -> Result<String> {
        let tally = self.connect(group, who, to, 1)?;
        tally
            .0
            .into_keys()
            .next()
            .context("the agent reported no connection")
    }

    /// What answers one connection from the peer (the rest of the network)
    /// to `to`: the reply text, or `error: <kind>`.
    pub fn lands_from_peer(&self, to: SocketAddrV4) -> Result<String> {
        let out = self.peer_output(&["connect", "--to", &to.to_string()])?;
        let tally = agent::Tally::parse(&out)?;
        tally
            .0
            .into_keys()
            .next()
            .context("the agent reported no connection")
    }

    /// Runs the agent with `args` in the pod and returns what it printed.
    pub fn agent_output(&self, group: Group, who: Identity, args: &[&str]) -> Result<String> {
        self.agent_output_in(Net::Pod, group, who, args)
    }

    /// Runs the agent with `args` in the peer namespace (a client from the
    /// rest of the network) and returns what it printed.
    pub fn peer_output(&self, args: &[&str]) -> Result<String> {
        self.agent_output_in(Net::Peer, Group::Outside, ROOT, args)
    }

    fn agent_output_in(
        &self,
        net: Net,
        group: Group,
        who: Identity,
        args: &[&str],
    ) -> Result<String> {
        let mut cmd = self.agent(net, group, who);
        cmd.args(args);
        let out = cmd
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {cmd:?}"))?;
        if !out.status.success() {
            bail!("{cmd:?} failed: {}", out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `agent connect` to `to`, `count` times, and returns the tally of
    /// replies (see [`agent::Tally`]).
    pub fn connect(
        &self,
        group: Group,
        who: Identity,
        to: SocketAddrV4,
        count: u32,
    ) -> Result<agent::Tally> {
        let (to, count) = (to.to_string(), count.to_string());
        let out = self.agent_output(group, who, &["connect", "--to", &to, "--count", &count])?;
        agent::Tally::parse(&out)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Ok(mut children) = self.children.lock() {
            for child in children.iter_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Detach the sandbox's redirect instance, if a test left it installed.
        let _ = fs::remove_dir_all(Path::new(PIN_ROOT).join(&self.name));
        cgroup::remove_pod(&self.cgroup);
        // Scratch files tests name after the sandbox (`<temp>/<name>-*`),
        // also when the test failed before removing them.
        let prefix = format!("{}-", self.name);
        if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let path = entry.path();
                    let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
                }
            }
        }
    }
}
