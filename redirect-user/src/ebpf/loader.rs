//! Installing an instance on a cgroup and removing it: all or nothing,
//! also when the process is killed half-way.
//!
//! A fresh install builds the instance in a hidden directory of its own
//! (maps pinned, config written and put in force, every program attached
//! through a pinned bpf_link: the cgroup hooks on the pod's cgroup, and
//! with inbound capture the sk_lookup hook on the network namespace the
//! installer runs in) and renames it into place as its last step: the
//! instance is seen whole or not at all. An uninstall renames it away
//! first, then detaches and unpins. Installs, uninstalls and gc hold one
//! lock ([`bpffs::Lock`]); whoever takes it next removes what a killed run
//! left ([`repair`]).
//!
//! Reinstalling an existing instance reuses its pinned maps (so connections
//! in flight keep their records), writes the new configuration and sets into
//! the slot not in force, swaps each link's program with `BPF_LINK_UPDATE`
//! (at no moment is the cgroup without a capture program), and then puts
//! the new slot in force with one write: every decision reads either the
//! old configuration or the new one, never a mix. If a step fails before
//! that, the links get their previous programs back (held open for exactly
//! that) and the old configuration stays in force.
//!
//! Programs are attached with bpf_links (`BPF_LINK_CREATE`, no flags):
//! cgroup links are multi-attach by nature and run alongside any other
//! program on the same cgroup (the exclusive, flag-less `BPF_PROG_ATTACH`
//! that broke earlier projects is never used).

use std::{
    collections::HashSet,
    fs::{self, File},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::SockMap,
    maps::{Array, MapData},
    programs::{
        CgroupSockAddr, CgroupSockopt, Program, ProgramError, SchedClassifier, SkLookup, SockOps,
    },
    util::KernelVersion,
};
use redirect_common::{
    ABI_VERSION, CFG_IPV6, INSTANCE_POD, InstanceMeta, LISTENER_SLOTS, META_PATH_MAX,
    listener_index,
};

use super::{
    HOOKS, Hook, Kind, MIN_KERNEL, OBJECT, SK_LOOKUP, VIRT_HOOKS, all_hooks, config::Config,
    listener, maps, privilege, sys, timing,
};
use super::{
    instances::{check_conflicts, check_owner},
    removal::{remove_instance_dir, repair},
};
use crate::{
    bpffs::{self, Lock, NEW_PREFIX},
    cgroup::Cgroup,
    instance::InstanceName,
};

pub use super::{
    instances::{instances_on, meta_path},
    removal::{gc, uninstall},
};

/// What to install where. The calling thread must be in the pod's network
/// namespace: that is where inbound capture is attached and whose
/// addresses `config.local_addrs` lists.
pub struct Request<'a> {
    pub config: &'a Config,
    pub cgroup: &'a Cgroup,
    pub instance: &'a InstanceName,
}

/// A completed install.
pub struct Installed {
    /// The loaded object; keep it alive to read its log ring buffer.
    pub ebpf: Ebpf,
    /// Whether an existing instance was upgraded in place.
    pub upgraded: bool,
    /// Things the caller should tell the user (the install succeeded).
    pub notes: Vec<String>,
}

impl Installed {
    /// Tells the user what the install noted (on stderr, one line each).
    pub fn print_notes(&self) {
        for note in &self.notes {
            eprintln!("redirect: note: {note}");
        }
    }
}

/// Checks everything an install needs before anything is changed.
fn preflight(req: &Request<'_>) -> Result<()> {
    privilege::check_ebpf()?;
    let (major, minor) = MIN_KERNEL;
    if let Ok(kernel) = KernelVersion::current()
        && kernel < KernelVersion::new(major, minor, 0)
    {
        bail!(
            "kernel {kernel} is too old for eBPF capture (needs {major}.{minor} or later): use istio-iptables on this node"
        );
    }
    if req.cgroup.relative.trim_matches('/').is_empty() {
        bail!(
            "{} is the root of the cgroup2 hierarchy: capturing it would capture every process on the node; \
             pass the pod's cgroup (--cgroup PATH, or self-parent from the pod's init container)",
            req.cgroup.path.display()
        );
    }
    refuse_host_netns(netns_ino()?)?;
    privilege::raise_memlock();
    bpffs::ensure_mounted()
}

/// Whether an instance directory exists (a real directory: a link by the
/// same name is not redirect's, and never followed).
pub fn is_installed(instance: &InstanceName) -> bool {
    bpffs::is_mounted()
        && fs::symlink_metadata(bpffs::instance_dir(instance)).is_ok_and(|m| m.is_dir())
}

