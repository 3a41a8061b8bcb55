//! eBPF mode: the embedded programs, and installing them on a cgroup and
//! the pod's network namespace.

pub mod config;
pub mod features;
mod instances;
pub mod listener;
pub mod loader;
pub mod lower;
pub mod maps;
pub mod node_set;
pub mod privilege;
pub mod probe_record;
mod removal;
pub mod routes;
pub mod routes6;
mod set_upgrade;
pub mod sys;
pub mod timing;
pub mod virt;

/// The oldest kernel eBPF mode runs on: cgroup bpf_links (attach without
/// exclusive flags, pinnable, replaceable in place) arrived in 5.7, the
/// ring buffer of the programs' log and getpeername hooks in 5.8, and so
/// did the getsockopt rule that `optlen` 0 passes the kernel's own answer.
pub const MIN_KERNEL: (u8, u8) = (5, 8);

/// The compiled `redirect-ebpf` object, built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect-ebpf"));

/// Which aya program type loads a hook's program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    SockAddr,
    SockOps,
    Sockopt,
    SkLookup,
    /// A tc program on an interface (a TCX link).
    SchedCls,
}

impl Kind {
    /// `enum bpf_prog_type` value.
    pub const fn prog_type(self) -> u32 {
        match self {
            Self::SockAddr => 18, // BPF_PROG_TYPE_CGROUP_SOCK_ADDR
            Self::SockOps => 13,  // BPF_PROG_TYPE_SOCK_OPS
            Self::Sockopt => 25,  // BPF_PROG_TYPE_CGROUP_SOCKOPT
            Self::SkLookup => 30, // BPF_PROG_TYPE_SK_LOOKUP
            Self::SchedCls => 3,  // BPF_PROG_TYPE_SCHED_CLS
        }
    }
}

/// The configurations a hook's program has work in. Each program decides
/// from the configuration in force, so one that a configuration gives no
/// work returns at once; not loading it spares the install its
/// verification (the DNS programs are a third of it) and every send and
/// receive its run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    Always,
    /// `--redirect-dns`: the sendmsg and recvmsg programs.
    DnsCapture,
    /// `-b`: sk_lookup, and getsockname for the inbound port.
    InboundCapture,
    /// `-k`: the tc programs.
    KubeVirt,
}

/// A program of the object and the hook it is attached to: a cgroup hook
/// (every one in [`HOOKS`]) or the network namespace's [`SK_LOOKUP`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hook {
    /// Name of the program function in `redirect-ebpf`.
    pub program: &'static str,
    /// Short name used in status output and in the link's pin name.
    pub name: &'static str,
    /// Name of the kernel feature in `redirect probe` (and for
    /// `--assume-missing`), e.g. `cgroup/connect4`.
    pub feature: &'static str,
    pub kind: Kind,
    /// `enum bpf_attach_type` value of the hook.
    pub attach_type: u32,
    /// First kernel (major, minor) that has the hook.
    pub min_kernel: (u8, u8),
    /// Whether capture works without it (it is then skipped and reported).
    pub optional: bool,
    /// Which configurations run it (an instance loads and attaches only
    /// those its configuration needs).
    pub needs: Needs,
    /// What it replaces in Istio's rule set.
    pub mirrors: &'static str,
}

impl Hook {
    /// File name of the pinned link in the instance directory.
    pub fn pin_name(&self) -> String {
        format!("link_{}", self.name)
    }

    /// File name of the pinned program its links run: what an upgrade
    /// holds open to put back on a failure (opening a link's program by
    /// id would need CAP_SYS_ADMIN).
    pub fn prog_pin_name(&self) -> String {
        format!("prog_{}", self.name)
    }

    /// Where an upgrade pins the new program before renaming it over
    /// [`Self::prog_pin_name`] (left only by one killed in between; bpffs
    /// takes no dots in names).
    pub fn prog_staging_name(&self) -> String {
        format!("prog_{}_new", self.name)
    }

    /// Whether `config` gives the hook's program work ([`Needs`]).
    pub fn needed_by(&self, config: &config::Config) -> bool {
        match self.needs {
            Needs::Always => true,
            Needs::DnsCapture => config.dns.is_some(),
            Needs::InboundCapture => config.inbound.is_some(),
            Needs::KubeVirt => !config.virt_ifaces.is_empty(),
        }
    }

