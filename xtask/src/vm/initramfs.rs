//! The initramfs each kernel boots: busybox-static, the `redirect` binary,
//! the end-to-end test binaries, the host tools the tests drive (iproute2,
//! iptables, nft, squid, curl) with their shared libraries and data, the
//! kernel's modules, and an `/init` that runs the suite and powers off.

use std::{
    collections::BTreeSet,
    fs,
    io::Write as _,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use super::kernels::Kernel;
use crate::rootfs::{
    XTABLES_LINKS, add_libraries, copy, copy_host, copy_tree, merged_usr, strip_into,
};

/// What the VM runs.
pub struct Payload {
    pub redirect: PathBuf,
    /// Istio's conformance data, when present: each directory (its files
    /// copied to `/<name>` in the VM) and the variable that points a test
    /// there: `../shared/conformance/istio` and `.../istio-nftables`.
    pub conformance: Vec<(PathBuf, &'static str, &'static str)>,
    /// (name, executable) of each end-to-end test binary.
    pub tests: Vec<(String, PathBuf)>,
}

/// Host programs the tests run, copied with their libraries.
const HOST_PROGRAMS: &[&str] = &[
    "/usr/sbin/ip",
    "/usr/sbin/xtables-nft-multi",
    "/usr/sbin/xtables-legacy-multi",
    // native nftables mode (`--native-nftables`)
    "/usr/sbin/nft",
    "/usr/sbin/squid",
    "/usr/bin/curl",
    // util-linux's: busybox's setpriv has no --bounding-set
    "/usr/bin/setpriv",
];

/// Data the host programs read at run time (plugins are ELF files too).
const HOST_DATA: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/xtables",
    "/usr/share/squid",
    "/usr/share/squid-langpack",
    "/etc/squid",
    "/usr/lib/squid",
];

/// Marker lines `/init` prints around each test binary's output.
pub const BEGIN: &str = "VMTEST begin ";
pub const END: &str = "VMTEST end ";
pub const DONE: &str = "VMTEST done";

/// Assembles the root tree under `work` and writes `work/initramfs.cpio`.
pub fn build(kernel: &Kernel, payload: &Payload, work: &Path) -> Result<PathBuf> {
    let root = work.join("root");
    let _ = fs::remove_dir_all(&root);
    for dir in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "tests",
        "modules",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    merged_usr(&root)?;

    let mut elves = BTreeSet::new();
    copy(Path::new("/bin/busybox"), &root.join("bin/busybox"))?;
    strip_into(&payload.redirect, &root.join("usr/bin/redirect"))?;
    elves.insert(PathBuf::from("/usr/bin/redirect"));
    for (name, exe) in &payload.tests {
        strip_into(exe, &root.join("tests").join(name))?;
        elves.insert(Path::new("/tests").join(name));
    }
    for program in HOST_PROGRAMS {
        copy_host(&root, Path::new(program))?;
        elves.insert(PathBuf::from(program));
    }
    for data in HOST_DATA {
        copy_tree(&root, Path::new(data), &mut elves)?;
    }
    for (link, target) in XTABLES_LINKS {
        std::os::unix::fs::symlink(target, root.join("usr/sbin").join(link))?;
    }
    // Istio's golden files, for the conformance and iptables-mode tests.
    for (dir, name, _) in &payload.conformance {
        let dest = root.join(name);
        fs::create_dir_all(&dest)?;
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_file() {
                copy(&path, &dest.join(path.file_name().context("file name")?))?;
            }
        }
    }
    add_libraries(&root, &elves)?;

    let mut names = String::new();
    for module in &kernel.modules {
        let file = module.file_name().context("module without a name")?;
        copy(module, &root.join("modules").join(file))?;
        names.push_str(&file.to_string_lossy());
        names.push('\n');
    }
    fs::write(root.join("modules/load"), names)?;
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/tmp:/bin/sh\nproxy:x:1337:1337::/tmp:/bin/sh\n",
    )?;
    fs::write(
        root.join("etc/group"),
        "root:x:0:\napp:x:1000:\nproxy:x:1337:\n",
    )?;
    fs::write(root.join("etc/hosts"), "127.0.0.1 localhost\n")?;
    let tests: Vec<&str> = payload.tests.iter().map(|(n, _)| n.as_str()).collect();
    fs::write(root.join("init"), init_script(&tests, &payload.conformance))?;
    fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755))?;

    let archive = work.join("initramfs.cpio");
    let mut out = std::io::BufWriter::new(fs::File::create(&archive)?);
    cpio::write(&root, &mut out)?;
    out.flush()?;
    Ok(archive)
}

