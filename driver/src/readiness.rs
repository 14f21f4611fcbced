//! `cedana-driver check`: which providers (and the NATS server and checkpoint store the config
//! names) are usable from here, and why not, one line each, asking each the way a job would:
//! the local provider's agent runs its own `check`, the cloud providers are asked for their
//! offers.

use std::time::Duration;

use serde::Serialize;

use crate::job::Spec;
use crate::providers::Provider;

/// How long one provider or store may take to answer.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(30);

/// One line of `check`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// `local`, `aws`, `paperspace`, `nats` or `store`.
    pub name: String,
    /// Whether the config enables it (the NATS server and the store when the config names
    /// them).
    pub enabled: bool,
    pub ok: bool,
    /// What was found, or what is wrong and what to do.
    pub detail: String,
}

/// Every finding for `config`, on `rt`.
pub fn check(config: &cedana_protocol::Config, rt: &tokio::runtime::Handle) -> Vec<Finding> {
    let enabled: Vec<String> = if config.enabled_providers.is_empty() {
        vec!["local".into()]
    } else {
        config
            .enabled_providers
            .iter()
            .map(|p| p.to_lowercase())
            .collect()
    };
    let mut out = Vec::new();
    for name in ["local", "aws", "paperspace"] {
        let on = enabled.iter().any(|e| e == name);
        let (ok, detail) = match name {
            "local" => local(),
            _ => cloud(name, config, rt),
        };
        out.push(Finding {
            name: name.into(),
            enabled: on,
            ok,
            detail,
        });
    }
    for other in enabled
        .iter()
        .filter(|e| !["local", "aws", "paperspace"].contains(&e.as_str()))
    {
        out.push(Finding {
            name: other.clone(),
            enabled: true,
            ok: false,
            detail: "not a provider of this release (local, aws, paperspace); remove it from enabled_providers".into(),
        });
    }
    out.push(nats(config, enabled.iter().any(|e| e != "local")));
    if let Some(store) = &config.checkpoint_store {
        out.push(self::store(&store.url, rt));
    }
    out
}

/// The local provider: root, the agent and its own `check`, `nats-server` for the embedded
/// server.
fn local() -> (bool, String) {
    if !nix::unistd::geteuid().is_root() {
        return (
            false,
            "needs root (local workers live in network namespaces and CRIU dumps them); run as root".into(),
        );
    }
    let agent = crate::providers::local::agent_binary();
    let out = match std::process::Command::new(&agent).arg("check").output() {
        Ok(o) => o,
        Err(e) => {
            return (
                false,
                format!(
                    "cannot run the agent {}: {e}; set CEDANA_AGENT_BIN or put cedana-agent next to cedana-driver",
                    agent.display()
                ),
            )
        }
    };
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        let bad: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("[FAIL") || l.starts_with("[fail"))
            .map(|l| l.trim())
            .collect();
        return (
            false,
            format!(
                "`{} check` fails: {}",
                agent.display(),
                if bad.is_empty() {
                    text.lines().last().unwrap_or("").to_string()
                } else {
                    bad.join("; ")
                }
            ),
        );
    }
    let nats = std::env::var("CEDANA_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
    match std::process::Command::new(&nats).arg("--version").output() {
        Ok(o) if o.status.success() => (
            true,
            format!(
                "root; {} check passes; {} for the embedded server",
                agent.display(),
                String::from_utf8_lossy(&o.stdout).trim()
            ),
        ),
        _ => (
            false,
            format!("no `{nats}` to start the job's own NATS server: install nats-server (tools/deps.sh) or set CEDANA_NATS_SERVER"),
        ),
    }
}

/// A cloud provider: its settings, then its offers asked for.
fn cloud(
    name: &str,
    config: &cedana_protocol::Config,
    rt: &tokio::runtime::Handle,
) -> (bool, String) {
    let provider: Provider = match name {
        "paperspace" => {
            let c = config.paperspace.clone().unwrap_or_default();
            match crate::providers::paperspace::PaperspaceProvider::from_config(&c) {
                Ok(p) => p.into(),
                Err(e) => return (false, unprefixed(name, &e)),
            }
        }
        #[cfg(feature = "aws")]
        "aws" => {
            let c = config.aws.clone().unwrap_or_default();
            match crate::providers::aws::AwsProvider::from_config(&c) {
                Ok(p) => p.into(),
                Err(e) => return (false, unprefixed(name, &e)),
            }
        }
        _ => {
            return (
                false,
                format!("not built into this driver (cargo feature `{name}`)"),
            )
        }
    };
    let asked = rt.block_on(async {
        tokio::time::timeout(ASK_TIMEOUT, provider.offers(&Spec::default())).await
    });
    match asked {
        Err(_) => (
            false,
            format!("did not answer within {} s", ASK_TIMEOUT.as_secs()),
        ),
        Ok(Err(e)) => (false, unprefixed(name, &e)),
        Ok(Ok(offers)) if offers.is_empty() => (
            false,
            "answers, but offers no machine (check the enabled regions and families)".into(),
        ),
        Ok(Ok(offers)) => {
            let mut places: Vec<&str> = offers.iter().map(|o| o.region.as_str()).collect();
            places.sort_unstable();
            places.dedup();
            let cheapest = offers
                .iter()
                .map(|o| o.price_usd_hour)
                .fold(f64::INFINITY, f64::min);
            (
                true,
                format!(
                    "{} offers in {} from ${cheapest:.4}/h",
                    offers.len(),
                    places.join(", ")
                ),
            )
        }
    }
}

