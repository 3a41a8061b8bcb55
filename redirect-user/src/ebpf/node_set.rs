//! A node's program set: the programs and maps loaded and pinned once per
//! node (`redirect node-set load`), attached to a cgroup that holds the
//! node's pods, serving every pod that `add` lists by its network
//! namespace. A pod costs map entries (its configuration in two slots of
//! the shared maps, its sets, its counters) and, with inbound capture, one
//! `sk_lookup` link into its network namespace: no program is loaded or
//! verified for it, so adding one takes map writes only.
//!
//! The programs find a socket's pod by its network namespace cookie
//! (`RDR_PODS`, `bpf_get_netns_cookie`: sockops and cgroup sockopt have it
//! from kernel 5.15) and an inbound SYN's by the pod address it is for
//! (`RDR_POD_ADDRS`). Sockets of any other namespace are left alone.
//!
//! Layout: `/sys/fs/bpf/redirect/@set-<NAME>/` (`node` unless `--set`
//! names another; tests load sets of their own) holds the maps (`RDR_*`),
//! one link per cgroup hook (`link_<hook>`), the `sk_lookup` program
//! (`prog_sk_lookup`) and each pod's inbound link (`pod<N>_sk_lookup`).
//! Its staging names are an instance's (`@new-@set-<NAME>`,
//! `@del-@set-<NAME>`), so an interrupted load or unload is removed by the
//! next run's repair.

use std::{
    fs::{self, File},
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, IterableMap as _, Map, MapData, PerCpuArray, PerCpuValues, SockMap},
};
use redirect_common::{
    COUNTER_COUNT, LISTENER_SLOTS, MAX_CIDRS, MAX_CIDRS6, MAX_GROUPS, MAX_IN_HITS, MAX_LOCAL_ADDRS,
    MAX_PODS, MAX_PORT_BLOCKS, MAX_PORTS, MAX_ROUTES, MAX_ROUTES6, POD_ACTIVE, POD_ADDRS_KEPT,
    POD_ADDRS_LISTED, POD_CLAIMED, POD_NAME_MAX, PodMeta, SLOTS_PER_POD, counter_index,
    in_hits_key, listener_index, pod_slot, spare_slot,
};

use super::{
    HOOKS, Hook, OBJECT, SK_LOOKUP, config::Config, listener, loader, maps, privilege, sys, timing,
};
use crate::{
    bpffs::{self, DEL_PREFIX, Lock, NEW_PREFIX},
    cgroup::Cgroup,
    instance::InstanceName,
    signals::HoldSignals,
};

pub use crate::bpffs::SET_PREFIX as DIR_PREFIX;
/// Pin of the `sk_lookup` program that each pod's inbound link runs.
/// ([`Hook::prog_pin_name`] of [`SK_LOOKUP`]).
pub(super) const PROG_SK_LOOKUP: &str = "prog_sk_lookup";
/// First kernel whose sockops and cgroup sockopt programs can ask a
/// socket's network namespace cookie.
pub const MIN_KERNEL: (u8, u8) = (5, 15);
/// `SO_NETNS_COOKIE` (kernel 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;
/// The calling thread's network namespace.
const NETNS: &str = "/proc/thread-self/ns/net";

/// The name of node set `set`'s directory.
// A pod's record holds its whole name: status, CHECK and DEL find the
// pod by it.
const _: () = assert!(POD_NAME_MAX >= crate::instance::MAX_LEN);

fn dir_name(set: &InstanceName) -> String {
    format!("{DIR_PREFIX}{set}")
}

/// Node set `set`'s directory.
pub fn dir(set: &InstanceName) -> PathBuf {
    bpffs::root().join(dir_name(set))
}

/// Whether node set `set` is loaded.
pub fn is_loaded(set: &InstanceName) -> bool {
    bpffs::is_mounted() && fs::symlink_metadata(dir(set)).is_ok_and(|m| m.is_dir())
}

/// Pin name of pod `pod`'s inbound link.
pub(super) fn pod_link(pod: u32) -> String {
    format!("pod{pod}_sk_lookup")
}

/// Every file a node set's directory can hold (for [`bpffs::remove_dir`]).
pub fn pin_files(dir: &Path) -> Vec<String> {
    let mut files: Vec<String> = HOOKS
        .iter()
        .chain([&SK_LOOKUP])
        .flat_map(|hook| {
            [
                hook.pin_name(),
                hook.prog_pin_name(),
                hook.prog_staging_name(),
            ]
        })
        .collect();
    files.extend(maps::LAYOUT.iter().map(|(name, ..)| (*name).to_owned()));
    if let Ok(entries) = fs::read_dir(dir) {
        files.extend(entries.flatten().filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let index = name.strip_prefix("pod")?.strip_suffix("_sk_lookup")?;
            index.parse::<u32>().is_ok().then_some(name)
        }));
    }
    files
}

/// What `load` makes.
pub struct LoadRequest<'a> {
    /// The set's name.
    pub set: &'a InstanceName,
    /// The cgroup whose processes (the node's pods) the programs see.
    pub cgroup: &'a Cgroup,
    /// How many pods the set can hold at once.
    pub max_pods: u32,
    /// Redirected handshakes in flight at once on the whole node.
    pub max_connections: u32,
}

/// What [`load`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loaded {
    /// Loaded, attached and pinned a new set.
    New,
    /// The set was loaded on that cgroup: its programs were replaced in
    /// place with this build's, and its pods kept their capture.
    Upgraded { pods: usize },
}

impl std::fmt::Display for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::New => f.write_str("loaded"),
            Self::Upgraded { pods: 0 } => {
                f.write_str("upgraded in place (this build's programs; no pods yet)")
            }
            Self::Upgraded { pods: 1 } => {
                f.write_str("upgraded in place (this build's programs; its 1 pod kept its capture)")
            }
            Self::Upgraded { pods } => write!(
                f,
                "upgraded in place (this build's programs; its {pods} pods kept their capture)"
            ),
        }
    }
}

