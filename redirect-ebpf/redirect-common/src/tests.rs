//! Host tests of the capture decision, one per rule of Istio's default
//! `ISTIO_OUTPUT` chain that the decision mirrors.

use super::*;

fn ip(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_ne_bytes([a, b, c, d])
}

/// Istio's defaults: `-p 15001 -u 1337 -g 1337`, loopback 127.0.0.1/32.
fn istio_default() -> RedirectConfig {
    let mut cfg = RedirectConfig {
        abi_version: ABI_VERSION,
        proxy_port: 15001,
        log_level: 0,
        _pad: 0,
        loopback_addr: ip(127, 0, 0, 1),
        loopback_mask: ip(255, 255, 255, 255),
        uid_count: 1,
        gid_count: 1,
        proxy_uids: [0; MAX_OWNERS],
        proxy_gids: [0; MAX_OWNERS],
        inbound_port: 15006,
        tunnel_port: 15008,
        flags: CFG_INCLUDE_ALL,
        group_count: 0,
        lo_source: 0,
        dns_port: DNS_PROXY_PORT,
        dns_server_count: 0,
        dns_servers: [0; MAX_DNS_SERVERS],
        exclude_iface_count: 0,
        exclude_ifindex: [0; MAX_EXCLUDE_IFACES],
        lo_source6: [0; 4],
        dns_server6_count: 0,
        dns_servers6: [[0; 4]; MAX_DNS_SERVERS],
        virt_iface_count: 0,
        virt_ifaces: [VirtIface::default(); MAX_VIRT_IFACES],
    };
    cfg.proxy_uids[0] = 1337;
    cfg.proxy_gids[0] = 1337;
    cfg
}

fn app(dst_ip: u32) -> ConnectInput {
    ConnectInput {
        sock_type: SOCK_STREAM,
        uid: 1000,
        gid: 1000,
        dst_ip,
        dst_port: 80,
        src_ip: 0,
        dev_lo: false,
        bound_dev: 0,
        pod: INSTANCE_POD,
    }
}

/// Map contents: ports with flags, CIDRs as (network, prefix), pod
/// addresses, routes as (network, prefix, source).
#[derive(Default)]
struct Sets {
    ports: Vec<(u16, u8)>,
    excluded: Vec<(u32, u32)>,
    included: Vec<(u32, u32)>,
    local: Vec<u32>,
    routes: Vec<(u32, u32, u32)>,
    /// Routes through an interface `-c` names, as (network, prefix).
    excluded_routes: Vec<(u32, u32)>,
    /// Port ranges (first, last, flags).
    ranges: Vec<(u16, u16, u8)>,
    groups: Vec<u32>,
}

fn in_cidrs(cidrs: &[(u32, u32)], ip: u32) -> bool {
    cidrs.iter().any(|&(net, len)| {
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        u32::from_be(ip) & mask == u32::from_be(net) & mask
    })
}

impl Lookups for Sets {
    fn port_flags(&self, port: u16) -> u8 {
        self.ports
            .iter()
            .filter(|(p, _)| *p == port)
            .map(|(_, f)| *f)
            .fold(0, |a, f| a | f)
    }
    fn range_flags(&self, port: u16) -> u8 {
        self.ranges
            .iter()
            .filter(|(a, b, _)| (*a..=*b).contains(&port))
            .fold(0, |acc, (_, _, f)| acc | f)
    }
    fn owner_group(&self, gid: u32) -> bool {
        self.groups.contains(&gid)
    }
    fn excluded(&self, ip: u32) -> bool {
        in_cidrs(&self.excluded, ip)
    }
    fn included(&self, ip: u32) -> bool {
        in_cidrs(&self.included, ip)
    }
    fn pod_address(&self, ip: u32) -> bool {
        self.local.contains(&ip)
    }
    fn route_source(&self, ip: u32) -> Option<u32> {
        self.routes
            .iter()
            .filter(|&&(net, len, _)| in_cidrs(&[(net, len)], ip))
            .max_by_key(|&&(_, len, _)| len)
            .map(|&(_, _, src)| src)
    }
    fn route_excluded(&self, ip: u32) -> bool {
        in_cidrs(&self.excluded_routes, ip)
    }
}

fn decide(input: &ConnectInput, cfg: &RedirectConfig) -> Verdict {
    decide_connect(input, cfg, &Sets::default())
}

const REDIRECTED: Verdict = Verdict::Redirect {
    port: 15001,
    counter: Counter::Redirected,
};

#[test]
fn app_traffic_is_redirected_to_the_proxy_port() {
    assert_eq!(decide(&app(ip(10, 0, 0, 2)), &istio_default()), REDIRECTED);
}

#[test]
fn proxy_uid_escapes_the_loop() {
    let input = ConnectInput {
        uid: 1337,
        ..app(ip(10, 0, 0, 2))
    };
    assert_eq!(
        decide(&input, &istio_default()),
        Verdict::Bypass(Counter::BypassUid)
    );
}

#[test]
fn proxy_gid_escapes_the_loop_with_any_uid() {
    let input = ConnectInput {
        uid: 4242,
        gid: 1337,
        ..app(ip(10, 0, 0, 2))
    };
    assert_eq!(
        decide(&input, &istio_default()),
        Verdict::Bypass(Counter::BypassGid)
    );
}

#[test]
fn uid_rule_is_checked_before_gid_rule() {
    let input = ConnectInput {
        uid: 1337,
        gid: 1337,
        ..app(ip(10, 0, 0, 2))
    };
    assert_eq!(
        decide(&input, &istio_default()),
        Verdict::Bypass(Counter::BypassUid)
    );
}

#[test]
fn local_traffic_of_other_owners_is_not_captured() {
    // `-o lo -m owner ! --uid-owner 1337 -j RETURN`: every loopback address,
    // and the pod's own address, is reached through lo.
    for dst in [ip(127, 0, 0, 1), ip(127, 0, 0, 6), ip(10, 0, 0, 5)] {
        let sets = Sets {
            local: vec![ip(10, 0, 0, 5)],
            ..Sets::default()
        };
        assert_eq!(
            decide_connect(&app(dst), &istio_default(), &sets),
            Verdict::Bypass(Counter::BypassLocal)
        );
    }
}

#[test]
fn loopback_destination_is_not_captured_when_loopback_is_included() {
    let mut cfg = istio_default();
    cfg.flags |= CFG_INCLUDE_LOOPBACK;
    assert_eq!(
        decide(&app(ip(127, 0, 0, 1)), &cfg),
        Verdict::Bypass(Counter::BypassLoopback)
    );
    // Only 127.0.0.1/32 by default, like Istio: other loopback addresses are captured.
    assert_eq!(decide(&app(ip(127, 0, 0, 6)), &cfg), REDIRECTED);
}

#[test]
fn wider_loopback_cidr_covers_the_whole_network() {
    let mut cfg = istio_default();
    cfg.flags |= CFG_INCLUDE_LOOPBACK;
    cfg.loopback_addr = ip(127, 0, 0, 0);
    cfg.loopback_mask = ip(255, 0, 0, 0);
    assert_eq!(
        decide(&app(ip(127, 1, 2, 3)), &cfg),
        Verdict::Bypass(Counter::BypassLoopback)
    );
}

#[test]
fn proxy_calls_to_its_own_pod_go_to_the_inbound_port() {
    let sets = Sets {
        local: vec![ip(10, 0, 0, 5)],
        ..Sets::default()
    };
    let proxy = ConnectInput {
        uid: 1337,
        ..app(ip(10, 0, 0, 5))
    };
    assert_eq!(
        decide_connect(&proxy, &istio_default(), &sets),
        Verdict::Redirect {
            port: 15006,
            counter: Counter::Hairpin
        }
    );
    // Not to the tunnel port, and not to the loopback CIDR.
    let tunnel = ConnectInput {
        dst_port: 15008,
        ..proxy
    };
    assert_eq!(
        decide_connect(&tunnel, &istio_default(), &sets),
        Verdict::Bypass(Counter::BypassUid)
    );
    let lo = ConnectInput {
        dst_ip: ip(127, 0, 0, 1),
        ..proxy
    };
    assert_eq!(
        decide_connect(&lo, &istio_default(), &sets),
        Verdict::Bypass(Counter::BypassUid)
    );
}

#[test]
fn inbound_passthrough_source_is_not_captured() {
    let input = ConnectInput {
        src_ip: PASSTHROUGH_SRC,
        ..app(ip(127, 0, 0, 9))
    };
    assert_eq!(
        decide(&input, &istio_default()),
        Verdict::Bypass(Counter::BypassPassthrough)
    );
    // Only on lo: bound to 127.0.0.6 but leaving the pod is captured.
    let out = ConnectInput {
        src_ip: PASSTHROUGH_SRC,
        ..app(ip(10, 0, 0, 2))
    };
    assert_eq!(decide(&out, &istio_default()), REDIRECTED);
}

