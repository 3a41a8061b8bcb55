//! Driving the `redirect` binary from tests, the way an operator does.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{APP, Group, Net, PEER_IP, PROXY, Sandbox};

/// Where [`Sandbox::with_upstream_and_proxy`] runs its upstream server.
pub const UPSTREAM: SocketAddrV4 = SocketAddrV4::new(PEER_IP, 9080);
/// What that upstream server answers.
pub const UPSTREAM_REPLY: &str = "upstream";
/// Where it runs its stand-in proxy (Istio's outbound port).
pub const PROXY_ADDR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001);
/// What that proxy answers.
pub const PROXY_REPLY: &str = "proxy";

/// The istio-iptables command line of Istio's sidecar injector (istio-init).
pub const ISTIO_SIDECAR_ARGS: &[&str] = &[
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
];

/// The `redirect` binary under test: `$REDIRECT_BIN`, or the workspace's
/// debug build (`cargo xtask test` builds it first).
pub fn redirect_bin() -> PathBuf {
    std::env::var_os("REDIRECT_BIN").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/debug/redirect"
            ))
        },
        PathBuf::from,
    )
}

/// What one `redirect` invocation did.
#[derive(Debug)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.code == 0
    }
}

/// Runs a prepared `redirect` command and collects its outcome.
pub fn outcome(cmd: &mut Command) -> Result<Outcome> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    Ok(Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `redirect ARGS` as the calling user, in the caller's namespaces.
pub fn redirect(args: &[&str]) -> Result<Outcome> {
    let bin = redirect_bin();
    if !bin.is_file() {
        bail!(
            "{} is missing: build it with `cargo xtask build`",
            bin.display()
        );
    }
    outcome(Command::new(bin).args(args))
}

/// The value of counter `name` of the first instance in `status --json` output.
pub fn counter(status: &Value, name: &str) -> u64 {
    status["instances"][0]["counters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .and_then(|c| c["value"].as_u64())
        .unwrap_or_else(|| panic!("no counter {name} in {status}"))
}

/// Whether `redirect probe` finds the kernel feature `name` here.
pub fn feature_present(name: &str) -> bool {
    redirect(&["probe", "--json"])
        .ok()
        .and_then(|out| serde_json::from_str::<Value>(&out.stdout).ok())
        .and_then(|report| {
            report["features"]
                .as_array()?
                .iter()
                .find(|f| f["name"] == name)
                .and_then(|f| f["present"].as_bool())
        })
        .unwrap_or(false)
}

/// Where `nft` (Debian's nftables package) is, if it is here.
pub fn nft() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join("nft"))
        .find(|p| p.is_file())
}

/// Whether `nft` is here (tests of Istio's native nftables mode need it).
pub fn nft_installed() -> bool {
    nft().is_some()
}

/// The tables `nft list tables` shows in the test's own (the host's)
/// network namespace, one `table FAMILY NAME` a line.
pub fn host_nft_tables() -> Vec<String> {
    list_tables(Command::new(nft().expect("nft")))
}

