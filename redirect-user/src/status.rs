//! `redirect status`: what is installed, where, with which config, and what
//! it decided, laid out like `iptables -t nat -v -L` (counters first, then
//! the rule each one mirrors).

use std::{fmt::Write as _, os::fd::AsFd as _, path::Path};

use anyhow::Result;
use redirect_common::{Counter, InstanceMeta, PORT_IN_EXCLUDE, PORT_IN_INCLUDE};
use serde::Serialize;

use crate::{
    bpffs,
    config::Config,
    ebpf::{Kind, all_hooks, loader, maps, sys},
};

#[derive(Serialize)]
pub struct Status {
    pub instances: Vec<Instance>,
    /// Instances whose pins could not be read (e.g. left half-removed).
    pub unreadable: Vec<Unreadable>,
}

#[derive(Serialize)]
pub struct Unreadable {
    pub instance: String,
    pub error: String,
}

#[derive(Serialize)]
pub struct Instance {
    pub instance: String,
    pub cgroup: String,
    pub cgroup_id: u64,
    pub programs: Vec<Program>,
    pub config: Option<ConfigView>,
    pub counters: Vec<CounterView>,
    /// Connections with an original-destination record.
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
    /// First kernel with the hook, "major.minor".
    pub min_kernel: String,
    pub mirrors: &'static str,
}

#[derive(Serialize)]
pub struct ConfigView {
    pub proxy_port: u16,
    pub proxy_uids: Vec<u32>,
    pub proxy_gids: Vec<u32>,
    pub loopback_cidr: String,
    pub inbound_port: u16,
    pub tunnel_port: u16,
    /// Inbound capture, `None` when off (`-b ''`).
    pub inbound: Option<InboundView>,
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
    /// Established redirected connections with an original-destination
    /// record (connects in progress keep theirs in socket storage).
    pub established: u64,
}

/// Collects the status of every instance (or only `only`).
pub fn collect(only: Option<&str>) -> Result<Status> {
    crate::privilege::check_ebpf()?;
    let mut instances = Vec::new();
    let mut unreadable = Vec::new();
    if bpffs::is_mounted() {
        for name in bpffs::instances()? {
            if only.is_some_and(|o| o != name) {
                continue;
            }
            match instance(&name) {
                Ok(found) => instances.push(found),
                Err(err) => unreadable.push(Unreadable {
                    instance: name,
                    error: format!("{err:#}"),
                }),
            }
        }
    }
    Ok(Status {
        instances,
        unreadable,
    })
}

fn instance(name: &str) -> Result<Instance> {
    let dir = bpffs::instance_dir(name);
    let meta = maps::meta(&dir)?.get(&0, 0)?;
    let raw = maps::config(&dir)?.get(&0, 0)?;
    let config = (raw.abi_version != 0).then(|| Config::from_bpf(&raw));
    let sets = maps::read_sets(&dir)?;
    let counters = maps::counters(&dir)?
        .into_iter()
        .map(|(c, value)| CounterView {
            name: c.name(),
            value,
            mirrors: mirrors(c, config.as_ref(), &sets),
        })
        .collect();
    let established = maps::tracked(&dir)?;
    let port_list = |flag: u8| sets.ports_with(flag);
    let programs = programs(&dir, &meta);
    let prog_ids: Vec<u32> = programs.iter().filter_map(|p| p.program_id).collect();
    let maps = maps::memory(&dir, &prog_ids)?;
    Ok(Instance {
        instance: name.to_owned(),
        cgroup: loader::meta_path(&meta),
        cgroup_id: meta.cgroup_id,
        map_memory_bytes: maps.iter().map(|m| m.bytes).sum(),
        maps,
        programs,
        config: config.map(|c| ConfigView {
            inbound: c.inbound.as_ref().map(|i| InboundView {
                ports: if i.all {
                    "*".to_owned()
                } else {
                    port_list(PORT_IN_INCLUDE)
                },
                exclude: port_list(PORT_IN_EXCLUDE),
                mode: if i.tproxy { "TPROXY" } else { "REDIRECT" },
            }),
            proxy_port: c.proxy_port,
            proxy_uids: c.proxy_uids,
            proxy_gids: c.proxy_gids,
            loopback_cidr: c.loopback.to_string(),
            inbound_port: c.inbound_port,
            tunnel_port: c.tunnel_port,
        }),
        counters,
        tracked: Tracked { established },
        inbound_captured: maps::inbound_hits(&dir)?
            .into_iter()
            .map(|(port, connections)| PortCount { port, connections })
            .collect(),
    })
}

