//! The driver's SSH client (`cedana_driver::util::ssh`, used by `bake`) against a real OpenSSH server
//! on loopback: commands, uploads, and every way a host key or a login can be wrong. Needs
//! root and openssh-server (tools/deps.sh); CI has both.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cedana_driver::util::ssh::{
    self, Auth, ConnectOptions, HostKeyPolicy, PublicKey, Remote, Ssh, SshError, Upload,
    UploadSource,
};
use cedana_tests::sshd::{keygen, Sshd};

fn opts(sshd: &Sshd, host_key: HostKeyPolicy) -> ConnectOptions {
    let mut o = ConnectOptions::new(
        "127.0.0.1",
        "root",
        host_key,
        Auth::KeyFile(sshd.user_key.private.clone()),
    );
    o.port = sshd.port;
    o.connect_timeout = Duration::from_secs(5);
    o.io_timeout = Duration::from_secs(20);
    o
}

fn expect_key(sshd: &Sshd) -> HostKeyPolicy {
    HostKeyPolicy::Expect(PublicKey::parse(sshd.host_public(), "test").unwrap())
}

fn connect(sshd: &Sshd) -> Ssh {
    Ssh::connect(&opts(sshd, expect_key(sshd))).unwrap_or_else(|e| panic!("{e}\n{}", sshd.log()))
}

fn no_bar() -> indicatif::ProgressBar {
    indicatif::ProgressBar::hidden()
}

/// Connects as bake does and, only if that succeeds, uploads `target`.
fn connect_and_upload(o: &ConnectOptions, target: &Path) -> Result<(), SshError> {
    let ssh = Ssh::connect(o)?;
    ssh.upload(
        &[Upload {
            source: UploadSource::Bytes(b"must not arrive".to_vec()),
            remote: target.display().to_string(),
            mode: 0o644,
        }],
        &no_bar(),
    )?;
    Ok(())
}

#[test]
fn exec_returns_stdout_stderr_and_exit_status() {
    let sshd = Sshd::start();
    let ssh = connect(&sshd);
    let out = ssh
        .exec("echo out; echo err >&2; exit 3", Duration::from_secs(20))
        .unwrap();
    assert_eq!(out.stdout, "out\n");
    assert_eq!(out.stderr, "err\n");
    assert_eq!(out.status, 3);
    assert!(!out.success());
    assert_eq!(out.tail(5), "err");

    let out = ssh.exec("id -u", Duration::from_secs(20)).unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout.trim(), "0");

    // Megabytes on both streams at once: read as they come, no stall on a full window.
    let out = ssh
        .exec(
            "head -c 3000000 /dev/zero | tr '\\0' o & head -c 3000000 /dev/zero | tr '\\0' e >&2; wait",
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(out.success(), "status {}", out.status);
    assert_eq!(out.stdout.len(), 3_000_000);
    assert!(out.stdout.bytes().all(|b| b == b'o'));
    assert_eq!(out.stderr.len(), 3_000_000);

    // A command killed by a signal reports it.
    let out = ssh.exec("kill -KILL $$", Duration::from_secs(20)).unwrap();
    assert!(!out.success());
    assert_eq!(out.signal.as_deref(), Some("KILL"), "{out:?}");
}

