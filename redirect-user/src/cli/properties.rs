//! Properties: no command line panics the parser, or what a parsed one
//! feeds short of touching the system; a refusal for bytes that are not
//! UTF-8 is one line.

use std::os::unix::ffi::OsStringExt as _;

use proptest::{prelude::*, test_runner::TestCaseError};

use super::*;
use crate::host::fake::{FakeHost, exercise};

/// Each subcommand's name and its real flags (`--long`, `-s`).
fn commands() -> Vec<(String, Vec<String>)> {
    Cli::command()
        .get_subcommands()
        .map(|sub| {
            let flags = sub
                .get_arguments()
                .flat_map(|arg| {
                    let long = arg.get_long().map(|l| format!("--{l}"));
                    long.into_iter()
                        .chain(arg.get_short().map(|s| format!("-{s}")))
                })
                .chain(["--assume-missing".to_owned()])
                .collect();
            (sub.get_name().to_owned(), flags)
        })
        .collect()
}

/// A flag value: text shaped like the real ones, a value that sits on
/// a boundary, or any bytes.
fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => "[0-9a-zA-Z.,/*: _-]{0,16}".prop_map(String::into_bytes),
        1 => proptest::sample::select(vec![
            "", "*", "0", "65535", "65536", "1,2,3,4,5,6,7,8,9", "10.0.0.0/8",
            "::1/128", "fd00::/8", "self-parent", "TPROXY", "true", "-",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..12),
    ]
}

/// `redirect SUBCOMMAND` and up to 10 tokens: its flags, flags with an
/// attached value (`--flag=value`), and values.
fn argv() -> impl Strategy<Value = Vec<OsString>> {
    proptest::sample::select(commands()).prop_flat_map(|(name, flags)| {
        let token = prop_oneof![
            proptest::sample::select(flags.clone()).prop_map(String::into_bytes),
            (proptest::sample::select(flags), value()).prop_map(|(flag, value)| {
                let mut token = flag.into_bytes();
                token.push(b'=');
                token.extend(value);
                token
            }),
            value(),
        ];
        proptest::collection::vec(token, 0..10).prop_map(move |tokens| {
            [b"redirect".to_vec(), name.clone().into_bytes()]
                .into_iter()
                .chain(tokens)
                .map(OsString::from_vec)
                .collect()
        })
    })
}

/// Parses `argv` and runs what a parsed command line feeds, short of
/// touching the system (istio-iptables resolves on a [`FakeHost`]).
fn parse_and_use(argv: &[OsString]) -> Result<(), TestCaseError> {
    let capture = |args: &CaptureArgs| {
        let Ok(capture) = args.resolve(Vec::new(), 0) else {
            return;
        };
        // The lowering checks the map limits `to_bpf` relies on.
        if let Ok(config) = crate::ebpf::lower::lower(&capture, &FakeHost::new(&[])) {
            let _ = config.to_bpf();
        }
        let _ = crate::iptables::rules::rules(&capture);
    };
    match Cli::try_parse_from(argv) {
        Err(err) if err.kind() == ErrorKind::InvalidUtf8 => {
            let message = invalid_utf8(argv);
            prop_assert_eq!(message.lines().count(), 1, "{}", message);
        }
        Err(err) => {
            let _ = err.render();
        }
        Ok(cli) => match cli.command {
            Command::Install(args) => capture(&args.capture),
            Command::Run(args) => capture(&args.capture),
            Command::IstioIptables(args) => {
                if let Err(err) = exercise(&args, &FakeHost::new(&[])) {
                    prop_assert_eq!(err.to_string().lines().count(), 1, "{}", err);
                }
            }
            _ => {}
        },
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_argv_of_any_bytes_parses_or_fails(
        args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..12), 0..6),
    ) {
        let argv: Vec<OsString> = std::iter::once(b"redirect".to_vec())
            .chain(args)
            .map(OsString::from_vec)
            .collect();
        parse_and_use(&argv)?;
    }

    #[test]
    fn subcommands_with_their_flags_and_any_values_parse_or_fail(argv in argv()) {
        parse_and_use(&argv)?;
    }

    #[test]
    fn bytes_are_shown_on_one_line_without_control_characters(
        bytes in proptest::collection::vec(any::<u8>(), 0..32),
    ) {
        let shown = show_bytes(&OsString::from_vec(bytes));
        prop_assert!(!shown.chars().any(char::is_control), "{:?}", shown);
    }
}