#[test]
fn excluded_ports_come_first_included_ports_beat_missing_cidrs() {
    let sets = Sets {
        ports: vec![(22, PORT_EXCLUDE), (80, PORT_INCLUDE)],
        ..Sets::default()
    };
    let proxy_ssh = ConnectInput {
        uid: 1337,
        dst_port: 22,
        ..app(ip(10, 0, 0, 2))
    };
    assert_eq!(
        decide_connect(&proxy_ssh, &istio_default(), &sets),
        Verdict::Bypass(Counter::BypassPort)
    );
    let mut cfg = istio_default();
    cfg.flags = 0; // no -i
    assert_eq!(
        decide_connect(&app(ip(10, 0, 0, 2)), &cfg, &sets),
        REDIRECTED
    );
    let other_port = ConnectInput {
        dst_port: 81,
        ..app(ip(10, 0, 0, 2))
    };
    assert_eq!(
        decide_connect(&other_port, &cfg, &sets),
        Verdict::Bypass(Counter::NotIncluded)
    );
}

#[test]
fn excluded_cidrs_win_over_included_cidrs() {
    let sets = Sets {
        excluded: vec![(ip(10, 1, 0, 0), 16)],
        included: vec![(ip(10, 0, 0, 0), 8)],
        ..Sets::default()
    };
    let mut cfg = istio_default();
    cfg.flags = 0;
    let decide_to = |dst| decide_connect(&app(dst), &cfg, &sets);
    assert_eq!(
        decide_to(ip(10, 1, 2, 3)),
        Verdict::Bypass(Counter::BypassCidr)
    );
    assert_eq!(decide_to(ip(10, 2, 2, 3)), REDIRECTED);
    assert_eq!(
        decide_to(ip(192, 168, 0, 1)),
        Verdict::Bypass(Counter::NotIncluded)
    );
}

#[test]
fn owner_groups_select_or_exempt_callers() {
    // Istio's limit, 64 groups, the caller's last.
    let sets = Sets {
        groups: (5000..5063).chain([1000]).collect(),
        ..Sets::default()
    };
    let mut cfg = istio_default();
    cfg.group_count = 64;
    let decide = |input: &ConnectInput, cfg: &RedirectConfig| decide_connect(input, cfg, &sets);
    assert_eq!(
        decide(&app(ip(10, 0, 0, 2)), &cfg),
        Verdict::Bypass(Counter::BypassGroup),
        "exclude list"
    );
    cfg.flags |= CFG_GROUPS_ONLY;
    assert_eq!(decide(&app(ip(10, 0, 0, 2)), &cfg), REDIRECTED);
    let other = ConnectInput {
        gid: 2000,
        ..app(ip(10, 0, 0, 2))
    };
    assert_eq!(
        decide(&other, &cfg),
        Verdict::Bypass(Counter::BypassGroup),
        "include list"
    );
    // No groups configured: the set is not consulted.
    cfg.group_count = 0;
    cfg.flags &= !CFG_GROUPS_ONLY;
    assert_eq!(decide(&app(ip(10, 0, 0, 2)), &cfg), REDIRECTED);
}

#[test]
fn port_ranges_count_only_when_the_configuration_has_them() {
    let sets = Sets {
        ports: vec![(8080, PORT_INCLUDE)],
        ranges: vec![(8000, 8099, PORT_EXCLUDE), (9000, 9999, PORT_INCLUDE)],
        ..Sets::default()
    };
    let mut cfg = istio_default();
    let to = |port: u16, cfg: &RedirectConfig| {
        let input = ConnectInput {
            dst_port: port,
            ..app(ip(10, 0, 0, 2))
        };
        decide_connect(&input, cfg, &sets)
    };
    cfg.flags = CFG_PORT_RANGES; // -i '' : only -q ports are captured
    // -o 8000:8099 comes first in the chain, even for a -q port in it.
    assert_eq!(to(8080, &cfg), Verdict::Bypass(Counter::BypassPort));
    assert_eq!(to(8100, &cfg), Verdict::Bypass(Counter::NotIncluded));
    assert_eq!(to(9999, &cfg), REDIRECTED);
    cfg.flags = 0;
    assert_eq!(to(9999, &cfg), Verdict::Bypass(Counter::NotIncluded));
    assert_eq!(to(8080, &cfg), REDIRECTED);
}

#[test]
fn non_tcp_sockets_are_never_captured() {
    let input = ConnectInput {
        sock_type: 2, // SOCK_DGRAM
        ..app(ip(10, 0, 0, 2))
    };
    assert_eq!(
        decide(&input, &istio_default()),
        Verdict::Bypass(Counter::NotTcp)
    );
}

#[test]
fn only_the_first_count_owner_entries_are_consulted() {
    let mut cfg = istio_default();
    cfg.proxy_uids = [1337, 0, 0, 0, 0, 0, 0, 77];
    cfg.uid_count = 1;
    let root = ConnectInput {
        uid: 0,
        ..app(ip(10, 0, 0, 2))
    };
    assert_eq!(decide(&root, &cfg), REDIRECTED);
    cfg.uid_count = 8;
    let last = ConnectInput {
        uid: 77,
        ..app(ip(10, 0, 0, 2))
    };
    assert_eq!(decide(&last, &cfg), Verdict::Bypass(Counter::BypassUid));
}

#[test]
fn empty_owner_sets_exempt_nobody() {
    let mut cfg = istio_default();
    cfg.uid_count = 0;
    cfg.gid_count = 0;
    let input = ConnectInput {
        uid: 1337,
        gid: 1337,
        ..app(ip(10, 0, 0, 2))
    };
    assert_eq!(decide(&input, &cfg), REDIRECTED);
}

#[test]
fn tuples_from_both_sides_of_a_connection_agree() {
    let lo = to_v4_mapped(ip(127, 0, 0, 1));
    let app_side = tuple_from_client_side(3, lo, 40000, lo, 15001);
    let proxy_side = tuple_from_server_side(3, lo, 15001, lo, 40000);
    assert_eq!(app_side, proxy_side);
    // Another pod's connection with the same addresses is another record.
    assert_ne!(app_side, tuple_from_server_side(4, lo, 15001, lo, 40000));
}

#[test]
fn counter_table_is_complete_and_ordered() {
    for (i, c) in Counter::ALL.iter().enumerate() {
        assert_eq!(*c as usize, i, "{} is out of order", c.name());
    }
}

#[test]
fn only_so_original_dst_is_answered() {
    assert_eq!(
        classify_getsockopt(SOL_IP, SO_ORIGINAL_DST),
        SockoptAction::AnswerOriginalDst
    );
    // SO_RCVBUF (SOL_SOCKET=1, 8), TCP_INFO (SOL_TCP=6, 11) and
    // iptables-legacy's IPT_SO_GET_ENTRIES (SOL_IP, 65) are not ours.
    assert_eq!(classify_getsockopt(1, 8), SockoptAction::PassThrough);
    assert_eq!(classify_getsockopt(6, 11), SockoptAction::PassThrough);
    assert_eq!(classify_getsockopt(SOL_IP, 65), SockoptAction::PassThrough);
    assert_eq!(
        classify_getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST),
        SockoptAction::AnswerOriginalDst6
    );
    // Same option number at another level is not SO_ORIGINAL_DST.
    assert_eq!(
        classify_getsockopt(6, SO_ORIGINAL_DST),
        SockoptAction::PassThrough
    );
}

#[test]
fn a_pass_through_leaves_an_earlier_answer_alone() {
    // Another program (or the kernel) answered 16 bytes successfully:
    // leave optlen and retval as found, so that answer reaches the caller.
    assert_eq!(pass_through_optlen(0, 16), None);
    assert_eq!(pass_through_optlen(0, SOCKOPT_PAGE), None);
    // Longer than the program's page: optlen 0 keeps the kernel's answer
    // (anything else is EFAULT before 6.5).
    assert_eq!(pass_through_optlen(0, SOCKOPT_PAGE + 1), Some(0));
    // A failing call: optlen 0 keeps the caller's buffer untouched.
    assert_eq!(pass_through_optlen(-2, 16), Some(0));
}

