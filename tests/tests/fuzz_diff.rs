//! Differential fuzzing: random istio-iptables configurations (from the
//! flag space eBPF mode claims to honour: `-i`, `-x`, `-q`, `-o`, `-b`,
//! `-d`, `-u`, `-g`, `-e`, `-c` (the second link, `lo`, or both), DNS
//! capture, the owner-group and loopback variables, IPv6 rules with IPv6
//! networks in `-i` and `-x`; always REDIRECT) × random connections, each configuration applied once with
//! `--mode iptables` and once with `--mode ebpf` on the same sandbox pod,
//! and everything the app and the proxy can observe compared: where the
//! connection lands, how connect (blocking, non-blocking, a fast-open
//! sendto, or a UDP connect) ends, the app's getsockname/getpeername and
//! SO_ORIGINAL_DST on its own socket, and the server's view (peer address,
//! local address, SO_ORIGINAL_DST as the proxy reads it). See the agent's
//! `observe` command for the exact observation.
//!
//! The connections vary the identity (uid, gid, supplementary groups; and
//! switched credentials: effective ids other than the real ones, a socket
//! made under one identity and connected under another), the family (v4,
//! v4-mapped on AF_INET6, or IPv6: the pod's and the peer's IPv6
//! addresses, `::1`, `::`, `::6`, an address without a route, multicast),
//! the destination (the pod's address,
//! 127.0.0.1, other 127/8, 127.0.0.6, 0.0.0.0, the peer's addresses, the
//! pod's and the peer's addresses on a second link (`nic2`), an address
//! without a route, the limited and the subnet broadcast,
//! multicast) and port (the proxy's, Istio's, excluded or included ones,
//! one nothing listens on), the bound source (none, 127.0.0.1, 127.0.0.6,
//! the pod's address; sometimes a fixed source port, so that connections
//! share 4-tuples in turn), SO_BINDTODEVICE (lo, eth0), the socket type
//! (TCP, or a UDP connect); and inbound ones from the peer to the pod's
//! address on either link.
//!
//! Environment:
//! - `FUZZ_DIFF_CASES`: (config, connection) pairs to compare (default 1,500);
//! - `FUZZ_DIFF_SEED`: the seed (default a fixed one, so runs repeat);
//! - `FUZZ_DIFF_PER_CONFIG`: connections per configuration (default 60);
//! - `FUZZ_DIFF_ROUND`: replay only this round (configuration) of the seed;
//! - `FUZZ_DIFF_SHRINK`: how many classes of difference get a minimal
//!   reproduction (default 12);
//! - `FUZZ_DIFF_EXTENDED=on`: also connections with switched credentials
//!   (effective ids other than the real ones, or a socket made under one
//!   identity and connected under another), fixed source ports and
//!   SO_BINDTODEVICE=eth0, where eBPF mode differs in known ways (see
//!   docs/design.md); off by default, so the default run covers the space
//!   eBPF mode claims;
//! - `FUZZ_DIFF_PORTS=shared`: every run takes source ports from the
//!   whole ephemeral range, so that a connection can meet the conntrack
//!   entry of an earlier run's connection with the same ports (by default
//!   consecutive runs take ports of their own: see `ports_of_this_run`);
//! - `FUZZ_DIFF_AGAINST=iptables`: compare iptables mode with itself (a
//!   check that the harness itself observes nothing at random);
//! - `FUZZ_DIFF_SUMMARY`: a file to write the summary line to
//!   (`cargo xtask fuzz-diff` prints it last).
//!
//! Any difference is printed with the seed, the round, the configuration
//! as a command line, the connection and both observations; the first
//! example of each class of difference is re-run alone and shrunk (flags
//! dropped, connection simplified) while the difference stays, which gives
//! a minimal reproduction. The test fails when anything differs, and also
//! when some outcome never occurred (no case landed at the proxy, the
//! inbound listener, a pod server, a peer server, or failed), so that it
//! cannot pass vacuously.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    process::{Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use redirect_sandbox::{
    Group, Identity, Net, PEER_IP, PEER_IP6, PEER_NIC2_IP, POD_IP, POD_IP6, POD_NIC2_IP, PROXY,
    ROOT, Sandbox,
    agent::{ConnectMode, Cred, Device, Spec},
    cli::{outcome, redirect_bin},
    peer_ip, require_root,
};

const DEFAULT_CASES: usize = 1_500;
const DEFAULT_SEED: u64 = 20_240_601;
const DEFAULT_PER_CONFIG: usize = 60;
const DEFAULT_SHRINK: usize = 12;
/// Connections one agent makes at a time.
const PARALLEL: &str = "6";
/// How long a connect (and the read of the reply) may take. Everything
/// here is on one host, so an answer takes well under a millisecond; what
/// takes this long is a SYN that nothing answers (SO_BINDTODEVICE to a
/// device the destination is not on), which then reads `unanswered` (see
/// [`canonical`]). Longer than TCP's first SYN retransmission (1 s), so
/// that a connection whose first SYN was lost (the machine is busy, a
/// neighbour is being resolved) still counts as answered.
const TIMEOUT_MS: &str = "1500";
/// How long a connected case waits for the server's answer. Every server
/// answers at once; only a busy machine (the tests share two cores) makes
/// one late, which must not read as a difference.
const READ_TIMEOUT_MS: &str = "5000";

/// splitmix64: small, seedable, good enough to pick cases.
struct Rng(u64);

