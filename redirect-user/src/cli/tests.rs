//! The command line's unit tests.

use clap::CommandFactory as _;

use super::*;

#[test]
fn cli_definition_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn defaults_are_a_sidecars() {
    let cli = Cli::try_parse_from(["redirect", "install", "--cgroup", "/x"]).unwrap();
    let Command::Install(args) = cli.command else {
        panic!("not install")
    };
    let config = crate::ebpf::lower::lower(
        &args.capture.resolve(Vec::new(), 0).unwrap(),
        &crate::host::fake::FakeHost::new(&[]),
    )
    .unwrap();
    assert_eq!(config.routes.len(), 1, "the fake host's default route");
    let config = crate::ebpf::config::Config {
        routes: Vec::new(),
        ..config
    };
    assert_eq!(config, crate::ebpf::config::Config::default());
}

#[test]
fn id_lists_parse_from_one_flag() {
    let cli = Cli::try_parse_from([
        "redirect",
        "install",
        "--cgroup",
        "/x",
        "-u",
        "1337,1338",
        "-g",
        "7",
    ])
    .unwrap();
    let Command::Install(args) = cli.command else {
        panic!("not install")
    };
    assert_eq!(args.capture.proxy_uid.0, ["1337", "1338"]);
    assert_eq!(args.capture.proxy_gid.0, ["7"]);
}

#[test]
fn bad_values_are_usage_errors() {
    for args in [
        &["redirect", "install", "--cgroup", "/x", "-p", "0"][..],
        &["redirect", "install", "--cgroup", "/x", "-p", "70000"],
        &["redirect", "install", "--cgroup", "/x", "-u", "envoy"],
        &["redirect", "install", "--cgroup", "/x", "--instance", "a/b"],
        &["redirect", "install", "--cgroup", "/x", "-b", "90:80"],
        &["redirect", "install", "--cgroup", "/x", "-d", "0"],
        &["redirect", "install", "--cgroup", "/x", "-m", "redirect"],
        &["redirect", "uninstall"],
    ] {
        let err = Cli::try_parse_from(args).err().expect("should fail");
        assert_eq!(err.exit_code(), 2, "{args:?}");
    }
}

#[test]
fn the_argument_that_is_not_utf8_is_named_and_paths_may_be_any_bytes() {
    use std::os::unix::ffi::OsStringExt as _;
    let argv = |args: &[&[u8]]| -> Vec<OsString> {
        args.iter()
            .map(|a| OsString::from_vec(a.to_vec()))
            .collect()
    };
    for (args, message) in [
        (
            argv(&[b"redirect", b"install", b"--cgroup", b"/x\xff"]),
            "the value of --cgroup ('/x\\xff') is not valid UTF-8: pass it as text",
        ),
        (
            argv(&[
                b"redirect",
                b"istio-iptables",
                b"--resolv-conf",
                b"/etc/\xfe",
                b"-p",
                b"\xff\n",
            ]),
            "the value of -p ('\\xff\\n') is not valid UTF-8: pass it as text",
        ),
        (
            argv(&[b"redirect", b"status", b"--instance=caf\xe9"]),
            "argument '--instance=caf\\xe9' is not valid UTF-8: pass it as text",
        ),
        (
            argv(&[b"redirect", b"istio-iptables", b"--dry-run", b"stray\xfe"]),
            "argument 'stray\\xfe' is not valid UTF-8: pass it as text",
        ),
        (
            argv(&[
                b"redirect",
                b"istio-iptables",
                b"--ipv6=false",
                b"stray\xfe",
            ]),
            "argument 'stray\\xfe' is not valid UTF-8: pass it as text",
        ),
    ] {
        let err = Cli::try_parse_from(&args).err().expect("should fail");
        assert_eq!(err.kind(), ErrorKind::InvalidUtf8, "{args:?}");
        assert_eq!(invalid_utf8(&args), message);
    }
}
