//! Typed access to an instance's pinned maps.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use aya::maps::{
    Array, HashMap, Map, MapData, MapType, PerCpuArray,
    lpm_trie::{Key, LpmTrie},
};
use redirect_common::{
    CIDR_SLOT_BITS, ConnTuple, Counter, INSTANCE_POD, InstanceMeta, Ip6, OrigDst, PORT_EXCLUDE,
    PORT_IN_EXCLUDE, PORT_IN_INCLUDE, PORT_INCLUDE, PORT_RANGE_SLOT_BITS, PodMeta,
    ROUTE_EXCLUDED_IFACE, RedirectConfig, RouteEntry, RouteEntry6, cidr_key, cidr6_key,
    counter_index, in_hits_key, key_slot, local6_key, lru_entries, port_key, port_range_key,
    slot_key, slot_of_pod,
};

use super::config::{Config, Ipv4Cidr, Ipv6Cidr, PortRange};

pub use redirect_common::map_names::*;

/// Every pinned map with the type, key size and value size this build of
/// the programs expects.
pub const LAYOUT: [(&str, MapType, usize, usize); 23] = [
    (CONFIG, MapType::Array, 4, size_of::<RedirectConfig>()),
    (ACTIVE, MapType::Array, 4, 4),
    (STATS, MapType::PerCpuArray, 4, size_of::<u64>()),
    (SOCK, MapType::SkStorage, 4, size_of::<OrigDst>()),
    (
        ORIG_TUPLE,
        MapType::LruHash,
        size_of::<ConnTuple>(),
        size_of::<OrigDst>(),
    ),
    (META, MapType::Array, 4, size_of::<InstanceMeta>()),
    (PORTS, MapType::Hash, 4, 1),
    (EXCLUDE, MapType::LpmTrie, 12, 1),
    (INCLUDE, MapType::LpmTrie, 12, 1),
    (LOCAL, MapType::Hash, 8, 1),
    (LISTENER, MapType::SockMap, 4, 4),
    (IN_HITS, MapType::Hash, 4, 8),
    (ROUTE, MapType::LpmTrie, 12, size_of::<RouteEntry>()),
    (PORT_RANGES, MapType::LpmTrie, 8, 1),
    (GROUPS, MapType::Hash, 8, 1),
    (IN_BYPASS, MapType::LruHash, 24, 1),
    (LOCAL6, MapType::Hash, 20, 1),
    (EXCLUDE6, MapType::LpmTrie, 24, 1),
    (INCLUDE6, MapType::LpmTrie, 24, 1),
    (ROUTE6, MapType::LpmTrie, 24, size_of::<RouteEntry6>()),
    (PODS, MapType::Hash, 8, 4),
    (POD_ADDRS, MapType::Hash, 16, 4),
    (POD_META, MapType::Array, 4, size_of::<PodMeta>()),
];

/// Checks that the maps pinned in `dir` have the layouts this build uses,
/// before a reinstall binds its programs to them (aya reuses a pinned map
/// by name without comparing).
pub fn check_layout(dir: &Path) -> Result<()> {
    for (name, kind, key, value) in LAYOUT {
        let path = dir.join(name);
        if !path.exists() {
            continue; // created by this install
        }
        let info = open(dir, name)?.info()?;
        let found = (
            info.map_type()?,
            info.key_size() as usize,
            info.value_size() as usize,
        );
        if found != (kind, key, value) {
            bail!(
                "pinned map {name} is {:?} with {}-byte keys and {}-byte values, expected {kind:?} with {key} and {value}",
                found.0,
                found.1,
                found.2
            );
        }
    }
    Ok(())
}

/// Size of the original-destination map that holds `wanted` connections
/// on this machine (see [`lru_entries`]); the kernel rounds an LRU map's
/// size up to a multiple of the possible CPUs.
pub fn tuple_map_entries(wanted: u32) -> u32 {
    let cpus = aya::util::nr_cpus().map_or(1, |n| u32::try_from(n).unwrap_or(u32::MAX));
    let entries = lru_entries(wanted, cpus);
    entries.div_ceil(cpus).saturating_mul(cpus)
}

