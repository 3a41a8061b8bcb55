//! The eBPF lowering of a [`Capture`]: the kernel configuration and sets,
//! or everything eBPF mode cannot honour (each naming its flag), which is
//! auto mode's reason for iptables and `install`'s refusal.

use redirect_common::{
    MAX_GROUPS, MAX_OWNERS, PORT_EXCLUDE, PORT_IN_EXCLUDE, PORT_IN_INCLUDE, PORT_INCLUDE,
};

use super::config::{Config, Dns, Inbound, Ipv6, PortRange};
use crate::{
    capture::{Capture, InboundPorts, OwnerGroups, PortList, Profile},
    host::{Host, resolve_owner},
    userns,
};

/// Lowers `capture` for the eBPF programs. Owner names are resolved
/// through `host`; ids are translated into the initial user namespace
/// (what the programs compare them with, see [`userns`]).
pub fn lower(capture: &Capture, host: &dyn Host) -> Result<Config, Vec<String>> {
    let mut unsupported: Vec<String> = not_honoured(capture)
        .into_iter()
        .map(str::to_owned)
        .collect();
    let mut ids = |list: &[String], what: &str, file: &str, max: usize| -> Vec<u32> {
        let parsed: Option<Vec<u32>> = list
            .iter()
            .map(|id| resolve_owner(host, file, id))
            .collect();
        match parsed {
            Some(ids) if ids.len() <= max => ids,
            Some(_) => {
                unsupported.push(format!("{what} with more than {max} ids"));
                Vec::new()
            }
            None => {
                unsupported.push(format!("{what} naming an unknown owner"));
                Vec::new()
            }
        }
    };
    let proxy_uids = ids(
        &capture.proxy_uids,
        "-u/--proxy-uid",
        "/etc/passwd",
        MAX_OWNERS,
    );
    let proxy_gids = ids(
        &capture.proxy_gids,
        "-g/--proxy-gid",
        "/etc/group",
        MAX_OWNERS,
    );
    let owner_groups = ids(
        capture.owner_groups.groups(),
        "ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]",
        "/etc/group",
        MAX_GROUPS,
    );
    let mut port_ranges = Vec::new();
    let ports_exclude = split_ports(&capture.outbound_exclude, PORT_EXCLUDE, &mut port_ranges);
    let ports_include = split_ports(&capture.outbound_ports, PORT_INCLUDE, &mut port_ranges);
    let inbound_exclude = split_ports(&capture.inbound_exclude, PORT_IN_EXCLUDE, &mut port_ranges);
    let inbound = match &capture.inbound {
        InboundPorts::Off => None,
        InboundPorts::All => Some((true, Vec::new())),
        InboundPorts::List(list) => {
            Some((false, split_ports(list, PORT_IN_INCLUDE, &mut port_ranges)))
        }
    }
    .map(|(all, ports)| Inbound {
        all,
        ports,
        exclude: inbound_exclude,
    });
    let dns = capture.dns.as_ref().map(|dns| Dns {
        all: dns.capture_all,
        // resolv.conf's IPv6 nameservers are the IPv6 rules' (unused
        // without them).
        servers6: if capture.ipv6 {
            dns.v6
                .iter()
                .filter_map(|server| match server.parse() {
                    Ok(ip) => Some(ip),
                    Err(_) => {
                        unsupported
                            .push(format!("the nameserver {server:?} (not an IPv6 address)"));
                        None
                    }
                })
                .collect()
        } else {
            Vec::new()
        },
        servers: dns
            .v4
            .iter()
            .filter_map(|server| match server.parse() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    unsupported.push(format!("the nameserver {server:?} (not an IPv4 address)"));
                    None
                }
            })
            .collect(),
    });
    let routes = host
        .routes(&capture.exclude_interfaces)
        .unwrap_or_else(|err| {
            unsupported.push(format!("{err:#}"));
            Vec::new()
        });
    let exclude_ifindexes = capture
        .exclude_interfaces
        .iter()
        .filter_map(|nic| {
            let index = host.ifindex(nic);
            if index.is_none() {
                unsupported.push(format!(
                    "-c {nic} naming an interface the pod does not have (eBPF mode matches \
                     the interfaces present at install; iptables would match one created later)"
                ));
            }
            index
        })
        .collect();
    let virt_ifaces = virt_ifaces(capture, host, &mut unsupported);
    let ipv6 = capture.ipv6.then(|| ipv6(capture, host, &mut unsupported));
    let mut to_host = |kind: userns::Ids, ids: Vec<u32>| {
        userns::to_host(kind, &ids).unwrap_or_else(|err| {
            unsupported.push(format!("{err:#}"));
            Vec::new()
        })
    };
    let proxy_uids = to_host(userns::Ids::User, proxy_uids);
    let proxy_gids = to_host(userns::Ids::Group, proxy_gids);
    let owner_groups = to_host(userns::Ids::Group, owner_groups);
    let config = Config {
        proxy_port: capture.proxy_port.value,
        proxy_uids,
        proxy_gids,
        loopback: capture.loopback.value,
        inbound_port: capture.inbound_port.value,
        tunnel_port: capture.tunnel_port.value,
        include_all: capture.include.wildcard,
        include: capture.include.v4_cidrs(),
        include_loopback: capture.include.has_loopback,
        exclude: capture.exclude.v4_cidrs(),
        ports_exclude,
        ports_include,
        port_ranges,
        groups_only: matches!(capture.owner_groups, OwnerGroups::Only(_)),
        owner_groups,
        local_addrs: capture.pod_addresses.clone(),
        routes,
        exclude_ifindexes,
        virt_ifaces,
        inbound,
        dns,
        ipv6,
        legacy: capture.profile == Profile::Legacy,
        max_connections: capture.max_connections,
        log_level: capture.log_level,
    };
    if let Err(limit) = config.check_limits() {
        unsupported.push(limit);
    }
    if unsupported.is_empty() {
        Ok(config)
    } else {
        Err(unsupported)
    }
}

