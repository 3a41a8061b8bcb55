//! The iptables lowering of a [`Capture`]: the rules istio-iptables
//! generates for it, in the order it generates them (its
//! `capture/run.go`), so that the restore documents match its golden files
//! byte for byte. Flag values are rendered as given ([`crate::capture::Given`]).

use super::builder::{Builder, Family, VERSIONED};
use crate::capture::{Capture, Dns, InboundPorts, OwnerGroups, Prefix, Profile};

const NAT: &str = "nat";
const MANGLE: &str = "mangle";
const RAW: &str = "raw";
/// The port of the proxy's DNS listener.
const DNS_PORT: &str = "15053";
/// The mark the proxy's own loopback traffic carries in TPROXY mode.
const OUTBOUND_MARK: &str = "1338";
/// The inbound passthrough source (the proxy forwarding to the app).
const PASSTHROUGH: (&str, &str) = ("127.0.0.6/32", "::6/128");

/// Builds every rule for `cfg` (for `--profile legacy`, the legacy table).
pub fn rules(cfg: &Capture) -> Builder {
    if cfg.profile == Profile::Legacy {
        return super::legacy::rules(&cfg.proxy_port.text, &cfg.proxy_uids);
    }
    let mut b = Builder::new(cfg.ipv6);
    let lo = (cfg.loopback.text.as_str(), "::1/128");
    let tun = cfg.tunnel_port.text.as_str();

    // Excluded interfaces: nothing on them is captured, either way.
    for nic in &cfg.exclude_interfaces {
        b.append("PREROUTING", NAT, &["-i", nic, "-j", "RETURN"]);
        b.append("OUTPUT", NAT, &["-o", nic, "-j", "RETURN"]);
    }
    if cfg.tproxy {
        for nic in &cfg.exclude_interfaces {
            b.append("PREROUTING", MANGLE, &["-i", nic, "-j", "RETURN"]);
            b.append("OUTPUT", MANGLE, &["-o", nic, "-j", "RETURN"]);
        }
    }
    for nic in &cfg.kube_virt_interfaces {
        b.insert("PREROUTING", NAT, 1, &["-i", nic, "-j", "RETURN"]);
    }
    if cfg.drop_invalid {
        b.append(
            "PREROUTING",
            MANGLE,
            &[
                "-m",
                "conntrack",
                "--ctstate",
                "INVALID",
                "-j",
                "ISTIO_DROP",
            ],
        );
        b.append("ISTIO_DROP", MANGLE, &["-j", "DROP"]);
    }

    b.append(
        "ISTIO_INBOUND",
        NAT,
        &["-p", "tcp", "--dport", tun, "-j", "RETURN"],
    );
    b.append(
        "ISTIO_REDIRECT",
        NAT,
        &[
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            &cfg.proxy_port.text,
        ],
    );
    b.append(
        "ISTIO_IN_REDIRECT",
        NAT,
        &[
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            &cfg.inbound_port.text,
        ],
    );

    inbound(&mut b, cfg, lo);

    b.append("OUTPUT", NAT, &["-j", "ISTIO_OUTPUT"]);
    for port in &cfg.outbound_exclude {
        let port = port.text.as_str();
        b.append(
            "ISTIO_OUTPUT",
            NAT,
            &["-p", "tcp", "--dport", port, "-j", "RETURN"],
        );
        b.append(
            "ISTIO_OUTPUT",
            NAT,
            &["-p", "udp", "--dport", port, "-j", "RETURN"],
        );
    }
    b.append_versioned(
        "ISTIO_OUTPUT",
        NAT,
        PASSTHROUGH,
        &["-o", "lo", "-s", VERSIONED, "-j", "RETURN"],
    );
    owners(&mut b, cfg, lo);
    owner_groups(&mut b, cfg);
    if let Some(dns_capture) = &cfg.dns {
        dns(&mut b, cfg, dns_capture);
    }
    b.append_versioned("ISTIO_OUTPUT", NAT, lo, &["-d", VERSIONED, "-j", "RETURN"]);
    for (family, cidrs) in [(Family::V4, &cfg.exclude.v4), (Family::V6, &cfg.exclude.v6)] {
        for cidr in cidrs {
            b.append_to(
                family,
                "ISTIO_OUTPUT",
                NAT,
                &["-d", &cidr.to_string(), "-j", "RETURN"],
            );
        }
    }
    for port in &cfg.outbound_ports {
        b.append(
            "ISTIO_OUTPUT",
            NAT,
            &["-p", "tcp", "--dport", &port.text, "-j", "ISTIO_REDIRECT"],
        );
    }
    outbound_include(&mut b, cfg, Family::V4, &cfg.include.v4);
    outbound_include(&mut b, cfg, Family::V6, &cfg.include.v6);
    if cfg.tproxy {
        tproxy_tail(&mut b, cfg, lo);
    }
    b
}

