//! The node agent's Prometheus endpoint: every instance's decision
//! counters (the `redirect status` counters, per pod instance) and every
//! node-set pod's (labelled with its set), in the Prometheus text
//! exposition format, and the agent's own figures.

use std::fmt::Write as _;

use super::status::Status;
use crate::ebpf::node_set::SetView;

/// What the agent adds to the instances' figures.
#[derive(Default, Clone, Copy)]
pub struct AgentFigures {
    /// Instances of deleted pods the agent removed since it started.
    pub gc_removed: u64,
    /// gc passes that failed.
    pub gc_errors: u64,
    /// Refreshes of the plugin's kubeconfig (`--service-account-dir`)
    /// that failed.
    pub kubeconfig_errors: u64,
}

/// One figure of a loaded node set.
type SetFigure = fn(&SetView) -> usize;

/// The exposition text for `status`, the node sets `sets` and the agent's
/// figures.
pub fn render(status: &Status, sets: &[SetView], agent: AgentFigures) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP redirect_decisions_total Capture decisions per instance, by the rule they mirror (see redirect status)."
    );
    let _ = writeln!(out, "# TYPE redirect_decisions_total counter");
    for inst in &status.instances {
        for counter in &inst.counters {
            let _ = writeln!(
                out,
                "redirect_decisions_total{{instance=\"{}\",decision=\"{}\"}} {}",
                label(&inst.instance),
                counter.name,
                counter.value
            );
        }
    }
    for set in sets {
        for pod in &set.pods {
            for (decision, value) in &pod.counters {
                let _ = writeln!(
                    out,
                    "redirect_decisions_total{{instance=\"{}\",node_set=\"{}\",decision=\"{decision}\"}} {value}",
                    label(&pod.pod.name),
                    label(&set.set),
                );
            }
        }
    }
    let set_gauges: [(&str, &str, SetFigure); 2] = [
        (
            "redirect_node_set_pods",
            "Pods in each loaded node set.",
            |set| set.pods.len(),
        ),
        (
            "redirect_node_set_released_indexes",
            "Removed pods' indexes in each loaded node set whose entries gc has still to clear.",
            |set| set.released_indexes,
        ),
    ];
    for (name, help, value) in set_gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for set in sets {
            let _ = writeln!(
                out,
                "{name}{{node_set=\"{}\"}} {}",
                label(&set.set),
                value(set)
            );
        }
    }
    let gauges = [
        (
            "redirect_instances",
            "Instances installed on this node (whole).",
            status.instances.len() as u64,
        ),
        (
            "redirect_instances_incomplete",
            "Instances that are not whole (see redirect status).",
            status.incomplete.len() as u64,
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP redirect_tracked_handshakes Redirected connections between the app's and the proxy's end of their handshake.\n# TYPE redirect_tracked_handshakes gauge"
    );
    for inst in &status.instances {
        let _ = writeln!(
            out,
            "redirect_tracked_handshakes{{instance=\"{}\"}} {}",
            label(&inst.instance),
            inst.tracked.handshakes
        );
    }
    let counters = [
        (
            "redirect_gc_removed_total",
            "Instances and node-set pods of deleted pods removed by the agent.",
            agent.gc_removed,
        ),
        (
            "redirect_gc_errors_total",
            "Garbage-collection passes that failed.",
            agent.gc_errors,
        ),
        (
            "redirect_kubeconfig_errors_total",
            "Refreshes of the plugin's kubeconfig from the service account that failed.",
            agent.kubeconfig_errors,
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    out
}

/// A label value as the exposition format escapes it.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_node_still_has_every_family() {
        let status = Status {
            instances: Vec::new(),
            incomplete: Vec::new(),
        };
        let text = render(
            &status,
            &[],
            AgentFigures {
                gc_removed: 2,
                gc_errors: 0,
                kubeconfig_errors: 1,
            },
        );
        for line in [
            "# TYPE redirect_decisions_total counter",
            "redirect_instances 0",
            "redirect_instances_incomplete 0",
            "redirect_gc_removed_total 2",
            "redirect_gc_errors_total 0",
            "redirect_kubeconfig_errors_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn node_set_pods_carry_their_set() {
        let status = Status {
            instances: Vec::new(),
            incomplete: Vec::new(),
        };
        let sets = [SetView {
            set: "node".into(),
            map_memory_bytes: 0,
            maps: Vec::new(),
            programs: Default::default(),
            pods: vec![crate::ebpf::node_set::PodView {
                pod: crate::ebpf::node_set::Pod {
                    index: 3,
                    name: "cni-abc".into(),
                    netns_cookie: 7,
                    netns_ino: 8,
                    added_at: 0,
                    addrs: None,
                },
                counters: [("redirected", 5)].into_iter().collect(),
                sk_lookup_program: Some(9),
            }],
            released_indexes: 2,
        }];
        let text = render(&status, &sets, AgentFigures::default());
        for line in [
            "redirect_decisions_total{instance=\"cni-abc\",node_set=\"node\",decision=\"redirected\"} 5",
            "redirect_node_set_pods{node_set=\"node\"} 1",
            "redirect_node_set_released_indexes{node_set=\"node\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
