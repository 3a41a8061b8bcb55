//! The BPF filesystem, where installed instances are pinned.
//!
//! Layout: `/sys/fs/bpf/redirect/<instance>/` holds the instance's maps
//! (`RDR_*`, pinned by name), one pinned bpf_link per program
//! (`link_<hook>`) and the program it runs (`prog_<hook>`). An instance
//! directory appears whole: a fresh install
//! builds it as `@new-<instance>` and renames it into place last, and an
//! uninstall renames it to `@del-<instance>` first (`@` is never in an
//! instance name). Those staging
//! directories exist only while an install or uninstall holds the lock
//! ([`Lock`]); one found by the next holder was left by a run that was
//! killed, and is removed (see `loader::repair`).
//!
//! Nothing here removes a file it did not name: removal unlinks the pin
//! names redirect creates, inside a directory opened without following
//! links, and never recurses.

use std::{
    ffi::CString,
    fs::{self, File},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{cgroup::fs_magic, instance::InstanceName};

pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// The inode number of the initial PID namespace (fixed by the kernel).
const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;

/// Prefix of a fresh install's directory until it is complete.
pub const NEW_PREFIX: &str = "@new-";
/// Prefix of an instance's directory while it is being removed.
pub const DEL_PREFIX: &str = "@del-";
/// Prefix of a node set's directory.
pub const SET_PREFIX: &str = "@set-";

/// Directory that holds every instance.
pub fn root() -> PathBuf {
    Path::new(BPFFS).join("redirect")
}

/// Directory of one instance.
pub fn instance_dir(instance: &InstanceName) -> PathBuf {
    root().join(instance.as_str())
}

/// The staging directory `prefix` + `instance` (see the module docs).
pub fn staging_dir(prefix: &str, instance: &InstanceName) -> PathBuf {
    root().join(format!("{prefix}{instance}"))
}

/// Whether this process runs in a container, where a bpffs it mounts
/// would be its own: podman's marker file, Kubernetes' service variables
/// (set in every pod), or a PID namespace other than the host's (its
/// inode number is fixed). (`/.dockerenv` is not a sign: hosts built from
/// container images carry it.)
fn in_container() -> bool {
    Path::new("/run/.containerenv").exists()
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || !in_init_pid_namespace()
}

fn in_init_pid_namespace() -> bool {
    fs::metadata("/proc/self/ns/pid").is_ok_and(|m| m.ino() == PROC_PID_INIT_INO)
}

/// The inode number of the node's (initial) mount namespace, fixed by
/// kernels 6.18 and later; namespaces made later get numbers from
/// 0xF000_0000 up, so no other namespace ever has it.
const PROC_MNT_INIT_INO: u64 = 0xEFFF_FFF8;

/// Where this process stands relative to the node's mount namespace.
enum MountNs {
    /// In it.
    Node,
    /// In another one; the node's is seen through this process root
    /// (`/proc/<pid>/root` of a process in it).
    Private(PathBuf),
    /// Cannot tell (e.g. in a container, where no process of the node's
    /// mount namespace is visible).
    Unknown,
}

fn mnt_ino(pid: &str) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(|m| m.ino())
}

/// Finds the node's mount namespace: PID 1's where it can be read, else
/// (kernels 6.18 and later) any visible process whose mount namespace has
/// the initial namespace's fixed inode number.
fn mount_namespace() -> MountNs {
    let Some(own) = mnt_ino("self") else {
        return MountNs::Unknown;
    };
    if own == PROC_MNT_INIT_INO {
        return MountNs::Node;
    }
    if in_init_pid_namespace()
        && let Some(init) = mnt_ino("1")
    {
        return if init == own {
            MountNs::Node
        } else {
            MountNs::Private(PathBuf::from("/proc/1/root"))
        };
    }
    let Ok(procs) = fs::read_dir("/proc") else {
        return MountNs::Unknown;
    };
    procs
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .find(|pid| mnt_ino(pid) == Some(PROC_MNT_INIT_INO))
        .map_or(MountNs::Unknown, |pid| {
            MountNs::Private(PathBuf::from(format!("/proc/{pid}/root")))
        })
}

