//! Installing an instance on a cgroup and removing it: all or nothing.
//!
//! An install either leaves the instance fully installed (maps pinned,
//! config written, every program attached through a pinned bpf_link) or
//! leaves the machine as it found it.
//!
//! Reinstalling an existing instance reuses its pinned maps (so connections
//! in flight keep their records), writes the new config in place, and swaps
//! each link's program with `BPF_LINK_UPDATE`: at no moment is the cgroup
//! without a capture program, so no connection escapes during an upgrade.
//!
//! Programs are attached with bpf_links (`BPF_LINK_CREATE`, no flags):
//! cgroup links are multi-attach by nature and run alongside any other
//! program on the same cgroup (the exclusive, flag-less `BPF_PROG_ATTACH`
//! that broke earlier projects is never used).

use std::{
    collections::HashSet,
    fs::{self, File},
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData},
    programs::{CgroupSockAddr, CgroupSockopt, SockOps},
    util::KernelVersion,
};
use redirect_common::{ABI_VERSION, InstanceMeta, META_PATH_MAX, RedirectConfig};

use super::{HOOKS, Hook, Kind, OBJECT, maps, sys};
use crate::{bpffs, cgroup::Cgroup, config::Config, privilege};

/// What to install where.
pub struct Request<'a> {
    pub config: &'a Config,
    pub cgroup: &'a Cgroup,
    pub instance: &'a str,
    /// aya-log level compiled into the loaded programs (0 = off).
    pub log_level: u8,
}

/// A completed install.
pub struct Installed {
    /// The loaded object; keep it alive to read its log ring buffer.
    pub ebpf: Ebpf,
    /// Whether an existing instance was upgraded in place.
    pub upgraded: bool,
}

/// The first kernel with cgroup bpf_links (attach without exclusive flags,
/// pinnable, replaceable in place).
const MIN_KERNEL: (u8, u8) = (5, 7);

/// Checks everything an install needs before anything is changed.
fn preflight() -> Result<()> {
    privilege::check_ebpf()?;
    let (major, minor) = MIN_KERNEL;
    if let Ok(kernel) = KernelVersion::current()
        && kernel < KernelVersion::new(major, minor, 0)
    {
        bail!(
            "kernel {kernel} has no cgroup bpf_link (needs {major}.{minor} or later): eBPF capture is not available on this node"
        );
    }
    privilege::raise_memlock();
    bpffs::ensure_mounted()
}

