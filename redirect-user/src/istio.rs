//! istio-iptables' command line: the same flags, defaults, environment
//! variables and "empty means off" rules, resolved into one validated
//! [`IstioConfig`].
//!
//! Values are kept as the text the user gave (istio-iptables pastes them
//! into rules verbatim; the golden files depend on it), but every one is
//! checked first: where istio-iptables would let `iptables-restore` fail
//! halfway, redirect refuses before changing anything.

use std::{ffi::OsString, fs, net::IpAddr, path::PathBuf};

use clap::{Args, ValueEnum};

/// The flags of `istio-iptables` (and their environment variables).
#[derive(Args, Clone, Debug)]
pub struct IstioArgs {
    /// Port the proxy listens on for captured outbound traffic
    #[arg(short = 'p', long = "envoy-port", default_value = "15001")]
    pub envoy_port: String,
    /// Port the proxy listens on for captured inbound traffic
    #[arg(
        short = 'z',
        long = "inbound-capture-port",
        env = "INBOUND_CAPTURE_PORT",
        default_value = "15006"
    )]
    pub inbound_capture_port: String,
    /// Inbound tunnel (HBONE) port, never captured
    #[arg(
        short = 'e',
        long = "inbound-tunnel-port",
        env = "INBOUND_TUNNEL_PORT",
        default_value = "15008"
    )]
    pub inbound_tunnel_port: String,
    /// The proxy's UIDs, comma-separated [default: the uid of $ENVOY_USER (istio-proxy), else 1337]
    #[arg(short = 'u', long = "proxy-uid", env = "PROXY_UID", default_value = "")]
    pub proxy_uid: String,
    /// The proxy's GIDs, comma-separated [default: the proxy UIDs]
    #[arg(short = 'g', long = "proxy-gid", env = "PROXY_GID", default_value = "")]
    pub proxy_gid: String,
    /// Inbound interception mode: REDIRECT or TPROXY
    #[arg(
        short = 'm',
        long = "istio-inbound-interception-mode",
        env = "ISTIO_INBOUND_INTERCEPTION_MODE",
        default_value = ""
    )]
    pub interception_mode: String,
    /// Mark of TPROXY-intercepted packets
    #[arg(
        short = 't',
        long = "istio-inbound-tproxy-mark",
        env = "ISTIO_INBOUND_TPROXY_MARK",
        default_value = "1337"
    )]
    pub tproxy_mark: String,
    /// Routing table of TPROXY-intercepted packets
    #[arg(
        short = 'r',
        long = "istio-inbound-tproxy-route-table",
        env = "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
        default_value = "133"
    )]
    pub tproxy_route_table: String,
    /// Inbound ports to capture: a list, `*` for all, empty for none
    #[arg(
        short = 'b',
        long = "istio-inbound-ports",
        env = "ISTIO_INBOUND_PORTS",
        default_value = ""
    )]
    pub inbound_ports: String,
    /// Inbound ports never captured (with `-b '*'` only)
    #[arg(
        short = 'd',
        long = "istio-local-exclude-ports",
        env = "ISTIO_LOCAL_EXCLUDE_PORTS",
        default_value = ""
    )]
    pub local_exclude_ports: String,
    /// Outbound destination CIDRs to capture: a list, `*` for all, empty for none
    #[arg(
        short = 'i',
        long = "istio-service-cidr",
        env = "ISTIO_SERVICE_CIDR",
        default_value = ""
    )]
    pub service_cidr: String,
    /// Outbound destination CIDRs never captured (`*` is not allowed)
    #[arg(
        short = 'x',
        long = "istio-service-exclude-cidr",
        env = "ISTIO_SERVICE_EXCLUDE_CIDR",
        default_value = ""
    )]
    pub service_exclude_cidr: String,
    /// Outbound ports always captured
    #[arg(
        short = 'q',
        long = "istio-outbound-ports",
        env = "ISTIO_OUTBOUND_PORTS",
        default_value = ""
    )]
    pub outbound_ports: String,
    /// Outbound ports never captured
    #[arg(
        short = 'o',
        long = "istio-local-outbound-ports-exclude",
        env = "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
        default_value = ""
    )]
    pub local_outbound_ports_exclude: String,
    /// Interfaces whose traffic is never captured
    #[arg(
        short = 'c',
        long = "istio-exclude-interfaces",
        env = "ISTIO_EXCLUDE_INTERFACES",
        default_value = ""
    )]
    pub exclude_interfaces: String,
    /// Virtual interfaces whose inbound traffic is treated as outbound
    #[arg(
        short = 'k',
        long = "kube-virt-interfaces",
        env = "KUBE_VIRT_INTERFACES",
        default_value = ""
    )]
    pub kube_virt_interfaces: String,
    /// Print the iptables-restore documents instead of applying them [env DRY_RUN]
    #[arg(short = 'n', long = "dry-run", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub dry_run: Option<bool>,
    /// Capture DNS to the proxy's DNS port (15053) for the resolv.conf servers
    /// [env REDIRECT_DNS, then ISTIO_META_DNS_CAPTURE]
    #[arg(long = "redirect-dns", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub redirect_dns: Option<bool>,
    /// With --redirect-dns: capture all DNS, not only to the resolv.conf servers [env CAPTURE_ALL_DNS]
    #[arg(long = "capture-all-dns", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub capture_all_dns: Option<bool>,
    /// Drop packets conntrack considers invalid [env DROP_INVALID, then INVALID_DROP]
    #[arg(long = "drop-invalid", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub drop_invalid: Option<bool>,
    /// With automatic IPv6 detection: IPv6 rules when the pod has any IPv6
    /// address [env DUAL_STACK, then ISTIO_DUAL_STACK]
    #[arg(long = "dual-stack", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub dual_stack: Option<bool>,
    /// Remove the Istio rules instead of installing them [env CLEANUP_ONLY]
    #[arg(long = "cleanup-only", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub cleanup_only: Option<bool>,
    /// Do nothing and exit 0 (istio-cni's validation mode) [env SKIP_RULE_APPLY]
    #[arg(long = "skip-rule-apply", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub skip_rule_apply: Option<bool>,
    /// Replace different Istio rules already in place [env RECONCILE]
    #[arg(long = "reconcile", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub reconcile: Option<bool>,
    /// Accepted for compatibility; redirect does not run Istio's validator [env RUN_VALIDATION]
    #[arg(long = "run-validation", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub run_validation: Option<bool>,
    /// Accepted for compatibility (redirect applies whenever the rules differ) [env FORCE_APPLY]
    #[arg(long = "force-apply", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub force_apply: Option<bool>,
    /// Accepted for compatibility (no effect) [env CNI_MODE]
    #[arg(long = "cni-mode", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub cni_mode: Option<bool>,
    /// Istio's native nftables mode: not supported (refused) [env NATIVE_NFTABLES]
    #[arg(long = "native-nftables", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub native_nftables: Option<bool>,
    /// Accepted for compatibility (used by Istio's validator only)
    #[arg(long = "iptables-probe-port", value_name = "PORT", hide = true)]
    pub iptables_probe_port: Option<u16>,
    /// Accepted for compatibility (used by Istio's validator only)
    #[arg(long = "probe-timeout", value_name = "DURATION", hide = true)]
    pub probe_timeout: Option<String>,
    /// istio-iptables' logging flags (pilot-agent's), accepted and ignored
    #[arg(long = "log_output_level", hide = true)]
    pub log_output_level: Option<String>,
    #[arg(long = "log_as_json", hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub log_as_json: Option<bool>,
    #[arg(long = "log_caller", hide = true)]
    pub log_caller: Option<String>,
    #[arg(long = "log_stacktrace_level", hide = true)]
    pub log_stacktrace_level: Option<String>,
    #[arg(long = "log_target", hide = true)]
    pub log_target: Vec<String>,
    /// Extra arguments, ignored as istio-iptables ignores them
    #[arg(hide = true)]
    pub ignored: Vec<String>,
    /// Generate IPv6 rules: auto (from the pod's addresses, as istio-iptables), true or false
    #[arg(long, value_enum, default_value = "auto")]
    pub ipv6: Ipv6Mode,
    /// Where DNS servers are read from (for --redirect-dns)
    #[arg(long, value_name = "PATH", default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// iptables implementation: legacy or nft [default: the one with rules here, else nft]
    #[arg(
        long = "force-iptables-binary",
        env = "FORCE_IPTABLES_BINARY",
        default_value = ""
    )]
    pub force_iptables_binary: String,
    /// Capture with eBPF, with iptables, or (auto) with eBPF when this node
    /// and these flags allow it, else iptables, saying why
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: Mode,
    /// The pod's cgroup, for eBPF mode (self-parent: the parent of this
    /// process's cgroup, the pod's when run from an init container)
    #[arg(long, value_name = "PATH|self-parent", default_value = "self-parent")]
    pub cgroup: String,
    /// eBPF mode's instance name [default: derived from the cgroup]
    #[arg(long, value_name = "NAME", value_parser = crate::instance::parse_arg)]
    pub instance: Option<crate::instance::InstanceName>,
    /// eBPF mode: how many redirected connections can be open at once
    /// (sizes the original-destination map: about 100 bytes each)
    #[arg(long, env = "REDIRECT_MAX_CONNECTIONS", value_name = "N", default_value = "65536", value_parser = crate::config::parse_max_connections)]
    pub max_connections: u32,
    /// Apply in this network namespace (/proc/PID/ns/net or /run/netns/NAME)
    #[arg(long = "netns", alias = "network-namespace", value_name = "PATH")]
    pub netns: Option<PathBuf>,
}

