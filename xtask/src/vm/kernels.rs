//! Debian kernels for the matrix: resolved and downloaded with apt through a
//! private configuration under `target/vm-test/apt/` (nothing is installed
//! on the host), extracted, and reduced to a `vmlinuz` plus the modules the
//! tests need, in load order.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};

use crate::sysdeps::{command_output, run_checked};

/// One kernel of the matrix and where Debian publishes it.
#[derive(Clone, Copy, Debug)]
pub struct KernelSpec {
    /// Name used on the command line and in the matrix.
    pub name: &'static str,
    /// The archive (`debian` or `debian-security`), suite and component
    /// that carry it; the archive's address is the host's own Debian
    /// mirror (see [`archive_uri`]).
    pub source: (&'static str, &'static str, &'static str),
    /// Image package names start with this and end with `-cloud-amd64-unsigned`
    /// (or, for sid's split packages, `-cloud-amd64`).
    pub prefix: &'static str,
    /// Sid ships the image as `linux-binary-unsigned-*` plus `linux-modules-*`.
    pub split: bool,
}

/// The default matrix.
pub const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        name: "5.10",
        source: ("debian", "bullseye", "main"),
        prefix: "linux-image-5.10.0-",
        split: false,
    },
    KernelSpec {
        name: "6.1",
        source: ("debian-security", "bookworm-security", "main"),
        prefix: "linux-image-6.1.0-",
        split: false,
    },
    KernelSpec {
        name: "6.12",
        source: ("debian", "trixie", "main"),
        prefix: "linux-image-6.12.",
        split: false,
    },
    KernelSpec {
        name: "sid",
        source: ("debian", "sid", "main"),
        prefix: "linux-binary-unsigned-",
        split: true,
    },
];

/// Modules the tests load, by name; their dependencies are added. Any of
/// them built into the kernel is simply not needed.
const WANTED_MODULES: &[&str] = &[
    "veth",
    // iptables-nft REDIRECT with an owner match (the squid comparison)
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_counter", // a module before 6.x; iptables-nft counts every rule
    "nft_redir",
    "xt_REDIRECT",
    "xt_owner",
    "xt_tcpudp",
    // iptables-legacy (the large-getsockopt test) and conntrack's SO_ORIGINAL_DST
    "ip_tables",
    "iptable_filter",
    "iptable_nat",
    "nf_conntrack",
    "nf_nat",
    // the rest of istio-iptables' rules (iptables mode): mangle/raw tables,
    // TPROXY, conntrack zones, marks, multiport, IPv6
    "iptable_mangle",
    "iptable_raw",
    "ip6_tables",
    "ip6table_nat",
    "ip6table_mangle",
    "ip6table_raw",
    "xt_TPROXY",
    "xt_CT",
    "xt_conntrack",
    "xt_mark",
    "xt_connmark",
    "xt_multiport",
    "xt_MARK",
    "xt_CONNMARK",
    // the legacy profile's table names its rules (`-m comment`)
    "xt_comment",
    // sock_diag for TCP: how the loader finds a proxy already listening
    // (a node's modprobe loads them on first use; the VM has none)
    "inet_diag",
    "tcp_diag",
    // Istio's native nftables rules: ct state/mark/zone, TPROXY, socket
    "nft_ct",
    "nft_tproxy",
    "nft_socket",
];

/// A kernel ready to boot.
pub struct Kernel {
    /// Full version, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// Modules in load order (dependencies first), decompressed.
    pub modules: Vec<PathBuf>,
}

/// The address of Debian archive `archive` (`debian`, `debian-security`)
/// as the host's apt sources name it: the project names no mirror of its
/// own, it uses the one this machine is configured with.
fn archive_uri(archive: &str) -> Result<String> {
    let mut texts = Vec::new();
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        texts.push(text);
    }
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        for entry in entries.flatten() {
            let path = entry.path();
            let name = path.to_string_lossy();
            if (name.ends_with(".sources") || name.ends_with(".list"))
                && let Ok(text) = fs::read_to_string(&path)
            {
                texts.push(text);
            }
        }
    }
    let uris: Vec<String> = texts.iter().flat_map(|t| source_uris(t)).collect();
    let found = |suffix: &str| {
        uris.iter()
            .find(|u| u.trim_end_matches('/').ends_with(suffix))
            .cloned()
    };
    found(&format!("/{archive}"))
        .or_else(|| {
            // No security archive listed: it sits beside the main one.
            let main = found("/debian")?;
            (archive == "debian-security")
                .then(|| format!("{}-security", main.trim_end_matches('/')))
        })
        .with_context(|| {
            format!(
                "the host's apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d/) name no \
                 Debian archive '{archive}': add the Debian mirror this machine uses"
            )
        })
}