    /// The program that serves the hook for an instance whose
    /// configuration in force has IPv6 rules before or after the install
    /// (`ipv6`), or has them neither: then connect6 and sendmsg6 are the
    /// programs without the IPv6 decision ([`CONNECT6_V4`],
    /// [`SENDMSG6_V4`]), which decide alike while no IPv6 rules are in
    /// force, so either may run as the configuration changes. Every other
    /// hook has one program.
    pub fn serving(self, ipv6: bool) -> Hook {
        match self {
            CONNECT6 if !ipv6 => CONNECT6_V4,
            SENDMSG6 if !ipv6 => SENDMSG6_V4,
            hook => hook,
        }
    }

    /// The first kernel with the hook, "major.minor".
    pub fn first_kernel(&self) -> String {
        format!("{}.{}", self.min_kernel.0, self.min_kernel.1)
    }
}

pub const CONNECT4: Hook = Hook {
    program: "redirect_connect4",
    name: "connect4",
    feature: "cgroup/connect4",
    kind: Kind::SockAddr,
    attach_type: 10, // BPF_CGROUP_INET4_CONNECT
    min_kernel: (4, 17),
    optional: false,
    needs: Needs::Always,
    mirrors: "nat OUTPUT -> ISTIO_OUTPUT -> ISTIO_REDIRECT",
};

pub const SOCKOPS: Hook = Hook {
    program: "redirect_sockops",
    name: "sockops",
    feature: "sockops",
    kind: Kind::SockOps,
    attach_type: 3, // BPF_CGROUP_SOCK_OPS
    min_kernel: (4, 13),
    optional: false,
    needs: Needs::Always,
    mirrors: "conntrack entries of redirected connections",
};

pub const GETSOCKOPT: Hook = Hook {
    program: "redirect_getsockopt",
    name: "getsockopt",
    feature: "cgroup/getsockopt",
    kind: Kind::Sockopt,
    attach_type: 21, // BPF_CGROUP_GETSOCKOPT
    min_kernel: (5, 3),
    optional: false,
    needs: Needs::Always,
    mirrors: "conntrack's SO_ORIGINAL_DST answer",
};

pub const CONNECT6: Hook = Hook {
    program: "redirect_connect6",
    name: "connect6",
    feature: "cgroup/connect6",
    kind: Kind::SockAddr,
    attach_type: 11, // BPF_CGROUP_INET6_CONNECT
    min_kernel: (4, 17),
    optional: false,
    needs: Needs::Always,
    mirrors: "the same for dual-stack sockets to ::ffff:a.b.c.d; ip6tables' ISTIO_OUTPUT for IPv6",
};

/// [`CONNECT6`] for a pod without Istio's IPv6 table (see
/// [`Hook::serving`]): an IPv4-mapped destination is decided as there, a
/// native IPv6 one is left alone and counted. Verified in about a third of
/// [`CONNECT6`]'s instructions. Its kernel name (the first 15 bytes)
/// differs from [`CONNECT6`]'s.
pub const CONNECT6_V4: Hook = Hook {
    program: "redirect_conn6_v4",
    ..CONNECT6
};

pub const GETPEERNAME6: Hook = Hook {
    program: "redirect_getpeername6",
    name: "getpeername6",
    feature: "cgroup/getpeername6",
    kind: Kind::SockAddr,
    attach_type: 30, // BPF_CGROUP_INET6_GETPEERNAME
    min_kernel: (5, 8),
    optional: true,
    needs: Needs::Always,
    mirrors: "REDIRECT leaves the app's peer address unchanged",
};

pub const GETPEERNAME4: Hook = Hook {
    program: "redirect_getpeername4",
    name: "getpeername4",
    feature: "cgroup/getpeername4",
    kind: Kind::SockAddr,
    attach_type: 29, // BPF_CGROUP_INET4_GETPEERNAME
    min_kernel: (5, 8),
    optional: true,
    needs: Needs::Always,
    mirrors: "REDIRECT leaves the app's peer address unchanged",
};

pub const GETSOCKNAME4: Hook = Hook {
    program: "redirect_getsockname4",
    name: "getsockname4",
    feature: "cgroup/getsockname4",
    kind: Kind::SockAddr,
    attach_type: 31, // BPF_CGROUP_INET4_GETSOCKNAME
    min_kernel: (5, 8),
    optional: true,
    needs: Needs::InboundCapture,
    mirrors: "REDIRECT moves inbound connections to the inbound port",
};