/// Installs (or upgrades in place) an instance. On any error, everything
/// this call changed is undone before the error is returned.
pub fn install(req: &Request<'_>) -> Result<Installed> {
    timing::mark(|| "before install (the caller's configuration)".into());
    preflight(req)?;
    let _hold = crate::signals::HoldSignals::new();
    let _lock = Lock::exclusive()?;
    repair()?;
    let dir = bpffs::instance_dir(req.instance);
    let upgraded = is_installed(req.instance);
    if !upgraded && fs::symlink_metadata(&dir).is_ok() {
        bail!(
            "{} exists but is not an instance directory (a link or a file): it is not redirect's; \
             remove it by hand or choose another --instance",
            dir.display()
        );
    }
    check_conflicts(req)?;
    if upgraded {
        check_owner(&dir, req)?;
        maps::check_capacity(&dir, req.config.max_connections)?;
        maps::check_layout(&dir).with_context(|| {
            format!(
                "instance '{}' was installed by an incompatible redirect: run `redirect uninstall --instance {}` first",
                req.instance, req.instance
            )
        })?;
    }
    // A fresh instance is built where nobody looks for it, and renamed
    // into place once whole.
    let build_dir = if upgraded {
        dir.clone()
    } else {
        bpffs::staging_dir(NEW_PREFIX, req.instance)
    };
    let mut undo = Undo {
        dir: build_dir.clone(),
        fresh: !upgraded,
        pins_before: pin_names(&build_dir),
        updated: Vec::new(),
        programs: Vec::new(),
    };
    let mut notes = Vec::new();
    timing::mark(|| "checks (lock, repair, conflicts)".into());
    let result = install_steps(req, &build_dir, &mut undo, &mut notes).and_then(|ebpf| {
        if !upgraded {
            fault_point("before-rename")?;
            bpffs::rename(
                &format!("{NEW_PREFIX}{}", req.instance),
                req.instance.as_str(),
            )?;
        }
        Ok(ebpf)
    });
    timing::mark(|| "commit".into());
    match result {
        Ok(ebpf) => {
            super::features::record_for_this_boot();
            Ok(Installed {
                ebpf,
                upgraded,
                notes,
            })
        }
        Err(err) => {
            let problems = undo.run();
            if problems.is_empty() {
                Err(err)
            } else {
                Err(anyhow!(
                    "{err:#} (and the rollback failed: {})",
                    problems.join("; ")
                ))
            }
        }
    }
}