/// How the capture is programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Auto,
    Ebpf,
    Iptables,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Ipv6Mode {
    Auto,
    True,
    False,
}

/// Why istio-iptables' input is refused, with its exit code.
#[derive(Debug)]
pub struct ConfigError {
    message: String,
    /// 1 for a configuration istio-iptables would refuse, or one that would
    /// fail halfway through applying it; 255 for input that is no value at
    /// all (see [`ConfigError::not_utf8`]).
    pub exit_code: u8,
}

impl ConfigError {
    /// A configuration refused (exit 1, as istio-iptables). Control
    /// characters of the values it quotes are escaped: the message stays
    /// one line, and a value cannot drive the terminal.
    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            message: message
                .into()
                .chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_default().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect(),
            exit_code: 1,
        }
    }

    /// Environment variable `name` is set to bytes that are not UTF-8.
    /// That is a bad command line, not a refused configuration: clap
    /// refuses the same bytes in the variables it reads for flags
    /// (`PROXY_UID`, ...) as a usage error, and `main` gives those exit 255
    /// (istio-iptables' code for a bad command line; 2 for redirect's own
    /// commands). Every variable, whoever reads it, gets that one rule.
    pub fn not_utf8(name: &str, value: &std::ffi::OsStr) -> Self {
        Self {
            message: format!(
                "environment variable {name} is not valid UTF-8 ('{}'): set it to text, or unset it",
                crate::cli::show_bytes(value)
            ),
            exit_code: 255,
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

fn error<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::refused(msg))
}

