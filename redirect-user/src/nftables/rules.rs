//! The nftables lowering of a [`Capture`]: the rules Istio's native
//! nftables mode generates for it, in the order it generates them (its
//! `tools/istio-nftables/pkg/capture/run.go`, which follows
//! istio-iptables' order, see `crate::iptables::rules`). Flag values are
//! rendered as given ([`crate::capture::Given`]).
//!
//! Unlike iptables, one `inet` table holds both families: an IPv6 rule is
//! the IPv4 one's neighbour in the same chain, made only when IPv6 is on.

use super::{
    Chain::{
        self, Divert, InRedirect, Inbound, IstioOutput, Output, OutputDns, Prerouting, Redirect,
        Tproxy,
    },
    Table::{self, Mangle, Nat, Raw},
    Transaction,
};
use crate::capture::{Capture, Dns, Given, InboundPorts, OwnerGroups, Ports};

/// The port of the proxy's DNS listener.
const DNS_PORT: &str = "15053";
/// The mark the proxy's own loopback traffic carries in TPROXY mode.
const OUTBOUND_MARK: &str = "1338";
/// The inbound passthrough source (the proxy forwarding to the app).
const PASSTHROUGH: (&str, &str) = ("127.0.0.6/32", "::6/128");
/// IPv6's loopback (IPv4's is `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`).
const LOOPBACK_V6: &str = "::1/128";

/// Istio counts every rule's packets: `counter` goes between the matches
/// and the rule's last statement.
fn counted(matches: &str, statement: &str) -> String {
    if matches.is_empty() {
        format!("counter {statement}")
    } else {
        format!("{matches} counter {statement}")
    }
}

/// A port of `-o`, `-q`, `-b`, `-d` as nft reads it: as given, or a range
/// `a:b` (iptables' syntax, which Istio's flags use) as nft's `a-b`.
fn nft_port(given: &Given<Ports>) -> String {
    match given.value.single() {
        Some(_) => given.text.trim().to_owned(),
        None => format!("{}-{}", given.value.first, given.value.last),
    }
}

fn jump(chain: Chain) -> String {
    format!("jump {}", chain.name())
}