/// Test hook: with `REDIRECT_TEST_FAULT=<point>` (debug builds only) the
/// install fails at that point, to prove the rollback; with
/// `REDIRECT_TEST_PAUSE=<point>` it stops there for a second, so that a
/// test can kill it mid-way.
pub(super) fn fault_point(point: &str) -> Result<()> {
    #[cfg(debug_assertions)]
    {
        if std::env::var("REDIRECT_TEST_PAUSE").as_deref() == Ok(point) {
            eprintln!("redirect: test pause at {point}");
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        if std::env::var("REDIRECT_TEST_FAULT").as_deref() == Ok(point) {
            bail!("injected fault at {point} (tests only)");
        }
    }
    let _ = point;
    Ok(())
}

fn install_steps(
    req: &Request<'_>,
    dir: &Path,
    undo: &mut Undo,
    notes: &mut Vec<String>,
) -> Result<Ebpf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // The socket-storage map is a BTF map, which the pin directory does
    // not cover: it is pinned (and reused on upgrade) by its own path.
    let sock_pin = dir.join(maps::SOCK);
    let ingress_ifindex = super::features::ingress_ifindex_present();
    if req.config.inbound.is_some() && !req.config.exclude_ifindexes.is_empty() && !ingress_ifindex
    {
        bail!(
            "-c with inbound capture (-b) needs the interface an inbound connection arrived on, \
             which sk_lookup gives from kernel 5.17: use `redirect istio-iptables` (its auto mode \
             programs iptables for it), or drop -c or -b"
        );
    }
    let mut loader = EbpfLoader::new();
    if ingress_ifindex {
        loader.override_global("INGRESS_IFINDEX", &1u32, true);
    }
    let mut ebpf = loader
        .default_map_pin_directory(dir)
        .map_pin_path(maps::SOCK, sock_pin.as_path())
        .map_max_entries(
            maps::ORIG_TUPLE,
            maps::tuple_map_entries(req.config.max_connections),
        )
        .load(OBJECT)
        .context("loading the eBPF object (maps)")?;
    fault_point("after-maps")?;
    timing::mark(|| "object and maps".into());

    let netns = File::open(NETNS).with_context(|| format!("opening {NETNS}"))?;
    let netns_ino = netns.metadata()?.ino();
    // Whether IPv6 rules are in force before or after this install: the
    // programs without the IPv6 decision serve only where they are in
    // force neither (see `Hook::serving`).
    let ipv6 = req.config.ipv6.is_some() || maps::active_config(dir)?.1.flags & CFG_IPV6 != 0;
    let slot = write_config(&mut ebpf, req, dir, undo, netns_ino)?;
    if undo.fresh {
        // Nothing runs yet: put the configuration in force before the
        // programs are attached, so that they capture from their first run.
        maps::activate(dir, slot)?;
    }
    timing::mark(|| "configuration and sets".into());

    let cgroup = File::open(&req.cgroup.path)
        .with_context(|| format!("opening cgroup {}", req.cgroup.path.display()))?;
    // The hooks the configuration gives work, and those an earlier
    // install attached (kept, with this build's program, until uninstall:
    // sockets it acted on may still ask it).
    let mut hooks = Vec::new();
    for hook in HOOKS {
        let needed = hook.needed_by(req.config) || dir.join(hook.pin_name()).exists();
        if needed && hook_wanted(hook)? {
            hooks.push(hook.serving(ipv6));
        }
    }
    let inbound_pin = dir.join(SK_LOOKUP.pin_name());
    let inbound = SK_LOOKUP.needed_by(req.config) || inbound_pin.exists();
    if inbound && !available(&SK_LOOKUP) {
        let (major, minor) = SK_LOOKUP.min_kernel;
        bail!(
            "inbound capture (-b) needs the sk_lookup hook of kernel {major}.{minor} or later: use `redirect istio-iptables` (its auto mode programs iptables for it) or drop -b"
        );
    }
    let to_load: Vec<Hook> = hooks
        .iter()
        .copied()
        .chain(inbound.then_some(SK_LOOKUP))
        .collect();
    load_programs(&mut ebpf, &to_load)?;
    timing::mark(|| "verify the programs (side by side)".into());
    let mut to_update = Vec::new();
    for hook in hooks {
        let pin = dir.join(hook.pin_name());
        if pin_is_live(&pin, req.cgroup.id) {
            to_update.push((hook, pin));
        } else {
            let _ = fs::remove_file(&pin); // a defunct link of a removed cgroup
            attach_and_pin(&ebpf, hook, Target::File(&cgroup), &pin)?;
            fault_point(&format!("after-attach-{}", hook.name))?;
        }
        timing::mark(|| format!("attach {}", hook.name));
    }
    // Inbound last: the sockops program that registers listeners runs by now.
    if inbound {
        let pin = inbound_pin;
        if req.config.inbound.is_some() {
            take_over_listener(&mut ebpf, req.config.inbound_port, notes)?;
        }
        timing::mark(|| "inbound listener search".into());
        if pin_is_live(&pin, netns_ino) {
            to_update.push((SK_LOOKUP, pin));
        } else {
            let _ = fs::remove_file(&pin); // a defunct link of a removed namespace
            attach_and_pin(&ebpf, SK_LOOKUP, Target::File(&netns), &pin)?;
        }
    }
    // `-k` after inbound: what its programs send to the proxy port is
    // answered for by the hooks above.
    attach_virt(&mut ebpf, req, dir, &mut to_update)?;
    for (hook, pin) in to_update {
        let before = swap_program(&ebpf, hook, &pin)?;
        undo.updated.push((pin, before));
        fault_point("after-first-link-update")?;
    }
    // Each link's program beside it, for the next upgrade's rollback.
    undo.programs = pin_programs(&ebpf, all_hooks().map(|h| h.serving(ipv6)), dir)?;
    if !undo.fresh {
        // The one step that changes what the programs decide.
        maps::activate(dir, slot)?;
    }
    Ok(ebpf)
}

