//! Typed access to an instance's pinned maps.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, HashMap, Map, MapData, MapType, PerCpuArray};
use redirect_common::{ConnTuple, Counter, InstanceMeta, OrigDst, RedirectConfig};

pub const CONFIG: &str = "RDR_CONFIG";
pub const STATS: &str = "RDR_STATS";
pub const ORIG_COOKIE: &str = "RDR_ORIG_COOKIE";
pub const ORIG_TUPLE: &str = "RDR_ORIG_TUPLE";
pub const META: &str = "RDR_META";

/// Every pinned map with the type, key size and value size this build of
/// the programs expects.
const LAYOUT: [(&str, MapType, usize, usize); 5] = [
    (CONFIG, MapType::Array, 4, size_of::<RedirectConfig>()),
    (STATS, MapType::PerCpuArray, 4, size_of::<u64>()),
    (
        ORIG_COOKIE,
        MapType::LruHash,
        size_of::<u64>(),
        size_of::<OrigDst>(),
    ),
    (
        ORIG_TUPLE,
        MapType::LruHash,
        size_of::<ConnTuple>(),
        size_of::<OrigDst>(),
    ),
    (META, MapType::Array, 4, size_of::<InstanceMeta>()),
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

fn open(dir: &Path, name: &str) -> Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))
}

pub fn config(dir: &Path) -> Result<Array<MapData, RedirectConfig>> {
    Ok(Array::try_from(Map::Array(open(dir, CONFIG)?))?)
}

pub fn meta(dir: &Path) -> Result<Array<MapData, InstanceMeta>> {
    Ok(Array::try_from(Map::Array(open(dir, META)?))?)
}

/// Sums each counter over all CPUs.
pub fn counters(dir: &Path) -> Result<Vec<(Counter, u64)>> {
    let stats: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(open(dir, STATS)?))?;
    Counter::ALL
        .iter()
        .map(|c| {
            let per_cpu = stats.get(&(*c as u32), 0).context("reading counters")?;
            Ok((*c, per_cpu.iter().sum()))
        })
        .collect()
}

/// Number of connections with a record: (connecting, established).
pub fn tracked(dir: &Path) -> Result<(u64, u64)> {
    let cookies: HashMap<MapData, u64, OrigDst> =
        HashMap::try_from(Map::LruHashMap(open(dir, ORIG_COOKIE)?))?;
    let tuples: HashMap<MapData, ConnTuple, OrigDst> =
        HashMap::try_from(Map::LruHashMap(open(dir, ORIG_TUPLE)?))?;
    Ok((
        cookies.keys().filter(Result::is_ok).count() as u64,
        tuples.keys().filter(Result::is_ok).count() as u64,
    ))
}
