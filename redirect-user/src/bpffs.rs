//! The BPF filesystem, where installed instances are pinned.
//!
//! Layout: `/sys/fs/bpf/redirect/<instance>/` holds the instance's maps
//! (`RDR_*`, pinned by name) and one pinned bpf_link per program
//! (`link_<hook>`).

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::cgroup::fs_magic;

pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Directory that holds every instance.
pub fn root() -> PathBuf {
    Path::new(BPFFS).join("redirect")
}

/// Directory of one instance.
pub fn instance_dir(instance: &str) -> PathBuf {
    root().join(instance)
}

/// Whether this process runs in a container, where a bpffs it mounts
/// would be its own: podman's marker file, Kubernetes' service variables
/// (set in every pod), or a PID namespace other than the host's (its
/// inode number is fixed). (`/.dockerenv` is not a sign: hosts built from
/// container images carry it.)
fn in_container() -> bool {
    const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
    let pid_ns = fs::metadata("/proc/self/ns/pid").map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    Path::new("/run/.containerenv").exists()
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || pid_ns.is_ok_and(|ino| ino != PROC_PID_INIT_INO)
}

/// Makes sure bpffs is mounted at /sys/fs/bpf, mounting it when absent.
///
/// Not in a container: a bpffs mounted there lives in the container's
/// mount namespace, so the pins, and with them the capture, would vanish
/// when the init container exits. The host's /sys/fs/bpf must be mounted
/// into it instead, which the error says.
pub fn ensure_mounted() -> Result<()> {
    let dir = Path::new(BPFFS);
    if dir.is_dir() && fs_magic(dir)? == BPF_FS_MAGIC {
        return Ok(());
    }
    if in_container() {
        bail!(
            "the host's bpffs is not mounted at {BPFFS} in this container: mount it \
             (a hostPath volume /sys/fs/bpf, or `-v /sys/fs/bpf:/sys/fs/bpf`); a bpffs mounted \
             here would take the capture with it when the container exits"
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

/// Whether bpffs is mounted (without mounting it).
pub fn is_mounted() -> bool {
    let dir = Path::new(BPFFS);
    dir.is_dir() && fs_magic(dir).is_ok_and(|m| m == BPF_FS_MAGIC)
}

/// Names of the installed instances.
pub fn instances() -> Result<Vec<String>> {
    let dir = root();
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut names = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}
