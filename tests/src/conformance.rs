//! Istio's conformance data (its iptables golden files, see the README in
//! `../shared/conformance/istio/`, and its native nftables ones in
//! `../shared/conformance/istio-nftables/`), read for the tests that replay it.

use std::{
    fs,
    path::{Path, PathBuf},
};

/// `$variable` (set in the kernel matrix's VMs), else
/// `../shared/conformance/<name>` beside the project.
fn data_dir(variable: &str, name: &str) -> PathBuf {
    std::env::var_os(variable).map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/conformance")
                .join(name)
        },
        PathBuf::from,
    )
}

/// Istio's iptables golden files (`$REDIRECT_CONFORMANCE_DIR`).
pub fn dir() -> PathBuf {
    data_dir("REDIRECT_CONFORMANCE_DIR", "istio")
}

/// The golden files of Istio's native nftables mode, in the same layout
/// (`$REDIRECT_NFTABLES_CONFORMANCE_DIR`).
pub fn nftables_dir() -> PathBuf {
    data_dir("REDIRECT_NFTABLES_CONFORMANCE_DIR", "istio-nftables")
}

/// Istio's CNI plugin goldens and their pods
/// (`$REDIRECT_CNI_CONFORMANCE_DIR`).
pub fn cni_dir() -> PathBuf {
    data_dir("REDIRECT_CNI_CONFORMANCE_DIR", "istio-cni")
}

/// Fails the calling test unless every one of `cases` (at least `min`:
/// the data is whole) matched; `failures` describe those that did not.
pub fn assert_all_match(what: &str, cases: usize, min: usize, failures: &[String]) {
    eprintln!(
        "{what}: {} of {cases} golden cases match",
        cases - failures.len()
    );
    assert!(cases >= min, "only {cases} cases in cases.tsv");
    assert!(
        failures.is_empty(),
        "{} of {cases} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Runs `redirect istio-iptables --dry-run EXTRA` for `case`, with the
/// case's environment (nothing else), IPv6 setting and a resolv.conf
/// listing its servers, written under `scratch`.
pub fn dry_run(case: &Case, scratch: &Path, extra: &[&str]) -> crate::cli::Outcome {
    let resolv = scratch.join(format!("{}.resolv.conf", case.name));
    fs::write(&resolv, case.resolv_conf()).expect("resolv.conf");
    let mut cmd = std::process::Command::new(crate::cli::redirect_bin());
    cmd.env_clear()
        .envs(case.env.iter().cloned())
        .arg("istio-iptables")
        .args(extra)
        .arg("--dry-run")
        .arg(format!("--ipv6={}", case.ipv6))
        .arg("--resolv-conf")
        .arg(&resolv)
        .args(&case.args);
    crate::cli::outcome(&mut cmd).expect("run redirect")
}

/// One row of `cases.tsv`.
#[derive(Clone, Debug)]
pub struct Case {
    /// The data directory the row was read from (its golden is there).
    pub dir: PathBuf,
    pub name: String,
    /// `true` or `false`: whether IPv6 rules are generated.
    pub ipv6: String,
    /// DNS servers, as a resolv.conf lists them.
    pub nameservers: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The istio-iptables arguments.
    pub args: Vec<String>,
}

impl Case {
    /// The case's golden file, as written.
    pub fn golden(&self) -> std::io::Result<String> {
        fs::read_to_string(self.dir.join(format!("{}.golden", self.name)))
    }

    /// The resolv.conf text of the case.
    pub fn resolv_conf(&self) -> String {
        self.nameservers
            .iter()
            .map(|s| format!("nameserver {s}\n"))
            .collect()
    }
}

/// Every case of [`dir`], or `None` when the data is absent (the caller
/// says so and skips).
pub fn cases() -> Option<Vec<Case>> {
    cases_in(&dir())
}

/// Every case of the data directory `dir`, or `None` when it is absent.
pub fn cases_in(dir: &Path) -> Option<Vec<Case>> {
    let text = fs::read_to_string(dir.join("cases.tsv")).ok()?;
    Some(
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|line| {
                let fields: Vec<&str> = line.split('\t').collect();
                let [name, ipv6, nameservers, env, args] = fields[..] else {
                    return None;
                };
                Some(Case {
                    dir: dir.to_owned(),
                    name: name.to_owned(),
                    ipv6: ipv6.to_owned(),
                    nameservers: nameservers
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    env: env
                        .split_whitespace()
                        .filter_map(|kv| {
                            kv.split_once('=')
                                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        })
                        .collect(),
                    args: shell_words(args),
                })
            })
            .collect(),
    )
}

/// Splits a shell-quoted argument string (single quotes only, as cases.tsv uses).
pub fn shell_words(s: &str) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    #[test]
    fn shell_words_follow_cases_tsv_quoting() {
        assert_eq!(
            super::shell_words("-b '' -i '*' -d 6000,7000,"),
            ["-b", "", "-i", "*", "-d", "6000,7000,"]
        );
    }
}