impl Rng {
    fn for_round(seed: u64, round: usize) -> Self {
        let mut rng = Self(seed ^ (round as u64).wrapping_mul(0xA076_1D64_78BD_642F));
        rng.next();
        rng
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    /// 1..=`max` distinct items, comma-separated.
    fn list(&mut self, items: &[&str], max: usize) -> String {
        let want = 1 + self.below(max);
        let mut chosen: Vec<&str> = Vec::new();
        for _ in 0..want * 3 {
            let item = self.pick(items);
            if !chosen.contains(&item) {
                chosen.push(item);
            }
            if chosen.len() == want {
                break;
            }
        }
        chosen.join(",")
    }

    /// A list of ports, sometimes written as people do (`80, 81`, `80,`),
    /// which istio-iptables renders into rules that iptables reads alike.
    fn port_list(&mut self, max: usize) -> String {
        // Now and then a range (`a:b`, `a:`) among the single ports.
        let mut list = self.list(PORTS, max);
        if self.chance(20) {
            let range = self.pick(PORT_RANGES).to_owned();
            list = if list.is_empty() {
                range
            } else {
                format!("{list},{range}")
            };
        }
        match self.below(10) {
            0 => list.replace(',', ", "),
            1 => format!("{list},"),
            _ => list,
        }
    }
}

/// CIDRs `-i` and `-x` are drawn from: every destination class below.
const CIDRS: &[&str] = &[
    "198.19.0.0/24",
    "198.19.0.1/32",
    "198.19.0.2/32",
    "198.18.0.2/32",
    "198.18.0.1/32",
    "198.18.0.0/15",
    "127.0.0.0/8",
    "127.0.0.1/32",
    "127.0.0.6/32",
    "10.0.0.0/8",
    "224.0.0.0/4",
    "255.255.255.255/32",
    "198.19.255.255/32",
    "0.0.0.0/0",
];

/// IPv6 networks `-i` and `-x` are drawn from with IPv6 rules.
const CIDRS6: &[&str] = &[
    "fd00:198:18::/64",
    "fd00:198:18::2/128",
    "fd00:198:18::1/128",
    "fd00::/8",
    "::1/128",
    "::/0",
    "2001:db8::/32",
    "ff00::/8",
];

/// Ports the flags and the connections are drawn from.
const PORTS: &[&str] = &[
    "80", "81", "22", "15008", "15090", "9090", "15001", "15006", "15021", "7", "53",
];

/// The pod's resolv.conf in every configuration: a nameserver across the
/// network and a local resolver (DNS capture takes port 53 to these, or
/// to anything with `CAPTURE_ALL_DNS`).
const NAMESERVERS: [Ipv4Addr; 2] = [PEER_IP, Ipv4Addr::new(127, 0, 0, 53)];

/// Ranges the port lists sometimes take: around the ports above.
const PORT_RANGES: &[&str] = &[
    "80:81",
    "20:23",
    "15000:15010",
    "9000:9999",
    "1:79",
    "15021:",
    "7:7",
    "81:15006",
];

/// Ports with a server in the pod (besides the proxy's 15001 and 15006).
const POD_SERVER_PORTS: [u16; 6] = [80, 81, 22, 15008, 15090, 9090];
/// Ports with a server in the peer.
const PEER_SERVER_PORTS: [u16; 8] = [80, 81, 22, 15008, 15090, 9090, 15001, 15006];

/// `count` owner groups, 3000 among them (Istio allows 64; with
/// `ISTIO_OUTBOUND_OWNER_GROUPS` it puts every group in one iptables rule,
/// five words each, and iptables-restore stops at 255 words a line, so
/// iptables mode itself applies about 50 there: 40 for that form).
fn many_groups(count: u32) -> String {
    let groups: Vec<String> = (5000..5000 + count - 1)
        .chain([3000])
        .map(|g: u32| g.to_string())
        .collect();
    groups.join(",")
}

/// Flags every configuration has (eBPF mode refuses TPROXY).
const FIXED: &[&str] = &["-p", "15001", "-z", "15006", "-m", "REDIRECT"];

/// One istio-iptables configuration: flags besides [`FIXED`] and environment.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Config {
    flags: Vec<(&'static str, String)>,
    env: Vec<(&'static str, String)>,
    /// Istio's IPv6 table (`--ipv6=true`).
    ipv6: bool,
}

impl Config {
    fn random(rng: &mut Rng) -> Self {
        let mut flags = Vec::new();
        let mut env = Vec::new();
        let ipv6 = rng.chance(35);
        // With IPv6 rules, now and then IPv6 networks beside the IPv4 ones.
        let cidrs = |rng: &mut Rng, max: usize| {
            let v4 = rng.list(CIDRS, max);
            if ipv6 && rng.chance(60) {
                let v6 = rng.list(CIDRS6, max);
                if rng.chance(30) {
                    v6
                } else {
                    format!("{v4},{v6}")
                }
            } else {
                v4
            }
        };
        let include = match rng.below(100) {
            0..30 => "*".to_owned(),
            30..45 => String::new(),
            _ => cidrs(rng, 3),
        };
        flags.push(("-i", include));
        if rng.chance(50) {
            flags.push(("-x", cidrs(rng, 2)));
        }
        if rng.chance(30) {
            flags.push(("-q", rng.port_list(2)));
        }
        if rng.chance(40) {
            flags.push(("-o", rng.port_list(2)));
        }
        let inbound = match rng.below(100) {
            0..40 => "*".to_owned(),
            40..60 => String::new(),
            _ => rng.port_list(3),
        };
        flags.push(("-b", inbound));
        if rng.chance(50) {
            flags.push(("-d", rng.port_list(2)));
        }
        let uid = match rng.below(20) {
            0..16 => "1337",
            16 | 17 => "1337,4242",
            18 => "1337,0",
            _ => "2000",
        };
        flags.push(("-u", uid.to_owned()));
        match rng.below(100) {
            0..60 => {}
            60..80 => flags.push(("-g", "1337".to_owned())),
            80..90 => flags.push(("-g", "1337,3000".to_owned())),
            _ => flags.push(("-g", "3000".to_owned())),
        }
        if rng.chance(15) {
            flags.push(("-e", rng.pick(&["81", "15008", "22"]).to_owned()));
        }
        match rng.below(100) {
            0..70 => {}
            70..85 => env.push((
                "ISTIO_OUTBOUND_OWNER_GROUPS",
                match rng.below(4) {
                    0 => many_groups(40),
                    n => ["3000", "1000", "3000,1337"][n - 1].to_owned(),
                },
            )),
            _ => env.push((
                "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
                match rng.below(3) {
                    0 => many_groups(64),
                    n => ["3000", "1000"][n - 1].to_owned(),
                },
            )),
        }
        // DNS capture only where the DNS stand-in (uid and gid 1337) is
        // the proxy: Istio's conntrack zones de-NAT a DNS reply only when
        // a proxy uid or gid sent it, so with the stand-in outside -u/-g
        // iptables mode shows the reply from 127.0.0.1:15053 (or drops it
        // on a connected socket), where eBPF mode restores every reply
        // from the DNS port. That is a broken deployment (Istio's DNS proxy
        // runs as the proxy) and a documented difference, not a finding.
        let stand_in_is_proxy = flags
            .iter()
            .any(|(f, v)| (*f == "-u" || *f == "-g") && v.split(',').any(|id| id == "1337"));
        if stand_in_is_proxy && rng.chance(35) {
            env.push(("REDIRECT_DNS", "true".to_owned()));
            if rng.chance(30) {
                env.push(("CAPTURE_ALL_DNS", "true".to_owned()));
            }
        }
        // Excluded interfaces: the second link (which some destinations
        // and inbound connections use), `lo`, or both.
        if rng.chance(20) {
            flags.push((
                "-c",
                rng.pick(&["nic2", "nic2", "lo", "nic2,lo"]).to_owned(),
            ));
        }
        if rng.chance(25) {
            env.push((
                "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
                rng.pick(&["127.0.0.0/8", "127.0.0.1/32", "127.0.0.0/16"])
                    .to_owned(),
            ));
        }
        Self { flags, env, ipv6 }
    }

    fn args(&self) -> Vec<String> {
        FIXED
            .iter()
            .map(|s| (*s).to_owned())
            .chain(
                self.flags
                    .iter()
                    .flat_map(|(f, v)| [(*f).to_owned(), v.clone()]),
            )
            .collect()
    }

    /// The command line that applies it, as a shell reads it.
    fn command_line(&self, mode: &str) -> String {
        let quote = |s: &str| {
            if !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./,:=".contains(c))
            {
                s.to_owned()
            } else {
                format!("'{s}'")
            }
        };
        let mut line = String::new();
        for (k, v) in &self.env {
            let _ = write!(line, "{k}={} ", quote(v));
        }
        let _ = write!(
            line,
            "redirect istio-iptables --ipv6={} --mode {mode} --resolv-conf <nameserver {} and {}> --netns <pod> --cgroup <pod> --instance <name>",
            self.ipv6, NAMESERVERS[0], NAMESERVERS[1]
        );
        for arg in self.args() {
            let _ = write!(line, " {}", quote(&arg));
        }
        line
    }

    /// How many parts [`Config::without`] can drop.
    fn parts(&self) -> usize {
        self.flags.len() + self.env.len()
    }

    /// This configuration without its `i`-th flag or variable.
    fn without(&self, i: usize) -> Self {
        let mut out = self.clone();
        if i < out.flags.len() {
            out.flags.remove(i);
        } else {
            out.env.remove(i - out.flags.len());
        }
        out
    }
}

/// Who connects.
#[derive(Clone, Copy, Debug)]
struct Client {
    who: Identity,
    groups: &'static [u32],
    /// From the peer namespace (inbound), not from the pod's app cgroup.
    peer: bool,
}

impl Client {
    fn describe(&self) -> String {
        if self.peer {
            return "from the peer (root, peer netns)".to_owned();
        }
        if self.who == ROOT {
            return "root taking the connection's credentials (cred=: the socket's, then=: connect's) (pod, app cgroup)".to_owned();
        }
        let groups: Vec<String> = self.groups.iter().map(u32::to_string).collect();
        format!(
            "uid={} gid={} groups={} (pod, app cgroup)",
            self.who.uid,
            self.who.gid,
            if groups.is_empty() {
                "-".to_owned()
            } else {
                groups.join(",")
            }
        )
    }
}

/// The app, the proxy by UID, the proxy by GID only, an owner-group
/// member by its primary group, one by supplementary groups only, the
/// rest of the network, and root switching credentials per connection.
const CLIENTS: [Client; 7] = [
    Client {
        who: Identity {
            uid: 1000,
            gid: 1000,
        },
        groups: &[],
        peer: false,
    },
    Client {
        who: Identity {
            uid: 1337,
            gid: 1337,
        },
        groups: &[],
        peer: false,
    },
    Client {
        who: Identity {
            uid: 4242,
            gid: 1337,
        },
        groups: &[],
        peer: false,
    },
    Client {
        who: Identity {
            uid: 2000,
            gid: 3000,
        },
        groups: &[],
        peer: false,
    },
    Client {
        who: Identity {
            uid: 2001,
            gid: 1000,
        },
        groups: &[3000, 1337],
        peer: false,
    },
    Client {
        who: ROOT,
        groups: &[],
        peer: true,
    },
    Client {
        who: ROOT,
        groups: &[],
        peer: false,
    },
];
const PEER_CLIENT: usize = 5;
/// Root in the app cgroup, taking each connection's credentials ([`Cred`])
/// on the thread that makes it: set-user-ID-like ones (effective ids
/// other than the real ones), and sockets made under one identity and
/// connected under another.
const SWITCHING_CLIENT: usize = 6;

/// One connection: who makes it, and how.
#[derive(Clone, Copy, Debug)]
struct Case {
    client: usize,
    spec: Spec,
}

/// Destinations of the pod's connections, with a name for their class.
fn destinations() -> Vec<(Ipv4Addr, &'static str)> {
    vec![
        (POD_IP, "pod-ip"),
        (POD_IP, "pod-ip"),
        (Ipv4Addr::LOCALHOST, "127.0.0.1"),
        (Ipv4Addr::LOCALHOST, "127.0.0.1"),
        (Ipv4Addr::new(127, 0, 0, 9), "127/8"),
        (Ipv4Addr::new(127, 1, 2, 3), "127/8"),
        (Ipv4Addr::new(127, 0, 0, 6), "127.0.0.6"),
        (NAMESERVERS[1], "local-resolver"),
        (Ipv4Addr::UNSPECIFIED, "0.0.0.0"),
        (PEER_IP, "peer"),
        (PEER_IP, "peer"),
        (peer_ip(1), "peer"),
        (peer_ip(1), "peer"),
        (peer_ip(2), "peer"),
        (PEER_NIC2_IP, "peer-nic2"),
        (PEER_NIC2_IP, "peer-nic2"),
        (POD_NIC2_IP, "pod-nic2"),
        (Ipv4Addr::new(10, 1, 2, 3), "no-route"),
        (Ipv4Addr::BROADCAST, "broadcast"),
        (Ipv4Addr::new(198, 19, 255, 255), "subnet-broadcast"),
        (Ipv4Addr::new(224, 0, 0, 1), "multicast"),
        (Ipv4Addr::new(239, 1, 2, 3), "multicast"),
    ]
}

/// The class of a case's destination, for grouping differences.
fn destination_class(case: &Case) -> &'static str {
    if CLIENTS[case.client].peer {
        return if case.spec.to.is_ipv6() {
            "inbound6"
        } else {
            "inbound"
        };
    }
    destinations()
        .into_iter()
        .map(|(ip, class)| (IpAddr::V4(ip), class))
        .chain(destinations6())
        .find(|(ip, _)| *ip == case.spec.to.ip())
        .map_or("other", |(_, class)| class)
}

/// IPv6 destinations of the pod's connections, with their classes.
fn destinations6() -> Vec<(IpAddr, &'static str)> {
    let v6 = |text: &str| IpAddr::V6(text.parse::<Ipv6Addr>().expect("address"));
    vec![
        (POD_IP6.into(), "pod-ip6"),
        (v6("::1"), "::1"),
        (v6("::"), "::"),
        (v6("::6"), "::6"),
        (PEER_IP6.into(), "peer6"),
        (PEER_IP6.into(), "peer6"),
        (v6("2001:db8::2"), "no-route6"),
        (v6("ff02::1"), "multicast6"),
        (v6("ff05::1"), "multicast6"),
        (v6("fe80::2"), "link-local6"),
    ]
}

/// User and group ids the switching client's credentials are drawn from.
const UIDS: [u32; 5] = [1000, 1337, 4242, 2000, 0];
const GIDS: [u32; 4] = [1000, 1337, 3000, 0];

/// Credentials for the switching client: mostly plain ones, some with
/// effective ids other than the real ones (as a set-user-ID program
/// has), some with supplementary groups.
fn random_cred(rng: &mut Rng) -> Cred {
    let ruid = rng.pick(&UIDS);
    let euid = if rng.chance(70) {
        ruid
    } else {
        rng.pick(&UIDS)
    };
    let rgid = rng.pick(&GIDS);
    let egid = if rng.chance(70) {
        rgid
    } else {
        rng.pick(&GIDS)
    };
    let groups: &[u32] = match rng.below(10) {
        0 => &[3000],
        1 => &[1337],
        2 => &[3000, 1337],
        _ => &[],
    };
    Cred::new((ruid, euid), (rgid, egid), groups)
}

fn random_case(rng: &mut Rng, creds: bool) -> Case {
    let client = match rng.below(100) {
        0..15 => PEER_CLIENT,
        15..27 if creds => SWITCHING_CLIENT,
        _ => rng.below(PEER_CLIENT),
    };
    // DNS (port 53) more often than its share, over UDP half the time.
    let port: u16 = if rng.chance(10) {
        53
    } else {
        rng.pick(PORTS).parse().expect("port")
    };
    let family6 = rng.chance(30);
    let mode = match rng.below(100) {
        _ if port == 53 && rng.chance(50) => rng.pick(&[ConnectMode::Udp, ConnectMode::Sendto]),
        0..46 => ConnectMode::Block,
        46..74 => ConnectMode::Nonblock,
        74..88 => ConnectMode::Fastopen,
        88..95 => ConnectMode::Udp,
        _ => ConnectMode::Sendto,
    };
    let mut spec = Spec {
        family6,
        mode,
        ..Spec::to(SocketAddrV4::new(POD_IP, port))
    };
    if creds && rng.chance(12) {
        // A few fixed source ports, outside the ephemeral range, so that
        // connections share 4-tuples in turn: what a record kept past its
        // connection would answer. Each client has ports of its own (the
        // clients run at once) and makes these connections in order, so
        // which one comes first is the same in both modes.
        spec.sport = 20_000 + 10 * client as u16 + rng.pick(&[0, 1, 2]);
    }
    if CLIENTS[client].peer {
        // A third of inbound connections arrive on the second link, a
        // fifth over IPv6.
        if rng.chance(20) {
            spec.to = SocketAddr::new(POD_IP6.into(), port);
            spec.bind = None;
            return Case { client, spec };
        }
        if rng.chance(33) {
            spec.to = SocketAddrV4::new(POD_NIC2_IP, port).into();
        }
        spec.bind = match rng.below(10) {
            0..8 => None,
            8 => Some(PEER_IP.into()),
            _ => Some(peer_ip(1).into()),
        };
        return Case { client, spec };
    }
    if rng.chance(25) {
        let (ip, _) = rng.pick(&destinations6());
        spec.to = SocketAddr::new(ip, port);
        spec.bind = match rng.below(10) {
            0..6 => None,
            6 => Some(Ipv6Addr::LOCALHOST.into()),
            7 | 8 => Some("::6".parse::<Ipv6Addr>().expect("::6").into()),
            _ => Some(POD_IP6.into()),
        };
        spec.dev = match rng.below(100) {
            0..8 => Device::Lo,
            _ => Device::None,
        };
        return Case { client, spec };
    }
    let (ip, _) = rng.pick(&destinations());
    spec.to = SocketAddrV4::new(ip, port).into();
    spec.bind = match rng.below(10) {
        0..6 => None,
        6 => Some(Ipv4Addr::LOCALHOST.into()),
        7 | 8 => Some(Ipv4Addr::new(127, 0, 0, 6).into()),
        _ => Some(POD_IP.into()),
    };
    spec.dev = match rng.below(100) {
        0..8 => Device::Lo,
        8..14 if creds => Device::Eth0,
        _ => Device::None,
    };
    if client == SWITCHING_CLIENT && rng.chance(90) {
        spec.cred = Some(random_cred(rng));
        if rng.chance(25) {
            spec.then = Some(random_cred(rng));
        }
    }
    Case { client, spec }
}

/// A sandbox pod with every listener a case may land on, all answering
/// what they observe: the proxy's outbound (15001, "proxy") and inbound
/// (15006, "inbound") listeners as the proxy (UID 1337, the pod's proxy
/// cgroup), servers of the pod ("pod", root in the app cgroup) and of the
/// peer ("peer"). They run inside the pod's cgroup, as a pod's do, so
/// that eBPF mode's getsockopt program answers their SO_ORIGINAL_DST.
fn pod_with_servers() -> Sandbox {
    let sandbox = Sandbox::for_tests().expect("sandbox");
    sandbox.add_peer_addresses(2).expect("peer addresses");
    sandbox.add_second_link().expect("second link");
    // Istio's inbound passthrough source on lo, as in an IPv6 pod.
    sandbox
        .ip_batch(Net::Pod, "addr add ::6/128 dev lo\n")
        .expect("::6 on lo");
    // Each server on every IPv4 address and on the IPv6 addresses a
    // connection may reach it at (`v6`): the IPv4 wildcard and IPv6
    // addresses of their own do not collide.
    let serve =
        |net: Net, group: Group, who: Identity, ports: &[u16], v6: &[IpAddr], reply: &str| {
            let listen: Vec<String> = ports
                .iter()
                .flat_map(|p| {
                    std::iter::once(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), *p))
                        .chain(v6.iter().map(move |ip| SocketAddr::new(*ip, *p)))
                })
                .map(|a| a.to_string())
                .collect();
            let mut cmd = sandbox.agent(net, group, who);
            cmd.args(["serve", "--listen", &listen.join(",")])
                .args(["--report", "observe", "--reply", reply]);
            sandbox.start(cmd).expect("listener");
        };
    let (lo6, pod6) = (IpAddr::from(Ipv6Addr::LOCALHOST), IpAddr::from(POD_IP6));
    serve(Net::Pod, Group::Proxy, PROXY, &[15001], &[lo6], "proxy");
    serve(
        Net::Pod,
        Group::Proxy,
        PROXY,
        &[15006],
        &[lo6, pod6],
        "inbound",
    );
    serve(
        Net::Pod,
        Group::App,
        ROOT,
        &POD_SERVER_PORTS,
        &[lo6, pod6],
        "pod",
    );
    serve(
        Net::Peer,
        Group::Outside,
        ROOT,
        &PEER_SERVER_PORTS,
        &[PEER_IP6.into()],
        "peer",
    );
    // DNS stand-ins (UDP and TCP port 53): the proxy's DNS listener, the
    // local resolver, the nameserver and a server resolv.conf does not list.
    let dns = |net: Net, group: Group, who: Identity, at: SocketAddr, name: &str| {
        let mut cmd = sandbox.agent(net, group, who);
        cmd.args(["dns-serve", "--listen", &at.to_string(), "--reply", name]);
        sandbox.start(cmd).expect(name);
    };
    dns(
        Net::Pod,
        Group::Proxy,
        PROXY,
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15053).into(),
        "dns-proxy",
    );
    dns(
        Net::Pod,
        Group::Proxy,
        PROXY,
        SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 15053),
        "dns-proxy",
    );
    dns(
        Net::Pod,
        Group::App,
        ROOT,
        SocketAddrV4::new(NAMESERVERS[1], 53).into(),
        "local-resolver",
    );
    dns(
        Net::Peer,
        Group::Outside,
        ROOT,
        SocketAddrV4::new(NAMESERVERS[0], 53).into(),
        "nameserver",
    );
    dns(
        Net::Peer,
        Group::Outside,
        ROOT,
        SocketAddrV4::new(peer_ip(1), 53).into(),
        "other-dns",
    );
    let resolv: String = NAMESERVERS
        .iter()
        .map(|ns| format!("nameserver {ns}\n"))
        .collect();
    std::fs::write(resolv_conf(&sandbox), resolv).expect("resolv.conf");
    sandbox
}