/// Attaches the `-k` programs to each KubeVirt interface, one pinned TCX
/// link per interface and direction, or replaces their program in place
/// (`to_update`). The links of interfaces an earlier install named stay
/// and get the new program too (it ignores interfaces the configuration
/// in force does not name), until uninstall; those whose interface is
/// gone are unpinned.
fn attach_virt(
    ebpf: &mut Ebpf,
    req: &Request<'_>,
    dir: &Path,
    to_update: &mut Vec<(Hook, PathBuf)>,
) -> Result<()> {
    let wanted: Vec<u32> = req.config.virt_ifaces.iter().map(|v| v.ifindex).collect();
    for hook in VIRT_HOOKS {
        let earlier = virt_pins(dir, hook);
        if wanted.is_empty() && earlier.is_empty() {
            continue;
        }
        if !available(&hook) {
            let (major, minor) = hook.min_kernel;
            bail!(
                "-k needs tc programs on TCX links ({}, kernel {major}.{minor}), missing here: \
                 use `redirect istio-iptables` (its auto mode programs iptables for it) or drop -k",
                hook.feature
            );
        }
        load_program(ebpf, hook)?;
        timing::mark(|| format!("verify {}", hook.name));
        let mut ifindexes = wanted.clone();
        ifindexes.extend(earlier.iter().filter(|i| !wanted.contains(i)));
        for ifindex in ifindexes {
            let pin = dir.join(hook.virt_pin_name(ifindex));
            if pin_is_live(&pin, u64::from(ifindex)) {
                to_update.push((hook, pin));
            } else {
                let _ = fs::remove_file(&pin); // a defunct link of a removed interface
                if wanted.contains(&ifindex) {
                    attach_and_pin(ebpf, hook, Target::Ifindex(ifindex), &pin)?;
                }
            }
        }
        timing::mark(|| format!("attach {}", hook.name));
    }
    Ok(())
}

/// The interfaces `hook` has a pinned link for in `dir`.
pub fn virt_pins(dir: &Path, hook: Hook) -> Vec<u32> {
    let mut found: Vec<u32> = pin_names(dir)
        .iter()
        .filter_map(|name| hook.virt_pin_ifindex(name))
        .collect();
    found.sort_unstable();
    found
}

/// The calling thread's network namespace: where the inbound hook goes.
const NETNS: &str = "/proc/thread-self/ns/net";

fn netns_ino() -> Result<u64> {
    Ok(fs::metadata(NETNS)
        .with_context(|| format!("reading {NETNS}"))?
        .ino())
}

/// Refuses to capture the node's own network namespace: run there by
/// mistake (without `--netns`), outbound capture would send the node's
/// own connections to a proxy that does not exist there, and the inbound
/// hook every connection to the node (ssh included). The host's namespace
/// is known by its fixed inode number (kernel 6.18 and later), or as PID
/// 1's when this process sees the host's PID 1.
pub(super) fn refuse_host_netns(netns_ino: u64) -> Result<()> {
    const PROC_NET_INIT_INO: u64 = 0xEFFF_FFF9;
    const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
    let ino = |path: &str| fs::metadata(path).map(|m| m.ino()).ok();
    let host = netns_ino == PROC_NET_INIT_INO
        || (ino("/proc/self/ns/pid") == Some(PROC_PID_INIT_INO)
            && ino("/proc/1/ns/net") == Some(netns_ino));
    if host {
        bail!(
            "this is the node's own network namespace: capturing it would send the node's own \
             connections to a proxy that is not there; run redirect in the pod's network namespace \
             (as its init container does) or pass --netns"
        );
    }
    Ok(())
}

/// Puts the listeners that already exist on the inbound port into the
/// listener map (see [`listener`]); when it cannot, inbound connections
/// are refused until the proxy listens again, which the user is told.
fn take_over_listener(ebpf: &mut Ebpf, port: u16, notes: &mut Vec<String>) -> Result<()> {
    let sockets = match listener::take_over(port, LISTENER_SLOTS as usize) {
        Ok(sockets) => sockets,
        Err(err) => {
            notes.push(format!(
                "{err:#}: inbound connections are refused until the proxy listens on {port} again"
            ));
            return Ok(());
        }
    };
    let map = ebpf
        .map_mut(maps::LISTENER)
        .context("listener map missing")?;
    let mut listeners: SockMap<&mut MapData> = SockMap::try_from(map)?;
    for (slot, socket) in (0..LISTENER_SLOTS).zip(&sockets) {
        listeners
            .set(listener_index(INSTANCE_POD, slot), &socket.as_raw_fd(), 0)
            .with_context(|| format!("registering the listener on port {port}"))?;
    }
    Ok(())
}

