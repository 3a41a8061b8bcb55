//! Removing instances: uninstall, gc, and the repair of what a killed
//! install or uninstall left. Only the pins redirect creates are removed
//! (see [`crate::bpffs::remove_dir`]), links detached first.

use std::{fs, os::fd::AsFd as _, os::unix::fs::MetadataExt as _, path::Path};

use anyhow::{Context as _, Result};

use super::{
    HOOKS, Hook, SK_LOOKUP, VIRT_HOOKS, all_hooks,
    instances::meta_path,
    loader::{fault_point, is_installed, virt_pins},
    maps, privilege, sys,
};
use crate::{
    bpffs::{self, DEL_PREFIX, Lock},
    instance::InstanceName,
    signals::HoldSignals,
};

/// Every file the instance directory `dir` can hold: the pinned maps,
/// links (the `-k` ones, one per interface, as found there) and programs.
fn pin_files(dir: &Path) -> Vec<String> {
    all_hooks()
        .flat_map(|hook| {
            [
                hook.pin_name(),
                hook.prog_pin_name(),
                hook.prog_staging_name(),
            ]
        })
        .chain(virt_pin_files(dir))
        .chain(maps::LAYOUT.iter().map(|(name, ..)| (*name).to_owned()))
        .collect()
}

/// The `-k` link pins in `dir`.
fn virt_pin_files(dir: &Path) -> Vec<String> {
    VIRT_HOOKS
        .iter()
        .flat_map(|hook| {
            virt_pins(dir, *hook)
                .into_iter()
                .map(|ifindex| hook.virt_pin_name(ifindex))
        })
        .collect()
}

/// Detaches the links pinned in `dir` (the interfaces' and inbound first,
/// then the cgroup hooks, connect4 first: capture stops before the
/// tracking goes away), even if some process still holds one open.
fn detach_all(dir: &Path) {
    let pins = virt_pin_files(dir).into_iter().chain(
        [SK_LOOKUP]
            .iter()
            .chain(HOOKS.iter().rev())
            .map(Hook::pin_name),
    );
    for pin in pins {
        if let Ok(link) = sys::obj_get(&dir.join(pin)) {
            let _ = sys::link_detach(link.as_fd());
        }
    }
}

/// Detaches and removes the directory `name` of the instances' directory
/// (an instance, or a staging directory): only the pins redirect creates.
pub(super) fn remove_instance_dir(name: &str) -> Result<()> {
    if name.contains(super::node_set::DIR_PREFIX) {
        return super::node_set::remove_dir(name);
    }
    let dir = bpffs::root().join(name);
    detach_all(&dir);
    bpffs::remove_dir(name, &pin_files(&dir))
}

/// Removes what installs and uninstalls killed half-way left: their
/// staging directories, detached and unpinned. Call with the lock held
/// (nothing else is then building or removing one). Returns the names
/// removed; one that cannot be removed (someone put files of their own in
/// it) is reported on stderr and does not stop the caller's own work.
pub(crate) fn repair() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in bpffs::list()?.staging {
        match remove_instance_dir(&name) {
            Ok(()) => removed.push(name),
            Err(err) => eprintln!(
                "redirect: note: {name}, left by an interrupted install or uninstall, stays: {err:#}"
            ),
        }
    }
    Ok(removed)
}

/// Detaches and unpins an instance. Returns `false` when it was not installed.
pub fn uninstall(instance: &InstanceName) -> Result<bool> {
    privilege::check_ebpf()?;
    if !bpffs::is_mounted() {
        return Ok(false);
    }
    let _hold = HoldSignals::new();
    let _lock = Lock::exclusive()?;
    repair()?;
    uninstall_locked(instance)
}

fn uninstall_locked(instance: &InstanceName) -> Result<bool> {
    if !is_installed(instance) {
        return Ok(false);
    }
    // Gone from view at once; a kill from here on leaves a staging
    // directory that the next run removes.
    let removing = format!("{DEL_PREFIX}{instance}");
    bpffs::rename(instance.as_str(), &removing)?;
    fault_point("after-uninstall-rename")?;
    remove_instance_dir(&removing)?;
    Ok(true)
}

/// Why an instance is garbage (its pod is gone), or `None` while it is in use.
fn stale(instance: &InstanceName) -> Option<String> {
    let dir = bpffs::instance_dir(instance);
    let pin = dir.join(super::CONNECT4.pin_name());
    match sys::obj_get(&pin).and_then(|fd| sys::link_info(fd.as_fd())) {
        Ok(info) if info.target != 0 => None,
        Ok(_) => Some("its cgroup was removed (the links are defunct)".to_owned()),
        Err(_) => {
            // No readable link: pins removed by hand. Garbage unless its
            // cgroup still exists.
            let meta = maps::meta(&dir).and_then(|m| Ok(m.get(&0, 0)?)).ok();
            let Some(meta) = meta else {
                return Some("it has neither a link nor metadata".to_owned());
            };
            let path = meta_path(&meta);
            let alive = fs::metadata(&path).is_ok_and(|m| m.ino() == meta.cgroup_id);
            (!alive).then(|| format!("it has no link and its cgroup {path} is gone"))
        }
    }
}

/// Removes (or with `dry_run` only lists) every instance whose pod cgroup
/// no longer exists, and every node-set pod whose network namespace is
/// gone: deleting a pod detaches its cgroup programs with the
/// cgroup, but the pins under /sys/fs/bpf/redirect/ (and an inbound link on
/// a namespace that outlives the pod) stay until removed. Also removes
/// what installs and uninstalls killed half-way left. Returns each with
/// the reason. Holds the install lock throughout, so it never judges an
/// instance while an install is writing it.
pub fn gc(dry_run: bool) -> Result<Vec<(String, String)>> {
    privilege::check_ebpf()?;
    if !bpffs::is_mounted() {
        return Ok(Vec::new());
    }
    let _hold = HoldSignals::new();
    let _lock = Lock::exclusive()?;
    let mut removed = Vec::new();
    let left = if dry_run {
        bpffs::list()?.staging
    } else {
        repair()?
    };
    for name in left {
        removed.push((
            format!("instance {name}"),
            "left by an interrupted install or uninstall".to_owned(),
        ));
    }
    for name in bpffs::instances()? {
        let Some(why) = stale(&name) else {
            continue;
        };
        if !dry_run {
            uninstall_locked(&name).with_context(|| format!("removing instance {name}"))?;
        }
        removed.push((format!("instance {name}"), why));
    }
    removed.extend(super::node_set::gc_locked(dry_run)?);
    Ok(removed)
}