/// Loads, attaches and pins the node set; over one loaded on that cgroup
/// already, replaces its programs in place (see [`super::set_upgrade`]).
pub fn load(req: &LoadRequest<'_>) -> Result<Loaded> {
    privilege::check_ebpf()?;
    check_kernel()?;
    if !(1..=MAX_PODS).contains(&req.max_pods) {
        bail!(
            "--max-pods {} is out of range: a node set holds 1 to {MAX_PODS} pods",
            req.max_pods
        );
    }
    privilege::raise_memlock();
    bpffs::ensure_mounted()?;
    let _hold = HoldSignals::new();
    let _lock = Lock::exclusive()?;
    super::removal::repair()?;
    if is_loaded(req.set) {
        let cgroup = attached_cgroup(req.set)?;
        if cgroup == req.cgroup.id {
            let pods = super::set_upgrade::upgrade(req, &dir(req.set))?;
            return Ok(Loaded::Upgraded { pods });
        }
        if cgroup == 0 {
            // The kernel detaches a cgroup link when its cgroup goes.
            bail!(
                "node set {} is loaded, but the cgroup it was attached to is gone (its programs no longer run): `redirect node-set unload --set {}` first, then load it again",
                req.set,
                req.set
            );
        }
        bail!(
            "node set {} is loaded already, on another cgroup (id {cgroup}): `redirect node-set unload --set {}` first",
            req.set,
            req.set
        );
    }
    let name = dir_name(req.set);
    let staging = format!("{NEW_PREFIX}{name}");
    let build = bpffs::root().join(&staging);
    let result = build_set(req, &build).and_then(|()| bpffs::rename(&staging, &name));
    if let Err(err) = result {
        if let Err(undo) = bpffs::remove_dir(&staging, &pin_files(&build)) {
            return Err(err.context(format!("and the rollback failed: {undo:#}")));
        }
        return Err(err);
    }
    super::features::record_for_this_boot();
    Ok(Loaded::New)
}

/// Refuses kernels whose sockops or cgroup sockopt programs cannot ask a
/// socket's network namespace cookie.
fn check_kernel() -> Result<()> {
    if let Some(why) = super::features::netns_cookie_missing() {
        let (major, minor) = MIN_KERNEL;
        bail!(
            "this kernel is too old for a node set: its programs find a socket's pod by network \
             namespace cookie, which sockops and cgroup sockopt programs have from {major}.{minor} \
             ({}: {why}); capture each pod on its own (`redirect install`, or the CNI plugin's \
             per-pod mode)",
            super::features::NETNS_COOKIE
        );
    }
    Ok(())
}

/// The id of the cgroup the loaded set's connect4 link is attached to.
fn attached_cgroup(set: &InstanceName) -> Result<u64> {
    let pin = dir(set).join(super::CONNECT4.pin_name());
    let link = sys::obj_get(&pin)?;
    Ok(sys::link_info(link.as_fd())?.target)
}

/// Each map's capacity in a set of `pods` pods: a per-pod instance's times
/// the pods (the tuple and bypass maps are per node).
pub(super) fn capacities(pods: u32) -> Vec<(&'static str, u32)> {
    let slots = SLOTS_PER_POD * pods;
    vec![
        (maps::CONFIG, slots),
        (maps::ACTIVE, pods),
        (maps::STATS, COUNTER_COUNT * pods),
        (maps::LISTENER, LISTENER_SLOTS * pods),
        (maps::IN_HITS, MAX_IN_HITS * pods),
        (maps::PORTS, MAX_PORTS * slots),
        (maps::PORT_RANGES, MAX_PORT_BLOCKS * slots),
        (maps::GROUPS, MAX_GROUPS as u32 * slots),
        (maps::EXCLUDE, MAX_CIDRS * slots),
        (maps::INCLUDE, MAX_CIDRS * slots),
        (maps::LOCAL, MAX_LOCAL_ADDRS * slots),
        (maps::ROUTE, MAX_ROUTES * slots),
        (maps::LOCAL6, MAX_LOCAL_ADDRS * slots),
        (maps::EXCLUDE6, MAX_CIDRS6 * slots),
        (maps::INCLUDE6, MAX_CIDRS6 * slots),
        (maps::ROUTE6, MAX_ROUTES6 * slots),
        (maps::PODS, pods),
        (maps::POD_ADDRS, MAX_LOCAL_ADDRS * pods),
        (maps::POD_META, pods),
    ]
}

/// The set's object loaded with its maps pinned in `dir`: created there
/// for a new set, the pinned ones reused by an upgrade (aya opens a map
/// pinned by name instead of creating it).
pub(super) fn load_object(req: &LoadRequest<'_>, dir: &Path) -> Result<Ebpf> {
    create_pod_records(dir, req.max_pods)?;
    let sock_pin = dir.join(maps::SOCK);
    let mut loader = EbpfLoader::new();
    loader.override_global("NODE_SET", &1u32, true);
    if super::features::ingress_ifindex_present() {
        loader.override_global("INGRESS_IFINDEX", &1u32, true);
    }
    loader
        .default_map_pin_directory(dir)
        .map_pin_path(maps::SOCK, sock_pin.as_path())
        .map_max_entries(
            maps::ORIG_TUPLE,
            maps::tuple_map_entries(req.max_connections),
        );
    for (name, entries) in capacities(req.max_pods) {
        loader.map_max_entries(name, entries);
    }
    loader
        .load(OBJECT)
        .context("loading the eBPF object (maps)")
}

/// Creates the set's pod records (`RDR_POD_META`) in `dir` unless they
/// are pinned there already, memory-mappable so that every pod's add reads
/// them in place (see [`scan`]): aya then reuses this map as it reuses any
/// pinned by name, and cannot create one with that flag itself. A set an
/// earlier release loaded keeps its records, read through the batch.
fn create_pod_records(dir: &Path, pods: u32) -> Result<()> {
    let pin = dir.join(maps::POD_META);
    if pin.exists() {
        return Ok(());
    }
    let map = sys::create_array(
        maps::POD_META,
        size_of::<PodMeta>() as u32,
        pods,
        sys::BPF_F_MMAPABLE,
    )
    .context("creating the pod records map")?;
    sys::obj_pin(map.as_fd(), &pin)
}