/// A provider's error without the provider's name in front (the line has it already).
fn unprefixed(name: &str, e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    text.strip_prefix(&format!("{name}: "))
        .unwrap_or(&text)
        .to_string()
}

/// The NATS server the config names: reachable from here, and (for cloud workers) not a
/// loopback address they could not reach.
fn nats(config: &cedana_protocol::Config, cloud: bool) -> Finding {
    let c = &config.connection;
    let url = cedana_protocol::NatsUrl::from_config(&c.nats_url, c.nats_port).to_string();
    let finding = |ok, detail: String| Finding {
        name: "nats".into(),
        enabled: !url.is_empty() || cloud,
        ok,
        detail,
    };
    if url.is_empty() {
        return if cloud {
            finding(false, "no connection.nats_url: cloud workers need a NATS server they can reach (the driver would start its own on loopback)".into())
        } else {
            finding(
                true,
                "none configured: each job starts its own on loopback, with a NATS user per worker allowed its own subjects only".into(),
            )
        };
    }
    if cloud && crate::providers::loopback_only(&url) {
        return finding(
            false,
            format!("{url} is a loopback address cloud workers cannot reach; give the server's public address"),
        );
    }
    let Some((host, port)) = host_port(&url) else {
        return finding(false, format!("{url} is not nats://HOST:PORT"));
    };
    use std::net::ToSocketAddrs;
    let addrs: Vec<_> = match (host.as_str(), port).to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => return finding(false, format!("{url}: cannot resolve {host}: {e}")),
    };
    for a in &addrs {
        if std::net::TcpStream::connect_timeout(a, Duration::from_secs(3)).is_ok() {
            let account = matches!(
                cedana_protocol::NatsCredential::parse(&c.auth_token),
                cedana_protocol::NatsCredential::Account { .. }
            );
            return finding(
                true,
                if account {
                    format!("{url} answers; connection.auth_token is a NATS account's seed, so each worker gets a user of its own, allowed its own subjects only (the server must trust the account: bootstrap --nats-account)")
                } else {
                    format!("{url} answers; its workers share connection.auth_token, so a task that reads it from its worker could command the others (`bootstrap --nats-account` gives each worker a user of its own)")
                },
            );
        }
    }
    finding(
        false,
        format!("{url} does not answer from here (is nats-server running, and the port open?)"),
    )
}

/// `HOST` and `PORT` of `nats://HOST:PORT` (the first of a list).
fn host_port(url: &str) -> Option<(String, u16)> {
    let first = url.split(',').next()?.trim();
    let rest = first.split_once("://").map_or(first, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let (host, port) = rest.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_string(), port.parse().ok()?))
}

/// The checkpoint store: its URL, then a listing.
fn store(url: &str, rt: &tokio::runtime::Handle) -> Finding {
    let finding = |ok, detail| Finding {
        name: "store".into(),
        enabled: true,
        ok,
        detail,
    };
    let parsed = match cedana_store::StoreUrl::parse(url) {
        Ok(u) => u,
        Err(e) => return finding(false, e.to_string()),
    };
    let store = match cedana_store::Store::open(&parsed) {
        Ok(s) => s,
        Err(e) => return finding(false, e.to_string()),
    };
    let listed =
        rt.block_on(async { tokio::time::timeout(ASK_TIMEOUT, store.list_checkpoints()).await });
    match listed {
        Err(_) => finding(
            false,
            format!("{parsed} did not answer within {} s", ASK_TIMEOUT.as_secs()),
        ),
        Ok(Err(e)) => finding(false, e.to_string()),
        Ok(Ok(_)) => finding(true, format!("{parsed} answers")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_urls_give_host_and_port() {
        assert_eq!(
            host_port("nats://10.0.0.1:4222"),
            Some(("10.0.0.1".into(), 4222))
        );
        assert_eq!(
            host_port("nats://user:pw@nats.example.org:4333,nats://b:1"),
            Some(("nats.example.org".into(), 4333))
        );
        assert_eq!(host_port("nats://[::1]:4222"), Some(("::1".into(), 4222)));
        assert_eq!(host_port("nats://nohost"), None);
    }
}
