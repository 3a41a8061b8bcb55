//! Typed access to an instance's pinned maps.

use std::path::Path;

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use redirect_common::{ConnTuple, Counter, InstanceMeta, OrigDst, RedirectConfig};

pub const CONFIG: &str = "RDR_CONFIG";
pub const STATS: &str = "RDR_STATS";
pub const ORIG_COOKIE: &str = "RDR_ORIG_COOKIE";
pub const ORIG_TUPLE: &str = "RDR_ORIG_TUPLE";
pub const META: &str = "RDR_META";

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
