//! What this node can do: each kernel feature eBPF capture needs, tested
//! for real (a hook is present when the kernel loads a program for it, a
//! map type when it creates one), and the mode that follows.
//!
//! `--assume-missing` (hidden) makes features count as absent, so that
//! every fallback path can be exercised on a kernel that has everything.
//!
//! What the kernel has does not change until it reboots: a feature an
//! earlier install found present this boot is taken from its record (see
//! [`super::probe_record`]) instead of being asked again, except by
//! `redirect probe`, which always asks.

use std::sync::{
    Mutex, OnceLock,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use aya::{maps::MapType, sys::is_map_supported, util::KernelVersion};
use serde::Serialize;

use super::{Hook, all_hooks, privilege, sys};
use crate::{bpffs, cgroup};

static ASSUMED_MISSING: OnceLock<Vec<String>> = OnceLock::new();

/// Features to treat as absent for the rest of this process.
pub fn assume_missing(names: Vec<String>) -> anyhow::Result<()> {
    let known: Vec<&str> = catalogue().iter().map(|f| f.name).collect();
    for name in &names {
        if !known.contains(&name.as_str()) {
            anyhow::bail!(
                "--assume-missing: unknown feature '{name}' (known: {})",
                known.join(", ")
            );
        }
    }
    let _ = ASSUMED_MISSING.set(names);
    Ok(())
}

/// Whether features may be taken from this boot's record (`redirect
/// probe` turns it off).
static USE_RECORD: AtomicBool = AtomicBool::new(true);

/// The record's features present, read once per process.
static RECORDED: OnceLock<u64> = OnceLock::new();

/// Recordable features this process found present itself.
static FOUND: AtomicU64 = AtomicU64::new(0);

/// Every feature from now on is asked of the kernel, none taken from the
/// record.
pub fn ask_the_kernel_only() {
    USE_RECORD.store(false, Ordering::Relaxed);
}

/// The features whose presence is the kernel's alone (not the caller's
/// privileges, mounts or tools), in the record's bit order.
fn recordable() -> Vec<&'static str> {
    let mut names = vec![
        "map/lru_hash",
        "map/percpu_array",
        "map/ringbuf",
        "map/sk_storage",
        "helper/sk_storage_get",
        NETNS_COOKIE,
        INGRESS_IFINDEX,
    ];
    for hook in all_hooks() {
        if !names.contains(&hook.feature) {
            names.push(hook.feature);
        }
    }
    names
}

/// [`recordable`], each hook with how it is probed (its program and attach
/// types): what the record's revision digests, so that a build probing a
/// hook another way reads and writes another record.
fn record_keys() -> Vec<String> {
    recordable()
        .into_iter()
        .map(|name| match all_hooks().find(|h| h.feature == name) {
            Some(hook) => format!("{name}:{}:{}", hook.kind.prog_type(), hook.attach_type),
            None => name.to_owned(),
        })
        .collect()
}

fn bit(name: &str) -> u64 {
    recordable()
        .iter()
        .position(|n| *n == name)
        .map_or(0, |i| 1 << i)
}

fn recorded_bits() -> u64 {
    *RECORDED.get_or_init(|| super::probe_record::read(&record_keys()))
}

/// Whether this boot's record says `name` is present: only to a process
/// with eBPF privileges, whose own probes would tell (without them a
/// probe answers "cannot tell", and so does the record).
fn recorded_present(name: &str) -> bool {
    USE_RECORD.load(Ordering::Relaxed)
        && bit(name) != 0
        && privileges().is_ok()
        && recorded_bits() & bit(name) != 0
}

/// This process's eBPF privileges, checked once.
fn privileges() -> &'static Result<(), String> {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    CHECKED.get_or_init(|| privilege::check_ebpf().map_err(|err| err.to_string()))
}

/// Notes that the kernel answered `name` present.
fn found_present(name: &str) {
    FOUND.fetch_or(bit(name), Ordering::Relaxed);
}

/// The features this boot's record holds (present by an earlier install's
/// probe), whether or not this process reads it.
pub fn recorded() -> Vec<&'static str> {
    let bits = recorded_bits();
    recordable()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, name)| name)
        .collect()
}