/// Writes the configuration and its sets into the slot not in force (slot
/// 0 for a fresh instance) and the instance's metadata; returns the slot.
fn write_config(
    ebpf: &mut Ebpf,
    req: &Request<'_>,
    dir: &Path,
    undo: &Undo,
    netns_ino: u64,
) -> Result<u32> {
    let (active, old) = maps::active_config(dir)?;
    if old.abi_version != 0 && old.abi_version != ABI_VERSION {
        bail!(
            "instance '{}' was installed by an incompatible redirect (map layout {}, this one {}): \
             run `redirect uninstall --instance {}` first",
            req.instance,
            old.abi_version,
            ABI_VERSION,
            req.instance
        );
    }
    let slot = if undo.fresh || old.abi_version == 0 {
        active
    } else {
        maps::spare_slot(active)
    };
    req.config
        .check_limits()
        .map_err(|limit| anyhow!("{limit}"))?;
    maps::write_sets(dir, slot, &maps::Sets::of(req.config))?;
    maps::write_config(dir, slot, req.config.to_bpf())?;

    let map = ebpf.map_mut(maps::META).context("meta map missing")?;
    let mut meta: Array<&mut MapData, InstanceMeta> = Array::try_from(map)?;
    let path = req.cgroup.path.to_string_lossy();
    let bytes = path.as_bytes();
    if bytes.len() > META_PATH_MAX {
        bail!("cgroup path longer than {META_PATH_MAX} bytes: {path}");
    }
    let mut entry = InstanceMeta {
        cgroup_id: req.cgroup.id,
        installed_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        cgroup_path_len: bytes.len() as u32,
        // Where the inbound link is (or stays, inert, after an upgrade
        // that turned inbound capture off).
        netns_ino: if SK_LOOKUP.needed_by(req.config) || dir.join(SK_LOOKUP.pin_name()).exists() {
            netns_ino as u32
        } else {
            0
        },
        max_connections: req.config.max_connections,
        _pad: 0,
        cgroup_path: [0; META_PATH_MAX],
    };
    entry.cgroup_path[..bytes.len()].copy_from_slice(bytes);
    meta.set(0, entry, 0).context("writing the meta map")?;
    Ok(slot)
}

/// Whether the running kernel has `hook`: it loads a program for it
/// (see [`crate::probe`], which also honours `--assume-missing`).
pub fn available(hook: &Hook) -> bool {
    super::features::hook_present(hook)
}

/// Switches the link pinned at `pin` to `hook`'s program of `ebpf` in
/// place (`BPF_LINK_UPDATE`, atomic), and returns the program it ran,
/// open: the link held its last reference, and a rollback puts it back.
/// That program is the one pinned beside the link ([`Hook::prog_pin_name`];
/// [`pin_programs`] replaces the pin only once every link is swapped);
/// a directory of an earlier release without it needs CAP_SYS_ADMIN to
/// open the program by id.
pub(super) fn swap_program(ebpf: &Ebpf, hook: Hook, pin: &Path) -> Result<OwnedFd> {
    let link = sys::obj_get(pin)?;
    let running = sys::link_info(link.as_fd())?.prog_id;
    let dir = pin.parent().unwrap_or(Path::new("/"));
    let pinned = sys::obj_get(&dir.join(hook.prog_pin_name()))
        .ok()
        .filter(|prog| sys::prog_id(prog.as_fd()).is_ok_and(|id| id == running));
    let before = match pinned {
        Some(prog) => prog,
        None => sys::prog_fd_by_id(running).map_err(|err| {
            if err.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .and_then(std::io::Error::raw_os_error)
                    == Some(libc::EPERM)
            }) {
                anyhow!(
                    "replacing the {} program in place: {} was set up by an earlier release, \
                     which pinned no program beside its link, and opening the running one needs \
                     CAP_SYS_ADMIN: run this once with it, or remove and set up again",
                    hook.name,
                    dir.display()
                )
            } else {
                err
            }
        })?,
    };
    let prog = ebpf
        .program(hook.program)
        .with_context(|| format!("program {} missing from the object", hook.program))?;
    sys::link_update(link.as_fd(), prog.fd()?.as_fd())
        .with_context(|| format!("replacing the {} program in place", hook.name))?;
    Ok(before)
}

/// Pins each program of `ebpf` that `hooks` names and that is loaded,
/// beside its links in `dir` (see [`Hook::prog_pin_name`]), each in one
/// step (pinned under a name of its own, then renamed over the old pin, so
/// that a reader never finds it missing); returns what each pin held
/// before (`None`: no pin), for a rollback ([`restore_programs`]).
pub(super) fn pin_programs(
    ebpf: &Ebpf,
    hooks: impl IntoIterator<Item = Hook>,
    dir: &Path,
) -> Result<Vec<(Hook, Option<OwnedFd>)>> {
    let mut before = Vec::new();
    for hook in hooks {
        let Some(fd) = ebpf.program(hook.program).and_then(|p| p.fd().ok()) else {
            continue;
        };
        before.push((hook, sys::obj_get(&dir.join(hook.prog_pin_name())).ok()));
        pin_program(fd.as_fd(), hook, dir)?;
    }
    Ok(before)
}

