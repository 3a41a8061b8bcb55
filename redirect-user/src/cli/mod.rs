//! redirect's own command line (clap), whose capture flags go through the
//! typed parsers of [`crate::capture::parse`] into a
//! [`crate::capture::Capture`].

use std::ffi::OsString;

use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum, error::ErrorKind};

use crate::{
    capture::{Capture, Cidrs, Dns, Given, InboundPorts, OwnerGroups, PortList, Profile, parse},
    host::{RealHost, resolve_owner, show_bytes},
};

mod node;
pub use node::*;

#[derive(Parser)]
#[command(
    name = "redirect",
    version,
    about = "Capture a pod's TCP for its sidecar proxy with eBPF, without iptables",
    long_about = "Capture a pod's TCP, outbound and inbound, for its sidecar proxy with eBPF, without iptables.\n\n\
        redirect attaches a cgroup/connect4 program to the pod's cgroup: every outbound IPv4 TCP \
        connect of the pod is rewritten to 127.0.0.1:<proxy port> or left alone by the same \
        rules, in the same order, as Istio's nat chain (OUTPUT -> ISTIO_OUTPUT -> \
        ISTIO_REDIRECT): the proxy's own UIDs/GIDs, loopback, excluded ports and CIDRs, owner \
        groups, and the proxy's calls to its own pod, which go to the inbound port. A sockops program remembers each \
        redirected connection's original destination. With -b, an sk_lookup program on the pod's network \
        namespace hands inbound connections to the proxy's inbound listener (nat PREROUTING -> \
        ISTIO_INBOUND -> ISTIO_IN_REDIRECT). The programs are pinned under \
        /sys/fs/bpf/redirect/<instance>/ and keep working after redirect exits.\n\n\
        Exit codes: 0 success, 1 failure, 2 bad command line.",
    after_help = "Run `redirect <command> --help` for a command's options."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Treat these features as missing (tests of the fallback paths)
    #[arg(
        long,
        global = true,
        hide = true,
        value_delimiter = ',',
        value_name = "FEATURE,..."
    )]
    pub assume_missing: Vec<String>,
}

/// `istio-iptables` alone, for a caller that runs it in this process with
/// flags it built (the CNI plugin): clap then builds this one command
/// instead of the whole command line, half a millisecond of a pod's ADD.
#[derive(Parser)]
#[command(name = "istio-iptables")]
pub struct IstioIptablesCommand {
    #[command(flatten)]
    pub args: crate::istio::IstioArgs,
}