/// The pod's resolv.conf, named after the sandbox (which removes it).
fn resolv_conf(sandbox: &Sandbox) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{}-resolv.conf", sandbox.name()))
}

/// How many source-port slots the runs take in turn (see
/// [`ports_of_this_run`]).
const PORT_SLOTS: u16 = 12;
static RUNS: AtomicU64 = AtomicU64::new(0);

/// Gives this run (one mode's observation of a round) source ports no
/// run shortly before it used: its own twelfth of the ephemeral range,
/// in the pod and in the peer, and its own block of fixed source ports
/// (returned). A 4-tuple of the run before could otherwise meet
/// conntrack's record of it (kept 10 s after a reset, 2 min in
/// TIME_WAIT) and be decided by that record: NAT'd as the previous
/// configuration said, or answered as its reply (what an eBPF-mode
/// connection right after an iptables-mode one sharing its tuple would
/// see). A real pod only meets this when it moves from one mode to the
/// other; twelve runs take six rounds, past those 10 s.
/// `FUZZ_DIFF_PORTS=shared` leaves every run the whole range (and slot 0),
/// to look for exactly those effects.
fn ports_of_this_run(sandbox: &Sandbox) -> u16 {
    if std::env::var("FUZZ_DIFF_PORTS").is_ok_and(|v| v == "shared") {
        return 0;
    }
    let slot = (RUNS.fetch_add(1, Ordering::Relaxed) % u64::from(PORT_SLOTS)) as u16;
    let width = (61_000 - 32_768) / u32::from(PORT_SLOTS);
    let low = 32_768 + u32::from(slot) * width;
    let range = format!("{low} {}", low + width - 1);
    for net in [Net::Pod, Net::Peer] {
        let status = sandbox
            .command(net, Group::Outside, ROOT, "sh")
            .args([
                "-c",
                &format!("echo {range} > /proc/sys/net/ipv4/ip_local_port_range"),
            ])
            .status()
            .expect("sh");
        assert!(status.success(), "setting ip_local_port_range {range}");
    }
    slot
}