#[test]
fn slot_keys_never_meet() {
    let a = ip(10, 0, 0, 1);
    assert_ne!(port_key(0, 80), port_key(1, 80));
    assert_eq!(port_key(1, 80) & 0xffff, 80);
    assert_ne!(slot_key(0, a), slot_key(1, a));
    assert_eq!(key_slot(&cidr_key(1, a)), 1);
    assert_eq!(&cidr_key(1, a)[2..6], &[10, 0, 0, 1]);
    let last = pod_slot(MAX_PODS - 1, 1);
    assert_eq!(key_slot(&cidr_key(last, a)), last);
    assert_eq!(key_slot(&cidr6_key(last, Ip6::LOOPBACK)), last);
    assert_eq!(key_slot(&port_range_key(last, 80)), last);
    assert_ne!(port_key(last, 80), port_key(last - 1, 80));
}

#[test]
fn each_pod_has_two_slots_of_its_own() {
    for pod in [0, 1, 7, MAX_PODS - 1] {
        for which in [0, 1] {
            let slot = pod_slot(pod, which);
            assert!(slot_of_pod(slot, pod));
            assert!(!slot_of_pod(slot, pod + 1));
            assert!(slot_of_pod(spare_slot(slot), pod));
            assert_ne!(spare_slot(slot), slot);
        }
        assert_eq!(
            counter_index(pod, COUNTER_COUNT - 1) + 1,
            counter_index(pod + 1, 0)
        );
        assert_eq!(
            listener_index(pod, LISTENER_SLOTS - 1) + 1,
            listener_index(pod + 1, 0)
        );
        assert_ne!(in_hits_key(pod, 80), in_hits_key(pod + 1, 80));
    }
    // A slot (and so a CIDR key's) fits the 16 bits the keys give it.
    assert!(pod_slot(MAX_PODS - 1, 1) <= u32::from(u16::MAX));
}

#[test]
fn the_lru_headroom_covers_every_cpus_local_free_list() {
    assert_eq!(lru_entries(256, 2), 512);
    assert_eq!(lru_entries(65536, 4), 65536 + 512);
    assert_eq!(lru_entries(u32::MAX, 8), u32::MAX, "saturates");
}

#[test]
fn answers_keep_the_callers_length_like_conntrack() {
    for len in [SOCKADDR_IN_LEN, SOCKADDR_IN6_LEN] {
        assert_eq!(
            answer_optlen(128, len),
            128,
            "Envoy passes sizeof(sockaddr_storage)"
        );
        assert_eq!(answer_optlen(len, len), len);
        assert_eq!(
            answer_optlen(9000, len),
            len,
            "longer than the program's page"
        );
        assert_eq!(answer_optlen(8, len), len);
    }
}

#[test]
fn sockaddr_in_layout_matches_the_kernel() {
    let orig = OrigDst::new(to_v4_mapped(ip(198, 18, 0, 2)), 8080, 15001);
    let bytes = sockaddr_in(&orig);
    assert_eq!(
        u16::from_ne_bytes([bytes[0], bytes[1]]),
        2,
        "AF_INET in host order"
    );
    assert_eq!(&bytes[2..4], &[0x1f, 0x90], "port 8080 in network order");
    assert_eq!(&bytes[4..8], &[198, 18, 0, 2]);
    assert_eq!(&bytes[8..], &[0; 8]);
}

#[test]
fn sockaddr_in6_layout_matches_the_kernel() {
    let addr: std::net::Ipv6Addr = "fd00:198:18::2".parse().unwrap();
    let orig = OrigDst::new(Ip6::from_octets(addr.octets()).0, 8080, 15001);
    let words = sockaddr_in6(&orig);
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    assert_eq!(bytes.len(), SOCKADDR_IN6_LEN as usize);
    assert_eq!(u16::from_ne_bytes([bytes[0], bytes[1]]), 10, "AF_INET6");
    assert_eq!(&bytes[2..4], &[0x1f, 0x90], "port 8080 in network order");
    assert_eq!(&bytes[4..8], &[0; 4], "flow info");
    assert_eq!(&bytes[8..24], &addr.octets());
    assert_eq!(&bytes[24..], &[0; 4], "scope id");
}

#[test]
fn only_v4_mapped_ipv6_addresses_are_ipv4() {
    let mapped = to_v4_mapped(ip(198, 18, 0, 2));
    assert_eq!(v4_mapped(&mapped), Some(ip(198, 18, 0, 2)));
    // ::1 and 2001:db8::1 are real IPv6.
    assert_eq!(
        v4_mapped(&[0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]),
        None
    );
    assert_eq!(
        v4_mapped(&[u32::from_ne_bytes([0x20, 0x01, 0x0d, 0xb8]), 0, 0, 1]),
        None
    );
}

/// `-b '*'` (or a list) on top of Istio's defaults, REDIRECT mode.
fn inbound(flags: u32) -> RedirectConfig {
    RedirectConfig {
        flags: CFG_INCLUDE_ALL | CFG_INBOUND | flags,
        ..istio_default()
    }
}

fn from_peer(dst_port: u16) -> InboundInput {
    InboundInput {
        src_ip: ip(198, 18, 0, 2),
        dst_port,
        ifindex: 2,
    }
}

fn inbound_sets(ports: &[(u16, u8)]) -> Sets {
    Sets {
        ports: ports.to_vec(),
        local: vec![ip(198, 18, 0, 1)],
        ..Sets::default()
    }
}

#[test]
fn wildcard_inbound_captures_every_port_but_tunnel_and_excluded() {
    // -b '*' -d 15090,15021
    let cfg = inbound(CFG_INBOUND_ALL);
    let sets = inbound_sets(&[(15090, PORT_IN_EXCLUDE), (15021, PORT_IN_EXCLUDE)]);
    let decide = |port| decide_inbound(&from_peer(port), &cfg, &sets);
    assert_eq!(decide(9080), InboundVerdict::Capture);
    assert_eq!(decide(15006), InboundVerdict::Capture);
    assert_eq!(
        decide(15008),
        InboundVerdict::Bypass(Counter::InboundBypassTunnel)
    );
    assert_eq!(
        decide(15090),
        InboundVerdict::Bypass(Counter::InboundBypassPort)
    );
    assert_eq!(
        decide(15021),
        InboundVerdict::Bypass(Counter::InboundBypassPort)
    );
}

#[test]
fn listed_inbound_ports_are_the_only_ones_captured_and_ignore_exclusions() {
    // -b 9080,9090 -d 9090: Istio ignores -d for a list.
    let cfg = inbound(0);
    let sets = inbound_sets(&[
        (9080, PORT_IN_INCLUDE),
        (9090, PORT_IN_INCLUDE | PORT_IN_EXCLUDE),
    ]);
    let decide = |port| decide_inbound(&from_peer(port), &cfg, &sets);
    assert_eq!(decide(9080), InboundVerdict::Capture);
    assert_eq!(decide(9090), InboundVerdict::Capture);
    assert_eq!(
        decide(9091),
        InboundVerdict::Bypass(Counter::InboundNotIncluded)
    );
    // Outbound port flags do not make an inbound port captured.
    let sets = inbound_sets(&[(9091, PORT_INCLUDE)]);
    assert_eq!(
        decide_inbound(&from_peer(9091), &cfg, &sets),
        InboundVerdict::Bypass(Counter::InboundNotIncluded)
    );
}

#[test]
fn the_tunnel_port_rule_wins_over_a_listed_port() {
    let cfg = inbound(0);
    let sets = inbound_sets(&[(15008, PORT_IN_INCLUDE)]);
    assert_eq!(
        decide_inbound(&from_peer(15008), &cfg, &sets),
        InboundVerdict::Bypass(Counter::InboundBypassTunnel)
    );
}

#[test]
fn connections_from_the_pod_itself_are_not_inbound() {
    let cfg = inbound(CFG_INBOUND_ALL);
    let sets = inbound_sets(&[]);
    for src in [ip(127, 0, 0, 1), ip(127, 0, 0, 6), ip(198, 18, 0, 1)] {
        let input = InboundInput {
            src_ip: src,
            dst_port: 9080,
            ifindex: LOOPBACK_IFINDEX,
        };
        assert_eq!(
            decide_inbound(&input, &cfg, &sets),
            InboundVerdict::Bypass(Counter::InboundLocal)
        );
    }
}

#[test]
fn without_inbound_capture_nothing_is_captured() {
    let cfg = istio_default();
    let sets = inbound_sets(&[(9080, PORT_IN_INCLUDE)]);
    assert_eq!(
        decide_inbound(&from_peer(9080), &cfg, &sets),
        InboundVerdict::Bypass(Counter::InboundNotIncluded)
    );
}

/// A pod at 198.18.0.1/15 with a second interface 10.9.0.5/24 and a
/// default route through the first, as `ebpf::routes` reads it.
fn routed_pod() -> Sets {
    Sets {
        local: vec![ip(198, 18, 0, 1), ip(10, 9, 0, 5)],
        routes: vec![
            (0, 0, ip(198, 18, 0, 1)),
            (ip(198, 18, 0, 0), 15, ip(198, 18, 0, 1)),
            (ip(10, 9, 0, 0), 24, ip(10, 9, 0, 5)),
            (ip(198, 19, 255, 255), 32, 0),
            (ip(10, 9, 0, 255), 32, 0),
        ],
        ..Sets::default()
    }
}