#[derive(Subcommand)]
pub enum Command {
    /// Attach the capture to a cgroup, pin it, and exit (what a sidecar init step runs)
    #[command(long_about = "Attach the capture to a cgroup, pin it under \
        /sys/fs/bpf/redirect/<instance>/, and exit: capture persists after this process ends.\n\n\
        Installing again with the same instance replaces the configuration and the programs in \
        place, without a moment where connections escape capture. Install is all-or-nothing: \
        on any error nothing stays attached or pinned.")]
    Install(InstallArgs),
    /// Detach and unpin an installed instance
    Uninstall(UninstallArgs),
    /// Show installed instances, their config and decision counters
    Status(StatusArgs),
    /// Like install, but stay in the foreground and detach on SIGINT/SIGTERM
    Run(RunArgs),
    /// Remove the instances of pods that no longer exist (run it from a
    /// node timer or agent)
    #[command(
        long_about = "Remove every installed instance whose pod cgroup no longer exists. \
        Deleting a pod detaches its cgroup programs with its cgroup, but the pins under \
        /sys/fs/bpf/redirect/<instance>/ stay until removed: run `redirect gc` on each node \
        from a systemd timer or cron job, or from a node agent."
    )]
    Gc {
        /// Only list what would be removed
        #[arg(long)]
        dry_run: bool,
    },
    /// Show the capture working in a throw-away pod (network namespace + cgroup)
    #[cfg(feature = "sandbox")]
    Demo {
        /// The rule table to show: `istio` (Istio's sidecar flags) or
        /// `legacy` (the table of Istio's first init script)
        #[arg(long, value_enum, value_name = "PROFILE", default_value = "istio")]
        profile: ProfileArg,
    },
    /// Show which kernel features eBPF capture needs, whether this node has
    /// each (tested by loading, not by version), and the mode that follows
    Probe {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// istio-iptables' command line: the same flags, environment and exit codes
    #[command(
        long_about = "istio-iptables' command line, with the same flags, defaults, \
        environment variables, \"empty means off\" rules and exit codes (0 success, 1 refused \
        configuration, 255 bad command line).\n\n\
        With --dry-run, prints the iptables-restore documents istio-iptables would apply for \
        this configuration (IPv4, then IPv6 when enabled), byte for byte as istio-iptables \
        prints them. Unlike istio-iptables, ports, CIDRs, the interception mode and owner \
        names are checked before anything is applied."
    )]
    IstioIptables(Box<crate::istio::IstioArgs>),
    /// What Istio's CNI plugin does for a pod: leave it alone, or capture it
    /// with these istio-iptables flags
    #[command(
        long_about = "What Istio's CNI plugin does for a pod in sidecar mode, from the \
        pod's Kubernetes object (JSON): leave it alone (and why), or capture it with the \
        istio-iptables flags Istio's plugin builds from its annotations and its istio-proxy \
        container (runAsUser/runAsGroup, ISTIO_META_DNS_CAPTURE, INVALID_DROP, \
        ISTIO_DUAL_STACK).\n\n\
        Without arguments after `--`, prints those flags. With them, runs `redirect \
        istio-iptables` with the flags and those arguments: `-- --dry-run --ipv6=false` \
        prints the rules Istio's plugin installs; `-- --netns PATH --cgroup PATH` applies the \
        capture to that pod. A bad annotation value is an error in Istio's words, exit 1."
    )]
    CniPlan(CniPlanArgs),
    /// One program set for the whole node: load it on the cgroup holding
    /// the node's pods, add and remove pods (each by its network
    /// namespace, with install's capture flags), show it, unload it
    NodeSet {
        #[command(subcommand)]
        action: NodeSetAction,
    },
    /// The CNI plugin on this node: install (copy `redirect-cni` into the CNI
    /// bin dir and chain it into the runtime's network configuration),
    /// uninstall, status
    Node {
        #[command(subcommand)]
        action: NodeAction,
    },
    /// Internal: the sandbox agent used by `demo` and the tests
    #[cfg(feature = "sandbox")]
    #[command(hide = true)]
    SandboxAgent {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Args)]
pub struct TargetArgs {
    /// cgroup v2 directory of the pod, or `self-parent` (the parent of this
    /// process's own cgroup: the pod cgroup when run from an init container);
    /// required for eBPF capture
    #[arg(long, value_name = "PATH|self-parent")]
    pub cgroup: Option<String>,

    /// Name of the pin directory /sys/fs/bpf/redirect/<NAME>/ [default: the
    /// cgroup's path below the cgroup2 mount, with '/' turned into '-']
    #[arg(long, value_name = "NAME", value_parser = crate::instance::parse_arg)]
    pub instance: Option<crate::instance::InstanceName>,

    /// The pod's network namespace (/proc/PID/ns/net or /run/netns/NAME)
    /// [default: this process's, which is the pod's in an init container]
    #[arg(long, value_name = "PATH")]
    pub netns: Option<std::path::PathBuf>,
}

impl TargetArgs {
    /// `--cgroup`, which eBPF capture needs.
    pub fn cgroup(&self) -> anyhow::Result<&str> {
        self.cgroup.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "eBPF capture attaches to the pod's cgroup: pass --cgroup PATH (or self-parent from an init container)"
            )
        })
    }

    /// Enters `--netns`, when given: the pod's addresses and its inbound
    /// hook are those of the namespace this thread is in.
    pub fn enter_netns(&self) -> anyhow::Result<()> {
        match &self.netns {
            Some(path) => crate::netns::enter(path),
            None => Ok(()),
        }
    }
}

