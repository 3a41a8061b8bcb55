//! Rules as istio-iptables builds them, and the `iptables-restore`
//! documents they render to.
//!
//! Rules are recorded per family in the order they are added, never
//! reordered; an insert is recorded as an `-I CHAIN N` line at its place
//! in that order. [`Builder::render`] turns one family's rules into a
//! restore document exactly as Istio writes it, so `--dry-run` output can
//! be compared with Istio's golden files byte for byte.

use std::collections::{BTreeMap, HashSet};

/// Chains iptables defines itself (never declared with `-N`), and the
/// built-in targets.
const BUILTIN: [&str; 8] = [
    "INPUT",
    "OUTPUT",
    "FORWARD",
    "PREROUTING",
    "POSTROUTING",
    "ACCEPT",
    "RETURN",
    "DROP",
];

/// One rule: the chain and table it belongs to, and its words starting
/// with `-A CHAIN` or `-I CHAIN N`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub chain: String,
    pub table: &'static str,
    pub words: Vec<String>,
}

/// Which address family a rule is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Collects the IPv4 and (when enabled) IPv6 rules of one configuration.
#[derive(Debug)]
pub struct Builder {
    v4: Vec<Rule>,
    v6: Vec<Rule>,
    ipv6: bool,
    /// Render as iptables-save writes (`*nat`, `:CHAIN - [0:0]` in name
    /// order) rather than as istio-iptables does (`* nat`, `-N CHAIN`).
    saved_form: bool,
}

fn words(chain: &str, lead: &[&str], rest: &[&str]) -> Vec<String> {
    lead.iter()
        .copied()
        .chain(std::iter::once(chain))
        .chain(rest.iter().copied())
        .map(str::to_owned)
        .collect()
}

impl Builder {
    /// `ipv6`: whether IPv6 rules are generated at all.
    pub fn new(ipv6: bool) -> Self {
        Self {
            v4: Vec::new(),
            v6: Vec::new(),
            ipv6,
            saved_form: false,
        }
    }

    /// IPv4 rules rendered in iptables-save's form (see [`Builder::render`]).
    pub fn saved_form() -> Self {
        Self {
            saved_form: true,
            ..Self::new(false)
        }
    }

    fn push(&mut self, family: Family, chain: &str, table: &'static str, words: Vec<String>) {
        let rule = Rule {
            chain: chain.to_owned(),
            table,
            words,
        };
        match family {
            Family::V4 => self.v4.push(rule),
            Family::V6 if self.ipv6 => self.v6.push(rule),
            Family::V6 => {}
        }
    }

    /// `-A chain params...` for one family.
    pub fn append_to(&mut self, family: Family, chain: &str, table: &'static str, params: &[&str]) {
        self.push(family, chain, table, words(chain, &["-A"], params));
    }

    /// `-A chain params...` for both families.
    pub fn append(&mut self, chain: &str, table: &'static str, params: &[&str]) {
        self.append_to(Family::V4, chain, table, params);
        self.append_to(Family::V6, chain, table, params);
    }

    /// `-A chain params...` for both families, with `versioned` standing
    /// for `v4` in the IPv4 rule and `v6` in the IPv6 rule.
    pub fn append_versioned(
        &mut self,
        chain: &str,
        table: &'static str,
        (v4, v6): (&str, &str),
        params: &[&str],
    ) {
        for (family, value) in [(Family::V4, v4), (Family::V6, v6)] {
            let params: Vec<&str> = params
                .iter()
                .map(|p| if *p == VERSIONED { value } else { p })
                .collect();
            self.append_to(family, chain, table, &params);
        }
    }

    /// `-I chain position params...` for one family.
    pub fn insert_to(
        &mut self,
        family: Family,
        chain: &str,
        table: &'static str,
        position: u32,
        params: &[&str],
    ) {
        let position = position.to_string();
        let mut all = words(chain, &["-I"], &[&position]);
        all.extend(params.iter().map(|p| (*p).to_owned()));
        self.push(family, chain, table, all);
    }

    /// `-I chain position params...` for both families.
    pub fn insert(&mut self, chain: &str, table: &'static str, position: u32, params: &[&str]) {
        self.insert_to(Family::V4, chain, table, position, params);
        self.insert_to(Family::V6, chain, table, position, params);
    }

    /// The rules of one family, in order.
    pub fn rules(&self, family: Family) -> &[Rule] {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }

