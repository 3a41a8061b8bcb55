//! The CNI side of node mode: what Istio's CNI plugin decides for a pod
//! ([`pod`]), which `redirect cni-plan` shows and applies.

pub mod pod;
