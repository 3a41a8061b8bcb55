//! Conformance with Istio's native nftables mode: for each of its golden
//! files, `redirect istio-iptables --native-nftables --dry-run` with the
//! case's flags, environment, IPv6 setting and resolv.conf prints exactly
//! the golden's nftables transaction (the whole file, see the README in
//! `../shared/conformance/istio-nftables/`). Without the data the test says
//! so and skips, and fails under `CI=true`.

use std::fs;

use redirect_sandbox::conformance;

/// Lines shown around the first difference.
const CONTEXT: usize = 2;
const SHOWN: usize = 4;

/// A short unified-style diff from the first line where `got` differs
/// from `expected`.
fn first_difference(expected: &str, got: &str) -> String {
    let (want, have): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), got.lines().collect());
    let at = want
        .iter()
        .zip(&have)
        .position(|(w, h)| w != h)
        .unwrap_or(want.len().min(have.len()));
    let start = at.saturating_sub(CONTEXT);
    let mut out = format!("@@ line {} @@\n", at + 1);
    for line in &want[start..at] {
        out.push_str(&format!(" {line}\n"));
    }
    for line in want.iter().skip(at).take(SHOWN) {
        out.push_str(&format!("-{line}\n"));
    }
    for line in have.iter().skip(at).take(SHOWN) {
        out.push_str(&format!("+{line}\n"));
    }
    if want.len() != have.len() {
        out.push_str(&format!(
            "(expected {} lines, got {})\n",
            want.len(),
            have.len()
        ));
    }
    out
}

#[test]
fn native_nftables_dry_run_matches_every_istio_golden_file() {
    let dir = conformance::nftables_dir();
    let Some(cases) = conformance::cases_in(&dir) else {
        redirect_sandbox::skip_or_fail(&format!(
            "no Istio nftables conformance data at {}",
            dir.display()
        ));
        return;
    };
    let scratch = std::env::temp_dir().join(format!(
        "redirect-nftables-conformance-{}",
        std::process::id()
    ));
    fs::create_dir_all(&scratch).expect("scratch dir");
    let mut failures = Vec::new();
    for case in &cases {
        let golden = case.golden().expect("golden file");
        let out = conformance::dry_run(case, &scratch, &["--native-nftables"]);
        if out.code != 0 || out.stdout != golden {
            failures.push(format!(
                "{}: exit {}, stderr {:?}\n{}",
                case.name,
                out.code,
                out.stderr,
                first_difference(&golden, &out.stdout)
            ));
        }
    }
    let _ = fs::remove_dir_all(&scratch);
    conformance::assert_all_match("istio nftables conformance", cases.len(), 28, &failures);
}
