//! eBPF mode: the embedded programs, and installing them on a cgroup.

pub mod loader;
pub mod maps;
pub mod sys;

/// The compiled `redirect-ebpf` object, built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect-ebpf"));

/// A program of the object and the cgroup hook it is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hook {
    /// Name of the program function in `redirect-ebpf`.
    pub program: &'static str,
    /// Short name used in status output and in the link's pin name.
    pub name: &'static str,
    /// What it replaces in Istio's rule set.
    pub mirrors: &'static str,
}

impl Hook {
    /// File name of the pinned link in the instance directory.
    pub fn pin_name(&self) -> String {
        format!("link_{}", self.name)
    }
}

pub const CONNECT4: Hook = Hook {
    program: "redirect_connect4",
    name: "connect4",
    mirrors: "nat OUTPUT -> ISTIO_OUTPUT -> ISTIO_REDIRECT",
};

pub const SOCKOPS: Hook = Hook {
    program: "redirect_sockops",
    name: "sockops",
    mirrors: "conntrack entries of redirected connections",
};

/// Every hook an instance attaches, in attach order: sockops first, so that
/// every connection connect4 redirects is already tracked.
pub const HOOKS: [Hook; 2] = [SOCKOPS, CONNECT4];