fn build_set(req: &LoadRequest<'_>, build: &Path) -> Result<()> {
    fs::create_dir_all(build).with_context(|| format!("creating {}", build.display()))?;
    let mut ebpf = load_object(req, build)?;
    let cgroup = File::open(&req.cgroup.path)
        .with_context(|| format!("opening cgroup {}", req.cgroup.path.display()))?;
    let mut hooks = Vec::new();
    for hook in HOOKS {
        if loader::hook_wanted(hook)? {
            hooks.push(hook);
        }
    }
    // Each pod's inbound link is made from the pinned sk_lookup program.
    let sk_lookup = loader::available(&SK_LOOKUP).then_some(SK_LOOKUP);
    let to_load: Vec<Hook> = hooks.iter().copied().chain(sk_lookup).collect();
    loader::load_programs(&mut ebpf, &to_load)?;
    for hook in hooks {
        loader::attach_and_pin_to(&ebpf, hook, &cgroup, &build.join(hook.pin_name()))?;
    }
    loader::pin_programs(&ebpf, HOOKS.into_iter().chain([SK_LOOKUP]), build)?;
    Ok(())
}

/// Removes node set `set` (links detached first, then every pin).
/// `false`: it was not loaded.
pub fn unload(set: &InstanceName) -> Result<bool> {
    privilege::check_ebpf()?;
    if !bpffs::is_mounted() {
        return Ok(false);
    }
    let _hold = HoldSignals::new();
    let _lock = Lock::exclusive()?;
    super::removal::repair()?;
    if !is_loaded(set) {
        return Ok(false);
    }
    let removing = format!("{DEL_PREFIX}{}", dir_name(set));
    bpffs::rename(&dir_name(set), &removing)?;
    remove_dir(&removing)?;
    Ok(true)
}

/// Detaches and removes a node set's directory `name` (or a staging one).
pub fn remove_dir(name: &str) -> Result<()> {
    let dir = bpffs::root().join(name);
    let files = pin_files(&dir);
    for pin in files
        .iter()
        .filter(|f| f.starts_with("pod") || f.starts_with("link_"))
    {
        if let Ok(link) = sys::obj_get(&dir.join(pin)) {
            let _ = sys::link_detach(link.as_fd());
        }
    }
    bpffs::remove_dir(name, &files)
}

/// One pod of the set, as `RDR_POD_META` records it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Pod {
    pub index: u32,
    pub name: String,
    pub netns_cookie: u64,
    pub netns_ino: u64,
    pub added_at: u64,
    /// Its addresses in `RDR_POD_ADDRS`, as its record lists them (see
    /// [`listed_addrs`]).
    #[serde(skip)]
    pub addrs: Option<Vec<[u32; 4]>>,
}

/// The addresses a record lists for its pod; `None`: it does not list
/// them (see [`PodMeta::addrs_kept`]), so they are found by walking
/// `RDR_POD_ADDRS`.
fn listed_addrs(entry: &PodMeta) -> Option<Vec<[u32; 4]>> {
    (entry.addrs_kept == POD_ADDRS_LISTED && entry.addr_count as usize <= POD_ADDRS_KEPT)
        .then(|| entry.addrs[..entry.addr_count as usize].to_vec())
}

pub(super) fn meta_map(dir: &Path) -> Result<Array<MapData, PodMeta>> {
    Ok(Array::try_from(Map::Array(maps::open(
        dir,
        maps::POD_META,
    )?))?)
}

/// The pods of the set pinned in `dir`.
pub fn pods(dir: &Path) -> Result<Vec<Pod>> {
    Ok(scan(dir)?.pods)
}

/// A pod index whose entries are to be cleared (an add killed midway, a
/// removed pod's, a pod whose namespace is gone, a failed add's): the
/// cookie it holds in `RDR_PODS` (0: none) and its addresses as its record
/// lists them (`None`: found by walking `RDR_POD_ADDRS`).
struct ToClear {
    index: u32,
    cookie: u64,
    addrs: Option<Vec<[u32; 4]>>,
}

/// What a set's records say of its pod indexes; the ones in none of these
/// lists are free and clean.
struct Records {
    pods: Vec<Pod>,
    /// Claims of adds killed midway.
    claims: Vec<ToClear>,
    /// Removed pods whose entries are still to be cleared (cookie 0).
    released: Vec<ToClear>,
}

/// The records of the set pinned in `dir`.
fn scan(dir: &Path) -> Result<Records> {
    scan_records(&meta_map(dir)?)
}

/// [`scan`] of the set's records map, opened by the caller.
fn scan_records(meta: &Array<MapData, PodMeta>) -> Result<Records> {
    let records = sys::array_values_where(meta.map().fd().as_fd(), meta.len(), |r: &PodMeta| {
        r.state == POD_ACTIVE || r.state == POD_CLAIMED
    })
    .context("reading the pod records")?;
    let mut found = Records {
        pods: Vec::new(),
        claims: Vec::new(),
        released: Vec::new(),
    };
    for (index, entry) in records {
        if entry.state == POD_CLAIMED {
            let to_clear = ToClear {
                index,
                cookie: entry.netns_cookie,
                addrs: listed_addrs(&entry),
            };
            match to_clear.cookie {
                0 => found.released.push(to_clear),
                _ => found.claims.push(to_clear),
            }
        }
        if entry.state != POD_ACTIVE {
            continue;
        }
        let len = (entry.name_len as usize).min(POD_NAME_MAX);
        found.pods.push(Pod {
            index,
            name: String::from_utf8_lossy(&entry.name[..len]).into_owned(),
            netns_cookie: entry.netns_cookie,
            netns_ino: entry.netns_ino,
            added_at: entry.added_at,
            addrs: listed_addrs(&entry),
        });
    }
    Ok(found)
}