/// Makes sure the node's bpffs is mounted at /sys/fs/bpf, mounting it when
/// absent, so that pins outlive this process and its namespaces.
///
/// A bpffs that is not the node's takes the pins, and with them the
/// capture, away when its mount namespace goes: mounting one in a
/// container or in a private mount namespace is refused, and so is using
/// one mounted there (another superblock than the bpffs the node's mount
/// namespace has at /sys/fs/bpf, where a process of it can be seen).
pub fn ensure_mounted() -> Result<()> {
    let dir = Path::new(BPFFS);
    let mount_ns = mount_namespace();
    if dir.is_dir() && fs_magic(dir)? == BPF_FS_MAGIC {
        if let MountNs::Private(node_root) = &mount_ns {
            check_is_nodes(dir, node_root)?;
        }
        return Ok(());
    }
    if in_container() {
        bail!(
            "the host's bpffs is not mounted at {BPFFS} in this container: mount it \
             (a hostPath volume /sys/fs/bpf, or `-v /sys/fs/bpf:/sys/fs/bpf`); a bpffs mounted \
             here would take the capture with it when the container exits"
        );
    }
    if matches!(mount_ns, MountNs::Private(_)) {
        bail!(
            "bpffs is not mounted at {BPFFS} in this private mount namespace, and one mounted here \
             would vanish with it and take the capture along: mount the node's bpffs here \
             (`mount --bind /proc/1/root{BPFFS} {BPFFS}`) or run redirect in the node's mount namespace"
        );
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {BPFFS}"))?;
    let source = c"bpf";
    let target = c"/sys/fs/bpf";
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "bpffs is not mounted at {BPFFS} and mounting it failed ({err}): \
             run `mount -t bpf bpf {BPFFS}` (in a container, mount the host's {BPFFS})"
        );
    }
    Ok(())
}

/// Refuses a bpffs at `dir` that is another superblock than the one the
/// node's mount namespace (seen through `node_root`) has there: a private
/// bpffs mounted in this mount namespace.
fn check_is_nodes(dir: &Path, node_root: &Path) -> Result<()> {
    let ours = fs::metadata(dir).with_context(|| format!("reading {BPFFS}"))?;
    let node_dir = node_root.join(BPFFS.trim_start_matches('/'));
    let node_dev = fs::metadata(&node_dir)
        .ok()
        .filter(|_| fs_magic(&node_dir).is_ok_and(|m| m == BPF_FS_MAGIC))
        .map(|m| m.dev());
    if node_dev != Some(ours.dev()) {
        bail!(
            "the bpffs at {BPFFS} is not the node's (this process runs in a private mount namespace \
             with a bpffs of its own, whose pins would vanish with it): mount the node's bpffs here \
             (`mount --bind /proc/1/root{BPFFS} {BPFFS}`) or run redirect in the node's mount namespace"
        );
    }
    Ok(())
}

/// Whether bpffs is mounted (without mounting it).
pub fn is_mounted() -> bool {
    let dir = Path::new(BPFFS);
    dir.is_dir() && fs_magic(dir).is_ok_and(|m| m == BPF_FS_MAGIC)
}

/// What the instances' directory holds.
#[derive(Debug, Default)]
pub struct Listing {
    /// Complete instances (directories named by a valid instance name).
    pub instances: Vec<InstanceName>,
    /// Staging directories (`@new-*`, `@del-*`) of installs and uninstalls.
    pub staging: Vec<String>,
    /// Node sets (`@set-*`, see `ebpf::node_set`).
    pub sets: Vec<String>,
    /// Anything else: not redirect's, never touched.
    pub foreign: Vec<String>,
}

/// Lists the instances' directory.
pub fn list() -> Result<Listing> {
    let dir = root();
    let mut listing = Listing::default();
    if !dir.is_dir() {
        return Ok(listing);
    }
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && (name.starts_with(NEW_PREFIX) || name.starts_with(DEL_PREFIX)) {
            listing.staging.push(name);
        } else if is_dir && name.starts_with(SET_PREFIX) {
            listing.sets.push(name);
        } else if name.starts_with(crate::ebpf::probe_record::PIN_PREFIX) {
            // This boot's probe record: redirect's, no instance.
        } else if let (true, Ok(instance)) = (is_dir, InstanceName::parse(&name)) {
            listing.instances.push(instance);
        } else {
            listing.foreign.push(name);
        }
    }
    listing.instances.sort();
    listing.staging.sort();
    listing.foreign.sort();
    Ok(listing)
}

/// Names of the installed instances.
pub fn instances() -> Result<Vec<InstanceName>> {
    Ok(list()?.instances)
}

