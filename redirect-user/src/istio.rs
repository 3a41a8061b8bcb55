//! istio-iptables' command line: the same flags, defaults, environment
//! variables and "empty means off" rules, resolved into the one
//! [`Capture`] through the typed parsers of [`crate::capture::parse`].
//!
//! Values keep the text the user gave (istio-iptables pastes them into
//! rules verbatim; the golden files depend on it), but every one is
//! checked first: where istio-iptables would let `iptables-restore` fail
//! halfway, redirect refuses before changing anything.

use std::{net::IpAddr, path::PathBuf};

use clap::{Args, ValueEnum};

use crate::{
    capture::{
        Capture, Dns, OwnerGroups, Profile,
        parse::{self, go_bool, parse_bool, split},
    },
    host::{ConfigError, Host, lookup_id, resolve_owner},
};

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
    /// Validate the capture as Istio's validator does (a probe to 127.0.0.6 must reach the proxy's ports with its destination); exit 126 when it does not [env RUN_VALIDATION]
    #[arg(long = "run-validation", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub run_validation: Option<bool>,
    /// Accepted for compatibility (redirect applies whenever the rules differ) [env FORCE_APPLY]
    #[arg(long = "force-apply", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub force_apply: Option<bool>,
    /// Accepted for compatibility (no effect) [env CNI_MODE]
    #[arg(long = "cni-mode", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub cni_mode: Option<bool>,
    /// Istio's native nftables mode: its inet tables applied with `nft -f -` instead of iptables rules (--dry-run prints the transaction) [env NATIVE_NFTABLES]
    #[arg(long = "native-nftables", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub native_nftables: Option<bool>,
    /// The validation probe's destination port (--run-validation)
    #[arg(long = "iptables-probe-port", value_name = "PORT", default_value = "15002", value_parser = |s: &str| parse::port_number(s))]
    pub iptables_probe_port: u16,
    /// How long the validation may take (--run-validation), e.g. 5s
    #[arg(long = "probe-timeout", value_name = "DURATION", default_value = "5s", value_parser = crate::validate::parse_duration)]
    pub probe_timeout: std::time::Duration,
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
    /// (--native-nftables: Istio's nftables rules instead of iptables; auto
    /// also uses them, saying so, on a node with nft and no iptables)
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: Mode,
    /// The pod's cgroup, for eBPF mode (self-parent: the parent of this
    /// process's cgroup, the pod's when run from an init container)
    #[arg(long, value_name = "PATH|self-parent", default_value = "self-parent")]
    pub cgroup: String,
    /// eBPF mode's instance name [default: derived from the cgroup]
    #[arg(long, value_name = "NAME", value_parser = crate::instance::parse_arg)]
    pub instance: Option<crate::instance::InstanceName>,
    /// eBPF mode: add the pod (its network namespace) to this loaded node
    /// set (`redirect node-set load`) as --instance, instead of loading
    /// programs for it; no cgroup is used (kernel 5.15)
    #[arg(long, value_name = "SET", value_parser = crate::instance::parse_arg, requires = "instance")]
    pub node_set: Option<crate::instance::InstanceName>,
    /// eBPF mode: how many redirected connections can be in their
    /// handshake at once, from the app's SYN until the proxy's end is
    /// established (sizes the original-destination tuple map: about
    /// 100 bytes each; open connections keep their records in socket
    /// storage, without limit)
    #[arg(long, env = "REDIRECT_MAX_CONNECTIONS", value_name = "N", default_value = "4096", value_parser = parse::max_connections)]
    pub max_connections: u32,
    /// Apply in this network namespace (/proc/PID/ns/net or /run/netns/NAME)
    #[arg(
        long = "netns",
        alias = "network-namespace",
        env = "NETWORK_NAMESPACE",
        value_name = "PATH"
    )]
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

fn error<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::refused(msg))
}