/// A pod of a loaded set with its decision counters (all of them, zero
/// ones included).
#[derive(serde::Serialize)]
pub struct PodView {
    #[serde(flatten)]
    pub pod: Pod,
    pub counters: std::collections::BTreeMap<&'static str, u64>,
    /// The program the pod's sk_lookup link runs (its id).
    pub sk_lookup_program: Option<u32>,
}

/// A loaded set as `node-set status` and the agent's metrics show it.
#[derive(serde::Serialize)]
pub struct SetView {
    pub set: String,
    /// What the kernel charges for the set's maps; their hash maps
    /// allocate per entry, so this grows with the pods (the kernel counts
    /// entries from 6.4; before, it charges their full size).
    pub map_memory_bytes: u64,
    /// Each map's share of it.
    pub maps: Vec<maps::MapMemory>,
    /// The id of each hook's program (an upgrade changes them all).
    pub programs: std::collections::BTreeMap<&'static str, u32>,
    pub pods: Vec<PodView>,
    /// Indexes of removed pods whose entries gc (or an add that needs the
    /// index) has still to clear.
    pub released_indexes: usize,
}

/// Every loaded set (`None`) or set `only`, with its pods.
pub fn views(only: Option<&InstanceName>) -> Result<Vec<SetView>> {
    if !bpffs::is_mounted() {
        return Ok(Vec::new());
    }
    let _lock = Lock::shared()?;
    let mut views = Vec::new();
    for dir_name in bpffs::list()?.sets {
        let set = dir_name.strip_prefix(DIR_PREFIX).unwrap_or(&dir_name);
        if only.is_some_and(|o| o.as_str() != set) {
            continue;
        }
        let dir = bpffs::root().join(&dir_name);
        let mut pod_views = Vec::new();
        let records = scan(&dir).with_context(|| format!("reading node set {set}"))?;
        for pod in records.pods {
            let counters = maps::pod_counters(&dir, pod.index)?
                .into_iter()
                .map(|(c, n)| (c.name(), n))
                .collect();
            let sk_lookup_program = linked_program(&dir.join(pod_link(pod.index)));
            pod_views.push(PodView {
                pod,
                counters,
                sk_lookup_program,
            });
        }
        let memory = maps::memory(&dir, &[])?;
        let mut programs: std::collections::BTreeMap<&'static str, u32> = HOOKS
            .iter()
            .filter_map(|hook| Some((hook.name, linked_program(&dir.join(hook.pin_name()))?)))
            .collect();
        if let Ok(id) =
            sys::obj_get(&dir.join(PROG_SK_LOOKUP)).and_then(|prog| sys::prog_id(prog.as_fd()))
        {
            programs.insert(SK_LOOKUP.name, id);
        }
        views.push(SetView {
            set: set.to_owned(),
            map_memory_bytes: memory.iter().map(|m| m.bytes).sum(),
            maps: memory,
            programs,
            pods: pod_views,
            released_indexes: records.released.len(),
        });
    }
    Ok(views)
}

/// The id of the program the link pinned at `pin` runs.
fn linked_program(pin: &Path) -> Option<u32> {
    let link = sys::obj_get(pin).ok()?;
    sys::link_info(link.as_fd()).ok().map(|info| info.prog_id)
}

/// Whether node set `set` is loaded and holds pod `name`.
pub fn has_pod(set: &InstanceName, name: &InstanceName) -> Result<bool> {
    if !is_loaded(set) {
        return Ok(false);
    }
    let _lock = Lock::shared()?;
    Ok(pods(&dir(set))?.iter().any(|p| p.name == name.as_str()))
}

/// Whether loaded set `set` has the sk_lookup program inbound capture
/// links into each pod (not before kernel 5.9).
pub fn has_sk_lookup(set: &InstanceName) -> bool {
    dir(set).join(PROG_SK_LOOKUP).exists()
}

/// The cookie of the calling thread's network namespace.
fn netns_cookie() -> Result<u64> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error())
            .context("opening a socket in the pod's network namespace");
    }
    // SAFETY: a descriptor this call just opened.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer and its length are this function's.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("reading the pod's network namespace cookie (SO_NETNS_COOKIE, kernel 5.14)");
    }
    Ok(cookie)
}

/// Why node set `set` cannot capture a pod as `config` says (`None`: it
/// can). `istio-iptables --node-set` asks before choosing eBPF, so that
/// auto mode falls back with this reason, and [`add`] refuses with it. No
/// feature probes: the set's load probed and attached every hook, so what
/// it lacks shows in its pins; the one per-pod need the pins cannot show,
/// sk_lookup's interface index for `-c`, is probed only when asked for.
pub fn refusal(set: &InstanceName, config: &Config) -> Option<String> {
    if !is_loaded(set) {
        return Some(format!(
            "node set {set} is not loaded: run `redirect node-set load --set {set}` first"
        ));
    }
    if !config.virt_ifaces.is_empty() {
        return Some(
            "-k is not supported in a node set (its tc programs are per interface): capture \
             this pod on its own (`redirect install`)"
                .into(),
        );
    }
    // The rest is inbound capture's.
    config.inbound.as_ref()?;
    if !has_sk_lookup(set) {
        return Some(format!(
            "inbound capture (-b) needs sk_lookup (kernel {}), which node set {set} could not \
             load here",
            super::SK_LOOKUP.first_kernel()
        ));
    }
    if !config.exclude_ifindexes.is_empty() && !super::features::ingress_ifindex_present() {
        return Some(
            "-c with inbound capture (-b) needs the interface an inbound connection arrived \
             on, which sk_lookup gives from kernel 5.17: drop -c or -b, or use iptables"
                .into(),
        );
    }
    None
}

