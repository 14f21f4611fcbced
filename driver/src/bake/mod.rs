//! `cedana-driver bake`: a worker image (AMI) and a launch template made from a stock base
//! image, so that workers need no setup step at launch.
//!
//! The flow: check what will be uploaded (the agent, CRIU with exactly the libraries it loads)
//! before anything costs money; generate an ed25519 host key for the bake instance; launch the
//! base image with a `#cloud-config` user-data carrying that host key and the user's public key;
//! wait until it runs; connect over SSH verifying exactly that host key (or a `known_hosts`
//! file); upload and install the agent, CRIU and a systemd unit; run `cedana-agent check` there
//! (the bake fails with its output if it does not pass); remove the temporary host keys,
//! cloud-init's copy of the user-data and the user's key; CreateImage; a launch template whose
//! user-data starts the agent; terminate the bake instance (always, also when something failed).
//!
//! On the image:
//!
//! | path | what |
//! |---|---|
//! | `/usr/local/bin/cedana-agent` | the agent |
//! | `/usr/local/lib/cedana/criu/` | CRIU, its loader and the libraries it loads |
//! | `/usr/local/bin/criu` | runs that CRIU with those libraries |
//! | `/etc/systemd/system/cedana-agent.service` | the agent's unit (enabled) |
//!
//! The unit reads the worker's settings from [`WORKER_ENV`] (`CEDANA_JOB`, `CEDANA_WORKER`,
//! `CEDANA_NATS_URL`, `CEDANA_WATCH_SPOT`, optionally `CEDANA_SHARED_STORAGE`) and the NATS
//! token from [`TOKEN_FILE`]: the user-data of each worker writes both and starts the unit
//! (see [`worker_env`]), so one image serves every job. Without that file the unit does not
//! start.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::util::ssh::{sh_quote, KeyPair, PublicKey};

/// The agent on a baked image.
pub const AGENT_PATH: &str = "/usr/local/bin/cedana-agent";
/// CRIU and the libraries it loads on a baked image.
pub const CRIU_DIR: &str = "/usr/local/lib/cedana/criu";
/// The `criu` command on a baked image (runs [`CRIU_DIR`]'s CRIU).
pub const CRIU_COMMAND: &str = "/usr/local/bin/criu";
/// The agent's systemd unit.
pub const UNIT_NAME: &str = "cedana-agent.service";
pub const UNIT_PATH: &str = "/etc/systemd/system/cedana-agent.service";
/// The worker's settings, written by its user-data (environment file: `KEY=value` lines).
pub const WORKER_ENV: &str = "/etc/cedana/worker.env";
/// The job's NATS token, written by the worker's user-data (root only).
pub const TOKEN_FILE: &str = "/var/lib/cedana/nats-token";
/// Where tools/deps.sh unpacks CRIU (`CEDANA_CRIU_PREFIX` overrides it there too).
pub const DEFAULT_CRIU_PREFIX: &str = "/opt/cedana/criu";

/// Errors of `bake`. None carries key material.
#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    #[error("agent {path}: {message}")]
    Agent { path: PathBuf, message: String },
    #[error("CRIU {path}: {message}")]
    Criu { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Ssh(#[from] crate::util::ssh::SshError),
    #[cfg(feature = "aws")]
    #[error(transparent)]
    Aws(#[from] crate::providers::aws::AwsError),
    #[error("bake instance {instance}: {message}")]
    Remote { instance: String, message: String },
    #[error(
        "`cedana-agent check` failed on bake instance {instance} (no image was made):\n{output}"
    )]
    CheckFailed { instance: String, output: String },
    #[error("interrupted; bake instance {instance} was terminated and no image was made")]
    Interrupted { instance: String },
    #[error("image {image} was made, but {message}")]
    AfterImage { image: String, message: String },
}

// ---------------------------------------------------------------------------------------------
// ELF: static or not, which machine
// ---------------------------------------------------------------------------------------------

/// What the ELF header says about an executable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfInfo {
    /// `uname -m` spelling: `x86_64`, `aarch64`, ...
    pub machine: String,
    /// The program interpreter (dynamic loader), if any: none for a static executable.
    pub interpreter: Option<String>,
}

/// Reads the ELF header and program headers of `path`.
pub fn elf_info(path: &Path) -> Result<ElfInfo, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut head = vec![0u8; 64];
    f.read_exact(&mut head)
        .map_err(|_| "too short to be an executable".to_string())?;
    if &head[..4] != b"\x7fELF" {
        return Err("not an ELF executable".into());
    }
    if head[4] != 2 || head[5] != 1 {
        return Err("not a 64-bit little-endian ELF executable".into());
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let machine = match u16_at(&head, 18) {
        62 => "x86_64".to_string(),
        183 => "aarch64".to_string(),
        m => format!("ELF machine {m}"),
    };
    let phoff = u64_at(&head, 32);
    let phentsize = u16_at(&head, 54) as u64;
    let phnum = u16_at(&head, 56) as u64;
    if phentsize < 56 || phnum > 256 {
        return Err("malformed program headers".into());
    }
    use std::io::Seek;
    let mut ph = vec![0u8; (phentsize * phnum) as usize];
    f.seek(std::io::SeekFrom::Start(phoff))
        .and_then(|_| f.read_exact(&mut ph))
        .map_err(|_| "truncated program headers".to_string())?;
    let mut interpreter = None;
    for i in 0..phnum as usize {
        let e = &ph[i * phentsize as usize..];
        let p_type = u32::from_le_bytes(e[..4].try_into().unwrap());
        if p_type == 3 {
            let off = u64_at(e, 8);
            let size = u64_at(e, 32).min(4096);
            let mut name = vec![0u8; size as usize];
            f.seek(std::io::SeekFrom::Start(off))
                .and_then(|_| f.read_exact(&mut name))
                .map_err(|_| "truncated interpreter name".to_string())?;
            let name = String::from_utf8_lossy(&name)
                .trim_end_matches('\0')
                .to_string();
            interpreter = Some(name);
        }
    }
    Ok(ElfInfo {
        machine,
        interpreter,
    })
}

// ---------------------------------------------------------------------------------------------
// What is uploaded
// ---------------------------------------------------------------------------------------------

/// The agent to install.
#[derive(Clone, Debug)]
pub struct AgentBinary {
    pub path: PathBuf,
    pub version: String,
    pub elf: ElfInfo,
}