#[test]
fn a_redirected_connect_keeps_the_source_its_route_gives() {
    let cfg = istio_default();
    let sets = routed_pod();
    let source = |input: &ConnectInput| redirect_source(input, &cfg, &sets);
    assert_eq!(
        source(&app(ip(8, 8, 8, 8))),
        Source::Bind(ip(198, 18, 0, 1))
    );
    assert_eq!(source(&app(ip(10, 9, 0, 7))), Source::Bind(ip(10, 9, 0, 5)));
    // The pod's own address: the local route's source is the address.
    assert_eq!(source(&app(ip(10, 9, 0, 5))), Source::Bind(ip(10, 9, 0, 5)));
    // Loopback destinations already leave from 127.0.0.1.
    assert_eq!(source(&app(ip(127, 0, 0, 9))), Source::Kernel);
    // A bound socket keeps its address.
    let bound = ConnectInput {
        src_ip: ip(198, 18, 0, 1),
        ..app(ip(8, 8, 8, 8))
    };
    assert_eq!(source(&bound), Source::Kernel);
}

#[test]
fn connects_the_kernel_refuses_before_nat_are_left_to_it() {
    let cfg = istio_default();
    let sets = routed_pod();
    let source = |input: &ConnectInput| redirect_source(input, &cfg, &sets);
    for dst in [
        ip(255, 255, 255, 255),
        ip(224, 0, 0, 1),
        ip(239, 1, 2, 3),
        ip(198, 19, 255, 255),
        ip(10, 9, 0, 255),
    ] {
        assert_eq!(source(&app(dst)), Source::Refused, "{dst:x}");
    }
    // UDP may send to (and connect to) multicast, by its route; the
    // limited broadcast address needs SO_BROADCAST, which no hook sees.
    let udp = |dst| ConnectInput {
        sock_type: SOCK_DGRAM,
        ..app(dst)
    };
    assert_eq!(
        source(&udp(ip(224, 0, 0, 1))),
        Source::Bind(ip(198, 18, 0, 1))
    );
    assert_eq!(
        source(&udp(ip(239, 1, 2, 3))),
        Source::Bind(ip(198, 18, 0, 1))
    );
    assert_eq!(source(&udp(ip(255, 255, 255, 255))), Source::Refused);
    // A bound socket sends to a group out of its address's device, with
    // or without a route.
    let unrouted = Sets {
        routes: vec![(ip(198, 18, 0, 0), 15, ip(198, 18, 0, 1))],
        ..routed_pod()
    };
    for src in [ip(198, 18, 0, 1), ip(127, 0, 0, 1)] {
        let bound_udp = ConnectInput {
            src_ip: src,
            ..udp(ip(239, 1, 2, 3))
        };
        assert_eq!(redirect_source(&bound_udp, &cfg, &unrouted), Source::Kernel);
    }
    assert_eq!(
        redirect_source(&udp(ip(239, 1, 2, 3)), &cfg, &unrouted),
        Source::Refused
    );
    // No route at all.
    let no_default = Sets {
        routes: vec![(ip(198, 18, 0, 0), 15, ip(198, 18, 0, 1))],
        ..routed_pod()
    };
    assert_eq!(
        redirect_source(&app(ip(8, 8, 8, 8)), &cfg, &no_default),
        Source::Refused
    );
    // A loopback source to the network: EINVAL; to the pod: fine.
    for src in [ip(127, 0, 0, 1), PASSTHROUGH_SRC] {
        let to = |dst| ConnectInput {
            src_ip: src,
            ..app(dst)
        };
        assert_eq!(source(&to(ip(8, 8, 8, 8))), Source::Refused);
        assert_eq!(source(&to(ip(198, 18, 0, 1))), Source::Kernel);
    }
}

#[test]
fn a_socket_bound_to_lo_is_local_traffic() {
    let cfg = RedirectConfig {
        lo_source: ip(198, 18, 0, 1),
        ..istio_default()
    };
    let sets = routed_pod();
    let on_lo = |uid, dst| ConnectInput {
        uid,
        dev_lo: true,
        ..app(dst)
    };
    // `-o lo -m owner ! --uid-owner 1337 -j RETURN`
    assert_eq!(
        decide_connect(&on_lo(1000, ip(8, 8, 8, 8)), &cfg, &sets),
        Verdict::Bypass(Counter::BypassLocal)
    );
    // `-o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT`
    assert_eq!(
        decide_connect(&on_lo(1337, ip(8, 8, 8, 8)), &cfg, &sets),
        Verdict::Redirect {
            port: 15006,
            counter: Counter::Hairpin
        }
    );
    assert_eq!(
        redirect_source(&on_lo(1337, ip(8, 8, 8, 8)), &cfg, &sets),
        Source::Bind(ip(198, 18, 0, 1))
    );
}

#[test]
fn connects_to_the_unspecified_address_are_loopback_connects() {
    let cfg = istio_default();
    let sets = routed_pod();
    // 127.0.0.1 for an unbound socket: `-o lo ... ! --uid-owner -j RETURN`.
    assert_eq!(
        decide_connect(&app(0), &cfg, &sets),
        Verdict::Bypass(Counter::BypassLocal)
    );
    // The bound address otherwise: the proxy's call reaches its own pod.
    let proxy_bound = ConnectInput {
        uid: 1337,
        src_ip: ip(198, 18, 0, 1),
        ..app(0)
    };
    assert_eq!(proxy_bound.effective_dst(), ip(198, 18, 0, 1));
    assert_eq!(
        decide_connect(&proxy_bound, &cfg, &sets),
        Verdict::Redirect {
            port: 15006,
            counter: Counter::Hairpin
        }
    );
}

// ---- DNS capture (`--redirect-dns`, `--capture-all-dns`) ----------------

/// Istio's sidecar defaults with `--redirect-dns` and the given nameservers.
fn with_dns(servers: &[u32]) -> RedirectConfig {
    let mut cfg = istio_default();
    cfg.flags |= CFG_DNS;
    cfg.dns_server_count = servers.len() as u16;
    cfg.dns_servers[..servers.len()].copy_from_slice(servers);
    cfg
}

fn dns_query(sock_type: u32, uid: u32, dst_ip: u32) -> ConnectInput {
    ConnectInput {
        sock_type,
        uid,
        gid: uid,
        dst_port: 53,
        ..app(dst_ip)
    }
}

const DNS_REDIRECTED: Verdict = Verdict::Redirect {
    port: DNS_PROXY_PORT,
    counter: Counter::DnsRedirected,
};

#[test]
fn dns_to_a_nameserver_goes_to_the_dns_port_over_udp_and_tcp() {
    let ns = ip(10, 96, 0, 10);
    let cfg = with_dns(&[ip(127, 0, 0, 53), ns]);
    for sock_type in [SOCK_DGRAM, SOCK_STREAM] {
        assert_eq!(
            decide(&dns_query(sock_type, 1000, ns), &cfg),
            DNS_REDIRECTED
        );
        // A local resolver too: the DNS forms of the `-o lo` rules let
        // other owners' UDP and TCP port 53 reach ISTIO_OUTPUT_DNS.
        let local = dns_query(sock_type, 1000, ip(127, 0, 0, 53));
        assert_eq!(decide(&local, &cfg), DNS_REDIRECTED, "{sock_type}");
    }
}

#[test]
fn dns_to_other_servers_is_captured_only_with_capture_all() {
    let other = ip(8, 8, 8, 8);
    let mut cfg = with_dns(&[ip(10, 96, 0, 10)]);
    // TCP to port 53 elsewhere is ordinary outbound traffic; UDP is not captured.
    assert_eq!(
        decide(&dns_query(SOCK_STREAM, 1000, other), &cfg),
        REDIRECTED
    );
    assert_eq!(
        decide(&dns_query(SOCK_DGRAM, 1000, other), &cfg),
        Verdict::Bypass(Counter::NotTcp)
    );
    cfg.flags |= CFG_DNS_ALL;
    for sock_type in [SOCK_DGRAM, SOCK_STREAM] {
        assert_eq!(
            decide(&dns_query(sock_type, 1000, other), &cfg),
            DNS_REDIRECTED
        );
    }
}