/// Observes `cases` (in the current state of the pod): one observation
/// line per case, in order. One agent per client, all at once.
fn observe_all(sandbox: &Sandbox, cases: &[Case]) -> Vec<String> {
    let slot = ports_of_this_run(sandbox);
    let mut by_client: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, case) in cases.iter().enumerate() {
        by_client.entry(case.client).or_default().push(i);
    }
    let mut seen = vec![String::new(); cases.len()];
    std::thread::scope(|scope| {
        let runs: Vec<_> = by_client
            .iter()
            .map(|(client, indices)| {
                let client = CLIENTS[*client];
                let input: String = indices
                    .iter()
                    .map(|i| {
                        let mut spec = cases[*i].spec;
                        if spec.sport != 0 {
                            // This run's own block of fixed source ports.
                            spec.sport = 2000 + 100 * slot + (spec.sport - 20_000) % 100;
                        }
                        format!("{spec}\n")
                    })
                    .collect();
                let mut cmd = if client.peer {
                    sandbox.agent(Net::Peer, Group::Outside, ROOT)
                } else {
                    sandbox.agent(Net::Pod, Group::App, client.who)
                };
                if !client.groups.is_empty() {
                    let groups: Vec<String> = client.groups.iter().map(u32::to_string).collect();
                    cmd.args(["--groups", &groups.join(",")]);
                }
                cmd.args([
                    "observe",
                    "--parallel",
                    PARALLEL,
                    "--timeout-ms",
                    TIMEOUT_MS,
                    "--read-timeout-ms",
                    READ_TIMEOUT_MS,
                ]);
                let run = scope.spawn(move || run_with_input(cmd, &input));
                (indices, run)
            })
            .collect();
        for (indices, run) in runs {
            let out = run.join().expect("observe thread");
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(
                lines.len(),
                indices.len(),
                "one observation per spec: {out}"
            );
            for (i, line) in indices.iter().zip(lines) {
                // The harness itself must work: every spec parses, and
                // root takes every credential it is given.
                assert!(
                    !["bad-spec", "cred=", "then="]
                        .iter()
                        .any(|broken| line.starts_with(broken)),
                    "the agent could not make {}: {line}",
                    cases[*i].spec
                );
                seen[*i] = canonical(line.to_owned());
            }
        }
    });
    seen
}

