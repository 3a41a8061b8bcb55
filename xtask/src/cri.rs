//! `cargo xtask cri-test`: `redirect-cni` through a real container runtime.
//! Builds the project image, then a test image on top of it (the test
//! agent at `/agent`, `/pause` as its entrypoint so that it also serves as
//! the pod sandbox image: no registry is reachable for Kubernetes' own),
//! exports it as an OCI archive and runs the ignored CRI test
//! (`tests/cri`), which starts a private containerd and drives it as a
//! kubelet does.

use std::fs;

use anyhow::{Context as _, Result};

use crate::{
    build::{self, cargo},
    image::{containers_conf, image, podman, podman_build},
    rootfs::strip_into,
    sysdeps::{self, SANDBOX_TOOLS, Tool, run_checked},
    test::{leftovers, pinned_instances, with_leftovers},
};

/// The test image's name in podman's storage and in containerd's.
const CRI_IMAGE: &str = "localhost/redirect-cri:dev";

/// What the CRI test runs.
const CRI_TOOLS: &[Tool] = &[
    Tool {
        program: "containerd",
        package: "containerd",
        why: "the container runtime (with its CRI plugin) the CRI test drives",
    },
    Tool {
        program: "ctr",
        package: "containerd",
        why: "imports the test image into the CRI test's containerd",
    },
    Tool {
        program: "runc",
        package: "runc",
        why: "containerd's runtime in the CRI test",
    },
    Tool {
        program: "/usr/lib/cni/bridge",
        package: "containernetworking-plugins",
        why: "the pod network (bridge, host-local, loopback) redirect-cni is chained after",
    },
];

pub fn cri_test() -> Result<()> {
    sysdeps::ensure_tools(SANDBOX_TOOLS)?;
    sysdeps::ensure_tools(CRI_TOOLS)?;
    sysdeps::ensure_tools(&[sysdeps::PROTOC])?;
    let base = image()?;
    let plugin = build::shipped_binary()?;
    run_checked(&mut cargo(&["build", "--package", "redirect-user"])?)?;
    let context = build::target_dir().join("cri-image");
    let _ = fs::remove_dir_all(&context);
    fs::create_dir_all(&context)?;
    // The workspace's debug build carries the test agent (`sandbox-agent`).
    strip_into(
        &build::target_dir().join("debug/redirect"),
        &context.join("agent"),
    )?;
    fs::write(
        context.join("Containerfile"),
        format!(
            "# Written by `cargo xtask cri-test`: the project image plus the test agent.\n\
             FROM {base}\nCOPY agent /agent\nENTRYPOINT [\"/pause\"]\nCMD []\n"
        ),
    )?;
    let conf = containers_conf()?;
    podman_build(&conf, CRI_IMAGE, &context)
        .context("podman build of the CRI test image failed")?;
    let archive = context.join("redirect-cri.oci.tar");
    let shims_before = std::path::Path::new(SHIM_SOCKETS).exists();
    let cni_cache_before = std::path::Path::new(CNI_CACHE).exists();
    run_checked(
        podman(&conf)
            .args(["save", "--quiet", "--format", "oci-archive", "--output"])
            .arg(&archive)
            .arg(CRI_IMAGE),
    )
    .context("podman save of the CRI test image failed")?;
    let mut cmd = cargo(&[
        "test",
        "--package",
        "redirect-cri-test",
        "--test",
        "cri",
        "--",
        "--ignored",
        "--nocapture",
    ])?;
    cmd.env("REDIRECT_CRI_ARCHIVE", &archive)
        .env("REDIRECT_CRI_IMAGE", CRI_IMAGE)
        .env("REDIRECT_CNI_BIN", &plugin);
    let ran = run_checked(&mut cmd).context("the CRI test failed");
    let mut left = leftovers();
    left.extend(cri_leftovers(shims_before, cni_cache_before));
    with_leftovers("the CRI test", ran, left)
}

/// Where containerd's shims put their sockets, whatever its configuration.
const SHIM_SOCKETS: &str = "/run/containerd/s";

/// The CNI library's result cache (the test gives containerd a private one).
const CNI_CACHE: &str = "/var/lib/cni";

/// What the CRI test must not leave: its containerd directories, the
/// plugin's instances (`cni-<sandbox id>`) and, unless they were there
/// before, shim sockets and the CNI result cache.
fn cri_leftovers(shims_before: bool, cni_cache_before: bool) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("redirect-cri-") {
                found.push(format!("directory {}", entry.path().display()));
            }
        }
    }
    // The plugin names instances after the sandbox's 64-hex-digit id.
    found.extend(pinned_instances(|name| {
        name.strip_prefix("cni-")
            .is_some_and(|id| id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
    }));
    if !shims_before && std::path::Path::new(SHIM_SOCKETS).exists() {
        found.push(format!("shim sockets in {SHIM_SOCKETS}"));
    }
    // runc writes pod cgroups into every v1 controller's hierarchy too.
    if let Ok(mounts) = fs::read_to_string("/proc/mounts") {
        for line in mounts.lines() {
            let mut fields = line.split_whitespace();
            if let (Some(_), Some(dir), Some("cgroup")) =
                (fields.next(), fields.next(), fields.next())
            {
                let parent = std::path::Path::new(dir).join("redirect-sandbox");
                if parent.exists() {
                    found.push(format!("cgroup {}", parent.display()));
                }
            }
        }
    }
    if !cni_cache_before && std::path::Path::new(CNI_CACHE).exists() {
        found.push(format!("the CNI result cache {CNI_CACHE}"));
    }
    found
}