/// Refuses an upgrade that asks for another `--max-connections` than the
/// pinned maps hold: their size is fixed when they are created.
pub fn check_capacity(dir: &Path, wanted: u32) -> Result<()> {
    let path = dir.join(ORIG_TUPLE);
    if !path.exists() {
        return Ok(());
    }
    let entries = open(dir, ORIG_TUPLE)?.info()?.max_entries();
    let recorded = meta(dir)?.get(&0, 0)?.max_connections;
    if entries != tuple_map_entries(wanted) || recorded != wanted {
        let instance = dir
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        bail!(
            "instance '{instance}' holds {recorded} connections and --max-connections asks for {wanted}: \
             the size is fixed at the first install; run `redirect uninstall --instance {instance}` first to change it"
        );
    }
    Ok(())
}

pub(super) fn open(dir: &Path, name: &str) -> Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))
}

pub fn config(dir: &Path) -> Result<Array<MapData, RedirectConfig>> {
    Ok(Array::try_from(Map::Array(open(dir, CONFIG)?))?)
}

fn active(dir: &Path) -> Result<Array<MapData, u32>> {
    Ok(Array::try_from(Map::Array(open(dir, ACTIVE)?))?)
}

/// The configuration slot in force (one of the instance's pod's two).
pub fn active_slot_of(dir: &Path) -> Result<u32> {
    pod_active_slot(dir, INSTANCE_POD)
}

/// The configuration slot in force for `pod` (one of its two).
pub fn pod_active_slot(dir: &Path, pod: u32) -> Result<u32> {
    let slot = active(dir)?
        .get(&pod, 0)
        .context("reading the active slot")?;
    if !slot_of_pod(slot, pod) {
        bail!(
            "the active slot {slot} is not one of pod {pod}'s: the maps are damaged; remove them (`redirect uninstall`, `redirect node-set unload`) and install again"
        );
    }
    Ok(slot)
}

/// The slot in force and its configuration (`abi_version` 0: none written).
pub fn active_config(dir: &Path) -> Result<(u32, RedirectConfig)> {
    let slot = active_slot_of(dir)?;
    let config = config(dir)?
        .get(&slot, 0)
        .context("reading the config map")?;
    Ok((slot, config))
}

pub use redirect_common::spare_slot;

/// Writes `config` into `slot` (not yet in force).
pub fn write_config(dir: &Path, slot: u32, config: RedirectConfig) -> Result<()> {
    self::config(dir)?
        .set(slot, config, 0)
        .context("writing the config map")
}

/// Puts `slot` in force: one 4-byte array write, so every decision after it
/// reads the new configuration and sets, and none reads a mix.
pub fn activate(dir: &Path, slot: u32) -> Result<()> {
    activate_pod(dir, INSTANCE_POD, slot)
}

/// [`activate`] for `pod` of a node set.
pub fn activate_pod(dir: &Path, pod: u32, slot: u32) -> Result<()> {
    active(dir)?
        .set(pod, slot, 0)
        .context("switching the active configuration")
}

pub fn meta(dir: &Path) -> Result<Array<MapData, InstanceMeta>> {
    Ok(Array::try_from(Map::Array(open(dir, META)?))?)
}

/// Sums each counter over all CPUs.
pub fn counters(dir: &Path) -> Result<Vec<(Counter, u64)>> {
    pod_counters(dir, INSTANCE_POD)
}

/// [`counters`] of `pod` of a node set.
pub fn pod_counters(dir: &Path, pod: u32) -> Result<Vec<(Counter, u64)>> {
    let stats: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(open(dir, STATS)?))?;
    Counter::ALL
        .iter()
        .map(|c| {
            let per_cpu = stats
                .get(&counter_index(pod, *c as u32), 0)
                .context("reading counters")?;
            Ok((*c, per_cpu.iter().sum()))
        })
        .collect()
}

/// Inbound connections captured per destination port, by port.
pub fn inbound_hits(dir: &Path) -> Result<Vec<(u16, u64)>> {
    pod_inbound_hits(dir, INSTANCE_POD)
}

/// [`inbound_hits`] of `pod` of a node set.
pub fn pod_inbound_hits(dir: &Path, pod: u32) -> Result<Vec<(u16, u64)>> {
    let hits: HashMap<MapData, u32, u64> = HashMap::try_from(Map::HashMap(open(dir, IN_HITS)?))?;
    let pod = in_hits_key(pod, 0);
    let mut out = hits
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .context("reading the inbound counters")?
        .into_iter()
        .filter(|(key, _)| key & !0xffff == pod)
        .map(|(key, hits)| (key as u16, hits))
        .collect::<Vec<_>>();
    out.sort_unstable();
    Ok(out)
}