/// Builds every rule for `cfg`: istio-iptables' captures (`--profile
/// legacy` is `install`'s, which has no nftables backend).
pub fn rules(cfg: &Capture) -> Transaction {
    let mut tx = Transaction::new();
    let lo = cfg.loopback.text.as_str();

    // Excluded interfaces (-c): nothing on them is captured, either way.
    for nic in &cfg.exclude_interfaces {
        tx.add(
            Nat,
            Prerouting,
            counted(&format!("iifname {nic}"), "return"),
        );
        tx.add(Nat, Output, counted(&format!("oifname {nic}"), "return"));
    }
    if cfg.tproxy {
        for nic in &cfg.exclude_interfaces {
            tx.add(
                Mangle,
                Prerouting,
                counted(&format!("iifname {nic}"), "return"),
            );
            tx.add(Mangle, Output, counted(&format!("oifname {nic}"), "return"));
        }
    }
    // Kube virt interfaces (-k): their inbound traffic is not inbound
    // capture's (istio-iptables' `-I PREROUTING 1 -i NIC -j RETURN`).
    for nic in &cfg.kube_virt_interfaces {
        tx.insert(
            Nat,
            Prerouting,
            0,
            counted(&format!("iifname {nic}"), "return"),
        );
    }
    // --drop-invalid: drop out-of-window packets rather than reset the
    // connection (`-A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP`).
    if cfg.drop_invalid {
        tx.add(
            Mangle,
            Prerouting,
            counted("meta l4proto tcp ct state invalid", &jump(Chain::Drop)),
        );
        tx.add(Mangle, Chain::Drop, counted("", "drop"));
    }

    // The tunnel port (-e) is the proxy's own: never redirected.
    tx.add(
        Nat,
        Inbound,
        counted(
            &format!("meta l4proto tcp tcp dport {}", cfg.tunnel_port),
            "return",
        ),
    );
    // ISTIO_REDIRECT and ISTIO_IN_REDIRECT: to the proxy's outbound (-p)
    // and inbound (-z) ports.
    tx.add(
        Nat,
        Redirect,
        counted(
            "meta l4proto tcp",
            &format!("redirect to :{}", cfg.proxy_port),
        ),
    );
    tx.add(
        Nat,
        InRedirect,
        counted(
            "meta l4proto tcp",
            &format!("redirect to :{}", cfg.inbound_port),
        ),
    );

    inbound(&mut tx, cfg);

    // `-A OUTPUT -j ISTIO_OUTPUT`.
    tx.add(Nat, Output, counted("", &jump(IstioOutput)));
    // -o: ports never captured, TCP and UDP.
    for port in &cfg.outbound_exclude {
        for proto in ["tcp", "udp"] {
            tx.add(
                Nat,
                IstioOutput,
                counted(&format!("{proto} dport {}", nft_port(port)), "return"),
            );
        }
    }
    // The inbound passthrough (127.0.0.6, ::6) talking to the app.
    add_both(
        &mut tx,
        cfg,
        Nat,
        IstioOutput,
        [
            counted(&format!("oifname lo ip saddr {}", PASSTHROUGH.0), "return"),
            counted(&format!("oifname lo ip6 saddr {}", PASSTHROUGH.1), "return"),
        ],
    );
    owners(&mut tx, cfg);
    owner_groups(&mut tx, cfg);
    if let Some(dns_capture) = &cfg.dns {
        dns(&mut tx, cfg, dns_capture);
    }
    // Loopback destinations are never captured.
    add_both(
        &mut tx,
        cfg,
        Nat,
        IstioOutput,
        [
            counted(&format!("ip daddr {lo}"), "return"),
            counted(&format!("ip6 daddr {LOOPBACK_V6}"), "return"),
        ],
    );
    // -x: destinations never captured, before -q and -i.
    for cidr in &cfg.exclude.v4 {
        tx.add(
            Nat,
            IstioOutput,
            counted(&format!("ip daddr {cidr}"), "return"),
        );
    }
    if cfg.ipv6 {
        for cidr in &cfg.exclude.v6 {
            tx.add(
                Nat,
                IstioOutput,
                counted(&format!("ip6 daddr {cidr}"), "return"),
            );
        }
    }
    // -q: destination ports always captured.
    for port in &cfg.outbound_ports {
        tx.add(
            Nat,
            IstioOutput,
            counted(&format!("tcp dport {}", nft_port(port)), &jump(Redirect)),
        );
    }
    outbound_include(&mut tx, cfg);
    if cfg.tproxy {
        tproxy_tail(&mut tx, cfg);
    }
    tx
}

/// A rule Istio writes for both families (`AppendRule`, then
/// `AppendV6RuleIfSupported`): the IPv6 one only when IPv6 is on.
fn add_both(
    tx: &mut Transaction,
    cfg: &Capture,
    table: Table,
    chain: Chain,
    [v4, v6]: [String; 2],
) {
    tx.add(table, chain, v4);
    if cfg.ipv6 {
        tx.add(table, chain, v6);
    }
}