#[test]
fn upload_writes_content_and_mode_and_replaces_atomically() {
    let sshd = Sshd::start();
    let ssh = connect(&sshd);
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("payload");
    // 3 MiB of varied bytes (not a repeating block).
    let data: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&local, &data).unwrap();
    let remote_dir = tempfile::tempdir().unwrap();
    let target = remote_dir.path().join("agent");
    let small = remote_dir.path().join("unit.service");
    std::fs::write(&small, "old contents, to be replaced").unwrap();

    let files = vec![
        Upload {
            source: UploadSource::File(local.clone()),
            remote: target.display().to_string(),
            mode: 0o751,
        },
        Upload {
            source: UploadSource::Bytes(b"[Unit]\n".to_vec()),
            remote: small.display().to_string(),
            mode: 0o640,
        },
    ];
    let bar = indicatif::ProgressBar::hidden();
    let total = ssh::total_len(&files).unwrap();
    let sent = ssh.upload(&files, &bar).unwrap();
    assert_eq!(sent, total);
    assert_eq!(bar.position(), total);

    assert_eq!(std::fs::read(&target).unwrap(), data);
    let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o751, "{mode:o}");
    assert_eq!(std::fs::read_to_string(&small).unwrap(), "[Unit]\n");
    let mode = std::fs::metadata(&small).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640, "{mode:o}");
    // No temporary names left behind.
    let names: Vec<String> = std::fs::read_dir(remote_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    // A folder that does not exist is a clear error naming the remote path.
    let missing = remote_dir.path().join("no/such/dir/file");
    let e = ssh
        .upload(
            &[Upload {
                source: UploadSource::Bytes(vec![1, 2, 3]),
                remote: missing.display().to_string(),
                mode: 0o644,
            }],
            &no_bar(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains(&missing.display().to_string()), "{e}");
    assert!(e.contains("no such file"), "{e}");
}

#[test]
fn wrong_host_key_is_refused_with_both_fingerprints_and_nothing_is_uploaded() {
    let sshd = Sshd::start();
    let other_dir = tempfile::tempdir().unwrap();
    let other = keygen(&other_dir.path().join("other"), "ed25519");
    let expected = PublicKey::parse(&other.public, "test").unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    let target = target_dir.path().join("uploaded");

    let e = connect_and_upload(&opts(&sshd, HostKeyPolicy::Expect(expected)), &target).unwrap_err();
    assert!(matches!(e, SshError::HostKeyMismatch { .. }), "{e:?}");
    assert!(!e.is_transient());
    let msg = e.to_string();
    eprintln!("refused as expected: {msg}");
    assert!(msg.contains(&sshd.host_key.fingerprint()), "{msg}");
    assert!(msg.contains(&other.fingerprint()), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{}", sshd.port)), "{msg}");
    assert!(
        !target.exists(),
        "a file was uploaded to a host with the wrong key"
    );
    // The client never tried to log in.
    std::thread::sleep(Duration::from_millis(200));
    let log = sshd.log();
    assert!(!log.contains("Accepted publickey"), "{log}");

    // An expected RSA key while the server has ed25519 only: also refused.
    let rsa = keygen(&other_dir.path().join("rsa"), "rsa");
    let e = Ssh::connect(&opts(
        &sshd,
        HostKeyPolicy::Expect(PublicKey::parse(&rsa.public, "test").unwrap()),
    ))
    .unwrap_err();
    assert!(
        matches!(
            e,
            SshError::HostKeyMismatch { .. } | SshError::Handshake { .. }
        ),
        "{e:?}"
    );
}

#[test]
fn unknown_host_is_refused_with_an_empty_or_missing_known_hosts() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("uploaded");
    for (name, create) in [("empty", true), ("missing", false)] {
        let kh = dir.path().join(format!("known_hosts_{name}"));
        if create {
            std::fs::write(&kh, "# nothing yet\n").unwrap();
        }
        let e = connect_and_upload(&opts(&sshd, HostKeyPolicy::KnownHosts(kh.clone())), &target)
            .unwrap_err();
        assert!(matches!(e, SshError::UnknownHost { .. }), "{name}: {e:?}");
        let msg = e.to_string();
        eprintln!("refused as expected: {msg}");
        assert!(msg.contains(&sshd.host_key.fingerprint()), "{msg}");
        assert!(msg.contains(&kh.display().to_string()), "{msg}");
        // Never trusted on first use: the file is left as it was.
        if create {
            assert_eq!(std::fs::read_to_string(&kh).unwrap(), "# nothing yet\n");
        } else {
            assert!(!kh.exists());
        }
    }
    assert!(!target.exists());

    // An entry for the same address on another port does not count.
    let kh = dir.path().join("known_hosts_other_port");
    let line = sshd
        .known_hosts_line()
        .replace(&format!("]:{} ", sshd.port), "]:1 ");
    assert!(line.starts_with("[127.0.0.1]:1 "), "{line}");
    std::fs::write(&kh, format!("{line}\n")).unwrap();
    let e = Ssh::connect(&opts(&sshd, HostKeyPolicy::KnownHosts(kh))).unwrap_err();
    assert!(matches!(e, SshError::UnknownHost { .. }), "{e:?}");
}

#[test]
fn known_hosts_entries_are_accepted_plain_and_hashed_and_mismatches_refused() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let other = keygen(&dir.path().join("other"), "ed25519");
    let rsa = keygen(&dir.path().join("rsa"), "rsa");
    let field = |public: &str| {
        public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };

    // Plain, among other hosts' entries, a certificate authority line libssh2 cannot read and
    // an RSA key of another host.
    let kh = dir.path().join("known_hosts");
    std::fs::write(
        &kh,
        format!(
            "# comment\n\
             other.example.org {}\n\
             @cert-authority *.example.org {}\n\
             [10.0.0.9]:22 {}\n\
             {}\n",
            field(&other.public),
            field(&other.public),
            field(&rsa.public),
            sshd.known_hosts_line()
        ),
    )
    .unwrap();
    let ssh = Ssh::connect(&opts(&sshd, HostKeyPolicy::KnownHosts(kh.clone())))
        .unwrap_or_else(|e| panic!("{e}\n{}", sshd.log()));
    assert_eq!(
        ssh.exec("echo ok", Duration::from_secs(20)).unwrap().stdout,
        "ok\n"
    );
    drop(ssh);

    // Hashed, as ssh-keygen -H (and Debian's HashKnownHosts) writes them.
    let hashed = dir.path().join("known_hosts_hashed");
    std::fs::write(&hashed, format!("{}\n", sshd.known_hosts_line())).unwrap();
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-H", "-f"])
        .arg(&hashed)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&hashed).unwrap();
    assert!(text.starts_with("|1|"), "{text}");
    Ssh::connect(&opts(&sshd, HostKeyPolicy::KnownHosts(hashed)))
        .unwrap_or_else(|e| panic!("{e}\n{}", sshd.log()));

    // The host's entry holds another key: refused, both fingerprints named.
    let wrong = dir.path().join("known_hosts_wrong");
    std::fs::write(
        &wrong,
        format!("[127.0.0.1]:{} {}\n", sshd.port, field(&other.public)),
    )
    .unwrap();
    let e = Ssh::connect(&opts(&sshd, HostKeyPolicy::KnownHosts(wrong.clone()))).unwrap_err();
    assert!(matches!(e, SshError::HostKeyMismatch { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(&sshd.host_key.fingerprint()), "{msg}");
    assert!(msg.contains(&other.fingerprint()), "{msg}");
    assert!(msg.contains(&wrong.display().to_string()), "{msg}");

    // A revoked key is refused even when an entry also lists it.
    let revoked = dir.path().join("known_hosts_revoked");
    std::fs::write(
        &revoked,
        format!(
            "{}\n@revoked * {}\n",
            sshd.known_hosts_line(),
            field(sshd.host_public())
        ),
    )
    .unwrap();
    let e = Ssh::connect(&opts(&sshd, HostKeyPolicy::KnownHosts(revoked))).unwrap_err();
    assert!(matches!(e, SshError::RevokedHostKey { .. }), "{e:?}");
}

#[test]
fn a_key_the_server_does_not_know_is_refused_clearly() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let stranger = keygen(&dir.path().join("stranger"), "ed25519");
    let mut o = opts(&sshd, expect_key(&sshd));
    o.auth = Auth::KeyFile(stranger.private.clone());
    let e = Ssh::connect(&o).unwrap_err();
    assert!(matches!(e, SshError::AuthRejected { .. }), "{e:?}");
    let msg = e.to_string();
    eprintln!("refused as expected: {msg}");
    assert!(msg.contains("root"), "{msg}");
    assert!(
        msg.contains(&stranger.private.display().to_string()),
        "{msg}"
    );
    // The private key itself never shows.
    let secret = std::fs::read_to_string(&stranger.private).unwrap();
    let body = secret.lines().nth(1).unwrap();
    assert!(!msg.contains(body), "{msg}");

    // A missing key file is named.
    o.auth = Auth::KeyFile(PathBuf::from("/nonexistent/key.pem"));
    let e = Ssh::connect(&o).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/key.pem"), "{e}");

    // A user the server does not have.
    let mut o = opts(&sshd, expect_key(&sshd));
    o.user = "cedana-no-such-user".into();
    let e = Ssh::connect(&o).unwrap_err();
    assert!(matches!(e, SshError::AuthRejected { .. }), "{e:?}");
}

