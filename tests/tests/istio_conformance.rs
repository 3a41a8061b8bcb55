//! Conformance with istio-iptables: for each of Istio's golden files,
//! `redirect istio-iptables --dry-run` with the case's flags, environment,
//! IPv6 setting and resolv.conf prints exactly the golden's restore
//! documents. Without the data (`../shared/conformance/istio/`) the test
//! says so and skips, and fails under `CI=true`.

use std::fs;

use redirect_sandbox::conformance;

/// The expected dry-run output: the golden without the state reads.
fn expected(golden: &str) -> String {
    golden
        .split_inclusive('\n')
        .filter(|l| !matches!(l.trim_end(), "iptables-save" | "ip6tables-save"))
        .collect()
}

#[test]
fn dry_run_matches_every_istio_golden_file() {
    let Some(cases) = conformance::cases() else {
        // Under CI=true missing data is a failure, as for every other test
        // that cannot run.
        redirect_sandbox::skip_or_fail(&format!(
            "no Istio conformance data at {}",
            conformance::dir().display()
        ));
        return;
    };
    let scratch = std::env::temp_dir().join(format!("redirect-conformance-{}", std::process::id()));
    fs::create_dir_all(&scratch).expect("scratch dir");
    let mut failures = Vec::new();
    for case in &cases {
        let golden = case.golden().expect("golden file");
        let out = conformance::dry_run(case, &scratch, &[]);
        if out.code != 0 || out.stdout != expected(&golden) {
            failures.push(format!(
                "{}: exit {}, stderr {:?}\n--- expected\n{}--- got\n{}",
                case.name,
                out.code,
                out.stderr,
                expected(&golden),
                out.stdout
            ));
        }
    }
    let _ = fs::remove_dir_all(&scratch);
    conformance::assert_all_match("istio conformance", cases.len(), 27, &failures);
}