/// Inbound capture (-b, -d), with REDIRECT in nat or TPROXY in mangle.
fn inbound(tx: &mut Transaction, cfg: &Capture) {
    if cfg.inbound == InboundPorts::Off {
        return;
    }
    let mark = &cfg.tproxy_mark;
    let port = &cfg.inbound_port;
    let table = if cfg.tproxy {
        // ISTIO_DIVERT: mark the packets of established connections and
        // let them through to the local socket.
        tx.add(
            Mangle,
            Divert,
            counted("", &format!("meta mark set {mark}")),
        );
        tx.add(Mangle, Divert, counted("", "accept"));
        // ISTIO_TPROXY: new connections to the inbound port (-z), except to
        // loopback. Istio counts after the tproxy and mark statements.
        add_both(
            tx,
            cfg,
            Mangle,
            Tproxy,
            [
                counted(
                    &format!(
                        "meta l4proto tcp ip daddr != {} tproxy ip to :{port} meta mark set {mark}",
                        cfg.loopback
                    ),
                    "accept",
                ),
                counted(
                    &format!(
                        "meta l4proto tcp ip6 daddr != {LOOPBACK_V6} tproxy ip6 to :{port} meta mark set {mark}"
                    ),
                    "accept",
                ),
            ],
        );
        Mangle
    } else {
        Nat
    };
    tx.add(
        table,
        Prerouting,
        counted("meta l4proto tcp", &jump(Inbound)),
    );
    let established = "meta l4proto tcp ct state related,established";
    match &cfg.inbound {
        InboundPorts::Off => {}
        // -b '*': every port but -d's.
        InboundPorts::All => {
            for port in &cfg.inbound_exclude {
                tx.add(
                    table,
                    Inbound,
                    counted(
                        &format!("meta l4proto tcp tcp dport {}", nft_port(port)),
                        "return",
                    ),
                );
            }
            if cfg.tproxy {
                tx.add(Mangle, Inbound, counted(established, &jump(Divert)));
                tx.add(Mangle, Inbound, counted("meta l4proto tcp", &jump(Tproxy)));
            } else {
                tx.add(Nat, Inbound, counted("meta l4proto tcp", &jump(InRedirect)));
            }
        }
        // -b PORTS: these ports only.
        InboundPorts::List(ports) => {
            for port in ports {
                if cfg.tproxy {
                    tx.add(
                        Mangle,
                        Inbound,
                        counted(
                            &format!("{established} tcp dport {}", nft_port(port)),
                            &jump(Divert),
                        ),
                    );
                    tx.add(
                        Mangle,
                        Inbound,
                        counted(
                            &format!("meta l4proto tcp tcp dport {}", nft_port(port)),
                            &jump(Tproxy),
                        ),
                    );
                } else {
                    tx.add(
                        Nat,
                        Inbound,
                        counted(
                            &format!("meta l4proto tcp tcp dport {}", nft_port(port)),
                            &jump(InRedirect),
                        ),
                    );
                }
            }
        }
    }
}

/// The proxy's own traffic (-u, -g): its calls to the pod itself go
/// through the inbound path; everything else it sends is left alone.
fn owners(tx: &mut Transaction, cfg: &Capture) {
    let tun = &cfg.tunnel_port;
    let lo = &cfg.loopback;
    for (key, ids) in [("skuid", &cfg.proxy_uids), ("skgid", &cfg.proxy_gids)] {
        for id in ids {
            // With DNS capture the proxy's own DNS is not sent to inbound;
            // as in istio-iptables, only for UIDs.
            let dports = if cfg.dns.is_some() && key == "skuid" {
                format!("{{ 53, {tun} }}")
            } else {
                tun.to_string()
            };
            add_both(
                tx,
                cfg,
                Nat,
                IstioOutput,
                [("ip", lo.text.as_str()), ("ip6", LOOPBACK_V6)].map(|(ip, lo)| {
                    counted(
                        &format!(
                            "oifname lo meta l4proto tcp {ip} daddr != {lo} tcp dport != {dports} {key} {id}"
                        ),
                        &jump(InRedirect),
                    )
                }),
            );
            // Other users' traffic to the pod itself stays local, unless -i
            // lists a loopback network.
            if !cfg.include.has_loopback {
                let matches = if cfg.dns.is_some() {
                    format!("oifname lo meta l4proto tcp tcp dport != 53 {key} != {id}")
                } else {
                    format!("oifname lo {key} != {id}")
                };
                tx.add(Nat, IstioOutput, counted(&matches, "return"));
            }
            tx.add(Nat, IstioOutput, counted(&format!("{key} {id}"), "return"));
        }
    }
}