#[test]
fn ssh_agent_keys_log_in() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    // ssh-agent -D stays in the foreground: this test owns it by PID.
    let mut agent = std::process::Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ssh-agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "ssh-agent did not make its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let added = std::process::Command::new("ssh-add")
        .arg(&sshd.user_key.private)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    // libssh2 reads SSH_AUTH_SOCK; this test binary's other tests do not use the agent.
    std::env::set_var("SSH_AUTH_SOCK", &sock);
    let mut o = opts(&sshd, expect_key(&sshd));
    o.auth = Auth::Agent;
    let result = Ssh::connect(&o).and_then(|s| s.exec("echo agent", Duration::from_secs(20)));
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(result.unwrap().stdout, "agent\n");
}

#[test]
fn timeouts_are_bounded() {
    // A server that accepts and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let holder = std::thread::spawn(move || {
        let conn = silent.accept();
        std::thread::sleep(Duration::from_secs(8));
        drop(conn);
    });
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(&dir.path().join("k"), "ed25519");
    let mut o = ConnectOptions::new(
        "127.0.0.1",
        "root",
        HostKeyPolicy::Expect(PublicKey::parse(&key.public, "t").unwrap()),
        Auth::KeyFile(key.private.clone()),
    );
    o.port = port;
    o.connect_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let e = Ssh::connect(&o).unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(matches!(e, SshError::Timeout { .. }), "{e:?}");
    assert!(e.is_transient());
    holder.join().unwrap();

    // Nothing listening: refused at once, and worth another try later.
    o.port = cedana_tests::free_port();
    let e = Ssh::connect(&o).unwrap_err();
    assert!(matches!(e, SshError::Connect { .. }), "{e:?}");
    assert!(e.is_transient());

    // A command that outlives its bound.
    let sshd = Sshd::start();
    let ssh = connect(&sshd);
    let started = Instant::now();
    let e = ssh.exec("sleep 30", Duration::from_secs(1)).unwrap_err();
    assert!(matches!(e, SshError::Timeout { .. }), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The session is still usable afterwards.
    let out = ssh
        .exec("echo still here", Duration::from_secs(20))
        .unwrap();
    assert_eq!(out.stdout, "still here\n");
}

