//! CRIU's options a dump or a restore may ask for, as the agent's command line, the daemon's
//! commands and a checkpoint's manifest spell them. One type for all three, so that what a
//! dump needed is recorded once and a restore reads it back.

use serde::{Deserialize, Serialize};

/// What a dump does with the tree's established TCP connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum TcpMode {
    /// A tree with an established connection cannot be dumped (CRIU's default).
    #[default]
    Refuse,
    /// Dumped with their state (`--tcp-established`): they come back open, which needs the
    /// same addresses (this host, or one that took its address over).
    Established,
    /// Not dumped (`--tcp-close`): they come back closed, and the peers reconnect. What a
    /// move to another host needs.
    Close,
}

/// CRIU's `--manage-cgroups` modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum CgroupMode {
    /// Cgroups are neither dumped nor restored.
    Ignore,
    /// Only the tree's place in cgroups, no properties.
    None,
    /// Properties of the cgroups the tree is in.
    Props,
    /// Properties restored only on cgroups CRIU creates.
    Soft,
    /// Properties restored on every cgroup.
    Full,
    /// Every cgroup must not exist yet.
    Strict,
}

impl CgroupMode {
    /// CRIU's `criu_cg_mode` value.
    pub fn rpc(self) -> i32 {
        match self {
            CgroupMode::Ignore => 0,
            CgroupMode::None => 1,
            CgroupMode::Props => 2,
            CgroupMode::Soft => 3,
            CgroupMode::Full => 4,
            CgroupMode::Strict => 5,
        }
    }
}

/// How the tree's network is held still while it is dumped and restored (`--network-lock`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum NetworkLock {
    Iptables,
    Nftables,
    /// No lock: the caller holds the network still itself.
    Skip,
}

impl NetworkLock {
    /// CRIU's `criu_network_lock_method` value.
    pub fn rpc(self) -> i32 {
        match self {
            NetworkLock::Iptables => 1,
            NetworkLock::Nftables => 2,
            NetworkLock::Skip => 3,
        }
    }
}

/// Longest `--external` resource accepted, and most of them.
pub const MAX_EXTERNAL_LEN: usize = 4096;
pub const MAX_EXTERNALS: usize = 64;

/// CRIU options beyond the defaults, for a dump and for the restore it needs. Absent fields are
/// CRIU's defaults; older senders and manifests leave them out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CriuOptions {
    /// Established TCP connections (dump; a restore may turn `Established` into `Close`).
    #[serde(default)]
    pub tcp: TcpMode,
    /// Connections to unix sockets outside the tree (`--ext-unix-sk`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub ext_unix_sk: bool,
    /// Open files whose name is gone or replaced are linked back (`--link-remap`; dump).
    #[serde(default, skip_serializing_if = "is_false")]
    pub link_remap: bool,
    /// Largest deleted-but-open file carried in the images, bytes (`--ghost-limit`; dump).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ghost_limit: Option<u32>,
    /// Half-open (in-flight) connections are left out of the dump (`--skip-in-flight`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub skip_in_flight: bool,
    /// `--manage-cgroups MODE` (dump and restore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manage_cgroups: Option<CgroupMode>,
    /// `--network-lock METHOD` (dump and restore: the restore unlocks with the dump's method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_lock: Option<NetworkLock>,
    /// Resources outside the tree (`--external`, e.g. `mnt[/data]:data`, `dev[major/minor]:x`,
    /// `unix[ino]`, `tty[rdev:dev]`): declared at the dump, and the restore needs them named
    /// again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external: Vec<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// An option a request cannot carry, named.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CriuOptionsError {
    #[error("too many --external resources ({0}); at most {MAX_EXTERNALS}")]
    TooManyExternals(usize),
    #[error("--external {0:?} is not a CRIU resource: give KIND[ID]:VALUE or KIND[ID], e.g. mnt[/data]:data, at most {MAX_EXTERNAL_LEN} bytes, no control characters")]
    BadExternal(String),
    #[error("--ghost-limit must be more than 0 bytes")]
    ZeroGhostLimit,
}

