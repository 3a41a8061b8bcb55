//! Istio's native nftables mode (`istio-iptables --native-nftables`): the
//! transaction Istio's `tools/istio-nftables` builds, as the text it hands
//! to `nft -f -`.
//!
//! [`rules::rules`] lowers a [`crate::capture::Capture`] into a
//! [`Transaction`] in Istio's order; [`Transaction::render`] writes it the
//! way knftables' `Transaction.String()` does, so `--native-nftables
//! --dry-run` can be compared with Istio's golden files byte for byte
//! (`../shared/conformance/istio-nftables/`). [`apply`] hands it to
//! `nft -f -` and removes Istio's tables again.

pub mod apply;
pub mod rules;

/// Istio's tables, all in the `inet` family, in the order their blocks
/// appear in the transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Nat,
    Mangle,
    Raw,
}

impl Table {
    const ALL: [Table; 3] = [Table::Nat, Table::Mangle, Table::Raw];

    fn name(self) -> &'static str {
        match self {
            Table::Nat => "istio-proxy-nat",
            Table::Mangle => "istio-proxy-mangle",
            Table::Raw => "istio-proxy-raw",
        }
    }

    /// The chains Istio declares in this table, in its order; the base
    /// chains with their hook (priorities are iptables' nat, mangle and raw
    /// ones, so the rules run where istio-iptables' would).
    fn chains(self) -> &'static [(Chain, Option<Hook>)] {
        const NAT: &[(Chain, Option<Hook>)] = &[
            (Chain::Prerouting, Hook::base("nat", "prerouting", -100)),
            (Chain::Output, Hook::base("nat", "output", -100)),
            (Chain::Inbound, None),
            (Chain::Redirect, None),
            (Chain::InRedirect, None),
            (Chain::IstioOutput, None),
            (Chain::OutputDns, None),
        ];
        const MANGLE: &[(Chain, Option<Hook>)] = &[
            (Chain::Prerouting, Hook::base("filter", "prerouting", -150)),
            // A route chain: a mark set here reroutes the packet, as in
            // iptables' mangle OUTPUT.
            (Chain::Output, Hook::base("route", "output", -150)),
            (Chain::Divert, None),
            (Chain::Tproxy, None),
            (Chain::Inbound, None),
            (Chain::Drop, None),
        ];
        const RAW: &[(Chain, Option<Hook>)] = &[
            (Chain::Prerouting, Hook::base("filter", "prerouting", -300)),
            (Chain::Output, Hook::base("filter", "output", -300)),
            (Chain::Inbound, None),
            (Chain::OutputDns, None),
        ];
        match self {
            Table::Nat => NAT,
            Table::Mangle => MANGLE,
            Table::Raw => RAW,
        }
    }
}

/// A base chain's type, hook and priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hook {
    kind: &'static str,
    hook: &'static str,
    priority: i32,
}

impl Hook {
    const fn base(kind: &'static str, hook: &'static str, priority: i32) -> Option<Self> {
        Some(Self {
            kind,
            hook,
            priority,
        })
    }
}

/// Istio's chains (a chain belongs to a table; the same name in two tables
/// is two chains).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chain {
    Prerouting,
    Output,
    Inbound,
    Redirect,
    InRedirect,
    IstioOutput,
    OutputDns,
    Divert,
    Tproxy,
    Drop,
}

impl Chain {
    pub fn name(self) -> &'static str {
        match self {
            Chain::Prerouting => "prerouting",
            Chain::Output => "output",
            Chain::Inbound => "istio-inbound",
            Chain::Redirect => "istio-redirect",
            Chain::InRedirect => "istio-in-redirect",
            Chain::IstioOutput => "istio-output",
            Chain::OutputDns => "istio-output-dns",
            Chain::Divert => "istio-divert",
            Chain::Tproxy => "istio-tproxy",
            Chain::Drop => "istio-drop",
        }
    }
}

/// One rule of the transaction: `index` set when it is written as an
/// `insert rule ... index N`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    table: Table,
    chain: Chain,
    index: Option<usize>,
    text: String,
}

/// The rules of one configuration, in the order Istio generates them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transaction {
    rules: Vec<Rule>,
}

impl Transaction {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many rules `chain` of `table` has so far.
    fn count(&self, table: Table, chain: Chain) -> usize {
        self.rules
            .iter()
            .filter(|r| r.table == table && r.chain == chain)
            .count()
    }

    fn push(&mut self, table: Table, chain: Chain, index: Option<usize>, text: String) {
        debug_assert!(
            table.chains().iter().any(|(c, _)| *c == chain),
            "{} has no chain {}",
            table.name(),
            chain.name()
        );
        self.rules.push(Rule {
            table,
            chain,
            index,
            text,
        });
    }

    /// `add rule`: appends `text` to the chain.
    pub fn add(&mut self, table: Table, chain: Chain, text: String) {
        self.push(table, chain, None, text);
    }