/// The resolved, validated istio-iptables configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IstioConfig {
    pub envoy_port: String,
    pub inbound_capture_port: String,
    pub inbound_tunnel_port: String,
    pub proxy_uids: Vec<String>,
    pub proxy_gids: Vec<String>,
    pub tproxy: bool,
    pub tproxy_mark: String,
    pub tproxy_route_table: String,
    /// The raw `-b` value: `""` off, `"*"` all, else a list.
    pub inbound_ports: String,
    pub local_exclude_ports: Vec<String>,
    pub include: Cidrs,
    pub exclude: Cidrs,
    /// The raw `-q` value.
    pub outbound_ports: String,
    /// The raw `-o` value.
    pub local_outbound_ports_exclude: String,
    pub exclude_interfaces: Vec<String>,
    pub kube_virt_interfaces: Vec<String>,
    /// DNS capture in effect (`--redirect-dns`, unless no server is known
    /// and `--capture-all-dns` is off).
    pub redirect_dns: bool,
    pub capture_all_dns: bool,
    pub drop_invalid: bool,
    pub ipv6: bool,
    /// DNS servers from resolv.conf, as written there.
    pub dns_v4: Vec<String>,
    pub dns_v6: Vec<String>,
    pub owner_groups: OwnerGroups,
    /// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`, as written.
    pub loopback_v4: String,
}

/// Destination CIDRs of one flag, split by family.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Cidrs {
    /// `*`: every destination.
    pub wildcard: bool,
    /// Rendered as istio-iptables does (address canonical, host bits kept).
    pub v4: Vec<String>,
    pub v6: Vec<String>,
    /// Contains a loopback network (127/8, ::1).
    pub has_loopback: bool,
}

/// Whose outbound traffic is captured, by owner group
/// (`ISTIO_OUTBOUND_OWNER_GROUPS`, `..._EXCLUDE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerGroups {
    /// Every group except these.
    Except(Vec<String>),
    /// Only these groups.
    Only(Vec<String>),
}