/// Inbound capture (`-b`, `-d`), with REDIRECT or TPROXY.
fn inbound(b: &mut Builder, cfg: &Capture, lo: (&str, &str)) {
    if cfg.inbound == InboundPorts::Off {
        return;
    }
    let table = if cfg.tproxy {
        b.append(
            "ISTIO_DIVERT",
            MANGLE,
            &["-j", "MARK", "--set-mark", &cfg.tproxy_mark.text],
        );
        b.append("ISTIO_DIVERT", MANGLE, &["-j", "ACCEPT"]);
        let mark = format!("{}/0xffffffff", cfg.tproxy_mark);
        b.append_versioned(
            "ISTIO_TPROXY",
            MANGLE,
            lo,
            &[
                "!",
                "-d",
                VERSIONED,
                "-p",
                "tcp",
                "-j",
                "TPROXY",
                "--tproxy-mark",
                &mark,
                "--on-port",
                &cfg.inbound_port.text,
            ],
        );
        MANGLE
    } else {
        NAT
    };
    b.append("PREROUTING", table, &["-p", "tcp", "-j", "ISTIO_INBOUND"]);
    let established = [
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
        "-j",
        "ISTIO_DIVERT",
    ];
    let InboundPorts::List(ports) = &cfg.inbound else {
        for port in &cfg.inbound_exclude {
            b.append(
                "ISTIO_INBOUND",
                table,
                &["-p", "tcp", "--dport", &port.text, "-j", "RETURN"],
            );
        }
        if cfg.tproxy {
            let mut rule = vec!["-p", "tcp"];
            rule.extend(established);
            b.append("ISTIO_INBOUND", MANGLE, &rule);
            b.append(
                "ISTIO_INBOUND",
                MANGLE,
                &["-p", "tcp", "-j", "ISTIO_TPROXY"],
            );
        } else {
            b.append(
                "ISTIO_INBOUND",
                NAT,
                &["-p", "tcp", "-j", "ISTIO_IN_REDIRECT"],
            );
        }
        return;
    };
    {
        for port in ports {
            let port = port.text.as_str();
            if cfg.tproxy {
                let mut rule = vec!["-p", "tcp", "--dport", port];
                rule.extend(established);
                b.append("ISTIO_INBOUND", MANGLE, &rule);
                b.append(
                    "ISTIO_INBOUND",
                    MANGLE,
                    &["-p", "tcp", "--dport", port, "-j", "ISTIO_TPROXY"],
                );
            } else {
                b.append(
                    "ISTIO_INBOUND",
                    NAT,
                    &["-p", "tcp", "--dport", port, "-j", "ISTIO_IN_REDIRECT"],
                );
            }
        }
    }
}

/// The proxy's own traffic: its calls to the pod itself go through the
/// inbound path; everything else it sends is left alone.
fn owners(b: &mut Builder, cfg: &Capture, lo: (&str, &str)) {
    let tun = cfg.tunnel_port.text.as_str();
    let dns_and_tunnel = format!("53,{tun}");
    for (kind, ids) in [
        ("--uid-owner", &cfg.proxy_uids),
        ("--gid-owner", &cfg.proxy_gids),
    ] {
        for id in ids {
            // The multiport DNS form is only ever used for UIDs.
            let dports: &[&str] = if cfg.dns.is_some() && kind == "--uid-owner" {
                &["-m", "multiport", "!", "--dports", &dns_and_tunnel]
            } else {
                &["!", "--dport", tun]
            };
            let mut rule = vec!["-o", "lo", "!", "-d", VERSIONED, "-p", "tcp"];
            rule.extend_from_slice(dports);
            rule.extend(["-m", "owner", kind, id, "-j", "ISTIO_IN_REDIRECT"]);
            b.append_versioned("ISTIO_OUTPUT", NAT, lo, &rule);
            if !cfg.include.has_loopback {
                if cfg.dns.is_some() {
                    b.append(
                        "ISTIO_OUTPUT",
                        NAT,
                        &[
                            "-o", "lo", "-p", "tcp", "!", "--dport", "53", "-m", "owner", "!",
                            kind, id, "-j", "RETURN",
                        ],
                    );
                } else {
                    b.append(
                        "ISTIO_OUTPUT",
                        NAT,
                        &["-o", "lo", "-m", "owner", "!", kind, id, "-j", "RETURN"],
                    );
                }
            }
            b.append(
                "ISTIO_OUTPUT",
                NAT,
                &["-m", "owner", kind, id, "-j", "RETURN"],
            );
        }
    }
}

