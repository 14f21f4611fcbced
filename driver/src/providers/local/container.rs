//! Container workers for the `local` provider: each worker boots from the worker image (an OCI
//! layout from `images/build.sh`) as a runc container: its own root filesystem unpacked from
//! the image, its own PID, mount, network (the worker's [`NetNs`]), IPC, UTS and cgroup
//! namespaces, the agent daemon as PID 1 (the image's entrypoint). Nothing is installed at
//! launch: CRIU and the agent come with the image. The worker's folder is bind-mounted at
//! `/work` in every container, so a restored task finds its files at the same path.
//!
//! The token reaches the daemon through the container's environment, written into a config
//! file only root can read.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::json;

use crate::providers::local::netns::NetNs;

/// The path of a worker's folder inside its container.
pub const WORK_PATH: &str = "/work";

/// Errors preparing a container worker.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("cannot unpack worker image {image} (umoci unpack): {reason}; build it with images/build.sh")]
    Unpack { image: PathBuf, reason: String },
    #[error("cannot write the container bundle {path}: {source}")]
    Bundle {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start runc: {0}; install runc (tools/deps.sh)")]
    Runc(std::io::Error),
}

/// What a container worker needs.
pub struct ContainerSpec<'a> {
    /// The OCI image layout (`<dir>` or `<dir>:<tag>`; tag `latest` by default).
    pub image: &'a Path,
    pub bundle: &'a Path,
    /// runc's state folder for the job.
    pub runc_root: &'a Path,
    pub id: &'a str,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Mounted at [`WORK_PATH`].
    pub work_dir: &'a Path,
    /// The job's shared storage, mounted at the same path.
    pub shared: Option<&'a Path>,
    pub netns: &'a NetNs,
    pub log: std::fs::File,
}

/// The capabilities this process may hand on (its bounding set), by name.
pub fn bounding_caps() -> Vec<String> {
    const NAMES: [&str; 41] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    let mask = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        })
        .unwrap_or(0);
    NAMES
        .iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1 << bit) != 0)
        .map(|(_, n)| format!("CAP_{n}"))
        .collect()
}

/// The runtime config of a worker container. CRIU needs root with broad capabilities, a
/// writable `/proc/sys` (it sets `ns_last_pid`) and `/dev/net/tun` (`criu check` opens it).
pub fn runtime_config(s: &ContainerSpec) -> serde_json::Value {
    let caps = bounding_caps();
    let env: Vec<String> = std::iter::once(
        "PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin".to_string(),
    )
    .chain(s.env.iter().map(|(k, v)| format!("{k}={v}")))
    .collect();
    let mut mounts = json!([
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777"]},
        {"destination": WORK_PATH, "type": "bind", "source": s.work_dir,
         "options": ["rbind", "rw"]}
    ]);
    if let (Some(shared), Some(list)) = (s.shared, mounts.as_array_mut()) {
        list.push(
            json!({"destination": shared, "type": "bind", "source": shared,
                         "options": ["rbind", "rw"]}),
        );
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": s.args,
            "env": env,
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": false
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": format!("cedana-{}", s.id),
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"},
                {"type": "cgroup"},
                {"type": "network", "path": format!("/run/netns/{}", s.netns.name)}
            ],
            "devices": [{"path": "/dev/net/tun", "type": "c", "major": 10, "minor": 200,
                         "fileMode": 0o666, "uid": 0, "gid": 0}],
            "resources": {"devices": [
                {"allow": false, "access": "rwm"},
                {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
                {"allow": true, "type": "c", "major": 1, "minor": 5, "access": "rwm"},
                {"allow": true, "type": "c", "major": 1, "minor": 7, "access": "rwm"},
                {"allow": true, "type": "c", "major": 1, "minor": 8, "access": "rwm"},
                {"allow": true, "type": "c", "major": 1, "minor": 9, "access": "rwm"},
                {"allow": true, "type": "c", "major": 5, "minor": 0, "access": "rwm"},
                {"allow": true, "type": "c", "major": 5, "minor": 2, "access": "rwm"},
                {"allow": true, "type": "c", "major": 136, "access": "rwm"},
                {"allow": true, "type": "c", "major": 10, "minor": 200, "access": "rwm"}
            ]}
        }
    })
}

/// Unpacks the image into the bundle, writes its config and starts `runc run` (the returned
/// child lives as long as the container).
pub fn start(s: ContainerSpec) -> Result<std::process::Child, ContainerError> {
    let image = s.image.to_string_lossy();
    let reference = if image.contains(':') {
        image.into_owned()
    } else {
        format!("{image}:latest")
    };
    let out = Command::new("umoci")
        .args(["unpack", "--image", &reference])
        .arg(s.bundle)
        .output()
        .map_err(|e| ContainerError::Unpack {
            image: s.image.into(),
            reason: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(ContainerError::Unpack {
            image: s.image.into(),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let config = s.bundle.join("config.json");
    let berr = |source| ContainerError::Bundle {
        path: config.clone(),
        source,
    };
    let _ = std::fs::remove_file(&config);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&config)
        .and_then(|mut f| {
            f.write_all(&serde_json::to_vec_pretty(&runtime_config(&s)).expect("json"))
        })
        .map_err(berr)?;
    std::fs::create_dir_all(s.runc_root).map_err(|source| ContainerError::Bundle {
        path: s.runc_root.into(),
        source,
    })?;
    let err = s.log.try_clone().map_err(ContainerError::Runc)?;
    Command::new("runc")
        .arg("--root")
        .arg(s.runc_root)
        .arg("run")
        .arg("--bundle")
        .arg(s.bundle)
        .arg(s.id)
        .stdin(Stdio::null())
        .stdout(s.log)
        .stderr(err)
        .spawn()
        .map_err(ContainerError::Runc)
}

/// Kills and deletes a container.
pub fn remove(runc_root: &Path, id: &str) {
    let _ = Command::new("runc")
        .arg("--root")
        .arg(runc_root)
        .args(["delete", "--force", id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
