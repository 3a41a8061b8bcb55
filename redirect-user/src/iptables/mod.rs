//! iptables mode: the rules istio-iptables installs, generated from the
//! same configuration, for kernels where eBPF capture cannot run.

pub mod apply;
pub mod builder;
pub mod legacy;
pub mod rules;