#[test]
fn dns_to_a_multicast_group_from_a_loopback_address_leaves_by_lo() {
    let mut cfg = with_dns(&[]);
    cfg.flags |= CFG_DNS_ALL;
    let group = ip(239, 1, 2, 3);
    let from = |src| ConnectInput {
        src_ip: src,
        ..dns_query(SOCK_DGRAM, 1000, group)
    };
    // -o lo -s 127.0.0.6/32 -j RETURN: the group is reached through `lo`.
    assert_eq!(
        decide(&from(PASSTHROUGH_SRC), &cfg),
        Verdict::Bypass(Counter::BypassPassthrough)
    );
    assert_eq!(decide(&from(ip(127, 0, 0, 1)), &cfg), DNS_REDIRECTED);
    assert_eq!(decide(&from(0), &cfg), DNS_REDIRECTED);
}

#[test]
fn the_proxys_own_dns_and_other_udp_are_left_alone() {
    let ns = ip(10, 96, 0, 10);
    let cfg = with_dns(&[ns]);
    assert_eq!(
        decide(&dns_query(SOCK_DGRAM, 1337, ns), &cfg),
        Verdict::Bypass(Counter::BypassUid)
    );
    let mut udp = dns_query(SOCK_DGRAM, 1000, ns);
    udp.dst_port = 54;
    assert_eq!(decide(&udp, &cfg), Verdict::Bypass(Counter::NotTcp));
    // Without --redirect-dns, UDP never enters the chain.
    assert_eq!(
        decide(&dns_query(SOCK_DGRAM, 1000, ns), &istio_default()),
        Verdict::Bypass(Counter::NotTcp)
    );
}

#[test]
fn with_dns_the_proxy_uids_tcp_dns_to_its_pod_is_not_hairpinned_but_its_gids_is() {
    let pod = ip(10, 0, 0, 1);
    let sets = Sets {
        local: vec![pod],
        ..Sets::default()
    };
    let cfg = with_dns(&[]);
    // -o lo ! -d 127.0.0.1/32 -p tcp -m multiport ! --dports 53,15008 --uid-owner 1337
    let by_uid = ConnectInput {
        gid: 4242,
        ..dns_query(SOCK_STREAM, 1337, pod)
    };
    assert_eq!(
        decide_connect(&by_uid, &cfg, &sets),
        Verdict::Bypass(Counter::BypassUid)
    );
    // -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 --gid-owner 1337
    let by_gid = ConnectInput {
        uid: 4242,
        gid: 1337,
        ..dns_query(SOCK_STREAM, 4242, pod)
    };
    assert_eq!(
        decide_connect(&by_gid, &cfg, &sets),
        Verdict::Redirect {
            port: 15006,
            counter: Counter::Hairpin
        }
    );
}

#[test]
fn excluded_ports_return_udp_dns_too() {
    let ns = ip(10, 96, 0, 10);
    let cfg = with_dns(&[ns]);
    let sets = Sets {
        ports: vec![(53, PORT_EXCLUDE)],
        ..Sets::default()
    };
    assert_eq!(
        decide_connect(&dns_query(SOCK_DGRAM, 1000, ns), &cfg, &sets),
        Verdict::Bypass(Counter::BypassPort)
    );
}

// ---- --profile legacy: Istio's first table -------------------------------

/// The legacy table's configuration: -p 15001 -u 1337, inbound to 15001.
fn legacy() -> RedirectConfig {
    let mut cfg = istio_default();
    cfg.flags = CFG_LEGACY | CFG_INCLUDE_ALL | CFG_INBOUND | CFG_INBOUND_ALL;
    cfg.gid_count = 0;
    cfg.inbound_port = 15001;
    cfg.tunnel_port = 0;
    cfg
}

#[test]
fn the_legacy_table_walks_its_four_rules_in_order() {
    let cfg = legacy();
    let pod = ip(10, 0, 0, 1);
    let sets = Sets {
        local: vec![pod],
        ..Sets::default()
    };
    let decide = |input: &ConnectInput| decide_connect(input, &cfg, &sets);
    let proxy = |dst| ConnectInput {
        uid: 1337,
        gid: 1337,
        ..app(dst)
    };
    const LOOPBACK_REDIRECTED: Verdict = Verdict::Redirect {
        port: 15001,
        counter: Counter::LoopbackRedirected,
    };
    // ! -d 127.0.0.1/32 -o lo -j ISTIO_REDIRECT: before the uid rule, for
    // every uid, from 127.0.0.6 too (no passthrough rule).
    for input in [
        app(pod),
        proxy(pod),
        app(ip(127, 0, 0, 6)),
        proxy(ip(127, 0, 0, 9)),
        ConnectInput {
            src_ip: PASSTHROUGH_SRC,
            ..proxy(pod)
        },
        ConnectInput {
            dev_lo: true,
            ..proxy(ip(10, 0, 0, 2))
        },
    ] {
        assert_eq!(decide(&input), LOOPBACK_REDIRECTED, "{input:?}");
    }
    // -m owner --uid-owner 1337 -j RETURN; not the gid.
    assert_eq!(
        decide(&proxy(ip(10, 0, 0, 2))),
        Verdict::Bypass(Counter::BypassUid)
    );
    let by_gid = ConnectInput {
        gid: 1337,
        ..app(ip(10, 0, 0, 2))
    };
    assert_eq!(decide(&by_gid), REDIRECTED);
    // -d 127.0.0.1/32 -j RETURN (0.0.0.0 is 127.0.0.1 by then).
    for dst in [ip(127, 0, 0, 1), 0] {
        assert_eq!(decide(&app(dst)), Verdict::Bypass(Counter::BypassLoopback));
    }
    assert_eq!(
        decide(&proxy(ip(127, 0, 0, 1))),
        Verdict::Bypass(Counter::BypassUid)
    );
    // -j ISTIO_REDIRECT, TCP only (-A OUTPUT -p tcp).
    assert_eq!(decide(&app(ip(10, 0, 0, 2))), REDIRECTED);
    let udp = ConnectInput {
        sock_type: SOCK_DGRAM,
        dst_port: 53,
        ..app(ip(10, 0, 0, 2))
    };
    assert_eq!(decide(&udp), Verdict::Bypass(Counter::NotTcp));
}

#[test]
fn the_legacy_table_captures_inbound_on_every_port() {
    let cfg = legacy();
    let sets = Sets::default();
    for port in [1, 80, 15001, 15008, 15090, 65535] {
        let input = InboundInput {
            src_ip: ip(10, 0, 0, 2),
            dst_port: port,
            ifindex: 2,
        };
        assert_eq!(
            decide_inbound(&input, &cfg, &sets),
            InboundVerdict::Capture,
            "{port}"
        );
    }
}

/// `-c nic2` (index 3): the interface rules come first.
fn excluding_nic2(flags: u32) -> RedirectConfig {
    let mut cfg = RedirectConfig {
        flags: flags | CFG_EXCLUDE_IFACES,
        exclude_iface_count: 1,
        ..istio_default()
    };
    cfg.exclude_ifindex[0] = 3;
    cfg
}

#[test]
fn nothing_leaving_through_an_excluded_interface_is_captured() {
    // `-A OUTPUT -o nic2 -j RETURN` before `-A OUTPUT -j ISTIO_OUTPUT`.
    let cfg = excluding_nic2(CFG_INCLUDE_ALL | CFG_DNS | CFG_DNS_ALL);
    let sets = Sets {
        local: vec![ip(198, 18, 0, 1)],
        excluded_routes: vec![(ip(192, 0, 2, 0), 24)],
        ..Sets::default()
    };
    let via_nic2 = app(ip(192, 0, 2, 2));
    let bypass = Verdict::Bypass(Counter::BypassInterface);
    assert_eq!(decide_connect(&via_nic2, &cfg, &sets), bypass);
    // Even DNS, and even the proxy's hairpin-free call: the rule is first.
    let dns = ConnectInput {
        sock_type: SOCK_DGRAM,
        dst_port: 53,
        ..via_nic2
    };
    assert_eq!(decide_connect(&dns, &cfg, &sets), bypass);
    // Other routes are decided as before.
    assert_eq!(
        decide_connect(&app(ip(10, 0, 0, 2)), &cfg, &sets),
        REDIRECTED
    );
    // A socket bound to nic2 leaves through it whatever the route.
    let bound = ConnectInput {
        bound_dev: 3,
        ..app(ip(10, 0, 0, 2))
    };
    assert_eq!(decide_connect(&bound, &cfg, &sets), bypass);
    // Bound to another device: its route is not consulted.
    let elsewhere = ConnectInput {
        bound_dev: 2,
        ..via_nic2
    };
    assert_eq!(decide_connect(&elsewhere, &cfg, &sets), REDIRECTED);
    // Local traffic leaves through lo, which `-c nic2` does not name: the
    // proxy's call to its pod still hairpins.
    let hairpin = ConnectInput {
        uid: 1337,
        gid: 1337,
        ..app(ip(198, 18, 0, 1))
    };
    assert_eq!(
        decide_connect(&hairpin, &cfg, &sets),
        Verdict::Redirect {
            port: 15006,
            counter: Counter::Hairpin
        }
    );
    // Without the flag the interface list is not consulted.
    let off = RedirectConfig {
        flags: CFG_INCLUDE_ALL,
        ..cfg
    };
    assert_eq!(decide_connect(&via_nic2, &off, &sets), REDIRECTED);
}

