//! Finding and checking the cgroup to capture.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;

/// A cgroup v2 directory that programs can be attached to.
#[derive(Clone, Debug)]
pub struct Cgroup {
    /// Absolute path of the directory.
    pub path: PathBuf,
    /// Path relative to the cgroup2 mount ("" for the root).
    pub relative: String,
    /// The kernel's cgroup id (the directory's inode number).
    pub id: u64,
}

/// Mount points of every cgroup2 hierarchy, from /proc/mounts.
pub fn cgroup2_mounts() -> Result<Vec<PathBuf>> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(mounts
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(dir))
        })
        .collect())
}

fn first_cgroup2_mount() -> Result<PathBuf> {
    cgroup2_mounts()?.into_iter().next().context(
        "no cgroup v2 hierarchy is mounted: redirect attaches to cgroup v2; \
         mount it with `mount -t cgroup2 none /sys/fs/cgroup` (or /sys/fs/cgroup/unified on a hybrid host); \
         in a container, mount the host's cgroup2 hierarchy into it (a hostPath volume of /sys/fs/cgroup)",
    )
}

/// Resolves `--cgroup`: a directory path, or `self-parent` (the parent of
/// this process's own cgroup: the pod cgroup, when run from an init container).
pub fn resolve(arg: &str) -> Result<Cgroup> {
    if arg == "self-parent" {
        return self_parent();
    }
    let path = Path::new(arg);
    if !path.exists() {
        bail!(
            "cgroup {arg} does not exist: pass an existing cgroup v2 directory (or `self-parent`)"
        );
    }
    let path = path
        .canonicalize()
        .with_context(|| format!("resolving cgroup path {arg}"))?;
    if !path.is_dir() {
        let parent = path.parent().unwrap_or(&path);
        bail!(
            "{arg} is a file, not a cgroup directory: pass the cgroup's directory ({})",
            parent.display()
        );
    }
    check_v2(&path)?;
    let mount = cgroup2_mounts()?
        .into_iter()
        .filter(|m| path.starts_with(m))
        .max_by_key(|m| m.as_os_str().len())
        .with_context(|| format!("{} is not under any cgroup2 mount", path.display()))?;
    from_path(&mount, &path)
}

fn self_parent() -> Result<Cgroup> {
    let mount = first_cgroup2_mount()?;
    let own = fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("this process has no cgroup v2 membership (no `0::` line in /proc/self/cgroup)")?;
    const PROC_CGROUP_INIT_INO: u64 = 0xEFFF_FFFB;
    let host_namespace =
        fs::metadata("/proc/self/ns/cgroup").map_or(true, |m| m.ino() == PROC_CGROUP_INIT_INO);
    if own.trim() == "/" && !host_namespace {
        // A private cgroup namespace (Kubernetes with cgroup v2): our
        // cgroup is the namespace's root, so find it by id in the host's
        // hierarchy, mounted into the container somewhere.
        return self_parent_by_id();
    }
    let parent = Path::new(own.trim()).parent().with_context(|| {
        format!("--cgroup self-parent: this process is in the root cgroup ({own}), which has no parent; pass --cgroup PATH")
    })?;
    let path = mount.join(parent.strip_prefix("/").unwrap_or(parent));
    if !path.is_dir() {
        bail!(
            "--cgroup self-parent resolved to {}, which is not visible here: mount the host's cgroup2 hierarchy into this container",
            path.display()
        );
    }
    from_path(&mount, &path)
}

/// `self-parent` from a private cgroup namespace: this process's cgroup is
/// found in another cgroup2 mount (the host's hierarchy, mounted into the
/// container), by its id when the namespace's own cgroup2 mount gives it,
/// else as the cgroup whose `cgroup.procs` lists this process; the parent
/// of that is the pod cgroup.
fn self_parent_by_id() -> Result<Cgroup> {
    let mounts = cgroup2_mounts()?;
    let own = mounts.iter().find(|m| namespace_root(m));
    let id = own.and_then(|m| fs::metadata(m).ok()).map(|m| m.ino());
    for mount in mounts.iter().filter(|m| Some(*m) != own) {
        let found = match id {
            Some(id) => find_cgroup(mount, 8, &|dir| {
                fs::metadata(dir).is_ok_and(|m| m.ino() == id)
            }),
            None => find_cgroup(mount, 8, &lists_self),
        };
        if let Some(found) = found {
            let parent = found
                .parent()
                .filter(|p| p.starts_with(mount) && *p != mount.as_path())
                .with_context(|| {
                    format!(
                        "--cgroup self-parent: {} has no parent cgroup",
                        found.display()
                    )
                })?;
            check_v2(parent)?;
            return from_path(mount, parent);
        }
    }
    bail!(
        "--cgroup self-parent: this process runs in a private cgroup namespace, and the host's \
         cgroup2 hierarchy is not mounted in it: mount it (e.g. a hostPath volume of /sys/fs/cgroup \
         at /host/sys/fs/cgroup), or run with the host's cgroup namespace"
    )
}

/// Whether the cgroup2 mount at `mount` is this process's cgroup namespace
/// root (its mountinfo root is "/" while /proc/self/cgroup says "/").
fn namespace_root(mount: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.get(3) == Some(&"/")
            && f.get(4).is_some_and(|p| Path::new(p) == mount)
            && line.contains(" - cgroup2 ")
    })
}

/// Whether the cgroup `dir` holds this process (its `cgroup.procs` lists
/// this process's PID, as this PID namespace numbers it).
fn lists_self(dir: &Path) -> bool {
    let pid = std::process::id().to_string();
    fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|procs| procs.lines().any(|p| p == pid))
}

/// The first cgroup under `dir` (at most `depth` levels down) that `is`.
fn find_cgroup(dir: &Path, depth: u32, is: &dyn Fn(&Path) -> bool) -> Option<PathBuf> {
    if is(dir) {
        return Some(dir.to_path_buf());
    }
    if depth == 0 {
        return None;
    }
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| find_cgroup(&e.path(), depth - 1, is))
}

fn from_path(mount: &Path, path: &Path) -> Result<Cgroup> {
    let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let relative = path
        .strip_prefix(mount)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Cgroup {
        path: path.to_path_buf(),
        relative,
        id: meta.ino(),
    })
}

fn check_v2(path: &Path) -> Result<()> {
    let magic = fs_magic(path)?;
    if magic == CGROUP2_SUPER_MAGIC {
        return Ok(());
    }
    let hint = match first_cgroup2_mount() {
        Ok(m) => format!("use a directory under {}", m.display()),
        Err(_) => "mount cgroup2 and use a directory under it".to_owned(),
    };
    if magic == CGROUP_SUPER_MAGIC {
        bail!(
            "{} is a cgroup v1 directory; eBPF capture needs cgroup v2: {hint}",
            path.display()
        );
    }
    bail!("{} is not a cgroup directory: {hint}", path.display())
}

/// The filesystem type (`f_type` of statfs) of `path`.
pub fn fs_magic(path: &Path) -> Result<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: valid NUL-terminated path and a buffer of the right type.
    if unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    // SAFETY: statfs succeeded and filled the buffer.
    Ok(unsafe { st.assume_init() }.f_type)
}

/// Whether `path` is a directory of a cgroup2 hierarchy.
pub fn is_cgroup2(path: &Path) -> bool {
    fs_magic(path).is_ok_and(|m| m == CGROUP2_SUPER_MAGIC)
}