/// Serialises installs and uninstalls on this machine (held until dropped).
struct Lock(#[allow(dead_code)] File);

fn lock() -> Result<Lock> {
    let root = bpffs::root();
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let dir = File::open(&root).with_context(|| format!("opening {}", root.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error()).context("locking the bpffs directory");
    }
    Ok(Lock(dir))
}

/// Installs (or upgrades in place) an instance. On any error, everything
/// this call changed is undone before the error is returned.
pub fn install(req: &Request<'_>) -> Result<Installed> {
    preflight()?;
    let _lock = lock()?;
    let dir = bpffs::instance_dir(req.instance);
    let upgraded = dir.is_dir();
    if upgraded {
        check_owner(&dir, req)?;
    }
    let mut undo = Undo {
        dir: dir.clone(),
        fresh: !upgraded,
        pins_before: pin_names(&dir),
        old_config: None,
        updated: Vec::new(),
    };
    match install_steps(req, &dir, &mut undo) {
        Ok(ebpf) => Ok(Installed { ebpf, upgraded }),
        Err(err) => {
            undo.run();
            Err(err)
        }
    }
}

/// Refuses to take over an instance name that belongs to another cgroup.
fn check_owner(dir: &Path, req: &Request<'_>) -> Result<()> {
    let Ok(meta) = maps::meta(dir).and_then(|m| Ok(m.get(&0, 0)?)) else {
        return Ok(()); // left over from an interrupted install: overwrite it
    };
    if meta.cgroup_id != 0 && meta.cgroup_id != req.cgroup.id {
        bail!(
            "instance '{}' is installed on another cgroup ({}): uninstall it first or choose another --instance",
            req.instance,
            meta_path(&meta)
        );
    }
    Ok(())
}

fn install_steps(req: &Request<'_>, dir: &Path, undo: &mut Undo) -> Result<Ebpf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(dir)
        .override_global("AYA_LOG_LEVEL", &req.log_level, true)
        .load(OBJECT)
        .context("loading the eBPF object (maps)")?;

    write_config(&mut ebpf, req, undo)?;

    let cgroup = File::open(&req.cgroup.path)
        .with_context(|| format!("opening cgroup {}", req.cgroup.path.display()))?;
    let mut to_update = Vec::new();
    for hook in HOOKS {
        if !available(&hook) {
            if hook.optional {
                continue; // reported by `redirect status`
            }
            let (major, minor) = hook.min_kernel;
            bail!(
                "the {} hook needs kernel {major}.{minor} or later",
                hook.name
            );
        }
        load_program(&mut ebpf, hook)?;
        let pin = dir.join(hook.pin_name());
        if pin_is_live(&pin, req.cgroup.id) {
            to_update.push((hook, pin));
        } else {
            let _ = fs::remove_file(&pin); // a defunct link of a removed cgroup
            attach_and_pin(&ebpf, hook, &cgroup, &pin)?;
        }
    }
    for (hook, pin) in to_update {
        let link = sys::obj_get(&pin)?;
        let before = sys::link_info(link.as_fd())?;
        let prog = ebpf
            .program(hook.program)
            .with_context(|| format!("program {} missing from the object", hook.program))?;
        sys::link_update(link.as_fd(), prog.fd()?.as_fd())
            .with_context(|| format!("replacing the {} program in place", hook.name))?;
        undo.updated.push((pin, before.prog_id));
    }
    Ok(ebpf)
}

fn write_config(ebpf: &mut Ebpf, req: &Request<'_>, undo: &mut Undo) -> Result<()> {
    let map = ebpf.map_mut(maps::CONFIG).context("config map missing")?;
    let mut config: Array<&mut MapData, RedirectConfig> = Array::try_from(map)?;
    let old = config.get(&0, 0).context("reading the config map")?;
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
    if !undo.fresh && old.abi_version != 0 {
        undo.old_config = Some(old);
    }
    config
        .set(0, req.config.to_bpf(), 0)
        .context("writing the config map")?;

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
        _pad: 0,
        cgroup_path: [0; META_PATH_MAX],
    };
    entry.cgroup_path[..bytes.len()].copy_from_slice(bytes);
    meta.set(0, entry, 0).context("writing the meta map")?;
    Ok(())
}

/// Whether the running kernel has `hook` (unknown kernel versions are
/// assumed to; the load or attach then reports what is missing).
pub fn available(hook: &Hook) -> bool {
    let (major, minor) = hook.min_kernel;
    KernelVersion::current().map_or(true, |k| k >= KernelVersion::new(major, minor, 0))
}

fn load_program(ebpf: &mut Ebpf, hook: Hook) -> Result<()> {
    let program = ebpf
        .program_mut(hook.program)
        .with_context(|| format!("program {} missing from the object", hook.program))?;
    let result = match hook.kind {
        Kind::SockAddr => <&mut CgroupSockAddr>::try_from(program)?.load(),
        Kind::SockOps => <&mut SockOps>::try_from(program)?.load(),
        Kind::Sockopt => <&mut CgroupSockopt>::try_from(program)?.load(),
    };
    result.with_context(|| format!("loading the {} program (verifier)", hook.name))
}