/// The lock that serialises installs, uninstalls and gc on this node (an
/// `flock` on the instances' directory; the kernel drops it with a killed
/// holder). Held until dropped.
pub struct Lock(#[allow(dead_code)] File);

/// How long one holder may keep the lock before a waiter gives up on it
/// (installs take milliseconds; a holder this slow is stuck or stopped),
/// unless `REDIRECT_LOCK_WAIT` gives other seconds.
const HOLDER_WAIT: Duration = Duration::from_secs(30);

/// [`HOLDER_WAIT`], or the seconds `REDIRECT_LOCK_WAIT` names.
fn holder_wait() -> Result<Duration> {
    match std::env::var_os("REDIRECT_LOCK_WAIT") {
        None => Ok(HOLDER_WAIT),
        Some(value) => value
            .to_str()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&secs| secs > 0)
            .map(Duration::from_secs)
            .with_context(|| {
                format!(
                    "REDIRECT_LOCK_WAIT={}: not a whole number of seconds above 0 (how long to wait for \
                     another redirect holding the lock): set it to one, or unset it for {} s",
                    value.to_string_lossy(),
                    HOLDER_WAIT.as_secs()
                )
            }),
    }
}

/// How long a command waits in all while the lock passes from one holder
/// to the next (a burst of pod starts: each ADD waits its turn).
const TOTAL_WAIT: Duration = Duration::from_secs(300);

impl Lock {
    /// Takes the lock for changing instances.
    pub fn exclusive() -> Result<Self> {
        Self::take(libc::LOCK_EX)
    }

    /// Takes the lock for reading instances (no install or uninstall runs
    /// while it is held, so every directory is seen whole); `None` when
    /// nothing was ever installed (reading creates nothing).
    pub fn shared() -> Result<Option<Self>> {
        if !root().exists() {
            return Ok(None);
        }
        Self::take(libc::LOCK_SH).map(Some)
    }

