//! The kernel features found present on this boot, kept for the next
//! install: probing loads a program for every hook and creates a map of
//! every type (a millisecond of each install), yet what a kernel has does
//! not change until it reboots.
//!
//! The record is a one-entry array map pinned at
//! `/sys/fs/bpf/redirect/@probes-<revision>`, one per build layout (see
//! [`revision`]): two builds on one node (an Istio revision canary) never
//! share one, so a reader never takes one build's revision with another's
//! feature bits. bpffs lives in memory, so the record goes with the boot
//! that wrote it and can never describe another kernel. It holds presence
//! only: a feature it does not name is asked of the kernel as if there were
//! no record, so a record that is missing, torn or partly overwritten by a
//! concurrent install of the same build (each write holds a superset of
//! what it replaces) costs probes and is never wrong. Only a successful
//! install writes it, under the node's lock, after bpffs was proven to be
//! the node's, and only a process with eBPF privileges reads it.
//! `redirect probe` takes no answer from it (it shows what the kernel
//! answers now, and what the record holds beside it).

use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, Map, MapData};

use super::sys;
use crate::bpffs;

/// The pins' prefix in the instances' directory (no instance name starts
/// with `@`); the revision follows, in hex.
pub const PIN_PREFIX: &str = "@probes-";

/// Bump when what a probe means changes outside [`PROBE_SOURCES`], so
/// that records written by earlier builds are ignored.
const REVISION: u64 = 1;

/// The source of the probes and of what answers them (the privilege
/// check, the probe programs and syscalls, the pinned aya's feature
/// probes): a build whose probes differ in any way, even a comment, has a
/// revision of its own, so that no build takes another's answers. A
/// comment's change costs one probe run a boot.
const PROBE_SOURCES: u64 = fnv1a(
    FNV_OFFSET,
    &[
        include_str!("features.rs").as_bytes(),
        include_str!("sys.rs").as_bytes(),
        include_str!("privilege.rs").as_bytes(),
        include_str!("../../../vendor/aya/src/sys/feature_probe.rs").as_bytes(),
    ],
);

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over `parts` from `hash`, each part followed by a zero byte.
const fn fnv1a(mut hash: u64, parts: &[&[u8]]) -> u64 {
    let mut p = 0;
    while p < parts.len() {
        let part = parts[p];
        let mut i = 0;
        while i <= part.len() {
            let byte = if i < part.len() { part[i] } else { 0 };
            hash ^= byte as u64;
            hash = hash.wrapping_mul(0x0100_0000_01b3);
            i += 1;
        }
        p += 1;
    }
    hash
}

/// The record's one value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Record {
    /// [`revision`] of the build that wrote it.
    revision: u64,
    /// Bit `i`: feature `i` of the writer's list is present.
    present: u64,
}

// SAFETY: two u64s, no padding; any bit pattern is a valid value.
unsafe impl aya::Pod for Record {}

/// Where the record of a build whose features are `names` is pinned.
pub fn path(names: &[String]) -> PathBuf {
    bpffs::root().join(format!("{PIN_PREFIX}{:016x}", revision(names)))
}

/// Which builds share a record: a digest (FNV-1a) of `names` in their
/// order (each naming a feature and how it is probed, see
/// `features::recordable`), this build's version, [`REVISION`] and
/// [`PROBE_SOURCES`].
pub fn revision(names: &[String]) -> u64 {
    let version = env!("CARGO_PKG_VERSION");
    let revision = REVISION.to_le_bytes();
    let sources = PROBE_SOURCES.to_le_bytes();
    let mut hash = FNV_OFFSET;
    for name in names {
        hash = fnv1a(hash, &[name.as_bytes()]);
    }
    fnv1a(hash, &[version.as_bytes(), &revision[..], &sources[..]])
}

/// The features of `names` the record says are present (none without a
/// record this build can read).
pub fn read(names: &[String]) -> u64 {
    let Some(array) = open(&path(names)) else {
        return 0;
    };
    match array.get(&0, 0) {
        Ok(record) if record.revision == revision(names) => record.present,
        _ => 0,
    }
}

/// Records `present` (features of `names`) for the rest of the boot,
/// beside what the record holds already; nothing when that adds nothing.
pub fn write(names: &[String], present: u64) -> Result<()> {
    if names.len() > 64 {
        bail!(
            "{} features do not fit the probe record's 64 bits",
            names.len()
        );
    }
    let known = read(names);
    if present & !known == 0 {
        return Ok(());
    }
    let record = Record {
        revision: revision(names),
        present: present | known,
    };
    let pin = path(names);
    if pin.exists() {
        let Some(mut array) = open(&pin) else {
            bail!("{} is not a probe record", pin.display());
        };
        return set(&mut array, record);
    }
    // A new record is whole before it is pinned: a reader finds none, or
    // this one.
    let fd = sys::create_array("RDR_PROBES", size_of::<Record>() as u32, 1, 0)
        .context("creating the probe record")?;
    let map =
        MapData::from_fd(fd.as_fd().try_clone_to_owned()?).context("opening the probe record")?;
    let mut array = Array::<MapData, Record>::try_from(Map::Array(map))?;
    set(&mut array, record)?;
    match sys::obj_pin(fd.as_fd(), &pin) {
        Ok(()) => Ok(()),
        // Another install of this build pinned its record first: it holds
        // facts too.
        Err(_) if pin.exists() => Ok(()),
        Err(err) => Err(err),
    }
}

/// The record pinned at `pin`, if that is one: an array (the kernel's
/// map type, not only the sizes) of one [`Record`].
fn open(pin: &Path) -> Option<Array<MapData, Record>> {
    let map = MapData::from_pin(pin).ok()?;
    let Map::Array(map) = Map::from_map_data(map).ok()? else {
        return None;
    };
    let array = Array::<MapData, Record>::try_from(Map::Array(map)).ok()?;
    (array.len() == 1).then_some(array)
}

fn set(array: &mut Array<MapData, Record>, record: Record) -> Result<()> {
    array.set(0, record, 0).context("writing the probe record")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn the_revision_digests_the_probes_source_as_built() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let files = [
            "src/ebpf/features.rs",
            "src/ebpf/sys.rs",
            "src/ebpf/privilege.rs",
            "../vendor/aya/src/sys/feature_probe.rs",
        ]
        .map(|f| std::fs::read(dir.join(f)).expect("a probe source"));
        let parts: Vec<&[u8]> = files.iter().map(Vec::as_slice).collect();
        assert_eq!(PROBE_SOURCES, fnv1a(FNV_OFFSET, &parts));
        let mut changed = files[0].clone();
        changed.push(b'\n');
        assert_ne!(
            PROBE_SOURCES,
            fnv1a(FNV_OFFSET, &[&changed, &files[1], &files[2], &files[3]])
        );
    }

    #[test]
    fn the_revision_follows_the_names_and_their_order() {
        let a = revision(&names(&["sockops", "sk_lookup"]));
        assert_eq!(a, revision(&names(&["sockops", "sk_lookup"])));
        assert_ne!(a, revision(&names(&["sk_lookup", "sockops"])));
        assert_ne!(a, revision(&names(&["sockops"])));
        // Names are separated: no two lists hash as one.
        assert_ne!(
            revision(&names(&["ab", "c"])),
            revision(&names(&["a", "bc"]))
        );
        // Each revision has a pin of its own.
        assert_ne!(path(&names(&["sockops"])), path(&names(&["sk_lookup"])));
    }
}
