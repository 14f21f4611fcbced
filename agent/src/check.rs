//! `check`: can checkpoints work on this machine, and what follows from what is missing.

use serde::Serialize;

use crate::criu::{Criu, CriuVersion, Features, MIN_VERSION};

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub name: &'static str,
    pub ok: bool,
    /// Fatal findings make dump and restore impossible; others only limit features.
    pub fatal: bool,
    pub detail: String,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub criu_path: Option<String>,
    pub criu_version: Option<CriuVersion>,
    pub kernel: String,
    pub features: Option<Features>,
    pub findings: Vec<Finding>,
    /// Dump and restore will work.
    pub ok: bool,
}

/// Capabilities CRIU uses: (bit, name, what follows without it).
const CRIU_CAPS: [(u32, &str, &str); 5] = [
    (
        24,
        "CAP_SYS_RESOURCE",
        "no process of another user can be checkpointed (CRIU: `Can't get rlimit`); a task that drops root must be started with `cedana-agent exec --userns`",
    ),
    (
        21,
        "CAP_SYS_ADMIN",
        "namespaces, mounts and most dumps fail; run on a host or a privileged container",
    ),
    (
        19,
        "CAP_SYS_PTRACE",
        "no process can be seized; nothing can be checkpointed",
    ),
    (
        12,
        "CAP_NET_ADMIN",
        "TCP connections cannot be checkpointed (--tcp-established) and the network is not locked",
    ),
    (
        7,
        "CAP_SETUID",
        "processes of other users cannot be restored",
    ),
];

/// This process's effective capabilities (`CapEff` of `/proc/self/status`).
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Parses "6.18.44-foo" into (6, 18).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Runs every check. `criu` is `Err` with the reason when no CRIU was found.
pub fn run(criu: Result<&Criu, String>) -> Report {
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let kv = kernel_version(&kernel).unwrap_or((0, 0));
    let mut findings = Vec::new();
    let mut add = |name, ok, fatal, detail: String| {
        findings.push(Finding {
            name,
            ok,
            fatal,
            detail,
        })
    };

    let root = nix::unistd::geteuid().is_root();
    add(
        "root",
        root,
        true,
        if root {
            "running as root".into()
        } else {
            "not root: CRIU needs root to dump and restore; run with sudo".into()
        },
    );
    // The capabilities CRIU uses, from this process's effective set (root without some is a
    // container's or a sandbox's root).
    if root {
        let eff = effective_caps();
        let missing: Vec<&str> = CRIU_CAPS
            .iter()
            .filter(|(bit, _, _)| eff.is_some_and(|e| e & (1u64 << bit) == 0))
            .map(|(_, name, _)| *name)
            .collect();
        add(
            "capabilities",
            missing.is_empty(),
            false,
            if missing.is_empty() {
                "root has every capability CRIU uses".into()
            } else {
                let follows: Vec<&str> = CRIU_CAPS
                    .iter()
                    .filter(|(_, name, _)| missing.contains(name))
                    .map(|(_, _, what)| *what)
                    .collect();
                format!("root lacks {}: {}", missing.join(", "), follows.join("; "))
            },
        );
    }
    add(
        "kernel",
        kv >= (5, 4),
        false,
        format!(
            "Linux {kernel}{}",
            if kv < (5, 4) {
                " is older than 5.4; expect missing features"
            } else {
                ""
            }
        ),
    );

    let (mut criu_path, mut criu_version, mut features) = (None, None, None);
    match criu {
        Err(reason) => add("criu", false, true, reason),
        Ok(c) => {
            criu_path = Some(c.path().display().to_string());
            match c.version() {
                Err(e) => add(
                    "criu version",
                    false,
                    true,
                    format!("{} does not answer over RPC: {e}", c.path().display()),
                ),
                Ok(v) => {
                    criu_version = Some(v);
                    let ok = v >= MIN_VERSION;
                    let why = if kv >= (6, 16) {
                        format!("Linux {}.{} restricts socket options that CRIU < 4.2 reads, so any process with a TCP or UDP socket fails to dump", kv.0, kv.1)
                    } else if kv >= (6, 13) {
                        format!(
                            "Linux {}.{} changed the vDSO layout, which needs CRIU >= 4.1",
                            kv.0, kv.1
                        )
                    } else {
                        "this agent is tested with CRIU 4.2".into()
                    };
                    add(
                        "criu version",
                        ok,
                        true,
                        if ok {
                            format!("CRIU {v} at {} (>= {MIN_VERSION})", c.path().display())
                        } else {
                            format!("CRIU {v} at {} is too old: {why}; install CRIU >= {MIN_VERSION} (README: \"Install\")", c.path().display())
                        },
                    );
                }
            }
            match c.check() {
                Ok(()) => add(
                    "criu check",
                    true,
                    true,
                    "`criu check` passes: CRIU works on this kernel".into(),
                ),
                Err(e) => add(
                    "criu check",
                    false,
                    true,
                    format!("`criu check` fails: {e}"),
                ),
            }
            match c.features() {
                Ok(f) => {
                    features = Some(f);
                    add(
                        "soft-dirty",
                        f.mem_track,
                        false,
                        if f.mem_track {
                            "memory change tracking works: incremental pre-dumps are possible"
                                .into()
                        } else {
                            "no memory change tracking (kernel without CONFIG_MEM_SOFT_DIRTY): every checkpoint copies all memory; pre-dumps are unavailable".into()
                        },
                    );
                    add(
                        "userfaultfd",
                        f.lazy_pages,
                        false,
                        if f.lazy_pages {
                            "userfaultfd works: lazy restores (memory fetched on demand) are possible".into()
                        } else {
                            "no userfaultfd: restores load all memory before the task resumes"
                                .into()
                        },
                    );
                }
                Err(e) => add(
                    "features",
                    false,
                    false,
                    format!("CRIU's feature check failed: {e}"),
                ),
            }
        }
    }
    if kv >= (6, 16) {
        let ok = criu_version.is_some_and(|v| v >= MIN_VERSION);
        add(
            "socket options",
            ok,
            false,
            if ok {
                format!("Linux {}.{} limits SO_PASSCRED/SO_PASSSEC to unix sockets; this CRIU handles it, TCP and UDP sockets dump", kv.0, kv.1)
            } else {
                format!("Linux {}.{} limits SO_PASSCRED/SO_PASSSEC to unix sockets; CRIU < 4.2 cannot dump TCP or UDP sockets here", kv.0, kv.1)
            },
        );
    }
    let ok = findings.iter().all(|f| f.ok || !f.fatal);
    Report {
        criu_path,
        criu_version,
        kernel,
        features,
        findings,
        ok,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(kernel_version("5.10.0-28-amd64"), Some((5, 10)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn missing_criu_is_fatal_and_named() {
        let r = run(Err("no CRIU binary found".into()));
        assert!(!r.ok);
        assert!(r
            .findings
            .iter()
            .any(|f| f.name == "criu" && f.fatal && f.detail.contains("no CRIU")));
    }
}