/// `ISTIO_OUTBOUND_OWNER_GROUPS` and `..._EXCLUDE`.
fn owner_groups(tx: &mut Transaction, cfg: &Capture) {
    match &cfg.owner_groups {
        OwnerGroups::Except(groups) => {
            for group in groups {
                tx.add(
                    Nat,
                    IstioOutput,
                    counted(&format!("skgid {group}"), "return"),
                );
            }
        }
        OwnerGroups::Only(groups) => {
            let none_of: Vec<String> = groups.iter().map(|g| format!("skgid != {g}")).collect();
            tx.add(Nat, IstioOutput, counted(&none_of.join(" "), "return"));
        }
    }
}

/// DNS capture to the proxy's DNS port, and conntrack zones that keep the
/// proxy's DNS and the app's apart.
fn dns(tx: &mut Transaction, cfg: &Capture, dns: &Dns) {
    let redirect = format!("redirect to :{DNS_PORT}");
    let v6 = if cfg.ipv6 { dns.v6.as_slice() } else { &[] };
    tx.add(Raw, Output, counted("", &jump(OutputDns)));
    tx.add(Nat, IstioOutput, counted("", &jump(OutputDns)));
    // To the resolv.conf servers (or, with --capture-all-dns, anywhere),
    // TCP then UDP.
    for proto in ["tcp", "udp"] {
        if dns.capture_all {
            // Istio matches the protocol first for TCP only.
            let matches = if proto == "tcp" {
                "meta l4proto tcp tcp dport 53"
            } else {
                "udp dport 53"
            };
            tx.add(Nat, OutputDns, counted(matches, &redirect));
            continue;
        }
        for server in &dns.v4 {
            tx.add(
                Nat,
                OutputDns,
                counted(&format!("ip daddr {server}/32 {proto} dport 53"), &redirect),
            );
        }
        for server in v6 {
            tx.add(
                Nat,
                OutputDns,
                counted(
                    &format!("ip6 daddr {server}/128 {proto} dport 53"),
                    &redirect,
                ),
            );
        }
    }
    // The proxy's queries upstream in zone 1, its answers to the app in 2.
    for (key, ids) in [("skuid", &cfg.proxy_uids), ("skgid", &cfg.proxy_gids)] {
        for id in ids {
            tx.add(
                Raw,
                OutputDns,
                counted(&format!("udp dport 53 meta {key} {id}"), "ct zone set 1"),
            );
            tx.add(
                Raw,
                OutputDns,
                counted(
                    &format!("udp sport {DNS_PORT} meta {key} {id}"),
                    "ct zone set 2",
                ),
            );
        }
    }
    // The app's queries in zone 2, the servers' answers in zone 1.
    if dns.capture_all {
        tx.add(Raw, Prerouting, counted("", &jump(Inbound)));
        tx.add(Raw, OutputDns, counted("udp dport 53", "ct zone set 2"));
        tx.add(Raw, Inbound, counted("udp sport 53", "ct zone set 1"));
        return;
    }
    // Istio counts the IPv6 servers here even with IPv6 off.
    if !dns.v4.is_empty() || !dns.v6.is_empty() {
        tx.add(Raw, Prerouting, counted("", &jump(Inbound)));
    }
    let servers = dns.v4.iter().map(|s| ("ip", s, "/32"));
    for (ip, server, bits) in servers.chain(v6.iter().map(|s| ("ip6", s, "/128"))) {
        tx.add(
            Raw,
            OutputDns,
            counted(
                &format!("udp dport 53 {ip} daddr {server}{bits}"),
                "ct zone set 2",
            ),
        );
        tx.add(
            Raw,
            Inbound,
            counted(
                &format!("udp sport 53 {ip} saddr {server}{bits}"),
                "ct zone set 1",
            ),
        );
    }
}