/// Runs `cmd` with `input` on its stdin and returns its stdout.
fn run_with_input(mut cmd: Command, input: &str) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the agent");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write specs");
    let out = child.wait_with_output().expect("agent");
    assert!(out.status.success(), "agent observe: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One backend: `--mode` and what its apply prints.
#[derive(Clone, Copy)]
struct Mode {
    name: &'static str,
    mode: &'static str,
    says: &'static str,
}

const IPTABLES: Mode = Mode {
    name: "iptables",
    mode: "iptables",
    says: "(iptables-",
};
const EBPF: Mode = Mode {
    name: "eBPF",
    mode: "ebpf",
    says: "with eBPF",
};

/// The mode compared with iptables mode: eBPF, or iptables itself under
/// `FUZZ_DIFF_AGAINST=iptables`.
fn against() -> Mode {
    match std::env::var("FUZZ_DIFF_AGAINST").as_deref() {
        Err(_) | Ok("ebpf") => EBPF,
        Ok("iptables") => IPTABLES,
        Ok(other) => panic!("FUZZ_DIFF_AGAINST={other:?}: ebpf or iptables"),
    }
}

fn istio_iptables(sandbox: &Sandbox, mode: Mode, config: &Config, cleanup: bool) -> (bool, String) {
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let mut cmd = Command::new(redirect_bin());
    cmd.args(["istio-iptables", "--mode", mode.mode])
        .arg(format!("--ipv6={}", config.ipv6))
        .arg("--resolv-conf")
        .arg(resolv_conf(sandbox))
        .args(["--netns", &sandbox.netns_path(Net::Pod)])
        .args(["--cgroup", &cgroup, "--instance", sandbox.name()])
        .args(config.args())
        .envs(config.env.iter().map(|(k, v)| (*k, v.as_str())));
    if cleanup {
        cmd.arg("--cleanup-only");
    }
    let out = outcome(&mut cmd).expect("run redirect");
    let ok = out.code == 0 && (cleanup || out.stdout.contains(mode.says));
    (
        ok,
        format!(
            "exit {}: {} {}",
            out.code,
            out.stdout.trim(),
            out.stderr.trim()
        )
        .trim()
        .replace('\n', " / "),
    )
}

/// Lines of Istio's rules in the pod's netfilter tables, as both
/// iptables backends list them (without `-t`, which would make a legacy
/// table): some in iptables mode, none in eBPF mode, so that a capture
/// left behind by the other mode cannot make the modes agree.
fn istio_rules(sandbox: &Sandbox) -> usize {
    ["iptables-nft-save", "iptables-legacy-save"]
        .into_iter()
        .filter_map(|save| {
            sandbox
                .command(Net::Pod, Group::Outside, ROOT, save)
                .stderr(Stdio::null())
                .output()
                .ok()
        })
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("-A") && l.contains("ISTIO"))
                .count()
        })
        .sum()
}

