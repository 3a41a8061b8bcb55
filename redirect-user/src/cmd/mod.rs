//! One module per command. Each takes its parsed arguments, resolves the
//! ones that describe a capture into a [`crate::capture::Capture`], lowers
//! it for its backend and reports; `main` only dispatches.

pub mod cni_plan;
#[cfg(feature = "sandbox")]
pub mod demo;
pub mod gc;
pub mod install;
pub mod istio_iptables;
pub mod metrics;
pub mod node;
pub mod node_set;
pub mod probe;
pub mod run;
pub mod status;
pub mod uninstall;
