//! Upgrading a loaded node set in place: `node-set load` (and so `node
//! install`, which the node agent runs at every start) over a set loaded
//! on the same cgroup replaces its programs with this build's without a
//! moment of its pods uncaptured, as an instance's reinstall does.
//!
//! The maps stay, with every pod's configuration, counters and
//! original destinations: the new programs are loaded onto the pinned
//! maps and each link (one per cgroup hook, one `sk_lookup` link per pod)
//! is switched to its new program with `BPF_LINK_UPDATE`, one atomic swap
//! each. Between two swaps old and new programs run side by side on the
//! same maps, which is sound because both builds read them alike: the
//! maps' layouts and every pod's configuration ABI must be this build's,
//! or the upgrade is refused before anything changes. A failure midway
//! puts every swapped link back on its old program. The caller holds the
//! exclusive lock, so no pod is added or removed meanwhile.

use std::{
    fs,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{Ebpf, maps::MapData};
use redirect_common::ABI_VERSION;

use super::{
    HOOKS, Hook, SK_LOOKUP, loader,
    maps::{self, ORIG_TUPLE},
    node_set::{self, LoadRequest, pod_link},
    sys,
};

/// Replaces the programs of the set pinned in `dir` with this build's;
/// returns how many pods it holds (all kept).
pub(super) fn upgrade(req: &LoadRequest<'_>, dir: &Path) -> Result<usize> {
    let pods = check_compatible(req, dir)?;
    let pinned_before: Vec<bool> = maps::LAYOUT
        .iter()
        .map(|(name, ..)| dir.join(name).exists())
        .collect();
    let mut ebpf = node_set::load_object(req, dir)?;
    let mut swapped = Swapped {
        // Maps this build has and the set did not, which loading the
        // object created (only this build's programs use them).
        new_maps: maps::LAYOUT
            .iter()
            .zip(pinned_before)
            .filter(|(_, before)| !before)
            .map(|((name, ..), _)| dir.join(name))
            .collect(),
        ..Swapped::default()
    };
    match swap_programs(&mut ebpf, req, dir, &pods, &mut swapped) {
        Ok(()) => Ok(pods.len()),
        Err(err) => match swapped.undo(dir) {
            Ok(()) => Err(err.context(format!("upgrading node set {}: nothing changed", req.set))),
            // Each link runs the old program or the new one, both sound on
            // these maps: a load that succeeds puts them all on the new.
            Err(undo) => Err(anyhow!(
                "upgrading node set {set} failed ({err:#}) and putting back the old programs \
                 failed too ({undo:#}): its pods stay captured, some by the old programs and some \
                 by the new; load the set again to finish the upgrade",
                set = req.set
            )),
        },
    }
}

/// Refuses a set this build cannot take over: maps of another layout or
/// size, or a pod whose configuration another ABI wrote. Returns the
/// set's pods.
fn check_compatible(req: &LoadRequest<'_>, dir: &Path) -> Result<Vec<node_set::Pod>> {
    let set = req.set;
    let reload = format!(
        "`redirect node-set unload --set {set}` (its pods lose their capture until added again), then load it"
    );
    let another_release = |why: String| {
        anyhow!("node set {set} is loaded by another release of redirect ({why}): {reload}")
    };
    maps::check_layout(dir).map_err(|err| another_release(format!("{err:#}")))?;
    let pods = node_set::pods(dir).map_err(|err| another_release(format!("{err:#}")))?;
    let config = maps::config(dir)?;
    for pod in &pods {
        let slot = maps::pod_active_slot(dir, pod.index)?;
        let abi = config
            .get(&slot, 0)
            .with_context(|| format!("reading pod {}'s configuration", pod.name))?
            .abi_version;
        if abi != ABI_VERSION {
            return Err(another_release(format!(
                "pod {} was added with configuration ABI {abi}, this build's is {ABI_VERSION}",
                pod.name
            )));
        }
    }
    let capacity = node_set::meta_map(dir)?.len();
    if capacity != req.max_pods {
        bail!(
            "node set {set} is sized for {capacity} pods: keep --max-pods {capacity}, or resize it: {reload}"
        );
    }
    // Every other map as this build sizes a set of that many pods (a
    // release with other per-pod limits sized them otherwise).
    for (name, wanted) in node_set::capacities(req.max_pods) {
        let pinned = dir.join(name);
        if !pinned.exists() {
            continue;
        }
        let entries = MapData::from_pin(&pinned)
            .and_then(|map| map.info())
            .with_context(|| format!("reading map {name}'s size"))?
            .max_entries();
        if entries != wanted {
            return Err(another_release(format!(
                "its map {name} holds {entries} entries, this build's {wanted}"
            )));
        }
    }
    let tuples = MapData::from_pin(dir.join(ORIG_TUPLE))
        .and_then(|map| map.info())
        .context("reading the original-destination map's size")?
        .max_entries();
    if tuples != maps::tuple_map_entries(req.max_connections) {
        bail!(
            "node set {set}'s original-destination map holds {tuples} entries, --max-connections {} \
             would size it otherwise: pass the value it was loaded with, or resize it: {reload}",
            req.max_connections
        );
    }
    Ok(pods)
}

/// The links switched to a new program so far, each with its old program
/// (open: the link held its last reference), and the `sk_lookup` program
/// pin replaced.
#[derive(Default)]
struct Swapped {
    links: Vec<(PathBuf, OwnedFd)>,
    /// Links of hooks this build has and the set did not (attached anew).
    new_links: Vec<PathBuf>,
    /// Maps this build has and the set did not (created anew).
    new_maps: Vec<PathBuf>,
    /// The programs pinned beside the links before they were replaced
    /// (the `sk_lookup` one is what new pods link to).
    programs: Vec<(Hook, Option<OwnedFd>)>,
}

impl Swapped {
    /// Puts every link back on its old program, in reverse order.
    fn undo(self, dir: &Path) -> Result<()> {
        let mut problems = loader::restore_programs(&self.programs, dir);
        for pin in &self.new_links {
            if let Ok(link) = sys::obj_get(pin) {
                let _ = sys::link_detach(link.as_fd());
            }
            if let Err(err) = fs::remove_file(pin) {
                problems.push(format!("removing {}: {err}", pin.display()));
            }
        }
        for pin in &self.new_maps {
            match fs::remove_file(pin) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                    problems.push(format!("removing {}: {err}", pin.display()));
                }
                _ => {}
            }
        }
        for (pin, old) in self.links.iter().rev() {
            let back =
                sys::obj_get(pin).and_then(|link| sys::link_update(link.as_fd(), old.as_fd()));
            match back {
                Err(err) if !severed(&err) => {
                    problems.push(format!("restoring {}: {err:#}", pin.display()));
                }
                _ => {}
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("{}", problems.join("; "))
        }
    }
}