/// Adds what this process found present to this boot's record: called
/// by a successful install, under the node's lock. A record that cannot
/// be written costs later installs their probes, nothing else.
pub fn record_for_this_boot() {
    let found = FOUND.load(Ordering::Relaxed);
    if found & !recorded_bits() != 0 {
        let _ = super::probe_record::write(&record_keys(), found);
    }
}

fn assumed_missing(name: &str) -> bool {
    ASSUMED_MISSING
        .get()
        .is_some_and(|names| names.iter().any(|n| n == name))
}

/// One feature and whether this node has it.
#[derive(Clone, Debug, Serialize)]
pub struct Feature {
    pub name: &'static str,
    pub needed_for: &'static str,
    /// First mainline kernel that has it.
    pub first_kernel: String,
    /// eBPF capture cannot run without it.
    pub required: bool,
    pub present: bool,
    /// How it was found, or why it is missing.
    pub detail: String,
}

/// The probe's findings and the mode they lead to.
#[derive(Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub features: Vec<Feature>,
    pub mode: Mode,
    pub reason: String,
    /// The features this boot's record holds (see
    /// [`super::probe_record`]): each one the kernel answers present.
    pub recorded: Vec<&'static str>,
}

/// The capture mode the probe's findings lead to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every feature eBPF capture needs is present.
    Ebpf,
    /// eBPF capture cannot run here.
    Iptables,
    /// The probe lacks the privileges to tell.
    Unknown,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ebpf => "ebpf",
            Self::Iptables => "iptables",
            Self::Unknown => "unknown",
        })
    }
}

/// A feature before it is probed.
struct Spec {
    name: &'static str,
    needed_for: &'static str,
    first_kernel: String,
    required: bool,
}

fn catalogue() -> Vec<Spec> {
    let mut specs = vec![
        Spec {
            name: "privileges",
            needed_for: "loading and attaching programs (root, or CAP_BPF + CAP_NET_ADMIN)",
            first_kernel: "-".into(),
            required: true,
        },
        Spec {
            name: "cgroup2",
            needed_for: "attaching to the pod's cgroup",
            first_kernel: "4.5".into(),
            required: true,
        },
        Spec {
            name: "bpffs",
            needed_for: "pinning programs past the installer's exit",
            first_kernel: "4.4".into(),
            required: true,
        },
        Spec {
            name: "kernel",
            needed_for: "cgroup bpf_link (5.7), log ring buffer and getsockopt passthrough (5.8)",
            first_kernel: "5.8".into(),
            required: true,
        },
        Spec {
            name: "map/lru_hash",
            needed_for: "original destinations",
            first_kernel: "4.10".into(),
            required: true,
        },
        Spec {
            name: "map/percpu_array",
            needed_for: "decision counters",
            first_kernel: "4.6".into(),
            required: true,
        },
        Spec {
            name: "map/ringbuf",
            needed_for: "the programs' log (run --log)",
            first_kernel: "5.8".into(),
            required: true,
        },
        // Socket storage from cgroup/connect4 and sockops holds a record
        // between connect() and establishment. 5.10 is the oldest kernel
        // verified to have both (its source, and the kernel matrix).
        Spec {
            name: "map/sk_storage",
            needed_for: "original destinations between connect() and establishment",
            first_kernel: "5.10".into(),
            required: true,
        },
        Spec {
            name: "helper/sk_storage_get",
            needed_for: "socket storage from cgroup/connect4",
            first_kernel: "5.10".into(),
            required: true,
        },
    ];
    for hook in all_hooks() {
        specs.push(Spec {
            name: hook.feature,
            needed_for: hook.mirrors,
            first_kernel: hook.first_kernel(),
            required: !hook.optional,
        });
    }
    specs.push(Spec {
        name: NETNS_COOKIE,
        needed_for: "node sets (`redirect node-set`): a socket's pod by its network namespace",
        first_kernel: "5.15".into(),
        required: false,
    });
    specs.push(Spec {
        name: INGRESS_IFINDEX,
        needed_for: "-c with inbound capture: the interface an inbound connection arrived on",
        first_kernel: "5.17".into(),
        required: false,
    });
    // The netfilter tools, for the fallback.
    for (name, needed_for) in [
        ("iptables-nft", "iptables mode (the fallback), nft backend"),
        (
            "iptables-legacy",
            "iptables mode (the fallback), legacy backend",
        ),
        ("nft", "Istio's native nftables mode (--native-nftables)"),
    ] {
        specs.push(Spec {
            name,
            needed_for,
            first_kernel: "-".into(),
            required: false,
        });
    }
    specs
}

