//! Applying, checking and removing Istio's rules in a network namespace,
//! with `iptables-restore`/`iptables-save` (legacy or nft).
//!
//! - The backend is chosen as istio-iptables does: legacy if it already has
//!   rules here, else nft if it has, else nft when installed;
//!   `--force-iptables-binary` overrides. Every call waits for the xtables
//!   lock (`-w`).
//! - Apply is atomic per family (`iptables-restore --noflush` of the whole
//!   document) and all-or-nothing across families: if IPv6 fails, the IPv4
//!   rules just added are removed again.
//! - What the plan looks like once in the kernel is learnt from iptables
//!   itself: the plan is restored into a throw-away network namespace and
//!   read back with `iptables-save`. That canonical form tells whether a
//!   namespace already has exactly these rules (a re-run changes nothing).
//!   Creating the namespace needs CAP_SYS_ADMIN, which istio-init does not
//!   have: without it, a namespace with no Istio rules yet (the init
//!   container's case) is still programmed; one with Istio rules needs
//!   `--reconcile`.
//! - Istio's rules in a namespace are the `ISTIO_*` chains, the rules in
//!   built-in chains that jump to them, and the plan's own rules in
//!   built-in chains (interface exclusions). Cleanup removes those, each
//!   occurrence, whatever flags installed them.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use super::builder::{Builder, Family};

/// Which iptables implementation programs the namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
}

impl Backend {
    fn program(self, family: Family, save: bool) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let verb = if save { "save" } else { "restore" };
        format!("{base}-{}-{verb}", self.name())
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Legacy => "legacy",
            Self::Nft => "nft",
        }
    }

    /// `legacy`, `nft` or `""` (detect), as `--force-iptables-binary`.
    pub fn parse(s: &str) -> Result<Option<Self>> {
        match s {
            "" => Ok(None),
            "legacy" => Ok(Some(Self::Legacy)),
            "nft" => Ok(Some(Self::Nft)),
            other => bail!("--force-iptables-binary '{other}' is not a backend: use legacy or nft"),
        }
    }

    /// Whether its `iptables-restore` is here.
    pub fn installed(self) -> bool {
        crate::host::on_path(&self.program(Family::V4, false))
    }

    /// istio-iptables' choice: legacy if it has rules here, else nft if it
    /// has, else nft (or legacy when nft is not installed). A backend whose
    /// `save` fails (no kernel support) is passed over.
    pub fn detect() -> Result<Self> {
        let usable: Vec<(Self, String)> = [Self::Legacy, Self::Nft]
            .into_iter()
            .filter(|b| b.installed())
            .filter_map(|b| save(b, Family::V4).ok().map(|dump| (b, dump)))
            .collect();
        if let Some((backend, _)) = usable
            .iter()
            .find(|(_, dump)| dump.lines().any(|l| l.starts_with("-A ")))
        {
            return Ok(*backend);
        }
        usable
            .iter()
            .map(|(b, _)| *b)
            .max_by_key(|b| *b == Self::Nft)
            .context("no usable iptables: install the iptables package (iptables-nft or iptables-legacy)")
    }
}

