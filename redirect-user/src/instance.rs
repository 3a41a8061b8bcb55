//! Instance names: the one check every name passes, whatever its source
//! (a flag, or the name derived from the pod's cgroup), before it becomes a
//! directory under `/sys/fs/bpf/redirect/`.

use std::fmt;

use crate::cgroup::Cgroup;

/// Longest instance name, in bytes.
pub const MAX_LEN: usize = 200;

/// A name that is safe as one path component under the instances'
/// directory: 1-200 bytes of `A-Z a-z 0-9 _ -`, not starting with `-` (so
/// never `.`, `..`, a staging directory of redirect's own, or something a
/// tool could read as an option). No dots: the bpffs refuses every name
/// that has one (they are reserved for the kernel's own files).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceName(String);

impl InstanceName {
    /// Checks a name given by the user (or read back from the bpffs).
    pub fn parse(name: &str) -> Result<Self, String> {
        let ok = !name.is_empty()
            && name.len() <= MAX_LEN
            && !name.starts_with('-')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(format!(
                "'{}' is not a valid instance name: use 1-{MAX_LEN} characters of A-Z a-z 0-9 _ - \
                 not starting with '-' (the bpffs allows no dots)",
                name.escape_debug()
            ))
        }
    }

    /// The name of the instance of cgroup `cg` when none is given: its path
    /// below the cgroup2 mount with `/` written as `-` and every other byte
    /// outside `A-Z a-z 0-9` as `_` and two hex digits, so that two cgroups
    /// never share a name (`a/b` is `a-b`, `a-b` is `a_2db`, `a.slice` is
    /// `a_2eslice`). A path whose name would be too long is named by
    /// its cgroup id (`cgroup_id-N`, which no escaped path produces: an
    /// escape's `_` is always followed by hex digits).
    pub fn for_cgroup(cg: &Cgroup) -> Self {
        let relative = cg.relative.trim_matches('/');
        if relative.is_empty() {
            return Self("_root".to_owned()); // `_r` is no escape either
        }
        let mut name = String::with_capacity(relative.len());
        for b in relative.bytes() {
            match b {
                b'/' => name.push('-'),
                b if b.is_ascii_alphanumeric() => name.push(char::from(b)),
                b => name.push_str(&format!("_{b:02x}")),
            }
        }
        if name.len() > MAX_LEN || name.starts_with('-') {
            return Self(format!("cgroup_id-{}", cg.id));
        }
        Self(name)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `--instance`'s value parser (clap).
pub fn parse_arg(s: &str) -> Result<InstanceName, String> {
    InstanceName::parse(s)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, path::PathBuf};

    use proptest::prelude::*;

    use super::*;

    fn cg(relative: &str, id: u64) -> Cgroup {
        Cgroup {
            path: PathBuf::from("/sys/fs/cgroup").join(relative),
            relative: relative.to_owned(),
            id,
        }
    }

    #[test]
    fn hostile_names_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/abs",
            "-rf",
            ".hidden",
            "a.b",
            "@new-x",
            "caf\u{e9}",
            "a b",
            "a\0b",
            &"x".repeat(MAX_LEN + 1),
        ] {
            assert!(InstanceName::parse(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["pod-1_a_b", "a", &"x".repeat(MAX_LEN), "_root", "sbx-1-2"] {
            assert!(InstanceName::parse(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn derived_names_follow_the_cgroup_path() {
        let name = |rel: &str| InstanceName::for_cgroup(&cg(rel, 42)).0;
        assert_eq!(name("kubepods/pod1"), "kubepods-pod1");
        assert_eq!(name("a/b"), "a-b");
        assert_eq!(name("a-b"), "a_2db");
        assert_eq!(name("a_b"), "a_5fb");
        assert_eq!(name(".x/y"), "_2ex-y");
        assert_eq!(name("kubepods.slice/a"), "kubepods_2eslice-a");
        assert_eq!(name(""), "_root");
        assert_eq!(name(&"x".repeat(300)), "cgroup_id-42");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Every derived name passes the check (so it can be pinned).
        #[test]
        fn derived_names_are_valid(rel in "[a-z0-9/._ -]{0,80}", id in any::<u64>()) {
            let name = InstanceName::for_cgroup(&cg(&rel, id));
            prop_assert!(InstanceName::parse(name.as_str()).is_ok(), "{name} from {rel:?}");
        }

        /// Two different cgroup paths never get the same name.
        #[test]
        fn derivation_is_injective(paths in proptest::collection::vec("[ab/_.-]{1,6}", 2..40)) {
            let mut seen: HashMap<String, String> = HashMap::new();
            for rel in paths {
                let trimmed = rel.trim_matches('/').to_owned();
                let name = InstanceName::for_cgroup(&cg(&rel, 7)).0;
                if let Some(other) = seen.insert(name.clone(), trimmed.clone()) {
                    prop_assert_eq!(other, trimmed, "both named {}", name);
                }
            }
        }

        /// No input makes the check panic, and what it accepts is one safe
        /// path component.
        #[test]
        fn parse_never_panics(raw in any::<String>()) {
            if let Ok(name) = InstanceName::parse(&raw) {
                prop_assert!(!name.as_str().contains(['/', '.', '@']));
            }
        }
    }
}