/// The feature node sets need: `bpf_get_netns_cookie` in sockops and
/// cgroup sockopt programs (kernel 5.15; sock_addr ones have it from 5.7).
pub const NETNS_COOKIE: &str = "helper/get_netns_cookie";

/// Whether sockops and cgroup sockopt programs may ask a socket's network
/// namespace cookie (subject to `--assume-missing`): `None` when they may,
/// else why not.
pub fn netns_cookie_missing() -> Option<String> {
    if assumed_missing(NETNS_COOKIE) {
        return Some("assumed missing (--assume-missing)".into());
    }
    if recorded_present(NETNS_COOKIE) {
        return None;
    }
    for (kind, name) in [
        (aya::programs::ProgramType::SockOps, "sockops"),
        (aya::programs::ProgramType::CgroupSockopt, "cgroup sockopt"),
    ] {
        match aya::sys::is_helper_supported(kind, aya::sys::BpfHelper::BPF_FUNC_get_netns_cookie) {
            Ok(true) => {}
            Ok(false) => return Some(format!("{name} programs cannot call it here")),
            Err(err) => return Some(format!("cannot tell ({err})")),
        }
    }
    found_present(NETNS_COOKIE);
    None
}

/// The feature sk_lookup's `ingress_ifindex` field is.
pub const INGRESS_IFINDEX: &str = "sk_lookup/ingress_ifindex";

/// Whether sk_lookup programs may read the interface a connection arrived
/// on (subject to `--assume-missing`).
pub fn ingress_ifindex_present() -> bool {
    !assumed_missing(INGRESS_IFINDEX) && probe_ingress_ifindex().is_ok()
}

/// Whether this kernel has `hook` (probed once per process, and subject
/// to `--assume-missing`).
pub fn hook_present(hook: &Hook) -> bool {
    !assumed_missing(hook.feature) && probe(hook).is_ok()
}

/// The kernel's answer for `hook`: a program for it loads (and, for a TCX
/// hook, may be linked, see [`sys::probe_tcx`]).
fn probe(hook: &Hook) -> std::io::Result<()> {
    remembered(hook.feature, || {
        if hook.kind == super::Kind::SchedCls {
            sys::probe_tcx(hook.kind.prog_type(), hook.attach_type)
        } else {
            sys::probe_hook(hook.kind.prog_type(), hook.attach_type)
        }
    })
}

/// Whether sk_lookup programs may read `ingress_ifindex`, asked once.
fn probe_ingress_ifindex() -> std::io::Result<()> {
    let hook = super::SK_LOOKUP;
    remembered(INGRESS_IFINDEX, || {
        sys::probe_sk_lookup_ifindex(hook.kind.prog_type(), hook.attach_type)
    })
}

