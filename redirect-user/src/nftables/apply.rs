//! Applying and removing Istio's native nftables rules in a network
//! namespace, with `nft -f -` (one atomic transaction each).
//!
//! - Apply hands nft the [`Transaction`] Istio's native nftables mode
//!   builds, preceded by the removal of Istio's three `inet` tables
//!   (`add table` then `delete table`, which works whether or not a table
//!   is there). Istio's own transaction only adds and flushes the tables
//!   it writes to, which leaves the chains, and the tables, a run with
//!   other flags made; this way a re-run leaves exactly this
//!   configuration's rules, in one step.
//! - What the rules look like once in the kernel is learnt from nft
//!   itself: the transaction is applied in a throw-away network namespace
//!   and listed back (`nft -s`, without counters). When the namespace
//!   already lists the same, nothing is applied. Without CAP_SYS_ADMIN (no
//!   scratch namespace) the transaction is applied anyway: it replaces
//!   whatever Istio tables are there.
//! - Cleanup deletes the Istio tables that are there (`inet
//!   istio-proxy-nat`, `-mangle`, `-raw`), whatever flags made them, and
//!   nothing else.

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Result, anyhow, bail};

use super::{Table, Transaction};

pub use crate::applied::Applied;

/// The `nft` program, or the one-line error that says how to get it.
pub fn nft() -> Result<PathBuf> {
    crate::host::which("nft").ok_or_else(|| {
        anyhow!("no nft here: install the nftables package (Istio's native nftables mode applies its rules with nft)")
    })
}

/// Runs `nft ARGS` with `input` on stdin; its stdout, or an error with the
/// first line of its stderr.
fn run(nft: &PathBuf, args: &[&str], input: Option<&str>) -> Result<String> {
    let mut child = Command::new(nft)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| anyhow!("running {}: {err}", nft.display()))?;
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "nft {} failed: {}",
            args.join(" "),
            stderr.lines().next().unwrap_or("(no message)").trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Istio's tables present in this namespace, in Istio's order.
fn present(nft: &PathBuf) -> Result<Vec<Table>> {
    let listed = run(nft, &["list", "tables"], None)?;
    Ok(Table::ALL
        .into_iter()
        .filter(|t| {
            listed
                .lines()
                .any(|l| l.trim() == format!("table inet {}", t.name()))
        })
        .collect())
}

/// Istio's tables as nft lists them, without counters: what "the same
/// rules" means.
fn listing(nft: &PathBuf) -> Result<String> {
    let mut out = String::new();
    for table in present(nft)? {
        out.push_str(&run(
            nft,
            &["-s", "list", "table", "inet", table.name()],
            None,
        )?);
    }
    Ok(out)
}

/// The transaction `apply` hands to nft: Istio's tables removed, then
/// `tx` (see the module documentation).
pub fn document(tx: &Transaction) -> String {
    let mut out = String::new();
    for table in Table::ALL {
        let name = table.name();
        out.push_str(&format!(
            "add table inet {name}\ndelete table inet {name}\n"
        ));
    }
    out.push_str(&tx.render());
    out
}

/// `tx` as this namespace's nft would list it; `None` when this process
/// cannot create the scratch namespace it needs to find out.
fn wanted(nft: &PathBuf, document: &str) -> Result<Option<String>> {
    crate::netns::in_scratch(|| {
        run(nft, &["-f", "-"], Some(document)).map_err(|err| {
            anyhow!("{err:#} (in a scratch namespace: nothing was changed here; `--dry-run` prints the rules)")
        })?;
        listing(nft)
    })
}

/// Applies `tx` in this process's network namespace.
pub fn apply(tx: &Transaction) -> Result<Applied> {
    let nft = nft()?;
    let document = document(tx);
    let before = listing(&nft)?;
    if wanted(&nft, &document)?.is_some_and(|w| w == before) {
        return Ok(Applied::AlreadyPresent);
    }
    run(&nft, &["-f", "-"], Some(&document))?;
    Ok(if before.is_empty() {
        Applied::Installed
    } else {
        Applied::Replaced
    })
}

/// Deletes Istio's tables from this namespace, in one transaction.
/// Returns whether there were any.
pub fn cleanup() -> Result<bool> {
    let nft = nft()?;
    let tables = present(&nft)?;
    if tables.is_empty() {
        return Ok(false);
    }
    let document: String = tables
        .iter()
        .map(|t| format!("delete table inet {}\n", t.name()))
        .collect();
    run(&nft, &["-f", "-"], Some(&document))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nftables::Chain;

    #[test]
    fn the_document_removes_every_istio_table_before_istios_transaction() {
        let mut tx = Transaction::new();
        tx.add(Table::Nat, Chain::IstioOutput, "counter return".into());
        let doc = document(&tx);
        for table in ["istio-proxy-nat", "istio-proxy-mangle", "istio-proxy-raw"] {
            assert!(
                doc.contains(&format!(
                    "add table inet {table}\ndelete table inet {table}\n"
                )),
                "{doc}"
            );
        }
        assert!(doc.ends_with(&tx.render()), "{doc}");
        assert!(
            doc.find("delete table inet istio-proxy-raw")
                < doc.find("add chain inet istio-proxy-nat")
        );
    }
}