#[derive(Args)]
pub struct CaptureArgs {
    /// Port the proxy listens on for captured outbound connections (Istio -p)
    #[arg(short = 'p', long, value_name = "PORT", default_value = "15001", value_parser = |s: &str| parse::port("-p", s))]
    pub proxy_port: Given<u16>,

    /// The proxy's UIDs, comma-separated, at most 8: their connections are
    /// never captured (Istio -u)
    #[arg(short = 'u', long, value_name = "UID[,UID...]", default_value = "1337", value_parser = parse_ids)]
    pub proxy_uid: IdList,

    /// The proxy's GIDs, comma-separated, at most 8: their connections are
    /// never captured (Istio -g)
    #[arg(short = 'g', long, value_name = "GID[,GID...]", default_value = "1337", value_parser = parse_ids)]
    pub proxy_gid: IdList,

    /// Port of the proxy's inbound listener: the proxy's own calls to its
    /// pod (other than to the loopback CIDR) are sent there (Istio -z)
    #[arg(short = 'z', long = "inbound-capture-port", value_name = "PORT", default_value = "15006", value_parser = |s: &str| parse::port("-z", s))]
    pub inbound_port: Given<u16>,

    /// Inbound tunnel port: the proxy's calls to it are never sent to the
    /// inbound port (Istio -e)
    #[arg(short = 'e', long = "inbound-tunnel-port", value_name = "PORT", default_value = "15008", value_parser = |s: &str| parse::port("-e", s))]
    pub tunnel_port: Given<u16>,

    /// Destinations captured: '*' (all) or comma-separated CIDRs; empty
    /// captures none but the -q ports (Istio -i)
    #[arg(short = 'i', long = "istio-service-cidr", value_name = "*|CIDR[,CIDR...]", default_value = "*", value_parser = |s: &str| parse::cidrs("-i", s))]
    pub include: Cidrs,

    /// Destinations never captured: comma-separated CIDRs (Istio -x)
    #[arg(short = 'x', long = "istio-service-exclude-cidr", value_name = "CIDR[,CIDR...]", default_value = "", value_parser = parse::exclude_cidrs)]
    pub exclude: Cidrs,

    /// Destination ports always captured (Istio -q)
    #[arg(short = 'q', long = "istio-outbound-ports", value_name = "PORT[,PORT...]", default_value = "", value_parser = |s: &str| parse::port_list("-q", s))]
    pub ports_include: PortList,

    /// Destination ports never captured (Istio -o)
    #[arg(short = 'o', long = "istio-local-outbound-ports-exclude", value_name = "PORT[,PORT...]", default_value = "", value_parser = |s: &str| parse::port_list("-o", s))]
    pub ports_exclude: PortList,

    /// Only these groups' connections are captured: '*' (every group), or
    /// group names or GIDs, at most 8 (Istio's ISTIO_OUTBOUND_OWNER_GROUPS)
    #[arg(long, env = "ISTIO_OUTBOUND_OWNER_GROUPS", value_name = "*|GROUP[,GROUP...]", default_value = "*", value_parser = parse_owner_groups)]
    pub owner_groups: GroupList,

    /// These groups' connections are never captured; used when
    /// --owner-groups is '*' (Istio's ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE)
    #[arg(long, env = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", value_name = "GROUP[,GROUP...]", default_value = "", value_parser = parse_groups)]
    pub owner_groups_exclude: GroupList,

    /// Inbound ports captured: '*' (every port but the -d ones), ports,
    /// or empty for no inbound capture (Istio -b)
    #[arg(short = 'b', long = "istio-inbound-ports", value_name = "*|PORT[,PORT...]", default_value = "", value_parser = parse::inbound_ports)]
    pub inbound_ports: InboundPorts,