/// The archive URIs of an apt sources file, one-line (`deb URI suite ...`)
/// or deb822 (`URIs: ...`) format.
fn source_uris(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .flat_map(|line| {
            if let Some(uris) = line.strip_prefix("URIs:") {
                return uris.split_whitespace().map(str::to_owned).collect();
            }
            let mut words = line.split_whitespace();
            if words.next() != Some("deb") {
                return Vec::new();
            }
            // Skip `[options]`.
            words
                .find(|w| !w.starts_with('[') && !w.ends_with(']'))
                .map(str::to_owned)
                .into_iter()
                .collect()
        })
        .collect()
}

/// A private apt configuration: its own sources list, lists and cache.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(root: &Path, spec: &KernelSpec) -> Result<Self> {
        let dir = root.join("apt").join(spec.name);
        fs::create_dir_all(dir.join("lists/partial"))?;
        fs::create_dir_all(dir.join("archives/partial"))?;
        let (archive, suite, component) = spec.source;
        fs::write(
            dir.join("sources.list"),
            format!(
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {} {suite} {component}\n",
                archive_uri(archive)?
            ),
        )?;
        Ok(Self { dir })
    }

    fn command(&self, program: &str) -> Command {
        let d = self.dir.display();
        let mut cmd = Command::new(program);
        for opt in [
            format!("Dir::Etc::SourceList={d}/sources.list"),
            "Dir::Etc::SourceParts=/dev/null".to_owned(),
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::Cache::Archives={d}/archives"),
            "Dir::Cache::pkgcache=".to_owned(),
            "Dir::Cache::srcpkgcache=".to_owned(),
            "Debug::NoLocking=1".to_owned(),
            "APT::Sandbox::User=root".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".to_owned(),
        ] {
            cmd.arg("-o").arg(opt);
        }
        cmd
    }

    /// Refreshes the package lists unless they are less than a day old.
    fn update(&self) -> Result<()> {
        let stamp = self.dir.join("updated");
        let fresh = fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < Duration::from_secs(24 * 3600));
        if fresh {
            return Ok(());
        }
        let mut cmd = self.command("apt-get");
        cmd.args(["-q", "update"]);
        let out = cmd.output().context("running apt-get update")?;
        if !out.status.success() {
            bail!(
                "apt-get update failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        fs::write(&stamp, "")?;
        Ok(())
    }

    fn package_names(&self, prefix: &str) -> Result<Vec<String>> {
        let mut cmd = self.command("apt-cache");
        cmd.args(["pkgnames", prefix]);
        Ok(command_output(&mut cmd)?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// Downloads a package into `dest` (cached: skipped when present).
    fn download(&self, package: &str, dest: &Path) -> Result<PathBuf> {
        fs::create_dir_all(dest)?;
        if let Some(found) = cached(dest, package) {
            return Ok(found);
        }
        eprintln!("xtask: downloading {package}");
        let mut cmd = self.command("apt-get");
        cmd.current_dir(dest).args(["-q", "download", package]);
        run_checked(&mut cmd)?;
        cached(dest, package).with_context(|| format!("{package} was not downloaded"))
    }
}

fn cached(dir: &Path, package: &str) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
}

/// Compares version-like strings by their numbers (5.10.0-32 > 5.10.0-4).
fn version_key(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The newest image package of the suite: (package, release).
fn newest(apt: &Apt, spec: &KernelSpec) -> Result<(String, String)> {
    let suffix = if spec.split {
        "-cloud-amd64"
    } else {
        "-cloud-amd64-unsigned"
    };
    let mut names: Vec<String> = apt
        .package_names(spec.prefix)?
        .into_iter()
        .filter(|n| n.ends_with(suffix))
        .filter(|n| {
            // trixie also carries bookworm's backported 6.12 (+deb12): keep the suite's own.
            spec.name != "6.12" || n.contains("+deb13")
        })
        .collect();
    names.sort_by_key(|n| version_key(n));
    let package = names.pop().with_context(|| {
        format!(
            "no {}*{suffix} package in {} {}",
            spec.prefix, spec.source.0, spec.source.1
        )
    })?;
    let release = release_of(spec, &package);
    Ok((package, release))
}

/// The kernel release a package carries (`linux-image-6.1.0-56-cloud-amd64-unsigned`
/// -> `6.1.0-56-cloud-amd64`).
fn release_of(spec: &KernelSpec, package: &str) -> String {
    let prefix = if spec.split {
        "linux-binary-unsigned-"
    } else {
        "linux-image-"
    };
    package
        .strip_prefix(prefix)
        .unwrap_or(package)
        .trim_end_matches("-unsigned")
        .to_owned()
}

/// Resolves, downloads and extracts one kernel under `root`.
pub fn prepare(root: &Path, spec: &KernelSpec) -> Result<Kernel> {
    let apt = Apt::new(root, spec)?;
    let cache = root.join("cache");
    let (package, release) = match apt.update().and_then(|()| newest(&apt, spec)) {
        Ok(found) => found,
        Err(err) => offline_choice(&cache, spec)
            .with_context(|| format!("resolving kernel {}: {err:#}", spec.name))?,
    };
    let mut debs = vec![apt.download(&package, &cache)?];
    if spec.split {
        debs.push(apt.download(&format!("linux-modules-{release}"), &cache)?);
    }
    let tree = root.join("kernels").join(&release);
    if !tree.join(".extracted").exists() {
        let _ = fs::remove_dir_all(&tree);
        fs::create_dir_all(&tree)?;
        for deb in &debs {
            run_checked(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tree))?;
        }
        fs::write(tree.join(".extracted"), "")?;
    }
    let modules_dir = ["usr/lib/modules", "lib/modules"]
        .iter()
        .map(|d| tree.join(d).join(&release))
        .find(|d| d.is_dir())
        .with_context(|| format!("no modules directory for {release}"))?;
    let vmlinuz = [
        tree.join("boot").join(format!("vmlinuz-{release}")),
        modules_dir.join("vmlinuz.unsigned"),
        modules_dir.join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .with_context(|| format!("no vmlinuz in the {release} packages"))?;
    let modules = module_closure(&modules_dir, &root.join("modules").join(&release))?;
    Ok(Kernel {
        release,
        vmlinuz,
        modules,
    })
}

/// Without network, the newest cached download of this kernel.
fn offline_choice(cache: &Path, spec: &KernelSpec) -> Result<(String, String)> {
    let mut names: Vec<String> = fs::read_dir(cache)?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.starts_with(spec.prefix) && n.ends_with(".deb"))
        .filter_map(|n| n.split('_').next().map(str::to_owned))
        .collect();
    names.sort_by_key(|n| version_key(n));
    let package = names.pop().context("no cached download either")?;
    let release = release_of(spec, &package);
    Ok((package, release))
}

/// Finds the wanted modules and their dependencies, decompresses them into
/// `out`, and returns them dependencies-first.
fn module_closure(modules_dir: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let mut index: BTreeMap<String, PathBuf> = BTreeMap::new();
    index_modules(&modules_dir.join("kernel"), &mut index)?;
    let builtin: HashSet<String> = fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .map(|f| normalise(f.trim_end_matches(".ko")))
        .collect();
    fs::create_dir_all(out)?;
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for name in WANTED_MODULES {
        visit(
            &normalise(name),
            &index,
            &builtin,
            out,
            &mut seen,
            &mut order,
        )?;
    }
    Ok(order)
}

fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(name) = path.file_name().and_then(|n| n.to_str())
            && let Some(stem) = [".ko.xz", ".ko.zst", ".ko"]
                .iter()
                .find_map(|ext| name.strip_suffix(ext))
        {
            index.insert(normalise(stem), path.clone());
        }
    }
    Ok(())
}

