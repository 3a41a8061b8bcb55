//! The typed parsers of every capture flag, one each, for every command
//! line: they accept exactly what istio-iptables accepts (lists split on
//! `,` with empty items dropped and items kept verbatim, spaces around a
//! number allowed, `a:b` port ranges) and name the flag in their errors.

use std::net::IpAddr;

use super::{Cidrs, Given, InboundPorts, Ipv4Cidr, PortList, Ports, Prefix};

/// Splits a comma list as istio-iptables does: no trimming, empty items dropped.
pub fn split(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|i| !i.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A port number, 1-65535 (spaces around it allowed, as iptables takes
/// them from istio-iptables' rules).
pub fn port_number(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err(format!("'{s}' is not a port number (1-65535)")),
    }
}

/// A single port flag (`-p`, `-z`, `-e`), keeping its text.
pub fn port(flag: &str, s: &str) -> Result<Given<u16>, String> {
    let value = port_number(s).map_err(|why| format!("{flag}: {why}"))?;
    Ok(Given {
        value,
        text: s.to_owned(),
    })
}

/// One item of a port list: a port, or a range `a:b` (also `a:` up to
/// 65535 and `:b` from 1), as iptables' `--dport` takes it.
fn ports_item(s: &str) -> Result<Ports, String> {
    let Some((first, last)) = s.trim().split_once(':') else {
        let p = port_number(s)?;
        return Ok(Ports { first: p, last: p });
    };
    let bound = |b: &str, default: u16| {
        if b.trim().is_empty() {
            Ok(default)
        } else {
            port_number(b)
        }
    };
    let (first, last) = (bound(first, 1)?, bound(last, 65535)?);
    if first > last {
        return Err(format!("'{s}' is not a port range (first above last)"));
    }
    Ok(Ports { first, last })
}

/// A comma-separated port list (`-q`, `-o`, `-d`, and `-b` when not `*`),
/// each item as given.
pub fn port_list(flag: &str, s: &str) -> Result<PortList, String> {
    split(s)
        .into_iter()
        .map(|item| {
            let value = ports_item(&item).map_err(|why| format!("{flag}: {why}"))?;
            Ok(Given { value, text: item })
        })
        .collect()
}

/// `-b`: empty for none, `*` for every port, else a port list (as
/// istio-iptables compares it: exactly).
pub fn inbound_ports(s: &str) -> Result<InboundPorts, String> {
    match s {
        "" => Ok(InboundPorts::Off),
        "*" => Ok(InboundPorts::All),
        _ => port_list("-b/--istio-inbound-ports", s).map(InboundPorts::List),
    }
}

/// `-m`: `true` for TPROXY, `false` for REDIRECT (istio-iptables' two modes).
pub fn interception_mode(mode: &str) -> Result<bool, String> {
    match mode {
        "" | "REDIRECT" => Ok(false),
        "TPROXY" => Ok(true),
        other => Err(format!(
            "-m/--istio-inbound-interception-mode '{other}' is not a mode: use REDIRECT or TPROXY"
        )),
    }
}

/// A number flag (`-t`, `-r`), keeping its text.
pub fn number(flag: &str, s: &str) -> Result<Given<u32>, String> {
    let value = s
        .parse::<u32>()
        .map_err(|_| format!("{flag} '{s}' is not a number"))?;
    Ok(Given {
        value,
        text: s.to_owned(),
    })
}

/// Parses `addr/bits` strictly (as Go's netip.ParsePrefix): no zone, bits
/// in decimal without leading zeros, within the family's range.
pub fn prefix(s: &str) -> Result<Prefix, String> {
    let (addr, bits) = s.rsplit_once('/').ok_or("no '/'")?;
    if addr.contains('%') {
        return Err("a zone is not allowed in a CIDR".into());
    }
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("'{addr}' is not an IP address"))?;
    if bits.is_empty()
        || (bits.len() > 1 && bits.starts_with('0'))
        || !bits.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(format!("bad prefix length '{bits}'"));
    }
    let bits: u8 = bits
        .parse()
        .map_err(|_| format!("bad prefix length '{bits}'"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if bits > max {
        return Err(format!("prefix length {bits} is out of range"));
    }
    Ok(Prefix { addr, bits })
}

/// A CIDR flag's value (`*`, or a comma list), as istio-iptables reads it.
pub fn cidrs(flag: &str, value: &str) -> Result<Cidrs, String> {
    if value == "*" {
        return Ok(Cidrs {
            wildcard: true,
            ..Cidrs::default()
        });
    }
    let mut out = Cidrs::default();
    for item in split(value) {
        let p = prefix(&item).map_err(|why| format!("{flag}: '{item}' is not a CIDR ({why})"))?;
        out.has_loopback |= p.addr.is_loopback();
        match p.addr {
            IpAddr::V4(_) => out.v4.push(p),
            IpAddr::V6(_) => out.v6.push(p),
        }
    }
    Ok(out)
}

/// `-x`: like [`cidrs`], but `*` would exclude every destination.
pub fn exclude_cidrs(value: &str) -> Result<Cidrs, String> {
    if value == "*" {
        return Err(
            "-x/--istio-service-exclude-cidr cannot be '*' (it would exclude every destination): list CIDRs, or leave it empty"
                .to_owned(),
        );
    }
    cidrs("-x/--istio-service-exclude-cidr", value)
}

/// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`: an IPv4 loopback network with a
/// prefix of 8 to 32 bits.
pub fn loopback(cidr: &str) -> Result<Given<Ipv4Cidr>, String> {
    let bad = |why: &str| {
        format!(
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR '{cidr}' {why}: use a network inside 127.0.0.0/8 with a prefix of 8 to 32 bits"
        )
    };
    let p = prefix(cidr).map_err(|_| bad("is not a CIDR"))?;
    let IpAddr::V4(addr) = p.addr else {
        return Err(bad("is not an IPv4 loopback network"));
    };
    if !addr.is_loopback() {
        return Err(bad("is not an IPv4 loopback network"));
    }
    if !(8..=32).contains(&p.bits) {
        return Err(bad("has a prefix outside 8-32"));
    }
    Ok(Given {
        value: Ipv4Cidr {
            addr,
            prefix: p.bits,
        },
        text: cidr.to_owned(),
    })
}

/// Istio's loopback network, `127.0.0.1/32`.
pub fn default_loopback() -> Given<Ipv4Cidr> {
    Given {
        value: Ipv4Cidr {
            addr: std::net::Ipv4Addr::LOCALHOST,
            prefix: 32,
        },
        text: "127.0.0.1/32".to_owned(),
    }
}

/// Go's `strconv.ParseBool`, as istio-iptables' flags use.
pub fn go_bool(v: &str) -> Result<bool, String> {
    parse_bool(v).ok_or_else(|| format!("'{v}' is not a boolean (true/false, 1/0, t/f)"))
}

/// [`go_bool`] as an option (an unparsable environment value is ignored).
pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Default capacity of the original-destination tuple map: redirected
/// connections between the app's and the proxy's end of their handshake
/// at once. A full accept queue (`somaxconn`, 4,096) on the proxy's
/// listener holds at most this many.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4096;
/// Bounds of `--max-connections`.
pub const MAX_CONNECTIONS_RANGE: std::ops::RangeInclusive<u32> = 256..=1 << 20;

/// `--max-connections`.
pub fn max_connections(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if MAX_CONNECTIONS_RANGE.contains(&n) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a connection count ({}..={})",
            MAX_CONNECTIONS_RANGE.start(),
            MAX_CONNECTIONS_RANGE.end()
        )),
    }
}