/// `ISTIO_OUTBOUND_OWNER_GROUPS` and `..._EXCLUDE`.
fn owner_groups(b: &mut Builder, cfg: &Capture) {
    match &cfg.owner_groups {
        OwnerGroups::Except(groups) => {
            for group in groups {
                b.append(
                    "ISTIO_OUTPUT",
                    NAT,
                    &["-m", "owner", "--gid-owner", group, "-j", "RETURN"],
                );
            }
        }
        OwnerGroups::Only(groups) => {
            let mut rule = Vec::new();
            for group in groups {
                rule.extend(["-m", "owner", "!", "--gid-owner", group.as_str()]);
            }
            rule.extend(["-j", "RETURN"]);
            b.append("ISTIO_OUTPUT", NAT, &rule);
        }
    }
}

/// DNS capture to the proxy's DNS port, and conntrack zones that keep the
/// proxy's DNS and the app's apart.
fn dns(b: &mut Builder, cfg: &Capture, dns: &Dns) {
    let all = dns.capture_all;
    let servers = [(Family::V4, &dns.v4, "/32"), (Family::V6, &dns.v6, "/128")];
    b.append("OUTPUT", RAW, &["-j", "ISTIO_OUTPUT_DNS"]);
    for (family, list, _) in servers {
        if all || !list.is_empty() {
            b.append_to(family, "ISTIO_OUTPUT", NAT, &["-j", "ISTIO_OUTPUT_DNS"]);
        }
    }
    for (proto, to) in [("tcp", "--to-ports"), ("udp", "--to-port")] {
        if all {
            b.append(
                "ISTIO_OUTPUT_DNS",
                NAT,
                &["-p", proto, "--dport", "53", "-j", "REDIRECT", to, DNS_PORT],
            );
        } else {
            for (family, list, bits) in servers {
                for server in list {
                    let dst = format!("{server}{bits}");
                    b.append_to(
                        family,
                        "ISTIO_OUTPUT_DNS",
                        NAT,
                        &[
                            "-p", proto, "--dport", "53", "-d", &dst, "-j", "REDIRECT", to,
                            DNS_PORT,
                        ],
                    );
                }
            }
        }
    }
    for (kind, ids) in [
        ("--uid-owner", &cfg.proxy_uids),
        ("--gid-owner", &cfg.proxy_gids),
    ] {
        for id in ids {
            b.append(
                "ISTIO_OUTPUT_DNS",
                RAW,
                &[
                    "-p", "udp", "--dport", "53", "-m", "owner", kind, id, "-j", "CT", "--zone",
                    "1",
                ],
            );
            b.append(
                "ISTIO_OUTPUT_DNS",
                RAW,
                &[
                    "-p", "udp", "--sport", DNS_PORT, "-m", "owner", kind, id, "-j", "CT",
                    "--zone", "2",
                ],
            );
        }
    }
    if all {
        b.append("PREROUTING", RAW, &["-j", "ISTIO_INBOUND"]);
        b.append(
            "ISTIO_OUTPUT_DNS",
            RAW,
            &["-p", "udp", "--dport", "53", "-j", "CT", "--zone", "2"],
        );
        b.append(
            "ISTIO_INBOUND",
            RAW,
            &["-p", "udp", "--sport", "53", "-j", "CT", "--zone", "1"],
        );
    } else {
        for (family, list, bits) in servers {
            if !list.is_empty() {
                b.append_to(family, "PREROUTING", RAW, &["-j", "ISTIO_INBOUND"]);
            }
            for server in list {
                let addr = format!("{server}{bits}");
                b.append_to(
                    family,
                    "ISTIO_OUTPUT_DNS",
                    RAW,
                    &[
                        "-p", "udp", "--dport", "53", "-d", &addr, "-j", "CT", "--zone", "2",
                    ],
                );
                b.append_to(
                    family,
                    "ISTIO_INBOUND",
                    RAW,
                    &[
                        "-p", "udp", "--sport", "53", "-s", &addr, "-j", "CT", "--zone", "1",
                    ],
                );
            }
        }
    }
}

