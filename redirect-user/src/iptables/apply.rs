//! Applying, checking and removing the rules of a plan in a network
//! namespace, with `iptables-restore`/`iptables-save` (legacy or nft).
//!
//! - The backend is chosen as istio-iptables does: the one that already has
//!   rules in this namespace, else nft when installed; `--force-iptables-binary`
//!   overrides. Every call waits for the xtables lock (`-w`).
//! - Apply is atomic per family (`iptables-restore --noflush` of the whole
//!   document) and all-or-nothing across families: if IPv6 fails, the IPv4
//!   rules just added are removed again.
//! - What the plan looks like once in the kernel is learnt from iptables
//!   itself: the plan is restored into a throw-away network namespace and
//!   read back with `iptables-save`. That canonical form tells whether a
//!   namespace already has exactly these rules (a re-run changes nothing)
//!   and which lines a cleanup must delete (exactly those, nothing else).

use std::{
    collections::BTreeSet,
    fs::File,
    io::Write as _,
    os::fd::AsRawFd as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, anyhow, bail};

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
        let kind = match self {
            Self::Legacy => "legacy",
            Self::Nft => "nft",
        };
        let verb = if save { "save" } else { "restore" };
        format!("{base}-{kind}-{verb}")
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

    fn installed(self) -> bool {
        which(&self.program(Family::V4, false))
    }

    /// The backend that already has rules here, else nft when installed.
    pub fn detect() -> Result<Self> {
        let installed: Vec<Self> = [Self::Nft, Self::Legacy]
            .into_iter()
            .filter(|b| b.installed())
            .collect();
        if installed.is_empty() {
            bail!(
                "iptables is not installed: install the iptables package (iptables-legacy or iptables-nft)"
            );
        }
        for backend in &installed {
            if save(*backend, Family::V4)?
                .lines()
                .any(|l| l.starts_with("-A "))
            {
                return Ok(*backend);
            }
        }
        Ok(installed[0])
    }
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(program).is_file())
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

/// The lines of an `iptables-save` that a plan creates, per table:
/// `-N`-style chain names and rule lines, as iptables prints them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Canonical {
    /// (table, chain) of every chain the plan creates.
    pub chains: BTreeSet<(String, String)>,
    /// (table, rule line) of every rule the plan adds.
    pub rules: BTreeSet<(String, String)>,
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
                // A chain with a policy (`ACCEPT`, `DROP`) is built in: never ours.
                let mut fields = chain.split_whitespace();
                let (Some(name), Some("-")) = (fields.next(), fields.next()) else {
                    continue;
                };
                out.chains.insert((table.clone(), name.to_owned()));
            } else if line.starts_with("-A ") {
                out.rules.insert((table.clone(), line.to_owned()));
            }
        }
        out
    }

    /// What `plan` adds to `base` (both parsed dumps).
    fn added(plan: &Self, base: &Self) -> Self {
        Self {
            chains: plan.chains.difference(&base.chains).cloned().collect(),
            rules: plan.rules.difference(&base.rules).cloned().collect(),
        }
    }

    /// Whether everything in `self` is present in `dump`.
    fn present_in(&self, dump: &Self) -> bool {
        self.chains.is_subset(&dump.chains) && self.rules.is_subset(&dump.rules)
    }

    /// Whether anything in `self` is present in `dump`.
    fn any_in(&self, dump: &Self) -> bool {
        !self.chains.is_disjoint(&dump.chains) || !self.rules.is_disjoint(&dump.rules)
    }

    /// A restore document deleting what of `self` is present in `dump`:
    /// rules first, then the chains (flushed, then removed).
    fn removal(&self, dump: &Self) -> String {
        let mut out = String::new();
        let tables: BTreeSet<&String> = self
            .chains
            .iter()
            .map(|(t, _)| t)
            .chain(self.rules.iter().map(|(t, _)| t))
            .collect();
        for table in tables {
            let rules: Vec<&String> = self
                .rules
                .iter()
                .filter(|(t, r)| t == table && dump.rules.contains(&(t.clone(), r.clone())))
                .map(|(_, r)| r)
                .collect();
            let chains: Vec<&String> = self
                .chains
                .iter()
                .filter(|(t, c)| t == table && dump.chains.contains(&(t.clone(), c.clone())))
                .map(|(_, c)| c)
                .collect();
            if rules.is_empty() && chains.is_empty() {
                continue;
            }
            out.push_str(&format!("*{table}\n"));
            for rule in rules {
                out.push_str(&format!("-D{}\n", &rule[2..]));
            }
            for chain in &chains {
                out.push_str(&format!("-F {chain}\n"));
            }
            for chain in &chains {
                out.push_str(&format!("-X {chain}\n"));
            }
            out.push_str("COMMIT\n");
        }
        out
    }
}

