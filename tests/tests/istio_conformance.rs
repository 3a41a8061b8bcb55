//! Conformance with istio-iptables: for each of Istio's golden files,
//! `redirect istio-iptables --dry-run` with the case's flags, environment,
//! IPv6 setting and resolv.conf prints exactly the golden's restore
//! documents. The goldens live beside the project in
//! `../shared/conformance/istio/` (see its README); without them the test
//! says so and skips.

use std::{fs, path::PathBuf, process::Command};

use redirect_sandbox::cli::{outcome, redirect_bin};

fn conformance_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/conformance/istio"
    ))
}

/// Splits a shell-quoted argument string (single quotes only, as cases.tsv uses).
fn shell_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let (mut quoted, mut in_word) = (false, false);
    for c in s.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                in_word = true;
            }
            ' ' if !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// The expected dry-run output: the golden without the state reads.
fn expected(golden: &str) -> String {
    golden
        .split_inclusive('\n')
        .filter(|l| !matches!(l.trim_end(), "iptables-save" | "ip6tables-save"))
        .collect()
}

#[test]
fn dry_run_matches_every_istio_golden_file() {
    let dir = conformance_dir();
    let Ok(cases) = fs::read_to_string(dir.join("cases.tsv")) else {
        eprintln!("skipped: no Istio conformance data at {}", dir.display());
        return;
    };
    let scratch = std::env::temp_dir().join(format!("redirect-conformance-{}", std::process::id()));
    fs::create_dir_all(&scratch).expect("scratch dir");
    let mut failures = Vec::new();
    let mut checked = 0;
    for line in cases
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let fields: Vec<&str> = line.split('\t').collect();
        let [case, ipv6, nameservers, env, args] = fields[..] else {
            panic!("bad cases.tsv line: {line:?}");
        };
        let golden = fs::read_to_string(dir.join(format!("{case}.golden"))).expect("golden file");
        let resolv = scratch.join(format!("{case}.resolv.conf"));
        let servers: String = nameservers
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| format!("nameserver {s}\n"))
            .collect();
        fs::write(&resolv, servers).expect("resolv.conf");
        let mut cmd = Command::new(redirect_bin());
        cmd.env_clear()
            .arg("istio-iptables")
            .arg("--dry-run")
            .arg(format!("--ipv6={ipv6}"))
            .arg("--resolv-conf")
            .arg(&resolv)
            .args(shell_words(args));
        for pair in env.split_whitespace() {
            if let Some((k, v)) = pair.split_once('=') {
                cmd.env(k, v);
            }
        }
        let out = outcome(&mut cmd).expect("run redirect");
        checked += 1;
        if out.code != 0 || out.stdout != expected(&golden) {
            failures.push(format!(
                "{case}: exit {}, stderr {:?}\n--- expected\n{}--- got\n{}",
                out.code,
                out.stderr,
                expected(&golden),
                out.stdout
            ));
        }
    }
    let _ = fs::remove_dir_all(&scratch);
    eprintln!("istio conformance: {checked} golden cases checked");
    assert!(checked >= 27, "only {checked} cases in cases.tsv");
    assert!(
        failures.is_empty(),
        "{} of {checked} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn shell_words_follow_cases_tsv_quoting() {
    assert_eq!(
        shell_words("-b '' -i '*' -d 6000,7000,"),
        ["-b", "", "-i", "*", "-d", "6000,7000,"]
    );
}