/// Splits a comma list as istio-iptables does: no trimming, empty items dropped.
pub fn split(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|i| !i.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Where the resolution reads the world (the environment, files, the
/// interfaces), so that tests can give it their own. It hands over raw
/// bytes: what to make of bytes that are not UTF-8 is decided once, here
/// and in the parsers, not by each host.
pub trait Host {
    /// An environment variable's raw value, `None` when unset.
    fn env_os(&self, name: &str) -> Option<OsString>;
    /// A file's raw contents (resolv.conf, /etc/passwd, /etc/group: text
    /// files that may still hold a stray byte that is not UTF-8).
    fn read(&self, path: &std::path::Path) -> std::io::Result<Vec<u8>>;
    /// Addresses of the network namespace's interfaces, in kernel order.
    fn addresses(&self) -> std::io::Result<Vec<IpAddr>>;

    /// An environment variable as text, `None` when unset. A value that is
    /// not UTF-8 is an error naming the variable, never taken as unset: a
    /// variable the user set must not be silently ignored.
    fn env(&self, name: &str) -> Result<Option<String>, ConfigError> {
        self.env_os(name)
            .map(|raw| {
                raw.into_string()
                    .map_err(|raw| ConfigError::not_utf8(name, &raw))
            })
            .transpose()
    }
}

/// The real environment, files and interfaces of this process.
pub struct RealHost;

impl Host for RealHost {
    fn env_os(&self, name: &str) -> Option<OsString> {
        std::env::var_os(name)
    }

    fn read(&self, path: &std::path::Path) -> std::io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn addresses(&self) -> std::io::Result<Vec<IpAddr>> {
        interface_addresses()
    }
}

impl IstioArgs {
    /// Resolves and checks the flags; `host` supplies the environment,
    /// resolv.conf, /etc/passwd and the interface addresses.
    pub fn resolve(&self, host: &dyn Host) -> Result<IstioConfig, ConfigError> {
        let redirect_dns = setting(
            host,
            self.redirect_dns,
            &["REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE"],
        )?;
        let drop_invalid = setting(host, self.drop_invalid, &["DROP_INVALID", "INVALID_DROP"])?;
        let dual_stack = setting(host, self.dual_stack, &["DUAL_STACK", "ISTIO_DUAL_STACK"])?;
        let capture_all_dns = setting(host, self.capture_all_dns, &["CAPTURE_ALL_DNS"])?;

        let owner_include = host
            .env("ISTIO_OUTBOUND_OWNER_GROUPS")?
            .unwrap_or_else(|| "*".into());
        let owner_exclude = host
            .env("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE")?
            .unwrap_or_default();
        let loopback_v4 = host
            .env("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR")?
            .unwrap_or_else(|| "127.0.0.1/32".into());

        let proxy_uid = if self.proxy_uid.is_empty() {
            let user = host
                .env("ENVOY_USER")?
                .unwrap_or_else(|| "istio-proxy".into());
            lookup_id(host, "/etc/passwd", &user).unwrap_or_else(|| "1337".into())
        } else {
            self.proxy_uid.clone()
        };
        let proxy_gid = if self.proxy_gid.is_empty() {
            proxy_uid.clone()
        } else {
            self.proxy_gid.clone()
        };

        let ipv6 = match self.ipv6 {
            Ipv6Mode::True => true,
            Ipv6Mode::False => false,
            Ipv6Mode::Auto => {
                let addrs = host.addresses().map_err(|e| {
                    ConfigError::refused(format!("listing the pod's addresses: {e}"))
                })?;
                ipv6_from_addresses(&addrs, dual_stack)?
            }
        };

        let (dns_v4, dns_v6) = if redirect_dns && !capture_all_dns {
            let text = host.read(&self.resolv_conf).map_err(|e| {
                ConfigError::refused(format!(
                    "failed to load {}: {e} (pass --resolv-conf PATH)",
                    self.resolv_conf.display()
                ))
            })?;
            nameservers(&text)
        } else {
            (Vec::new(), Vec::new())
        };
        let redirect_dns =
            redirect_dns && (capture_all_dns || !dns_v4.is_empty() || !dns_v6.is_empty());

        // Checks, in istio-iptables' order, then redirect's own.
        let owner_groups = if owner_include == "*" {
            OwnerGroups::Except(split(&owner_exclude))
        } else {
            let only = split(&owner_include);
            if only.len() > 64 {
                return error(format!(
                    "ISTIO_OUTBOUND_OWNER_GROUPS lists {} groups; at most 64 are allowed",
                    only.len()
                ));
            }
            OwnerGroups::Only(only)
        };
        check_loopback(&loopback_v4)?;
        if self.service_exclude_cidr == "*" {
            return error(
                "-x/--istio-service-exclude-cidr cannot be '*' (it would exclude every destination): list CIDRs, or leave it empty",
            );
        }
        let exclude = cidrs(
            "-x/--istio-service-exclude-cidr",
            &self.service_exclude_cidr,
        )?;
        let include = cidrs("-i/--istio-service-cidr", &self.service_cidr)?;
        let tproxy = match self.interception_mode.as_str() {
            "" | "REDIRECT" => false,
            "TPROXY" => true,
            other => {
                return error(format!(
                    "-m/--istio-inbound-interception-mode '{other}' is not a mode: use REDIRECT or TPROXY"
                ));
            }
        };
        for (flag, value) in [
            ("-p/--envoy-port", &self.envoy_port),
            ("-z/--inbound-capture-port", &self.inbound_capture_port),
            ("-e/--inbound-tunnel-port", &self.inbound_tunnel_port),
        ] {
            check_port(flag, value)?;
        }
        for (flag, value) in [
            ("-b/--istio-inbound-ports", &self.inbound_ports),
            ("-d/--istio-local-exclude-ports", &self.local_exclude_ports),
            ("-q/--istio-outbound-ports", &self.outbound_ports),
            (
                "-o/--istio-local-outbound-ports-exclude",
                &self.local_outbound_ports_exclude,
            ),
        ] {
            if flag.starts_with("-b") && value == "*" {
                continue;
            }
            for port in split(value) {
                check_port(flag, &port)?;
            }
        }
        for (flag, value) in [
            ("-t/--istio-inbound-tproxy-mark", &self.tproxy_mark),
            (
                "-r/--istio-inbound-tproxy-route-table",
                &self.tproxy_route_table,
            ),
        ] {
            if value.parse::<u32>().is_err() {
                return error(format!("{flag} '{value}' is not a number"));
            }
        }
        let proxy_uids = split(&proxy_uid);
        let proxy_gids = split(&proxy_gid);

        Ok(IstioConfig {
            envoy_port: self.envoy_port.clone(),
            inbound_capture_port: self.inbound_capture_port.clone(),
            inbound_tunnel_port: self.inbound_tunnel_port.clone(),
            proxy_uids,
            proxy_gids,
            tproxy,
            tproxy_mark: self.tproxy_mark.clone(),
            tproxy_route_table: self.tproxy_route_table.clone(),
            inbound_ports: self.inbound_ports.clone(),
            local_exclude_ports: split(&self.local_exclude_ports),
            include,
            exclude,
            outbound_ports: self.outbound_ports.clone(),
            local_outbound_ports_exclude: self.local_outbound_ports_exclude.clone(),
            exclude_interfaces: split(&self.exclude_interfaces),
            kube_virt_interfaces: split(&self.kube_virt_interfaces),
            redirect_dns,
            capture_all_dns,
            drop_invalid,
            ipv6,
            dns_v4,
            dns_v6,
            owner_groups,
            loopback_v4,
        })
    }
}

impl IstioConfig {
    /// Checks what only matters when the rules are applied: iptables
    /// resolves owner names then, and an unknown one would fail the restore
    /// halfway (istio-iptables' `--dry-run` prints them unchecked).
    pub fn check_owners(&self, host: &dyn Host) -> Result<(), ConfigError> {
        for uid in &self.proxy_uids {
            check_owner(host, "-u/--proxy-uid", "/etc/passwd", uid)?;
        }
        for gid in &self.proxy_gids {
            check_owner(host, "-g/--proxy-gid", "/etc/group", gid)?;
        }
        let (OwnerGroups::Except(groups) | OwnerGroups::Only(groups)) = &self.owner_groups;
        for group in groups {
            check_owner(host, "ISTIO_OUTBOUND_OWNER_GROUPS", "/etc/group", group)?;
        }
        Ok(())
    }
}

/// A boolean flag's value: the command line, else the last of `envs` that
/// holds a valid boolean (istio-iptables' secondary variables override
/// the primary ones; an unparsable value is ignored), else false. A value
/// that is not UTF-8 is not "unparsable" but unreadable: an error (see
/// [`Host::env`]). As clap does for the flags' own variables, the
/// variables of a flag given on the command line are not read at all.
fn setting(host: &dyn Host, flag: Option<bool>, envs: &[&str]) -> Result<bool, ConfigError> {
    if let Some(value) = flag {
        return Ok(value);
    }
    let mut from_env = false;
    for name in envs {
        if let Some(value) = host.env(name)?.as_deref().and_then(parse_bool) {
            from_env = value;
        }
    }
    Ok(from_env)
}

/// What the invocation asks for, besides the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Actions {
    pub dry_run: bool,
    pub cleanup_only: bool,
    pub skip_rule_apply: bool,
    pub reconcile: bool,
    pub run_validation: bool,
    pub native_nftables: bool,
}

impl IstioArgs {
    /// The actions, from flags and their environment variables.
    pub fn actions(&self, host: &dyn Host) -> Result<Actions, ConfigError> {
        Ok(Actions {
            dry_run: setting(host, self.dry_run, &["DRY_RUN"])?,
            cleanup_only: setting(host, self.cleanup_only, &["CLEANUP_ONLY"])?,
            skip_rule_apply: setting(host, self.skip_rule_apply, &["SKIP_RULE_APPLY"])?,
            reconcile: setting(host, self.reconcile, &["RECONCILE"])?,
            run_validation: setting(host, self.run_validation, &["RUN_VALIDATION"])?,
            native_nftables: setting(host, self.native_nftables, &["NATIVE_NFTABLES"])?,
        })
    }
}

/// Go's `strconv.ParseBool`, as istio-iptables' flags use.
pub(crate) fn go_bool(v: &str) -> Result<bool, String> {
    parse_bool(v).ok_or_else(|| format!("'{v}' is not a boolean (true/false, 1/0, t/f)"))
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn check_port(flag: &str, value: &str) -> Result<(), ConfigError> {
    // Checked trimmed: istio-iptables keeps list items verbatim ("4000, 5000"
    // renders `--dport  5000`, which iptables accepts).
    match value.trim().parse::<u32>() {
        Ok(1..=65535) => Ok(()),
        _ => error(format!("{flag}: '{value}' is not a port number (1-65535)")),
    }
}

/// The numeric id of `name` in a passwd/group file, if listed. The file is
/// taken as bytes, field by field: a byte that is not UTF-8 elsewhere (a
/// comment field, another entry) does not hide the entry asked for.
fn lookup_id(host: &dyn Host, file: &str, name: &str) -> Option<String> {
    let text = host.read(std::path::Path::new(file)).ok()?;
    text.split(|&b| b == b'\n').find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut fields = line.split(|&b| b == b':');
        if fields.next()? != name.as_bytes() {
            return None;
        }
        std::str::from_utf8(fields.nth(1)?).ok().map(str::to_owned)
    })
}