impl IstioArgs {
    /// Resolves and checks the flags; `host` supplies the environment,
    /// resolv.conf, /etc/passwd and the interface addresses (those of the
    /// network namespace this thread is in: the pod's).
    pub fn resolve(&self, host: &dyn Host) -> Result<Capture, ConfigError> {
        let refused = |why: String| ConfigError::refused(why);
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

        let addresses = host
            .addresses()
            .map_err(|e| refused(format!("listing the pod's addresses: {e}")))?;
        let ipv6 = match self.ipv6 {
            Ipv6Mode::True => true,
            Ipv6Mode::False => false,
            Ipv6Mode::Auto => ipv6_from_addresses(&addresses, dual_stack)?,
        };

        let (dns_v4, dns_v6) = if redirect_dns && !capture_all_dns {
            let text = host.read(&self.resolv_conf).map_err(|e| {
                refused(format!(
                    "failed to load {}: {e} (pass --resolv-conf PATH)",
                    self.resolv_conf.display()
                ))
            })?;
            nameservers(&text)
        } else {
            (Vec::new(), Vec::new())
        };
        let dns = (redirect_dns && (capture_all_dns || !dns_v4.is_empty() || !dns_v6.is_empty()))
            .then_some(Dns {
                capture_all: capture_all_dns,
                v4: dns_v4,
                v6: dns_v6,
            });

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
        let loopback = parse::loopback(&loopback_v4).map_err(refused)?;
        let exclude = parse::exclude_cidrs(&self.service_exclude_cidr).map_err(refused)?;
        let include =
            parse::cidrs("-i/--istio-service-cidr", &self.service_cidr).map_err(refused)?;
        let tproxy = parse::interception_mode(&self.interception_mode).map_err(refused)?;
        let proxy_port = parse::port("-p/--envoy-port", &self.envoy_port).map_err(refused)?;
        let inbound_port = parse::port("-z/--inbound-capture-port", &self.inbound_capture_port)
            .map_err(refused)?;
        let tunnel_port =
            parse::port("-e/--inbound-tunnel-port", &self.inbound_tunnel_port).map_err(refused)?;
        let inbound = parse::inbound_ports(&self.inbound_ports).map_err(refused)?;
        let inbound_exclude =
            parse::port_list("-d/--istio-local-exclude-ports", &self.local_exclude_ports)
                .map_err(refused)?;
        let outbound_ports =
            parse::port_list("-q/--istio-outbound-ports", &self.outbound_ports).map_err(refused)?;
        let outbound_exclude = parse::port_list(
            "-o/--istio-local-outbound-ports-exclude",
            &self.local_outbound_ports_exclude,
        )
        .map_err(refused)?;
        let tproxy_mark =
            parse::number("-t/--istio-inbound-tproxy-mark", &self.tproxy_mark).map_err(refused)?;
        let tproxy_route_table = parse::number(
            "-r/--istio-inbound-tproxy-route-table",
            &self.tproxy_route_table,
        )
        .map_err(refused)?;

        Ok(Capture {
            profile: Profile::Istio,
            proxy_port,
            inbound_port,
            tunnel_port,
            proxy_uids: split(&proxy_uid),
            proxy_gids: split(&proxy_gid),
            tproxy,
            tproxy_mark,
            tproxy_route_table,
            inbound,
            inbound_exclude,
            include,
            exclude,
            outbound_ports,
            outbound_exclude,
            exclude_interfaces: split(&self.exclude_interfaces),
            kube_virt_interfaces: split(&self.kube_virt_interfaces),
            dns,
            drop_invalid,
            ipv6,
            owner_groups,
            loopback,
            pod_addresses: crate::host::pod_ipv4(&addresses),
            max_connections: self.max_connections,
            log_level: 0,
        })
    }
}

/// Checks what only matters when the rules are applied: iptables resolves
/// owner names then, and an unknown one would fail the restore halfway
/// (istio-iptables' `--dry-run` prints them unchecked).
pub fn check_owners(capture: &Capture, host: &dyn Host) -> Result<(), ConfigError> {
    for uid in &capture.proxy_uids {
        check_owner(host, "-u/--proxy-uid", "/etc/passwd", uid)?;
    }
    for gid in &capture.proxy_gids {
        check_owner(host, "-g/--proxy-gid", "/etc/group", gid)?;
    }
    for group in capture.owner_groups.groups() {
        check_owner(host, "ISTIO_OUTBOUND_OWNER_GROUPS", "/etc/group", group)?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;

    #[test]
    fn lists_are_split_like_istio() {
        assert_eq!(split("6000,7000,"), ["6000", "7000"]);
        assert_eq!(split(""), Vec::<String>::new());
        assert_eq!(split(","), Vec::<String>::new());
        assert_eq!(split("4000, 5000"), ["4000", " 5000"]);
    }

    #[test]
    fn cidrs_print_canonical_without_masking() {
        let c = args(&["-i", "10.1.2.3/8,2001:DB8:0:0::/32", "--ipv6=false"])
            .resolve(&FakeHost::new(&[]))
            .unwrap()
            .include;
        assert_eq!(c.v4[0].to_string(), "10.1.2.3/8");
        assert_eq!(c.v6[0].to_string(), "2001:db8::/32");
        for bad in ["10.0.0.0/08", "10.0.0.0", "10.0.0.0/33"] {
            assert!(args(&["-i", bad]).resolve(&FakeHost::new(&[])).is_err());
        }
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
        assert!(check_owners(&cfg, &host).is_ok());
        let cfg = args(&["-g", "nosuchgroup"]).resolve(&host).unwrap();
        let err = check_owners(&cfg, &host).unwrap_err().to_string();
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
            args(&["--redirect-dns"])
                .resolve(&host)
                .unwrap()
                .dns
                .is_none()
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
        assert_eq!(cfg.dns.expect("DNS capture").v4, ["10.96.0.10"]);
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
        assert!(parse::loopback("127.0.0.1/32").is_ok());
        assert!(parse::loopback("127.0.0.1/8").is_ok());
        assert!(parse::loopback("10.0.0.1/32").is_err());
        assert!(parse::loopback("127.0.0.1/7").is_err());
        assert!(parse::loopback("127.0.0.1").is_err());
    }
}

/// Properties: no input read while resolving (variables, resolv.conf,
/// passwd and group files, flag values) panics the parsers.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::host::fake::{FakeHost, exercise};

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
            match parse::cidrs("-i", &value) {
                Ok(parsed) => {
                    // What is printed into rules parses again.
                    for cidr in parsed.v4.iter().chain(&parsed.v6) {
                        prop_assert!(parse::prefix(&cidr.to_string()).is_ok(), "{cidr} from {value:?}");
                    }
                }
                Err(err) => prop_assert_eq!(err.to_string().lines().count(), 1),
            }
            let _ = parse::loopback(&value);
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
            if let Err(err) = exercise(&tests::args(argv), &host) {
                prop_assert_eq!(err.to_string().lines().count(), 1, "{}", err);
                prop_assert!(matches!(err.exit_code, 1 | 255));
            }
        }
    }
}
