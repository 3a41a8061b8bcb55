//! The sandbox's pod cgroup under the cgroup v2 hierarchy.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Directory under the cgroup2 mount that holds every sandbox's pod cgroup.
pub const PARENT: &str = "redirect-sandbox";

/// Where the cgroup v2 hierarchy is mounted, from /proc/mounts (it is
/// `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .context("no cgroup2 hierarchy in /proc/mounts")
}

/// Creates `<cgroup2>/redirect-sandbox/<name>` with `app` and `proxy` children.
pub fn create_pod(name: &str) -> Result<PathBuf> {
    let pod = cgroup2_mount()?.join(PARENT).join(name);
    for dir in [pod.join("app"), pod.join("proxy")] {
        fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
    }
    Ok(pod)
}

/// Kills every process left in the pod's cgroups and removes them (and the
/// shared parent, once no other sandbox uses it). Best effort, bounded.
pub fn remove_pod(pod: &Path) {
    for child in ["app", "proxy"] {
        let dir = pod.join(child);
        if let Err(err) = remove(&dir) {
            eprintln!("sandbox cleanup: {err:#}");
        }
    }
    if let Err(err) = remove(pod) {
        eprintln!("sandbox cleanup: {err:#}");
    }
    if let Some(parent) = pod.parent() {
        let _ = fs::remove_dir(parent);
    }
}

fn remove(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: sending a signal has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if Instant::now() > deadline => {
                bail!("could not remove cgroup {}: {err}", dir.display())
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}