/// Checks the agent binary: an executable for Linux that prints its version. A dynamically
/// linked one is allowed (the check on the instance decides) but reported in `warnings`.
pub fn inspect_agent(path: &Path, warnings: &mut Vec<String>) -> Result<AgentBinary, BakeError> {
    let err = |message: String| BakeError::Agent {
        path: path.to_path_buf(),
        message,
    };
    let elf = elf_info(path).map_err(|m| {
        err(format!(
            "{m}; give the static agent with --agent (tools/lib.sh build_static_agent builds it)"
        ))
    })?;
    if let Some(interp) = &elf.interpreter {
        warnings.push(format!(
            "{} is dynamically linked (interpreter {interp}): it runs only on images with compatible libraries; the static agent (tools/lib.sh build_static_agent) runs on any",
            path.display()
        ));
    }
    let out = std::process::Command::new(path)
        .arg("--version")
        .output()
        .map_err(|e| err(format!("cannot run it: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .split_whitespace()
        .nth(1)
        .filter(|_| out.status.success() && text.starts_with("cedana-agent"))
        .ok_or_else(|| {
            err(format!(
                "`--version` said {:?}: is this cedana-agent?",
                text.trim()
            ))
        })?
        .to_string();
    Ok(AgentBinary {
        path: path.to_path_buf(),
        version,
        elf,
    })
}

/// The default agent: `cedana-agent` next to this driver's executable.
pub fn default_agent() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.join("cedana-agent");
    p.is_file().then_some(p)
}

/// CRIU as it will be installed: the binary, and (unless it is static) the dynamic loader and
/// every library it loads, all to go into [`CRIU_DIR`].
#[derive(Clone, Debug)]
pub struct CriuBundle {
    pub version: String,
    /// (local file, name in [`CRIU_DIR`], mode)
    pub files: Vec<(PathBuf, String, u32)>,
    /// Whether the bundle runs through its own loader (else the binary is static).
    pub with_loader: bool,
}

const LOADER_NAME: &str = "ld-linux-x86-64.so.2";

/// Gathers CRIU from `source`: a folder laid out as tools/deps.sh installs it (Debian's CRIU
/// package unpacked with its own loader and libc: `usr/sbin/criu`,
/// `usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2`), or a CRIU executable.
pub fn criu_bundle(source: &Path) -> Result<CriuBundle, BakeError> {
    let err = |message: String| BakeError::Criu {
        path: source.to_path_buf(),
        message,
    };
    let (binary, loader, libpath): (PathBuf, Option<PathBuf>, Option<String>) = if source.is_dir() {
        let binary = source.join("usr/sbin/criu");
        let libdir = source.join("usr/lib/x86_64-linux-gnu");
        let loader = [
            libdir.join(LOADER_NAME),
            source.join("lib64").join(LOADER_NAME),
        ]
        .into_iter()
        .find(|p| p.is_file());
        let Some(loader) = loader.filter(|_| binary.is_file()) else {
            return Err(err(format!(
                "expected usr/sbin/criu and usr/lib/x86_64-linux-gnu/{LOADER_NAME} in it (the layout tools/deps.sh installs); run tools/deps.sh or give --criu"
            )));
        };
        let libpath = format!(
            "{}:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu",
            libdir.display()
        );
        (binary, Some(loader), Some(libpath))
    } else if source.is_file() {
        let elf = elf_info(source).map_err(&err)?;
        let loader = elf.interpreter.map(PathBuf::from);
        (source.to_path_buf(), loader, None)
    } else {
        return Err(err(
            "no such file or folder; run tools/deps.sh (it installs CRIU there) or give --criu"
                .into(),
        ));
    };

    let run = |args: &[&str]| -> Result<std::process::Output, BakeError> {
        let mut cmd = match &loader {
            Some(l) => {
                let mut c = std::process::Command::new(l);
                if let Some(lp) = &libpath {
                    c.arg("--library-path").arg(lp);
                }
                c.arg(&binary);
                c
            }
            None => std::process::Command::new(&binary),
        };
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| err(format!("cannot run {}: {e}", binary.display())))
    };
    let out = run(&["--version"])?;
    let version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Version:").map(|v| v.trim().to_string()))
        .filter(|_| out.status.success())
        .ok_or_else(|| {
            err(format!(
                "`criu --version` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        })?;
    if !version_at_least(&version, 4, 2) {
        return Err(err(format!(
            "CRIU {version} is too old: Linux 6.13+ needs 4.1 and sockets on 6.16+ need 4.2; tools/deps.sh installs a current one"
        )));
    }

    let mut files = vec![(binary.clone(), "criu".to_string(), 0o755)];
    let Some(loader) = loader else {
        return Ok(CriuBundle {
            version,
            files,
            with_loader: false,
        });
    };
    // Exactly what the loader resolves, each under the name CRIU asks for.
    let mut list = std::process::Command::new(&loader);
    if let Some(lp) = &libpath {
        list.arg("--library-path").arg(lp);
    }
    let out = list
        .arg("--list")
        .arg(&binary)
        .output()
        .map_err(|e| err(format!("cannot run {} --list: {e}", loader.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not found") {
        return Err(err(format!(
            "its libraries cannot all be found: {}{}",
            text.lines()
                .filter(|l| l.contains("not found"))
                .collect::<Vec<_>>()
                .join("; "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    files.push((canonical(&loader, &err)?, LOADER_NAME.to_string(), 0o755));
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(name), Some("=>"), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if name.starts_with('/') || name == LOADER_NAME {
            continue;
        }
        files.push((canonical(Path::new(path), &err)?, name.to_string(), 0o644));
    }
    Ok(CriuBundle {
        version,
        files,
        with_loader: true,
    })
}

fn canonical(p: &Path, err: &dyn Fn(String) -> BakeError) -> Result<PathBuf, BakeError> {
    std::fs::canonicalize(p).map_err(|e| err(format!("cannot resolve {}: {e}", p.display())))
}

/// `4.2.1` ≥ 4.2?
fn version_at_least(v: &str, major: u32, minor: u32) -> bool {
    let mut it = v
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let ma: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let mi: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (ma, mi) >= (major, minor)
}

/// The `criu` command installed at [`CRIU_COMMAND`].
pub fn criu_wrapper(bundle: &CriuBundle) -> String {
    if bundle.with_loader {
        format!(
            "#!/bin/sh\n\
             # CRIU {v} with the loader and libraries it was built for (installed by cedana-driver bake).\n\
             D={CRIU_DIR}\n\
             exec \"$D/{LOADER_NAME}\" --library-path \"$D\" \"$D/criu\" \"$@\"\n",
            v = bundle.version
        )
    } else {
        format!(
            "#!/bin/sh\n\
             # CRIU {v} (installed by cedana-driver bake).\n\
             exec {CRIU_DIR}/criu \"$@\"\n",
            v = bundle.version
        )
    }
}

/// The agent's systemd unit: `cedana-agent daemon` for the worker [`WORKER_ENV`] describes.
pub fn unit_file() -> String {
    format!(
        "[Unit]\n\
         Description=Cedana agent (this machine's worker daemon: runs, checkpoints and restores the job's tasks)\n\
         Documentation=https://github.com/cedana/cedana-rs\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         # Written at boot by the worker's user-data; without it this machine is no worker yet.\n\
         ConditionPathExists={WORKER_ENV}\n\
         \n\
         [Service]\n\
         Type=simple\n\
         EnvironmentFile={WORKER_ENV}\n\
         Environment=CEDANA_CRIU={CRIU_COMMAND}\n\
         ExecStart={AGENT_PATH} daemon --token-file {TOKEN_FILE}\n\
         Restart=on-failure\n\
         RestartSec=2\n\
         # Tasks outlive an agent restart: only the agent itself is stopped.\n\
         KillMode=process\n\
         LimitNOFILE=1048576\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// The launch template's user-data. cedana-driver launches each worker with user-data of its
/// own (it writes [`WORKER_ENV`] and the token, then starts the agent); an instance started
/// from the template as is starts the agent when those settings are already on it.
pub fn template_user_data(agent_version: &str, criu_version: &str) -> String {
    format!(
        "#!/bin/sh\n\
         # Cedana worker image (cedana-driver bake: agent {agent_version}, CRIU {criu_version}).\n\
         # cedana-driver launches each worker with user-data of its own that writes {WORKER_ENV}\n\
         # (CEDANA_JOB, CEDANA_WORKER, CEDANA_NATS_URL, CEDANA_WATCH_SPOT) and the job's NATS token\n\
         # ({TOKEN_FILE}), then starts {UNIT_NAME}. Started from this template as is, the\n\
         # instance starts the agent if those settings are already there.\n\
         if [ -f {WORKER_ENV} ]; then\n\
         \x20 if [ -d /run/systemd/system ]; then\n\
         \x20   systemctl start --no-block {UNIT_NAME}\n\
         \x20 else\n\
         \x20   set -a; . {WORKER_ENV}; set +a\n\
         \x20   CEDANA_CRIU={CRIU_COMMAND} nohup {AGENT_PATH} daemon --token-file {TOKEN_FILE} >>/var/log/cedana-agent.log 2>&1 &\n\
         \x20 fi\n\
         fi\n"
    )
}

/// The worker's settings as the unit reads them ([`WORKER_ENV`]); values are quoted for
/// systemd's `EnvironmentFile=` and for `sh`'s `.` alike (single quotes, no quote inside).
pub fn worker_env(
    job: &str,
    worker: &str,
    nats_url: &str,
    shared_storage: Option<&Path>,
) -> Result<String, BakeError> {
    let q = |name: &str, v: &str| {
        if v.contains('\'') || v.contains('\n') || v.contains('\\') {
            Err(BakeError::Invalid(format!(
                "{name} {v:?} has a quote, backslash or newline, which the worker's environment file cannot hold"
            )))
        } else {
            Ok(format!("{name}='{v}'\n"))
        }
    };
    let mut s = String::new();
    s += &q("CEDANA_JOB", job)?;
    s += &q("CEDANA_WORKER", worker)?;
    s += &q("CEDANA_NATS_URL", nats_url)?;
    s += "CEDANA_WATCH_SPOT='true'\n";
    if let Some(dir) = shared_storage {
        s += &q("CEDANA_SHARED_STORAGE", &dir.display().to_string())?;
    }
    Ok(s)
}

/// The `#cloud-config` user-data of the bake instance: the host key made for it and the keys
/// allowed to log in (as root too: `disable_root: false`). It holds a private key: it goes to
/// EC2 once and is never logged.
pub fn bake_cloud_config(host_key: &KeyPair, authorized: &[PublicKey]) -> String {
    // JSON strings are YAML double-quoted scalars: safe for any comment text.
    let quoted = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let mut s = String::from(
        "#cloud-config\n\
         # Written by cedana-driver bake for one bake instance: a host key made for it (removed\n\
         # before the image is made) and the key(s) of the user baking.\n\
         disable_root: false\n\
         ssh_pwauth: false\n\
         ssh_deletekeys: true\n\
         ssh_genkeytypes: []\n\
         ssh_keys:\n\
         \x20 ed25519_private: |\n",
    );
    for line in host_key.private_openssh.expose().lines() {
        s.push_str("    ");
        s.push_str(line);
        s.push('\n');
    }
    s.push_str(&format!(
        "  ed25519_public: {}\n",
        quoted(&host_key.public.to_openssh())
    ));
    s.push_str("ssh_authorized_keys:\n");
    for k in authorized {
        s.push_str(&format!("  - {}\n", quoted(&k.to_openssh())));
    }
    s
}

/// The script that puts the uploaded files in place (run as root from the upload folder).
pub fn install_script(bundle: &CriuBundle) -> String {
    let mut copy_criu = String::new();
    for (_, name, _) in &bundle.files {
        copy_criu.push_str(&format!(
            "cp \"$S/criu/{name}\" {CRIU_DIR}.cedana-new/{name}\n",
            name = name
        ));
    }
    format!(
        "#!/bin/sh\n\
         # Written by cedana-driver bake: installs the worker's files from this folder.\n\
         set -eu\n\
         S=$(cd \"$(dirname \"$0\")\" && pwd)\n\
         umask 022\n\
         put() {{ mkdir -p \"$(dirname \"$2\")\"; cp \"$1\" \"$2.cedana-new\"; chmod \"$3\" \"$2.cedana-new\"; mv -f \"$2.cedana-new\" \"$2\"; }}\n\
         put \"$S/cedana-agent\" {AGENT_PATH} 0755\n\
         rm -rf {CRIU_DIR}.cedana-new\n\
         mkdir -p {CRIU_DIR}.cedana-new\n\
         {copy_criu}\
         rm -rf {CRIU_DIR}\n\
         mv {CRIU_DIR}.cedana-new {CRIU_DIR}\n\
         put \"$S/criu-wrapper\" {CRIU_COMMAND} 0755\n\
         put \"$S/{UNIT_NAME}\" {UNIT_PATH} 0644\n\
         mkdir -p /etc/cedana /var/lib/cedana /etc/systemd/system/multi-user.target.wants\n\
         chmod 0700 /var/lib/cedana\n\
         ln -sf ../{UNIT_NAME} /etc/systemd/system/multi-user.target.wants/{UNIT_NAME}\n\
         if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi\n\
         echo installed\n"
    )
}

/// The script run last before the image is made: removes the temporary host keys, cloud-init's
/// copy of this instance's user-data (it holds the host private key) and the keys this bake
/// authorized, then the upload folder. Every instance started from the image makes host keys of
/// its own at first boot (cloud-init).
pub fn cleanup_script(instance_id: &str, authorized: &[PublicKey], login_home: &str) -> String {
    let mut drop_keys = String::new();
    for k in authorized {
        drop_keys.push_str(&format!("drop_key {}\n", sh_quote(&k.base64())));
    }
    format!(
        "#!/bin/sh\n\
         # Written by cedana-driver bake: what must not be in the image.\n\
         set -u\n\
         S=$(cd \"$(dirname \"$0\")\" && pwd)\n\
         rm -f /etc/ssh/ssh_host_*\n\
         rm -rf /var/lib/cloud/instances/{id} /var/lib/cloud/instance\n\
         drop_key() {{\n\
         \x20 for f in /root/.ssh/authorized_keys {home}/.ssh/authorized_keys; do\n\
         \x20   if [ -f \"$f\" ] && grep -qF \"$1\" \"$f\"; then\n\
         \x20     grep -vF \"$1\" \"$f\" > \"$f.cedana-new\" || true\n\
         \x20     chown --reference=\"$f\" \"$f.cedana-new\" 2>/dev/null || true\n\
         \x20     chmod 0600 \"$f.cedana-new\"\n\
         \x20     mv -f \"$f.cedana-new\" \"$f\"\n\
         \x20   fi\n\
         \x20 done\n\
         }}\n\
         {drop_keys}\
         rm -rf \"$S\"\n\
         sync\n\
         echo cleaned\n",
        id = sh_quote(instance_id),
        home = sh_quote(login_home),
    )
}

/// An AMI name: 3–128 characters of letters, digits and `()[] ./-'@_`.
pub fn check_image_name(name: &str) -> Result<(), BakeError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c);
    if (3..=128).contains(&name.len()) && name.chars().all(ok_char) {
        Ok(())
    } else {
        Err(BakeError::Invalid(format!(
            "image name {name:?} is not valid for EC2: 3 to 128 letters, digits, spaces and ()[]./-'@_"
        )))
    }
}

/// A launch template name: 3–128 characters of letters, digits and `()./-_`.
pub fn check_template_name(name: &str) -> Result<(), BakeError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "()./-_".contains(c);
    if (3..=128).contains(&name.len()) && name.chars().all(ok_char) {
        Ok(())
    } else {
        Err(BakeError::Invalid(format!(
            "launch template name {name:?} is not valid for EC2: 3 to 128 letters, digits and ()./-_"
        )))
    }
}

/// `uname -m` of a machine vs the agent's ELF machine.
pub fn same_machine(uname: &str, elf: &str) -> bool {
    let norm = |s: &str| match s {
        "amd64" => "x86_64".to_string(),
        "arm64" => "aarch64".to_string(),
        o => o.to_string(),
    };
    norm(uname.trim()) == norm(elf)
}

/// `YYYYMMDD-HHMMSS` (UTC) of a Unix time, for default image names.
pub fn utc_stamp(unix: u64) -> String {
    // 2026-09-20T12:00:00Z → 20260920-120000
    crate::providers::catalog::Timestamp::from_epoch(unix)
        .as_str()
        .replace(['-', ':', 'Z'], "")
        .replace('T', "-")
}

#[cfg(feature = "aws")]
pub use flow::*;

#[cfg(feature = "aws")]
mod flow {
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::providers::aws::{self, Ec2, InstanceView, RunRequest, TemplateRequest};
    use crate::util::ssh::{
        Auth, ConnectOptions, HostKeyPolicy, Remote, SshError, Upload, UploadSource,
    };

    /// Which of the instance's addresses to connect to.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
    pub enum ConnectVia {
        /// The public address if EC2 gave one, else the private one.
        #[default]
        Auto,
        Public,
        Private,
    }

    /// Everything `bake` needs, resolved (see [`BakeArgs`] for the command line).
    #[derive(Clone, Debug)]
    pub struct BakeOptions {
        pub region: String,
        /// The stock image to start from (AMI id).
        pub base_image: String,
        pub instance_type: String,
        /// EC2 key pair for the bake instance (and the template), if any.
        pub key_name: Option<String>,
        pub security_group_ids: Vec<String>,
        pub ssh_user: String,
        pub ssh_port: u16,
        pub auth: Auth,
        /// Public keys allowed to log in to the bake instance (the user's).
        pub authorized_keys: Vec<PublicKey>,
        /// Verify the host with this known_hosts file instead of the key the driver generated.
        pub known_hosts: Option<PathBuf>,
        pub connect_via: ConnectVia,
        pub agent: PathBuf,
        /// A CRIU prefix (tools/deps.sh's layout) or a CRIU executable.
        pub criu: PathBuf,
        /// Default: `cedana-worker-<agent version>-<UTC time>`.
        pub image_name: Option<String>,
        pub template_name: String,
        /// Until the instance runs.
        pub boot_timeout: Duration,
        /// Until SSH lets us in once it runs.
        pub ssh_timeout: Duration,
        /// Until the image is available.
        pub image_timeout: Duration,
    }

    /// What `bake` made.
    #[derive(Clone, Debug, serde::Serialize)]
    pub struct Baked {
        pub region: String,
        pub image_id: String,
        pub image_name: String,
        pub launch_template_id: String,
        pub launch_template_name: String,
        pub base_image: String,
        /// The bake instance (terminated).
        pub bake_instance: String,
        pub agent_version: String,
        pub criu_version: String,
        /// What `cedana-agent check` printed on the bake instance.
        pub check: String,
        /// Things worth knowing that did not stop the bake.
        pub warnings: Vec<String>,
    }

    /// Bakes an image: see the module documentation. `say` gets one line per step.
    pub async fn bake(
        ec2: &Ec2,
        opts: &BakeOptions,
        say: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Baked, BakeError> {
        // Everything that can be checked here is checked before anything is launched.
        check_template_name(&opts.template_name)?;
        if opts.authorized_keys.is_empty() {
            return Err(BakeError::Invalid(
                "no public key to authorize on the bake instance: give --ssh-key (with its .pub next to it) or load a key into ssh-agent".into(),
            ));
        }
        let mut warnings = Vec::new();
        let agent = inspect_agent(&opts.agent, &mut warnings)?;
        let criu = criu_bundle(&opts.criu)?;
        let image_name = match &opts.image_name {
            Some(n) => n.clone(),
            None => format!(
                "cedana-worker-{}-{}",
                agent.version,
                utc_stamp(cedana_protocol::now())
            ),
        };
        check_image_name(&image_name)?;
        for w in &warnings {
            say(&format!("warning: {w}"));
        }
        say(&format!(
            "agent {} ({}), CRIU {} ({} files)",
            agent.version,
            agent.path.display(),
            criu.version,
            criu.files.len()
        ));

        let client = ec2.client(&opts.region);
        match aws::describe_image(&client, &opts.base_image).await? {
            None => {
                return Err(BakeError::Invalid(format!(
                    "base image {} does not exist in {} (or this account cannot see it): check --base-image and --region",
                    opts.base_image, opts.region
                )))
            }
            Some(img) => {
                if let Some(arch) = img.architecture.as_deref() {
                    if !same_machine(arch, &agent.elf.machine) {
                        return Err(BakeError::Agent {
                            path: agent.path.clone(),
                            message: format!(
                                "it is built for {} but base image {} is {arch}: give --agent built for {arch}, or a base image for {}",
                                agent.elf.machine, opts.base_image, agent.elf.machine
                            ),
                        });
                    }
                }
            }
        }

        let host_key = crate::util::ssh::generate_ed25519(&format!("cedana-bake {image_name}"))?;
        let user_data = bake_cloud_config(&host_key, &opts.authorized_keys);
        let request = RunRequest {
            image_id: Some(opts.base_image.clone()),
            launch_template: None,
            instance_type: opts.instance_type.clone(),
            zone: None,
            spot: false,
            max_price: None,
            user_data,
            key_name: opts.key_name.clone(),
            security_group_ids: opts.security_group_ids.clone(),
            tags: vec![
                ("Name".into(), format!("cedana-bake {image_name}")),
                ("cedana:bake".into(), image_name.clone()),
            ],
            ..Default::default()
        };
        // Ctrl-C or SIGTERM from here on ends the bake with its instance terminated: the
        // handlers are in place before the launch (a signal during it is seen right after).
        let signal = |kind: tokio::signal::unix::SignalKind| {
            tokio::signal::unix::signal(kind).map_err(|e| {
                BakeError::Invalid(format!("cannot watch for Ctrl-C and SIGTERM: {e}"))
            })
        };
        let mut sigint = signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut sigterm = signal(tokio::signal::unix::SignalKind::terminate())?;
        let instance = aws::run_instance(&client, &request).await?;
        say(&format!(
            "launched bake instance {instance} ({}, {}) in {}",
            opts.base_image, opts.instance_type, opts.region
        ));

        let work = after_launch(
            &client,
            opts,
            &instance,
            &host_key.public,
            &agent,
            &criu,
            &image_name,
            say,
        );
        let result = tokio::select! {
            r = work => r,
            _ = sigint.recv() => Err(BakeError::Interrupted { instance: instance.clone() }),
            _ = sigterm.recv() => Err(BakeError::Interrupted { instance: instance.clone() }),
        };
        // The bake instance goes in every case.
        match aws::terminate(&client, &instance).await {
            Ok(()) => say(&format!("terminated bake instance {instance}")),
            Err(e) => {
                let m = format!(
                    "could not terminate bake instance {instance}: {e}; terminate it yourself (it is tagged cedana:bake)"
                );
                tracing::warn!("{m}");
                say(&format!("warning: {m}"));
                warnings.push(m);
            }
        }
        let (image_id, launch_template_id, check) = result?;
        Ok(Baked {
            region: opts.region.clone(),
            image_id,
            image_name,
            launch_template_id,
            launch_template_name: opts.template_name.clone(),
            base_image: opts.base_image.clone(),
            bake_instance: instance,
            agent_version: agent.version,
            criu_version: criu.version,
            check,
            warnings,
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn after_launch(
        client: &aws_sdk_ec2::Client,
        opts: &BakeOptions,
        instance: &str,
        host_key: &PublicKey,
        agent: &AgentBinary,
        criu: &CriuBundle,
        image_name: &str,
        say: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(String, String, String), BakeError> {
        let view = aws::wait_running(client, instance, opts.boot_timeout).await?;
        let address = address_of(&view, opts.connect_via).ok_or_else(|| BakeError::Remote {
            instance: instance.to_string(),
            message: format!(
                "EC2 reports no {} address for it",
                match opts.connect_via {
                    ConnectVia::Public => "public",
                    ConnectVia::Private => "private",
                    ConnectVia::Auto => "public or private",
                }
            ),
        })?;
        say(&format!(
            "{instance} is running at {address}; connecting as {} (host key {})",
            opts.ssh_user,
            match &opts.known_hosts {
                Some(p) => format!("from {}", p.display()),
                None => host_key.fingerprint(),
            }
        ));
        let policy = match &opts.known_hosts {
            Some(p) => HostKeyPolicy::KnownHosts(p.clone()),
            None => HostKeyPolicy::Expect(host_key.clone()),
        };
        let mut connect = ConnectOptions::new(&address, &opts.ssh_user, policy, opts.auth.clone());
        connect.port = opts.ssh_port;
        let remote = connect_when_up(connect, opts.ssh_timeout)
            .await
            .map_err(|e| match e {
                BakeError::Ssh(e) if e.is_transient() => BakeError::Remote {
                    instance: instance.to_string(),
                    message: format!(
                        "no SSH at {address} port {} within {} s ({e}): check that a security group lets this machine reach that port, that the address is reachable from here (--connect-via), and that the image runs sshd and cloud-init",
                        opts.ssh_port,
                        opts.ssh_timeout.as_secs()
                    ),
                },
                other => other,
            })?;

        let check = provision(&remote, opts, instance, agent, criu, say).await?;
        drop(remote);

        say(&format!("creating image {image_name} from {instance}"));
        let description = format!(
            "Cedana worker: cedana-agent {} with CRIU {}, from {} (cedana-driver bake)",
            agent.version, criu.version, opts.base_image
        );
        let image = aws::create_image(client, instance, image_name, &description).await?;
        aws::wait_image_available(client, &image, opts.image_timeout)
            .await
            .map_err(|e| BakeError::AfterImage {
                image: image.clone(),
                message: format!("it did not become available: {e}"),
            })?;
        say(&format!("image {image} is available"));

        let template = aws::ensure_launch_template(
            client,
            &TemplateRequest {
                name: opts.template_name.clone(),
                image_id: image.clone(),
                instance_type: None,
                key_name: opts.key_name.clone(),
                security_group_ids: opts.security_group_ids.clone(),
                user_data: template_user_data(&agent.version, &criu.version),
            },
        )
        .await
        .map_err(|e| BakeError::AfterImage {
            image: image.clone(),
            message: format!("launch template {} failed: {e}", opts.template_name),
        })?;
        say(&format!(
            "launch template {} ({template}) now starts workers from {image}",
            opts.template_name
        ));
        Ok((image, template, check))
    }

    fn address_of(view: &InstanceView, via: ConnectVia) -> Option<String> {
        let public = view.public_ip.clone().filter(|s| !s.is_empty());
        let private = view.private_ip.clone().filter(|s| !s.is_empty());
        match via {
            ConnectVia::Auto => public.or(private),
            ConnectVia::Public => public,
            ConnectVia::Private => private,
        }
    }

    /// Connects once sshd answers: connection failures are retried (the machine is booting),
    /// a refused login for a while (cloud-init may write the key after sshd starts), a wrong
    /// host key never.
    async fn connect_when_up(opts: ConnectOptions, within: Duration) -> Result<Remote, BakeError> {
        let deadline = Instant::now() + within;
        let mut refused_since: Option<Instant> = None;
        loop {
            match Remote::connect(opts.clone()).await {
                Ok(r) => return Ok(r),
                Err(e) => {
                    let now = Instant::now();
                    let retry = match &e {
                        e if e.is_transient() => true,
                        SshError::AuthRejected { .. } => {
                            let since = *refused_since.get_or_insert(now);
                            now.duration_since(since) < Duration::from_secs(60)
                        }
                        _ => false,
                    };
                    if !retry || now >= deadline {
                        return Err(e.into());
                    }
                    tracing::debug!(error = %e, "SSH not ready yet");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    }

    const STEP: Duration = Duration::from_secs(120);

    async fn run(
        remote: &Remote,
        instance: &str,
        command: &str,
        timeout: Duration,
    ) -> Result<crate::util::ssh::ExecOutput, BakeError> {
        let out = remote.exec(command, timeout).await?;
        if out.success() {
            Ok(out)
        } else {
            Err(BakeError::Remote {
                instance: instance.to_string(),
                message: format!(
                    "`{command}` failed (status {}{}):\n{}",
                    out.status,
                    out.signal
                        .as_deref()
                        .map(|s| format!(", signal {s}"))
                        .unwrap_or_default(),
                    out.tail(30)
                ),
            })
        }
    }

    /// Uploads, installs, checks, cleans up; returns the check's output.
    async fn provision(
        remote: &Remote,
        opts: &BakeOptions,
        instance: &str,
        agent: &AgentBinary,
        criu: &CriuBundle,
        say: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<String, BakeError> {
        let facts = run(
            remote,
            instance,
            "uname -m; id -u; printf '%s\\n' \"$HOME\"",
            STEP,
        )
        .await?;
        let mut lines = facts.stdout.lines();
        let (machine, uid, home) = (
            lines.next().unwrap_or_default().to_string(),
            lines.next().unwrap_or_default().trim().to_string(),
            lines.next().unwrap_or("/root").to_string(),
        );
        if !same_machine(&machine, &agent.elf.machine) {
            return Err(BakeError::Remote {
                instance: instance.to_string(),
                message: format!(
                    "it is {} but the agent {} is built for {}: bake an image of the agent's architecture or give --agent for {}",
                    machine.trim(),
                    agent.path.display(),
                    agent.elf.machine,
                    machine.trim()
                ),
            });
        }
        let sudo = if uid == "0" {
            ""
        } else {
            run(remote, instance, "sudo -n true", STEP).await.map_err(|_| {
                BakeError::Remote {
                    instance: instance.to_string(),
                    message: format!(
                        "{} is not root and cannot use sudo without a password: use --ssh-user root or a user with passwordless sudo",
                        opts.ssh_user
                    ),
                }
            })?;
            "sudo -n "
        };
        // cloud-init may still be finishing (it rewrites files we are about to change).
        let _ = remote
            .exec(
                &format!("if command -v cloud-init >/dev/null 2>&1 && [ -d /run/cloud-init ]; then {sudo}cloud-init status --wait >/dev/null 2>&1; fi; true"),
                Duration::from_secs(600),
            )
            .await;

        let staging = run(
            remote,
            instance,
            "mktemp -d /tmp/cedana-bake.XXXXXXXX",
            STEP,
        )
        .await?
        .stdout
        .trim()
        .to_string();
        if !staging.starts_with("/tmp/cedana-bake.") {
            return Err(BakeError::Remote {
                instance: instance.to_string(),
                message: format!("mktemp printed {staging:?}"),
            });
        }
        run(
            remote,
            instance,
            &format!("mkdir {}/criu", sh_quote(&staging)),
            STEP,
        )
        .await?;
        let mut files = vec![Upload {
            source: UploadSource::File(agent.path.clone()),
            remote: format!("{staging}/cedana-agent"),
            mode: 0o755,
        }];
        for (local, name, mode) in &criu.files {
            files.push(Upload {
                source: UploadSource::File(local.clone()),
                remote: format!("{staging}/criu/{name}"),
                mode: *mode,
            });
        }
        let generated = [
            ("criu-wrapper", criu_wrapper(criu), 0o755),
            (UNIT_NAME, unit_file(), 0o644),
            ("install.sh", install_script(criu), 0o755),
            (
                "cleanup.sh",
                cleanup_script(instance, &opts.authorized_keys, &home),
                0o755,
            ),
        ];
        for (name, text, mode) in generated {
            files.push(Upload {
                source: UploadSource::Bytes(text.into_bytes()),
                remote: format!("{staging}/{name}"),
                mode,
            });
        }
        let total = crate::util::ssh::total_len(&files)?;
        say(&format!(
            "uploading the agent and CRIU ({:.1} MiB)",
            total as f64 / 1_048_576.0
        ));
        let bar = crate::util::ssh::progress_bar(total, "upload");
        remote.upload(files, bar.clone()).await?;
        bar.finish_and_clear();

        run(
            remote,
            instance,
            &format!("{sudo}sh {}/install.sh", sh_quote(&staging)),
            STEP,
        )
        .await?;
        say("installed; running `cedana-agent check` there");
        let check = remote
            .exec(
                &format!("{sudo}env CEDANA_CRIU={CRIU_COMMAND} {AGENT_PATH} check"),
                STEP,
            )
            .await?;
        let report = format!("{}{}", check.stdout, check.stderr);
        if !check.success() {
            return Err(BakeError::CheckFailed {
                instance: instance.to_string(),
                output: report.trim_end().to_string(),
            });
        }
        say("check passed; removing the temporary host keys and the bake's own traces");
        run(
            remote,
            instance,
            &format!("{sudo}sh {}/cleanup.sh", sh_quote(&staging)),
            STEP,
        )
        .await?;
        Ok(report)
    }

    /// The `cedana-driver bake` command line.
    #[derive(clap::Args, Clone, Debug)]
    pub struct BakeArgs {
        /// The stock image to start from (AMI id): a Linux image with cloud-init and sshd
        /// (Debian, Ubuntu, Amazon Linux)
        #[arg(long, value_name = "AMI")]
        pub base_image: String,
        /// Region [default: the first of aws.enabled_regions, else AWS_REGION]
        #[arg(long)]
        pub region: Option<String>,
        /// Instance type of the bake instance
        #[arg(long, default_value = "t3.small")]
        pub instance_type: String,
        /// EC2 key pair for the bake instance and the template
        #[arg(long, value_name = "NAME")]
        pub key_name: Option<String>,
        /// Security group (id) for the bake instance and the template; it must let this
        /// machine reach port 22 [repeatable]
        #[arg(long = "security-group", value_name = "SG")]
        pub security_groups: Vec<String>,
        /// User to log in as (cloud-init lets root in with your key)
        #[arg(long, default_value = "root")]
        pub ssh_user: String,
        /// Private key to log in with [default: aws.ssh_key_path, else ssh-agent's keys]; its
        /// public half (PATH.pub, or derived) is given to the bake instance
        #[arg(long, value_name = "PATH")]
        pub ssh_key: Option<PathBuf>,
        /// Verify the bake instance's host key with this known_hosts file (alone:
        /// ~/.ssh/known_hosts) instead of the key the driver generates for it
        #[arg(long, value_name = "PATH", num_args = 0..=1)]
        pub known_hosts: Option<Option<PathBuf>>,
        /// Which address of the instance to connect to
        #[arg(long, value_enum, default_value_t = ConnectVia::Auto)]
        pub connect_via: ConnectVia,
        /// The agent to install [default: cedana-agent next to this program]; the static
        /// build (tools/lib.sh build_static_agent) runs on any image
        #[arg(long, value_name = "PATH")]
        pub agent: Option<PathBuf>,
        /// CRIU to install: the prefix tools/deps.sh unpacks it into, or a CRIU executable
        #[arg(long, value_name = "PATH", env = "CEDANA_CRIU_PREFIX", default_value = DEFAULT_CRIU_PREFIX)]
        pub criu: PathBuf,
        /// Name of the image [default: cedana-worker-<agent version>-<UTC time>]
        #[arg(long, value_name = "NAME")]
        pub image_name: Option<String>,
        /// Launch template to create, or to give a new default version [default:
        /// aws.launch_template, else cedana-worker]
        #[arg(long, value_name = "NAME")]
        pub launch_template: Option<String>,
        /// Seconds to wait for the instance to run and then for SSH
        #[arg(long, value_name = "SECS", default_value_t = 600)]
        pub boot_timeout: u64,
        /// Seconds to wait for the image to become available
        #[arg(long, value_name = "SECS", default_value_t = 3600)]
        pub image_timeout: u64,
        /// Print the result as JSON on stdout
        #[arg(long)]
        pub json: bool,
    }

    impl BakeArgs {
        /// Resolves the arguments against the config and the environment.
        pub fn options(&self, config: &crate::Config) -> Result<BakeOptions, BakeError> {
            let aws_cfg = config.aws.clone().unwrap_or_default();
            let region = self
                .region
                .clone()
                .or_else(|| aws_cfg.enabled_regions.first().cloned())
                .or_else(|| std::env::var("AWS_REGION").ok())
                .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
                .filter(|r| !r.is_empty())
                .ok_or_else(|| {
                    BakeError::Invalid(
                        "no region: give --region, or set aws.enabled_regions in the config or AWS_REGION".into(),
                    )
                })?;
            let key = self.ssh_key.clone().or(aws_cfg.ssh_key_path.clone());
            let (auth, authorized_keys) = match key {
                Some(path) => {
                    let public = crate::util::ssh::public_key_of(&path)?;
                    (Auth::KeyFile(path), vec![public])
                }
                None if std::env::var_os("SSH_AUTH_SOCK").is_some() => {
                    (Auth::Agent, crate::util::ssh::agent_public_keys()?)
                }
                None => {
                    return Err(SshError::NoKey {
                        host: "the bake instance".into(),
                    }
                    .into())
                }
            };
            let known_hosts = match &self.known_hosts {
                None => None,
                Some(Some(p)) => Some(p.clone()),
                Some(None) => Some(HostKeyPolicy::default_known_hosts().ok_or_else(|| {
                    BakeError::Invalid("--known-hosts without a path needs $HOME".into())
                })?),
            };
            let agent = match &self.agent {
                Some(p) => p.clone(),
                None => default_agent().ok_or_else(|| BakeError::Agent {
                    path: PathBuf::from("cedana-agent"),
                    message: "there is none next to cedana-driver: give --agent (tools/lib.sh build_static_agent builds the static one)".into(),
                })?,
            };
            let template_name = self
                .launch_template
                .clone()
                .or(aws_cfg.launch_template.clone())
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| "cedana-worker".into());
            Ok(BakeOptions {
                region,
                base_image: self.base_image.clone(),
                instance_type: self.instance_type.clone(),
                key_name: self.key_name.clone(),
                security_group_ids: self.security_groups.clone(),
                ssh_user: self.ssh_user.clone(),
                ssh_port: 22,
                auth,
                authorized_keys,
                known_hosts,
                connect_via: self.connect_via,
                agent,
                criu: self.criu.clone(),
                image_name: self.image_name.clone(),
                template_name,
                boot_timeout: Duration::from_secs(self.boot_timeout),
                ssh_timeout: Duration::from_secs(self.boot_timeout),
                image_timeout: Duration::from_secs(self.image_timeout),
            })
        }
    }

    /// `cedana-driver bake`: resolves the options, bakes, prints the ids (text or `--json`).
    pub fn run_bake(args: BakeArgs, config: &crate::Config) -> anyhow::Result<Baked> {
        let opts = args.options(config)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let aws_cfg = config.aws.clone().unwrap_or_default();
        let connect = aws::ConnectOptions {
            region: Some(opts.region.clone()),
            ..Default::default()
        };
        let baked = rt.block_on(async {
            let ec2 = Ec2::connect(&connect).await?;
            let say = |m: &str| eprintln!("==> {m}");
            anyhow::Ok(bake(&ec2, &opts, &say).await?)
        })?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&baked)?);
        } else {
            println!("image            {} ({})", baked.image_id, baked.image_name);
            println!(
                "launch template  {} ({})",
                baked.launch_template_id, baked.launch_template_name
            );
            println!("region           {}", baked.region);
            println!(
                "agent {}, CRIU {}; bake instance {} terminated",
                baked.agent_version, baked.criu_version, baked.bake_instance
            );
            if aws_cfg.launch_template.as_deref() != Some(baked.launch_template_name.as_str()) {
                println!(
                    "To launch workers from it, set \"launch_template\": \"{}\" in the aws block of your cedana_config.json.",
                    baked.launch_template_name
                );
            }
        }
        Ok(baked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::ssh::{KeyPair, PublicKey};

    #[test]
    fn the_cloud_config_is_yaml_with_the_host_key_and_the_users_keys() {
        let private = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nQyNTUxOQAAACBfakefake\n-----END OPENSSH PRIVATE KEY-----\n";
        let host = KeyPair {
            private_openssh: cedana_protocol::config::Secret::new(private),
            public: PublicKey::parse(
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl cedana-bake x",
                "t",
            )
            .unwrap(),
        };
        let user = PublicKey::parse(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me: \"#odd\" 'comment'",
            "t",
        )
        .unwrap();
        let text = bake_cloud_config(&host, std::slice::from_ref(&user));
        assert!(text.starts_with("#cloud-config\n"));
        let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(doc["ssh_keys"]["ed25519_private"].as_str(), Some(private));
        assert_eq!(
            doc["ssh_keys"]["ed25519_public"].as_str(),
            Some(host.public.to_openssh().as_str())
        );
        assert_eq!(
            doc["ssh_authorized_keys"][0].as_str(),
            Some(user.to_openssh().as_str())
        );
        assert_eq!(doc["disable_root"].as_bool(), Some(false));
        assert_eq!(doc["ssh_genkeytypes"].as_sequence().map(Vec::len), Some(0));
    }

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(951_782_400), "20000229-000000");
        assert_eq!(utc_stamp(1_735_689_599), "20241231-235959");
    }

    #[test]
    fn versions_compare() {
        assert!(version_at_least("4.2", 4, 2));
        assert!(version_at_least("4.2.1", 4, 2));
        assert!(version_at_least("5.0", 4, 2));
        assert!(!version_at_least("4.1.1", 4, 2));
        assert!(!version_at_least("3.17.1", 4, 2));
        assert!(!version_at_least("", 4, 2));
    }

    #[test]
    fn names_are_checked_before_anything_is_launched() {
        assert!(check_image_name("cedana-worker 0.1.0 (2025-01-01)").is_ok());
        let e = check_image_name("a").unwrap_err().to_string();
        assert!(e.contains("\"a\""), "{e}");
        assert!(check_image_name("no*stars").is_err());
        assert!(check_template_name("cedana-worker").is_ok());
        assert!(check_template_name("no spaces").is_err());
    }

    #[test]
    fn machines_match_across_spellings() {
        assert!(same_machine("x86_64\n", "x86_64"));
        assert!(same_machine("arm64", "aarch64"));
        assert!(!same_machine("aarch64", "x86_64"));
    }

    #[test]
    fn worker_env_refuses_what_it_cannot_quote() {
        let env = worker_env(
            "j-1",
            "w1",
            "nats://10.0.0.1:4222",
            Some(Path::new("/mnt/s")),
        )
        .unwrap();
        assert_eq!(
            env,
            "CEDANA_JOB='j-1'\nCEDANA_WORKER='w1'\nCEDANA_NATS_URL='nats://10.0.0.1:4222'\nCEDANA_WATCH_SPOT='true'\nCEDANA_SHARED_STORAGE='/mnt/s'\n"
        );
        assert!(worker_env("j'1", "w", "n", None).is_err());
    }

    #[test]
    fn the_unit_runs_the_agent_from_the_worker_settings() {
        let u = unit_file();
        assert!(u.contains(&format!("EnvironmentFile={WORKER_ENV}")));
        assert!(u.contains(&format!("ConditionPathExists={WORKER_ENV}")));
        assert!(u.contains(&format!(
            "ExecStart={AGENT_PATH} daemon --token-file {TOKEN_FILE}"
        )));
        assert!(u.contains("KillMode=process"));
    }

    #[test]
    fn elf_headers_are_read() {
        let me = std::env::current_exe().unwrap();
        let info = elf_info(&me).unwrap();
        assert_eq!(info.machine, std::env::consts::ARCH);
        let e = elf_info(Path::new("/etc/hostname")).unwrap_err();
        assert!(e.contains("ELF") || e.contains("short"), "{e}");
    }
}
