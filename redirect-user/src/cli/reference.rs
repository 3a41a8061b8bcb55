//! `docs/cli.md`: every command's help, as `--help` prints it, and the
//! exit codes. A test renders it and fails when the file is stale
//! (`REDIRECT_WRITE_DOCS=1 cargo test -p redirect-user cli_reference`
//! rewrites it).

use clap::CommandFactory as _;

use super::Cli;

const EXIT_CODES: &str = "\
## Exit codes

| code | meaning |
|---|---|
| 0 | done (also: nothing to remove, nothing to collect) |
| 1 | failed, or refused: the error line names the problem and the fix; nothing is left half-installed. `status`: an instance is not whole |
| 2 | bad command line (a flag, a value, an instance name, an argument or variable that is not UTF-8) |
| 255 | `istio-iptables` only: bad command line, as Istio's istio-iptables exits (an invalid `--instance` is 2 there too) |
";

/// The whole file.
fn render() -> String {
    let mut cli = Cli::command().term_width(100).max_term_width(100);
    cli.build();
    let mut out = String::from(
        "# Command-line reference\n\n\
         Generated from the command line's definition by a test \
         (`REDIRECT_WRITE_DOCS=1 cargo test -p redirect-user cli_reference`); \
         do not edit by hand.\n\n",
    );
    out.push_str(&format!(
        "## redirect\n\n```text\n{}\n```\n\n",
        cli.render_long_help().to_string().trim_end()
    ));
    for sub in cli
        .get_subcommands_mut()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = sub.get_name().to_owned();
        let help = sub.render_long_help().to_string();
        out.push_str(&format!(
            "## redirect {name}\n\n```text\n{}\n```\n\n",
            help.trim_end()
        ));
    }
    out.push_str(EXIT_CODES);
    out
}

#[test]
fn cli_reference_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/cli.md");
    let rendered = render();
    if std::env::var_os("REDIRECT_WRITE_DOCS").is_some() {
        std::fs::write(path, &rendered).expect("writing docs/cli.md");
        return;
    }
    let current = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        current == rendered,
        "docs/cli.md is stale: run `REDIRECT_WRITE_DOCS=1 cargo test -p redirect-user cli_reference`"
    );
}
