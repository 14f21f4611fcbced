//! [`NetNs`]: a network namespace standing for a separate host, joined to this machine by a
//! veth pair; [`forward`] carries a worker's connections to the NATS servers.

use std::process::Command;

/// A network namespace standing for a separate host, with a veth pair to this machine.
pub struct NetNs {
    pub name: String,
    /// This machine's address on the pair (the worker's is the next one).
    pub host_ip: std::net::Ipv4Addr,
}

pub fn ip(args: &[&str]) -> std::io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl NetNs {
    /// The worker's address on the pair (the one after this machine's).
    pub fn worker_ip(&self) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::from(u32::from(self.host_ip) + 1)
    }

    /// Creates namespace `name` and a veth pair on a random /30 of 10.64.0.0/10.
    pub fn create(name: &str) -> std::io::Result<Self> {
        let r = cedana_protocol::random_hex(4)?;
        let n = u32::from_str_radix(&r, 16).unwrap_or(0) & 0x000f_ffff;
        let base = (10u32 << 24) | (64 << 16) | (n << 2);
        let host_ip = std::net::Ipv4Addr::from(base + 1);
        let worker_ip = std::net::Ipv4Addr::from(base + 2);
        let host_if = format!("cdn{}", &r[..8]);
        ip(&["netns", "add", name])?;
        let ns = NetNs {
            name: name.into(),
            host_ip,
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", name,
        ])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&[
            "-n",
            name,
            "addr",
            "add",
            &format!("{worker_ip}/30"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", name, "link", "set", "eth0", "up"])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // The veth pair goes with the namespace.
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            tracing::warn!(error = %e, "cannot remove a worker's network namespace");
        }
    }
}

/// Forwards connections to `listen` (this machine's side of a worker's veth pair) to the first
/// of `to` (the NATS servers, in order) that accepts.
pub async fn forward(listener: tokio::net::TcpListener, to: Vec<String>) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        let to = to.clone();
        tokio::spawn(async move {
            for addr in &to {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(addr).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    return;
                }
            }
        });
    }
}
