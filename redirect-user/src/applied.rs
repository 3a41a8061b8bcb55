//! What applying a netfilter rule set did, in iptables mode and in
//! Istio's native nftables mode alike.

#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Installed,
    /// Different Istio rules were there and were replaced.
    Replaced,
    /// The namespace already had exactly these rules.
    AlreadyPresent,
}

impl Applied {
    /// The report line's words for it.
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Installed => "applied the Istio rules",
            Self::Replaced => "replaced the Istio rules that were in place",
            Self::AlreadyPresent => "the Istio rules are already in place; nothing changed",
        }
    }
}