/// The kernel's answers so far, by feature: an install asks for each
/// hook once to choose the mode and again for the programs it attaches.
/// Kept for the process only; the kernel's features do not change under it.
static ANSWERS: Mutex<Vec<(&'static str, Option<i32>)>> = Mutex::new(Vec::new());

/// `ask`'s answer for `feature`, asking the kernel the first time only.
/// An error is kept as its errno (one without an errno is asked again).
fn remembered(
    feature: &'static str,
    ask: impl FnOnce() -> std::io::Result<()>,
) -> std::io::Result<()> {
    let answer =
        |errno: Option<i32>| errno.map_or(Ok(()), |e| Err(std::io::Error::from_raw_os_error(e)));
    let known = ANSWERS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .iter()
        .find(|(name, _)| *name == feature)
        .map(|(_, errno)| *errno);
    if let Some(errno) = known {
        return answer(errno);
    }
    let result = if recorded_present(feature) {
        Ok(())
    } else {
        ask()
    };
    if result.is_ok() {
        found_present(feature);
    }
    let errno = match &result {
        Ok(()) => None,
        Err(err) => match err.raw_os_error() {
            Some(e) => Some(e),
            None => return result,
        },
    };
    ANSWERS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push((feature, errno));
    result
}

fn detect(spec: &Spec) -> (bool, String) {
    if assumed_missing(spec.name) {
        return (false, "assumed missing (--assume-missing)".into());
    }
    if recorded_present(spec.name) {
        return (true, "found present earlier this boot".into());
    }
    let (present, detail) = ask(spec);
    if present {
        found_present(spec.name);
    }
    (present, detail)
}

/// What the kernel (or the node) answers for `spec`.
fn ask(spec: &Spec) -> (bool, String) {
    let found = |ok: bool, yes: &str, no: String| {
        if ok {
            (true, yes.to_owned())
        } else {
            (false, no)
        }
    };
    match spec.name {
        "privileges" => match privileges() {
            Ok(()) => (true, "effective capabilities suffice".into()),
            Err(err) => (false, err.clone()),
        },
        "cgroup2" => match cgroup::cgroup2_mounts() {
            Ok(m) if !m.is_empty() => (true, format!("mounted at {}", m[0].display())),
            _ => (false, "no cgroup2 hierarchy in /proc/mounts".into()),
        },
        "bpffs" => found(
            true,
            if bpffs::is_mounted() {
                "mounted at /sys/fs/bpf"
            } else {
                "not mounted; install mounts it"
            },
            String::new(),
        ),
        "kernel" => {
            let (major, minor) = super::MIN_KERNEL;
            match KernelVersion::current() {
                Ok(k) => found(
                    k >= KernelVersion::new(major, minor, 0),
                    "new enough",
                    format!("{k} is older than {major}.{minor}"),
                ),
                Err(_) => (true, "version unknown; assumed new enough".into()),
            }
        }
        "map/lru_hash" => map(MapType::LruHash),
        "map/percpu_array" => map(MapType::PerCpuArray),
        "map/ringbuf" => map(MapType::RingBuf),
        "map/sk_storage" => match sys::probe_sk_storage_map() {
            Ok(()) => (true, "the kernel knows the map type".into()),
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                (false, "the kernel has no such map type".into())
            }
            Err(err) if err.raw_os_error() == Some(libc::EPERM) => {
                (false, "cannot tell without privileges".into())
            }
            Err(err) => (false, format!("cannot tell ({err})")),
        },
        "helper/sk_storage_get" => match aya::sys::is_helper_supported(
            aya::programs::ProgramType::CgroupSockAddr,
            aya::sys::BpfHelper::BPF_FUNC_sk_storage_get,
        ) {
            Ok(true) => (true, "a cgroup/connect4 program may call it".into()),
            Ok(false) => (false, "cgroup/connect4 programs cannot call it here".into()),
            Err(err) => (false, format!("cannot tell ({err})")),
        },
        NETNS_COOKIE => match netns_cookie_missing() {
            None => (
                true,
                "sockops and cgroup sockopt programs may call it".into(),
            ),
            Some(why) => (false, why),
        },
        INGRESS_IFINDEX => match probe_ingress_ifindex() {
            Ok(()) => (true, "an sk_lookup program may read it".into()),
            Err(err) if err.raw_os_error() == Some(libc::EPERM) => {
                (false, "cannot tell without privileges".into())
            }
            Err(err) => (false, format!("the kernel refuses it ({err})")),
        },
        "iptables-nft" | "iptables-legacy" | "nft" => {
            let (program, package) = match spec.name {
                "nft" => ("nft", "nftables"),
                "iptables-nft" => ("iptables-nft-restore", "iptables"),
                _ => ("iptables-legacy-restore", "iptables"),
            };
            match crate::host::which(program) {
                Some(path) => (true, path.display().to_string()),
                None => (false, format!("no {program} (install {package})")),
            }
        }
        name => {
            let Some(hook) = all_hooks().find(|h| h.feature == name) else {
                return (false, "unknown feature".into());
            };
            match probe(&hook) {
                Ok(()) => (true, "a program for it loads".into()),
                Err(err) if err.raw_os_error() == Some(libc::EPERM) => {
                    (false, "cannot tell without privileges".into())
                }
                Err(err) => (false, format!("the kernel refuses it ({err})")),
            }
        }
    }
}