/// Adds the pod whose network namespace the calling thread is in to the
/// node set under `name`, capturing as `config` says; a pod added before
/// under that name gets `config` in place (its other slot written, then
/// switched to, as an instance's upgrade). Returns whether it was there.
/// On an error nothing of a new pod is left.
pub fn add(set: &InstanceName, name: &InstanceName, config: &Config) -> Result<bool> {
    privilege::check_map_access()?;
    if let Some(why) = refusal(set, config) {
        bail!("{why}");
    }
    config.check_limits().map_err(|limit| anyhow!("{limit}"))?;
    let netns = File::open(NETNS).with_context(|| format!("opening {NETNS}"))?;
    let netns_ino = netns.metadata()?.ino();
    loader::refuse_host_netns(netns_ino)?;
    let new = NewPod {
        name,
        config,
        cookie: netns_cookie()?,
        netns_ino,
        netns: &netns,
        addrs: address_keys(config),
    };
    let cookie = new.cookie;
    timing::mark(|| "checks (limits, netns cookie)".into());
    let _hold = HoldSignals::new();
    let _lock = Lock::exclusive()?;
    timing::mark(|| "lock".into());
    let dir = dir(set);
    // Opened once for the whole add: each opening is a path lookup and an
    // info query.
    let mut meta = meta_map(&dir).map_err(privilege::explain_denied)?;
    let Records {
        pods,
        claims,
        released,
    } = scan_records(&meta).map_err(privilege::explain_denied)?;
    timing::mark(|| "read the set's pods".into());
    // Under the lock, a claim is an add that was killed midway: clear
    // what it left, so that every free index is clean.
    for claim in claims {
        clear_pod(&dir, &claim).context("clearing what a killed add left")?;
    }
    if let Some(other) = pods
        .iter()
        .find(|p| p.netns_cookie == cookie && p.name != name.as_str())
    {
        bail!(
            "this network namespace is in the node set already, as pod {}: remove it first (`redirect node-set remove --set {set} --instance {}`)",
            other.name,
            other.name
        );
    }
    if let Some(pod) = pods.iter().find(|p| p.name == name.as_str()) {
        if pod.netns_cookie != cookie {
            bail!(
                "pod {name} is in the node set with another network namespace: remove it first (`redirect node-set remove --set {set} --instance {name}`)"
            );
        }
        write_pod(&dir, &mut meta, pod.index, &new, Some(pod))?;
        return Ok(true);
    }
    let capacity = meta.len();
    let used: Vec<u32> = pods.iter().map(|p| p.index).collect();
    // A free index is clean; a removed pod's is cleared here only when no
    // free one is left (gc clears them otherwise, off the pod's path).
    let free = (0..capacity).find(|i| !used.contains(i) && !released.iter().any(|r| r.index == *i));
    let index = match (free, released.first()) {
        (Some(index), _) => index,
        (None, Some(removed)) => {
            clear_pod(&dir, removed).context("clearing a removed pod's entries")?;
            timing::mark(|| "clear a removed pod's index".into());
            removed.index
        }
        (None, None) => bail!(
            "the node set holds {capacity} pods already: remove pods, or load the set again with a larger --max-pods"
        ),
    };
    if let Err(err) = write_pod(&dir, &mut meta, index, &new, None) {
        let written = ToClear {
            index,
            cookie,
            addrs: Some(new.addrs),
        };
        if let Err(undo) = clear_pod(&dir, &written) {
            return Err(err.context(format!("and the rollback failed: {undo:#}")));
        }
        return Err(err);
    }
    Ok(false)
}

/// What an add writes for its pod.
struct NewPod<'a> {
    name: &'a InstanceName,
    config: &'a Config,
    cookie: u64,
    netns_ino: u64,
    netns: &'a File,
    /// Its addresses, as `RDR_POD_ADDRS` keys them ([`address_keys`]).
    addrs: Vec<[u32; 4]>,
}

impl NewPod<'_> {
    /// The pod's record in `state`; `listed`: with its addresses (when
    /// they fit), which a removal then deletes without walking
    /// `RDR_POD_ADDRS`.
    fn record(&self, state: u32, listed: bool) -> PodMeta {
        let mut entry: PodMeta = bytemuck::Zeroable::zeroed();
        entry.netns_cookie = self.cookie;
        entry.netns_ino = self.netns_ino;
        entry.added_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        entry.state = state;
        let bytes = self.name.as_str().as_bytes();
        let len = bytes.len().min(POD_NAME_MAX);
        entry.name_len = len as u32;
        entry.name[..len].copy_from_slice(&bytes[..len]);
        if listed && self.addrs.len() <= POD_ADDRS_KEPT {
            entry.addrs[..self.addrs.len()].copy_from_slice(&self.addrs);
            entry.addr_count = self.addrs.len() as u32;
            entry.addrs_kept = POD_ADDRS_LISTED;
        }
        entry
    }
}

