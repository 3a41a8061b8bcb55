//! `redirect status`: what is installed, where, with which config, and what
//! it decided, laid out like `iptables -t nat -v -L` (counters first, then
//! the rule each one mirrors). Exits 1 when an instance is not whole.

use std::{fmt::Write as _, os::fd::AsFd as _, path::Path, process::ExitCode};

use anyhow::{Result, bail};
use redirect_common::{Counter, DNS_PROXY_PORT, InstanceMeta, PORT_IN_EXCLUDE, PORT_IN_INCLUDE};
use serde::Serialize;

use crate::{
    bpffs,
    cli::StatusArgs,
    ebpf::{Hook, Kind, SK_LOOKUP, VIRT_HOOKS, all_hooks, config::Config, features, maps, sys},
    instance::InstanceName,
    iptables::legacy,
};

#[derive(Serialize)]
pub struct Status {
    pub instances: Vec<Instance>,
    /// Instances that are not whole: pins missing or unreadable, or left
    /// half-built or half-removed by a run that was killed.
    pub incomplete: Vec<Incomplete>,
}

impl Status {
    /// Whether every instance is whole (`redirect status` exits 1 if not).
    pub fn healthy(&self) -> bool {
        self.incomplete.is_empty()
    }
}

#[derive(Serialize)]
pub struct Incomplete {
    /// The instance's name, or the staging directory's.
    pub instance: String,
    pub problem: String,
    /// What removes it.
    pub fix: String,
}

#[derive(Serialize)]
pub struct Instance {
    pub instance: String,
    pub cgroup: String,
    pub cgroup_id: u64,
    /// Redirected connections between the app's SYN and the proxy's end of
    /// the handshake that keep their original destination
    /// (`--max-connections`).
    pub max_connections: u32,
    pub programs: Vec<Program>,
    pub config: Option<ConfigView>,
    pub counters: Vec<CounterView>,
    /// Original-destination records in the tuple map.
    pub tracked: Tracked,
    /// Inbound connections captured, per destination port.
    pub inbound_captured: Vec<PortCount>,
    /// The maps the programs use, with their kernel memory.
    pub maps: Vec<maps::MapMemory>,
    /// Their total: what this instance costs the node.
    pub map_memory_bytes: u64,
}

#[derive(Serialize)]
pub struct PortCount {
    pub port: u16,
    pub connections: u64,
}

#[derive(Serialize)]
pub struct Program {
    pub hook: &'static str,
    /// `None` when the link pin is missing or unreadable.
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
    /// The link is attached to the instance's cgroup (sk_lookup: to the
    /// network namespace it was installed in).
    pub attached: bool,
    /// The running kernel has this hook (when not, it is skipped).
    pub available: bool,
    /// Capture works without it (getpeername, and sk_lookup without -b).
    pub optional: bool,
    /// First kernel with the hook, "major.minor".
    pub min_kernel: String,
    pub mirrors: &'static str,
    /// The interface a `-k` hook's link is for (its index in the pod's
    /// network namespace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<u32>,
}

#[derive(Serialize)]
pub struct ConfigView {
    /// `istio` or `legacy` (`--profile`).
    pub profile: &'static str,
    pub proxy_port: u16,
    pub proxy_uids: Vec<u32>,
    pub proxy_gids: Vec<u32>,
    pub loopback_cidr: String,
    pub inbound_port: u16,
    pub tunnel_port: u16,
    /// Inbound capture, `None` when off (`-b ''`).
    pub inbound: Option<InboundView>,
    /// DNS capture, `None` without `--redirect-dns`: `*` (every
    /// destination) or the nameservers.
    pub dns: Option<String>,
    /// `-k`: the KubeVirt interfaces' indexes in the pod's network namespace.
    pub kube_virt_interfaces: Vec<u32>,
}

#[derive(Serialize)]
pub struct InboundView {
    /// `*` or the captured ports (`-b`).
    pub ports: String,
    /// Ports never captured (`-d`).
    pub exclude: String,
    /// `REDIRECT` or `TPROXY` (`-m`).
    pub mode: &'static str,
}