    /// Inbound ports never captured, with -b '*' (Istio -d)
    #[arg(short = 'd', long = "istio-local-exclude-ports", value_name = "PORT[,PORT...]", default_value = "", value_parser = |s: &str| parse::port_list("-d", s))]
    pub inbound_exclude: PortList,

    /// How many redirected connections can be in their handshake at once
    /// (from the app's SYN until the proxy's end is established): sizes the
    /// original-destination tuple map, about 100 bytes each. Open
    /// connections keep their records in socket storage, without limit
    #[arg(long, env = "REDIRECT_MAX_CONNECTIONS", value_name = "N", default_value = "4096", value_parser = parse::max_connections)]
    pub max_connections: u32,

    /// REDIRECT or TPROXY (Istio -m). eBPF captures inbound as REDIRECT
    /// does; TPROXY needs netfilter (marks, policy routing, CONNMARK), so
    /// install and run refuse it and `redirect istio-iptables` programs
    /// iptables for it
    #[arg(short = 'm', long = "istio-inbound-interception-mode", value_name = "REDIRECT|TPROXY", default_value = "REDIRECT", action = clap::ArgAction::Set, value_parser = parse::interception_mode)]
    pub tproxy: bool,

    /// Which rule table: `istio` (today's istio-iptables, every flag
    /// above) or `legacy` (the table of Istio's first init script: -p and
    /// -u only; inbound TCP on every port to -p; see docs/design.md)
    #[arg(long, value_enum, value_name = "PROFILE", default_value = "istio")]
    pub profile: ProfileArg,

    #[command(flatten)]
    pub not_yet: NotYetArgs,
}

/// `--profile`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProfileArg {
    Istio,
    Legacy,
}

/// istio-iptables flags that eBPF capture cannot honour yet. They are
/// accepted by name so that a copied istio-iptables command line gets a
/// refusal that names the flag and the way out (from the eBPF lowering),
/// not a parse error.
#[derive(Args)]
pub struct NotYetArgs {
    /// TPROXY's mark and routing table.
    #[arg(short = 't', long = "inbound-tproxy-mark", hide = true, default_value = "1337", value_parser = |s: &str| parse::number("-t", s))]
    tproxy_mark: Given<u32>,
    #[arg(short = 'r', long = "inbound-tproxy-route-table", hide = true, default_value = "133", value_parser = |s: &str| parse::number("-r", s))]
    tproxy_route_table: Given<u32>,
    #[arg(
        short = 'c',
        long = "istio-exclude-interfaces",
        hide = true,
        default_value = ""
    )]
    exclude_interfaces: String,
    #[arg(
        short = 'k',
        long = "kube-virt-interfaces",
        hide = true,
        default_value = ""
    )]
    kube_virt_interfaces: String,
    #[arg(long = "redirect-dns", hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse::go_bool)]
    redirect_dns: Option<bool>,
    #[arg(long = "drop-invalid", hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse::go_bool)]
    drop_invalid: Option<bool>,
    #[arg(long = "dual-stack", hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse::go_bool)]
    dual_stack: Option<bool>,
}

impl CaptureArgs {
    /// The capture these flags ask for, with a sidecar's defaults (`-i
    /// '*'`), for the pod whose addresses are `pod_addresses`; with
    /// `--profile legacy`, the legacy table, refused when a flag it has no
    /// rule for was changed from its default.
    pub fn resolve(
        &self,
        pod_addresses: Vec<std::net::Ipv4Addr>,
        log_level: u8,
    ) -> anyhow::Result<Capture> {
        if self.profile == ProfileArg::Legacy {
            let conflicts = self.legacy_conflicts();
            if !conflicts.is_empty() {
                anyhow::bail!(
                    "--profile legacy is the table of Istio's first init script, which has rules for -p and -u only: drop {}",
                    conflicts.join(", ")
                );
            }
            return Ok(Capture::legacy(
                self.proxy_port.clone(),
                self.proxy_uid.0.clone(),
                pod_addresses,
                self.max_connections,
                log_level,
            ));
        }
        Ok(self.istio(pod_addresses, log_level))
    }