/// Puts back what [`pin_programs`] replaced (a pin it made anew goes);
/// returns what failed.
pub(super) fn restore_programs(before: &[(Hook, Option<OwnedFd>)], dir: &Path) -> Vec<String> {
    before
        .iter()
        .filter_map(|(hook, old)| match old {
            Some(old) => pin_program(old.as_fd(), *hook, dir).err(),
            None => fs::remove_file(dir.join(hook.prog_pin_name()))
                .err()
                .filter(|err| err.kind() != std::io::ErrorKind::NotFound)
                .map(|err| anyhow!(err).context(format!("removing the {} program pin", hook.name))),
        })
        .map(|err| format!("{err:#}"))
        .collect()
}

fn pin_program(program: BorrowedFd<'_>, hook: Hook, dir: &Path) -> Result<()> {
    let staging = dir.join(hook.prog_staging_name());
    let _ = fs::remove_file(&staging); // left by a run killed here
    sys::obj_pin(program, &staging)
        .with_context(|| format!("pinning the {} program", hook.name))?;
    fs::rename(&staging, dir.join(hook.prog_pin_name()))
        .with_context(|| format!("renaming {} into place", staging.display()))
}

/// Whether `hook`'s program is to be loaded: where this kernel has the
/// hook; `false` for an optional hook it lacks (`redirect status` reports
/// it), an error naming the kernel for a required one.
pub(super) fn hook_wanted(hook: Hook) -> Result<bool> {
    if available(&hook) {
        return Ok(true);
    }
    if hook.optional {
        return Ok(false);
    }
    let (major, minor) = hook.min_kernel;
    bail!(
        "the {} hook needs kernel {major}.{minor} or later",
        hook.name
    );
}

pub(super) fn load_program(ebpf: &mut Ebpf, hook: Hook) -> Result<()> {
    let program = ebpf
        .program_mut(hook.program)
        .with_context(|| format!("program {} missing from the object", hook.program))?;
    load_one(hook, program)
}

/// Loads (the kernel verifies) the programs of `hooks`, each on a thread
/// of its own. The kernel verifies privileged loads side by side, so an
/// install waits for the slowest program rather than for all of them in
/// turn (connect6 and sendmsg6 are most of it). An error is that of the
/// first of `hooks` that failed; programs loaded by then stay loaded, as
/// they do when one fails in turn (the caller's rollback drops them).
pub(super) fn load_programs(ebpf: &mut Ebpf, hooks: &[Hook]) -> Result<()> {
    let mut programs: Vec<(Hook, &mut Program)> = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        if let Some(hook) = hooks.iter().find(|h| h.program == name) {
            programs.push((*hook, program));
        }
    }
    if let Some(missing) = hooks
        .iter()
        .find(|h| !programs.iter().any(|(p, _)| p.program == h.program))
    {
        bail!("program {} missing from the object", missing.program);
    }
    let mut results: Vec<(Hook, Result<()>)> = std::thread::scope(|scope| {
        let running: Vec<_> = programs
            .into_iter()
            .map(|(hook, program)| (hook, scope.spawn(move || load_one(hook, program))))
            .collect();
        running
            .into_iter()
            .map(|(hook, thread)| {
                let result = thread
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("loading the {} program panicked", hook.name)));
                (hook, result)
            })
            .collect()
    });
    for hook in hooks {
        if let Some(at) = results.iter().position(|(h, _)| h.program == hook.program) {
            results.swap_remove(at).1?;
        }
    }
    Ok(())
}

fn load_one(hook: Hook, program: &mut Program) -> Result<()> {
    let result = match hook.kind {
        Kind::SockAddr => <&mut CgroupSockAddr>::try_from(program)?.load(),
        Kind::SockOps => <&mut SockOps>::try_from(program)?.load(),
        Kind::Sockopt => <&mut CgroupSockopt>::try_from(program)?.load(),
        Kind::SkLookup => <&mut SkLookup>::try_from(program)?.load(),
        Kind::SchedCls => <&mut SchedClassifier>::try_from(program)?.load(),
    };
    result.map_err(|err| rejected(hook, err))
}

