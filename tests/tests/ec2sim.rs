//! The instance simulator itself: instances launched through aws-sdk-ec2 against a real moto
//! server boot on this machine in namespaces of their own, run their user-data there (not on
//! this machine), answer at their moto private address, serve instance metadata with their own
//! id, run sshd with exactly the host key their `#cloud-config` gives, have the agent only when
//! their image is baked, and are torn down when moto terminates them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::InstanceType;
use cedana_tests::ec2sim::{base64_encode, ImageKind, SimConfig, SimState, Simulator, UserData};
use cedana_tests::moto::MotoServer;
use cedana_tests::*;

const STOCK: &str = "ami-0aaaaaaaaaaaaaaaa";
const BAKED: &str = "ami-0bbbbbbbbbbbbbbbb";
const BOOT: Duration = Duration::from_secs(60);

/// moto and a simulator of its instances (the simulator goes first).
struct Cloud {
    sim: Simulator,
    _moto: MotoServer,
    client: aws_sdk_ec2::Client,
}

impl Cloud {
    fn start(cfg: impl FnOnce(SimConfig) -> SimConfig) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the instance simulator needs root (network, PID and mount namespaces); CI runs as root"
        );
        let moto = MotoServer::start();
        let sim = Simulator::start(cfg(SimConfig::new(moto.url()).baked(BAKED)))
            .unwrap_or_else(|e| panic!("simulator: {e}"));
        let client = sim.client("us-east-1");
        Cloud {
            sim,
            _moto: moto,
            client,
        }
    }

    /// RunInstances with `user_data`; the instance id.
    fn launch(&self, ami: &str, user_data: &str, key: Option<&str>) -> String {
        let out = self
            .sim
            .block_on(
                self.client
                    .run_instances()
                    .image_id(ami)
                    .instance_type(InstanceType::T3Micro)
                    .min_count(1)
                    .max_count(1)
                    .user_data(base64_encode(user_data.as_bytes()))
                    .set_key_name(key.map(str::to_string))
                    .send(),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "RunInstances: {}",
                    aws_sdk_ec2::error::DisplayErrorContext(e)
                )
            });
        out.instances()[0].instance_id().unwrap().to_string()
    }

    fn terminate(&self, id: &str) {
        self.sim
            .block_on(self.client.terminate_instances().instance_ids(id).send())
            .unwrap_or_else(|e| {
                panic!(
                    "TerminateInstances: {}",
                    aws_sdk_ec2::error::DisplayErrorContext(e)
                )
            });
    }

    /// moto's private address of `id`.
    fn moto_private_ip(&self, id: &str) -> Ipv4Addr {
        let out = self
            .sim
            .block_on(self.client.describe_instances().instance_ids(id).send())
            .expect("DescribeInstances");
        out.reservations()[0].instances()[0]
            .private_ip_address()
            .expect("a private address")
            .parse()
            .expect("IPv4")
    }

    fn running(&self, id: &str) -> cedana_tests::ec2sim::SimInstance {
        self.sim
            .wait_running(id, BOOT)
            .unwrap_or_else(|e| panic!("{e}\nconsole:\n{}", self.sim.console(id)))
    }

    /// `sh -c script` in the instance; its stdout (asserting success).
    fn sh(&self, id: &str, script: &str) -> String {
        let out = self.sim.exec(id, script).expect("exec in the instance");
        assert!(
            out.status.success(),
            "`{script}` in {id} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Python inside the instance asking its metadata service (IMDSv2) for `paths`, one answer a
/// line (`HTTP <code>` for errors); the first line is what a request without a token got.
const IMDS_PY: &str = r#"
import sys, urllib.request as u, urllib.error as e
B = "http://169.254.169.254/latest/"
def get(p, t=None):
    h = {"X-aws-ec2-metadata-token": t} if t else {}
    try:
        return u.urlopen(u.Request(B + p, headers=h), timeout=5).read().decode().replace("\n", " ")
    except e.HTTPError as x:
        return "HTTP %d" % x.code
print(get("meta-data/instance-id"))
t = u.urlopen(u.Request(B + "api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}), timeout=5).read().decode()
for p in sys.argv[1:]:
    print(get(p, t))
"#;

fn imds(cloud: &Cloud, id: &str, paths: &[&str]) -> Vec<String> {
    let script = format!(
        "python3 -c '{}' {}",
        IMDS_PY.replace('\'', r"'\''"),
        paths.join(" ")
    );
    cloud.sh(id, &script).lines().map(str::to_string).collect()
}

/// One GET over plain HTTP; the body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(c, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// The inode of a namespace link (`net:[4026532...]`).
fn ns_inode(link: &str) -> u64 {
    link.trim()
        .split('[')
        .nth(1)
        .and_then(|s| s.trim_end_matches(']').parse().ok())
        .unwrap_or_else(|| panic!("not a namespace link: {link:?}"))
}

fn host_route(ip: Ipv4Addr) -> String {
    let out = Command::new("ip")
        .args(["route", "show", &format!("{ip}/32")])
        .output()
        .expect("ip route");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_script_instance_boots_in_namespaces_of_its_own_and_goes_when_terminated() {
    let cloud = Cloud::start(|c| c);
    // The instance says hello to a server on this machine's gateway address.
    let hello = TcpListener::bind((cloud.sim.gateway(), 0)).expect("listen on the gateway");
    let port = hello.local_addr().unwrap().port();
    let user_data = format!(
        r#"#!/bin/bash
set -e
mkdir -p /var/lib/cedana/www
cd /var/lib/cedana/www
readlink /proc/self/ns/net > ns-net
readlink /proc/self/ns/pid > ns-pid
readlink /proc/self/ns/mnt > ns-mnt
echo $$ > pid
id -u > uid
cat /proc/sys/kernel/hostname > hostname
echo "marker written by the user-data" > /etc/ec2sim-test-marker
printf 'hello from %s\n' "$(cat /proc/sys/kernel/hostname)" > /dev/tcp/{gw}/{port}
echo ready > ready
exec python3 -m http.server 8000 --bind 0.0.0.0
"#,
        gw = cloud.sim.gateway()
    );
    let id = cloud.launch(STOCK, &user_data, None);
    let inst = cloud.running(&id);
    assert_eq!(inst.image, ImageKind::Stock);
    assert_eq!(inst.user_data, UserData::Script);
    assert_eq!(
        inst.private_ip,
        cloud.moto_private_ip(&id),
        "at moto's private address"
    );
    let www = inst.disk.join("var/lib/cedana/www");
    wait_until(Duration::from_secs(30), "the user-data to run", || {
        www.join("ready").is_file()
    });

    // It reached this machine from its private address.
    hello.set_nonblocking(true).unwrap();
    let start = Instant::now();
    let (conn, peer) = loop {
        match hello.accept() {
            Ok(c) => break c,
            Err(_) if start.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("the instance did not connect to the gateway: {e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).unwrap();
    let hostname = format!("ip-{}", inst.private_ip.to_string().replace('.', "-"));
    assert_eq!(line.trim(), format!("hello from {hostname}"));
    assert_eq!(peer.ip(), IpAddr::V4(inst.private_ip));

    // Its user-data ran as root in the instance's namespaces, not this machine's.
    let read = |f: &str| std::fs::read_to_string(www.join(f)).unwrap();
    assert_eq!(read("uid").trim(), "0");
    assert_eq!(read("hostname").trim(), hostname);
    let netns = std::fs::metadata(Path::new("/run/netns").join(&inst.netns))
        .expect("the instance's network namespace")
        .ino();
    assert_eq!(
        ns_inode(&read("ns-net")),
        netns,
        "in the instance's network namespace"
    );
    for ns in ["net", "pid", "mnt"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(
            ns_inode(&read(&format!("ns-{ns}"))),
            ns_inode(&ours.to_string_lossy()),
            "not in this machine's {ns} namespace"
        );
    }
    let pid: i32 = read("pid").trim().parse().unwrap();
    assert!(
        pid < 100,
        "a PID of the instance's own namespace, got {pid}"
    );
    assert!(
        !Path::new("/etc/ec2sim-test-marker").exists(),
        "the instance's /etc writes stay on its disk"
    );
    assert!(inst.disk.join("etc.upper/ec2sim-test-marker").is_file());

    // This machine reaches it at its private address (and its public one, if it has one).
    let mut addrs = vec![inst.private_ip];
    addrs.extend(inst.public_ip);
    for a in &addrs {
        // Python may take a while to start on a loaded machine.
        let deadline = Instant::now() + Duration::from_secs(60);
        let body = loop {
            match http_get(SocketAddr::from((*a, 8000)), "/ready") {
                Ok(b) => break b,
                Err(e) if Instant::now() > deadline => panic!(
                    "the instance's HTTP server via {a}: {e}; its output: {}",
                    cloud.sim.user_data_output(&id)
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        assert_eq!(body.trim(), "ready", "via {a}");
    }

    // Its metadata service: IMDSv2 only, with its own id and address.
    let answers = imds(
        &cloud,
        &id,
        &[
            "meta-data/instance-id",
            "meta-data/local-ipv4",
            "meta-data/instance-type",
            "meta-data/ami-id",
            "meta-data/spot/instance-action",
            "user-data",
        ],
    );
    assert_eq!(answers[0], "HTTP 401", "no token, no metadata: {answers:?}");
    assert_eq!(answers[1], id);
    assert_eq!(answers[2], inst.private_ip.to_string());
    assert_eq!(answers[3], "t3.micro");
    assert_eq!(answers[4], STOCK);
    assert_eq!(answers[5], "HTTP 404", "no spot notice yet");
    assert!(answers[6].starts_with("#!/bin/bash"), "{answers:?}");

    // A stock image has no agent and no CRIU.
    let what = cloud.sh(
        &id,
        "command -v cedana-agent || echo no-agent; command -v criu || echo no-criu",
    );
    assert_eq!(
        what.split_whitespace().collect::<Vec<_>>(),
        ["no-agent", "no-criu"]
    );

    // Terminated: everything goes.
    let init = inst.init_pid.expect("its init");
    let server = children_of(init);
    assert!(is_alive(init));
    cloud.terminate(&id);
    let gone = cloud
        .sim
        .wait_gone(&id, Duration::from_secs(30))
        .expect("torn down");
    assert_eq!(gone.state, SimState::Terminated);
    assert!(!is_alive(init), "its init is gone");
    for p in server {
        assert!(!is_alive(p), "its process {p} is gone");
    }
    assert!(!Path::new("/run/netns").join(&inst.netns).exists());
    for a in &addrs {
        assert_eq!(host_route(*a), "", "its route to {a} is gone");
    }
}

/// An ed25519 key pair made by ssh-keygen: (private key file, public key line).
fn keygen(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    let path = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .output()
        .expect("ssh-keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    (path, public.trim().to_string())
}

/// `ssh` as root to `ip` with `key`, trusting exactly the host keys in `known_hosts`.
fn ssh(ip: Ipv4Addr, key: &Path, known_hosts: &Path, cmd: &str) -> std::process::Output {
    Command::new("ssh")
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args([
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=10",
        ])
        .arg("-i")
        .arg(key)
        .arg(format!("root@{ip}"))
        .arg(cmd)
        .output()
        .expect("ssh")
}

fn wait_ssh_port(ip: Ipv4Addr) {
    wait_until(Duration::from_secs(30), "sshd to listen on port 22", || {
        TcpStream::connect_timeout(&SocketAddr::from((ip, 22)), Duration::from_millis(500)).is_ok()
    });
}

fn cloud_config(host_private: &str, host_public: &str, user_public: &str) -> String {
    let indented: String = host_private.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "#cloud-config\nssh_keys:\n  ed25519_private: |\n{indented}  ed25519_public: {host_public}\nssh_authorized_keys:\n  - {user_public}\nruncmd:\n  - echo runcmd-ran > /var/lib/cedana/runcmd\n"
    )
}

#[test]
fn cloud_config_gives_sshd_exactly_its_host_key_and_the_key_pair_logs_in() {
    let keys = tempfile::tempdir().unwrap();
    let (host_key, host_pub) = keygen(keys.path(), "host");
    let (user_key, user_pub) = keygen(keys.path(), "user");
    let (pair_key, pair_pub) = keygen(keys.path(), "pair");
    let (_, other_pub) = keygen(keys.path(), "other-host");
    let host_private = std::fs::read_to_string(&host_key).unwrap();
    {
        let cloud = Cloud::start(|c| c);
        cloud
            .sim
            .block_on(
                cloud
                    .client
                    .import_key_pair()
                    .key_name("pair")
                    .public_key_material(aws_sdk_ec2::primitives::Blob::new(pair_pub.as_bytes()))
                    .send(),
            )
            .expect("ImportKeyPair");
        let id = cloud.launch(
            STOCK,
            &cloud_config(&host_private, &host_pub, &user_pub),
            Some("pair"),
        );
        let inst = cloud.running(&id);
        assert_eq!(inst.user_data, UserData::CloudConfig);
        assert_eq!(
            cloud.sim.host_key(&id).as_deref(),
            Some(host_pub.rsplit_once(' ').unwrap().0)
        );
        wait_ssh_port(inst.private_ip);

        let known = keys.path().join("known_hosts");
        std::fs::write(&known, format!("{} {host_pub}\n", inst.private_ip)).unwrap();
        for key in [&user_key, &pair_key] {
            let out = ssh(
                inst.private_ip,
                key,
                &known,
                "cat /proc/sys/kernel/hostname; cat /var/lib/cedana/runcmd",
            );
            assert!(
                out.status.success(),
                "ssh with {}: {}",
                key.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains(&format!(
                    "ip-{}",
                    inst.private_ip.to_string().replace('.', "-")
                )),
                "{text}"
            );
            assert!(text.contains("runcmd-ran"), "runcmd ran: {text}");
        }

        // A client expecting another host key refuses this one.
        std::fs::write(&known, format!("{} {other_pub}\n", inst.private_ip)).unwrap();
        let out = ssh(inst.private_ip, &user_key, &known, "true");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
                || err.contains("Host key verification failed"),
            "{err}"
        );
        // A key it was not given does not log in.
        std::fs::write(&known, format!("{} {host_pub}\n", inst.private_ip)).unwrap();
        let (stranger, _) = keygen(keys.path(), "stranger");
        let out = ssh(inst.private_ip, &stranger, &known, "true");
        assert!(!out.status.success(), "a key nobody authorized logged in");
    }

    // Told to serve the wrong key, the simulator does, and the client refuses it.
    let cloud = Cloud::start(|c| SimConfig {
        wrong_host_key: true,
        ..c
    });
    let id = cloud.launch(
        STOCK,
        &cloud_config(&host_private, &host_pub, &user_pub),
        None,
    );
    let inst = cloud.running(&id);
    wait_ssh_port(inst.private_ip);
    let served = cloud.sim.host_key(&id).expect("a host key");
    assert_ne!(served, host_pub.rsplit_once(' ').unwrap().0);
    let known = keys.path().join("known_hosts");
    std::fs::write(&known, format!("{} {host_pub}\n", inst.private_ip)).unwrap();
    let out = ssh(inst.private_ip, &user_key, &known, "true");
    assert!(!out.status.success(), "the wrong host key was accepted");
}

#[test]
fn baked_images_have_the_agent_and_images_carry_their_instance_disk() {
    let cloud = Cloud::start(|c| c);
    let baked = cloud.launch(BAKED, "#!/bin/sh\necho up > /var/lib/cedana/up\n", None);
    let stock = cloud.launch(STOCK, "", None);
    let b = cloud.running(&baked);
    let s = cloud.running(&stock);
    assert_eq!(b.image, ImageKind::Baked);
    assert_eq!(s.user_data, UserData::None);
    assert_ne!(b.private_ip, s.private_ip);

    // The baked image's agent is the one under test, and CRIU works in the instance.
    let check = cloud.sh(&baked, "cedana-agent check --json");
    let report: serde_json::Value = serde_json::from_str(&check).expect("check --json");
    assert!(report.to_string().contains("criu"), "{report}");
    let version = cloud.sh(&baked, "criu --version");
    assert!(version.contains("Version: 4."), "{version}");
    let agent = std::fs::metadata(agent_bin()).unwrap();
    let seen = cloud.sh(&baked, "stat -L -c %s /usr/local/bin/cedana-agent");
    assert_eq!(seen.trim(), agent.len().to_string());
    // Read-only: the image's files cannot be changed from the instance.
    let out = cloud
        .sim
        .exec(&baked, ": > /usr/local/bin/cedana-agent")
        .unwrap();
    assert!(!out.status.success(), "the image's agent was writable");

    // The spot notice reaches exactly that instance's metadata.
    let at = cloud.sim.spot_notice(&baked).expect("notice");
    let a = imds(&cloud, &baked, &["meta-data/spot/instance-action"]);
    let notice: serde_json::Value = serde_json::from_str(&a[1]).expect("JSON notice");
    assert_eq!(notice["action"], "terminate");
    assert_eq!(notice["time"], at);
    let a = imds(&cloud, &stock, &["meta-data/spot/instance-action"]);
    assert_eq!(a[1], "HTTP 404");
    assert!(
        cloud
            .sim
            .imds_served(&baked, "/latest/meta-data/spot/instance-action")
            .unwrap()
            >= 1
    );

    // What an instance installs travels with an image made from it.
    cloud.sh(
        &stock,
        "printf '#!/bin/sh\\necho tool-from-the-image\\n' > /usr/local/bin/tool && chmod 755 /usr/local/bin/tool && echo etc > /etc/baked-marker",
    );
    let ami = cloud
        .sim
        .block_on(
            cloud
                .client
                .create_image()
                .instance_id(&stock)
                .name("ec2sim-test-image")
                .send(),
        )
        .expect("CreateImage")
        .image_id()
        .unwrap()
        .to_string();
    let from_image = cloud.launch(&ami, "", None);
    let f = cloud.running(&from_image);
    assert_eq!(
        f.image,
        ImageKind::Snapshot {
            from: stock.clone(),
            baked: false
        }
    );
    assert_eq!(
        cloud.sh(&from_image, "tool; cat /etc/baked-marker"),
        "tool-from-the-image\netc\n"
    );
    assert!(!Path::new("/usr/local/bin/tool").exists());
    assert!(!Path::new("/etc/baked-marker").exists());
    let out = cloud
        .sim
        .exec(&from_image, "command -v cedana-agent")
        .unwrap();
    assert!(
        !out.status.success(),
        "a stock instance's image has no agent"
    );

    // All three go with the simulator.
    let inits: Vec<i32> = [&b, &s, &f].iter().filter_map(|i| i.init_pid).collect();
    let namespaces: Vec<String> = [&b, &s, &f].iter().map(|i| i.netns.clone()).collect();
    drop(cloud);
    for p in inits {
        assert!(!is_alive(p), "init {p} outlived the simulator");
    }
    for ns in namespaces {
        assert!(
            !Path::new("/run/netns").join(&ns).exists(),
            "{ns} outlived the simulator"
        );
    }
    assert!(!Path::new("/sys/class/net")
        .join(cedana_tests::ec2sim::GATEWAY_IF)
        .exists());
}
