//! The one validated capture configuration. Every backend consumes a
//! [`Config`]; nothing else of the command line reaches them.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use redirect_common::{ABI_VERSION, MAX_OWNERS, RedirectConfig};

use crate::istio::{IstioConfig, OwnerGroups};

/// Istio's defaults (`istio-iptables -p 15001 -u 1337 -g 1337`).
pub const DEFAULT_PROXY_PORT: u16 = 15001;
pub const DEFAULT_PROXY_ID: u32 = 1337;

/// What to capture and where to send it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Port the proxy listens on for captured outbound connections.
    pub proxy_port: u16,
    /// The proxy's UIDs: their connections are never captured.
    pub proxy_uids: Vec<u32>,
    /// The proxy's GIDs: their connections are never captured.
    pub proxy_gids: Vec<u32>,
    /// Destinations never captured (Istio: 127.0.0.1/32).
    pub loopback: Ipv4Cidr,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            proxy_port: DEFAULT_PROXY_PORT,
            proxy_uids: vec![DEFAULT_PROXY_ID],
            proxy_gids: vec![DEFAULT_PROXY_ID],
            loopback: Ipv4Cidr {
                addr: Ipv4Addr::LOCALHOST,
                prefix: 32,
            },
        }
    }
}

impl Config {
    /// The map entry the eBPF programs read.
    pub fn to_bpf(&self) -> RedirectConfig {
        let mut out = RedirectConfig {
            abi_version: ABI_VERSION,
            proxy_port: self.proxy_port,
            log_level: 0,
            _pad: 0,
            loopback_addr: u32::from_ne_bytes(self.loopback.network().octets()),
            loopback_mask: u32::from_ne_bytes(self.loopback.mask().octets()),
            uid_count: self.proxy_uids.len() as u32,
            gid_count: self.proxy_gids.len() as u32,
            proxy_uids: [0; MAX_OWNERS],
            proxy_gids: [0; MAX_OWNERS],
        };
        out.proxy_uids[..self.proxy_uids.len()].copy_from_slice(&self.proxy_uids);
        out.proxy_gids[..self.proxy_gids.len()].copy_from_slice(&self.proxy_gids);
        out
    }

    /// Reads back what [`Config::to_bpf`] wrote (for `redirect status`).
    pub fn from_bpf(raw: &RedirectConfig) -> Self {
        let uids = (raw.uid_count as usize).min(MAX_OWNERS);
        let gids = (raw.gid_count as usize).min(MAX_OWNERS);
        let mask = u32::from_be_bytes(raw.loopback_mask.to_ne_bytes());
        Self {
            proxy_port: raw.proxy_port,
            proxy_uids: raw.proxy_uids[..uids].to_vec(),
            proxy_gids: raw.proxy_gids[..gids].to_vec(),
            loopback: Ipv4Cidr {
                addr: Ipv4Addr::from(raw.loopback_addr.to_ne_bytes()),
                prefix: mask.count_ones() as u8,
            },
        }
    }
}

/// An IPv4 network, `a.b.c.d/n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    pub fn mask(&self) -> Ipv4Addr {
        let bits = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        };
        Ipv4Addr::from(bits)
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & u32::from(self.mask()))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("'{s}' is not an IPv4 CIDR (expected a.b.c.d/n)"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("'{s}' has a prefix length outside 0..=32"))?;
        Ok(Self { addr, prefix })
    }
}

/// Parses a proxy port: 1..=65535.
pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        Ok(p) => Err(format!("{p} is not a port number (1..=65535)")),
        Err(_) => Err(format!("'{s}' is not a port number (1..=65535)")),
    }
}