/// The numeric id of an owner for `-m owner`: a number, or a name `file`
/// lists (as iptables resolves it when the rule is added).
pub fn resolve_owner(host: &dyn Host, file: &str, owner: &str) -> Option<u32> {
    owner
        .parse::<u32>()
        .ok()
        .or_else(|| lookup_id(host, file, owner)?.parse().ok())
}

/// An owner for `-m owner`: a number, or a name the file lists (iptables
/// resolves names when the rule is added; an unknown one would fail then).
fn check_owner(host: &dyn Host, flag: &str, file: &str, owner: &str) -> Result<(), ConfigError> {
    if resolve_owner(host, file, owner).is_some() {
        return Ok(());
    }
    error(format!(
        "{flag}: '{owner}' is neither a number nor a name in {file}: use a numeric id"
    ))
}

fn check_loopback(cidr: &str) -> Result<(), ConfigError> {
    let bad = |why: &str| {
        error(format!(
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR '{cidr}' {why}: use a network inside 127.0.0.0/8 with a prefix of 8 to 32 bits"
        ))
    };
    let Ok(prefix) = parse_prefix(cidr) else {
        return bad("is not a CIDR");
    };
    match prefix.0 {
        IpAddr::V4(a) if a.is_loopback() => {}
        _ => return bad("is not an IPv4 loopback network"),
    }
    if !(8..=32).contains(&prefix.1) {
        return bad("has a prefix outside 8-32");
    }
    Ok(())
}

/// Parses `addr/bits` strictly (as Go's netip.ParsePrefix): no zone, bits
/// in decimal without leading zeros, within the family's range.
fn parse_prefix(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, bits) = s.rsplit_once('/').ok_or("no '/'")?;
    if addr.contains('%') {
        return Err("a zone is not allowed in a CIDR".into());
    }
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("'{addr}' is not an IP address"))?;
    if bits.is_empty()
        || (bits.len() > 1 && bits.starts_with('0'))
        || !bits.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(format!("bad prefix length '{bits}'"));
    }
    let bits: u8 = bits
        .parse()
        .map_err(|_| format!("bad prefix length '{bits}'"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if bits > max {
        return Err(format!("prefix length {bits} is out of range"));
    }
    Ok((addr, bits))
}

/// Parses a CIDR flag's value (`*`, or a comma list) as istio-iptables does.
pub fn cidrs(flag: &str, value: &str) -> Result<Cidrs, ConfigError> {
    if value == "*" {
        return Ok(Cidrs {
            wildcard: true,
            ..Cidrs::default()
        });
    }
    let mut out = Cidrs::default();
    for item in split(value) {
        let (addr, bits) = parse_prefix(&item).map_err(|why| {
            ConfigError::refused(format!("{flag}: '{item}' is not a CIDR ({why})"))
        })?;
        match addr {
            IpAddr::V4(a) => {
                out.has_loopback |= a.is_loopback();
                out.v4.push(format!("{a}/{bits}"));
            }
            IpAddr::V6(a) => {
                out.has_loopback |= a.is_loopback();
                out.v6.push(format!("{a}/{bits}"));
            }
        }
    }
    Ok(out)
}

/// `nameserver` entries of a resolv.conf, split by family, as written.
/// Like Istio (which reads the file line by line and skips what it cannot
/// parse), a line with bytes that are not UTF-8 costs only that line: each
/// line is decoded on its own, lossily. A replacement character can be
/// neither the keyword nor part of an address, so the lossy decoding never
/// makes up a server; it keeps one whose stray byte is in a trailing field.
fn nameservers(text: &[u8]) -> (Vec<String>, Vec<String>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for line in text.split(|&b| b == b'\n') {
        let line = String::from_utf8_lossy(line);
        let mut fields = line.split_whitespace();
        if fields.next() != Some("nameserver") {
            continue;
        }
        let Some(server) = fields.next() else {
            continue;
        };
        let addr = server.split('%').next().unwrap_or(server);
        match addr.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => v4.push(server.to_owned()),
            Ok(IpAddr::V6(_)) => v6.push(server.to_owned()),
            Err(_) => {}
        }
    }
    (v4, v6)
}