    /// Inserts `text` at `index` (0 is the head). nft refuses an index the
    /// chain does not have yet, so, as Istio does, an insert into a chain
    /// with no rules so far, or at or past its end, is written as a plain
    /// `add rule`.
    pub fn insert(&mut self, table: Table, chain: Chain, index: usize, text: String) {
        let count = self.count(table, chain);
        let index = (count != 0 && index < count).then_some(index);
        self.push(table, chain, index, text);
    }

    /// The transaction as `nft -f -` reads it: per table that has rules
    /// (nat, mangle, raw), `add table` and `flush table` (so applying it
    /// replaces Istio's rules at once), the chains that have rules in
    /// Istio's order, then the rules in the order they were made.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for table in Table::ALL {
            let name = table.name();
            if self.rules.iter().all(|r| r.table != table) {
                continue;
            }
            out.push_str(&format!("add table inet {name}\nflush table inet {name}\n"));
            for (chain, hook) in table.chains() {
                if self.count(table, *chain) == 0 {
                    continue;
                }
                out.push_str(&format!("add chain inet {name} {}", chain.name()));
                if let Some(Hook {
                    kind,
                    hook,
                    priority,
                }) = hook
                {
                    out.push_str(&format!(
                        " {{ type {kind} hook {hook} priority {priority} ; }}"
                    ));
                }
                out.push('\n');
            }
            for rule in self.rules.iter().filter(|r| r.table == table) {
                let chain = rule.chain.name();
                match rule.index {
                    Some(index) => out.push_str(&format!(
                        "insert rule inet {name} {chain} index {index} {}\n",
                        rule.text
                    )),
                    None => out.push_str(&format!("add rule inet {name} {chain} {}\n", rule.text)),
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(tx: &Transaction) -> Vec<Option<usize>> {
        tx.rules.iter().map(|r| r.index).collect()
    }

    #[test]
    fn an_insert_into_an_empty_chain_is_an_add() {
        let mut tx = Transaction::new();
        tx.insert(
            Table::Nat,
            Chain::Prerouting,
            0,
            "iifname eth1 counter return".into(),
        );
        assert_eq!(ops(&tx), [None]);
        assert!(
            tx.render()
                .contains("add rule inet istio-proxy-nat prerouting iifname eth1 counter return\n")
        );
    }

    #[test]
    fn an_insert_at_or_past_the_end_is_an_add_and_within_is_an_insert() {
        let mut tx = Transaction::new();
        tx.add(Table::Mangle, Chain::Inbound, "a".into());
        tx.insert(Table::Mangle, Chain::Inbound, 1, "b".into()); // 1 rule: at the end
        tx.insert(Table::Mangle, Chain::Inbound, 5, "c".into()); // past the end
        tx.insert(Table::Mangle, Chain::Inbound, 0, "d".into()); // 3 rules: within
        tx.insert(Table::Mangle, Chain::Inbound, 3, "e".into()); // 4 rules: within
        assert_eq!(ops(&tx), [None, None, None, Some(0), Some(3)]);
        assert!(
            tx.render()
                .ends_with("insert rule inet istio-proxy-mangle istio-inbound index 0 d\ninsert rule inet istio-proxy-mangle istio-inbound index 3 e\n")
        );
    }

    #[test]
    fn rules_are_counted_per_table_and_chain() {
        let mut tx = Transaction::new();
        tx.add(Table::Nat, Chain::Inbound, "a".into());
        tx.add(Table::Nat, Chain::Prerouting, "b".into());
        // The mangle table's istio-inbound is another chain: still empty.
        tx.insert(Table::Mangle, Chain::Inbound, 0, "c".into());
        tx.insert(Table::Nat, Chain::Inbound, 0, "d".into());
        assert_eq!(ops(&tx), [None, None, None, Some(0)]);
    }

    #[test]
    fn only_tables_and_chains_with_rules_are_written_in_istio_order() {
        let mut tx = Transaction::new();
        tx.add(
            Table::Raw,
            Chain::Output,
            "counter jump istio-output-dns".into(),
        );
        tx.add(Table::Nat, Chain::IstioOutput, "counter return".into());
        tx.add(
            Table::Nat,
            Chain::Output,
            "counter jump istio-output".into(),
        );
        assert_eq!(
            tx.render(),
            "add table inet istio-proxy-nat\n\
             flush table inet istio-proxy-nat\n\
             add chain inet istio-proxy-nat output { type nat hook output priority -100 ; }\n\
             add chain inet istio-proxy-nat istio-output\n\
             add rule inet istio-proxy-nat istio-output counter return\n\
             add rule inet istio-proxy-nat output counter jump istio-output\n\
             add table inet istio-proxy-raw\n\
             flush table inet istio-proxy-raw\n\
             add chain inet istio-proxy-raw output { type filter hook output priority -300 ; }\n\
             add rule inet istio-proxy-raw output counter jump istio-output-dns\n"
        );
        assert_eq!(Transaction::new().render(), "");
    }
}
