//! `cargo xtask image`: the init-container image, built with podman from
//! local files (no registry), and `cargo xtask pod-test`: a real pod run
//! by podman whose init container installs the capture.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::{
    build::{self, cargo},
    rootfs::{XTABLES_LINKS, add_libraries, copy_host, copy_tree, merged_usr, strip_into},
    sysdeps::{self, SANDBOX_TOOLS, Tool, run_checked},
    test::{leftovers, with_leftovers},
};

/// The image's name in podman's local storage.
pub const IMAGE: &str = "localhost/redirect:dev";

/// What building and running the image needs.
const PODMAN_TOOLS: &[Tool] = &[
    Tool {
        program: "podman",
        package: "podman",
        why: "builds the init-container image and runs the pod test",
    },
    Tool {
        program: "runc",
        package: "runc",
        why: "podman's runtime here (crun refuses the hybrid cgroup layout)",
    },
    Tool {
        program: "xtables-nft-multi",
        package: "iptables",
        why: "the image's iptables, copied from this machine",
    },
    Tool {
        program: "nft",
        package: "nftables",
        why: "the image's nft (istio-iptables --native-nftables), copied from this machine",
    },
    Tool {
        program: "strip",
        package: "binutils",
        why: "strips the binaries copied into the image",
    },
];

/// Host programs the image carries (with their libraries).
const IMAGE_PROGRAMS: &[&str] = &[
    "/usr/sbin/xtables-nft-multi",
    "/usr/sbin/xtables-legacy-multi",
    // TPROXY mode's policy routing (istio-iptables runs `ip rule`/`ip route`).
    "/usr/sbin/ip",
    // Istio's native nftables mode (`--native-nftables`) applies with `nft -f -`.
    "/usr/sbin/nft",
];

/// The podman configuration the tasks use (`CONTAINERS_CONF`): runc, and
/// no default ulimits (raising them is not permitted on these machines).
pub fn containers_conf() -> Result<PathBuf> {
    let dir = build::target_dir().join("podman");
    fs::create_dir_all(&dir)?;
    let path = dir.join("containers.conf");
    fs::write(
        &path,
        "# Written by `cargo xtask image`: podman's settings for redirect's tasks.\n\
         [containers]\ndefault_ulimits = []\n\n[engine]\nruntime = \"runc\"\n",
    )?;
    Ok(path)
}

/// A podman command with the tasks' configuration.
pub fn podman(conf: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new("podman");
    cmd.env("CONTAINERS_CONF", conf);
    cmd
}

/// Builds the image; returns its name.
pub fn image() -> Result<String> {
    sysdeps::ensure_tools(PODMAN_TOOLS)?;
    let binary = build::shipped_binary()?;
    let context = build::target_dir().join("image");
    let root = context.join("rootfs");
    let _ = fs::remove_dir_all(&context);
    for dir in ["usr/local/bin", "usr/sbin", "usr/bin", "etc", "tmp", "run"] {
        fs::create_dir_all(root.join(dir))?;
    }
    merged_usr(&root)?;
    let mut elves = std::collections::BTreeSet::new();
    strip_into(&binary, &root.join("usr/local/bin/redirect"))?;
    elves.insert(PathBuf::from("/usr/local/bin/redirect"));
    // A pod's infra process (see `redirect`'s main): the pod test needs one.
    std::os::unix::fs::symlink("/usr/local/bin/redirect", root.join("pause"))?;
    for program in IMAGE_PROGRAMS {
        copy_host(&root, Path::new(program))?;
        elves.insert(PathBuf::from(program));
    }
    copy_tree(
        &root,
        Path::new("/usr/lib/x86_64-linux-gnu/xtables"),
        &mut elves,
    )?;
    for (link, target) in XTABLES_LINKS {
        std::os::unix::fs::symlink(target, root.join("usr/sbin").join(link))?;
    }
    add_libraries(&root, &elves)?;
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/:/nonexistent\nistio-proxy:x:1337:1337::/:/nonexistent\n",
    )?;
    fs::write(root.join("etc/group"), "root:x:0:\nistio-proxy:x:1337:\n")?;
    let containerfile =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../redirect-user/Containerfile");
    fs::copy(&containerfile, context.join("Containerfile"))
        .with_context(|| format!("copying {}", containerfile.display()))?;
    let conf = containers_conf()?;
    eprintln!(
        "xtask: building the image {IMAGE} from {}",
        context.display()
    );
    podman_build(&conf, IMAGE, &context).context("podman build failed")?;
    Ok(IMAGE.to_owned())
}

/// `podman build` of `<context>/Containerfile` as `tag`; the image the tag
/// named before, now untagged, is removed (it would pile up in podman's
/// storage).
pub fn podman_build(conf: &Path, tag: &str, context: &Path) -> Result<()> {
    let previous = podman_image_id(conf, tag);
    run_checked(
        podman(conf)
            .args(["build", "--quiet", "--tag", tag, "--file"])
            .arg(context.join("Containerfile"))
            .arg(context),
    )?;
    if let Some(old) = previous
        && podman_image_id(conf, tag).as_ref() != Some(&old)
    {
        let _ = podman(conf).args(["rmi", &old]).output();
    }
    Ok(())
}

/// The id of image `name` in podman's storage, if it is there.
fn podman_image_id(conf: &Path, name: &str) -> Option<String> {
    let out = podman(conf)
        .args(["image", "inspect", "--format", "{{.Id}}", name])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Builds the image and runs the pod tests (the ignored `pod_*` tests of
/// the end-to-end crate) with it: eBPF, iptables and native nftables mode.
pub fn pod_test() -> Result<()> {
    sysdeps::ensure_tools(SANDBOX_TOOLS)?;
    let image = image()?;
    let conf = containers_conf()?;
    run_checked(&mut cargo(&["build", "--package", "redirect-user"])?)?;
    let mut cmd = cargo(&[
        "test",
        "--package",
        "redirect-sandbox",
        "--test",
        "pod",
        "--",
        "--ignored",
        "--nocapture",
    ])?;
    cmd.env("REDIRECT_IMAGE", &image)
        .env("CONTAINERS_CONF", &conf);
    let ran = run_checked(&mut cmd).context("the pod tests failed");
    let mut left = leftovers();
    left.extend(podman_leftovers(&conf));
    with_leftovers("the pod tests", ran, left)
}

/// Pods the pod tests create (named `rdr-...`) that still exist.
fn podman_leftovers(conf: &Path) -> Vec<String> {
    let out = podman(conf)
        .args(["pod", "ls", "--format", "{{.Name}}"])
        .output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|n| n.starts_with("rdr-"))
            .map(|n| format!("podman pod {n}"))
            .collect()
    })
    .unwrap_or_default()
}