    /// The flags set to anything but their defaults that the legacy table
    /// has no rule for.
    fn legacy_conflicts(&self) -> Vec<&'static str> {
        use crate::ebpf::config::{DEFAULT_INBOUND_PORT, DEFAULT_PROXY_ID, DEFAULT_TUNNEL_PORT};
        let not_yet = &self.not_yet;
        let ports_empty = |list: &PortList| list.is_empty();
        [
            (self.proxy_gid.0 != [DEFAULT_PROXY_ID.to_string()], "-g"),
            (self.inbound_port.value != DEFAULT_INBOUND_PORT, "-z"),
            (self.tunnel_port.value != DEFAULT_TUNNEL_PORT, "-e"),
            (
                !self.include.wildcard
                    || !self.include.v4.is_empty()
                    || !self.include.v6.is_empty(),
                "-i",
            ),
            (self.exclude != Cidrs::default(), "-x"),
            (!ports_empty(&self.ports_include), "-q"),
            (!ports_empty(&self.ports_exclude), "-o"),
            (self.owner_groups.0.is_some(), "--owner-groups"),
            (
                self.owner_groups_exclude
                    .0
                    .as_ref()
                    .is_some_and(|g| !g.is_empty()),
                "--owner-groups-exclude",
            ),
            (self.inbound_ports != InboundPorts::Off, "-b"),
            (!ports_empty(&self.inbound_exclude), "-d"),
            (self.tproxy, "-m TPROXY"),
            (!not_yet.exclude_interfaces.is_empty(), "-c"),
            (!not_yet.kube_virt_interfaces.is_empty(), "-k"),
            (not_yet.redirect_dns == Some(true), "--redirect-dns"),
            (not_yet.drop_invalid == Some(true), "--drop-invalid"),
            (not_yet.dual_stack == Some(true), "--dual-stack"),
        ]
        .into_iter()
        .filter_map(|(set, flag)| set.then_some(flag))
        .collect()
    }

    /// `--profile istio`: every flag, as istio-iptables reads it.
    fn istio(&self, pod_addresses: Vec<std::net::Ipv4Addr>, log_level: u8) -> Capture {
        let not_yet = &self.not_yet;
        Capture {
            profile: Profile::Istio,
            proxy_port: self.proxy_port.clone(),
            inbound_port: self.inbound_port.clone(),
            tunnel_port: self.tunnel_port.clone(),
            proxy_uids: self.proxy_uid.0.clone(),
            proxy_gids: self.proxy_gid.0.clone(),
            tproxy: self.tproxy,
            tproxy_mark: not_yet.tproxy_mark.clone(),
            tproxy_route_table: not_yet.tproxy_route_table.clone(),
            inbound: self.inbound_ports.clone(),
            inbound_exclude: self.inbound_exclude.clone(),
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            outbound_ports: self.ports_include.clone(),
            outbound_exclude: self.ports_exclude.clone(),
            exclude_interfaces: parse::split(&not_yet.exclude_interfaces),
            kube_virt_interfaces: parse::split(&not_yet.kube_virt_interfaces),
            dns: (not_yet.redirect_dns == Some(true)).then(Dns::default),
            drop_invalid: not_yet.drop_invalid == Some(true),
            ipv6: not_yet.dual_stack == Some(true),
            owner_groups: match &self.owner_groups.0 {
                None => {
                    OwnerGroups::Except(self.owner_groups_exclude.0.clone().unwrap_or_default())
                }
                Some(only) => OwnerGroups::Only(only.clone()),
            },
            loopback: parse::default_loopback(),
            pod_addresses,
            max_connections: self.max_connections,
            log_level,
        }
    }
}

#[derive(Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub capture: CaptureArgs,

    /// Program the capture with iptables (nft or legacy, as istio-iptables
    /// chooses) in the pod's network namespace instead of eBPF: the same
    /// resolved capture, lowered to its rules (with --profile legacy, the
    /// legacy table); no cgroup, no instance
    #[arg(long)]
    pub iptables: bool,

    /// With --iptables: print the iptables-restore document and change nothing
    #[arg(long, requires = "iptables")]
    pub dry_run: bool,
}

