//! `redirect node install|uninstall|status`: the CNI plugin on a node. The
//! binary is copied into the CNI bin dir as `redirect-cni` (a copy, not a
//! link: run from a DaemonSet, the binary's own path is inside its
//! container and would not resolve on the host) and chained into the
//! runtime's network configuration ([`crate::cni::conflist`]); uninstall
//! unchains and removes it. Pods then get their capture from the plugin at
//! ADD: per pod, or with `--node-set` as entries of one program set
//! for the node ([`crate::ebpf::node_set`]), which install loads (and
//! unloads again if the install fails after it loaded it). Uninstall
//! leaves a loaded set (its pods keep their capture): `redirect node-set
//! unload` removes it.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{
    cli::{NodeAction, NodeDirs, NodeInstallArgs, NodeRunArgs},
    cni::{
        conflist::{self, PLUGIN_TYPE},
        kubeconfig,
    },
    ebpf::node_set::Loaded,
    instance::InstanceName,
};

pub fn node(action: &NodeAction) -> Result<ExitCode> {
    match action {
        NodeAction::Install(args) => install(args),
        NodeAction::Uninstall(dirs) => uninstall(dirs),
        NodeAction::Status(dirs) => status(dirs),
        NodeAction::Run(args) => run(args),
    }
}

/// The plugin's entry in the conflist; `kubeconfig`: the one written
/// from the service account, as the host names it.
fn plugin_entry(
    args: &NodeInstallArgs,
    kubeconfig: Option<&Path>,
    node_set: Option<&InstanceName>,
) -> Value {
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
    if let Some(set) = node_set {
        entry["node_set"] = json!(set.as_str());
    }
    if let Some(kubeconfig) = args.kubeconfig.as_deref().or(kubeconfig) {
        entry["kubeconfig"] = json!(kubeconfig);
    }
    if let Some(log) = &args.cni_log_file {
        entry["log_file"] = json!(log);
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
        ("--cni-log-file", &args.cni_log_file),
        ("--host-cni-conf-dir", &args.host_cni_conf_dir),
    ] {
        if let Some(path) = path
            && !path.is_absolute()
        {
            bail!("{flag} {} is not an absolute path", path.display());
        }
    }
    for dir in [&dirs.cni_conf_dir, &dirs.cni_bin_dir] {
        conflist::remove_stale_temporaries(dir);
    }
    let file = conflist::active_file(&dirs.cni_conf_dir)?;
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    // Read before anything is written: a bad service account changes nothing.
    let account = service_account_kubeconfig(args)?;
    let node_set = load_node_set(args)?;
    let result = chain_plugin(
        args,
        &file,
        &text,
        account,
        node_set.as_ref().map(|(set, _)| set),
    );
    if let (Err(_), Some((set, Loaded::New))) = (&result, &node_set) {
        // Nothing was chained, so no pod is in the set: take it back
        // rather than leave programs on the pods' cgroup.
        let _ = crate::ebpf::node_set::unload(set);
    }
    result
}

