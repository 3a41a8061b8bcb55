//! Proxy UIDs/GIDs as the eBPF programs see them.
//!
//! `bpf_get_current_uid_gid()` reports ids as the *initial* user namespace
//! sees them. Run from an init container of a pod with its own user
//! namespace (Kubernetes `hostUsers: false`), `-u 1337` means the pod's
//! 1337, which is some other id on the host: redirect translates the
//! configured ids through this process's `/proc/self/{uid,gid}_map`, which
//! describe the pod's namespace. Outside user namespaces the maps are the
//! identity and nothing changes.

use std::fs;

use anyhow::{Context as _, Result};

/// Which id map to read.
#[derive(Clone, Copy, Debug)]
pub enum Ids {
    User,
    Group,
}

impl Ids {
    fn path(self) -> &'static str {
        match self {
            Self::User => "/proc/self/uid_map",
            Self::Group => "/proc/self/gid_map",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Self::User => "--proxy-uid",
            Self::Group => "--proxy-gid",
        }
    }
}

/// Whether this process is in the initial user namespace, where every id
/// maps to itself: the namespace's inode is the one the kernel gives the
/// initial namespace (`PROC_USER_INIT_INO`). One `stat` per process
/// instead of reading both maps for every translation (a pod's add
/// translates three lists).
fn in_initial_namespace() -> bool {
    const PROC_USER_INIT_INO: u64 = 0xEFFF_FFFD;
    static INITIAL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INITIAL.get_or_init(|| {
        use std::os::unix::fs::MetadataExt as _;
        fs::metadata("/proc/self/ns/user").is_ok_and(|m| m.ino() == PROC_USER_INIT_INO)
    })
}

/// Translates ids of this process's user namespace into the initial one.
pub fn to_host(kind: Ids, ids: &[u32]) -> Result<Vec<u32>> {
    if in_initial_namespace() {
        return Ok(ids.to_vec());
    }
    let map =
        fs::read_to_string(kind.path()).with_context(|| format!("reading {}", kind.path()))?;
    translate(&map, ids).map_err(|id| {
        anyhow::anyhow!(
            "{} {id} is not mapped in this user namespace ({}): give the proxy an id the pod's user namespace maps",
            kind.flag(),
            kind.path()
        )
    })
}

/// `map` is the text of an id map: lines of `inside outside count`.
/// Returns the first id it does not cover as the error. The sums are
/// checked: the kernel keeps them within 32 bits, but a map that does not
/// (64-bit fields) must fail the lookup, not overflow.
fn translate(map: &str, ids: &[u32]) -> Result<Vec<u32>, u32> {
    let ranges: Vec<(u64, u64, u64)> = map
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace().map(str::parse::<u64>);
            Some((f.next()?.ok()?, f.next()?.ok()?, f.next()?.ok()?))
        })
        .collect();
    ids.iter()
        .map(|&id| {
            let id64 = u64::from(id);
            ranges
                .iter()
                .find(|(inside, _, count)| id64 >= *inside && id64 - inside < *count)
                .and_then(|(inside, outside, _)| outside.checked_add(id64 - inside))
                .and_then(|host| u32::try_from(host).ok())
                .ok_or(id)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shortcut agrees with the maps: the initial namespace is the one
    /// whose maps cover every id with itself.
    #[test]
    fn the_initial_namespace_is_told_by_its_inode() {
        let whole = |path: &str| {
            let map = fs::read_to_string(path).expect("reading an id map");
            translate(&map, &[0, 1337, u32::MAX - 1]).ok() == Some(vec![0, 1337, u32::MAX - 1])
                && map.lines().count() == 1
        };
        let identity = whole("/proc/self/uid_map") && whole("/proc/self/gid_map");
        assert_eq!(in_initial_namespace(), identity);
    }

    #[test]
    fn the_initial_namespace_maps_ids_to_themselves() {
        let identity = "         0          0 4294967295\n";
        assert_eq!(
            translate(identity, &[0, 1337, 65534]),
            Ok(vec![0, 1337, 65534])
        );
    }

    #[test]
    fn a_pod_user_namespace_shifts_ids() {
        // Kubernetes hostUsers: false gives each pod a 65536-id range.
        let pod = "0 2147352576 65536\n";
        assert_eq!(translate(pod, &[1337]), Ok(vec![2_147_352_576 + 1337]));
        assert_eq!(translate(pod, &[70000]), Err(70000));
    }

    #[test]
    fn several_ranges_are_searched() {
        let map = "0 1000 1\n1 100000 65535\n";
        assert_eq!(translate(map, &[0, 1337]), Ok(vec![1000, 100_000 + 1336]));
    }

    #[test]
    fn maps_past_32_bits_fail_the_lookup_instead_of_overflowing() {
        assert_eq!(translate("1 0 18446744073709551615\n", &[7]), Ok(vec![6]));
        assert_eq!(translate("0 18446744073709551615 2\n", &[1]), Err(1));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// No id map, however malformed or large its numbers, panics the
        /// translation.
        #[test]
        fn any_map_translates_or_refuses(
            lines in proptest::collection::vec(
                (small_or_any(), small_or_any(), small_or_any()),
                0..4,
            ),
            junk in "\\PC{0,40}",
            ids in proptest::collection::vec(
                proptest::prop_oneof![0u32..16, proptest::prelude::any::<u32>()],
                0..4,
            ),
        ) {
            let mut map: String = lines.iter().map(|(a, b, c)| format!("{a} {b} {c}\n")).collect();
            map.push_str(&junk);
            let _ = translate(&map, &ids);
        }
    }

    /// A map field: small, near the top of the range, or anything.
    fn small_or_any() -> impl proptest::strategy::Strategy<Value = u64> {
        proptest::prop_oneof![
            0u64..16,
            u64::MAX - 16..=u64::MAX,
            proptest::prelude::any::<u64>()
        ]
    }
}