#[derive(Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub what: UninstallWhat,
    /// With --iptables: the network namespace (/proc/PID/ns/net or
    /// /run/netns/NAME) [default: this process's]
    #[arg(long, value_name = "PATH", requires = "iptables")]
    pub netns: Option<std::path::PathBuf>,
}

/// What `uninstall` removes.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct UninstallWhat {
    /// Remove every instance installed on this cgroup
    #[arg(long, value_name = "PATH|self-parent")]
    pub cgroup: Option<String>,
    /// Remove the instance with this name
    #[arg(long, value_name = "NAME", value_parser = crate::instance::parse_arg)]
    pub instance: Option<crate::instance::InstanceName>,
    /// Remove what `install --iptables` applied: Istio's chains and the
    /// jumps into them, in this network namespace or --netns's (either
    /// profile; an istio-iptables run's interface rules need its own
    /// --cleanup-only)
    #[arg(long)]
    pub iptables: bool,
}

#[derive(Args)]
pub struct StatusArgs {
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
    /// Only this instance
    #[arg(long, value_name = "NAME", value_parser = crate::instance::parse_arg)]
    pub instance: Option<crate::instance::InstanceName>,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub capture: CaptureArgs,
    /// Print the eBPF programs' decisions: debug shows every redirect,
    /// trace every decision; off costs one branch per connect
    #[arg(long, value_enum, default_value = "off")]
    pub log: LogLevel,
    /// Leave the capture installed when stopped
    #[arg(long)]
    pub persist: bool,
}

/// What `redirect run --log` prints of the programs' decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Nothing (one branch per connect).
    Off,
    /// Every redirect.
    Debug,
    /// Every decision.
    Trace,
}

impl LogLevel {
    /// The config's `log_level` for this level (`redirect_common::LOG_*`).
    pub fn ebpf_level(self) -> u8 {
        match self {
            Self::Off => 0,
            Self::Debug => redirect_common::LOG_DEBUG,
            Self::Trace => redirect_common::LOG_TRACE,
        }
    }
}

/// `--owner-groups` (`None` for '*', every group) or
/// `--owner-groups-exclude`: group names or GIDs, as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupList(pub Option<Vec<String>>);

fn parse_owner_groups(s: &str) -> Result<GroupList, String> {
    if s == "*" {
        return Ok(GroupList(None));
    }
    parse_groups(s)
}

/// Group names or GIDs, comma-separated, at most 8, each a GID or a group
/// /etc/group lists (checked here: install and run are eBPF only, and the
/// programs compare numbers).
fn parse_groups(s: &str) -> Result<GroupList, String> {
    let groups = parse::split(s);
    for g in &groups {
        if resolve_owner(&RealHost::new(), "/etc/group", g).is_none() {
            return Err(format!("'{g}' is neither a GID nor a group in /etc/group"));
        }
    }
    if groups.len() > redirect_common::MAX_GROUPS {
        return Err(format!(
            "{} groups given; at most {} are supported",
            groups.len(),
            redirect_common::MAX_GROUPS
        ));
    }
    Ok(GroupList(Some(groups)))
}

/// A comma-separated numeric id list given as one flag value
/// (`-u 1337,1338`), at most 8.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdList(pub Vec<String>);

fn parse_ids(s: &str) -> Result<IdList, String> {
    let ids = parse::ids(s)?;
    if ids.len() > redirect_common::MAX_OWNERS {
        return Err(format!(
            "{} ids given; at most {} are supported",
            ids.len(),
            redirect_common::MAX_OWNERS
        ));
    }
    Ok(IdList(ids))
}