/// Runs `nft list tables` with `nft`, one line a table.
fn list_tables(mut nft: Command) -> Vec<String> {
    let out = nft
        .args(["list", "tables"])
        .output()
        .expect("nft list tables");
    assert!(out.status.success(), "nft list tables: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

impl Sandbox {
    /// The tables `nft list tables` shows in `net`, one `table FAMILY
    /// NAME` a line.
    pub fn nft_tables(&self, net: Net) -> Vec<String> {
        list_tables(self.command(net, Group::Outside, crate::ROOT, nft().expect("nft")))
    }

    /// A sandbox whose agent is `redirect sandbox-agent`.
    pub fn for_tests() -> Result<Self> {
        Self::new(redirect_bin(), &["sandbox-agent"])
    }

    /// The usual test pod: [`Sandbox::for_tests`] with an upstream server
    /// on [`UPSTREAM`] in the peer and a stand-in proxy on [`PROXY_ADDR`]
    /// as UID 1337 in the pod's proxy cgroup.
    pub fn with_upstream_and_proxy() -> Result<Self> {
        let sandbox = Self::for_tests()?;
        sandbox.serve(Net::Peer, Group::Outside, APP, UPSTREAM, UPSTREAM_REPLY)?;
        sandbox.serve(Net::Pod, Group::Proxy, PROXY, PROXY_ADDR, PROXY_REPLY)?;
        Ok(sandbox)
    }

    /// Starts the Rust test proxy: on [`PROXY_ADDR`] as UID 1337 in the
    /// pod's proxy cgroup, answering each connection with what it
    /// `report`s (`original-dst`, as a transparent proxy reads it, or `peer`).
    pub fn start_reporting_proxy(&self, report: &str) -> Result<()> {
        self.start_reporting_proxy_with(report, &[])
    }

    /// [`Sandbox::start_reporting_proxy`] with more `serve` options
    /// (`--http`, `--fastopen`, ...).
    pub fn start_reporting_proxy_with(&self, report: &str, options: &[&str]) -> Result<()> {
        let mut cmd = self.agent(Net::Pod, Group::Proxy, PROXY);
        cmd.args([
            "serve",
            "--listen",
            &PROXY_ADDR.to_string(),
            "--report",
            report,
        ]);
        cmd.args(options);
        self.start(cmd).map(drop)
    }

    /// Starts the proxy's inbound listener: on every address's 15006 as UID
    /// 1337 in the pod's proxy cgroup, answering each connection with what
    /// it `report`s.
    pub fn start_inbound_listener(&self, report: &str) -> Result<()> {
        let mut cmd = self.agent(Net::Pod, Group::Proxy, PROXY);
        cmd.args(["serve", "--listen", "0.0.0.0:15006", "--report", report]);
        self.start(cmd).map(drop)
    }

    /// A test pod with the upstream server on [`UPSTREAM`] and a proxy
    /// that answers each connection with its SO_ORIGINAL_DST.
    pub fn with_upstream_and_orig_dst_proxy() -> Result<Self> {
        let sandbox = Self::for_tests()?;
        sandbox.serve(Net::Peer, Group::Outside, APP, UPSTREAM, UPSTREAM_REPLY)?;
        sandbox.start_reporting_proxy("original-dst")?;
        Ok(sandbox)
    }

    /// `redirect install --cgroup <pod> --instance <name> --netns <pod>
    /// EXTRA...`; fails unless it succeeds.
    pub fn install(&self, extra: &[&str]) -> Result<Outcome> {
        let cgroup = self.pod_cgroup().to_string_lossy().into_owned();
        let netns = self.netns_path(Net::Pod);
        let mut args = vec![
            "install",
            "--cgroup",
            &cgroup,
            "--instance",
            self.name(),
            "--netns",
            &netns,
        ];
        args.extend_from_slice(extra);
        let out = redirect(&args)?;
        if !out.ok() {
            bail!("redirect {args:?} failed ({}): {}", out.code, out.stderr);
        }
        Ok(out)
    }

    /// `redirect uninstall --instance <name>`; fails unless it succeeds.
    pub fn uninstall(&self) -> Result<Outcome> {
        let out = redirect(&["uninstall", "--instance", self.name()])?;
        if !out.ok() {
            bail!("redirect uninstall failed ({}): {}", out.code, out.stderr);
        }
        Ok(out)
    }

    /// `redirect status --json --instance <name>`, parsed.
    pub fn status(&self) -> Result<Value> {
        let out = redirect(&["status", "--json", "--instance", self.name()])?;
        if !out.ok() {
            bail!("redirect status failed ({}): {}", out.code, out.stderr);
        }
        serde_json::from_str(&out.stdout).context("parsing status --json")
    }

    /// Whether the sandbox's instance has a pin directory.
    pub fn is_pinned(&self) -> bool {
        std::path::Path::new(crate::PIN_ROOT)
            .join(self.name())
            .exists()
    }
}

/// `observe`s one connection (see the agent) from `agent`: what the
/// client sees of its socket, then "| " and the server's answer.
pub fn observe_one(mut agent: Command, spec: &str) -> String {
    use std::io::Write as _;
    let mut child = agent
        .args(["observe", "--timeout-ms", "3000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("agent observe");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{spec}").expect("write the spec");
    drop(stdin);
    let out = child.wait_with_output().expect("agent observe");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An observation with every port but the `fixed` ones written `eph`
/// (wherever an `addr:port` word appears: the app's view and the
/// server's), so that runs with different ephemeral ports compare.
pub fn canonical_ports(seen: &str, fixed: &[u16]) -> String {
    seen.split(' ')
        .map(|word| match word.rsplit_once(':') {
            Some((head, port)) if port.parse::<u16>().is_ok_and(|p| !fixed.contains(&p)) => {
                format!("{head}:eph")
            }
            _ => word.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Unloads node set `.0` when dropped, also when the test fails (`node
/// uninstall` leaves a set loaded).
pub struct UnloadSet(pub String);

impl Drop for UnloadSet {
    fn drop(&mut self) {
        let _ = redirect(&["node-set", "unload", "--set", &self.0]);
    }
}

/// The observations (by case) that eBPF mode saw otherwise than iptables
/// mode, each with both: what a differential test reports.
pub fn differences(
    ebpf: &std::collections::BTreeMap<String, String>,
    iptables: &std::collections::BTreeMap<String, String>,
) -> Vec<String> {
    iptables
        .iter()
        .filter(|(k, v)| ebpf.get(*k) != Some(*v))
        .map(|(k, v)| {
            let seen = ebpf.get(k).map_or("(none)", String::as_str);
            format!("{k}:\n  iptables: {v}\n  eBPF:     {seen}")
        })
        .collect()
}