/// Kernel memory of one map an instance's programs use.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MapMemory {
    pub name: String,
    pub max_entries: u32,
    /// What the kernel charges for it (`memlock` in its fdinfo).
    pub bytes: u64,
}

/// The maps pinned in `dir` and those the programs `prog_ids` use (the
/// event ring buffer is not pinned), each once, with their kernel memory.
/// Maps are opened by pin; the unpinned ones need CAP_SYS_ADMIN (to list
/// programs and open maps by id) and are left out without it.
pub fn memory(dir: &Path, prog_ids: &[u32]) -> Result<Vec<MapMemory>> {
    use std::os::fd::AsFd as _;
    let mut out = Vec::new();
    let mut seen = Vec::new();
    for (name, ..) in LAYOUT {
        let Ok(map) = MapData::from_pin(dir.join(name)) else {
            continue;
        };
        let info = map.info()?;
        seen.push(info.id());
        out.push(MapMemory {
            name: name.to_owned(),
            max_entries: info.max_entries(),
            bytes: memlock(map.fd().as_fd()),
        });
    }
    for info in aya::programs::loaded_programs().flatten() {
        if !prog_ids.contains(&info.id()) {
            continue;
        }
        for id in info.map_ids().ok().flatten().unwrap_or_default() {
            if seen.contains(&id) {
                continue;
            }
            seen.push(id);
            let Ok(map) = aya::maps::MapInfo::from_id(id) else {
                continue;
            };
            let Ok(fd) = map.fd() else { continue };
            out.push(MapMemory {
                name: map.name_as_str().unwrap_or("?").to_owned(),
                max_entries: map.max_entries(),
                bytes: memlock(fd.as_fd()),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The memory the kernel charges for a map (`memlock` in its fdinfo).
fn memlock(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
    use std::os::fd::AsRawFd as _;
    std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Number of records in the tuple map: redirected connections between the
/// app's and the proxy's end of their handshake (see `Tracked`).
pub fn tracked(dir: &Path) -> Result<u64> {
    let tuples: HashMap<MapData, ConnTuple, OrigDst> =
        HashMap::try_from(Map::LruHashMap(open(dir, ORIG_TUPLE)?))?;
    Ok(tuples.keys().filter(Result::is_ok).count() as u64)
}

/// The contents of the set maps (ports, CIDRs, pod addresses), keyed as
/// the programs look them up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sets {
    /// Destination port -> `PORT_*` flags (outbound and inbound).
    pub ports: Vec<(u16, u8)>,
    /// (prefix length, network-order network address).
    pub exclude: Vec<(u32, u32)>,
    pub include: Vec<(u32, u32)>,
    /// Network-order addresses.
    pub local: Vec<u32>,
    /// The routing view: ((prefix length, network-order network),
    /// [network-order source (0 for refused), `ROUTE_*` flags]), the
    /// layout of `RouteEntry`.
    pub routes: Vec<((u32, u32), [u32; 2])>,
    /// Port ranges as aligned blocks: ((bits of the block's prefix, 0 to
    /// 16, first port), `PORT_*` flags). See [`port_blocks`].
    pub port_blocks: Vec<((u32, u16), u8)>,
    /// Owner groups (GIDs in the initial user namespace).
    pub groups: Vec<u32>,
    /// The IPv6 sets (empty without IPv6 rules): networks as (prefix
    /// length, network address), pod addresses, routes with their
    /// `RouteEntry6`.
    pub exclude6: Vec<(u32, Ip6)>,
    pub include6: Vec<(u32, Ip6)>,
    pub local6: Vec<Ip6>,
    pub routes6: Vec<((u32, Ip6), RouteEntry6)>,
}

impl Sets {
    /// The ports with `flag` among their `PORT_*` flags, listed or in a
    /// range, sorted, as "a,b,c" (runs as "a:b").
    pub fn ports_with(&self, flag: u8) -> String {
        let mut list: Vec<u16> = self
            .ports
            .iter()
            .filter(|(_, f)| f & flag != 0)
            .map(|(p, _)| *p)
            .chain(
                self.port_blocks
                    .iter()
                    .filter(|(_, f)| f & flag != 0)
                    .flat_map(|((bits, first), _)| {
                        let size = 1u32 << (16 - bits);
                        (u32::from(*first)..u32::from(*first) + size).map(|p| p as u16)
                    }),
            )
            .collect();
        list.sort_unstable();
        list.dedup();
        port_runs(&list)
    }

    /// What `config` puts in the maps.
    pub fn of(config: &Config) -> Self {
        let mut ports = std::collections::BTreeMap::<u16, u8>::new();
        let no_ports = Vec::new();
        let (in_include, in_exclude) = config
            .inbound
            .as_ref()
            .map_or((&no_ports, &no_ports), |i| (&i.ports, &i.exclude));
        for (list, flag) in [
            (&config.ports_exclude, PORT_EXCLUDE),
            (&config.ports_include, PORT_INCLUDE),
            (in_include, PORT_IN_INCLUDE),
            (in_exclude, PORT_IN_EXCLUDE),
        ] {
            for port in list {
                *ports.entry(*port).or_default() |= flag;
            }
        }
        let cidrs = |list: &[Ipv4Cidr]| {
            let mut keys: Vec<(u32, u32)> = list
                .iter()
                .map(|c| {
                    (
                        u32::from(c.prefix),
                        u32::from_ne_bytes(c.network().octets()),
                    )
                })
                .collect();
            keys.sort_unstable();
            keys.dedup();
            keys
        };
        let mut local: Vec<u32> = config
            .local_addrs
            .iter()
            .map(|a| u32::from_ne_bytes(a.octets()))
            .collect();
        local.sort_unstable();
        local.dedup();
        let mut routes: Vec<((u32, u32), [u32; 2])> = config
            .routes
            .iter()
            .map(|r| {
                (
                    (
                        u32::from(r.dst.prefix),
                        u32::from_ne_bytes(r.dst.network().octets()),
                    ),
                    [
                        r.src.map_or(0, |a| u32::from_ne_bytes(a.octets())),
                        if r.excluded { ROUTE_EXCLUDED_IFACE } else { 0 },
                    ],
                )
            })
            .collect();
        routes.sort_unstable();
        routes.dedup_by_key(|(key, _)| *key);
        let mut groups = config.owner_groups.clone();
        groups.sort_unstable();
        groups.dedup();
        let ip6 = |a: std::net::Ipv6Addr| Ip6::from_octets(a.octets());
        let cidrs6 = |list: &[Ipv6Cidr]| {
            let mut keys: Vec<(u32, Ip6)> = list
                .iter()
                .map(|c| (u32::from(c.prefix), ip6(c.network())))
                .collect();
            keys.sort_unstable_by_key(|(p, a)| (*p, a.octets()));
            keys.dedup();
            keys
        };
        let v6 = config.ipv6.clone().unwrap_or_default();
        let mut local6: Vec<Ip6> = v6.local_addrs.iter().map(|a| ip6(*a)).collect();
        local6.sort_unstable_by_key(|a| a.octets());
        local6.dedup();
        let mut routes6: Vec<((u32, Ip6), RouteEntry6)> = v6
            .routes
            .iter()
            .map(|r| {
                (
                    (u32::from(r.dst.prefix), ip6(r.dst.network())),
                    RouteEntry6 {
                        src: r.src.map_or([0; 4], |a| ip6(a).0),
                        flags: if r.excluded { ROUTE_EXCLUDED_IFACE } else { 0 },
                    },
                )
            })
            .collect();
        routes6.sort_unstable_by_key(|((p, a), _)| (*p, a.octets()));
        routes6.dedup_by_key(|(key, _)| *key);
        Self {
            ports: ports.into_iter().collect(),
            exclude: cidrs(&config.exclude),
            include: cidrs(&config.include),
            local,
            routes,
            port_blocks: port_blocks(&config.port_ranges),
            groups,
            exclude6: cidrs6(&v6.exclude),
            include6: cidrs6(&v6.include),
            local6,
            routes6,
        }
    }
}

/// `ranges` as the port-range map holds them: the ports split where any
/// range starts or ends, each piece with the flags of every range that
/// covers it (pieces with the same flags next to each other joined), each
/// piece as the fewest aligned power-of-two blocks. Blocks never overlap,
/// so the trie's longest match is the one block a port is in.
pub fn port_blocks(ranges: &[PortRange]) -> Vec<((u32, u16), u8)> {
    let mut cuts: Vec<u32> = ranges
        .iter()
        .flat_map(|r| [u32::from(r.first), u32::from(r.last) + 1])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    // Pieces [start, end) with their flags, neighbours of equal flags joined.
    let mut pieces: Vec<(u32, u32, u8)> = Vec::new();
    for pair in cuts.windows(2) {
        let (start, end) = (pair[0], pair[1]);
        let flags = ranges
            .iter()
            .filter(|r| u32::from(r.first) <= start && end <= u32::from(r.last) + 1)
            .fold(0u8, |acc, r| acc | r.flag);
        match pieces.last_mut() {
            Some((_, last_end, last_flags)) if *last_end == start && *last_flags == flags => {
                *last_end = end;
            }
            _ => pieces.push((start, end, flags)),
        }
    }
    let mut blocks = Vec::new();
    for (mut start, end, flags) in pieces {
        if flags == 0 {
            continue;
        }
        while start < end {
            // The largest block aligned at `start` that fits before `end`.
            let mut size = if start == 0 {
                1 << 16
            } else {
                1 << start.trailing_zeros()
            };
            while start + size > end {
                size >>= 1;
            }
            blocks.push(((16 - size.trailing_zeros(), start as u16), flags));
            start += size;
        }
    }
    blocks
}

/// Sorted ports as "a,b,c", runs of three or more consecutive ports as "a:b".
fn port_runs(sorted: &[u16]) -> String {
    let mut runs: Vec<(u16, u16)> = Vec::new();
    for &port in sorted {
        match runs.last_mut() {
            Some((_, last)) if u32::from(*last) + 1 == u32::from(port) => *last = port,
            _ => runs.push((port, port)),
        }
    }
    runs.iter()
        .map(|&(a, b)| match b - a {
            0 => a.to_string(),
            1 => format!("{a},{b}"),
            _ => format!("{a}:{b}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn hash<K: aya::Pod>(dir: &Path, name: &str) -> Result<HashMap<MapData, K, u8>> {
    Ok(HashMap::try_from(Map::HashMap(open(dir, name)?))?)
}

fn trie<V: aya::Pod>(dir: &Path, name: &str) -> Result<LpmTrie<MapData, [u8; 8], V>> {
    Ok(LpmTrie::try_from(Map::LpmTrie(open(dir, name)?))?)
}

fn port_trie(dir: &Path) -> Result<LpmTrie<MapData, [u8; 4], u8>> {
    Ok(LpmTrie::try_from(Map::LpmTrie(open(dir, PORT_RANGES)?))?)
}

/// A CIDR-set key of `slot` for (prefix length, network-order network).
fn cidr(slot: u32, (prefix, net): (u32, u32)) -> Key<[u8; 8]> {
    Key::new(CIDR_SLOT_BITS + prefix, cidr_key(slot, net))
}

/// An entry of a slot-keyed map: (slot, its key decoded, value).
type SlotEntry<K, V> = (u32, K, V);

/// Every entry of a CIDR-keyed trie, its key (prefix length, network).
fn slot_entries<V: aya::Pod>(dir: &Path, name: &str) -> Result<Vec<SlotEntry<(u32, u32), V>>> {
    let entries = trie::<V>(dir, name)?
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {name}"))?;
    Ok(entries
        .iter()
        .filter(|(k, _)| k.prefix_len() >= CIDR_SLOT_BITS)
        .map(|(k, v)| {
            let d = k.data();
            (
                key_slot(&d),
                (
                    k.prefix_len() - CIDR_SLOT_BITS,
                    u32::from_ne_bytes([d[2], d[3], d[4], d[5]]),
                ),
                *v,
            )
        })
        .collect())
}

/// An IPv6 CIDR-set (or route) key of `slot`.
fn cidr6(slot: u32, (prefix, net): (u32, Ip6)) -> Key<[u8; 20]> {
    Key::new(CIDR_SLOT_BITS + prefix, cidr6_key(slot, net))
}

/// Every entry of an IPv6-keyed trie, its key (prefix length, network).
fn slot_entries6<V: aya::Pod>(dir: &Path, name: &str) -> Result<Vec<SlotEntry<(u32, Ip6), V>>> {
    let trie: LpmTrie<MapData, [u8; 20], V> = LpmTrie::try_from(Map::LpmTrie(open(dir, name)?))?;
    let entries = trie
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {name}"))?;
    Ok(entries
        .iter()
        .filter(|(k, _)| k.prefix_len() >= CIDR_SLOT_BITS)
        .map(|(k, v)| {
            let d = k.data();
            let mut octets = [0; 16];
            octets.copy_from_slice(&d[2..18]);
            (
                key_slot(&d),
                (k.prefix_len() - CIDR_SLOT_BITS, Ip6::from_octets(octets)),
                *v,
            )
        })
        .collect())
}

/// The key of a port block of `slot`.
fn port_block(slot: u32, (bits, first): (u32, u16)) -> Key<[u8; 4]> {
    Key::new(PORT_RANGE_SLOT_BITS + bits, port_range_key(slot, first))
}

/// The 32-bit values in a set keyed by [`slot_key`]: (slot, value).
fn slot_values(dir: &Path, name: &str) -> Result<Vec<(u32, u32)>> {
    Ok(hash::<u64>(dir, name)?
        .keys()
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {name}"))?
        .into_iter()
        .map(|key| ((key >> 32) as u32, key as u32))
        .collect())
}

/// The sets of `out` that are `slot`'s, when `slots` lists it.
fn slot_of<'a>(out: &'a mut [Sets], slots: &[u32], slot: u32) -> Option<&'a mut Sets> {
    slots.iter().position(|s| *s == slot).map(|i| &mut out[i])
}

/// Reads the set maps of `slot` of the instance pinned in `dir`.
pub fn read_sets(dir: &Path, slot: u32) -> Result<Sets> {
    Ok(read_slots(dir, &[slot])?.pop().unwrap_or_default())
}

/// Reads the set maps of each of `slots`, walking each map once for all
/// of them (a walk reads every pod's entries, so a pod's removal reads its
/// two slots at the cost of one).
pub fn read_slots(dir: &Path, slots: &[u32]) -> Result<Vec<Sets>> {
    let mut out: Vec<Sets> = slots.iter().map(|_| Sets::default()).collect();
    for (key, flags) in hash::<u32>(dir, PORTS)?
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .context("reading the port map")?
    {
        if let Some(sets) = slot_of(&mut out, slots, key >> 16) {
            sets.ports.push(((key & 0xffff) as u16, flags));
        }
    }
    for (k, flags) in port_trie(dir)?
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .context("reading the port-range map")?
    {
        let d = k.data();
        if k.prefix_len() >= PORT_RANGE_SLOT_BITS
            && let Some(sets) = slot_of(&mut out, slots, key_slot(&d))
        {
            let block = (
                k.prefix_len() - PORT_RANGE_SLOT_BITS,
                u16::from_be_bytes([d[2], d[3]]),
            );
            sets.port_blocks.push((block, flags));
        }
    }
    type Field<T> = fn(&mut Sets) -> &mut Vec<T>;
    let cidrs: [(&str, Field<(u32, u32)>); 2] =
        [(EXCLUDE, |s| &mut s.exclude), (INCLUDE, |s| &mut s.include)];
    for (name, field) in cidrs {
        for (slot, key, _) in slot_entries::<u8>(dir, name)? {
            if let Some(sets) = slot_of(&mut out, slots, slot) {
                field(sets).push(key);
            }
        }
    }
    let values: [(&str, Field<u32>); 2] = [(LOCAL, |s| &mut s.local), (GROUPS, |s| &mut s.groups)];
    for (name, field) in values {
        for (slot, value) in slot_values(dir, name)? {
            if let Some(sets) = slot_of(&mut out, slots, slot) {
                field(sets).push(value);
            }
        }
    }
    for (slot, key, entry) in slot_entries::<[u32; 2]>(dir, ROUTE)? {
        if let Some(sets) = slot_of(&mut out, slots, slot) {
            sets.routes.push((key, entry));
        }
    }
    let cidrs6: [(&str, Field<(u32, Ip6)>); 2] = [
        (EXCLUDE6, |s| &mut s.exclude6),
        (INCLUDE6, |s| &mut s.include6),
    ];
    for (name, field) in cidrs6 {
        for (slot, key, _) in slot_entries6::<u8>(dir, name)? {
            if let Some(sets) = slot_of(&mut out, slots, slot) {
                field(sets).push(key);
            }
        }
    }
    for key in hash::<[u32; 5]>(dir, LOCAL6)?
        .keys()
        .collect::<Result<Vec<_>, _>>()
        .context("reading the IPv6 pod addresses")?
    {
        if let Some(sets) = slot_of(&mut out, slots, key[0]) {
            sets.local6.push(Ip6([key[1], key[2], key[3], key[4]]));
        }
    }
    for (slot, key, entry) in slot_entries6::<RouteEntry6>(dir, ROUTE6)? {
        if let Some(sets) = slot_of(&mut out, slots, slot) {
            sets.routes6.push((key, entry));
        }
    }
    Ok(out)
}

/// Makes `slot` of the set maps of `dir` hold exactly `sets`. The slot is
/// not in force while this runs (see [`activate`]), so the order of the
/// writes does not matter to the programs.
pub fn write_sets(dir: &Path, slot: u32, sets: &Sets) -> Result<()> {
    write_sets_over(dir, slot, sets, &read_sets(dir, slot)?)
}

/// [`write_sets`] into a slot known to hold `old` (an empty slot: nothing),
/// without reading the maps to find out: reading a slot walks every entry
/// of every set map, and their hash maps' empty buckets too. A map with
/// nothing to remove or add is not even opened (a path lookup and an info
/// query each; most pods use a few of the eleven).
pub fn write_sets_over(dir: &Path, slot: u32, sets: &Sets, old: &Sets) -> Result<()> {
    if !(old.ports.is_empty() && sets.ports.is_empty()) {
        let mut ports = hash::<u32>(dir, PORTS)?;
        for (port, _) in &old.ports {
            ports
                .remove(&port_key(slot, *port))
                .context("removing a port")?;
        }
        for (port, flags) in &sets.ports {
            ports
                .insert(port_key(slot, *port), flags, 0)
                .with_context(|| format!("writing port {port}"))?;
        }
    }
    for (name, new, old) in [
        (EXCLUDE, &sets.exclude, &old.exclude),
        (INCLUDE, &sets.include, &old.include),
    ] {
        if new.is_empty() && old.is_empty() {
            continue;
        }
        let mut map = trie::<u8>(dir, name)?;
        for key in old {
            map.remove(&cidr(slot, *key))
                .with_context(|| format!("removing from {name}"))?;
        }
        for key in new {
            map.insert(&cidr(slot, *key), 1, 0)
                .with_context(|| format!("writing {name}"))?;
        }
    }
    for (name, new, old) in [
        (LOCAL, &sets.local, &old.local),
        (GROUPS, &sets.groups, &old.groups),
    ] {
        if new.is_empty() && old.is_empty() {
            continue;
        }
        let mut map = hash::<u64>(dir, name)?;
        for value in old {
            map.remove(&slot_key(slot, *value))
                .with_context(|| format!("removing from {name}"))?;
        }
        for value in new {
            map.insert(slot_key(slot, *value), 1, 0)
                .with_context(|| format!("writing {name}"))?;
        }
    }
    if !(old.port_blocks.is_empty() && sets.port_blocks.is_empty()) {
        let mut blocks = port_trie(dir)?;
        for (key, _) in &old.port_blocks {
            blocks
                .remove(&port_block(slot, *key))
                .context("removing a port range")?;
        }
        for (key, flags) in &sets.port_blocks {
            blocks
                .insert(&port_block(slot, *key), *flags, 0)
                .context("writing the port-range map")?;
        }
    }
    if !(old.routes.is_empty() && sets.routes.is_empty()) {
        let mut routes = trie::<[u32; 2]>(dir, ROUTE)?;
        for (key, _) in &old.routes {
            routes
                .remove(&cidr(slot, *key))
                .context("removing a route")?;
        }
        for (key, entry) in &sets.routes {
            routes
                .insert(&cidr(slot, *key), *entry, 0)
                .context("writing the route map")?;
        }
    }
    write_sets6(dir, slot, sets, old)
}

/// The IPv6 part of [`write_sets`].
fn write_sets6(dir: &Path, slot: u32, sets: &Sets, old: &Sets) -> Result<()> {
    for (name, new, old) in [
        (EXCLUDE6, &sets.exclude6, &old.exclude6),
        (INCLUDE6, &sets.include6, &old.include6),
    ] {
        if new.is_empty() && old.is_empty() {
            continue;
        }
        let mut map: LpmTrie<MapData, [u8; 20], u8> =
            LpmTrie::try_from(Map::LpmTrie(open(dir, name)?))?;
        for key in old {
            map.remove(&cidr6(slot, *key))
                .with_context(|| format!("removing from {name}"))?;
        }
        for key in new {
            map.insert(&cidr6(slot, *key), 1, 0)
                .with_context(|| format!("writing {name}"))?;
        }
    }
    if !(old.local6.is_empty() && sets.local6.is_empty()) {
        let mut local = hash::<[u32; 5]>(dir, LOCAL6)?;
        for ip in &old.local6 {
            local
                .remove(&local6_key(slot, *ip))
                .context("removing a pod IPv6 address")?;
        }
        for ip in &sets.local6 {
            local
                .insert(local6_key(slot, *ip), 1, 0)
                .context("writing the pod IPv6 addresses")?;
        }
    }
    if !(old.routes6.is_empty() && sets.routes6.is_empty()) {
        let mut routes: LpmTrie<MapData, [u8; 20], RouteEntry6> =
            LpmTrie::try_from(Map::LpmTrie(open(dir, ROUTE6)?))?;
        for (key, _) in &old.routes6 {
            routes
                .remove(&cidr6(slot, *key))
                .context("removing an IPv6 route")?;
        }
        for (key, entry) in &sets.routes6 {
            routes
                .insert(&cidr6(slot, *key), *entry, 0)
                .context("writing the IPv6 route map")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod port_run_tests {
    #[test]
    fn consecutive_ports_read_as_ranges() {
        assert_eq!(super::port_runs(&[]), "");
        assert_eq!(
            super::port_runs(&[22, 80, 81, 82, 443, 444, 65535]),
            "22,80:82,443,444,65535"
        );
    }
}

#[cfg(test)]
mod port_block_tests {
    use proptest::prelude::*;

    use super::*;

    fn range(first: u16, last: u16, flag: u8) -> PortRange {
        PortRange { first, last, flag }
    }

    /// The flags the blocks give `port` (a block, never two).
    fn lookup(blocks: &[((u32, u16), u8)], port: u16) -> u8 {
        let hits: Vec<u8> = blocks
            .iter()
            .filter(|((bits, first), _)| {
                let size = 1u32 << (16 - bits);
                (u32::from(*first)..u32::from(*first) + size).contains(&u32::from(port))
            })
            .map(|(_, f)| *f)
            .collect();
        assert!(hits.len() <= 1, "port {port} in {} blocks", hits.len());
        hits.first().copied().unwrap_or(0)
    }

    #[test]
    fn ranges_become_few_aligned_blocks() {
        assert_eq!(
            port_blocks(&[range(8000, 8015, PORT_EXCLUDE)]),
            vec![((12, 8000), PORT_EXCLUDE)]
        );
        assert_eq!(port_blocks(&[range(0, 65535, 1)]), vec![((0, 0), 1)]);
        assert_eq!(port_blocks(&[range(1, 65535, 1)]).len(), 16);
        // Overlapping lists: the overlap has both flags.
        let blocks = port_blocks(&[range(10, 19, 1), range(15, 24, 2)]);
        assert_eq!(
            (
                lookup(&blocks, 12),
                lookup(&blocks, 16),
                lookup(&blocks, 22)
            ),
            (1, 3, 2)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn every_port_gets_the_flags_of_the_ranges_it_is_in(
            ranges in proptest::collection::vec((any::<u16>(), any::<u16>(), 0u8..4), 0..6),
            probes in proptest::collection::vec(any::<u16>(), 64),
        ) {
            let ranges: Vec<PortRange> = ranges
                .into_iter()
                .map(|(a, b, f)| range(a.min(b), a.max(b), 1 << f))
                .collect();
            let blocks = port_blocks(&ranges);
            let edges = ranges.iter().flat_map(|r| [r.first, r.last, r.first.saturating_sub(1), r.last.saturating_add(1)]);
            for port in probes.into_iter().chain(edges) {
                let expected = ranges
                    .iter()
                    .filter(|r| (r.first..=r.last).contains(&port))
                    .fold(0, |acc, r| acc | r.flag);
                prop_assert_eq!(lookup(&blocks, port), expected, "port {}", port);
            }
            // At most 30 blocks a piece: the map's limit holds for a few ranges.
            prop_assert!(blocks.len() <= 32 * (2 * ranges.len() + 1));
        }
    }
}