/// A comma-separated list of numeric user or group ids (`install -u`).
pub fn ids(s: &str) -> Result<Vec<String>, String> {
    s.split(',')
        .map(str::trim)
        .map(|id| {
            id.parse::<u32>()
                .map(|n| n.to_string())
                .map_err(|_| format!("'{id}' is not a numeric id (use e.g. 1337 or 1337,1338)"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn lists_are_split_like_istio_and_keep_their_text() {
        let list = port_list("-q", "4000, 5000,,6000:6010,").expect("list");
        let texts: Vec<&str> = list.iter().map(|g| g.text.as_str()).collect();
        assert_eq!(texts, ["4000", " 5000", "6000:6010"]);
        assert_eq!(list[1].value.single(), Some(5000));
        assert_eq!(
            list[2].value,
            Ports {
                first: 6000,
                last: 6010
            }
        );
        assert_eq!(
            port_list("-q", "1024:").expect("open range")[0].value.last,
            65535
        );
        assert!(port_list("-q", "9:8").is_err());
        assert!(port_list("-q", "0").is_err());
        assert!(port_list("-q", "65536").is_err());
        assert!(port_list("-q", "http").is_err());
    }

    #[test]
    fn ports_outside_the_range_are_rejected() {
        assert!(port_number("0").is_err());
        assert!(port_number("65536").is_err());
        assert_eq!(port_number(" 15001 "), Ok(15001));
    }

    #[test]
    fn cidrs_keep_host_bits_and_split_by_family() {
        let c = cidrs("-i", "10.0.0.1/8,::1/128,127.0.0.0/8").expect("cidrs");
        assert_eq!(c.v4[0].to_string(), "10.0.0.1/8");
        assert_eq!(c.v6[0].to_string(), "::1/128");
        assert!(c.has_loopback);
        assert_eq!(c.v4_cidrs()[0].network().to_string(), "10.0.0.0");
        assert!(cidrs("-i", "10.0.0.1/08").is_err());
        assert!(exclude_cidrs("*").is_err());
    }

    #[test]
    fn id_lists_are_numeric() {
        assert_eq!(ids("1337, 1338").expect("ids"), ["1337", "1338"]);
        assert!(ids("istio-proxy").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// No text makes a parser panic.
        #[test]
        fn parsers_never_panic(s in any::<String>()) {
            let _ = port_list("-q", &s);
            let _ = inbound_ports(&s);
            let _ = cidrs("-i", &s);
            let _ = loopback(&s);
            let _ = ids(&s);
            let _ = max_connections(&s);
            let _ = number("-t", &s);
        }

        /// A port list's values are the numbers its items name.
        #[test]
        fn port_lists_round_trip(ports in proptest::collection::vec(1u16..=65535, 0..20)) {
            let text = ports.iter().map(|p| format!(" {p}")).collect::<Vec<_>>().join(",");
            let list = port_list("-q", &text).expect("valid list");
            let back: Vec<u16> = list.iter().filter_map(|g| g.value.single()).collect();
            prop_assert_eq!(back, ports);
        }
    }
}