/// One line for a program the kernel refused: the verifier's last words
/// (its full log is printed with `REDIRECT_VERIFIER_LOG=1`).
fn rejected(hook: Hook, err: ProgramError) -> anyhow::Error {
    if let ProgramError::LoadError {
        io_error,
        verifier_log,
    } = &err
    {
        let log = verifier_log.to_string();
        if std::env::var_os("REDIRECT_VERIFIER_LOG").is_some() {
            eprintln!("{log}");
        }
        let reason = verifier_complaint(&log);
        return anyhow!(
            "the kernel rejected the {} program ({io_error}: {reason}); \
             this kernel or these capabilities cannot run it (full log: REDIRECT_VERIFIER_LOG=1)",
            hook.name
        );
    }
    anyhow!(err).context(format!("loading the {} program", hook.name))
}

/// The verifier's complaint in its log: the last line that is not an
/// instruction, a source line, register state or the closing statistics.
fn verifier_complaint(log: &str) -> &str {
    const NOISE: [&str; 7] = [
        "processed ",
        "stack depth",
        "verification time",
        "caller:",
        "callee:",
        "frame",
        "R",
    ];
    let lines = || log.lines().map(str::trim);
    lines()
        .rfind(|l| {
            !l.is_empty()
                && !l.starts_with(|c: char| c.is_ascii_digit() || c == ';')
                && !NOISE.iter().any(|p| l.starts_with(p))
        })
        .or_else(|| lines().rfind(|l| l.contains("prohibited") || l.contains("invalid")))
        .unwrap_or("no verifier log")
}

/// Attaches a loaded program to `target` (the cgroup, or the network
/// namespace for sk_lookup) with a new bpf_link and pins the link at `pin`.
///
/// The link is created with the raw `BPF_LINK_CREATE` rather than aya's
/// `attach`, for every hook alike, because aya 0.14 cannot turn a
/// `CgroupSockopt` link into an `FdLink` to pin it. A pinned link survives
/// this process, is swapped in place by the next install (`BPF_LINK_UPDATE`
/// on the same pin, so re-installing is idempotent) and is detached by
/// uninstall with the other pins. The alternative, a legacy
/// `BPF_PROG_ATTACH` with `BPF_F_ALLOW_MULTI`, cannot be pinned and would
/// need de-duplicating on every re-install.
fn attach_and_pin(ebpf: &Ebpf, hook: Hook, target: Target<'_>, pin: &Path) -> Result<()> {
    let program = ebpf
        .program(hook.program)
        .with_context(|| format!("program {} missing from the object", hook.program))?;
    let prog = program.fd()?.as_fd();
    let link = match target {
        Target::File(file) => sys::link_create(prog, file.as_fd(), hook.attach_type),
        Target::Ifindex(ifindex) => sys::link_create_ifindex(prog, ifindex, hook.attach_type),
    }
        .map_err(|err| {
            if let Target::Ifindex(ifindex) = target {
                anyhow!(err).context(format!(
                    "attaching the {} program to interface #{ifindex}",
                    hook.name
                ))
            } else if hook.kind == Kind::SkLookup {
                anyhow!(err).context("attaching the sk_lookup program to the network namespace")
            } else if err.raw_os_error() == Some(libc::EPERM) {
                anyhow!(
                    "attaching the {} program to the cgroup: another program holds this cgroup's {} hook \
                     exclusively (BPF_PROG_ATTACH without BPF_F_ALLOW_MULTI): detach it, or have its owner attach with multi-attach",
                    hook.name,
                    hook.name
                )
            } else {
                anyhow!(err).context(format!("attaching the {} program to the cgroup", hook.name))
            }
        })?;
    sys::obj_pin(link.as_fd(), pin).with_context(|| format!("pinning the {} link", hook.name))
}

/// [`attach_and_pin`] to a cgroup or network namespace.
pub(super) fn attach_and_pin_to(ebpf: &Ebpf, hook: Hook, target: &File, pin: &Path) -> Result<()> {
    attach_and_pin(ebpf, hook, Target::File(target), pin)
}

/// What a link is attached to: a cgroup or network namespace (by an open
/// descriptor), or an interface.
#[derive(Clone, Copy)]
enum Target<'a> {
    File(&'a File),
    Ifindex(u32),
}

/// Whether `pin` holds a link still attached to `target` (a cgroup id, or
/// a network namespace inode).
fn pin_is_live(pin: &Path, target: u64) -> bool {
    sys::obj_get(pin)
        .and_then(|fd| sys::link_info(fd.as_fd()))
        .is_ok_and(|info| info.target == target)
}