fn visit(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    builtin: &HashSet<String>,
    out: &Path,
    seen: &mut HashSet<String>,
    order: &mut Vec<PathBuf>,
) -> Result<()> {
    if !seen.insert(name.to_owned()) || builtin.contains(name) {
        return Ok(());
    }
    let Some(source) = index.get(name) else {
        // Neither a module nor listed as built in: the kernel may still
        // have it built in under another name; the tests will tell.
        return Ok(());
    };
    let bytes = decompress(source)?;
    for dep in depends(&bytes) {
        visit(&normalise(&dep), index, builtin, out, seen, order)?;
    }
    let dest = out.join(format!("{name}.ko"));
    fs::write(&dest, &bytes)?;
    order.push(dest);
    Ok(())
}

fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    match tool {
        None => fs::read(path).with_context(|| format!("reading {name}")),
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("running {tool} -dc {name}"))?;
            if !out.status.success() {
                bail!("{tool} -dc {name} failed");
            }
            Ok(out.stdout)
        }
    }
}

/// The `depends=` entry of a module's `.modinfo` strings.
fn depends(module: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    module
        .windows(key.len())
        .position(|w| w == key)
        .map(|at| {
            let rest = &module[at + key.len()..];
            let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn apt_sources_in_both_formats_name_their_archives() {
        let deb822 =
            "Types: deb\n# comment\nURIs: http://mirror.example/debian\nSuites: bookworm\n";
        assert_eq!(source_uris(deb822), ["http://mirror.example/debian"]);
        let one_line = "deb [signed-by=/k.gpg] http://m.example/debian-security bookworm-security main\n# deb http://x/debian sid main\n";
        assert_eq!(source_uris(one_line), ["http://m.example/debian-security"]);
    }

    use super::*;

    #[test]
    fn versions_compare_by_number() {
        let mut v = [
            "linux-image-5.10.0-4-cloud-amd64-unsigned",
            "linux-image-5.10.0-32-cloud-amd64-unsigned",
            "linux-image-5.10.0-30-cloud-amd64-unsigned",
        ];
        v.sort_by_key(|n| version_key(n));
        assert_eq!(v[2], "linux-image-5.10.0-32-cloud-amd64-unsigned");
    }

    #[test]
    fn modinfo_depends_are_read() {
        let blob = b"\x7fELF...\0license=GPL\0depends=nf_conntrack,nf_defrag_ipv4\0vermagic=6.1\0";
        assert_eq!(depends(blob), vec!["nf_conntrack", "nf_defrag_ipv4"]);
        assert!(depends(b"\0depends=\0").is_empty());
    }
}