#[test]
fn excluding_lo_returns_every_local_connection() {
    let mut cfg = excluding_nic2(CFG_INCLUDE_ALL);
    cfg.exclude_ifindex[1] = LOOPBACK_IFINDEX;
    cfg.exclude_iface_count = 2;
    let sets = Sets {
        local: vec![ip(198, 18, 0, 1)],
        ..Sets::default()
    };
    let hairpin = ConnectInput {
        uid: 1337,
        gid: 1337,
        ..app(ip(198, 18, 0, 1))
    };
    assert_eq!(
        decide_connect(&hairpin, &cfg, &sets),
        Verdict::Bypass(Counter::BypassInterface)
    );
    let on_lo = ConnectInput {
        dev_lo: true,
        bound_dev: LOOPBACK_IFINDEX,
        ..app(ip(10, 0, 0, 2))
    };
    assert_eq!(
        decide_connect(&on_lo, &cfg, &sets),
        Verdict::Bypass(Counter::BypassInterface)
    );
}

#[test]
fn nothing_arriving_on_an_excluded_interface_is_captured() {
    // `-A PREROUTING -i nic2 -j RETURN` before `-A PREROUTING -p tcp -j ISTIO_INBOUND`.
    let cfg = excluding_nic2(CFG_INBOUND | CFG_INBOUND_ALL);
    let sets = inbound_sets(&[]);
    let on_nic2 = InboundInput {
        ifindex: 3,
        ..from_peer(9080)
    };
    assert_eq!(
        decide_inbound(&on_nic2, &cfg, &sets),
        InboundVerdict::Bypass(Counter::InboundBypassInterface)
    );
    assert_eq!(
        decide_inbound(&from_peer(9080), &cfg, &sets),
        InboundVerdict::Capture
    );
    // Where the interface is unknown (0), the other rules decide.
    let unknown = InboundInput {
        ifindex: 0,
        ..from_peer(9080)
    };
    assert_eq!(
        decide_inbound(&unknown, &cfg, &sets),
        InboundVerdict::Capture
    );
}

/// A small deterministic generator (xorshift64*) for the packing tests.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn connect_inputs_cross_the_global_function_unchanged() {
    let mut draw = Draw(0x9e37_79b9_7f4a_7c15);
    let edges = [0, 1, 2, u32::MAX, 0x7f00_0001, 0x0100_007f];
    for i in 0..20_000 {
        let pick = |d: &mut Draw| {
            if i % 3 == 0 {
                edges[(d.next() % edges.len() as u64) as usize]
            } else {
                d.next() as u32
            }
        };
        let bound_dev = if i % 5 == 0 {
            LOOPBACK_IFINDEX
        } else {
            pick(&mut draw)
        };
        let input = ConnectInput {
            // bpf_sock_addr.type: SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, ...
            sock_type: (draw.next() % 11) as u32,
            uid: pick(&mut draw),
            gid: pick(&mut draw),
            dst_ip: pick(&mut draw),
            dst_port: draw.next() as u16,
            src_ip: pick(&mut draw),
            dev_lo: bound_dev == LOOPBACK_IFINDEX,
            bound_dev,
            pod: (draw.next() % u64::from(MAX_PODS)) as u32,
        };
        let [owner, dst, src] = input.pack();
        assert_eq!(ConnectInput::<u32>::unpack(owner, dst, src), input);
        let words = |a: u32, b: u32| Ip6([a, b, a ^ b, b.rotate_left(7)]);
        let input6 = ConnectInput {
            // The type crosses in 4 bits, as in the IPv4 packing.
            sock_type: input.sock_type,
            uid: input.uid,
            gid: input.gid,
            dst_ip: words(input.dst_ip, input.uid),
            dst_port: input.dst_port,
            src_ip: words(input.src_ip, input.gid),
            dev_lo: input.dev_lo,
            bound_dev: input.bound_dev,
            pod: input.pod,
        };
        assert_eq!(
            ConnectInput::<Ip6>::unpack(owner, input6.pack()),
            input6,
            "{input6:?}"
        );
        // The IPv6 source's input: the slot in the port's bits, the rest
        // as packed.
        let slot = pod_slot(input.pod, draw.next() as u32);
        let [meta, dst_hi, dst_lo, src_hi, src_lo] = input6.pack();
        let meta = meta_with_slot(meta, slot);
        assert_eq!(slot_of_meta(meta), slot);
        assert_eq!(
            ConnectInput::<Ip6>::unpack(owner, [meta, dst_hi, dst_lo, src_hi, src_lo]),
            ConnectInput {
                dst_port: slot as u16,
                ..input6
            }
        );
    }
    // The owner word is bpf_get_current_uid_gid()'s own layout.
    let [owner, _, _] = app(ip(10, 0, 0, 1)).pack();
    assert_eq!(owner, 1000 << 32 | 1000);
}

#[test]
fn outcomes_cross_the_global_function_unchanged() {
    let mut draw = Draw(0x2545_f491_4f6c_dd1d);
    for counter in Counter::ALL {
        for _ in 0..500 {
            let outcome = Outcome {
                port: draw.next() as u16,
                counter: counter as u32,
                source: draw.next() as u32,
            };
            let level = draw.next() as u8;
            let packed = outcome.pack(level);
            assert_ne!(packed, OUTCOME_INACTIVE, "{outcome:?}");
            assert_eq!(Outcome::unpack(packed), Some((outcome, level)));
        }
    }
    assert_eq!(Outcome::unpack(OUTCOME_INACTIVE), None);
}

/// An [`Outcome`] with its counter named.
fn outcome(port: u16, counter: Counter, source: u32) -> Outcome {
    Outcome {
        port,
        counter: counter as u32,
        source,
    }
}

#[test]
fn an_outcome_carries_the_verdict_and_the_source() {
    let cfg = istio_default();
    let upstream = ip(10, 0, 0, 2);
    let routed = Sets {
        routes: vec![(ip(10, 0, 0, 0), 8, ip(10, 0, 0, 1))],
        ..Sets::default()
    };
    assert_eq!(
        decide_outcome(&app(upstream), &cfg, &routed),
        outcome(15001, Counter::Redirected, ip(10, 0, 0, 1))
    );
    // No route: the kernel fails the connect before any rule; left alone.
    assert_eq!(
        decide_outcome(&app(upstream), &cfg, &Sets::default()),
        outcome(0, Counter::KernelRefuses, 0)
    );
    let proxy = ConnectInput {
        uid: 1337,
        ..app(upstream)
    };
    assert_eq!(
        decide_outcome(&proxy, &cfg, &routed),
        outcome(0, Counter::BypassUid, 0)
    );
    // A socket bound already keeps its address: the kernel's choice.
    let bound = ConnectInput {
        src_ip: ip(10, 0, 0, 1),
        ..app(upstream)
    };
    assert_eq!(
        decide_outcome(&bound, &cfg, &routed),
        outcome(15001, Counter::Redirected, 0)
    );
}

/// IPv6 map contents: pod addresses, excluded and included networks as
/// (address, prefix), routes as (network, prefix, source).
#[derive(Default)]
struct Sets6 {
    local: Vec<Ip6>,
    excluded: Vec<(Ip6, u32)>,
    included: Vec<(Ip6, u32)>,
    routes: Vec<(Ip6, u32, Ip6)>,
}

fn ip6(text: &str) -> Ip6 {
    Ip6::from_octets(text.parse::<std::net::Ipv6Addr>().unwrap().octets())
}

fn in_net6(ip: Ip6, (net, len): (Ip6, u32)) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    u128::from_be_bytes(ip.octets()) & mask == u128::from_be_bytes(net.octets()) & mask
}

impl Lookups<Ip6> for Sets6 {
    fn port_flags(&self, _port: u16) -> u8 {
        0
    }
    fn range_flags(&self, _port: u16) -> u8 {
        0
    }
    fn owner_group(&self, _gid: u32) -> bool {
        false
    }
    fn excluded(&self, ip: Ip6) -> bool {
        self.excluded.iter().any(|n| in_net6(ip, *n))
    }
    fn included(&self, ip: Ip6) -> bool {
        self.included.iter().any(|n| in_net6(ip, *n))
    }
    fn pod_address(&self, ip: Ip6) -> bool {
        self.local.contains(&ip)
    }
    fn route_source(&self, ip: Ip6) -> Option<Ip6> {
        self.routes
            .iter()
            .filter(|(net, len, _)| in_net6(ip, (*net, *len)))
            .max_by_key(|(_, len, _)| *len)
            .map(|(_, _, src)| *src)
    }
    fn route_excluded(&self, _ip: Ip6) -> bool {
        false
    }
}