fn init_script(tests: &[&str], conformance: &[(PathBuf, &str, &str)]) -> String {
    let mut script = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         # real tools (iproute2, iptables) before busybox's applets\n\
         export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root REDIRECT_BIN=/usr/bin/redirect\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         mkdir -p /dev/shm /dev/pts\n\
         mount -t tmpfs shm /dev/shm\n\
         mount -t tmpfs tmp /tmp\n\
         mount -t tmpfs run /run\n\
         mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         ip link set lo up\n\
         echo \"VMTEST kernel $(uname -r)\"\n\
         for m in $(cat /modules/load); do insmod /modules/$m 2>/dev/null || echo \"VMTEST module-failed $m\"; done\n",
    );
    for (_, name, env) in conformance {
        script.push_str(&format!("export {env}=/{name}\n"));
    }
    for test in tests {
        script.push_str(&format!(
            "echo \"{BEGIN}{test}\"\n\
             /tests/{test} --test-threads=2 --show-output 2>&1\n\
             rc=$?\n\
             [ $rc = 0 ] || dmesg | tail -n 40 | sed 's/^/VMTEST dmesg /'\n\
             echo \"{END}{test} $rc\"\n"
        ));
    }
    script.push_str(&format!("echo \"{DONE}\"\npoweroff -f\n"));
    script
}

/// A minimal writer of the "newc" cpio format the kernel unpacks.
mod cpio {
    use super::*;

    pub(super) fn write(root: &Path, out: &mut impl std::io::Write) -> Result<()> {
        let mut ino = 1;
        entry(out, &mut ino, ".", 0o040_755, &[])?;
        // The kernel opens /dev/console for /init before anything is mounted.
        device(out, &mut ino, "dev/console", 0o020_600, 5, 1)?;
        device(out, &mut ino, "dev/null", 0o020_666, 1, 3)?;
        walk(root, root, out, &mut ino)?;
        entry(out, &mut ino, "TRAILER!!!", 0, &[])
    }

    fn walk(root: &Path, dir: &Path, out: &mut impl std::io::Write, ino: &mut u32) -> Result<()> {
        let mut entries: Vec<_> = fs::read_dir(dir)?.flatten().map(|e| e.path()).collect();
        entries.sort();
        for path in entries {
            let name = path.strip_prefix(root)?.to_string_lossy().into_owned();
            let meta = fs::symlink_metadata(&path)?;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&path)?;
                entry(
                    out,
                    ino,
                    &name,
                    0o120_777,
                    target.to_string_lossy().as_bytes(),
                )?;
            } else if meta.is_dir() {
                entry(out, ino, &name, 0o040_000 | (meta.mode() & 0o7777), &[])?;
                walk(root, &path, out, ino)?;
            } else {
                let data = fs::read(&path)?;
                entry(out, ino, &name, 0o100_000 | (meta.mode() & 0o7777), &data)?;
            }
        }
        Ok(())
    }

    fn device(
        out: &mut impl std::io::Write,
        ino: &mut u32,
        name: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<()> {
        header(out, ino, name, mode, 0, (major, minor))?;
        Ok(())
    }

    fn entry(
        out: &mut impl std::io::Write,
        ino: &mut u32,
        name: &str,
        mode: u32,
        data: &[u8],
    ) -> Result<()> {
        header(out, ino, name, mode, data.len(), (0, 0))?;
        out.write_all(data)?;
        pad(out, data.len())
    }

    fn header(
        out: &mut impl std::io::Write,
        ino: &mut u32,
        name: &str,
        mode: u32,
        size: usize,
        rdev: (u32, u32),
    ) -> Result<()> {
        let namesize = name.len() + 1;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        write!(
            out,
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            *ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0
        )?;
        *ino += 1;
        out.write_all(name.as_bytes())?;
        out.write_all(&[0])?;
        pad(out, 110 + namesize)
    }

    fn pad(out: &mut impl std::io::Write, len: usize) -> Result<()> {
        let rem = (4 - len % 4) % 4;
        out.write_all(&[0u8; 3][..rem])?;
        Ok(())
    }
}