/// Runs `f` in a new, empty network namespace (on a thread of its own, so
/// this process stays where it is), for child processes it starts.
fn in_scratch_netns<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: affects only this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).context(
                    "creating a scratch network namespace to read the rules back (needs CAP_SYS_ADMIN)",
                );
            }
            f()
        })
        .join()
        .map_err(|_| anyhow!("scratch namespace thread panicked"))?
    })
}

/// The plan as iptables stores it, per family.
fn canonical(backend: Backend, plan: &Builder, families: &[Family]) -> Result<Vec<Canonical>> {
    in_scratch_netns(|| {
        families
            .iter()
            .map(|&family| {
                let base = Canonical::parse(&save(backend, family)?);
                restore(backend, family, &plan.render(family))?;
                let with = Canonical::parse(&save(backend, family)?);
                Ok(Canonical::added(&with, &base))
            })
            .collect()
    })
}

/// What applying did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Installed,
    /// The namespace already had exactly these rules.
    AlreadyPresent,
}

fn families(ipv6: bool) -> Vec<Family> {
    if ipv6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

/// Applies `plan` in this process's network namespace.
pub fn apply(backend: Backend, plan: &Builder, ipv6: bool) -> Result<Applied> {
    let families = families(ipv6);
    let wanted = canonical(backend, plan, &families)?;
    let current: Vec<Canonical> = families
        .iter()
        .map(|&f| Ok(Canonical::parse(&save(backend, f)?)))
        .collect::<Result<_>>()?;
    if wanted.iter().zip(&current).all(|(w, c)| w.present_in(c)) {
        return Ok(Applied::AlreadyPresent);
    }
    if wanted
        .iter()
        .zip(&current)
        .any(|(w, c)| w.chains.iter().any(|ch| c.chains.contains(ch)))
    {
        bail!(
            "this network namespace already has Istio chains with other rules: remove them first \
             (`redirect istio-iptables --cleanup-only` with the flags they were installed with)"
        );
    }
    let mut done: Vec<(Family, &Canonical)> = Vec::new();
    for (family, want) in families.iter().zip(&wanted) {
        if let Err(err) = restore(backend, *family, &plan.render(*family)) {
            for (family, want) in done {
                let now = Canonical::parse(&save(backend, family)?);
                let _ = restore(backend, family, &want.removal(&now));
            }
            return Err(err);
        }
        done.push((*family, want));
    }
    Ok(Applied::Installed)
}

/// Removes the rules and chains `plan` creates from this namespace (only
/// those present). Returns whether anything was removed.
pub fn cleanup(backend: Backend, plan: &Builder, ipv6: bool) -> Result<bool> {
    let families = families(ipv6);
    let wanted = canonical(backend, plan, &families)?;
    let mut removed = false;
    for (family, want) in families.iter().zip(&wanted) {
        let now = Canonical::parse(&save(backend, *family)?);
        if want.any_in(&now) {
            restore(backend, *family, &want.removal(&now))?;
            removed = true;
        }
    }
    Ok(removed)
}

/// Moves this (still single-threaded) process into the network namespace
/// at `path` (a `/proc/PID/ns/net` or `/run/netns/NAME` file).
pub fn enter_netns(path: &Path) -> Result<()> {
    let file = File::open(path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    // SAFETY: setns on a descriptor we own.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!(
                "entering network namespace {} (needs CAP_SYS_ADMIN)",
                path.display()
            )
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_deletes_only_what_is_present_rules_first() {
        let plan = Canonical::parse(
            "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -j RETURN\nCOMMIT\n",
        );
        let base = Canonical::parse("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n");
        let added = Canonical::added(&plan, &base);
        assert!(
            !added.chains.contains(&("nat".into(), "OUTPUT".into())),
            "built-in chains are not ours"
        );
        let now = Canonical::parse(
            "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\n-A OUTPUT -j OTHER\n-A ISTIO_OUTPUT -j RETURN\nCOMMIT\n",
        );
        assert_eq!(
            added.removal(&now),
            "*nat\n-D ISTIO_OUTPUT -j RETURN\n-D OUTPUT -j ISTIO_OUTPUT\n-F ISTIO_OUTPUT\n-X ISTIO_OUTPUT\nCOMMIT\n"
        );
        assert!(added.present_in(&now));
        assert!(!added.present_in(&base));
    }
}