/// Istio's defaults with its IPv6 table.
fn istio_default6() -> RedirectConfig {
    RedirectConfig {
        flags: istio_default().flags | CFG_IPV6,
        ..istio_default()
    }
}

fn app6(dst: &str) -> ConnectInput<Ip6> {
    ConnectInput {
        sock_type: SOCK_STREAM,
        uid: 1000,
        gid: 1000,
        dst_ip: ip6(dst),
        dst_port: 80,
        src_ip: Ip6::UNSPECIFIED,
        dev_lo: false,
        bound_dev: 0,
        pod: INSTANCE_POD,
    }
}

/// A pod with `fd00::1` on a /64 and a default route.
fn pod6() -> Sets6 {
    Sets6 {
        local: vec![ip6("fd00::1")],
        routes: vec![
            (ip6("fd00::"), 64, ip6("fd00::1")),
            (ip6("::"), 0, ip6("fd00::1")),
        ],
        ..Sets6::default()
    }
}

fn outcome6(port: u16, counter: Counter, source: &str) -> Outcome<Ip6> {
    Outcome {
        port,
        counter: counter as u32,
        source: ip6(source),
    }
}

#[test]
fn ipv6_is_left_alone_without_istios_ipv6_table() {
    let out = decide_outcome(&app6("2001:db8::2"), &istio_default(), &pod6());
    assert_eq!(out, outcome6(0, Counter::NotIpv4, "::"));
    let legacy = RedirectConfig {
        flags: CFG_LEGACY | CFG_IPV6,
        ..istio_default()
    };
    assert_eq!(
        decide_connect(&app6("2001:db8::2"), &legacy, &pod6()),
        Verdict::Bypass(Counter::NotIpv4),
        "Istio's first script has no IPv6 table"
    );
}

#[test]
fn ipv6_app_traffic_goes_to_the_proxy_from_its_routes_source() {
    let cfg = istio_default6();
    assert_eq!(
        decide_outcome(&app6("2001:db8::2"), &cfg, &pod6()),
        outcome6(15001, Counter::Redirected, "fd00::1")
    );
    let proxy = ConnectInput {
        uid: 1337,
        ..app6("2001:db8::2")
    };
    assert_eq!(
        decide_outcome(&proxy, &cfg, &pod6()),
        outcome6(0, Counter::BypassUid, "::")
    );
}

