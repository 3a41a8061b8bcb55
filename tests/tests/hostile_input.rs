//! Hostile input to the built binary: arguments, environment variables and
//! resolv.conf lines that are not UTF-8. None may panic; each refusal is
//! one line naming the problem, with the usage exit code (2, or 255 for
//! `istio-iptables`, istio-iptables' own). None of it needs root: the
//! refusals come before anything is touched, and istio-iptables runs with
//! `--dry-run`.

use std::{
    ffi::OsString,
    os::unix::ffi::{OsStrExt as _, OsStringExt as _},
    path::PathBuf,
    process::Command,
};

use redirect_sandbox::cli::{Outcome, outcome, redirect_bin};

/// `redirect ARGS` with only the environment given: what the caller's
/// environment holds (DRY_RUN, PROXY_UID, ...) must not change the outcome.
fn run(env: &[(&str, &[u8])], args: &[&[u8]]) -> Outcome {
    let bin = redirect_bin();
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo xtask build`",
        bin.display()
    );
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .args(args.iter().map(|a| OsString::from_vec(a.to_vec())));
    for (name, value) in env {
        cmd.env(name, std::ffi::OsStr::from_bytes(value));
    }
    outcome(&mut cmd).expect("running redirect")
}

/// Asserts a refusal: exit `code`, and one stderr line naming the problem.
fn assert_refused(out: &Outcome, code: i32, needle: &str) {
    assert_eq!(out.code, code, "{out:?}");
    assert!(!out.stderr.contains("panicked"), "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "one line: {out:?}");
    assert!(
        out.stderr.starts_with("redirect: error: ") && out.stderr.contains(needle),
        "expected {needle:?}: {out:?}"
    );
}

#[test]
fn arguments_that_are_not_utf8_are_usage_errors_naming_the_flag() {
    for (args, code, needle) in [
        (
            &[&b"install"[..], b"--cgroup", b"/sys/fs/cgroup/\xff"][..],
            2,
            "the value of --cgroup ('/sys/fs/cgroup/\\xff') is not valid UTF-8",
        ),
        (
            &[b"istio-iptables", b"-p", b"\xff"],
            255,
            "the value of -p ('\\xff') is not valid UTF-8",
        ),
        (
            &[
                b"istio-iptables",
                b"--dry-run",
                b"--ipv6=false",
                b"stray\xfe",
            ],
            255,
            "argument 'stray\\xfe' is not valid UTF-8",
        ),
        (
            &[b"status", b"--instance", b"\xff"],
            2,
            "the value of --instance ('\\xff') is not valid UTF-8",
        ),
        (
            &[b"uninstall", b"--instance=caf\xe9"],
            2,
            "argument '--instance=caf\\xe9' is not valid UTF-8",
        ),
    ] {
        assert_refused(&run(&[], args), code, needle);
    }
}

#[test]
fn variables_that_are_not_utf8_are_usage_errors_naming_the_variable() {
    let dry_run: &[&[u8]] = &[b"istio-iptables", b"--dry-run", b"--ipv6=false"];
    for (name, args, code) in [
        // Read by istio-iptables' resolution.
        ("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", dry_run, 255),
        ("DRY_RUN", &dry_run[..1], 255),
        // Read by clap, for a flag.
        ("PROXY_UID", dry_run, 255),
        (
            "REDIRECT_MAX_CONNECTIONS",
            &[b"install", b"--cgroup", b"/x"],
            2,
        ),
    ] {
        let out = run(&[(name, b"127.0.0.1/8\xff")], args);
        assert_refused(
            &out,
            code,
            &format!("environment variable {name} is not valid UTF-8 ('127.0.0.1/8\\xff')"),
        );
    }
}

/// A file under the temporary directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &[u8]) -> Self {
        let path =
            std::env::temp_dir().join(format!("hostile-input-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).expect("writing the temporary file");
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_resolv_conf_line_that_is_not_utf8_costs_only_that_line() {
    let resolv = TempFile::new(
        "resolv.conf",
        b"search svc.cluster.local \xff\xfe\nnameserver 10.96.0.\xff\n\
          nameserver 10.96.0.10\noptions ndots:5\n",
    );
    let out = run(
        &[],
        &[
            b"istio-iptables",
            b"--dry-run",
            b"--ipv6=false",
            b"--redirect-dns",
            b"--resolv-conf",
            resolv.0.as_os_str().as_bytes(),
        ],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout
            .contains("-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j REDIRECT"),
        "the valid server is captured: {out:?}"
    );
    assert!(
        !out.stdout.contains("10.96.0.\u{fffd}"),
        "the bad line is skipped: {out:?}"
    );
}