fn pin_names(dir: &Path) -> HashSet<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// What an install changed, so that a failed one can be rolled back.
struct Undo {
    dir: PathBuf,
    /// The instance is built in a staging directory of its own.
    fresh: bool,
    /// Pins that existed before (everything else was created by this install).
    pins_before: HashSet<String>,
    /// Links whose program was replaced, with the previous program (open).
    updated: Vec<(PathBuf, OwnedFd)>,
    /// The programs pinned beside the links before this install replaced
    /// the pins.
    programs: Vec<(Hook, Option<OwnedFd>)>,
}

impl Undo {
    /// Rolls back; returns what could not be undone. The configuration in
    /// force is never changed before the last step, so only programs and
    /// pins need undoing.
    fn run(self) -> Vec<String> {
        let mut problems = Vec::new();
        for (pin, old_prog) in self.updated.iter().rev() {
            let reverted =
                sys::obj_get(pin).and_then(|link| sys::link_update(link.as_fd(), old_prog.as_fd()));
            if let Err(err) = reverted {
                problems.push(format!("restoring {}: {err:#}", pin.display()));
            }
        }
        problems.extend(restore_programs(&self.programs, &self.dir));
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if self.fresh {
            if self.dir.exists()
                && let Err(err) = remove_instance_dir(&name)
            {
                problems.push(format!("{err:#}"));
            }
            return problems;
        }
        for pin in pin_names(&self.dir) {
            if self.pins_before.contains(&pin) {
                continue;
            }
            let path = self.dir.join(&pin);
            if let Ok(link) = sys::obj_get(&path) {
                let _ = sys::link_detach(link.as_fd());
            }
            if let Err(err) = fs::remove_file(&path) {
                problems.push(format!("removing the new pin {pin}: {err}"));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::verifier_complaint;

    /// Bytes this thread has read (`rchar` of /proc/thread-self/io).
    fn bytes_read() -> u64 {
        let io =
            std::fs::read_to_string("/proc/thread-self/io").expect("reading /proc/thread-self/io");
        io.lines()
            .find_map(|line| line.strip_prefix("rchar: "))
            .and_then(|n| n.trim().parse().ok())
            .expect("rchar in /proc/thread-self/io")
    }

    /// The kernel's BTF costs 22-24 ms to parse and our programs have no
    /// CO-RE relocations, so no install may read it: the carried aya patch
    /// (vendor/aya) makes the loader read it only for an object that has
    /// some. Fails if the patch is lost (an aya without it reads the whole
    /// file in `EbpfLoader::new()`) or if the programs gain relocations.
    #[test]
    fn the_loader_reads_no_kernel_btf() {
        const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
        let Ok(meta) = std::fs::metadata(VMLINUX) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{VMLINUX} is missing: this kernel has no BTF (CONFIG_DEBUG_INFO_BTF)"
            );
            eprintln!("skipped: {VMLINUX} is missing (a kernel without CONFIG_DEBUG_INFO_BTF)");
            return;
        };
        // sysfs reports no size for it; read it once to know it.
        let size = std::fs::read(VMLINUX).map_or(meta.len(), |b| b.len() as u64);
        assert!(size > 100_000, "{VMLINUX} is only {size} bytes");
        let before = bytes_read();
        let loader = aya::EbpfLoader::new();
        let read = bytes_read() - before;
        drop(loader);
        assert!(
            read < size / 2,
            "EbpfLoader::new() read {read} bytes (the kernel's BTF is {size}): the vendor/aya patch is not in use"
        );
        let object = aya_obj::Object::parse(super::super::OBJECT).expect("parsing the eBPF object");
        assert!(
            !object.has_btf_relocations(),
            "the eBPF object has CO-RE relocations: every load now parses the kernel's BTF"
        );
    }

    #[test]
    fn the_verifier_complaint_is_found_among_its_log() {
        let log = "0: R1=ctx() R10=fp0\n; let addr = @ main.rs:1\n652: (0f) r5 += r4\n\
                   R5 tried to add from different maps, paths or scalars, pointer arithmetic with it prohibited for !root\n\
                   processed 651 insns (limit 1000000)\nstack depth 40+0\n";
        assert_eq!(
            verifier_complaint(log),
            "R5 tried to add from different maps, paths or scalars, pointer arithmetic with it prohibited for !root"
        );
        assert_eq!(
            verifier_complaint("invalid bpf_context access off=32 size=8\n"),
            "invalid bpf_context access off=32 size=8"
        );
    }
}