/// `-i`: the destinations whose traffic goes to the proxy.
fn outbound_include(b: &mut Builder, cfg: &Capture, family: Family, cidrs: &[Prefix]) {
    if cfg.include.wildcard {
        b.append_to(family, "ISTIO_OUTPUT", NAT, &["-j", "ISTIO_REDIRECT"]);
        for nic in &cfg.kube_virt_interfaces {
            b.insert_to(
                family,
                "PREROUTING",
                NAT,
                1,
                &["-i", nic, "-j", "ISTIO_REDIRECT"],
            );
        }
        return;
    }
    for cidr in cidrs {
        let cidr = cidr.to_string();
        let cidr = cidr.as_str();
        for nic in &cfg.kube_virt_interfaces {
            b.insert_to(
                family,
                "PREROUTING",
                NAT,
                1,
                &["-i", nic, "-d", cidr, "-j", "ISTIO_REDIRECT"],
            );
        }
        b.append_to(
            family,
            "ISTIO_OUTPUT",
            NAT,
            &["-d", cidr, "-j", "ISTIO_REDIRECT"],
        );
    }
}

/// TPROXY's marks and connmark bookkeeping.
fn tproxy_tail(b: &mut Builder, cfg: &Capture, lo: (&str, &str)) {
    let mark = cfg.tproxy_mark.text.as_str();
    b.append(
        "PREROUTING",
        MANGLE,
        &[
            "-p",
            "tcp",
            "-m",
            "mark",
            "--mark",
            mark,
            "-j",
            "CONNMARK",
            "--save-mark",
        ],
    );
    b.append(
        "OUTPUT",
        MANGLE,
        &[
            "-p", "tcp", "-o", "lo", "-m", "mark", "--mark", mark, "-j", "RETURN",
        ],
    );
    for (kind, ids) in [
        ("--uid-owner", &cfg.proxy_uids),
        ("--gid-owner", &cfg.proxy_gids),
    ] {
        for id in ids {
            b.append_versioned(
                "OUTPUT",
                MANGLE,
                lo,
                &[
                    "!",
                    "-d",
                    VERSIONED,
                    "-p",
                    "tcp",
                    "-o",
                    "lo",
                    "-m",
                    "owner",
                    kind,
                    id,
                    "-j",
                    "MARK",
                    "--set-mark",
                    OUTBOUND_MARK,
                ],
            );
        }
    }
    b.append(
        "OUTPUT",
        MANGLE,
        &[
            "-p",
            "tcp",
            "-m",
            "connmark",
            "--mark",
            mark,
            "-j",
            "CONNMARK",
            "--restore-mark",
        ],
    );
    b.insert(
        "ISTIO_INBOUND",
        MANGLE,
        1,
        &["-p", "tcp", "-m", "mark", "--mark", mark, "-j", "RETURN"],
    );
    b.insert_to(
        Family::V4,
        "ISTIO_INBOUND",
        MANGLE,
        2,
        &["-p", "tcp", "-s", PASSTHROUGH.0, "-i", "lo", "-j", "RETURN"],
    );
    b.insert_to(
        Family::V6,
        "ISTIO_INBOUND",
        MANGLE,
        2,
        &["-p", "tcp", "-s", PASSTHROUGH.1, "-i", "lo", "-j", "RETURN"],
    );
    b.insert(
        "ISTIO_INBOUND",
        MANGLE,
        3,
        &[
            "-p",
            "tcp",
            "-i",
            "lo",
            "-m",
            "mark",
            "!",
            "--mark",
            OUTBOUND_MARK,
            "-j",
            "RETURN",
        ],
    );
}