/// Writes pod `index`'s configuration and puts it in force (the last
/// writes: the pod's cookie for a new pod, its active slot for one there).
/// `before`: the pod as the set holds it, or `None` for a new pod, whose
/// index is clean (see [`add`]) and so is written without reading what
/// it holds: reading would walk every pod's entries.
fn write_pod(
    dir: &Path,
    meta: &mut Array<MapData, PodMeta>,
    index: u32,
    pod: &NewPod<'_>,
    before: Option<&Pod>,
) -> Result<()> {
    let config = pod.config;
    let slot = match before {
        None => pod_slot(index, 0),
        Some(_) => spare_slot(maps::pod_active_slot(dir, index)?),
    };
    let sets = maps::Sets::of(config);
    match before {
        None => {
            // The claim, listing the addresses about to be written: a
            // kill from here on leaves it for the next add, or gc, to
            // clear.
            meta.set(index, pod.record(POD_CLAIMED, true), 0)
                .context("claiming a pod record")?;
            maps::write_sets_over(dir, slot, &sets, &maps::Sets::default())?;
        }
        Some(old) => {
            if old.addrs.as_ref() != Some(&pod.addrs) {
                // Its addresses change: until the record below lists the
                // new ones, a removal walks `RDR_POD_ADDRS` for them.
                meta.set(index, pod.record(POD_ACTIVE, false), 0)
                    .context("writing the pod record")?;
            }
            maps::write_sets(dir, slot, &sets)?;
        }
    }
    timing::mark(|| "claim and write the sets".into());
    maps::write_config(dir, slot, config.to_bpf())?;
    let listed_before: Option<&[[u32; 4]]> = match before {
        None => Some(&[]),
        Some(old) => old.addrs.as_deref(),
    };
    write_addresses(dir, index, &pod.addrs, listed_before)?;
    timing::mark(|| "configuration and addresses".into());
    if config.inbound.is_some() {
        take_over_listener(dir, index, config.inbound_port)?;
        timing::mark(|| "inbound listener".into());
    }
    // Every pod's netns gets the sk_lookup link, inbound capture or not:
    // the link is also how gc sees the namespace go (the kernel detaches
    // it then).
    let link = dir.join(pod_link(index));
    if !link.exists() {
        let prog = sys::obj_get(&dir.join(PROG_SK_LOOKUP))
            .context("the node set has no sk_lookup program (kernel before 5.9)")?;
        let fd = sys::link_create(prog.as_fd(), pod.netns.as_fd(), SK_LOOKUP.attach_type)
            .context("attaching the sk_lookup program to the pod's network namespace")?;
        sys::obj_pin(fd.as_fd(), &link).context("pinning the pod's sk_lookup link")?;
        timing::mark(|| "sk_lookup link".into());
    }
    super::loader::fault_point("node-set-add-after-link")?;
    maps::activate_pod(dir, index, slot)?;
    if before.is_none() {
        let mut pods: HashMap<MapData, u64, u32> =
            HashMap::try_from(Map::HashMap(maps::open(dir, maps::PODS)?))?;
        pods.insert(pod.cookie, index, 0)
            .context("adding the pod to the node set")?;
    }
    meta.set(index, pod.record(POD_ACTIVE, true), 0)
        .context("writing the pod record")?;
    timing::mark(|| "activate".into());
    Ok(())
}

/// The pod's addresses (IPv4 ones mapped), as `RDR_POD_ADDRS` keys them.
fn address_keys(config: &Config) -> Vec<[u32; 4]> {
    let v4 = config
        .local_addrs
        .iter()
        .map(|ip| redirect_common::to_v4_mapped(u32::from_ne_bytes(ip.octets())));
    let v6 = config
        .ipv6
        .iter()
        .flat_map(|v6| v6.local_addrs.iter())
        .map(|ip| redirect_common::Ip6::from_octets(ip.octets()).0);
    v4.chain(v6).collect()
}

fn addr_map(dir: &Path) -> Result<HashMap<MapData, [u32; 4], u32>> {
    Ok(HashMap::try_from(Map::HashMap(maps::open(
        dir,
        maps::POD_ADDRS,
    )?))?)
}

/// Makes `RDR_POD_ADDRS` list exactly `wanted` under `index`; refuses an
/// address another pod of the set has. `before`: what it lists under
/// `index` now (`None`: not known, so found by walking the map).
fn write_addresses(
    dir: &Path,
    index: u32,
    wanted: &[[u32; 4]],
    before: Option<&[[u32; 4]]>,
) -> Result<()> {
    let mut map = addr_map(dir)?;
    for key in wanted {
        match map.get(key, 0) {
            Ok(owner) if owner != index => bail!(
                "the pod's address {} is pod #{owner}'s in the node set: pod addresses must be unique on a node",
                show_key(key)
            ),
            Ok(_) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(err) => return Err(err).context("reading the pod addresses"),
        }
    }
    let stale = addresses_of(&map, index, before)?;
    for key in stale.iter().filter(|key| !wanted.contains(key)) {
        remove_owned(&mut map, key, index)?;
    }
    for key in wanted {
        map.insert(key, index, 0).context("writing a pod address")?;
    }
    Ok(())
}

/// The addresses `RDR_POD_ADDRS` lists under `index`: `listed`, as the
/// pod's record lists them, or else found by a walk of the whole map.
fn addresses_of(
    map: &HashMap<MapData, [u32; 4], u32>,
    index: u32,
    listed: Option<&[[u32; 4]]>,
) -> Result<Vec<[u32; 4]>> {
    if let Some(listed) = listed {
        return Ok(listed.to_vec());
    }
    let entries = map
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .context("reading the pod addresses")?;
    Ok(entries
        .into_iter()
        .filter(|(_, owner)| *owner == index)
        .map(|(key, _)| key)
        .collect())
}

/// Deletes address `key` from `RDR_POD_ADDRS` if pod `index` has it.
fn remove_owned(
    map: &mut HashMap<MapData, [u32; 4], u32>,
    key: &[u32; 4],
    index: u32,
) -> Result<()> {
    match map.get(key, 0) {
        Ok(owner) if owner == index => map.remove(key).context("removing a pod address"),
        Ok(_) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(err) => Err(err).context("reading the pod addresses"),
    }
}

fn show_key(key: &[u32; 4]) -> String {
    match redirect_common::v4_mapped(key) {
        Some(ip) => std::net::Ipv4Addr::from(ip.to_ne_bytes()).to_string(),
        None => std::net::Ipv6Addr::from(redirect_common::Ip6(*key).octets()).to_string(),
    }
}

/// Registers the proxy's existing inbound listeners in the pod's slots.
fn take_over_listener(dir: &Path, index: u32, port: u16) -> Result<()> {
    let sockets = listener::take_over(port, LISTENER_SLOTS as usize)?;
    let mut listeners: SockMap<MapData> =
        SockMap::try_from(Map::SockMap(maps::open(dir, maps::LISTENER)?))?;
    for (slot, socket) in (0..LISTENER_SLOTS).zip(&sockets) {
        listeners
            .set(listener_index(index, slot), &socket.as_raw_fd(), 0)
            .with_context(|| format!("registering the listener on port {port}"))?;
    }
    Ok(())
}