/// Loads (verifies) every program first, then swaps the links: the cgroup
/// hooks, then each pod's `sk_lookup` link and the program pin new pods
/// link to.
fn swap_programs(
    ebpf: &mut Ebpf,
    req: &LoadRequest<'_>,
    dir: &Path,
    pods: &[node_set::Pod],
    swapped: &mut Swapped,
) -> Result<()> {
    let mut hooks = Vec::new();
    for hook in HOOKS {
        if loader::hook_wanted(hook)? {
            hooks.push(hook);
        }
    }
    // As a new set has it: where the kernel has the hook.
    let sk_lookup = loader::available(&SK_LOOKUP);
    let to_load: Vec<Hook> = hooks
        .iter()
        .copied()
        .chain(sk_lookup.then_some(SK_LOOKUP))
        .collect();
    loader::load_programs(ebpf, &to_load)?;
    let mut cgroup = None;
    for hook in hooks {
        let pin = dir.join(hook.pin_name());
        if pin.exists() {
            swapped
                .links
                .push((pin.clone(), loader::swap_program(ebpf, hook, &pin)?));
        } else {
            // A hook this build has and the set's did not: attach it to
            // the set's cgroup (the one its connect4 link is on, checked
            // by the caller).
            let target = match &cgroup {
                Some(file) => file,
                None => cgroup
                    .insert(fs::File::open(&req.cgroup.path).with_context(|| {
                        format!("opening cgroup {}", req.cgroup.path.display())
                    })?),
            };
            loader::attach_and_pin_to(ebpf, hook, target, &pin)?;
            swapped.new_links.push(pin);
        }
        loader::fault_point("node-set-upgrade-after-swap")?;
    }
    for pod in pods.iter().filter(|_| sk_lookup) {
        let pin = dir.join(pod_link(pod.index));
        if !pin.exists() {
            continue;
        }
        match loader::swap_program(ebpf, SK_LOOKUP, &pin) {
            Ok(old) => swapped.links.push((pin, old)),
            // The pod's network namespace is gone and gc has not removed
            // the pod yet: nothing runs there to upgrade.
            Err(err) if severed(&err) => {}
            Err(err) => return Err(err.context(format!("pod {}", pod.name))),
        }
    }
    // Pinned once every link is swapped: until then each pin is the
    // program its links ran, held for the rollback.
    let hooks = HOOKS.into_iter().chain([SK_LOOKUP]);
    swapped.programs = loader::pin_programs(ebpf, hooks, dir)?;
    Ok(())
}

/// Whether `err` is `BPF_LINK_UPDATE` on a link the kernel severed (its
/// network namespace is gone).
fn severed(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            == Some(libc::ENOLINK)
    })
}
