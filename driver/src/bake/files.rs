//! What `bake` puts on an image, generated here without touching the cloud: the paths, the
//! systemd unit, the worker's environment file, the user-data of the bake instance and of the
//! launch template, the install and cleanup scripts, the CRIU wrapper; and the checks of what
//! is uploaded (the agent's and CRIU's ELF headers, CRIU's bundle of libraries).

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::bake::error::BakeError;
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

/// Why a file is not an executable `bake` can inspect.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot open: {0}")]
    Open(std::io::Error),
    #[error("too short to be an executable")]
    TooShort,
    #[error("not an ELF executable")]
    NotElf,
    #[error("not a 64-bit little-endian ELF executable")]
    NotElf64Le,
    #[error("malformed program headers")]
    MalformedProgramHeaders,
    #[error("truncated program headers")]
    TruncatedProgramHeaders,
    #[error("truncated interpreter name")]
    TruncatedInterpreter,
}

/// Reads the ELF header and program headers of `path`.
pub fn elf_info(path: &Path) -> Result<ElfInfo, ElfError> {
    let mut f = std::fs::File::open(path).map_err(ElfError::Open)?;
    let mut head = vec![0u8; 64];
    f.read_exact(&mut head).map_err(|_| ElfError::TooShort)?;
    if &head[..4] != b"\x7fELF" {
        return Err(ElfError::NotElf);
    }
    if head[4] != 2 || head[5] != 1 {
        return Err(ElfError::NotElf64Le);
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
        return Err(ElfError::MalformedProgramHeaders);
    }
    use std::io::Seek;
    let mut ph = vec![0u8; (phentsize * phnum) as usize];
    f.seek(std::io::SeekFrom::Start(phoff))
        .and_then(|_| f.read_exact(&mut ph))
        .map_err(|_| ElfError::TruncatedProgramHeaders)?;
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
                .map_err(|_| ElfError::TruncatedInterpreter)?;
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
        let elf = elf_info(source).map_err(|e| err(e.to_string()))?;
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
        let e = elf_info(Path::new("/etc/hostname"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ELF") || e.contains("short"), "{e}");
    }
}