/// `iptables-save` of one family.
pub fn save(backend: Backend, family: Family) -> Result<String> {
    let program = backend.program(family, true);
    let out = Command::new(&program)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `iptables-restore --noflush -w` of one document.
fn restore(backend: Backend, family: Family, document: &str) -> Result<()> {
    let program = backend.program(family, false);
    let mut child = Command::new(&program)
        .args(["--noflush", "--wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(document.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The chains and rules of an `iptables-save` dump, as iptables prints them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Canonical {
    /// (table, chain) of every user-defined chain.
    pub chains: BTreeSet<(String, String)>,
    /// (table, rule line) with how many times it occurs.
    pub rules: BTreeMap<(String, String), usize>,
}

/// Whether a chain or jump target is one of Istio's.
fn istio(name: &str) -> bool {
    name.starts_with("ISTIO_")
}

/// The chain of a `-A CHAIN ...` line.
fn rule_chain(line: &str) -> &str {
    line.split_whitespace().nth(1).unwrap_or_default()
}

/// The jump target of a rule line, if any.
fn rule_target(line: &str) -> Option<&str> {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .iter()
        .position(|w| *w == "-j")
        .and_then(|i| words.get(i + 1).copied())
}

impl Canonical {
    /// Parses an `iptables-save` dump.
    pub fn parse(dump: &str) -> Self {
        let mut out = Self::default();
        let mut table = String::new();
        for line in dump.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t.trim().to_owned();
            } else if let Some(chain) = line.strip_prefix(':') {
                // A chain with a policy (`ACCEPT`, `DROP`) is built in.
                let mut fields = chain.split_whitespace();
                if let (Some(name), Some("-")) = (fields.next(), fields.next()) {
                    out.chains.insert((table.clone(), name.to_owned()));
                }
            } else if line.starts_with("-A ") {
                *out.rules
                    .entry((table.clone(), line.to_owned()))
                    .or_default() += 1;
            }
        }
        out
    }

    /// What `with` has beyond `base`.
    fn added(with: &Self, base: &Self) -> Self {
        let mut rules = BTreeMap::new();
        for (key, n) in &with.rules {
            let extra = n.saturating_sub(base.rules.get(key).copied().unwrap_or(0));
            if extra > 0 {
                rules.insert(key.clone(), extra);
            }
        }
        Self {
            chains: with.chains.difference(&base.chains).cloned().collect(),
            rules,
        }
    }

    /// Istio's part: its chains, their rules, and jumps into them.
    fn istio_part(&self) -> Self {
        Self {
            chains: self
                .chains
                .iter()
                .filter(|(_, c)| istio(c))
                .cloned()
                .collect(),
            rules: self
                .rules
                .iter()
                .filter(|((_, line), _)| {
                    istio(rule_chain(line)) || rule_target(line).is_some_and(istio)
                })
                .map(|(k, n)| (k.clone(), *n))
                .collect(),
        }
    }

    /// The plan's rules in built-in chains that are not jumps to Istio's
    /// chains (interface exclusions such as `-A PREROUTING -i eth1 -j RETURN`).
    fn builtin_extras(&self) -> impl Iterator<Item = (&(String, String), &usize)> {
        self.rules.iter().filter(|((_, line), _)| {
            !istio(rule_chain(line)) && !rule_target(line).is_some_and(istio)
        })
    }

    /// Whether `current` holds exactly this plan's Istio rules (no more, no
    /// fewer, no other Istio chain) and its other rules at least as often.
    fn in_place(&self, current: &Self) -> bool {
        current.istio_part() == self.istio_part()
            && self
                .builtin_extras()
                .all(|(key, n)| current.rules.get(key).copied().unwrap_or(0) >= *n)
    }

    /// A restore document removing Istio's rules from `current`: every jump
    /// into an Istio chain and `plan`'s built-in extras (each occurrence
    /// present), then the Istio chains (flushed, then deleted).
    fn removal(current: &Self, plan: Option<&Self>) -> String {
        let mut deletes: BTreeMap<&String, Vec<String>> = BTreeMap::new();
        for ((table, line), n) in &current.rules {
            let jump_in = !istio(rule_chain(line)) && rule_target(line).is_some_and(istio);
            let extra = plan.map_or(0, |p| {
                p.rules
                    .get(&(table.clone(), line.clone()))
                    .copied()
                    .unwrap_or(0)
            });
            let extra = if istio(rule_chain(line)) || jump_in {
                0
            } else {
                extra.min(*n)
            };
            let times = if jump_in { *n } else { extra };
            for _ in 0..times {
                deletes
                    .entry(table)
                    .or_default()
                    .push(format!("-D{}", &line[2..]));
            }
        }
        let mut chains: BTreeMap<&String, Vec<&String>> = BTreeMap::new();
        for (table, chain) in current.chains.iter().filter(|(_, c)| istio(c)) {
            chains.entry(table).or_default().push(chain);
        }
        let tables: BTreeSet<&String> = deletes.keys().chain(chains.keys()).copied().collect();
        let mut out = String::new();
        for table in tables {
            out.push_str(&format!("*{table}\n"));
            for line in deletes.get(table).into_iter().flatten() {
                out.push_str(line);
                out.push('\n');
            }
            for chain in chains.get(table).into_iter().flatten() {
                out.push_str(&format!("-F {chain}\n"));
            }
            for chain in chains.get(table).into_iter().flatten() {
                out.push_str(&format!("-X {chain}\n"));
            }
            out.push_str("COMMIT\n");
        }
        out
    }
}

/// The plan as iptables stores it, per family; `None` when this process
/// cannot create the scratch namespace it needs to find out.
fn canonical(
    backend: Backend,
    plan: &Builder,
    families: &[Family],
) -> Result<Option<Vec<Canonical>>> {
    crate::netns::in_scratch(|| {
        families
            .iter()
            .map(|&family| {
                let base = Canonical::parse(&save(backend, family)?);
                restore(backend, family, &plan.render(family)).context(
                    "iptables rejected the rules in a scratch namespace (nothing was changed here; \
                     `--dry-run` prints them)",
                )?;
                let with = Canonical::parse(&save(backend, family)?);
                Ok(Canonical::added(&with, &base))
            })
            .collect::<Result<Vec<_>>>()
    })
}

pub use crate::applied::Applied;

fn families(ipv6: bool) -> Vec<Family> {
    if ipv6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

/// Applies `plan` in this process's network namespace.
pub fn apply(backend: Backend, plan: &Builder, ipv6: bool, reconcile: bool) -> Result<Applied> {
    let families = families(ipv6);
    let wanted = canonical(backend, plan, &families)?;
    let current: Vec<Canonical> = families
        .iter()
        .map(|&f| Ok(Canonical::parse(&save(backend, f)?)))
        .collect::<Result<_>>()?;
    if let Some(wanted) = &wanted
        && wanted.iter().zip(&current).all(|(w, c)| w.in_place(c))
    {
        return Ok(Applied::AlreadyPresent);
    }
    let occupied = current.iter().any(|c| !c.istio_part().chains.is_empty());
    if occupied {
        if !reconcile {
            let why = if wanted.is_some() {
                "different Istio rules are already in place"
            } else {
                "Istio rules are already in place, and without CAP_SYS_ADMIN they cannot be compared with these"
            };
            bail!("{why}: pass --reconcile to replace them, or remove them with --cleanup-only");
        }
        for ((family, now), want) in families.iter().zip(&current).zip(
            wanted
                .iter()
                .flatten()
                .map(Some)
                .chain(std::iter::repeat(None)),
        ) {
            let removal = Canonical::removal(now, want);
            if !removal.is_empty() {
                restore(backend, *family, &removal)
                    .context("removing the Istio rules in place (--reconcile)")?;
            }
        }
    }
    let mut done: Vec<Family> = Vec::new();
    for family in &families {
        if let Err(err) = restore(backend, *family, &plan.render(*family)) {
            let mut problems = Vec::new();
            for family in done {
                let undo = save(backend, family).and_then(|dump| {
                    let removal = Canonical::removal(&Canonical::parse(&dump), None);
                    restore(backend, family, &removal)
                });
                if let Err(undo) = undo {
                    problems.push(format!("{undo:#}"));
                }
            }
            if problems.is_empty() {
                return Err(err.context("applying the rules (the ones already added were removed)"));
            }
            return Err(err.context(format!(
                "applying the rules; removing the ones already added also failed: {}",
                problems.join("; ")
            )));
        }
        done.push(*family);
    }
    Ok(if occupied {
        Applied::Replaced
    } else {
        Applied::Installed
    })
}

/// Removes Istio's rules and chains from this namespace (see the module
/// documentation). Returns whether anything was removed.
pub fn cleanup(backend: Backend, plan: &Builder, ipv6: bool) -> Result<bool> {
    let families = families(ipv6);
    let wanted = canonical(backend, plan, &families)?;
    let mut removed = false;
    for (i, family) in families.iter().enumerate() {
        let now = Canonical::parse(&save(backend, *family)?);
        let removal = Canonical::removal(&now, wanted.as_ref().and_then(|w| w.get(i)));
        if !removal.is_empty() {
            restore(backend, *family, &removal)?;
            removed = true;
        }
    }
    Ok(removed)
}

/// Removes Istio's chains and the jumps into them from this network
/// namespace, whichever flags or profile installed them (IPv6 too where
/// the kernel has it), with the backend that holds them. Returns the
/// backend and whether anything was removed.
pub fn remove_istio_rules() -> Result<(Backend, bool)> {
    let backend = Backend::detect()?;
    let ipv6 = std::path::Path::new("/proc/net/if_inet6").exists();
    let removed = cleanup(backend, &Builder::new(ipv6), ipv6)?;
    Ok((backend, removed))
}

/// TPROXY's policy routing, as istio-iptables sets it up outside dry runs:
/// packets marked `mark` are looked up in `table`, which delivers
/// everything locally; with IPv6, the same, and `::6` on `lo` (the IPv6
/// inbound passthrough source).
pub mod routes {
    use std::process::Command;

    use anyhow::{Context as _, Result, bail};

    fn ip(args: &[&str]) -> Result<String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .context("running ip (install iproute2)")?;
        if !out.status.success() {
            bail!(
                "ip {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn families(ipv6: bool) -> &'static [&'static str] {
        if ipv6 { &["-4", "-6"] } else { &["-4"] }
    }

    pub fn add(mark: &str, table: &str, ipv6: bool) -> Result<()> {
        for f in families(ipv6) {
            let rule = format!("lookup {table}");
            if !ip(&[f, "rule", "show"])?
                .lines()
                .any(|l| l.contains("fwmark") && l.ends_with(&rule))
            {
                ip(&[f, "rule", "add", "fwmark", mark, "lookup", table])?;
            }
            ip(&[
                f, "route", "replace", "local", "default", "dev", "lo", "table", table,
            ])?;
        }
        if ipv6 && !ip(&["-6", "addr", "show", "dev", "lo"])?.contains("::6/128") {
            ip(&["-6", "addr", "add", "::6/128", "dev", "lo"])?;
        }
        Ok(())
    }

    pub fn remove(mark: &str, table: &str, ipv6: bool) {
        for f in families(ipv6) {
            let _ = ip(&[f, "rule", "del", "fwmark", mark, "lookup", table]);
            let _ = ip(&[f, "route", "flush", "table", table]);
        }
        if ipv6 {
            let _ = ip(&["-6", "addr", "del", "::6/128", "dev", "lo"]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n\
        -A PREROUTING -i eth9 -j RETURN\n-A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -j RETURN\nCOMMIT\n";

    #[test]
    fn only_an_exact_match_is_in_place() {
        let base = Canonical::parse("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n");
        let plan = Canonical::added(&Canonical::parse(PLAN), &base);
        assert!(
            !plan.chains.contains(&("nat".into(), "OUTPUT".into())),
            "built-in chains are not ours"
        );
        assert!(plan.in_place(&Canonical::parse(PLAN)));
        // One more rule in an Istio chain: not the same configuration.
        let more = PLAN.replace(
            "-A ISTIO_OUTPUT -j RETURN\n",
            "-A ISTIO_OUTPUT -j RETURN\n-A ISTIO_OUTPUT -d 10.0.0.0/8 -j RETURN\n",
        );
        assert!(!plan.in_place(&Canonical::parse(&more)));
        // An extra Istio chain: not the same either.
        let chain = PLAN.replace(
            ":ISTIO_OUTPUT - [0:0]\n",
            ":ISTIO_OUTPUT - [0:0]\n:ISTIO_INBOUND - [0:0]\n",
        );
        assert!(!plan.in_place(&Canonical::parse(&chain)));
    }

    #[test]
    fn removal_takes_every_jump_and_each_duplicate_then_the_chains() {
        let base = Canonical::parse("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n");
        let plan = Canonical::added(&Canonical::parse(PLAN), &base);
        let now = Canonical::parse(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n\
             -A PREROUTING -i eth9 -j RETURN\n-A PREROUTING -i eth9 -j RETURN\n-A PREROUTING -j ISTIO_OUTPUT\n\
             -A OUTPUT -j ISTIO_OUTPUT\n-A OUTPUT -j OTHER\n-A ISTIO_OUTPUT -j RETURN\nCOMMIT\n",
        );
        assert_eq!(
            Canonical::removal(&now, Some(&plan)),
            "*nat\n-D OUTPUT -j ISTIO_OUTPUT\n-D PREROUTING -i eth9 -j RETURN\n-D PREROUTING -j ISTIO_OUTPUT\n\
             -F ISTIO_OUTPUT\n-X ISTIO_OUTPUT\nCOMMIT\n"
        );
        // Without the plan (no scratch namespace), only Istio's own part goes.
        assert!(!Canonical::removal(&now, None).contains("eth9"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// No `iptables-save` output, however odd, panics the comparison
        /// or the removal document built from it.
        #[test]
        fn any_save_output_parses(
            dump in concat!(
                "((\\*[a-z]{0,6}|:[A-Z_]{0,12} [-A-Z]{0,6}|-A [A-Z_]{0,12}( -j [A-Z_]{0,12})?",
                "|-A|COMMIT)\n){0,12}|\\PC{0,60}",
            ),
        ) {
            let now = Canonical::parse(&dump);
            let plan = Canonical::added(&Canonical::parse(PLAN), &now);
            let _ = plan.in_place(&now);
            let _ = Canonical::removal(&now, Some(&plan));
            let _ = Canonical::removal(&now, None);
        }
    }
}