/// Time spent applying and removing configurations, and observing.
static APPLY_NS: AtomicU64 = AtomicU64::new(0);
static OBSERVE_NS: AtomicU64 = AtomicU64::new(0);

/// Applies `config` with `mode`, observes `cases`, and removes the
/// capture again; `Err` says why the configuration was not applied.
fn observe_with(
    sandbox: &Sandbox,
    mode: Mode,
    config: &Config,
    cases: &[Case],
) -> Result<Vec<String>, String> {
    let began = Instant::now();
    let (applied, said) = istio_iptables(sandbox, mode, config, false);
    if applied {
        let rules = istio_rules(sandbox);
        assert!(
            (rules > 0) == (mode.mode == "iptables"),
            "{} mode with {rules} lines of Istio's netfilter rules in the pod\n{}",
            mode.name,
            config.command_line(mode.mode)
        );
    }
    let observing = Instant::now();
    let seen = applied.then(|| observe_all(sandbox, cases));
    let removing = Instant::now();
    let (removed, cleanup) = istio_iptables(sandbox, mode, config, true);
    if !applied {
        // Nothing was applied (both modes apply all or nothing), so a
        // cleanup that fails too leaves nothing behind: say both.
        assert!(
            !sandbox.is_pinned(),
            "{} left a pin after refusing",
            mode.name
        );
        let cleanup = if removed {
            String::new()
        } else {
            format!("; --cleanup-only failed too: {cleanup}")
        };
        return Err(format!("{said}{cleanup}"));
    }
    let nanos = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    APPLY_NS.fetch_add(
        nanos(observing - began) + nanos(removing.elapsed()),
        Ordering::Relaxed,
    );
    OBSERVE_NS.fetch_add(nanos(removing - observing), Ordering::Relaxed);
    assert!(
        removed,
        "{} --cleanup-only failed: {cleanup}\n{}",
        mode.name,
        config.command_line(mode.mode)
    );
    assert!(
        !sandbox.is_pinned(),
        "{} --cleanup-only left the instance pinned",
        mode.name
    );
    seen.ok_or(said)
}

/// An observation as it is compared:
/// - a connection nothing answered reads `unanswered`, whether it timed
///   out (`EINPROGRESS`: the connect's or the poll's timeout) or failed
///   with `EHOSTUNREACH` (neighbour resolution failed): which of the two
///   depends on the neighbour cache the cases before left, not on the
///   capture (it happens with SO_BINDTODEVICE=eth0 to an address not on
///   the link);
/// - the port of the server's peer address is `eph` also when iptables'
///   NAT chose another source port than the client's (it does when the
///   redirected tuple clashes with a recent connection's, so it depends on
///   which ports earlier cases used).
fn canonical(seen: String) -> String {
    for unanswered in [
        "connect=EINPROGRESS,EHOSTUNREACH",
        "connect=EINPROGRESS,timeout",
        "connect=EINPROGRESS",
        "connect=EHOSTUNREACH",
        "sendto=EINPROGRESS",
        "sendto=EHOSTUNREACH",
    ] {
        if seen == unanswered {
            let verb = unanswered.split('=').next().unwrap_or("connect");
            return format!("{verb}=unanswered");
        }
    }
    // A UDP query nothing answers: the ICMP error that says so is rate
    // limited, so it shows as a refusal or as a timeout.
    let seen = [" from=ECONNREFUSED", " from=EAGAIN"]
        .iter()
        .fold(seen, |seen, unanswered| {
            seen.replace(unanswered, " from=unanswered")
        });
    let Some((app, reply)) = seen.split_once(" | ") else {
        return seen;
    };
    let reply: Vec<String> = reply
        .split(' ')
        .map(|field| match field.strip_prefix("peer=") {
            Some(addr) => match addr.rsplit_once(':') {
                Some((ip, port)) if !PORTS.contains(&port) => format!("peer={ip}:eph"),
                _ => field.to_owned(),
            },
            None => field.to_owned(),
        })
        .collect();
    format!("{app} | {}", reply.join(" "))
}

/// Where an observation landed: the server's name, `no-reply`, or the
/// failure (`connect=ECONNREFUSED`).
fn landing(seen: &str) -> String {
    match seen.split_once(" | ") {
        Some((_, reply)) => reply
            .split_whitespace()
            .next()
            .unwrap_or("no-reply")
            .to_owned(),
        None => seen
            .split_whitespace()
            .next()
            .unwrap_or("nothing")
            .to_owned(),
    }
}

/// The `key=value` fields of an observation (the server's as `srv.key`).
fn fields(seen: &str) -> BTreeMap<String, String> {
    let (app, reply) = seen.split_once(" | ").unwrap_or((seen, ""));
    let mut out = BTreeMap::new();
    for (prefix, part) in [("", app), ("srv.", reply)] {
        for field in part.split_whitespace() {
            if let Some((k, v)) = field.split_once('=') {
                out.insert(format!("{prefix}{k}"), v.to_owned());
            }
        }
    }
    out
}

/// A field's value as a class of difference sees it: errno names and
/// outcomes as they are, addresses by role (`DST`: the connection's
/// destination; `pod`, `lo` (127.0.0.1), `127.0.0.6`, `peer`; `dport`: the
/// destination's port).
fn role(case: &Case, value: &str) -> String {
    let to = case.spec.to;
    let plain = value
        .strip_prefix("[::ffff:")
        .map_or_else(|| value.to_owned(), |rest| rest.replacen(']', "", 1));
    let Some((ip, port)) = plain.rsplit_once(':') else {
        return value.to_owned();
    };
    let Ok(ip) = ip.parse::<Ipv4Addr>() else {
        return value.to_owned();
    };
    if std::net::IpAddr::V4(ip) == to.ip() && port == to.port().to_string() {
        return "DST".to_owned();
    }
    let ip = match ip {
        ip if ip == POD_IP => "pod".to_owned(),
        ip if ip == POD_NIC2_IP => "pod-nic2".to_owned(),
        ip if ip == PEER_NIC2_IP => "peer-nic2".to_owned(),
        ip if ip == Ipv4Addr::LOCALHOST => "lo".to_owned(),
        ip if ip == PEER_IP || ip == peer_ip(1) || ip == peer_ip(2) => "peer".to_owned(),
        ip => ip.to_string(),
    };
    let port = if port == to.port().to_string() {
        "dport"
    } else {
        port
    };
    format!("{ip}:{port}")
}