pub const GETSOCKNAME6: Hook = Hook {
    program: "redirect_getsockname6",
    name: "getsockname6",
    feature: "cgroup/getsockname6",
    kind: Kind::SockAddr,
    attach_type: 32, // BPF_CGROUP_INET6_GETSOCKNAME
    min_kernel: (5, 8),
    optional: true,
    needs: Needs::InboundCapture,
    mirrors: "REDIRECT moves inbound connections to the inbound port",
};

pub const SENDMSG4: Hook = Hook {
    program: "redirect_sendmsg4",
    name: "sendmsg4",
    feature: "cgroup/sendmsg4",
    kind: Kind::SockAddr,
    attach_type: 14, // BPF_CGROUP_UDP4_SENDMSG
    min_kernel: (4, 18),
    optional: false,
    needs: Needs::DnsCapture,
    mirrors: "nat ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT (unconnected UDP)",
};

pub const SENDMSG6: Hook = Hook {
    program: "redirect_sendmsg6",
    name: "sendmsg6",
    feature: "cgroup/sendmsg6",
    kind: Kind::SockAddr,
    attach_type: 15, // BPF_CGROUP_UDP6_SENDMSG
    min_kernel: (4, 18),
    optional: false,
    needs: Needs::DnsCapture,
    mirrors: "the same for dual-stack sockets to ::ffff:a.b.c.d; ip6tables' for IPv6",
};

/// [`SENDMSG6`] for a pod without Istio's IPv6 table, as
/// [`CONNECT6_V4`] is for [`CONNECT6`].
pub const SENDMSG6_V4: Hook = Hook {
    program: "redirect_send6_v4",
    ..SENDMSG6
};

pub const RECVMSG4: Hook = Hook {
    program: "redirect_recvmsg4",
    name: "recvmsg4",
    feature: "cgroup/recvmsg4",
    kind: Kind::SockAddr,
    attach_type: 19, // BPF_CGROUP_UDP4_RECVMSG
    min_kernel: (5, 2),
    optional: false,
    needs: Needs::DnsCapture,
    mirrors: "conntrack's reverse NAT of captured DNS replies",
};

pub const RECVMSG6: Hook = Hook {
    program: "redirect_recvmsg6",
    name: "recvmsg6",
    feature: "cgroup/recvmsg6",
    kind: Kind::SockAddr,
    attach_type: 20, // BPF_CGROUP_UDP6_RECVMSG
    min_kernel: (5, 2),
    optional: false,
    needs: Needs::DnsCapture,
    mirrors: "the same for dual-stack sockets and IPv6",
};

/// The inbound hook, attached to the pod's network namespace (not its
/// cgroup) when inbound capture is configured: needed only for `-b`.
pub const SK_LOOKUP: Hook = Hook {
    program: "redirect_sk_lookup",
    name: "sk_lookup",
    feature: "sk_lookup",
    kind: Kind::SkLookup,
    attach_type: 36, // BPF_SK_LOOKUP
    min_kernel: (5, 9),
    optional: true,
    needs: Needs::InboundCapture,
    mirrors: "nat PREROUTING -> ISTIO_INBOUND -> ISTIO_IN_REDIRECT",
};

/// `-k`'s hooks, attached to each KubeVirt interface (one link per
/// interface, see [`Hook::virt_pin_name`]): REDIRECT's rewrite of what
/// arrives there, and conntrack's reverse one of the replies. TCX links
/// (kernel 6.6) are what makes them pinnable and replaceable in place as
/// every other hook is; before 6.6 `-k` is refused and auto mode programs
/// iptables.
pub const VIRT_INGRESS: Hook = Hook {
    program: "redirect_virt_ingress",
    name: "virt_ingress",
    feature: "tcx/ingress",
    kind: Kind::SchedCls,
    attach_type: 46, // BPF_TCX_INGRESS
    min_kernel: (6, 6),
    optional: true,
    needs: Needs::KubeVirt,
    mirrors: "nat PREROUTING -i X -j ISTIO_REDIRECT (-k)",
};

pub const VIRT_EGRESS: Hook = Hook {
    program: "redirect_virt_egress",
    name: "virt_egress",
    feature: "tcx/egress",
    kind: Kind::SchedCls,
    attach_type: 47, // BPF_TCX_EGRESS
    min_kernel: (6, 6),
    optional: true,
    needs: Needs::KubeVirt,
    mirrors: "conntrack's reverse NAT of what -k's REDIRECT took",
};