/// The instance's hooks; sk_lookup only when inbound capture was ever
/// installed (its pin exists, or the instance records a namespace).
fn programs(dir: &Path, meta: &InstanceMeta) -> Vec<Program> {
    all_hooks()
        .filter(|hook| {
            hook.kind != Kind::SkLookup || meta.netns_ino != 0 || dir.join(hook.pin_name()).exists()
        })
        .map(|hook| {
            let target = if hook.kind == Kind::SkLookup {
                u64::from(meta.netns_ino)
            } else {
                meta.cgroup_id
            };
            let info = sys::obj_get(&dir.join(hook.pin_name()))
                .and_then(|fd| sys::link_info(fd.as_fd()))
                .ok();
            Program {
                hook: hook.name,
                link_id: info.map(|i| i.link_id),
                program_id: info.map(|i| i.prog_id),
                attached: info.is_some_and(|i| i.target == target && target != 0),
                available: loader::available(&hook),
                min_kernel: format!("{}.{}", hook.min_kernel.0, hook.min_kernel.1),
                mirrors: hook.mirrors,
            }
        })
        .collect()
}

/// The iptables rule (or conntrack event) a counter stands for.
fn mirrors(counter: Counter, cfg: Option<&Config>, sets: &maps::Sets) -> String {
    let ports = |flag: u8| sets.ports_with(flag);
    let cidrs = |list: &[(u32, u32)]| {
        list.iter()
            .map(|(prefix, net)| {
                format!("{}/{prefix}", std::net::Ipv4Addr::from(net.to_ne_bytes()))
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let (groups, groups_only) = cfg.map_or_else(
        || ("?".to_owned(), false),
        |c| {
            let list = c
                .owner_groups
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>();
            (list.join(","), c.groups_only)
        },
    );
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
        Counter::NotTcp => "-A OUTPUT -p tcp -j ISTIO_OUTPUT  (not TCP: never enters)".into(),
        Counter::BypassUid => format!("-A ISTIO_OUTPUT -m owner --uid-owner {uids} -j RETURN"),
        Counter::BypassGid => format!("-A ISTIO_OUTPUT -m owner --gid-owner {gids} -j RETURN"),
        Counter::BypassLoopback => format!("-A ISTIO_OUTPUT -d {loopback} -j RETURN"),
        Counter::Redirected => format!("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {port}"),
        Counter::RecordFailed => "(record map full: connect left alone)".into(),
        Counter::TupleRecorded => "(conntrack: redirected connection established)".into(),
        Counter::TupleReleased => "(conntrack: redirected connection closed)".into(),
        Counter::ConnectAborted => "(conntrack: redirected connect never completed)".into(),
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
            "(conntrack: SO_ORIGINAL_DST of an inbound connection answered)".into()
        }
    }
}

/// Human-readable rendering.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    for broken in &status.unreadable {
        let _ = writeln!(
            out,
            "Instance {} is unreadable ({}): remove it with `redirect uninstall --instance {}`\n",
            broken.instance, broken.error, broken.instance
        );
    }
    if status.instances.is_empty() {
        if status.unreadable.is_empty() {
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
            let state = match (p.attached, p.program_id, p.link_id) {
                (true, Some(prog), Some(link)) => format!("attached, program {prog}, link {link}"),
                (false, Some(prog), Some(link)) => {
                    format!("NOT attached (cgroup gone?), program {prog}, link {link}")
                }
                _ if !p.available => format!("skipped: this kernel is older than {}", p.min_kernel),
                _ => "NOT attached (link pin missing)".to_owned(),
            };
            let _ = writeln!(out, "  {:<12} {state}  [{}]", p.hook, p.mirrors);
        }
        match &inst.config {
            Some(c) => {
                let ids = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
                let _ = writeln!(
                    out,
                    "  config       proxy port {}, inbound port {}, tunnel port {}, proxy uids [{}], proxy gids [{}], loopback {}",
                    c.proxy_port,
                    c.inbound_port,
                    c.tunnel_port,
                    ids(&c.proxy_uids),
                    ids(&c.proxy_gids),
                    c.loopback_cidr
                );
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
            "  tracked      {} established connections",
            inst.tracked.established
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
        let _ = writeln!(out, "  {:>10}  {:<21} mirrors", "conns", "decision");
        for c in &inst.counters {
            let _ = writeln!(out, "  {:>10}  {:<21} {}", c.value, c.name, c.mirrors);
        }
    }
    out
}
