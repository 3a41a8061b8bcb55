//! Driving the `redirect` binary from tests, the way an operator does.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::Sandbox;

/// The `redirect` binary under test: `$REDIRECT_BIN`, or the workspace's
/// debug build (`cargo xtask test` builds it first).
pub fn redirect_bin() -> PathBuf {
    std::env::var_os("REDIRECT_BIN").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/debug/redirect"
            ))
        },
        PathBuf::from,
    )
}

/// What one `redirect` invocation did.
#[derive(Debug)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.code == 0
    }
}

/// Runs a prepared `redirect` command and collects its outcome.
pub fn outcome(cmd: &mut Command) -> Result<Outcome> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    Ok(Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `redirect ARGS` as the calling user, in the caller's namespaces.
pub fn redirect(args: &[&str]) -> Result<Outcome> {
    let bin = redirect_bin();
    if !bin.is_file() {
        bail!(
            "{} is missing: build it with `cargo xtask build`",
            bin.display()
        );
    }
    outcome(Command::new(bin).args(args))
}

/// The value of counter `name` of the first instance in `status --json` output.
pub fn counter(status: &Value, name: &str) -> u64 {
    status["instances"][0]["counters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .and_then(|c| c["value"].as_u64())
        .unwrap_or_else(|| panic!("no counter {name} in {status}"))
}

impl Sandbox {
    /// A sandbox whose agent is `redirect sandbox-agent`.
    pub fn for_tests() -> Result<Self> {
        Self::new(redirect_bin(), &["sandbox-agent"])
    }

    /// `redirect install --cgroup <pod> --instance <name> EXTRA...`; fails
    /// unless it succeeds.
    pub fn install(&self, extra: &[&str]) -> Result<Outcome> {
        let cgroup = self.pod_cgroup().to_string_lossy().into_owned();
        let mut args = vec!["install", "--cgroup", &cgroup, "--instance", self.name()];
        args.extend_from_slice(extra);
        let out = redirect(&args)?;
        if !out.ok() {
            bail!("redirect {args:?} failed ({}): {}", out.code, out.stderr);
        }
        Ok(out)
    }

    /// `redirect uninstall --instance <name>`; fails unless it succeeds.
    pub fn uninstall(&self) -> Result<Outcome> {
        let out = redirect(&["uninstall", "--instance", self.name()])?;
        if !out.ok() {
            bail!("redirect uninstall failed ({}): {}", out.code, out.stderr);
        }
        Ok(out)
    }

    /// `redirect status --json --instance <name>`, parsed.
    pub fn status(&self) -> Result<Value> {
        let out = redirect(&["status", "--json", "--instance", self.name()])?;
        if !out.ok() {
            bail!("redirect status failed ({}): {}", out.code, out.stderr);
        }
        serde_json::from_str(&out.stdout).context("parsing status --json")
    }

    /// Whether the sandbox's instance has a pin directory.
    pub fn is_pinned(&self) -> bool {
        std::path::Path::new("/sys/fs/bpf/redirect")
            .join(self.name())
            .exists()
    }
}