/// `-k`'s interfaces as REDIRECT sees them, each once. eBPF mode attaches
/// to them at install, so each must be there then (iptables would match
/// one created later), and Ethernet (the tc programs read its frames).
fn virt_ifaces(
    capture: &Capture,
    host: &dyn Host,
    unsupported: &mut Vec<String>,
) -> Vec<super::config::VirtIface> {
    let mut out: Vec<super::config::VirtIface> = Vec::new();
    for nic in &capture.kube_virt_interfaces {
        match host.interface(nic) {
            Ok(Some(iface)) if iface.ethernet => {
                if !out.iter().any(|v| v.ifindex == iface.ifindex) {
                    out.push(iface.redirect_targets());
                }
            }
            Ok(Some(_)) => unsupported.push(format!(
                "-k {nic} naming an interface that is not Ethernet (eBPF mode's tc programs \
                 read Ethernet frames)"
            )),
            Ok(None) => unsupported.push(format!(
                "-k {nic} naming an interface the pod does not have (eBPF mode attaches to \
                 the interfaces present at install; iptables would match one created later)"
            )),
            Err(err) => unsupported.push(format!("-k {nic}: listing its addresses: {err}")),
        }
    }
    out
}

/// What Istio's IPv6 table needs: the IPv6 networks of `-i` and `-x`, and
/// the pod's IPv6 addresses, routes and `lo` source, read from `host`.
fn ipv6(capture: &Capture, host: &dyn Host, unsupported: &mut Vec<String>) -> Ipv6 {
    let local_addrs = match host.addresses() {
        Ok(all) => all
            .into_iter()
            .filter_map(|a| match a {
                std::net::IpAddr::V6(v6) if !v6.is_loopback() => Some(v6),
                _ => None,
            })
            .collect(),
        Err(err) => {
            unsupported.push(format!("listing the pod's IPv6 addresses: {err}"));
            Vec::new()
        }
    };
    let routes = host
        .routes6(&capture.exclude_interfaces)
        .unwrap_or_else(|err| {
            unsupported.push(format!("{err:#}"));
            Vec::new()
        });
    Ipv6 {
        include: capture.include.v6_cidrs(),
        exclude: capture.exclude.v6_cidrs(),
        local_addrs,
        routes,
        lo_source: host.lo_source6(),
    }
}

/// The single ports of `list`, each once, in order; its `a:b` ranges go to
/// `ranges` with the list's `PORT_*` flag.
fn split_ports(list: &PortList, flag: u8, ranges: &mut Vec<PortRange>) -> Vec<u16> {
    let mut singles = Vec::new();
    for ports in list.iter().map(|p| p.value) {
        match ports.single() {
            Some(port) if !singles.contains(&port) => singles.push(port),
            Some(_) => {}
            None => ranges.push(PortRange {
                first: ports.first,
                last: ports.last,
                flag,
            }),
        }
    }
    singles
}

