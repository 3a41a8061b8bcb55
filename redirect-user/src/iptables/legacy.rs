//! The rule table of Istio's first init script (`--profile legacy`), as
//! `iptables -t nat -v -L` listed it inside a pod of that era: one source
//! for the iptables lowering (its restore document) and for what `redirect
//! status` mirrors for a legacy instance.
//!
//! ```text
//! -A PREROUTING -m comment --comment "istio/install-istio-prerouting" -j ISTIO_REDIRECT
//! -A OUTPUT -p tcp -m comment --comment "istio/install-istio-output" -j ISTIO_OUTPUT
//! -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m comment --comment "istio/redirect-implicit-loopback" -j ISTIO_REDIRECT
//! -A ISTIO_OUTPUT -m owner --uid-owner 1337 -m comment --comment "istio/bypass-envoy" -j RETURN
//! -A ISTIO_OUTPUT -d 127.0.0.1/32 -m comment --comment "istio/bypass-explicit-loopback" -j RETURN
//! -A ISTIO_OUTPUT -m comment --comment "istio/redirect-default-outbound" -j ISTIO_REDIRECT
//! -A ISTIO_REDIRECT -p tcp -m comment --comment "istio/redirect-to-envoy-port" -j REDIRECT --to-ports 15001
//! ```
//!
//! `-p` takes the place of 15001 and `-u` of 1337 (one `bypass-envoy` rule
//! per uid, in order). There is no IPv6 table.

use super::builder::Builder;

/// The names the rules carry (their `-m comment`).
pub const PREROUTING: &str = "istio/install-istio-prerouting";
pub const OUTPUT: &str = "istio/install-istio-output";
pub const IMPLICIT_LOOPBACK: &str = "istio/redirect-implicit-loopback";
pub const BYPASS_ENVOY: &str = "istio/bypass-envoy";
pub const EXPLICIT_LOOPBACK: &str = "istio/bypass-explicit-loopback";
pub const DEFAULT_OUTBOUND: &str = "istio/redirect-default-outbound";
pub const TO_ENVOY_PORT: &str = "istio/redirect-to-envoy-port";

/// The only loopback destination the table returns.
const LOOPBACK: &str = "127.0.0.1/32";

/// One rule: its chain, and its words after `-A CHAIN`.
pub struct Rule {
    pub chain: &'static str,
    pub name: &'static str,
    pub params: Vec<String>,
}

impl Rule {
    /// As iptables-save writes it.
    pub fn text(&self) -> String {
        format!("-A {} {}", self.chain, self.params.join(" "))
    }
}

/// `-m comment --comment "NAME"`, quoted as iptables-save quotes it.
fn comment(name: &str) -> [String; 4] {
    [
        "-m".into(),
        "comment".into(),
        "--comment".into(),
        format!("\"{name}\""),
    ]
}

/// The table for proxy port `port` and proxy uids `uids`, in order.
pub fn table(port: &str, uids: &[String]) -> Vec<Rule> {
    let rule = |chain, name, before: &[&str], after: &[&str]| Rule {
        chain,
        name,
        params: before
            .iter()
            .map(|w| (*w).to_owned())
            .chain(comment(name))
            .chain(after.iter().map(|w| (*w).to_owned()))
            .collect(),
    };
    let mut rules = vec![
        rule("PREROUTING", PREROUTING, &[], &["-j", "ISTIO_REDIRECT"]),
        rule("OUTPUT", OUTPUT, &["-p", "tcp"], &["-j", "ISTIO_OUTPUT"]),
        rule(
            "ISTIO_OUTPUT",
            IMPLICIT_LOOPBACK,
            &["!", "-d", LOOPBACK, "-o", "lo"],
            &["-j", "ISTIO_REDIRECT"],
        ),
    ];
    for uid in uids {
        rules.push(rule(
            "ISTIO_OUTPUT",
            BYPASS_ENVOY,
            &["-m", "owner", "--uid-owner", uid],
            &["-j", "RETURN"],
        ));
    }
    rules.extend([
        rule(
            "ISTIO_OUTPUT",
            EXPLICIT_LOOPBACK,
            &["-d", LOOPBACK],
            &["-j", "RETURN"],
        ),
        rule(
            "ISTIO_OUTPUT",
            DEFAULT_OUTBOUND,
            &[],
            &["-j", "ISTIO_REDIRECT"],
        ),
        rule(
            "ISTIO_REDIRECT",
            TO_ENVOY_PORT,
            &["-p", "tcp"],
            &["-j", "REDIRECT", "--to-ports", port],
        ),
    ]);
    rules
}

/// The table as a plan: rendered in iptables-save's form (`*nat`,
/// `:CHAIN - [0:0]`), as the listing it comes from is written.
pub fn rules(port: &str, uids: &[String]) -> Builder {
    let mut b = Builder::saved_form();
    for rule in table(port, uids) {
        let params: Vec<&str> = rule.params.iter().map(String::as_str).collect();
        b.append(rule.chain, "nat", &params);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iptables::builder::Family;

    /// (The table byte for byte against its text: tests/tests/legacy.rs.)
    #[test]
    fn the_default_table_has_istios_names_and_no_ipv6() {
        let plan = rules("15001", &["1337".to_owned()]);
        let text = plan.render(Family::V4);
        assert!(text.starts_with("*nat\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n"));
        for name in [
            PREROUTING,
            OUTPUT,
            IMPLICIT_LOOPBACK,
            BYPASS_ENVOY,
            EXPLICIT_LOOPBACK,
            DEFAULT_OUTBOUND,
            TO_ENVOY_PORT,
        ] {
            assert_eq!(text.matches(&format!("\"{name}\"")).count(), 1, "{name}");
        }
        assert_eq!(plan.render(Family::V6), "");
    }

    #[test]
    fn port_and_uids_take_the_place_of_15001_and_1337() {
        let text = rules("16001", &["1000".to_owned(), "1001".to_owned()]).render(Family::V4);
        assert!(text.contains("--to-ports 16001\n"));
        let envoy: Vec<&str> = text.lines().filter(|l| l.contains(BYPASS_ENVOY)).collect();
        assert_eq!(envoy.len(), 2);
        assert!(envoy[0].contains("--uid-owner 1000 ") && envoy[1].contains("--uid-owner 1001 "));
    }
}
