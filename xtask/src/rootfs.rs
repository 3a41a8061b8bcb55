//! Building root trees from the host's files: the VM's initramfs and the
//! init-container image are both made this way, from local files only.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// iptables commands, as the Debian package names them.
pub const XTABLES_LINKS: &[(&str, &str)] = &[
    ("iptables", "xtables-nft-multi"),
    ("iptables-save", "xtables-nft-multi"),
    ("iptables-restore", "xtables-nft-multi"),
    ("ip6tables", "xtables-nft-multi"),
    ("ip6tables-save", "xtables-nft-multi"),
    ("ip6tables-restore", "xtables-nft-multi"),
    ("iptables-nft", "xtables-nft-multi"),
    ("iptables-nft-save", "xtables-nft-multi"),
    ("iptables-nft-restore", "xtables-nft-multi"),
    ("ip6tables-nft", "xtables-nft-multi"),
    ("ip6tables-nft-save", "xtables-nft-multi"),
    ("ip6tables-nft-restore", "xtables-nft-multi"),
    ("iptables-legacy", "xtables-legacy-multi"),
    ("iptables-legacy-save", "xtables-legacy-multi"),
    ("iptables-legacy-restore", "xtables-legacy-multi"),
    ("ip6tables-legacy", "xtables-legacy-multi"),
    ("ip6tables-legacy-save", "xtables-legacy-multi"),
    ("ip6tables-legacy-restore", "xtables-legacy-multi"),
];

/// Merged /usr, as on the host: the libraries' recorded paths resolve
/// (`root/lib` and `root/lib64` point into `root/usr`).
pub fn merged_usr(root: &Path) -> Result<()> {
    fs::create_dir_all(root.join("usr/lib"))?;
    fs::create_dir_all(root.join("usr/lib64"))?;
    std::os::unix::fs::symlink("usr/lib", root.join("lib"))?;
    std::os::unix::fs::symlink("usr/lib64", root.join("lib64"))?;
    Ok(())
}

pub fn copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Copies an executable without its debug information (the binaries are
/// debug builds: this makes the initramfs several times smaller).
pub fn strip_into(from: &Path, to: &Path) -> Result<()> {
    copy(from, to)?;
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg(to)
        .status()?;
    if !status.success() {
        bail!("strip --strip-debug {} failed", to.display());
    }
    Ok(())
}

/// Copies a host file to the same path under `root` (symlinks dereferenced).
pub fn copy_host(root: &Path, path: &Path) -> Result<()> {
    copy(path, &root.join(path.strip_prefix("/").unwrap_or(path)))
}

pub fn copy_tree(root: &Path, dir: &Path, elves: &mut BTreeSet<PathBuf>) -> Result<()> {
    if !dir.exists() {
        bail!(
            "{} is missing on the host (is its package installed?)",
            dir.display()
        );
    }
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let meta = fs::metadata(&path)?; // follows symlinks
        if meta.is_dir() {
            copy_tree(root, &path, elves)?;
        } else {
            copy_host(root, &path)?;
            if is_elf(&path) {
                elves.insert(path);
            }
        }
    }
    Ok(())
}

pub fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// Copies every shared library the given ELF files need (per `ldd`, run on
/// the host copies), at the paths the dynamic loader finds them.
pub fn add_libraries(root: &Path, elves: &BTreeSet<PathBuf>) -> Result<()> {
    let mut libraries = BTreeSet::new();
    for elf in elves {
        let host = root.join(elf.strip_prefix("/").unwrap_or(elf));
        let out = Command::new("ldd").arg(&host).output()?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = line
                .split("=>")
                .nth(1)
                .unwrap_or(line)
                .split_whitespace()
                .next()
                .unwrap_or_default();
            if path.starts_with('/') {
                libraries.insert(PathBuf::from(path));
            }
        }
    }
    for lib in libraries {
        copy_host(root, &lib)?;
    }
    Ok(())
}
