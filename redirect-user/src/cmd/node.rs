//! `redirect node install|uninstall|status`: the CNI plugin on a node. The
//! binary is copied into the CNI bin dir as `redirect-cni` (a copy, not a
//! link: run from a DaemonSet, the binary's own path is inside its
//! container and would not resolve on the host) and chained into the
//! runtime's network configuration ([`crate::cni::conflist`]); uninstall
//! unchains and removes it. Pods then get their capture from the plugin at
//! ADD, per pod. The shared per-node program set (node mode proper) is not
//! built yet.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{
    cli::{NodeAction, NodeDirs, NodeInstallArgs},
    cni::conflist::{self, PLUGIN_TYPE},
};

pub fn node(action: &NodeAction) -> Result<ExitCode> {
    match action {
        NodeAction::Install(args) => install(args),
        NodeAction::Uninstall(dirs) => uninstall(dirs),
        NodeAction::Status(dirs) => status(dirs),
    }
}

/// The plugin's entry in the conflist.
fn plugin_entry(args: &NodeInstallArgs) -> Value {
    let mut entry = json!({
        "type": PLUGIN_TYPE,
        "mode": args.mode,
        "exclude_namespaces": crate::capture::parse::split(&args.exclude_namespaces),
        "proxy": {"uid": args.proxy_uid, "gid": args.proxy_gid},
        "capabilities": {crate::cni::plugin::POD_ANNOTATIONS: true},
    });
    if let Some(root) = &args.pod_cgroup_root {
        entry["pod_cgroup_root"] = json!(root);
    }
    if let Some(kubeconfig) = &args.kubeconfig {
        entry["kubeconfig"] = json!(kubeconfig);
    }
    entry
}

fn check_dirs(dirs: &NodeDirs) -> Result<()> {
    for (flag, dir) in [
        ("--cni-bin-dir", &dirs.cni_bin_dir),
        ("--cni-conf-dir", &dirs.cni_conf_dir),
    ] {
        if !dir.is_dir() {
            bail!(
                "{flag} {} is not a directory: pass the runtime's CNI directory (containerd's `bin_dir` and `conf_dir`)",
                dir.display()
            );
        }
    }
    Ok(())
}

fn plugin_path(dirs: &NodeDirs) -> PathBuf {
    dirs.cni_bin_dir.join(PLUGIN_TYPE)
}

fn install(args: &NodeInstallArgs) -> Result<ExitCode> {
    let dirs = &args.dirs;
    check_dirs(dirs)?;
    for (flag, path) in [
        ("--pod-cgroup-root", &args.pod_cgroup_root),
        ("--kubeconfig", &args.kubeconfig),
    ] {
        if let Some(path) = path
            && !path.is_absolute()
        {
            bail!("{flag} {} is not an absolute path", path.display());
        }
    }
    let file = conflist::active_file(&dirs.cni_conf_dir)?;
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let conf = conflist::chained(&text, &plugin_entry(args))
        .with_context(|| format!("chaining redirect-cni into {}", file.display()))?;
    let plugin = plugin_path(dirs);
    let had_plugin = plugin.exists();
    copy_self(&plugin)?;
    // A single plugin's conf becomes a list: written as .conflist, and the
    // .conf removed, so that the runtime reads the list.
    let target = if file.extension().is_some_and(|e| e == "conflist") {
        file.clone()
    } else {
        file.with_extension("conflist")
    };
    let written = conflist::write(&target, &conf).and_then(|()| {
        if target != file {
            fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
        }
        Ok(())
    });
    if let Err(err) = written {
        if !had_plugin {
            let _ = fs::remove_file(&plugin);
        }
        return Err(err);
    }
    outln!(
        "redirect: node install: {} in place, chained into {} (pods get their capture from it at ADD, per pod)",
        plugin.display(),
        target.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Copies this binary to `to` atomically, executable.
fn copy_self(to: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("locating the redirect binary")?;
    let tmp = to.with_file_name(format!(".{PLUGIN_TYPE}.redirect-tmp"));
    fs::copy(&exe, &tmp)
        .with_context(|| format!("copying {} to {}", exe.display(), tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
    fs::rename(&tmp, to).with_context(|| {
        let _ = fs::remove_file(&tmp);
        format!("placing {}", to.display())
    })
}

/// The conf dir's files that list our plugin.
fn chained_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file() && fs::read_to_string(p).is_ok_and(|text| conflist::is_chained(&text))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn uninstall(dirs: &NodeDirs) -> Result<ExitCode> {
    check_dirs(dirs)?;
    let mut changed = Vec::new();
    for file in chained_files(&dirs.cni_conf_dir)? {
        let text = fs::read_to_string(&file)?;
        if let Some(conf) = conflist::unchained(&text)? {
            conflist::write(&file, &conf)?;
            changed.push(file.display().to_string());
        }
    }
    let plugin = plugin_path(dirs);
    let removed = match fs::remove_file(&plugin) {
        Ok(()) => true,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => false,
        Err(err) => return Err(err).with_context(|| format!("removing {}", plugin.display())),
    };
    if changed.is_empty() && !removed {
        outln!("redirect: node uninstall: redirect-cni is not installed here");
    } else {
        outln!(
            "redirect: node uninstall: {}{}",
            if removed {
                format!("removed {}", plugin.display())
            } else {
                "no plugin binary".to_owned()
            },
            if changed.is_empty() {
                String::new()
            } else {
                format!(", unchained from {}", changed.join(", "))
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether the plugin is in place and chained into the file the runtime
/// reads; exit 1 when only half of it is.
fn status(dirs: &NodeDirs) -> Result<ExitCode> {
    check_dirs(dirs)?;
    let plugin = plugin_path(dirs).is_file();
    let active = conflist::active_file(&dirs.cni_conf_dir).ok();
    let chained = active
        .as_ref()
        .and_then(|f| fs::read_to_string(f).ok())
        .is_some_and(|text| conflist::is_chained(&text));
    outln!(
        "plugin   {}",
        if plugin {
            format!("{} present", plugin_path(dirs).display())
        } else {
            "absent".to_owned()
        }
    );
    outln!(
        "chained  {}",
        match (&active, chained) {
            (Some(f), true) => format!("yes, into {}", f.display()),
            (Some(f), false) => format!("no ({} does not list it)", f.display()),
            (None, _) => "no (no network configuration)".to_owned(),
        }
    );
    Ok(if plugin == chained {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