/// Removes pod `name` from node set `set`. `false`: it is not there.
pub fn remove(set: &InstanceName, name: &InstanceName) -> Result<bool> {
    privilege::check_map_access()?;
    if !is_loaded(set) {
        return Ok(false);
    }
    let _hold = HoldSignals::new();
    let _lock = Lock::exclusive()?;
    timing::mark(|| "remove: lock".into());
    let dir = dir(set);
    let pods = pods(&dir).map_err(privilege::explain_denied)?;
    timing::mark(|| "remove: read the set's pods".into());
    let Some(pod) = pods.into_iter().find(|p| p.name == name.as_str()) else {
        return Ok(false);
    };
    release_pod(&dir, pod.index, pod.netns_cookie, pod.addrs.as_deref())?;
    Ok(true)
}

/// Detaches and unpins a pod's sk_lookup link, if there is one.
fn remove_link(link: &Path) -> Result<()> {
    if let Ok(fd) = sys::obj_get(link) {
        let _ = sys::link_detach(fd.as_fd());
    }
    match fs::remove_file(link) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("removing {}", link.display()))
        }
        _ => Ok(()),
    }
}

/// Removes (or with `dry_run` only lists) the pods of every loaded node
/// set whose network namespace is gone: the kernel detached their
/// sk_lookup link when it went. Returns "pod P of node set S" and why, for
/// each. The caller holds the install lock.
pub fn gc_locked(dry_run: bool) -> Result<Vec<(String, String)>> {
    let mut removed = Vec::new();
    for dir_name in bpffs::list()?.sets {
        let dir = bpffs::root().join(&dir_name);
        let set = dir_name.strip_prefix(DIR_PREFIX).unwrap_or(&dir_name);
        // A set this build cannot read (another release's layout) is
        // left alone, said once per pass: the others are still collected.
        let Records {
            pods: listed,
            claims,
            released,
        } = match scan(&dir) {
            Ok(found) => found,
            Err(err) => {
                eprintln!("redirect: gc: skipping node set {set}: {err:#}");
                continue;
            }
        };
        // Removed pods' entries, left by their removal to be cleared here:
        // housekeeping, not a pod taken out, so not listed.
        if !dry_run {
            for removed in released {
                clear_pod(&dir, &removed).with_context(|| {
                    format!("clearing removed pod #{} of node set {set}", removed.index)
                })?;
            }
        }
        // Under the lock, a claim is an add that was killed midway.
        for claim in claims {
            let index = claim.index;
            if !dry_run {
                clear_pod(&dir, &claim)
                    .with_context(|| format!("clearing pod #{index} of node set {set}"))?;
            }
            removed.push((
                format!("pod #{index} of node set {set}"),
                "left by an interrupted add".to_owned(),
            ));
        }
        for pod in listed {
            let link = sys::obj_get(&dir.join(pod_link(pod.index)))
                .and_then(|fd| sys::link_info(fd.as_fd()));
            let why = match link {
                Ok(info) if info.target != 0 => continue,
                Ok(_) => "its network namespace is gone (its link is defunct)",
                Err(_) => "it has no sk_lookup link (pins removed by hand)",
            };
            if !dry_run {
                let gone = ToClear {
                    index: pod.index,
                    cookie: pod.netns_cookie,
                    addrs: pod.addrs.clone(),
                };
                clear_pod(&dir, &gone)
                    .with_context(|| format!("removing pod {} from node set {set}", pod.name))?;
            }
            removed.push((
                format!("pod {} of node set {set}", pod.name),
                why.to_owned(),
            ));
        }
    }
    Ok(removed)
}

/// A removal: takes pod `index` out of every decision ([`unlink_pod`]) and
/// marks its index released, leaving the rest of its entries (its slots'
/// sets and configuration, its counters) to [`clear_pod`], which gc or an
/// add that needs the index runs. Clearing them walks every pod's entries,
/// so a removal that did it would cost more the more pods the set holds.
fn release_pod(dir: &Path, index: u32, cookie: u64, addrs: Option<&[[u32; 4]]>) -> Result<()> {
    unlink_pod(dir, index, cookie, addrs)?;
    // Not listed (zeroed): gc, or an add that needs the index, walks
    // `RDR_POD_ADDRS` for it, off the removal's path. The list just
    // deleted was right unless an older build changed the pod's addresses
    // and was killed before writing its record (it writes that last):
    // the walk finds what such a list missed.
    let mut released = <PodMeta as bytemuck::Zeroable>::zeroed();
    released.state = POD_CLAIMED;
    meta_map(dir)?
        .set(index, released, 0)
        .context("releasing the pod record")?;
    timing::mark(|| "release: the pod record".into());
    Ok(())
}

/// Takes pod `index` out of every decision: out of `RDR_PODS` (its sockets
/// are left alone from then on), its inbound link detached, its addresses
/// (another pod may get them next) and the proxy listeners it registered
/// let go. `cookie` 0: the pod is out of `RDR_PODS` already. `addrs`: its
/// addresses as its record lists them (`None`: found by walking
/// `RDR_POD_ADDRS`).
fn unlink_pod(dir: &Path, index: u32, cookie: u64, addrs: Option<&[[u32; 4]]>) -> Result<()> {
    let mut pods: HashMap<MapData, u64, u32> =
        HashMap::try_from(Map::HashMap(maps::open(dir, maps::PODS)?))?;
    if cookie != 0 && pods.get(&cookie, 0).is_ok_and(|owner| owner == index) {
        pods.remove(&cookie).context("removing the pod")?;
    }
    remove_link(&dir.join(pod_link(index)))?;
    timing::mark(|| "clear: pod entry and sk_lookup link".into());
    let mut map = addr_map(dir)?;
    let owned = addresses_of(&map, index, addrs)?;
    for key in &owned {
        remove_owned(&mut map, key, index)?;
    }
    timing::mark(|| "clear: addresses".into());
    let mut listeners: SockMap<MapData> =
        SockMap::try_from(Map::SockMap(maps::open(dir, maps::LISTENER)?))?;
    for slot in 0..LISTENER_SLOTS {
        let _ = listeners.clear_index(&listener_index(index, slot));
    }
    timing::mark(|| "clear: listeners".into());
    Ok(())
}

