//! Which instance captures which cgroup: the checks that keep one capture
//! per socket and one cgroup per instance name, and the lookups by cgroup.

use std::{fs, os::fd::AsFd as _, os::unix::fs::MetadataExt as _, path::Path};

use anyhow::{Result, bail};
use redirect_common::{InstanceMeta, META_PATH_MAX};

use super::{loader::Request, maps, sys};
use crate::{bpffs, cgroup::Cgroup, instance::InstanceName};

/// Refuses to take over an instance name that belongs to another cgroup.
pub(super) fn check_owner(dir: &Path, req: &Request<'_>) -> Result<()> {
    let Ok(meta) = maps::meta(dir).and_then(|m| Ok(m.get(&0, 0)?)) else {
        return Ok(()); // pins removed by hand: overwrite them
    };
    if meta.cgroup_id != 0 && meta.cgroup_id != req.cgroup.id {
        bail!(
            "instance '{}' is installed on another cgroup ({}): uninstall it first or choose another --instance",
            req.instance,
            meta_path(&meta)
        );
    }
    Ok(())
}

/// The cgroup ids of `path` and of each of its ancestors up to the cgroup2
/// mount it lies under, nearest first.
fn lineage(path: &Path) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut dir = Some(path);
    while let Some(d) = dir {
        let Ok(meta) = fs::metadata(d) else { break };
        if !crate::cgroup::is_cgroup2(d) {
            break;
        }
        ids.push(meta.ino());
        dir = d.parent();
    }
    ids
}

/// Refuses a cgroup that another instance captures already: the same
/// cgroup, an ancestor (its programs run for this one too) or a
/// descendant. Two capture chains on one socket rewrite each other's
/// connects and answer SO_ORIGINAL_DST from the wrong records.
pub(super) fn check_conflicts(req: &Request<'_>) -> Result<()> {
    // Tests only (debug builds): lets a test stack two instances to show
    // that each program leaves the other's answers alone.
    #[cfg(debug_assertions)]
    if std::env::var_os("REDIRECT_TEST_ALLOW_OVERLAP").is_some() {
        return Ok(());
    }
    let ours = lineage(&req.cgroup.path);
    for other in bpffs::instances()? {
        if &other == req.instance {
            continue;
        }
        let Some((id, path)) = instance_cgroup(&bpffs::instance_dir(&other)) else {
            continue;
        };
        let relation = if id == req.cgroup.id {
            "on the same cgroup"
        } else if ours.contains(&id) {
            "on a parent cgroup"
        } else if lineage(Path::new(&path)).contains(&req.cgroup.id) {
            "on a child cgroup"
        } else {
            continue;
        };
        bail!(
            "instance '{other}' already captures {path}, {relation} of {}: two captures on one socket \
             corrupt SO_ORIGINAL_DST; upgrade that instance (--instance {other}) or remove it \
             (`redirect uninstall --instance {other}`)",
            req.cgroup.path.display()
        );
    }
    Ok(())
}

/// The cgroup (id, path) an installed instance captures: its connect4
/// link's target while attached, else what its metadata records.
fn instance_cgroup(dir: &Path) -> Option<(u64, String)> {
    let meta = maps::meta(dir).and_then(|m| Ok(m.get(&0, 0)?)).ok();
    let attached = sys::obj_get(&dir.join(super::CONNECT4.pin_name()))
        .and_then(|fd| sys::link_info(fd.as_fd()))
        .ok()
        .map(|info| info.target)
        .filter(|id| *id != 0);
    let path = meta.as_ref().map(meta_path).unwrap_or_default();
    match (attached, meta) {
        (Some(id), _) => Some((id, path)),
        (None, Some(meta)) if meta.cgroup_id != 0 => Some((meta.cgroup_id, path)),
        _ => None,
    }
}

/// The cgroup path recorded in an instance's meta entry.
pub fn meta_path(meta: &InstanceMeta) -> String {
    let len = (meta.cgroup_path_len as usize).min(META_PATH_MAX);
    String::from_utf8_lossy(&meta.cgroup_path[..len]).into_owned()
}

/// Installed instances whose recorded cgroup is `cgroup`.
pub fn instances_on(cgroup: &Cgroup) -> Result<Vec<InstanceName>> {
    let mut found = Vec::new();
    for name in bpffs::instances()? {
        let dir = bpffs::instance_dir(&name);
        if let Ok(meta) = maps::meta(&dir).and_then(|m| Ok(m.get(&0, 0)?))
            && (meta.cgroup_id == cgroup.id || Path::new(&meta_path(&meta)) == cgroup.path)
        {
            found.push(name);
        }
    }
    Ok(found)
}