    /// One family's `iptables-restore` document: per table (in name order),
    /// `* table`, a `-N` for every chain the rules use that iptables does
    /// not define (in order of first use; chains only jumped to last), the
    /// rules in order, `COMMIT`. Empty when the family has no rules. In
    /// the saved form: `*table`, then `:CHAIN - [0:0]` for those chains in
    /// name order, as iptables-save lists them.
    pub fn render(&self, family: Family) -> String {
        if self.saved_form {
            render_saved(self.rules(family))
        } else {
            render(self.rules(family))
        }
    }
}

/// Marks the parameter [`Builder::append_versioned`] replaces per family.
pub const VERSIONED: &str = "\0versioned";

fn render(rules: &[Rule]) -> String {
    let mut tables: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut declared: HashSet<(&str, &str)> = HashSet::new();
    for rule in rules {
        if declared.insert((rule.chain.as_str(), rule.table))
            && !BUILTIN.contains(&rule.chain.as_str())
        {
            tables
                .entry(rule.table)
                .or_default()
                .push(format!("-N {}", rule.chain));
        }
    }
    for rule in rules {
        if let [.., jump, target] = rule.words.as_slice()
            && jump == "-j"
            && declared.insert((target.as_str(), rule.table))
            && !BUILTIN.contains(&target.as_str())
        {
            tables
                .entry(rule.table)
                .or_default()
                .push(format!("-N {target}"));
        }
    }
    for rule in rules {
        tables
            .entry(rule.table)
            .or_default()
            .push(rule.words.join(" "));
    }
    document(tables, "* ")
}

/// One restore document: per table, `<header><table>`, its lines, `COMMIT`.
fn document(tables: BTreeMap<&str, Vec<String>>, header: &str) -> String {
    let mut out = String::new();
    for (table, lines) in tables {
        out.push_str(&format!("{header}{table}\n"));
        for line in lines {
            out.push_str(&line);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

fn render_saved(rules: &[Rule]) -> String {
    let mut tables: BTreeMap<&str, (std::collections::BTreeSet<&str>, Vec<String>)> =
        BTreeMap::new();
    for rule in rules {
        let (chains, lines) = tables.entry(rule.table).or_default();
        let target = match rule.words.as_slice() {
            [.., jump, target] if jump == "-j" => Some(target.as_str()),
            _ => None,
        };
        for chain in std::iter::once(rule.chain.as_str()).chain(target) {
            if !BUILTIN.contains(&chain) {
                chains.insert(chain);
            }
        }
        lines.push(rule.words.join(" "));
    }
    let tables = tables
        .into_iter()
        .map(|(table, (chains, lines))| {
            let declared = chains.into_iter().map(|c| format!(":{c} - [0:0]"));
            (table, declared.chain(lines).collect())
        })
        .collect();
    document(tables, "*")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_are_declared_in_first_use_order_and_tables_sorted() {
        let mut b = Builder::new(false);
        b.append(
            "ISTIO_INBOUND",
            "nat",
            &["-p", "tcp", "--dport", "15008", "-j", "RETURN"],
        );
        b.append("PREROUTING", "mangle", &["-j", "ISTIO_DIVERT"]);
        b.append("OUTPUT", "nat", &["-j", "ISTIO_OUTPUT"]);
        b.append("ISTIO_OUTPUT", "nat", &["-j", "RETURN"]);
        assert_eq!(
            b.render(Family::V4),
            "* mangle\n-N ISTIO_DIVERT\n-A PREROUTING -j ISTIO_DIVERT\nCOMMIT\n\
             * nat\n-N ISTIO_INBOUND\n-N ISTIO_OUTPUT\n\
             -A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN\n-A OUTPUT -j ISTIO_OUTPUT\n\
             -A ISTIO_OUTPUT -j RETURN\nCOMMIT\n"
        );
    }

    #[test]
    fn versioned_values_and_disabled_ipv6() {
        let mut b = Builder::new(false);
        b.append_versioned(
            "ISTIO_OUTPUT",
            "nat",
            ("127.0.0.1/32", "::1/128"),
            &["-d", VERSIONED, "-j", "RETURN"],
        );
        b.insert("PREROUTING", "nat", 1, &["-i", "eth1", "-j", "RETURN"]);
        assert_eq!(
            b.render(Family::V4),
            "* nat\n-N ISTIO_OUTPUT\n-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n-I PREROUTING 1 -i eth1 -j RETURN\nCOMMIT\n"
        );
        assert_eq!(b.render(Family::V6), "");
        let mut b = Builder::new(true);
        b.append_versioned(
            "ISTIO_OUTPUT",
            "nat",
            ("127.0.0.1/32", "::1/128"),
            &["-d", VERSIONED, "-j", "RETURN"],
        );
        assert!(
            b.render(Family::V6)
                .contains("-A ISTIO_OUTPUT -d ::1/128 -j RETURN")
        );
    }
}
