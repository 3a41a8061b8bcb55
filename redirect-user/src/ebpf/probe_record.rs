//! The kernel features found present on this boot, kept for the next
//! install: probing loads a program for every hook and creates a map of
//! every type (a millisecond of each install), yet what a kernel has does
//! not change until it reboots.
//!
//! The record is a one-entry array map pinned at
//! `/sys/fs/bpf/redirect/@probes`. bpffs lives in memory, so the record
//! goes with the boot that wrote it and can never describe another kernel.
//! It holds presence only: a feature it does not name is asked of the
//! kernel as if there were no record, so a record that is missing, torn,
//! written by another build or partly overwritten by a concurrent install
//! costs probes and is never wrong. Only a successful install writes it,
//! under the node's lock, after bpffs was proven to be the node's.
//! `redirect probe` never reads it (it shows what the kernel answers now,
//! and what the record holds beside it).

use std::{os::fd::AsFd as _, path::PathBuf};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, Map, MapData};

use super::sys;
use crate::bpffs;

/// The pin's name in the instances' directory (no instance name starts
/// with `@`).
pub const PIN: &str = "@probes";

/// Bump when what a probe means changes, so that records written by
/// earlier builds are ignored.
const REVISION: u64 = 1;

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

/// Where the record is pinned.
pub fn path() -> PathBuf {
    bpffs::root().join(PIN)
}

/// Which of `names` (in their order) share this build's record layout:
/// a digest of the names, this build's version and [`REVISION`] (FNV-1a).
pub fn revision(names: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let version = env!("CARGO_PKG_VERSION");
    let revision = REVISION.to_le_bytes();
    for part in names
        .iter()
        .map(|n| n.as_bytes())
        .chain([version.as_bytes(), &revision[..]])
    {
        for byte in part.iter().chain(&[0u8]) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// The features of `names` the record says are present (none without a
/// record this build can read).
pub fn read(names: &[&str]) -> u64 {
    let Ok(map) = MapData::from_pin(path()) else {
        return 0;
    };
    let Ok(array) = Array::<MapData, Record>::try_from(Map::Array(map)) else {
        return 0;
    };
    match array.get(&0, 0) {
        Ok(record) if record.revision == revision(names) => record.present,
        _ => 0,
    }
}

/// Records `present` (features of `names`) for the rest of the boot,
/// beside what the record holds already; nothing when that adds nothing.
pub fn write(names: &[&str], present: u64) -> Result<()> {
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
    let pin = path();
    if let Ok(map) = MapData::from_pin(&pin) {
        return set(map, record);
    }
    // A new record is whole before it is pinned: a reader finds none, or
    // this one.
    let fd = sys::create_array("RDR_PROBES", size_of::<Record>() as u32, 1, 0)
        .context("creating the probe record")?;
    let map =
        MapData::from_fd(fd.as_fd().try_clone_to_owned()?).context("opening the probe record")?;
    set(map, record)?;
    match sys::obj_pin(fd.as_fd(), &pin) {
        Ok(()) => Ok(()),
        // Another install pinned its record first: it holds facts too.
        Err(_) if pin.exists() => Ok(()),
        Err(err) => Err(err),
    }
}

fn set(map: MapData, record: Record) -> Result<()> {
    let mut array = Array::<MapData, Record>::try_from(Map::Array(map))?;
    array.set(0, record, 0).context("writing the probe record")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_revision_follows_the_names_and_their_order() {
        let a = revision(&["sockops", "sk_lookup"]);
        assert_eq!(a, revision(&["sockops", "sk_lookup"]));
        assert_ne!(a, revision(&["sk_lookup", "sockops"]));
        assert_ne!(a, revision(&["sockops"]));
        // Names are separated: no two lists hash as one.
        assert_ne!(revision(&["ab", "c"]), revision(&["a", "bc"]));
    }
}