#[derive(Serialize)]
pub struct CounterView {
    pub name: &'static str,
    pub value: u64,
    pub mirrors: String,
}

#[derive(Serialize, Default)]
pub struct Tracked {
    /// Redirected connections whose SYN has left and whose proxy end is not
    /// established yet (or failed, or is outside the cgroup and never takes
    /// its record: those stay until the LRU map reuses their room): the
    /// records in the tuple map. Every other record is in a socket's
    /// storage, which user space cannot count.
    pub handshakes: u64,
}

pub fn status(args: &StatusArgs) -> Result<ExitCode> {
    let status = collect(args.instance.as_ref())?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        out!("{}", render(&status));
    }
    // Like a failed check: something is installed but not whole.
    Ok(if status.healthy() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Collects the status of every instance (or only `only`), with the
/// install lock held shared: no install or uninstall runs meanwhile, so a
/// staging directory seen now was left by a killed run.
pub fn collect(only: Option<&InstanceName>) -> Result<Status> {
    crate::ebpf::privilege::check_ebpf()?;
    let mut instances = Vec::new();
    let mut incomplete = Vec::new();
    if !bpffs::is_mounted() {
        return Ok(Status {
            instances,
            incomplete,
        });
    }
    let _lock = bpffs::Lock::shared()?;
    let listing = bpffs::list()?;
    for name in listing.instances {
        if only.is_some_and(|o| *o != name) {
            continue;
        }
        let whole = instance(&name).and_then(|found| {
            let inbound = found.config.as_ref().is_some_and(|c| c.inbound.is_some());
            let virt: Vec<u32> = found
                .config
                .as_ref()
                .map(|c| c.kube_virt_interfaces.clone())
                .unwrap_or_default();
            let missing: Vec<&str> = found
                .programs
                .iter()
                .filter(|p| p.available && p.link_id.is_none())
                .filter(|p| {
                    !p.optional
                        || (inbound && p.hook == SK_LOOKUP.name)
                        || p.interface.is_some_and(|i| virt.contains(&i))
                })
                .map(|p| p.hook)
                .collect();
            if found.config.is_none() {
                bail!("no configuration is in force");
            }
            if !missing.is_empty() {
                bail!("the link pins of {} are missing", missing.join(", "));
            }
            Ok(found)
        });
        match whole {
            Ok(found) => instances.push(found),
            Err(err) => incomplete.push(Incomplete {
                fix: format!(
                    "reinstall it, or remove it with `redirect uninstall --instance {name}`"
                ),
                instance: name.to_string(),
                problem: format!("{err:#}"),
            }),
        }
    }
    if only.is_none() {
        for name in listing.staging {
            incomplete.push(Incomplete {
                instance: name,
                problem:
                    "left half-built or half-removed by an install or uninstall that was killed"
                        .to_owned(),
                fix: "the next install, uninstall or `redirect gc` removes it".to_owned(),
            });
        }
    }
    Ok(Status {
        instances,
        incomplete,
    })
}

fn instance(name: &InstanceName) -> Result<Instance> {
    let dir = bpffs::instance_dir(name);
    let meta = maps::meta(&dir)?.get(&0, 0)?;
    let (slot, raw) = maps::active_config(&dir)?;
    let config = (raw.abi_version != 0).then(|| Config::from_bpf(&raw));
    let sets = maps::read_sets(&dir, slot)?;
    let counters = maps::counters(&dir)?
        .into_iter()
        .map(|(c, value)| CounterView {
            name: c.name(),
            value,
            mirrors: mirrors(c, config.as_ref(), &sets),
        })
        .collect();
    let handshakes = maps::tracked(&dir)?;
    let port_list = |flag: u8| sets.ports_with(flag);
    let virt: Vec<u32> = config
        .as_ref()
        .map(|c| c.virt_ifaces.iter().map(|v| v.ifindex).collect())
        .unwrap_or_default();
    let programs = programs(&dir, &meta, config.as_ref(), &virt);
    let prog_ids: Vec<u32> = programs.iter().filter_map(|p| p.program_id).collect();
    let maps = maps::memory(&dir, &prog_ids)?;
    Ok(Instance {
        instance: name.to_string(),
        cgroup: crate::ebpf::loader::meta_path(&meta),
        cgroup_id: meta.cgroup_id,
        max_connections: meta.max_connections,
        map_memory_bytes: maps.iter().map(|m| m.bytes).sum(),
        maps,
        programs,
        config: config.map(|c| ConfigView {
            kube_virt_interfaces: virt.clone(),
            inbound: c.inbound.as_ref().map(|i| InboundView {
                ports: if i.all {
                    "*".to_owned()
                } else {
                    port_list(PORT_IN_INCLUDE)
                },
                exclude: port_list(PORT_IN_EXCLUDE),
                // eBPF mode captures inbound as REDIRECT does (it refuses TPROXY).
                mode: "REDIRECT",
            }),
            profile: if c.legacy { "legacy" } else { "istio" },
            proxy_port: c.proxy_port,
            proxy_uids: c.proxy_uids,
            proxy_gids: c.proxy_gids,
            loopback_cidr: c.loopback.to_string(),
            inbound_port: c.inbound_port,
            tunnel_port: c.tunnel_port,
            dns: c.dns.as_ref().map(|d| {
                if d.all {
                    "*".to_owned()
                } else {
                    d.servers
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                }
            }),
        }),
        counters,
        tracked: Tracked { handshakes },
        inbound_captured: maps::inbound_hits(&dir)?
            .into_iter()
            .map(|(port, connections)| PortCount { port, connections })
            .collect(),
    })
}

/// What sk_lookup mirrors under `--profile legacy`: the first table sends
/// every inbound connection to the proxy port.
const LEGACY_INBOUND_MIRRORS: &str =
    "nat PREROUTING -> ISTIO_REDIRECT (istio/install-istio-prerouting)";

/// The instance's hooks: those its configuration needs ([`Hook::needed_by`];
/// sk_lookup when the instance records a namespace) and any with a link
/// pin.
fn programs(
    dir: &Path,
    meta: &InstanceMeta,
    config: Option<&Config>,
    virt: &[u32],
) -> Vec<Program> {
    let legacy = config.is_some_and(|c| c.legacy);
    let mut out: Vec<Program> = all_hooks()
        .filter(|hook| {
            // The hooks the configuration in force needs, and any an
            // earlier install attached; sk_lookup also where the instance
            // records a namespace. Without a configuration: every hook.
            let pinned = dir.join(hook.pin_name()).exists();
            let needed = if hook.kind == Kind::SkLookup {
                meta.netns_ino != 0
            } else {
                config.is_none_or(|c| hook.needed_by(c))
            };
            hook.kind != Kind::SchedCls && (needed || pinned)
        })
        .map(|hook| {
            let target = if hook.kind == Kind::SkLookup {
                u64::from(meta.netns_ino)
            } else {
                meta.cgroup_id
            };
            let mirrors = if legacy && hook.kind == Kind::SkLookup {
                LEGACY_INBOUND_MIRRORS
            } else {
                hook.mirrors
            };
            program(dir, hook, &hook.pin_name(), target, mirrors, None)
        })
        .collect();
    out.extend(virt_programs(dir, virt));
    out
}

/// `hook`'s entry from its link pinned in `dir` as `pin`: attached when
/// the link's target is `target` (a cgroup id, namespace inode or
/// interface index; 0: none).
fn program(
    dir: &Path,
    hook: Hook,
    pin: &str,
    target: u64,
    mirrors: &'static str,
    interface: Option<u32>,
) -> Program {
    let info = sys::obj_get(&dir.join(pin))
        .and_then(|fd| sys::link_info(fd.as_fd()))
        .ok();
    Program {
        hook: hook.name,
        link_id: info.map(|i| i.link_id),
        program_id: info.map(|i| i.prog_id),
        attached: info.is_some_and(|i| i.target == target && target != 0),
        available: features::hook_present(&hook),
        optional: hook.optional,
        min_kernel: hook.first_kernel(),
        mirrors,
        interface,
    }
}

/// The `-k` hooks: a link per interface, those the configuration in force
/// names (a missing pin shows) and any an earlier install left (still
/// attached, unused); none without `-k`.
fn virt_programs(dir: &Path, virt: &[u32]) -> Vec<Program> {
    let mut out = Vec::new();
    for hook in VIRT_HOOKS {
        let mut ifindexes = virt.to_vec();
        ifindexes.extend(
            crate::ebpf::loader::virt_pins(dir, hook)
                .into_iter()
                .filter(|i| !virt.contains(i)),
        );
        out.extend(ifindexes.into_iter().map(|ifindex| {
            let pin = hook.virt_pin_name(ifindex);
            program(
                dir,
                hook,
                &pin,
                u64::from(ifindex),
                hook.mirrors,
                Some(ifindex),
            )
        }));
    }
    out
}

/// The iptables rule (or conntrack event) a counter stands for; with IPv6
/// rules, and where the IPv6 table's rule differs, that one after it.
fn mirrors(counter: Counter, cfg: Option<&Config>, sets: &maps::Sets) -> String {
    if let Some(cfg) = cfg.filter(|c| c.legacy)
        && let Some(rule) = legacy_mirrors(counter, cfg)
    {
        return rule;
    }
    let rule = mirrors4(counter, cfg, sets);
    match cfg
        .filter(|c| c.ipv6.is_some())
        .and_then(|c| ipv6_rule(counter, c, sets))
    {
        Some(v6) => format!("{rule}  (IPv6: {v6})"),
        None => rule,
    }
}

/// The IPv6 table's rule for `counter` where it is not the IPv4 one's.
fn ipv6_rule(counter: Counter, cfg: &Config, sets: &maps::Sets) -> Option<String> {
    let cidrs = |list: &[(u32, redirect_common::Ip6)]| {
        list.iter()
            .map(|(prefix, net)| format!("{}/{prefix}", std::net::Ipv6Addr::from(net.octets())))
            .collect::<Vec<_>>()
            .join(",")
    };
    let uids = cfg
        .proxy_uids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    Some(match counter {
        Counter::BypassLoopback => "-d ::1/128 -j RETURN".into(),
        Counter::BypassPassthrough => "-o lo -s ::6/128 -j RETURN".into(),
        Counter::Hairpin => format!(
            "-o lo ! -d ::1/128 -p tcp ! --dport {} -m owner --uid-owner {uids} -j ISTIO_IN_REDIRECT",
            cfg.tunnel_port
        ),
        Counter::BypassCidr => match cidrs(&sets.exclude6) {
            list if list.is_empty() => "no -x networks".into(),
            list => format!("-d {list} -j RETURN"),
        },
        Counter::DnsRedirected => match cfg.dns.as_ref() {
            Some(dns) if !dns.all && !dns.servers6.is_empty() => format!(
                "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d {} -j REDIRECT --to-port {DNS_PROXY_PORT}",
                dns.servers6
                    .iter()
                    .map(|s| format!("{s}/128"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            _ => return None,
        },
        Counter::NotIncluded if !cfg.include_all => match cidrs(&sets.include6) {
            list if list.is_empty() => "no -i networks".into(),
            list => format!("-d {list} -j ISTIO_REDIRECT"),
        },
        _ => return None,
    })
}

/// The IPv4 table's rule (or the conntrack event) a counter stands for.
fn mirrors4(counter: Counter, cfg: Option<&Config>, sets: &maps::Sets) -> String {
    let ports = |flag: u8| sets.ports_with(flag);
    let cidrs = |list: &[(u32, u32)]| {
        list.iter()
            .map(|(prefix, net)| {
                format!("{}/{prefix}", std::net::Ipv4Addr::from(net.to_ne_bytes()))
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let groups = sets
        .groups
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let groups_only = cfg.is_some_and(|c| c.groups_only);
    let inbound_all = cfg.is_some_and(|c| c.inbound.as_ref().is_some_and(|i| i.all));
    let join = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let (uids, gids, loopback, port, inbound, tunnel) = cfg.map_or_else(
        || {
            let unknown = || "?".to_owned();
            (
                unknown(),
                unknown(),
                unknown(),
                unknown(),
                unknown(),
                unknown(),
            )
        },
        |c| {
            (
                join(&c.proxy_uids),
                join(&c.proxy_gids),
                c.loopback.to_string(),
                c.proxy_port.to_string(),
                c.inbound_port.to_string(),
                c.tunnel_port.to_string(),
            )
        },
    );
    match counter {
        Counter::NotTcp => {
            "(not TCP: nothing but DNS capture's ISTIO_OUTPUT_DNS redirects other protocols)".into()
        }
        Counter::BypassUid => format!("-A ISTIO_OUTPUT -m owner --uid-owner {uids} -j RETURN"),
        Counter::BypassGid => format!("-A ISTIO_OUTPUT -m owner --gid-owner {gids} -j RETURN"),
        Counter::BypassLoopback => format!("-A ISTIO_OUTPUT -d {loopback} -j RETURN"),
        Counter::Redirected => format!("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {port}"),
        Counter::RecordFailed => "(record map full: connect left alone)".into(),
        Counter::TupleRecorded => "(conntrack: a redirected connection's SYN)".into(),
        Counter::TupleReleased => "(conntrack: the proxy's end took the record)".into(),
        Counter::OrigDstAnswered => "(conntrack: SO_ORIGINAL_DST answered)".into(),
        Counter::OrigDstMissed => "(SO_ORIGINAL_DST on a connection with no record)".into(),
        Counter::PeernameRestored => "(getpeername() of a redirected socket restored)".into(),
        Counter::NotIpv4 => "(IPv6 destination: no IPv6 rules, not captured)".into(),
        Counter::Hairpin => format!(
            "-A ISTIO_OUTPUT -o lo ! -d {loopback} -p tcp ! --dport {tunnel} -m owner --uid-owner {uids} -j ISTIO_IN_REDIRECT  (REDIRECT --to-ports {inbound})"
        ),
        Counter::BypassPort => match ports(redirect_common::PORT_EXCLUDE) {
            list if list.is_empty() => "(no -o ports: rule absent)".into(),
            list => format!("-A ISTIO_OUTPUT -p tcp --dport {list} -j RETURN"),
        },
        Counter::BypassPassthrough => "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN".into(),
        Counter::BypassLocal => {
            format!("-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner {uids} -j RETURN")
        }
        Counter::BypassGroup if groups.is_empty() => "(no owner groups: rule absent)".into(),
        Counter::BypassGroup => format!(
            "-A ISTIO_OUTPUT -m owner {}--gid-owner {groups} -j RETURN",
            if groups_only { "! " } else { "" }
        ),
        Counter::BypassCidr => match cidrs(&sets.exclude) {
            list if list.is_empty() => "(no -x CIDRs: rule absent)".into(),
            list => format!("-A ISTIO_OUTPUT -d {list} -j RETURN"),
        },
        Counter::NotIncluded if cfg.is_some_and(|c| c.include_all) => {
            "(-i '*': every destination is included)".into()
        }
        Counter::NotIncluded => format!(
            "(destination in no -i CIDR ({}) and no -q port ({}): not captured)",
            cidrs(&sets.include),
            ports(redirect_common::PORT_INCLUDE)
        ),
        Counter::InboundCaptured => match (inbound_all, ports(PORT_IN_INCLUDE)) {
            (true, _) => format!(
                "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT  (REDIRECT --to-ports {inbound})"
            ),
            (false, list) => format!(
                "-A ISTIO_INBOUND -p tcp --dport {list} -j ISTIO_IN_REDIRECT  (REDIRECT --to-ports {inbound})"
            ),
        },
        Counter::InboundRefused => {
            format!("(inbound capture with nothing listening on {inbound}: refused)")
        }
        Counter::InboundLocal => {
            "(from the pod itself: local traffic does not traverse PREROUTING)".into()
        }
        Counter::InboundBypassTunnel => {
            format!("-A ISTIO_INBOUND -p tcp --dport {tunnel} -j RETURN")
        }
        Counter::InboundBypassPort => match ports(PORT_IN_EXCLUDE) {
            list if list.is_empty() || !inbound_all => "(no -d ports in use: rule absent)".into(),
            list => format!("-A ISTIO_INBOUND -p tcp --dport {list} -j RETURN"),
        },
        Counter::InboundNotIncluded => "(inbound port not in -b: not captured)".into(),
        Counter::ListenerRegistered => {
            format!("(a listener on {inbound} registered for inbound capture)")
        }
        Counter::OrigDstInbound => {
            "(conntrack: SO_ORIGINAL_DST of an accepted connection answered: its local address)"
                .into()
        }
        Counter::OrigDstUnredirected => {
            "(conntrack: SO_ORIGINAL_DST of a connection not redirected answered: its peer)".into()
        }
        Counter::KernelRefuses => {
            "(no route, broadcast, multicast or a loopback source: the kernel fails the connect before nat OUTPUT)"
                .into()
        }
        Counter::SocknameRedirected => {
            format!("(getsockname() of an inbound capture shows :{inbound}, as after REDIRECT)")
        }
        Counter::SourceNotKept => {
            "(bpf_bind failed: a redirected connection left from 127.0.0.1)".into()
        }
        Counter::DnsRedirected => match cfg.and_then(|c| c.dns.as_ref()) {
            None => "(no --redirect-dns: rule absent)".into(),
            Some(dns) if dns.all => {
                format!("-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port {DNS_PROXY_PORT}  (and -p tcp)")
            }
            Some(dns) => format!(
                "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d {} -j REDIRECT --to-port {DNS_PROXY_PORT}  (and -p tcp)",
                dns.servers
                    .iter()
                    .map(|s| format!("{s}/32"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        },
        Counter::DnsReplyRestored => {
            "(conntrack: a captured DNS reply shows the nameserver as its source)".into()
        }
        Counter::LoopbackRedirected => "(--profile legacy only: rule absent)".into(),
        Counter::BypassInterface => interface_rule(cfg, "-A OUTPUT -o X -j RETURN"),
        Counter::InboundBypassInterface => interface_rule(cfg, "-A PREROUTING -i X -j RETURN"),
        Counter::LinkLocal => {
            "(IPv6 link-local destination: its scope decides, which the hook cannot see; left to the kernel)"
                .into()
        }
        Counter::VirtRedirected => virt_rule(
            cfg,
            &format!("-I PREROUTING 1 -i X -j ISTIO_REDIRECT  (REDIRECT --to-ports {port})"),
        ),
        Counter::VirtDropped => virt_rule(
            cfg,
            "(a -k interface without an address of the connection's family: REDIRECT drops it)",
        ),
    }
}

/// `rule` for the interfaces `-c` names, as the pod's interface indexes
/// (the names are the pod's, not readable from here).
fn interface_rule(cfg: Option<&Config>, rule: &str) -> String {
    rule_on_interfaces(cfg.map(|c| c.exclude_ifindexes.clone()), "-c", rule)
}

/// `rule` for the interfaces `-k` names, likewise.
fn virt_rule(cfg: Option<&Config>, rule: &str) -> String {
    rule_on_interfaces(
        cfg.map(|c| c.virt_ifaces.iter().map(|v| v.ifindex).collect()),
        "-k",
        rule,
    )
}

/// `rule` with its `X` the interfaces of `indexes` (`flag`'s).
fn rule_on_interfaces(indexes: Option<Vec<u32>>, flag: &str, rule: &str) -> String {
    match indexes.as_deref() {
        None | Some([]) => format!("(no {flag} interfaces: rule absent)"),
        Some(indexes) => format!(
            "{rule}  (X: the pod's interface {})",
            indexes
                .iter()
                .map(|i| format!("#{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The rule of the legacy table (`--profile legacy`) a counter stands
/// for, with its `istio/...` name; `None` for the conntrack events, which
/// read as in every profile.
fn legacy_mirrors(counter: Counter, cfg: &Config) -> Option<String> {
    let uids: Vec<String> = cfg.proxy_uids.iter().map(u32::to_string).collect();
    let table = legacy::table(&cfg.proxy_port.to_string(), &uids);
    let rule = |name: &str| {
        table
            .iter()
            .filter(|r| r.name == name)
            .map(legacy::Rule::text)
            .collect::<Vec<_>>()
            .join("; ")
    };
    let redirect = rule(legacy::TO_ENVOY_PORT);
    Some(match counter {
        Counter::NotTcp => format!("{}  (not TCP: not sent there)", rule(legacy::OUTPUT)),
        Counter::LoopbackRedirected => {
            format!("{}  ({redirect})", rule(legacy::IMPLICIT_LOOPBACK))
        }
        Counter::BypassUid => rule(legacy::BYPASS_ENVOY),
        Counter::BypassLoopback => rule(legacy::EXPLICIT_LOOPBACK),
        Counter::Redirected => format!("{}  ({redirect})", rule(legacy::DEFAULT_OUTBOUND)),
        Counter::InboundCaptured => format!("{}  ({redirect})", rule(legacy::PREROUTING)),
        Counter::InboundRefused => format!(
            "(inbound capture with nothing listening on {}: refused)",
            cfg.proxy_port
        ),
        Counter::BypassGid
        | Counter::Hairpin
        | Counter::BypassPort
        | Counter::BypassPassthrough
        | Counter::BypassLocal
        | Counter::BypassGroup
        | Counter::BypassCidr
        | Counter::NotIncluded
        | Counter::InboundBypassTunnel
        | Counter::InboundBypassPort
        | Counter::InboundNotIncluded
        | Counter::DnsRedirected
        | Counter::BypassInterface
        | Counter::InboundBypassInterface => "(no such rule in the legacy table)".into(),
        _ => return None,
    })
}

/// Human-readable rendering.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    for broken in &status.incomplete {
        let _ = writeln!(
            out,
            "Instance {} is INCOMPLETE ({}): {}\n",
            broken.instance, broken.problem, broken.fix
        );
    }
    if status.instances.is_empty() {
        if status.incomplete.is_empty() {
            out.push_str("no redirect instances are installed\n");
        }
        return out;
    }
    for (i, inst) in status.instances.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "Instance {} on cgroup {} (id {})",
            inst.instance, inst.cgroup, inst.cgroup_id
        );
        for p in &inst.programs {
            let on = p
                .interface
                .map_or_else(String::new, |i| format!(" to interface #{i}"));
            let state = match (p.attached, p.program_id, p.link_id) {
                (true, Some(prog), Some(link)) => {
                    format!("attached{on}, program {prog}, link {link}")
                }
                (false, Some(prog), Some(link)) => {
                    format!("NOT attached{on} (cgroup gone?), program {prog}, link {link}")
                }
                _ if !p.available => format!("skipped: this kernel is older than {}", p.min_kernel),
                _ => "NOT attached (link pin missing)".to_owned(),
            };
            let _ = writeln!(out, "  {:<12} {state}  [{}]", p.hook, p.mirrors);
        }
        match &inst.config {
            Some(c) => {
                let ids = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
                // Istio's first table has neither an inbound port of its
                // own nor a tunnel port: inbound goes to the proxy port.
                let ports = if c.profile == "legacy" {
                    format!(
                        "profile legacy (Istio's first table), proxy port {}",
                        c.proxy_port
                    )
                } else {
                    format!(
                        "proxy port {}, inbound port {}, tunnel port {}",
                        c.proxy_port, c.inbound_port, c.tunnel_port
                    )
                };
                let _ = writeln!(
                    out,
                    "  config       {ports}, proxy uids [{}], proxy gids [{}], loopback {}",
                    ids(&c.proxy_uids),
                    ids(&c.proxy_gids),
                    c.loopback_cidr
                );
                if let Some(dns) = &c.dns {
                    let _ = writeln!(
                        out,
                        "  dns          port 53 of {dns} to 127.0.0.1:{DNS_PROXY_PORT} (UDP and TCP)"
                    );
                }
            }
            None => out.push_str("  config       (not written)\n"),
        }
        if let Some(i) = inst.config.as_ref().and_then(|c| c.inbound.as_ref()) {
            let captured = inst
                .inbound_captured
                .iter()
                .map(|p| format!("{}: {}", p.port, p.connections))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                out,
                "  inbound      ports {} except [{}] ({}); captured per port: {}",
                i.ports,
                i.exclude,
                i.mode,
                if captured.is_empty() {
                    "none yet"
                } else {
                    &captured
                }
            );
        }
        let _ = writeln!(
            out,
            "  tracked      {} handshakes in flight (room for {}; open connections keep their records in socket storage)",
            inst.tracked.handshakes, inst.max_connections
        );
        let _ = writeln!(
            out,
            "  memory       {} KiB in {} maps ({})",
            inst.map_memory_bytes / 1024,
            inst.maps.len(),
            inst.maps
                .iter()
                .map(|m| format!("{} {} KiB", m.name, m.bytes / 1024))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(out, "  {:>10}  {:<24} mirrors", "conns", "decision");
        for c in &inst.counters {
            let _ = writeln!(out, "  {:>10}  {:<24} {}", c.value, c.name, c.mirrors);
        }
    }
    out
}

/// The rule texts `status` prints are the one source: the example in the
/// docs (from `redirect demo`) must show exactly them.
#[cfg(test)]
mod tests {
    use redirect_common::Counter;

    use super::mirrors;
    use crate::ebpf::{
        VIRT_HOOKS, all_hooks,
        config::{Config, Inbound},
        maps::Sets,
    };

    /// The demo's capture: Istio's sidecar flags, inbound included.
    fn demo() -> Config {
        Config {
            inbound: Some(Inbound {
                all: true,
                exclude: vec![15090, 15021, 15020],
                ..Inbound::default()
            }),
            ..Config::default()
        }
    }

    #[test]
    fn the_documented_status_shows_the_rules_status_prints() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/design.md");
        let doc = std::fs::read_to_string(path).expect("docs/design.md");
        let sample = doc
            .split("Example `status`")
            .nth(1)
            .and_then(|rest| rest.split("```text\n").nth(1))
            .and_then(|block| block.split("```").next())
            .expect("the status example in docs/design.md");
        let config = demo();
        let sets = Sets::of(&config);
        let (mut counters, mut hooks) = (0, 0);
        for line in sample.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let [value, name, ..] = words.as_slice()
                && value.parse::<u64>().is_ok()
                && let Some(counter) = Counter::ALL.iter().find(|c| c.name() == *name)
            {
                let shown = line.split_once(name).map(|(_, m)| m.trim()).unwrap_or("");
                assert_eq!(shown, mirrors(*counter, Some(&config), &sets), "{name}");
                counters += 1;
            }
            if let Some(hook) = all_hooks().find(|h| words.first() == Some(&h.name)) {
                assert!(
                    line.ends_with(&format!("[{}]", hook.mirrors)),
                    "{}: {line}",
                    hook.name
                );
                hooks += 1;
            }
        }
        assert_eq!(
            counters,
            Counter::ALL.len(),
            "every counter is in the example"
        );
        // The demo has no -k: its hooks are listed only when used.
        assert_eq!(
            hooks,
            all_hooks().filter(|h| !VIRT_HOOKS.contains(h)).count(),
            "every hook is in the example"
        );
    }
}