/// Attaches a loaded program to the cgroup with a new bpf_link and pins the
/// link at `pin`.
///
/// The link is created with the raw `BPF_LINK_CREATE` rather than aya's
/// `attach`, for every hook alike, because aya 0.14 cannot turn a
/// `CgroupSockopt` link into an `FdLink` to pin it. A pinned link survives
/// this process, is swapped in place by the next install (`BPF_LINK_UPDATE`
/// on the same pin, so re-installing is idempotent) and is detached by
/// uninstall with the other pins. The alternative, a legacy
/// `BPF_PROG_ATTACH` with `BPF_F_ALLOW_MULTI`, cannot be pinned and would
/// need de-duplicating on every re-install.
fn attach_and_pin(ebpf: &Ebpf, hook: Hook, cgroup: &File, pin: &Path) -> Result<()> {
    let program = ebpf
        .program(hook.program)
        .with_context(|| format!("program {} missing from the object", hook.program))?;
    let link = sys::link_create(program.fd()?.as_fd(), cgroup.as_fd(), hook.attach_type)
        .with_context(|| format!("attaching the {} program to the cgroup", hook.name))?;
    sys::obj_pin(link.as_fd(), pin).with_context(|| format!("pinning the {} link", hook.name))
}

/// Whether `pin` holds a link still attached to the cgroup with id `cgroup_id`.
fn pin_is_live(pin: &Path, cgroup_id: u64) -> bool {
    sys::obj_get(pin)
        .and_then(|fd| sys::link_info(fd.as_fd()))
        .is_ok_and(|info| info.cgroup_id == cgroup_id)
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
    /// The instance directory did not exist before.
    fresh: bool,
    /// Pins that existed before (everything else was created by this install).
    pins_before: HashSet<String>,
    /// Config entry before this install overwrote it (upgrades only).
    old_config: Option<RedirectConfig>,
    /// Links whose program was replaced, with the previous program id.
    updated: Vec<(PathBuf, u32)>,
}

impl Undo {
    fn run(self) {
        for (pin, old_prog) in self.updated.iter().rev() {
            let reverted = sys::obj_get(pin).and_then(|link| {
                let prog = sys::prog_fd_by_id(*old_prog)?;
                sys::link_update(link.as_fd(), prog.as_fd())
            });
            if let Err(err) = reverted {
                eprintln!("redirect: rollback: {err:#}");
            }
        }
        if let Some(old) = self.old_config
            && let Err(err) = maps::config(&self.dir).and_then(|mut m| Ok(m.set(0, old, 0)?))
        {
            eprintln!("redirect: rollback: restoring the config: {err:#}");
        }
        if self.fresh {
            let _ = fs::remove_dir_all(&self.dir);
            return;
        }
        for name in pin_names(&self.dir) {
            if !self.pins_before.contains(&name) {
                let _ = fs::remove_file(self.dir.join(name));
            }
        }
    }
}

/// Detaches and unpins an instance. Returns `false` when it was not installed.
pub fn uninstall(instance: &str) -> Result<bool> {
    privilege::check_ebpf()?;
    if !bpffs::is_mounted() {
        return Ok(false);
    }
    let _lock = lock()?;
    let dir = bpffs::instance_dir(instance);
    if !dir.is_dir() {
        return Ok(false);
    }
    // connect4 first: stop redirecting before the tracking goes away.
    for hook in HOOKS.iter().rev() {
        let pin = dir.join(hook.pin_name());
        if let Ok(link) = sys::obj_get(&pin) {
            // Detach now even if some process still holds the link open.
            let _ = sys::link_detach(link.as_fd());
        }
        match fs::remove_file(&pin) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).with_context(|| format!("unpinning {}", pin.display())),
        }
    }
    fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(true)
}

/// The cgroup path recorded in an instance's meta entry.
pub fn meta_path(meta: &InstanceMeta) -> String {
    let len = (meta.cgroup_path_len as usize).min(META_PATH_MAX);
    String::from_utf8_lossy(&meta.cgroup_path[..len]).into_owned()
}

/// Installed instances whose recorded cgroup is `cgroup`.
pub fn instances_on(cgroup: &Cgroup) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for name in bpffs::instances()? {
        let dir = bpffs::instance_dir(&name);
        if let Ok(meta) = maps::meta(&dir).and_then(|m| Ok(m.get(&0, 0)?))
            && (meta.cgroup_id == cgroup.id || Path::new(&meta_path(&meta)) == cgroup.path)
        {
            found.push(name);
        }
    }
    Ok(found)
}