/// The class of a difference: where the connection lands in each mode
/// (with the destination's class), or, when it lands alike, the fields
/// that differ and how (see [`role`]).
fn class(case: &Case, a: &str, b: &str) -> String {
    let dest = match (case.spec.cred, case.spec.then) {
        (None, None) => destination_class(case).to_owned(),
        (_, None) => format!("cred= {}", destination_class(case)),
        (_, Some(_)) => format!("cred= then= {}", destination_class(case)),
    };
    let (la, lb) = (landing(a), landing(b));
    if la != lb {
        return format!("{dest}: lands {la} (iptables) vs {lb} (eBPF)");
    }
    let (fa, fb) = (fields(a), fields(b));
    let keys: BTreeSet<&String> = fa.keys().chain(fb.keys()).collect();
    let differ: Vec<String> = keys
        .into_iter()
        .filter(|k| fa.get(*k) != fb.get(*k))
        .map(|k| {
            let show = |v: Option<&String>| v.map_or_else(|| "-".to_owned(), |v| role(case, v));
            format!("{k} {}/{}", show(fa.get(k)), show(fb.get(k)))
        })
        .collect();
    let direction = match (CLIENTS[case.client].peer, case.spec.cred, case.spec.then) {
        (true, ..) => "inbound",
        (false, None, None) => "outbound",
        (false, _, None) => "cred= outbound",
        (false, _, Some(_)) => "cred= then= outbound",
    };
    format!("{direction} at {la}: {} (iptables/eBPF)", differ.join(", "))
}

/// One difference found.
struct Difference {
    round: usize,
    config: Config,
    case: Case,
    iptables: String,
    ebpf: String,
}

/// A difference as text: where it comes from (`origin`), the
/// configuration as both command lines, the connection, both observations.
fn describe(origin: &str, d: &Difference) -> String {
    format!(
        "  {origin}:\n    {}\n    {}\n    connection: {} -> {}\n    iptables: {}\n    {:9} {}",
        d.config.command_line("iptables"),
        d.config.command_line(against().mode),
        CLIENTS[d.case.client].describe(),
        d.case.spec,
        d.iptables,
        format!("{}:", against().name),
        d.ebpf,
    )
}