/// -i: the destinations whose traffic goes to the proxy, also when it comes
/// in on a kube virt interface (-k).
fn outbound_include(tx: &mut Transaction, cfg: &Capture) {
    let redirect = jump(Redirect);
    if cfg.include.wildcard {
        tx.add(Nat, IstioOutput, counted("", &redirect));
        for nic in &cfg.kube_virt_interfaces {
            tx.insert(
                Nat,
                Prerouting,
                0,
                counted(&format!("iifname {nic}"), &redirect),
            );
        }
        return;
    }
    let v6 = if cfg.ipv6 {
        cfg.include.v6.as_slice()
    } else {
        &[]
    };
    let cidrs = cfg.include.v4.iter().map(|c| ("ip", c));
    for (ip, cidr) in cidrs.chain(v6.iter().map(|c| ("ip6", c))) {
        for nic in &cfg.kube_virt_interfaces {
            tx.insert(
                Nat,
                Prerouting,
                0,
                counted(&format!("iifname {nic} {ip} daddr {cidr}"), &redirect),
            );
        }
        tx.add(
            Nat,
            IstioOutput,
            counted(&format!("{ip} daddr {cidr}"), &redirect),
        );
    }
}

/// TPROXY's marks and connmark bookkeeping.
fn tproxy_tail(tx: &mut Transaction, cfg: &Capture) {
    let mark = &cfg.tproxy_mark;
    // Save the mark the proxy's original_src listener set as the
    // connection's mark.
    tx.add(
        Mangle,
        Prerouting,
        counted(&format!("meta l4proto tcp mark {mark}"), "ct mark set mark"),
    );
    // Proxy -> app traffic already marked is not marked again.
    tx.add(
        Mangle,
        Output,
        counted(
            &format!("oifname lo meta l4proto tcp mark {mark}"),
            "return",
        ),
    );
    // The proxy's outbound calls back into the pod: mark 1338.
    for (key, ids) in [("skuid", &cfg.proxy_uids), ("skgid", &cfg.proxy_gids)] {
        for id in ids {
            add_both(
                tx,
                cfg,
                Mangle,
                Output,
                [("ip", cfg.loopback.text.as_str()), ("ip6", LOOPBACK_V6)].map(|(ip, lo)| {
                    counted(
                        &format!("oifname lo meta l4proto tcp {ip} daddr != {lo} {key} {id}"),
                        &format!("meta mark set {OUTBOUND_MARK}"),
                    )
                }),
            );
        }
    }
    // Replies of TPROXY'd connections follow TPROXY's policy route.
    tx.add(
        Mangle,
        Output,
        counted(
            &format!("meta l4proto tcp ct mark {mark}"),
            "meta mark set ct mark",
        ),
    );
    // At the head of mangle's istio-inbound (istio-iptables' `-I
    // ISTIO_INBOUND 1..3`, here 0-based): no infinite redirect, and no
    // capture of the passthrough or of the app calling itself.
    tx.insert(
        Mangle,
        Inbound,
        0,
        counted(&format!("meta l4proto tcp mark {mark}"), "return"),
    );
    tx.insert(
        Mangle,
        Inbound,
        1,
        counted(
            &format!("iifname lo meta l4proto tcp ip saddr {}", PASSTHROUGH.0),
            "return",
        ),
    );
    if cfg.ipv6 {
        tx.insert(
            Mangle,
            Inbound,
            1,
            counted(
                &format!("iifname lo meta l4proto tcp ip6 saddr {}", PASSTHROUGH.1),
                "return",
            ),
        );
    }
    tx.insert(
        Mangle,
        Inbound,
        2,
        counted(
            &format!("iifname lo meta l4proto tcp mark != {OUTBOUND_MARK}"),
            "return",
        ),
    );
}