/// istio-iptables' IPv6 detection: the first address that is not
/// loopback or link-local decides; with `dual_stack`, any IPv6 one does.
fn ipv6_from_addresses(addrs: &[IpAddr], dual_stack: bool) -> Result<bool, ConfigError> {
    let usable = addrs.iter().map(|a| match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(*a, IpAddr::V4),
        IpAddr::V4(_) => *a,
    });
    let usable: Vec<IpAddr> = usable
        .filter(|a| match a {
            IpAddr::V4(v4) => {
                !(v4.is_loopback() || v4.is_link_local() || (v4.octets()[..3] == [224, 0, 0]))
            }
            IpAddr::V6(v6) => {
                let seg = v6.segments();
                !(v6.is_loopback() || (seg[0] & 0xffc0) == 0xfe80 || (seg[0] & 0xff0f) == 0xff02)
            }
        })
        .collect();
    let Some(first) = usable.first() else {
        return error(
            "no usable local IP address found: cannot tell whether the pod has IPv6 (pass --ipv6=true|false)",
        );
    };
    Ok(if dual_stack {
        usable.iter().any(IpAddr::is_ipv6)
    } else {
        first.is_ipv6()
    })
}

/// The addresses of this network namespace's interfaces, IPv4 first (the
/// order of the kernel's address dump).
fn interface_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr of the family it names.
            unsafe {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                        v4.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                        v6.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs allocated.
    unsafe { libc::freeifaddrs(head) };
    v4.extend(v6);
    Ok(v4)
}