/// The flags of `capture` that need rules eBPF mode does not have yet.
fn not_honoured(capture: &Capture) -> Vec<&'static str> {
    [(
        capture.tproxy,
        "-m TPROXY (TPROXY needs netfilter: the mark 1337 rules, the fwmark route to the local \
             table and CONNMARK for the app's replies)",
    )]
    .into_iter()
    .filter_map(|(on, flag)| on.then_some(flag))
    .collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::{host::RealHost, istio::IstioArgs};

    fn istio(argv: &[&str]) -> Capture {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: IstioArgs,
        }
        let mut all = vec!["istio-iptables", "--ipv6=false"];
        all.extend_from_slice(argv);
        Cli::try_parse_from(all)
            .unwrap()
            .args
            .resolve(&RealHost::new())
            .unwrap()
    }

    #[test]
    fn default_outbound_capture_lowers() {
        let cfg = lower(
            &istio(&["-p", "15002", "-u", "1337,1338", "-g", "7", "-i", "*"]),
            &RealHost::new(),
        )
        .unwrap();
        assert_eq!(cfg.proxy_port, 15002);
        assert_eq!(cfg.proxy_uids, vec![1337, 1338]);
        assert_eq!(cfg.proxy_gids, vec![7]);
        assert_eq!(cfg.loopback.to_string(), "127.0.0.1/32");
    }

    #[test]
    fn lists_with_spaces_lower_like_iptables_reads_them() {
        // istio-iptables renders `--dport  5000`, which iptables reads as 5000.
        let cfg = lower(
            &istio(&["-q", "4000, 5000", "-o", " 22,"]),
            &RealHost::new(),
        )
        .unwrap();
        assert_eq!(cfg.ports_include, vec![4000, 5000]);
        assert_eq!(cfg.ports_exclude, vec![22]);
        // Ranges are kept apart, with their list's flag.
        let cfg = lower(
            &istio(&["-q", "4000:4010,80", "-o", "22:23"]),
            &RealHost::new(),
        )
        .unwrap();
        assert_eq!(cfg.ports_include, vec![80]);
        assert_eq!(
            cfg.port_ranges,
            vec![
                PortRange {
                    first: 22,
                    last: 23,
                    flag: PORT_EXCLUDE
                },
                PortRange {
                    first: 4000,
                    last: 4010,
                    flag: PORT_INCLUDE
                }
            ]
        );
    }

    #[test]
    fn the_sidecar_command_line_names_what_ebpf_cannot_do_yet() {
        let cfg = lower(
            &istio(&[
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
            ]),
            &RealHost::new(),
        )
        .unwrap();
        let inbound = cfg.inbound.expect("-b '*' is inbound capture");
        assert!(inbound.all);
        assert_eq!(inbound.exclude, vec![15090, 15021, 15020]);
        // -k's interfaces must be there, and Ethernet.
        let why = lower(&istio(&["-k", "not-a-nic0,lo"]), &RealHost::new()).unwrap_err();
        assert_eq!(
            why,
            vec![
                "-k not-a-nic0 naming an interface the pod does not have (eBPF mode attaches to \
                 the interfaces present at install; iptables would match one created later)",
                "-k lo naming an interface that is not Ethernet (eBPF mode's tc programs read \
                 Ethernet frames)"
            ]
        );
        let host = crate::host::fake::FakeHost::new(&[]);
        let cfg = lower(&istio(&["-k", "eth1,eth0,eth1"]), &host).unwrap();
        let indexes: Vec<u32> = cfg.virt_ifaces.iter().map(|v| v.ifindex).collect();
        assert_eq!(indexes, vec![3, 2]);
        assert_eq!(
            cfg.virt_ifaces[0].addr4,
            Some(std::net::Ipv4Addr::new(10, 0, 0, 5))
        );
        // -c's interfaces are taken by index; one the pod lacks is refused.
        let cfg = lower(&istio(&["-b", "", "-c", "lo"]), &RealHost::new()).unwrap();
        assert_eq!(cfg.exclude_ifindexes, vec![1]);
        assert_eq!(
            lower(&istio(&["-b", "", "-c", "not-a-nic0"]), &RealHost::new()).unwrap_err(),
            vec![
                "-c not-a-nic0 naming an interface the pod does not have (eBPF mode matches \
                 the interfaces present at install; iptables would match one created later)"
            ]
        );
        let cfg = lower(&istio(&["-b", "9080,9090"]), &RealHost::new()).unwrap();
        let inbound = cfg.inbound.expect("-b list");
        assert!(!inbound.all);
        assert_eq!(inbound.ports, vec![9080, 9090]);
        let why = lower(&istio(&["-b", "9080", "-m", "TPROXY"]), &RealHost::new()).unwrap_err();
        assert!(
            why[0].starts_with("-m TPROXY (TPROXY needs netfilter"),
            "{why:?}"
        );
        let cfg = lower(
            &istio(&[
                "-i",
                "10.0.0.0/8",
                "-x",
                "10.1.0.0/16",
                "-q",
                "80",
                "-o",
                "22",
            ]),
            &RealHost::new(),
        )
        .unwrap();
        assert!(!cfg.include_all);
        assert_eq!(cfg.include[0].to_string(), "10.0.0.0/8");
        assert_eq!(cfg.exclude[0].to_string(), "10.1.0.0/16");
        assert_eq!((cfg.ports_include, cfg.ports_exclude), (vec![80], vec![22]));
        let why = lower(&istio(&["-u", "nosuchuser"]), &RealHost::new()).unwrap_err();
        // -g defaults to -u, as in istio-iptables.
        assert_eq!(
            why,
            vec![
                "-u/--proxy-uid naming an unknown owner",
                "-g/--proxy-gid naming an unknown owner"
            ]
        );
    }
}