/// Puts the plugin in the CNI bin dir and chains it into `file` (read as
/// `text`), with the service account's kubeconfig where there is one; on
/// failure puts back what it wrote.
fn chain_plugin(
    args: &NodeInstallArgs,
    file: &Path,
    text: &str,
    account: Option<String>,
    node_set: Option<&InstanceName>,
) -> Result<ExitCode> {
    let dirs = &args.dirs;
    let host_kubeconfig = account.as_ref().map(|_| {
        args.host_cni_conf_dir
            .as_deref()
            .unwrap_or(&dirs.cni_conf_dir)
            .join(kubeconfig::FILE)
    });
    let conf = conflist::chained(
        text,
        &plugin_entry(args, host_kubeconfig.as_deref(), node_set),
    )
    .with_context(|| format!("chaining redirect-cni into {}", file.display()))?;
    let plugin = plugin_path(dirs);
    let had_plugin = plugin.exists();
    copy_self(&plugin)?;
    // What to put back if the configuration cannot be written.
    let kubeconfig_path = dirs.cni_conf_dir.join(kubeconfig::FILE);
    let old_kubeconfig = fs::read_to_string(&kubeconfig_path).ok();
    let undo = || {
        if !had_plugin {
            let _ = fs::remove_file(&plugin);
        }
        if account.is_some() {
            let _ = match &old_kubeconfig {
                Some(old) => kubeconfig::write(&dirs.cni_conf_dir, old).map(drop),
                None => fs::remove_file(&kubeconfig_path).map_err(Into::into),
            };
        }
    };
    if let Some(text) = &account
        && let Err(err) = kubeconfig::write(&dirs.cni_conf_dir, text)
    {
        undo();
        return Err(err);
    }
    // A single plugin's conf becomes a list: written as .conflist, and the
    // .conf removed, so that the runtime reads the list.
    let target = if file.extension().is_some_and(|e| e == "conflist") {
        file.to_owned()
    } else {
        file.with_extension("conflist")
    };
    let written = conflist::write(&target, &conf).and_then(|()| {
        if target != file
            && let Err(err) = fs::remove_file(file)
        {
            // Both files would stay, the runtime reading the .conf: take
            // the new list back rather than leave it half-installed.
            let _ = fs::remove_file(&target);
            return Err(err).with_context(|| format!("removing {}", file.display()));
        }
        Ok(())
    });
    if let Err(err) = written {
        undo();
        return Err(err);
    }
    outln!(
        "redirect: node install: {} in place, chained into {} (pods get their capture from it at ADD, {})",
        plugin.display(),
        target.display(),
        match &node_set {
            Some(set) => format!("in node set {set}"),
            None => "per pod".to_owned(),
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// `--node-set`: the set loaded (or upgraded in place) on the pods'
/// cgroup, or `None` (said why) where the kernel cannot have one.
fn load_node_set(args: &NodeInstallArgs) -> Result<Option<(InstanceName, Loaded)>> {
    let Some(set) = &args.node_set else {
        return Ok(None);
    };
    if let Some(why) = crate::ebpf::features::netns_cookie_missing() {
        outln!(
            "redirect: node install: no node set here ({}: {why}, kernel 5.15): each pod gets its own programs",
            crate::ebpf::features::NETNS_COOKIE
        );
        return Ok(None);
    }
    let dir = match (&args.node_set_cgroup, &args.pod_cgroup_root) {
        (Some(dir), _) | (None, Some(dir)) => dir.clone(),
        (None, None) => crate::cgroup::cgroup2_mounts()?
            .first()
            .context("no cgroup2 hierarchy in /proc/mounts")?
            .join("kubepods"),
    };
    let cgroup = crate::cgroup::resolve(&dir.to_string_lossy()).with_context(|| {
        format!(
            "the node set's cgroup {}: pass --node-set-cgroup DIR",
            dir.display()
        )
    })?;
    let loaded = crate::ebpf::node_set::load(&crate::ebpf::node_set::LoadRequest {
        set,
        cgroup: &cgroup,
        max_pods: args.node_set_max_pods,
        max_connections: args.node_set_max_connections,
    })?;
    if let Loaded::Upgraded { .. } = loaded {
        outln!("redirect: node install: node set {set} {loaded}");
    }
    Ok(Some((set.clone(), loaded)))
}

/// Writes the plugin's kubeconfig again when the service account's token
/// (or CA, or the API server's address) changed, while the plugin is
/// installed.
fn refresh_kubeconfig(args: &NodeInstallArgs, figures: &mut super::metrics::AgentFigures) {
    // After `node uninstall` (the plugin is gone), nothing comes back.
    if !plugin_path(&args.dirs).exists() {
        return;
    }
    let written = service_account_kubeconfig(args).and_then(|text| match text {
        Some(text) => kubeconfig::write(&args.dirs.cni_conf_dir, &text).map(|(_, w)| w),
        None => Ok(false),
    });
    match written {
        Ok(true) => outln!(
            "redirect: node agent: the plugin's kubeconfig is rewritten (the service account changed)"
        ),
        Ok(false) => {}
        Err(err) => {
            eprintln!(
                "redirect: node agent: the plugin's kubeconfig could not be refreshed: {err:#}"
            );
            figures.kubeconfig_errors += 1;
        }
    }
}

/// The kubeconfig text `--service-account-dir` asks for, if it does.
fn service_account_kubeconfig(args: &NodeInstallArgs) -> Result<Option<String>> {
    let Some(dir) = &args.service_account_dir else {
        return Ok(None);
    };
    let account = kubeconfig::read(dir, |name| std::env::var(name).ok())?;
    kubeconfig::render(&account).map(Some)
}

/// Copies this binary to `to` atomically, executable.
fn copy_self(to: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("locating the redirect binary")?;
    let tmp = to.with_file_name(format!(
        ".{PLUGIN_TYPE}.{}.redirect-tmp",
        std::process::id()
    ));
    fs::copy(&exe, &tmp)
        .with_context(|| format!("copying {} to {}", exe.display(), tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
    fs::rename(&tmp, to).with_context(|| {
        let _ = fs::remove_file(&tmp);
        format!("placing {}", to.display())
    })
}

/// The conf dir's configuration files that list our plugin.
fn chained_files(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(conflist::files(dir)?
        .into_iter()
        .filter(|p| fs::read_to_string(p).is_ok_and(|text| conflist::is_chained(&text)))
        .collect())
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
    // Only the kubeconfig node install wrote, not one an operator placed
    // under that name for --kubeconfig.
    let kubeconfig = dirs.cni_conf_dir.join(kubeconfig::FILE);
    let ours = fs::read_to_string(&kubeconfig).is_ok_and(|t| kubeconfig::is_written_by_us(&t));
    if ours {
        fs::remove_file(&kubeconfig)
            .with_context(|| format!("removing {}", kubeconfig.display()))?;
    }
    let removed_kubeconfig = ours;
    let plugin = plugin_path(dirs);
    let removed = match fs::remove_file(&plugin) {
        Ok(()) => true,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => false,
        Err(err) => return Err(err).with_context(|| format!("removing {}", plugin.display())),
    };
    if changed.is_empty() && !removed && !removed_kubeconfig {
        outln!("redirect: node uninstall: redirect-cni is not installed here");
    } else {
        outln!(
            "redirect: node uninstall: {}{}{}",
            if removed {
                format!("removed {}", plugin.display())
            } else {
                "no plugin binary".to_owned()
            },
            if changed.is_empty() {
                String::new()
            } else {
                format!(", unchained from {}", changed.join(", "))
            },
            if removed_kubeconfig {
                format!(", removed {}", kubeconfig.display())
            } else {
                String::new()
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
    // The node set the plugin's entry names: a set not loaded means its
    // pods get Istio's rules instead (auto) or fail to start (ebpf).
    let set = active
        .as_ref()
        .and_then(|f| fs::read_to_string(f).ok())
        .and_then(|text| conflist::our_entry(&text))
        .and_then(|entry| entry.get("node_set")?.as_str().map(str::to_owned));
    let mut set_ok = true;
    if let Some(set) = set {
        let name = crate::instance::InstanceName::parse(&set).map_err(|e| anyhow::anyhow!(e))?;
        match crate::ebpf::node_set::views(Some(&name))?.first() {
            Some(view) => outln!(
                "node set {set}: loaded, {} pods, {} KiB of maps",
                view.pods.len(),
                view.map_memory_bytes / 1024
            ),
            None => {
                set_ok = false;
                outln!(
                    "node set {set}: not loaded (`redirect node install --node-set {set}` loads it)"
                );
            }
        }
    }
    Ok(if plugin == chained && set_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The node agent: install, then garbage-collect every `gc_interval` and
/// serve the metrics, until SIGTERM or SIGINT. The plugin stays chained
/// when the agent stops, so that pods created while it restarts are still
/// captured (`node uninstall` removes it).
fn run(args: &NodeRunArgs) -> Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let listener = tokio::net::TcpListener::bind(args.metrics_listen)
            .await
            .with_context(|| format!("listening for metrics on {}", args.metrics_listen))?;
        install(&args.install)?;
        outln!(
            "redirect: node agent: metrics on http://{}/metrics, gc every {} s",
            listener.local_addr()?,
            args.gc_interval
        );
        let figures = std::cell::Cell::new(super::metrics::AgentFigures::default());
        let gc_loop = async {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(args.gc_interval));
            loop {
                every.tick().await;
                let mut now = figures.get();
                if args.install.service_account_dir.is_some() {
                    refresh_kubeconfig(&args.install, &mut now);
                }
                match crate::ebpf::loader::gc(false) {
                    Ok(removed) => {
                        for (name, why) in &removed {
                            outln!("redirect: node agent: removed {name}: {why}");
                        }
                        now.gc_removed += removed.len() as u64;
                    }
                    Err(err) => {
                        eprintln!("redirect: node agent: gc failed: {err:#}");
                        now.gc_errors += 1;
                    }
                }
                figures.set(now);
            }
        };
        let serve = async {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                serve_metrics(stream, figures.get()).await;
            }
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
            () = gc_loop => {},
            () = serve => {},
        }
        outln!("redirect: node agent: stopping (the plugin stays chained; `redirect node uninstall` removes it)");
        Ok(ExitCode::SUCCESS)
    })
}

/// Answers one HTTP request: the metrics for `GET /metrics`, 404 for
/// anything else; a client gets two seconds to send its request head.
async fn serve_metrics(mut stream: tokio::net::TcpStream, figures: super::metrics::AgentFigures) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    };
    if tokio::time::timeout(std::time::Duration::from_secs(2), read)
        .await
        .is_err()
    {
        return;
    }
    let wanted = head.starts_with(b"GET /metrics ") || head.starts_with(b"GET /metrics?");
    let (status, body) = if !wanted {
        ("404 Not Found", "GET /metrics\n".to_owned())
    } else {
        let now = super::status::collect(None)
            .and_then(|status| Ok((status, crate::ebpf::node_set::views(None)?)));
        match now {
            Ok((now, sets)) => ("200 OK", super::metrics::render(&now, &sets, figures)),
            Err(err) => ("500 Internal Server Error", format!("{err:#}\n")),
        }
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
}