/// The IPv6 source's global function gets the slot in the port's bits
/// (`meta_with_slot`) and asks no uid or gid: the source must depend on
/// neither the port nor the owner.
#[test]
fn the_source_of_a_redirect_does_not_depend_on_the_port_or_owner() {
    // Every branch of the source: with and without a source for sockets
    // bound to `lo`, TCP and UDP (multicast), bound to an address or not.
    let with_lo_source = RedirectConfig {
        lo_source6: ip6("fd00::1").0,
        ..istio_default6()
    };
    for cfg in [istio_default6(), with_lo_source] {
        for dst in ["2001:db8::2", "fd00::1", "fe80::1", "::1", "::", "ff02::1"] {
            for sock_type in [SOCK_STREAM, SOCK_DGRAM] {
                for src_ip in ["::", "fd00::1", "::1", "2001:db8::9"] {
                    for bound_dev in [0, LOOPBACK_IFINDEX, 7] {
                        let input = ConnectInput {
                            sock_type,
                            src_ip: ip6(src_ip),
                            bound_dev,
                            dev_lo: bound_dev == LOOPBACK_IFINDEX,
                            ..app6(dst)
                        };
                        let source = redirect_source(&input, &cfg, &pod6());
                        for dst_port in [0, 1, 53, 15001, 8191, u16::MAX] {
                            let other = ConnectInput { dst_port, ..input };
                            assert_eq!(redirect_source(&other, &cfg, &pod6()), source, "{other:?}");
                        }
                        for (uid, gid) in [(0, 0), (1337, 1000), (1000, 1337), (u32::MAX, 7)] {
                            let other = ConnectInput { uid, gid, ..input };
                            assert_eq!(redirect_source(&other, &cfg, &pod6()), source, "{other:?}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn ipv6_local_rules_use_the_ipv6_loopback_and_passthrough() {
    let cfg = istio_default6();
    // -o lo -m owner ! --uid-owner 1337 -j RETURN, for ::1 and the pod.
    for dst in ["::1", "::", "fd00::1"] {
        assert_eq!(
            decide_connect(&app6(dst), &cfg, &pod6()),
            Verdict::Bypass(Counter::BypassLocal),
            "{dst}"
        );
    }
    // -o lo ! -d ::1/128 ... --uid-owner 1337 -j ISTIO_IN_REDIRECT.
    let proxy = |dst: &str| ConnectInput {
        uid: 1337,
        ..app6(dst)
    };
    assert_eq!(
        decide_outcome(&proxy("fd00::1"), &cfg, &pod6()),
        outcome6(15006, Counter::Hairpin, "fd00::1")
    );
    assert_eq!(
        decide_connect(&proxy("::1"), &cfg, &pod6()),
        Verdict::Bypass(Counter::BypassUid)
    );
    // -o lo -s ::6/128 -j RETURN comes first.
    let passthrough = ConnectInput {
        src_ip: Ip6::PASSTHROUGH,
        ..proxy("fd00::1")
    };
    assert_eq!(
        decide_connect(&passthrough, &cfg, &pod6()),
        Verdict::Bypass(Counter::BypassPassthrough)
    );
    // 127.0.0.6 means nothing in the IPv6 table.
    assert!(
        !Ip6::from_octets(
            std::net::Ipv4Addr::new(127, 0, 0, 6)
                .to_ipv6_mapped()
                .octets()
        )
        .is_passthrough()
    );
}

#[test]
fn ipv6_cidrs_and_the_kernels_refusals() {
    let cfg = RedirectConfig {
        flags: CFG_IPV6,
        ..istio_default()
    };
    let sets = Sets6 {
        included: vec![(ip6("2001:db8::"), 32)],
        excluded: vec![(ip6("2001:db8:1::"), 48)],
        ..pod6()
    };
    assert_eq!(
        decide_connect(&app6("2001:db8::2"), &cfg, &sets),
        REDIRECTED
    );
    assert_eq!(
        decide_connect(&app6("2001:db8:1::2"), &cfg, &sets),
        Verdict::Bypass(Counter::BypassCidr)
    );
    assert_eq!(
        decide_connect(&app6("2001:db9::2"), &cfg, &sets),
        Verdict::Bypass(Counter::NotIncluded)
    );
    let all = istio_default6();
    // TCP to multicast: tcp_v6_connect's ENETUNREACH, before any rule.
    assert_eq!(
        decide_outcome(&app6("ff05::1"), &all, &pod6()),
        outcome6(0, Counter::KernelRefuses, "::")
    );
    // No route.
    assert_eq!(
        decide_outcome(&app6("2001:db8::2"), &all, &Sets6::default()),
        outcome6(0, Counter::KernelRefuses, "::")
    );
    // Link-local: the scope the hook cannot see decides.
    assert_eq!(
        decide_outcome(&app6("fe80::2"), &all, &pod6()),
        outcome6(0, Counter::LinkLocal, "::")
    );
}

#[test]
fn ipv6_dns_goes_to_the_dns_port_for_ipv6_nameservers() {
    let mut cfg = RedirectConfig {
        flags: CFG_IPV6 | CFG_DNS,
        dns_server6_count: 1,
        ..istio_default()
    };
    cfg.dns_servers6[0] = ip6("fd00::53").0;
    let dns = |dst: &str, sock_type: u32| ConnectInput {
        sock_type,
        dst_port: 53,
        ..app6(dst)
    };
    let to_dns = Verdict::Redirect {
        port: DNS_PROXY_PORT,
        counter: Counter::DnsRedirected,
    };
    for sock_type in [SOCK_DGRAM, SOCK_STREAM] {
        assert_eq!(
            decide_connect(&dns("fd00::53", sock_type), &cfg, &pod6()),
            to_dns
        );
        assert_ne!(
            decide_connect(&dns("fd00::54", sock_type), &cfg, &pod6()),
            to_dns
        );
    }
    let all = RedirectConfig {
        flags: CFG_IPV6 | CFG_DNS | CFG_DNS_ALL,
        ..cfg
    };
    assert_eq!(
        decide_connect(&dns("fd00::54", SOCK_DGRAM), &all, &pod6()),
        to_dns
    );
}

#[test]
fn ipv6_rules_see_the_source_the_kernel_picks() {
    let cfg = istio_default6();
    let pod = Sets6 {
        local: vec![ip6("fd00::1"), ip6("::6")],
        ..pod6()
    };
    // An unbound socket to ::6 leaves from ::6: `-o lo -s ::6/128 -j RETURN`.
    let proxy_gid = ConnectInput {
        uid: 4242,
        gid: 1337,
        ..app6("::6")
    };
    assert_eq!(
        decide_connect(&proxy_gid, &cfg, &pod),
        Verdict::Bypass(Counter::BypassPassthrough)
    );
    // IPv4's 127.0.0.6 is left from 127.0.0.1: the hairpin still applies.
    let v4 = ConnectInput {
        uid: 4242,
        gid: 1337,
        ..app(PASSTHROUGH_SRC)
    };
    assert_ne!(
        decide_connect(&v4, &istio_default(), &Sets::default()),
        Verdict::Bypass(Counter::BypassPassthrough)
    );
    // Link- and interface-local multicast need a scope, as link-local does.
    let udp = |dst: &str| ConnectInput {
        sock_type: SOCK_DGRAM,
        dst_port: 53,
        ..app6(dst)
    };
    let dns_all = RedirectConfig {
        flags: CFG_IPV6 | CFG_DNS | CFG_DNS_ALL,
        ..istio_default()
    };
    for dst in ["ff02::1", "ff01::1", "ff12::1", "fe80::1"] {
        assert_eq!(
            decide_outcome(&udp(dst), &dns_all, &pod),
            outcome6(0, Counter::LinkLocal, "::"),
            "{dst}"
        );
    }
    assert!(!ip6("ff05::1").needs_scope() && !ip6("fd00::1").needs_scope());
    // A socket bound to lo reaches no IPv6 network address where the
    // kernel gave no source for it at install.
    let lo_bound = ConnectInput {
        uid: 1337,
        dev_lo: true,
        bound_dev: LOOPBACK_IFINDEX,
        ..app6("2001:db8::2")
    };
    assert_eq!(
        decide_outcome(&lo_bound, &cfg, &pod),
        outcome6(0, Counter::KernelRefuses, "::")
    );
}

#[test]
fn sources_cross_their_global_function_unchanged() {
    for source in [
        Source::Kernel,
        Source::Bind(ip(10, 0, 0, 1)),
        Source::Bind(u32::MAX),
        Source::Refused,
        Source::LinkLocal,
    ] {
        assert_eq!(Source::unpack(source.pack()), source);
        let six = match source {
            Source::Bind(_) => Source::Bind(ip6("fd00::1")),
            Source::Kernel => Source::Kernel,
            Source::Refused => Source::Refused,
            Source::LinkLocal => Source::LinkLocal,
        };
        let addr = match six {
            Source::Bind(a) => a,
            _ => Ip6::UNSPECIFIED,
        };
        assert_eq!(Source::from_kind(six.kind(), addr), six);
    }
}

/// Istio's owner rules as istio-iptables writes them, walked one by one:
/// for each UID `X` the hairpin, `! --uid-owner X -j RETURN` and
/// `--uid-owner X -j RETURN`, then the same for each GID.
fn owner_rules_walked(cfg: &RedirectConfig, facts: OwnerFacts) -> OwnerMatch {
    let lists = [
        (
            &cfg.proxy_uids,
            cfg.uid_count,
            facts.uid,
            facts.hairpin_uid,
            OwnerMatch::ProxyUid,
        ),
        (
            &cfg.proxy_gids,
            cfg.gid_count,
            facts.gid,
            facts.hairpin_gid,
            OwnerMatch::ProxyGid,
        ),
    ];
    for (ids, count, id, hairpin, own) in lists {
        for &x in &ids[..count as usize] {
            if x == id && hairpin {
                return OwnerMatch::Hairpin;
            }
            if x != id && facts.return_others {
                return OwnerMatch::ReturnOthers;
            }
            if x == id {
                return own;
            }
        }
    }
    OwnerMatch::None
}

/// Every list of up to four owners from three ids, every owner and every
/// combination of the rules' conditions: `owner_match` (what the programs
/// run) meets the same rule first as the walk of the rules.
#[test]
fn owner_match_is_the_walk_of_istios_owner_rules() {
    let lists: Vec<([u32; MAX_OWNERS], u32)> = (0..81u32)
        .flat_map(|digits| {
            let mut ids = [0; MAX_OWNERS];
            for (i, id) in ids.iter_mut().take(4).enumerate() {
                *id = 1 + digits / 3u32.pow(i as u32) % 3;
            }
            (0..=4).map(move |count| (ids, count))
        })
        .collect();
    let gid_lists = [
        ([0; MAX_OWNERS], 0),
        ([1; MAX_OWNERS], 1),
        ([2; MAX_OWNERS], 1),
        ([2, 1, 0, 0, 0, 0, 0, 0], 2),
        ([3, 2, 1, 1, 1, 1, 1, 1], MAX_OWNERS as u32),
    ];
    let mut checked = 0u32;
    for &(uids, uid_count) in &lists {
        for &(gids, gid_count) in &gid_lists {
            let mut cfg = istio_default();
            (cfg.proxy_uids, cfg.uid_count) = (uids, uid_count);
            (cfg.proxy_gids, cfg.gid_count) = (gids, gid_count);
            for (uid, gid, conditions) in
                (1..=4).flat_map(|u| (1..=4).flat_map(move |g| (0..8u8).map(move |c| (u, g, c))))
            {
                let facts = OwnerFacts {
                    uid,
                    gid,
                    hairpin_uid: conditions & 1 != 0,
                    hairpin_gid: conditions & 2 != 0,
                    return_others: conditions & 4 != 0,
                };
                assert_eq!(
                    owner_match(&cfg, facts),
                    owner_rules_walked(&cfg, facts),
                    "{facts:?} uids {:?} gids {:?}",
                    &uids[..uid_count as usize],
                    &gids[..gid_count as usize]
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 81 * 5 * 5 * 4 * 4 * 8);
}

/// A global function's two scalars carry the facts and the caller's slot.
#[test]
fn owner_facts_survive_packing() {
    for conditions in 0..8u8 {
        let facts = OwnerFacts {
            uid: 1337,
            gid: u32::MAX,
            hairpin_uid: conditions & 1 != 0,
            hairpin_gid: conditions & 2 != 0,
            return_others: conditions & 4 != 0,
        };
        let (owner, flags) = facts.pack(0x00ff_fffe);
        assert_eq!(OwnerFacts::unpack(owner, flags), (facts, 0x00ff_fffe));
    }
    for m in [
        OwnerMatch::None,
        OwnerMatch::Hairpin,
        OwnerMatch::ReturnOthers,
        OwnerMatch::ProxyUid,
        OwnerMatch::ProxyGid,
    ] {
        assert_eq!(OwnerMatch::from_u64(m as u64), m);
    }
}

/// What the chain's tail needs crosses a global function's scalars
/// unchanged, and so does its answer.
#[test]
fn tail_facts_survive_packing() {
    for conditions in 0..8u8 {
        for (gid, port) in [(0, 0), (1337, 53), (u32::MAX, u16::MAX)] {
            let v4 = TailFacts {
                gid,
                dst: 0xfffe_0a01u32,
                dst_port: port,
                tcp: conditions & 1 != 0,
                in_loopback: conditions & 2 != 0,
                port_include: conditions & 4 != 0,
            };
            let (head, rest) = v4.pack(0x00ff_fffe);
            assert_eq!(TailFacts::<u32>::unpack(head, rest), (v4, 0x00ff_fffe));
        }
    }
    for tail in [
        ChainTail::BypassGroup,
        ChainTail::Dns,
        ChainTail::NotTcp,
        ChainTail::Loopback,
        ChainTail::ExcludedCidr,
        ChainTail::Redirect,
        ChainTail::NotIncluded,
    ] {
        assert_eq!(ChainTail::from_u64(tail as u64), tail);
    }
}

/// Every verdict of the inbound port rules survives the scalar the
/// programs' global function returns it as.
#[test]
fn inbound_port_rule_codes_round_trip() {
    for verdict in [
        InboundVerdict::Capture,
        InboundVerdict::Bypass(Counter::InboundBypassTunnel),
        InboundVerdict::Bypass(Counter::InboundBypassPort),
        InboundVerdict::Bypass(Counter::InboundNotIncluded),
    ] {
        assert_eq!(
            InboundVerdict::from_port_rule_code(verdict.port_rule_code()),
            verdict
        );
    }
}