#[test]
fn async_remote_runs_on_the_blocking_pool() {
    let sshd = Sshd::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("f");
    rt.block_on(async {
        let remote = Remote::connect(opts(&sshd, expect_key(&sshd)))
            .await
            .unwrap();
        remote
            .upload(
                vec![Upload {
                    source: UploadSource::Bytes(b"x".to_vec()),
                    remote: target.display().to_string(),
                    mode: 0o600,
                }],
                indicatif::ProgressBar::hidden(),
            )
            .await
            .unwrap();
        let out = remote
            .exec(
                &format!("cat {}", ssh::sh_quote(&target.display().to_string())),
                Duration::from_secs(20),
            )
            .await
            .unwrap();
        assert_eq!(out.stdout, "x");
    });
}

#[test]
fn generated_host_keys_are_fresh_ed25519_pairs() {
    let a = ssh::generate_ed25519("cedana-bake i-1").unwrap();
    let b = ssh::generate_ed25519("cedana-bake i-2").unwrap();
    assert_eq!(a.public.algorithm(), "ssh-ed25519");
    assert_ne!(a.public.blob(), b.public.blob());
    let private = a.private_openssh.expose();
    assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
    // The Debug form hides the private half.
    let dbg = format!("{a:?}");
    assert!(!dbg.contains("PRIVATE KEY"), "{dbg}");
    // ssh-keygen agrees that the private half belongs to the public one.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k");
    std::fs::write(&p, private).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    let derived = ssh::public_key_of(&p).unwrap();
    assert_eq!(derived.blob(), a.public.blob());
}