fn map(kind: MapType) -> (bool, String) {
    match is_map_supported(kind) {
        Ok(true) => (true, "a map of this type can be created".into()),
        Ok(false) => (false, "the kernel has no such map type".into()),
        Err(err) => (false, format!("cannot tell ({err})")),
    }
}

/// Probes everything and chooses the mode.
pub fn run() -> Report {
    privilege::raise_memlock();
    let features: Vec<Feature> = catalogue()
        .into_iter()
        .map(|spec| {
            let (present, detail) = detect(&spec);
            Feature {
                name: spec.name,
                needed_for: spec.needed_for,
                first_kernel: spec.first_kernel,
                required: spec.required,
                present,
                detail,
            }
        })
        .collect();
    let missing: Vec<&Feature> = features
        .iter()
        .filter(|f| f.required && !f.present)
        .collect();
    let unprivileged = missing.iter().any(|f| f.name == "privileges");
    let (mode, reason) = if unprivileged {
        let why = features
            .iter()
            .find(|f| f.name == "privileges")
            .map_or("", |f| f.detail.as_str());
        (
            Mode::Unknown,
            format!(
                "without the privileges eBPF needs, the kernel's hooks cannot be tested ({why}): run `redirect probe` with them"
            ),
        )
    } else if missing.is_empty() {
        (
            Mode::Ebpf,
            "every feature eBPF capture needs is present".to_owned(),
        )
    } else {
        let names: Vec<String> = missing
            .iter()
            .map(|f| format!("{} (kernel {})", f.name, f.first_kernel))
            .collect();
        (
            Mode::Iptables,
            format!("eBPF capture needs {}, missing here", names.join(", ")),
        )
    };
    Report {
        kernel: KernelVersion::current().map_or_else(|_| "unknown".into(), |k| k.to_string()),
        features,
        mode,
        reason,
        recorded: recorded(),
    }
}

/// The feature table as text.
pub fn render(report: &Report) -> String {
    let mut out = format!("kernel {}\n", report.kernel);
    out.push_str(&format!(
        "{:<26} {:<8} {:<8} {}\n",
        "feature", "first", "here", "needed for"
    ));
    for f in &report.features {
        let here = if f.present {
            "yes"
        } else if f.required {
            "MISSING"
        } else {
            "no"
        };
        out.push_str(&format!(
            "{:<26} {:<8} {:<8} {}  ({})\n",
            f.name, f.first_kernel, here, f.needed_for, f.detail
        ));
    }
    out.push_str(&format!("mode: {} ({})\n", report.mode, report.reason));
    out.push_str(&format!(
        "recorded this boot for installs ({}): {}\n",
        super::probe_record::path(&record_keys()).display(),
        if report.recorded.is_empty() {
            "nothing".to_owned()
        } else {
            report.recorded.join(", ")
        }
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_recordable_feature_has_a_bit_of_its_own_in_the_record() {
        let names = recordable();
        assert!(names.len() <= 64, "{} features: {names:?}", names.len());
        let known: Vec<&str> = catalogue().iter().map(|s| s.name).collect();
        for (i, name) in names.iter().enumerate() {
            assert!(known.contains(name), "{name} is not in the catalogue");
            assert_eq!(bit(name), 1 << i, "{name}");
        }
        // What depends on the caller is never recorded.
        for name in ["privileges", "cgroup2", "bpffs", "kernel", "nft"] {
            assert_eq!(bit(name), 0, "{name}");
        }
    }
}