/// Takes a pod index (a pod's, a killed add's claim, or a removed pod's)
/// out of the set whole ([`unlink_pod`], then its slots, counters and
/// record), so that the index starts clean for the next pod.
fn clear_pod(dir: &Path, pod: &ToClear) -> Result<()> {
    let index = pod.index;
    unlink_pod(dir, index, pod.cookie, pod.addrs.as_deref())?;
    let slots: Vec<u32> = (0..SLOTS_PER_POD).map(|w| pod_slot(index, w)).collect();
    for (slot, old) in slots.iter().zip(maps::read_slots(dir, &slots)?) {
        maps::write_sets_over(dir, *slot, &maps::Sets::default(), &old)?;
        maps::write_config(dir, *slot, bytemuck::Zeroable::zeroed())?;
    }
    maps::activate_pod(dir, index, 0)?;
    timing::mark(|| "clear: slots".into());
    let mut hits: HashMap<MapData, u32, u64> =
        HashMap::try_from(Map::HashMap(maps::open(dir, maps::IN_HITS)?))?;
    let base = in_hits_key(index, 0);
    let ports: Vec<u32> = hits
        .keys()
        .filter_map(Result::ok)
        .filter(|key| key & !0xffff == base)
        .collect();
    for key in ports {
        hits.remove(&key).context("removing an inbound counter")?;
    }
    timing::mark(|| "clear: inbound counters".into());
    let mut stats: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(maps::open(dir, maps::STATS)?))?;
    let cpus = aya::util::nr_cpus().map_err(|(_, err)| anyhow!(err))?;
    for counter in 0..COUNTER_COUNT {
        let zeros = PerCpuValues::try_from(vec![0u64; cpus]).context("zeroing counters")?;
        stats
            .set(counter_index(index, counter), zeros, 0)
            .context("zeroing the pod's counters")?;
    }
    meta_map(dir)?
        .set(index, <PodMeta as bytemuck::Zeroable>::zeroed(), 0)
        .context("clearing the pod record")
}

#[cfg(test)]
mod tests {
    use aya::maps::IterableMap as _;

    /// Every pod's add reads all the set's records ([`super::scan`]); the
    /// set creates them mappable (see [`super::sys::array_values_where`]),
    /// which keeps an add's cost from growing with `--max-pods`, and a
    /// second load (an upgrade) keeps the ones pinned.
    #[test]
    fn a_sets_pod_records_are_created_mappable_once() {
        let dir = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/redirect-unit-{}-records",
            std::process::id()
        ));
        if let Err(err) = std::fs::create_dir_all(&dir) {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "creating {}: {err} (the unit tests run as root in CI)",
                dir.display()
            );
            eprintln!("skipped: needs root and bpffs ({err})");
            return;
        }
        let checked = (|| -> anyhow::Result<(u32, u32, u32)> {
            super::create_pod_records(&dir, 7)?;
            let first = super::meta_map(&dir)?;
            super::create_pod_records(&dir, 9)?;
            let again = super::meta_map(&dir)?;
            let info = again.map().info()?;
            assert_eq!(
                first.map().info()?.id(),
                info.id(),
                "the pinned map was replaced"
            );
            Ok((info.max_entries(), info.value_size(), info.map_flags()))
        })();
        let _ = std::fs::remove_dir_all(&dir);
        let (entries, value_size, flags) = checked.expect("creating the pod records");
        assert_eq!(entries, 7);
        assert_eq!(value_size as usize, size_of::<super::PodMeta>());
        assert_ne!(flags & super::sys::BPF_F_MMAPABLE, 0, "not mappable");
    }

    /// A record lists a pod's addresses when they fit, and a record of a
    /// build from before the list (the same bytes, the name's unused
    /// ones zero) lists none, so its pod's are found by the walk.
    #[test]
    fn a_record_lists_the_addresses_that_fit_and_an_older_ones_none() {
        use super::{NewPod, POD_ACTIVE, PodMeta, listed_addrs};
        let name = crate::instance::InstanceName::parse(&format!("cni-{}", "ab".repeat(32)))
            .expect("a CNI pod name");
        let config = super::Config::default();
        let netns = std::fs::File::open("/dev/null").expect("a file");
        let keys: Vec<[u32; 4]> = (1..=4).map(|n| [0, 0, 0xffff_u32.to_be(), n]).collect();
        let pod = |count: usize| NewPod {
            name: &name,
            config: &config,
            cookie: 9,
            netns_ino: 10,
            netns: &netns,
            addrs: keys[..count].to_vec(),
        };
        for count in 0..=3 {
            let record = pod(count).record(POD_ACTIVE, true);
            assert_eq!(listed_addrs(&record), Some(keys[..count].to_vec()));
            assert_eq!(listed_addrs(&pod(count).record(POD_ACTIVE, false)), None);
        }
        assert_eq!(listed_addrs(&pod(4).record(POD_ACTIVE, true)), None);

        // An older build's record: cookie, inode, time, name length,
        // state, then the name in 256 bytes.
        let mut old = Vec::new();
        for field in [9u64, 10, 1_700_000_000] {
            old.extend_from_slice(&field.to_ne_bytes());
        }
        old.extend_from_slice(&(name.as_str().len() as u32).to_ne_bytes());
        old.extend_from_slice(&POD_ACTIVE.to_ne_bytes());
        let mut name_bytes = [0u8; 256];
        name_bytes[..name.as_str().len()].copy_from_slice(name.as_str().as_bytes());
        old.extend_from_slice(&name_bytes);
        let record: PodMeta = bytemuck::pod_read_unaligned(&old);
        assert_eq!(listed_addrs(&record), None);
        assert_eq!(record.netns_cookie, 9);
        let len = record.name_len as usize;
        assert_eq!(&record.name[..len], name.as_str().as_bytes());
    }
}