    fn take(how: libc::c_int) -> Result<Self> {
        let root = root();
        fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        if fs::symlink_metadata(&root).is_ok_and(|m| m.file_type().is_symlink()) {
            bail!(
                "{} is a symbolic link: remove it (redirect keeps its pins in a directory of its own)",
                root.display()
            );
        }
        let dir = File::open(&root).with_context(|| format!("opening {}", root.display()))?;
        let meta = dir
            .metadata()
            .with_context(|| format!("reading {}", root.display()))?;
        let holder_wait = holder_wait()?;
        let started = Instant::now();
        // The holders seen last, and since when: the wait on one holder
        // starts again whenever the lock changes hands.
        let mut holders = Vec::new();
        let mut held_since = started;
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(dir.as_raw_fd(), how | libc::LOCK_NB) } == 0 {
                return Ok(Self(dir));
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err).with_context(|| format!("locking {}", root.display()));
            }
            let now_holding = fs::read_to_string("/proc/locks")
                .map(|text| lock_holders(&text, meta.dev(), meta.ino()))
                .unwrap_or_default();
            if now_holding != holders {
                holders = now_holding;
                held_since = Instant::now();
            }
            if held_since.elapsed() > holder_wait {
                let who = match holders.as_slice() {
                    [] => "another redirect".to_owned(),
                    pids => format!(
                        "process {}",
                        pids.iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                bail!(
                    "{who} has held the lock on {} for over {} s (installing or removing \
                     instances): wait for it to finish, or stop it",
                    root.display(),
                    holder_wait.as_secs()
                );
            }
            if started.elapsed() > TOTAL_WAIT {
                bail!(
                    "waited over {} s for the lock on {} while other redirects installed or \
                     removed instances one after another: run again when they are done",
                    TOTAL_WAIT.as_secs(),
                    root.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The processes holding a `flock` on the file `dev`:`ino`, from the text
/// of `/proc/locks` (lines `N: FLOCK ADVISORY WRITE <pid> <maj>:<min>:<ino>
/// 0 EOF`, majors and minors in hex; waiters' lines carry `->` and are
/// skipped), sorted. A holder in a process namespace the reader cannot see
/// shows as pid 0 (or -1), and is left out.
fn lock_holders(text: &str, dev: u64, ino: u64) -> Vec<u32> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let mut pids: Vec<u32> = text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [_, "FLOCK", _, _, pid, file, ..] = fields.as_slice() else {
                return None;
            };
            let mut parts = file.split(':');
            let held = (
                parts.next().and_then(|p| u32::from_str_radix(p, 16).ok()),
                parts.next().and_then(|p| u32::from_str_radix(p, 16).ok()),
                parts.next().and_then(|p| p.parse::<u64>().ok()),
            );
            (held == (Some(major), Some(minor), Some(ino)))
                .then(|| pid.parse::<u32>().ok())
                .flatten()
                .filter(|&pid| pid != 0)
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Opens a directory without following a symbolic link at its last
/// component, relative to `parent` (or absolute with `None`).
fn open_dir(parent: Option<&OwnedFd>, path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let at = parent.map_or(libc::AT_FDCWD, |p| p.as_raw_fd());
    // SAFETY: a valid NUL-terminated path; the flags open a directory only.
    let fd = unsafe {
        libc::openat(
            at,
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("opening {} (not a directory, or a link)", path.display()));
    }
    // SAFETY: a descriptor we just opened and own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn unlink_at(dir: &OwnedFd, name: &str, flags: libc::c_int) -> std::io::Result<()> {
    let c = CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: a directory descriptor we own and a NUL-terminated name
    // without `/` (checked by the callers).
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Removes the directory `name` of the instances' directory: unlinks each
/// of `pins` in it (missing ones are fine), then the directory itself.
/// Neither the instances' directory nor `name` is followed if it is a
/// link, and anything in it that is not one of `pins` is left alone: the
/// directory then stays, and the error names what is in it.
pub fn remove_dir(name: &str, pins: &[String]) -> Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        bail!("refusing to remove '{name}': not a directory name");
    }
    let root_path = root();
    let root = open_dir(None, &root_path)?;
    let dir = open_dir(Some(&root), Path::new(name))?;
    for pin in pins {
        if pin.contains('/') {
            bail!("refusing to unlink '{pin}': not a file name");
        }
        match unlink_at(&dir, pin, 0) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(err).with_context(|| {
                    format!("unpinning {}", root_path.join(name).join(pin).display())
                });
            }
        }
    }
    match unlink_at(&root, name, libc::AT_REMOVEDIR) {
        Ok(()) => Ok(()),
        Err(err) if err.raw_os_error() == Some(libc::ENOTEMPTY) => {
            let path = root_path.join(name);
            let left: Vec<String> = fs::read_dir(&path)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            bail!(
                "{} holds files redirect did not create ({}): they were left alone; remove them by hand",
                path.display(),
                left.join(", ")
            )
        }
        Err(err) => {
            Err(err).with_context(|| format!("removing {}", root_path.join(name).display()))
        }
    }
}

/// Renames `from` to `to` inside the instances' directory (both plain
/// names): how an instance appears whole or goes at once.
pub fn rename(from: &str, to: &str) -> Result<()> {
    let root = root();
    fs::rename(root.join(from), root.join(to))
        .with_context(|| format!("renaming {from} to {to} in {}", root.display()))
}

#[cfg(test)]
mod tests {
    use super::lock_holders;

    const LOCKS: &str = "\
1: FLOCK  ADVISORY  WRITE 4242 00:1f:1 0 EOF
1: -> FLOCK  ADVISORY  WRITE 4343 00:1f:1 0 EOF
2: POSIX  ADVISORY  WRITE 77 00:1f:1 0 EOF
3: FLOCK  ADVISORY  READ 12 00:1f:1 0 EOF
4: FLOCK  ADVISORY  READ 11 00:1f:1 0 EOF
5: FLOCK  ADVISORY  WRITE 99 08:01:1 0 EOF
6: FLOCK  ADVISORY  WRITE 98 00:1f:10 0 EOF
7: FLOCK  ADVISORY  WRITE 0 00:1f:1 0 EOF
8: OFDLCK ADVISORY  WRITE -1 00:1f:1 0 EOF
";

    #[test]
    fn holders_are_the_flock_owners_of_that_file_only() {
        let dev = libc::makedev(0, 0x1f);
        assert_eq!(lock_holders(LOCKS, dev, 1), vec![11, 12, 4242]);
        assert_eq!(lock_holders(LOCKS, dev, 10), vec![98]);
        assert_eq!(lock_holders(LOCKS, libc::makedev(8, 1), 1), vec![99]);
        assert!(lock_holders(LOCKS, dev, 2).is_empty());
        assert!(lock_holders("", dev, 1).is_empty());
        assert!(lock_holders("garbage\n1: FLOCK\n", dev, 1).is_empty());
    }
}