/// One line naming what clap refused as not UTF-8 (its own error, "invalid
/// UTF-8 was detected in one or more arguments", names nothing), and the
/// fix. Paths (`--netns`, `--resolv-conf`) may be any bytes, so the
/// culprit is not simply the first argument that is not UTF-8: it is the
/// first one that, alone left as bytes, still fails the parse that way. If
/// none does, a flag's environment variable is to blame.
pub fn invalid_utf8(argv: &[OsString]) -> String {
    let mut cli = Cli::command();
    cli.build();
    let command = argv
        .iter()
        .skip(1)
        .find_map(|a| cli.find_subcommand(a.to_str()?))
        .unwrap_or(&cli);
    let fails_on_utf8 = |argv: &[OsString]| {
        Cli::try_parse_from(argv).is_err_and(|err| err.kind() == ErrorKind::InvalidUtf8)
    };
    // `argv` with every argument that is not UTF-8 but `keep` made lossy.
    let lossy_but = |keep: Option<usize>| -> Vec<OsString> {
        argv.iter()
            .enumerate()
            .map(|(i, arg)| match arg.to_str() {
                None if Some(i) != keep => arg.to_string_lossy().into_owned().into(),
                _ => arg.clone(),
            })
            .collect()
    };
    if !fails_on_utf8(&lossy_but(None)) {
        let culprit = (1..argv.len())
            .filter(|&i| argv[i].to_str().is_none())
            .find(|&i| fails_on_utf8(&lossy_but(Some(i))));
        if let Some(i) = culprit {
            let shown = show_bytes(&argv[i]);
            let flag = argv[i - 1].to_str().filter(|_| i > 1).filter(|word| {
                takes_next_as_value(command.get_arguments().chain(cli.get_arguments()), word)
            });
            return match flag {
                Some(flag) => {
                    format!("the value of {flag} ('{shown}') is not valid UTF-8: pass it as text")
                }
                None => format!("argument '{shown}' is not valid UTF-8: pass it as text"),
            };
        }
    }
    match not_utf8_env(command, argv).first() {
        Some((name, value)) => format!(
            "environment variable {name} is not valid UTF-8 ('{}'): set it to text, or unset it",
            show_bytes(value)
        ),
        None => "an argument or environment variable is not valid UTF-8: pass text".to_owned(),
    }
}

/// Whether `word` is a flag of `args` that takes the next argument as its
/// value (`--cgroup`, `-p`; not `--dry-run`, whose value must be attached).
fn takes_next_as_value<'a>(mut args: impl Iterator<Item = &'a clap::Arg>, word: &str) -> bool {
    args.any(|arg| {
        let named = match word.strip_prefix("--") {
            Some(long) => arg.get_long() == Some(long),
            None => word.strip_prefix('-').is_some_and(|short| {
                let mut chars = short.chars();
                chars.next().is_some_and(|c| arg.get_short() == Some(c)) && chars.next().is_none()
            }),
        };
        named && arg.get_action().takes_values() && !arg.is_require_equals_set()
    })
}

/// The environment variables of `command`'s flags that are set to bytes
/// that are not UTF-8, leaving out those of flags given on the command
/// line (clap does not read them).
fn not_utf8_env(command: &clap::Command, argv: &[OsString]) -> Vec<(String, OsString)> {
    let given = |arg: &clap::Arg| {
        argv.iter().filter_map(|a| a.to_str()).any(|a| {
            arg.get_long().is_some_and(|long| {
                a.strip_prefix("--")
                    .is_some_and(|a| a == long || a.starts_with(&format!("{long}=")))
            }) || arg
                .get_short()
                .is_some_and(|short| a.starts_with(&format!("-{short}")))
        })
    };
    command
        .get_arguments()
        .filter(|arg| !given(arg))
        .filter_map(|arg| {
            let name = arg.get_env()?;
            let value = std::env::var_os(name)?;
            value
                .to_str()
                .is_none()
                .then(|| (name.to_string_lossy().into_owned(), value))
        })
        .collect()
}

#[cfg(test)]
mod properties;
#[cfg(all(test, feature = "sandbox"))]
mod reference;
#[cfg(test)]
mod tests;