impl CriuOptions {
    /// Refuses what CRIU would misread or what is unbounded.
    pub fn check(&self) -> Result<(), CriuOptionsError> {
        if self.external.len() > MAX_EXTERNALS {
            return Err(CriuOptionsError::TooManyExternals(self.external.len()));
        }
        for e in &self.external {
            if !valid_external(e) {
                let shown: String = e.chars().take(80).collect();
                return Err(CriuOptionsError::BadExternal(shown));
            }
        }
        if self.ghost_limit == Some(0) {
            return Err(CriuOptionsError::ZeroGhostLimit);
        }
        Ok(())
    }

    /// What the restore of a dump made with these options needs, before the restorer's own
    /// choices: the TCP mode, cgroup mode, network lock and externals carry over; the dump-only
    /// options do not.
    pub fn for_restore(&self) -> CriuOptions {
        CriuOptions {
            tcp: self.tcp,
            ext_unix_sk: self.ext_unix_sk,
            manage_cgroups: self.manage_cgroups,
            network_lock: self.network_lock,
            external: self.external.clone(),
            ..CriuOptions::default()
        }
    }
}

/// `KIND[ID]` or `KIND[ID]:VALUE`, KIND lowercase letters, bounded and printable.
fn valid_external(e: &str) -> bool {
    let Some((kind, rest)) = e.split_once('[') else {
        return false;
    };
    let Some(close) = rest.find(']') else {
        return false;
    };
    let tail = &rest[close + 1..];
    e.len() <= MAX_EXTERNAL_LEN
        && !kind.is_empty()
        && kind.bytes().all(|b| b.is_ascii_lowercase())
        && close > 0
        && (tail.is_empty() || tail.starts_with(':'))
        && !e.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn externals_are_checked() {
        for ok in [
            "mnt[/data]:data",
            "dev[8/1]:disk",
            "unix[1234]",
            "tty[88:3]",
        ] {
            let o = CriuOptions {
                external: vec![ok.into()],
                ..Default::default()
            };
            assert_eq!(o.check(), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "mnt",
            "mnt[]",
            "MNT[x]",
            "mnt[x]y",
            "mnt[x]:\n",
            "[x]:y",
        ] {
            let o = CriuOptions {
                external: vec![bad.into()],
                ..Default::default()
            };
            assert!(
                matches!(o.check(), Err(CriuOptionsError::BadExternal(_))),
                "{bad:?}"
            );
        }
        let many = CriuOptions {
            external: vec!["unix[1]".into(); MAX_EXTERNALS + 1],
            ..Default::default()
        };
        assert_eq!(
            many.check(),
            Err(CriuOptionsError::TooManyExternals(MAX_EXTERNALS + 1))
        );
    }

    #[test]
    fn absent_fields_are_the_defaults_and_restore_keeps_what_it_needs() {
        let o: CriuOptions = serde_json::from_str("{}").unwrap();
        assert_eq!(o, CriuOptions::default());
        assert_eq!(serde_json::to_string(&o).unwrap(), r#"{"tcp":"refuse"}"#);
        let d = CriuOptions {
            tcp: TcpMode::Established,
            link_remap: true,
            ghost_limit: Some(1 << 20),
            skip_in_flight: true,
            manage_cgroups: Some(CgroupMode::Soft),
            network_lock: Some(NetworkLock::Iptables),
            external: vec!["mnt[/data]:data".into()],
            ext_unix_sk: true,
        };
        let r = d.for_restore();
        assert!(!r.link_remap && r.ghost_limit.is_none() && !r.skip_in_flight);
        assert_eq!(r.tcp, TcpMode::Established);
        assert_eq!(r.manage_cgroups, Some(CgroupMode::Soft));
        assert_eq!(r.network_lock, Some(NetworkLock::Iptables));
        assert_eq!(r.external, d.external);
        let back: CriuOptions = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(back, d);
    }
}