/// Parses a comma-separated list of numeric user or group ids (at most 8).
pub fn parse_ids(s: &str) -> Result<Vec<u32>, String> {
    let ids = s
        .split(',')
        .map(str::trim)
        .map(|id| {
            id.parse::<u32>()
                .map_err(|_| format!("'{id}' is not a numeric id (use e.g. 1337 or 1337,1338)"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ids.len() > MAX_OWNERS {
        return Err(format!(
            "{} ids given; at most {MAX_OWNERS} are supported",
            ids.len()
        ));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_outside_the_range_are_rejected() {
        assert_eq!(parse_port("15001"), Ok(15001));
        assert!(parse_port("0").unwrap_err().contains("1..=65535"));
        assert!(parse_port("70000").unwrap_err().contains("70000"));
        assert!(parse_port("http").is_err());
    }

    #[test]
    fn id_lists_are_numeric_and_bounded() {
        assert_eq!(parse_ids("1337"), Ok(vec![1337]));
        assert_eq!(parse_ids("1337, 1338"), Ok(vec![1337, 1338]));
        assert!(parse_ids("envoy").unwrap_err().contains("'envoy'"));
        assert!(parse_ids("").is_err());
        assert!(
            parse_ids("1,2,3,4,5,6,7,8,9")
                .unwrap_err()
                .contains("at most 8")
        );
    }

    #[test]
    fn cidrs_parse_and_normalise() {
        let c: Ipv4Cidr = "127.0.0.1/8".parse().unwrap();
        assert_eq!(c.network(), Ipv4Addr::new(127, 0, 0, 0));
        assert_eq!(c.mask(), Ipv4Addr::new(255, 0, 0, 0));
        assert!("127.0.0.1/33".parse::<Ipv4Cidr>().is_err());
        assert!("localhost".parse::<Ipv4Cidr>().is_err());
        assert_eq!("10.0.0.1".parse::<Ipv4Cidr>().unwrap().prefix, 32);
    }

    #[test]
    fn bpf_round_trip_keeps_the_config() {
        let cfg = Config {
            proxy_port: 15006,
            proxy_uids: vec![1337, 0],
            proxy_gids: vec![],
            loopback: "127.0.0.0/8".parse().unwrap(),
        };
        let back = Config::from_bpf(&cfg.to_bpf());
        assert_eq!(back.proxy_port, 15006);
        assert_eq!(back.proxy_uids, vec![1337, 0]);
        assert!(back.proxy_gids.is_empty());
        assert_eq!(back.loopback.prefix, 8);
    }
}

impl Config {
    /// The eBPF configuration equivalent to an istio-iptables one, or the
    /// reasons eBPF mode cannot honour it yet (each names its flag). This
    /// is the one translation: both backends take their decisions from the
    /// same [`IstioConfig`].
    pub fn from_istio(cfg: &IstioConfig) -> Result<Self, Vec<String>> {
        let mut unsupported = Vec::new();
        let mut need = |ok: bool, what: &str| {
            if !ok {
                unsupported.push(what.to_owned());
            }
        };
        need(
            cfg.include.wildcard,
            "-i/--istio-service-cidr other than '*' (only capture of every destination)",
        );
        need(
            cfg.exclude.v4.is_empty() && cfg.exclude.v6.is_empty(),
            "-x/--istio-service-exclude-cidr",
        );
        need(
            cfg.inbound_ports.is_empty(),
            "-b/--istio-inbound-ports (inbound capture)",
        );
        need(cfg.outbound_ports.is_empty(), "-q/--istio-outbound-ports");
        need(
            cfg.local_outbound_ports_exclude.is_empty(),
            "-o/--istio-local-outbound-ports-exclude",
        );
        need(
            cfg.exclude_interfaces.is_empty(),
            "-c/--istio-exclude-interfaces",
        );
        need(
            cfg.kube_virt_interfaces.is_empty(),
            "-k/--kube-virt-interfaces",
        );
        need(!cfg.redirect_dns, "--redirect-dns (DNS capture)");
        need(!cfg.tproxy, "-m TPROXY");
        need(!cfg.drop_invalid, "--drop-invalid");
        need(!cfg.ipv6, "IPv6 rules (the pod has IPv6, or --ipv6=true)");
        need(
            cfg.owner_groups == OwnerGroups::Except(Vec::new()),
            "ISTIO_OUTBOUND_OWNER_GROUPS / ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
        );
        let ids = |list: &[String], what: &str, unsupported: &mut Vec<String>| -> Vec<u32> {
            let parsed: Option<Vec<u32>> = list.iter().map(|id| id.trim().parse().ok()).collect();
            match parsed {
                Some(ids) if ids.len() <= MAX_OWNERS => ids,
                Some(_) => {
                    unsupported.push(format!("{what} with more than {MAX_OWNERS} ids"));
                    Vec::new()
                }
                None => {
                    unsupported.push(format!("{what} given by name (use numeric ids)"));
                    Vec::new()
                }
            }
        };
        let proxy_uids = ids(&cfg.proxy_uids, "-u/--proxy-uid", &mut unsupported);
        let proxy_gids = ids(&cfg.proxy_gids, "-g/--proxy-gid", &mut unsupported);
        let proxy_port = cfg.envoy_port.trim().parse().unwrap_or(0);
        let loopback = cfg.loopback_v4.parse::<Ipv4Cidr>();
        if loopback.is_err() {
            unsupported.push("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR".to_owned());
        }
        if !unsupported.is_empty() {
            return Err(unsupported);
        }
        Ok(Self {
            proxy_port,
            proxy_uids,
            proxy_gids,
            loopback: loopback.unwrap_or(Self::default().loopback),
        })
    }
}

#[cfg(test)]
mod istio_tests {
    use clap::Parser as _;

    use super::*;
    use crate::istio::{IstioArgs, RealHost};

    fn istio(argv: &[&str]) -> IstioConfig {
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
            .resolve(&RealHost)
            .unwrap()
    }

    #[test]
    fn default_outbound_capture_translates() {
        let cfg = Config::from_istio(&istio(&[
            "-p",
            "15002",
            "-u",
            "1337,1338",
            "-g",
            "7",
            "-i",
            "*",
        ]))
        .unwrap();
        assert_eq!(cfg.proxy_port, 15002);
        assert_eq!(cfg.proxy_uids, vec![1337, 1338]);
        assert_eq!(cfg.proxy_gids, vec![7]);
        assert_eq!(cfg.loopback.to_string(), "127.0.0.1/32");
    }

    #[test]
    fn the_sidecar_command_line_names_what_ebpf_cannot_do_yet() {
        let why = Config::from_istio(&istio(&[
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
        ]))
        .unwrap_err();
        assert_eq!(why, vec!["-b/--istio-inbound-ports (inbound capture)"]);
        let why = Config::from_istio(&istio(&[
            "-i",
            "10.0.0.0/8",
            "-x",
            "10.1.0.0/16",
            "-q",
            "80",
        ]))
        .unwrap_err();
        assert_eq!(why.len(), 3, "{why:?}");
    }
}