/// The two `-k` hooks.
pub const VIRT_HOOKS: [Hook; 2] = [VIRT_INGRESS, VIRT_EGRESS];

impl Hook {
    /// File name of the pinned link of a `-k` hook on interface `ifindex`
    /// (bpffs refuses names with a dot).
    pub fn virt_pin_name(&self, ifindex: u32) -> String {
        format!("{}_if{ifindex}", self.pin_name())
    }

    /// The interface index a pin file of this `-k` hook is for.
    pub fn virt_pin_ifindex(&self, file: &str) -> Option<u32> {
        file.strip_prefix(&self.pin_name())?
            .strip_prefix("_if")?
            .parse()
            .ok()
    }
}

/// Every hook, the cgroup ones, then the network namespace's, then the
/// interfaces'.
pub fn all_hooks() -> impl Iterator<Item = Hook> {
    HOOKS.into_iter().chain([SK_LOOKUP]).chain(VIRT_HOOKS)
}

/// Every cgroup hook an instance attaches, in attach order: the ones that track
/// and answer first, connect4 last, so that every connection it redirects
/// is already tracked and answerable. Uninstall goes in reverse.
pub const HOOKS: [Hook; 12] = [
    SOCKOPS,
    GETSOCKOPT,
    GETPEERNAME4,
    GETPEERNAME6,
    GETSOCKNAME4,
    GETSOCKNAME6,
    RECVMSG4,
    RECVMSG6,
    SENDMSG6,
    SENDMSG4,
    CONNECT6,
    CONNECT4,
];

#[cfg(test)]
mod tests {
    use super::{
        CONNECT6, CONNECT6_V4, HOOKS, SENDMSG6, SENDMSG6_V4, SK_LOOKUP, VIRT_HOOKS, all_hooks,
        config::{Config, Dns, Inbound},
    };

    #[test]
    fn only_connect6_and_sendmsg6_have_a_program_without_the_ipv6_decision() {
        for hook in all_hooks() {
            assert_eq!(hook.serving(true), hook, "{}", hook.name);
            let lean = hook.serving(false);
            match hook {
                CONNECT6 => assert_eq!(lean, CONNECT6_V4),
                SENDMSG6 => assert_eq!(lean, SENDMSG6_V4),
                _ => assert_eq!(lean, hook, "{}", hook.name),
            }
            // The same hook, pins and feature; another program, whose
            // kernel name (15 bytes) tells it apart.
            assert_eq!(
                (lean.name, lean.attach_type, lean.feature),
                (hook.name, hook.attach_type, hook.feature)
            );
            if lean != hook {
                assert_ne!(lean.program[..15], hook.program[..15]);
            }
        }
    }

    fn needed(config: &Config) -> Vec<&'static str> {
        all_hooks()
            .filter(|h| h.needed_by(config))
            .map(|h| h.name)
            .collect()
    }

    #[test]
    fn a_configuration_needs_the_hooks_it_gives_work() {
        let always = [
            "sockops",
            "getsockopt",
            "getpeername4",
            "getpeername6",
            "connect6",
            "connect4",
        ];
        let plain = Config::default();
        assert_eq!(needed(&plain), always);
        let dns = Config {
            dns: Some(Dns::default()),
            ..Config::default()
        };
        let mut with_dns = needed(&dns);
        with_dns.retain(|h| !always.contains(h));
        assert_eq!(with_dns, ["recvmsg4", "recvmsg6", "sendmsg6", "sendmsg4"]);
        let inbound = Config {
            inbound: Some(Inbound::default()),
            ..Config::default()
        };
        let mut with_inbound = needed(&inbound);
        with_inbound.retain(|h| !always.contains(h));
        assert_eq!(
            with_inbound,
            ["getsockname4", "getsockname6", SK_LOOKUP.name]
        );
        let virt = Config {
            virt_ifaces: vec![super::config::VirtIface {
                ifindex: 2,
                addr4: None,
                addr6: None,
                addr6_link: None,
            }],
            ..Config::default()
        };
        assert!(VIRT_HOOKS.iter().all(|h| h.needed_by(&virt)));
        assert!(VIRT_HOOKS.iter().all(|h| !h.needed_by(&plain)));
        // Every hook has some configuration that needs it.
        let all = Config {
            dns: Some(Dns::default()),
            ..virt.clone()
        };
        let all = Config {
            inbound: Some(Inbound::default()),
            ..all
        };
        assert!(HOOKS.iter().all(|h| h.needed_by(&all)));
    }
}