/// A host with given files and environment, for the tests of every
/// module that resolves an istio-iptables configuration.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;

    /// A host with given files and environment (one list, by path or
    /// name, as raw bytes), and one pod address.
    pub(crate) struct FakeHost(Vec<(&'static str, Vec<u8>)>);

    impl FakeHost {
        pub(crate) fn new(text: &[(&'static str, &'static str)]) -> Self {
            Self(
                text.iter()
                    .map(|(k, v)| (*k, v.as_bytes().to_vec()))
                    .collect(),
            )
        }

        /// Adds a file or variable holding any bytes.
        pub(crate) fn with_bytes(mut self, name: &'static str, value: &[u8]) -> Self {
            self.0.push((name, value.to_vec()));
            self
        }

        fn get(&self, name: &str) -> Option<&[u8]> {
            self.0
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_slice())
        }
    }

    impl Host for FakeHost {
        fn env_os(&self, name: &str) -> Option<OsString> {
            use std::os::unix::ffi::OsStrExt as _;
            self.get(name)
                .map(|v| std::ffi::OsStr::from_bytes(v).to_owned())
        }
        fn read(&self, path: &std::path::Path) -> std::io::Result<Vec<u8>> {
            self.get(&path.to_string_lossy())
                .map(<[u8]>::to_vec)
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        }
        fn addresses(&self) -> std::io::Result<Vec<IpAddr>> {
            Ok(vec!["10.0.0.5".parse().unwrap()])
        }
    }

    /// Everything a command line feeds short of applying it: the actions,
    /// the resolution, the owner checks, the eBPF translation and the
    /// rendered rules. The properties check that none of it panics, and
    /// that a refusal is one line.
    pub(crate) fn exercise(args: &IstioArgs, host: &dyn Host) -> Result<(), ConfigError> {
        use crate::iptables::builder::Family;
        args.actions(host)?;
        let cfg = args.resolve(host)?;
        if let Err(err) = cfg.check_owners(host) {
            assert_eq!(err.to_string().lines().count(), 1, "{err}");
        }
        // `from_istio` checks the map limits `to_bpf` relies on.
        if let Ok(ebpf) = crate::config::Config::from_istio(&cfg, host) {
            let _ = ebpf.to_bpf();
        }
        let rules = crate::iptables::capture::rules(&cfg);
        for family in [Family::V4, Family::V6] {
            let _ = rules.render(family);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{fake::FakeHost, *};

    #[test]
    fn lists_are_split_like_istio() {
        assert_eq!(split("6000,7000,"), ["6000", "7000"]);
        assert_eq!(split(""), Vec::<String>::new());
        assert_eq!(split(","), Vec::<String>::new());
        assert_eq!(split("4000, 5000"), ["4000", " 5000"]);
    }

    #[test]
    fn cidrs_print_canonical_without_masking() {
        let c = cidrs("-i", "10.1.2.3/8,2001:DB8:0:0::/32").unwrap();
        assert_eq!(c.v4, ["10.1.2.3/8"]);
        assert_eq!(c.v6, ["2001:db8::/32"]);
        assert!(cidrs("-i", "10.0.0.0/08").is_err());
        assert!(cidrs("-i", "10.0.0.0").is_err());
        assert!(cidrs("-i", "10.0.0.0/33").is_err());
        assert!(cidrs("-i", "::1/128").unwrap().has_loopback);
    }

    #[test]
    fn nameservers_are_kept_as_written() {
        let (v4, v6) = nameservers(
            b"# x\nnameserver 127.0.0.53\nnameserver ::127.0.0.53\nnameserver bogus\nsearch a\n",
        );
        assert_eq!(v4, ["127.0.0.53"]);
        assert_eq!(v6, ["::127.0.0.53"]);
    }

    #[test]
    fn ipv6_follows_the_first_usable_address() {
        let v4: IpAddr = "10.0.0.5".parse().unwrap();
        let v6: IpAddr = "2001:db8::5".parse().unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let ll: IpAddr = "fe80::1".parse().unwrap();
        assert!(!ipv6_from_addresses(&[lo, v4, v6], false).unwrap());
        assert!(ipv6_from_addresses(&[lo, v4, v6], true).unwrap());
        assert!(ipv6_from_addresses(&[lo, ll, v6], false).unwrap());
        assert!(ipv6_from_addresses(&[lo, ll], false).is_err());
    }

    pub(super) fn args(argv: &[&str]) -> IstioArgs {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: IstioArgs,
        }
        let mut all = vec!["istio-iptables"];
        all.extend_from_slice(argv);
        Cli::try_parse_from(all).unwrap().args
    }

    #[test]
    fn owner_names_are_checked_when_applying() {
        let host = FakeHost::new(&[
            ("/etc/passwd", "istio-proxy:x:1337:1337::/:/bin/false\n"),
            ("/etc/group", "java:x:202:\nistio-proxy:x:1337:\n"),
            ("ISTIO_OUTBOUND_OWNER_GROUPS", "java,202"),
        ]);
        let cfg = args(&["-u", "istio-proxy"]).resolve(&host).unwrap();
        assert!(cfg.check_owners(&host).is_ok());
        let cfg = args(&["-g", "nosuchgroup"]).resolve(&host).unwrap();
        let err = cfg.check_owners(&host).unwrap_err().to_string();
        assert!(
            err.contains("'nosuchgroup' is neither a number nor a name in /etc/group"),
            "{err}"
        );
    }

    #[test]
    fn defaults_resolve_like_istio() {
        let host = FakeHost::new(&[("/etc/passwd", "istio-proxy:x:1337:1337::/:/bin/false\n")]);
        let cfg = args(&[]).resolve(&host).unwrap();
        assert_eq!(cfg.proxy_uids, ["1337"]);
        assert_eq!(cfg.proxy_gids, ["1337"], "the gid defaults to the uid");
        assert!(!cfg.ipv6, "an IPv4 pod");
        assert_eq!(cfg.owner_groups, OwnerGroups::Except(vec![]));
        // No istio-proxy user: 1337.
        let cfg = args(&[]).resolve(&FakeHost::new(&[])).unwrap();
        assert_eq!(cfg.proxy_uids, ["1337"]);
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_named() {
        let host = FakeHost::new(&[]);
        for (argv, needle) in [
            (
                &["-x", "*"][..],
                "-x/--istio-service-exclude-cidr cannot be '*'",
            ),
            (
                &["-i", "10.0.0.0/33"],
                "-i/--istio-service-cidr: '10.0.0.0/33' is not a CIDR",
            ),
            (&["-q", "70000"], "'70000' is not a port number"),
            (&["-m", "NAT"], "'NAT' is not a mode"),
            (
                &["-p", "http"],
                "-p/--envoy-port: 'http' is not a port number",
            ),
        ] {
            let err = args(argv).resolve(&host).unwrap_err().to_string();
            assert!(err.contains(needle), "{argv:?}: {err}");
        }
        // DNS capture without servers and without --capture-all-dns is off.
        let host = FakeHost::new(&[("/etc/resolv.conf", "search x\n")]);
        assert!(
            !args(&["--redirect-dns"])
                .resolve(&host)
                .unwrap()
                .redirect_dns
        );
    }

    #[test]
    fn a_resolv_conf_line_that_is_not_utf8_costs_only_that_line() {
        let (v4, v6) = nameservers(
            b"nameserver 10.0.0.\xff\n# caf\xe9\nnameserver 10.0.0.10\n\
              nameserver 10.0.0.11 # \xff\nnameserver\xa0 10.0.0.12\n\
              nameserver fd00::\xfe\r\nnameserver fd00::10\r\n",
        );
        assert_eq!(v4, ["10.0.0.10", "10.0.0.11"]);
        assert_eq!(v6, ["fd00::10"]);
        let host = FakeHost::new(&[]).with_bytes(
            "/etc/resolv.conf",
            b"search \xff\xfe\nnameserver 10.96.0.10\n",
        );
        let cfg = args(&["--redirect-dns", "--ipv6=false"])
            .resolve(&host)
            .unwrap();
        assert!(cfg.redirect_dns);
        assert_eq!(cfg.dns_v4, ["10.96.0.10"]);
    }

    #[test]
    fn passwd_entries_are_found_past_bytes_that_are_not_utf8() {
        let host = FakeHost::new(&[]).with_bytes(
            "/etc/passwd",
            b"r\xe9my:x:1000:1000::/:/bin/sh\r\nistio-proxy:x:1337:1337:Istio \xff:/:/bin/false\n",
        );
        assert_eq!(
            resolve_owner(&host, "/etc/passwd", "istio-proxy"),
            Some(1337)
        );
        assert_eq!(resolve_owner(&host, "/etc/passwd", "rémy"), None);
    }

    #[test]
    fn an_environment_variable_that_is_not_utf8_is_a_usage_error_naming_it() {
        for name in [
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
            "ISTIO_OUTBOUND_OWNER_GROUPS",
            "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
            "ENVOY_USER",
            "DROP_INVALID",
            "ISTIO_DUAL_STACK",
        ] {
            let host = FakeHost::new(&[]).with_bytes(name, b"127.0.0.1/8\xff");
            let err = args(&["--ipv6=false"]).resolve(&host).unwrap_err();
            assert_eq!(err.exit_code, 255, "{name}");
            assert_eq!(
                err.to_string(),
                format!(
                    "environment variable {name} is not valid UTF-8 ('127.0.0.1/8\\xff'): set it to text, or unset it"
                )
            );
        }
        let host = FakeHost::new(&[]).with_bytes("DRY_RUN", b"\xff");
        assert_eq!(args(&[]).actions(&host).unwrap_err().exit_code, 255);
        // A flag given on the command line: its variables are not read.
        assert!(!args(&["--dry-run=false"]).actions(&host).unwrap().dry_run);
        // Text that is not a boolean is ignored, as istio-iptables does.
        let host = FakeHost::new(&[("DRY_RUN", "yes")]);
        assert!(!args(&[]).actions(&host).unwrap().dry_run);
    }

    #[test]
    fn loopback_cidr_is_checked() {
        assert!(check_loopback("127.0.0.1/32").is_ok());
        assert!(check_loopback("127.0.0.1/8").is_ok());
        assert!(check_loopback("10.0.0.1/32").is_err());
        assert!(check_loopback("127.0.0.1/7").is_err());
        assert!(check_loopback("127.0.0.1").is_err());
    }
}

/// Properties: no input read while resolving (variables, resolv.conf,
/// passwd and group files, flag values) panics the parsers.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::{fake::FakeHost, *};

    /// Every variable the resolution reads itself (the flags' own are
    /// clap's, see `cli::properties`).
    const VARIABLES: &[&str] = &[
        "REDIRECT_DNS",
        "ISTIO_META_DNS_CAPTURE",
        "DROP_INVALID",
        "INVALID_DROP",
        "DUAL_STACK",
        "ISTIO_DUAL_STACK",
        "CAPTURE_ALL_DNS",
        "ISTIO_OUTBOUND_OWNER_GROUPS",
        "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
        "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
        "ENVOY_USER",
        "DRY_RUN",
        "CLEANUP_ONLY",
        "SKIP_RULE_APPLY",
        "RECONCILE",
        "RUN_VALIDATION",
        "NATIVE_NFTABLES",
        "/etc/resolv.conf",
        "/etc/passwd",
        "/etc/group",
    ];

    /// Bytes shaped like the values and files read: mostly text of the
    /// right alphabet, sometimes anything.
    fn value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            3 => "[0-9a-fA-F.:/,*%# a-z_-]{0,24}".prop_map(String::into_bytes),
            1 => Just(b"true".to_vec()),
            1 => Just(b"istio-proxy:x:1337:1337::/:/bin/false\n".to_vec()),
            1 => Just(b"nameserver 10.0.0.10\nnameserver fd00::10%eth0\n".to_vec()),
            2 => proptest::collection::vec(any::<u8>(), 0..48),
        ]
    }

    /// A resolv.conf line: a valid `nameserver` one (with its server), or
    /// bytes that may be anything but a line break.
    fn resolv_line() -> impl Strategy<Value = (Vec<u8>, Option<String>)> {
        prop_oneof![
            any::<IpAddr>().prop_map(|ip| (
                format!("nameserver {ip}").into_bytes(),
                Some(ip.to_string())
            )),
            proptest::collection::vec(any::<u8>().prop_filter("one line", |b| *b != b'\n'), 0..40)
                .prop_map(|line| (line, None)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn resolv_conf_keeps_every_valid_server_whatever_surrounds_it(
            lines in proptest::collection::vec(resolv_line(), 0..12),
        ) {
            let text = lines.iter().map(|(l, _)| l.clone()).collect::<Vec<_>>().join(&b'\n');
            let (v4, v6) = nameservers(&text);
            // A random line can be a server line too: the valid ones are a
            // subsequence of what is found, in order.
            let found: Vec<&String> = v4.iter().chain(&v6).collect();
            for server in lines.iter().filter_map(|(_, s)| s.as_ref()) {
                prop_assert!(
                    found.contains(&server),
                    "{server} lost from {:?}",
                    String::from_utf8_lossy(&text)
                );
            }
            for server in found {
                let addr = server.split('%').next().unwrap_or(server);
                prop_assert!(addr.parse::<IpAddr>().is_ok(), "{server} is no address");
            }
        }

        #[test]
        fn resolv_conf_of_any_bytes_parses(text in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = nameservers(&text);
        }

        #[test]
        fn passwd_lookup_of_any_bytes_parses(
            file in proptest::collection::vec(any::<u8>(), 0..256),
            name in "[a-z0-9:-]{0,8}",
        ) {
            let host = FakeHost::new(&[]).with_bytes("/etc/passwd", &file);
            let _ = resolve_owner(&host, "/etc/passwd", &name);
        }

        #[test]
        fn cidr_lists_parse_or_refuse_in_one_line(value in "[0-9a-fA-F.:/,%* ]{0,40}|\\PC{0,20}") {
            match cidrs("-i", &value) {
                Ok(parsed) => {
                    // What is printed into rules parses again.
                    for cidr in parsed.v4.iter().chain(&parsed.v6) {
                        prop_assert!(parse_prefix(cidr).is_ok(), "{cidr} from {value:?}");
                    }
                }
                Err(err) => prop_assert_eq!(err.to_string().lines().count(), 1),
            }
            let _ = check_loopback(&value);
            let _ = split(&value);
            let _ = go_bool(&value);
        }

        #[test]
        fn any_environment_and_files_resolve_or_refuse_in_one_line(
            set in proptest::collection::vec((proptest::sample::select(VARIABLES), value()), 0..8),
            dns in any::<bool>(),
        ) {
            let host = set
                .iter()
                .fold(FakeHost::new(&[]), |host, (name, value)| host.with_bytes(name, value));
            let argv: &[&str] = if dns {
                &["--redirect-dns", "--ipv6=auto"]
            } else {
                &["--ipv6=auto"]
            };
            if let Err(err) = fake::exercise(&tests::args(argv), &host) {
                prop_assert_eq!(err.to_string().lines().count(), 1, "{}", err);
                prop_assert!(matches!(err.exit_code, 1 | 255));
            }
        }
    }
}