/// How to replay the round a difference was found in.
fn replay(seed: u64, round: usize) -> String {
    let mut line = format!(
        "seed {seed} round {round} (replay: cargo xtask fuzz-diff --seed {seed} --round {round}"
    );
    for (var, flag) in [
        ("FUZZ_DIFF_CASES", "--cases"),
        ("FUZZ_DIFF_PER_CONFIG", "--per-config"),
    ] {
        if let Ok(value) = std::env::var(var) {
            let _ = write!(line, " {flag} {}", value.trim());
        }
    }
    if std::env::var("FUZZ_DIFF_EXTENDED").is_ok_and(|v| v == "on") {
        line.push_str(" --extended");
    }
    line.push(')');
    line
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

/// The one case under `config` in both modes: both observations, when
/// both modes applied it.
fn one_case(sandbox: &Sandbox, config: &Config, case: Case) -> Option<(String, String)> {
    let a = observe_with(sandbox, IPTABLES, config, &[case]).ok()?;
    let b = observe_with(sandbox, against(), config, &[case]).ok()?;
    Some((a[0].clone(), b[0].clone()))
}

/// Simpler variants of a connection, to try while shrinking.
fn simpler(case: Case) -> Vec<Case> {
    let spec = case.spec;
    let mut out = Vec::new();
    let mut try_spec = |simpler: Spec| {
        if simpler != spec {
            out.push(Case {
                spec: simpler,
                ..case
            });
        }
    };
    try_spec(Spec {
        dev: Device::None,
        ..spec
    });
    try_spec(Spec { bind: None, ..spec });
    try_spec(Spec {
        family6: false,
        ..spec
    });
    if spec.mode != ConnectMode::Udp {
        try_spec(Spec {
            mode: ConnectMode::Block,
            ..spec
        });
    }
    try_spec(Spec { then: None, ..spec });
    try_spec(Spec { sport: 0, ..spec });
    if let Some(cred) = spec.cred {
        // Plain credentials: the effective ids, then the real ones, no groups.
        for (uid, gid) in [(cred.euid, cred.egid), (cred.ruid, cred.rgid)] {
            try_spec(Spec {
                cred: Some(Cred::new((uid, uid), (gid, gid), &[])),
                ..spec
            });
        }
    }
    if case.client != 0 && !CLIENTS[case.client].peer && spec.cred.is_none() && spec.then.is_none()
    {
        // The plain app, unless the identity matters.
        out.push(Case { client: 0, ..case });
    }
    out
}

/// Re-runs a difference alone and shrinks it: drops flags and simplifies
/// the connection while the same class of difference stays. Returns the
/// reproduction's text.
fn minimal_reproduction(sandbox: &Sandbox, seed: u64, d: &Difference) -> String {
    let want = class(&d.case, &d.iptables, &d.ebpf);
    let same = |config: &Config, case: Case| -> Option<(String, String)> {
        let (a, b) = one_case(sandbox, config, case)?;
        (a != b && class(&case, &a, &b) == want).then_some((a, b))
    };
    let Some((mut a, mut b)) = same(&d.config, d.case) else {
        return format!(
            "    not reproduced alone (depends on the other connections, or flaky):\n{}",
            describe(&replay(seed, d.round), d)
        );
    };
    let (mut config, mut case) = (d.config.clone(), d.case);
    let mut progress = true;
    while progress {
        progress = false;
        for simpler_case in simpler(case) {
            if let Some((x, y)) = same(&config, simpler_case) {
                (case, a, b, progress) = (simpler_case, x, y, true);
                break;
            }
        }
        let mut i = 0;
        while i < config.parts() {
            let smaller = config.without(i);
            if let Some((x, y)) = same(&smaller, case) {
                (config, a, b, progress) = (smaller, x, y, true);
            } else {
                i += 1;
            }
        }
    }
    describe(
        &format!("shrunk from {}", replay(seed, d.round)),
        &Difference {
            round: d.round,
            config,
            case,
            iptables: a,
            ebpf: b,
        },
    )
}

#[test]
fn ebpf_and_iptables_agree_on_random_cases() {
    require_root!();
    let total: usize = env_or("FUZZ_DIFF_CASES", DEFAULT_CASES);
    let seed: u64 = env_or("FUZZ_DIFF_SEED", DEFAULT_SEED);
    let per_config: usize = env_or("FUZZ_DIFF_PER_CONFIG", DEFAULT_PER_CONFIG).max(1);
    let only_round: Option<usize> = std::env::var("FUZZ_DIFF_ROUND")
        .ok()
        .map(|v| v.trim().parse().expect("FUZZ_DIFF_ROUND"));
    let shrink: usize = env_or("FUZZ_DIFF_SHRINK", DEFAULT_SHRINK);
    // The connection space by default; the extended one adds
    // switched credentials, fixed source ports and SO_BINDTODEVICE=eth0,
    // where eBPF mode has known differences (docs/design.md, "What a
    // socket observes").
    let creds = match std::env::var("FUZZ_DIFF_EXTENDED").as_deref() {
        Ok("on") => true,
        Err(_) | Ok("off") => false,
        Ok(other) => panic!("FUZZ_DIFF_EXTENDED={other:?}: on or off"),
    };
    let started = Instant::now();
    let sandbox = pod_with_servers();

    // `generated` drives the rounds, so that a round's cases depend only on
    // the seed and the round (FUZZ_DIFF_ROUND replays it exactly).
    let (mut generated, mut compared, mut configs, mut round) = (0usize, 0usize, 0usize, 0usize);
    let mut differences: Vec<Difference> = Vec::new();
    let mut refused: Vec<String> = Vec::new();
    let mut refused_by_both = 0usize;
    let mut landed_out = BTreeMap::<String, usize>::new();
    let mut landed_in = BTreeMap::<String, usize>::new();
    let mut progress_at = Instant::now();
    // How many configurations drew each flag and variable.
    let mut drawn = BTreeMap::<&str, usize>::new();
    while generated < total {
        let mut rng = Rng::for_round(seed, round);
        let config = Config::random(&mut rng);
        if only_round.is_none_or(|r| r == round) {
            for (name, _) in config.flags.iter().chain(&config.env) {
                *drawn.entry(name).or_default() += 1;
            }
            if config.ipv6 {
                *drawn.entry("--ipv6=true").or_default() += 1;
            }
        }
        let cases: Vec<Case> = (0..per_config.min(total - generated))
            .map(|_| random_case(&mut rng, creds))
            .collect();
        if only_round.is_none_or(|r| r == round) {
            let ipv6 = cases.iter().filter(|c| c.spec.to.is_ipv6()).count();
            *drawn.entry("(IPv6 connections)").or_default() += ipv6;
        }
        let this = round;
        round += 1;
        generated += cases.len();
        if only_round.is_some_and(|r| r != this) {
            if only_round.is_some_and(|r| r < this) {
                break;
            }
            continue;
        }
        let (iptables, ebpf) = match (
            observe_with(&sandbox, IPTABLES, &config, &cases),
            observe_with(&sandbox, against(), &config, &cases),
        ) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(_), Err(_)) => {
                refused_by_both += 1;
                continue;
            }
            (a, b) => {
                let (who, other, why) = match (a, b) {
                    (Err(why), _) => ("iptables", against().name, why),
                    (_, Err(why)) => (against().name, "iptables", why),
                    _ => unreachable!(),
                };
                refused.push(format!(
                    "  {}: {who} mode refused what {other} mode applied: {why}\n    {}",
                    replay(seed, this),
                    config.command_line("iptables")
                ));
                continue;
            }
        };
        configs += 1;
        compared += cases.len();
        for ((case, a), b) in cases.iter().zip(&iptables).zip(&ebpf) {
            let tally = if CLIENTS[case.client].peer {
                &mut landed_in
            } else {
                &mut landed_out
            };
            *tally.entry(landing(a)).or_default() += 1;
            if a != b {
                differences.push(Difference {
                    round: this,
                    config: config.clone(),
                    case: *case,
                    iptables: a.clone(),
                    ebpf: b.clone(),
                });
            }
        }
        if progress_at.elapsed().as_secs() >= 30 {
            progress_at = Instant::now();
            eprintln!(
                "fuzz-diff: {compared}/{total} pairs, {configs} configurations, {} differences so far ({:.0} s)",
                differences.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }

    // Differences by class, the most frequent first.
    let mut classes: BTreeMap<String, Vec<&Difference>> = BTreeMap::new();
    for d in &differences {
        classes
            .entry(class(&d.case, &d.iptables, &d.ebpf))
            .or_default()
            .push(d);
    }
    let mut classes: Vec<(String, Vec<&Difference>)> = classes.into_iter().collect();
    classes.sort_by(|x, y| y.1.len().cmp(&x.1.len()).then(x.0.cmp(&y.0)));
    for (i, (name, list)) in classes.iter().enumerate() {
        println!(
            "\nfuzz-diff: difference class {} of {}: {name}: {} cases in {} rounds",
            i + 1,
            classes.len(),
            list.len(),
            list.iter().map(|d| d.round).collect::<BTreeSet<_>>().len()
        );
        println!(
            "  first found:\n{}",
            describe(&replay(seed, list[0].round), list[0])
        );
        if i < shrink {
            println!(
                "  minimal reproduction:\n{}",
                minimal_reproduction(&sandbox, seed, list[0])
            );
        }
    }
    if !refused.is_empty() {
        println!(
            "\nfuzz-diff: {} configurations one mode refused and the other applied:",
            refused.len()
        );
    }
    for line in &refused {
        println!("{line}");
    }
    let summary = format!(
        "fuzz-diff: {compared} (config, connection) pairs compared, {} differences, seed {seed} ({configs} configurations; {} applied by one mode only, {refused_by_both} refused by both; {:.0} s)",
        differences.len(),
        refused.len(),
        started.elapsed().as_secs_f64()
    );
    println!("\n{summary}");
    println!("fuzz-diff: landings from the pod: {landed_out:?}; from the peer: {landed_in:?}");
    println!("fuzz-diff: configurations drawing each flag, and IPv6 connections: {drawn:?}");
    println!(
        "fuzz-diff: {:.0} s applying and removing configurations, {:.0} s observing",
        APPLY_NS.load(Ordering::Relaxed) as f64 / 1e9,
        OBSERVE_NS.load(Ordering::Relaxed) as f64 / 1e9
    );
    if let Ok(path) = std::env::var("FUZZ_DIFF_SUMMARY") {
        let classes_text: String = classes
            .iter()
            .map(|(name, list)| format!("  {:6}  {name}\n", list.len()))
            .collect();
        let _ = std::fs::write(path, format!("{summary}\n{classes_text}"));
    }
    assert!(
        differences.is_empty() && refused.is_empty(),
        "{summary}: {} classes of difference, {} configurations applied by one mode only (above)",
        classes.len(),
        refused.len()
    );
    if only_round.is_none() {
        // Every outcome occurred, so agreement means something (a run
        // too short to show them all fails here: raise FUZZ_DIFF_CASES).
        for (tally, wanted, from) in [
            (
                &landed_out,
                &["proxy", "pod", "peer", "inbound", "dns-proxy", "nameserver"][..],
                "the pod",
            ),
            (&landed_in, &["inbound", "pod"][..], "the peer"),
        ] {
            for name in wanted {
                assert!(
                    tally.contains_key(*name),
                    "no case from {from} landed at {name}: {tally:?} (too few cases to mean anything)"
                );
            }
        }
        assert!(
            landed_out.keys().any(|k| k.starts_with("connect=E")),
            "no connection from the pod failed: {landed_out:?} (too few cases to mean anything)"
        );
    }
}
