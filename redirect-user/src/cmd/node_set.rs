//! `redirect node-set`: one program set for the whole node (see
//! [`crate::ebpf::node_set`]), and its pods.

use std::process::ExitCode;

use anyhow::Result;

use crate::{
    cgroup,
    cli::{NodeSetAction, NodeSetAddArgs},
    ebpf::node_set,
    instance::InstanceName,
    netns,
};

pub fn node_set(action: &NodeSetAction) -> Result<ExitCode> {
    match action {
        NodeSetAction::Load(args) => {
            let cgroup = cgroup::resolve(&args.cgroup)?;
            let loaded = node_set::load(&node_set::LoadRequest {
                set: &args.set.name,
                cgroup: &cgroup,
                max_pods: args.max_pods,
                max_connections: args.max_connections,
            })?;
            outln!(
                "redirect: node set {} {loaded} on {} (up to {} pods)",
                args.set.name,
                cgroup.path.display(),
                args.max_pods
            );
        }
        NodeSetAction::Unload(set) => {
            if node_set::unload(&set.name)? {
                outln!("redirect: unloaded node set {}", set.name);
            } else {
                outln!("redirect: node set {} is not loaded", set.name);
            }
        }
        NodeSetAction::Add(args) => add(args)?,
        NodeSetAction::Remove { set, instance } => {
            if node_set::remove(&set.name, instance)? {
                outln!(
                    "redirect: removed pod {instance} from node set {}",
                    set.name
                );
            } else {
                outln!("redirect: pod {instance} is not in node set {}", set.name);
            }
        }
        NodeSetAction::Status { set, json } => status(&set.name, *json)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn add(args: &NodeSetAddArgs) -> Result<()> {
    if let Some(path) = &args.netns {
        netns::enter(path)?;
    }
    let capture = super::install::checked(args.capture.resolve(netns::pod_addresses()?, 0)?)?;
    let config = super::install::lower(&capture)?;
    let replaced = node_set::add(&args.set.name, &args.instance, &config)?;
    outln!(
        "redirect: {} pod {} in node set {}: outbound TCP -> 127.0.0.1:{}{} (proxy uids {:?}, gids {:?})",
        if replaced { "updated" } else { "added" },
        args.instance,
        args.set.name,
        config.proxy_port,
        super::install::inbound_summary(&config),
        config.proxy_uids,
        config.proxy_gids,
    );
    Ok(())
}

fn status(set: &InstanceName, json: bool) -> Result<()> {
    let view = node_set::views(Some(set))?.into_iter().next();
    let Some(view) = view else {
        if json {
            outln!("{}", serde_json::json!({ "loaded": false, "pods": [] }));
        } else {
            outln!("redirect: node set {set} is not loaded");
        }
        return Ok(());
    };
    if json {
        let mut value = serde_json::to_value(&view)?;
        value["loaded"] = true.into();
        outln!("{value}");
        return Ok(());
    }
    outln!(
        "node set {set}: {} ({} pods, {} removed pods' indexes to clear, {} KiB of maps)",
        node_set::dir(set).display(),
        view.pods.len(),
        view.released_indexes,
        view.map_memory_bytes / 1024
    );
    for pod in view.pods {
        outln!(
            "  pod {} (#{}, netns inode {})",
            pod.pod.name,
            pod.pod.index,
            pod.pod.netns_ino
        );
        for (name, n) in pod.counters.into_iter().filter(|(_, n)| *n != 0) {
            outln!("    {name:<28} {n}");
        }
    }
    Ok(())
}
