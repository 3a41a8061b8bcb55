//! The CNI side of node mode: what Istio's CNI plugin decides for a pod
//! ([`pod`]), which `redirect cni-plan` shows and applies, and the
//! `redirect-cni` plugin that applies it when the runtime creates a pod
//! ([`plugin`]).

pub mod conflist;
pub mod kube;
pub mod kubeconfig;
pub mod plugin;
pub mod pod;
pub mod setup;
