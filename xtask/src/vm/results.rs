//! Reading per-test results out of the console, and the matrix.

use std::collections::BTreeMap;

use super::initramfs::{BEGIN, END};

/// The result of one test on one kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
}

impl Outcome {
    pub fn cell(&self) -> String {
        match self {
            Self::Pass => "pass".to_owned(),
            Self::Fail(why) => format!("FAIL: {why}"),
            Self::Skip(why) => format!("skip: {why}"),
        }
    }

    pub fn status(&self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail(_) => "fail",
            Self::Skip(_) => "skip",
        }
    }
}

/// Parses the console of one boot: `binary::test` -> outcome. libtest runs
/// with `--show-output`, so the captured output of every test follows in
/// `---- name stdout ----` sections: a skipped test printed `skipped: why`
/// there, a failed one its panic message.
pub fn parse(console: &str) -> BTreeMap<String, Outcome> {
    let mut results = BTreeMap::new();
    let mut binary = String::new();
    let mut section: Option<String> = None;
    let mut outputs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in console.lines() {
        if let Some(name) = line.strip_prefix(BEGIN) {
            binary = name.trim().to_owned();
            section = None;
            continue;
        }
        if let Some(rest) = line.strip_prefix(END) {
            let code = rest.split_whitespace().nth(1).unwrap_or("?");
            if code != "0"
                && !results
                    .keys()
                    .any(|k: &String| k.starts_with(&format!("{binary}::")))
            {
                results.insert(
                    format!("{binary}::(binary)"),
                    Outcome::Fail(format!("exited {code} before running tests")),
                );
            }
            section = None;
            continue;
        }
        if let Some(rest) = line.strip_prefix("test ")
            && let Some((name, verdict)) = rest.rsplit_once(" ... ")
        {
            let key = format!("{binary}::{name}");
            let outcome = match verdict.trim() {
                "ok" => Outcome::Pass,
                // `#[ignore = "reason"]` prints "ignored, reason".
                v if v == "ignored" || v.starts_with("ignored, ") => Outcome::Skip(v.to_owned()),
                _ => Outcome::Fail("failed".to_owned()),
            };
            results.insert(key, outcome);
            continue;
        }
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|l| l.strip_suffix(" stdout ----"))
        {
            section = Some(format!("{binary}::{name}"));
            continue;
        }
        if matches!(line.trim(), "successes:" | "failures:") {
            section = None;
            continue;
        }
        if let Some(key) = &section {
            outputs
                .entry(key.clone())
                .or_default()
                .push(line.to_owned());
        }
    }
    for (key, lines) in outputs {
        let Some(outcome) = results.get_mut(&key) else {
            continue;
        };
        match outcome {
            Outcome::Pass => {
                if let Some(why) = lines
                    .iter()
                    .find_map(|l| l.trim().strip_prefix("skipped: "))
                {
                    *outcome = Outcome::Skip(why.to_owned());
                }
            }
            Outcome::Fail(why) => {
                // The lines after "panicked at file:line:" are the message
                // (with anyhow's "Caused by:" chain).
                if let Some(at) = lines.iter().position(|l| l.contains("panicked at")) {
                    let message: Vec<&str> = lines[at + 1..]
                        .iter()
                        .map(|l| l.trim())
                        .filter(|l| !l.is_empty() && *l != "Caused by:" && !l.starts_with("note:"))
                        .take(4)
                        .collect();
                    *why = message.join(" / ").chars().take(300).collect();
                }
            }
            Outcome::Skip(_) => {}
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_fails_and_skips_are_read() {
        let console = "\
VMTEST begin outbound
running 4 tests
test a ... ok
test b ... FAILED
test c ... ok
test d ... ignored, benchmark: run with `cargo xtask bench`

successes:

---- c stdout ----
skipped: needs root

successes:
    c

failures:

---- b stdout ----
thread 'b' panicked at tests/x.rs:1:1:
assertion failed: landed == proxy

failures:
    b
VMTEST end outbound 101
";
        let r = parse(console);
        assert_eq!(r["outbound::a"], Outcome::Pass);
        assert_eq!(
            r["outbound::b"],
            Outcome::Fail("assertion failed: landed == proxy".into())
        );
        assert_eq!(r["outbound::c"], Outcome::Skip("needs root".into()));
        assert!(matches!(&r["outbound::d"], Outcome::Skip(why) if why.contains("xtask bench")));
    }

    #[test]
    fn a_binary_that_cannot_start_is_a_failure() {
        let r = parse(
            "VMTEST begin bad_input\n/tests/bad_input: not found\nVMTEST end bad_input 127\n",
        );
        assert!(matches!(r["bad_input::(binary)"], Outcome::Fail(_)));
    }
}
