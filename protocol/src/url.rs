//! [`NatsUrl`]: a NATS server or a comma-separated list of them, as users write them in
//! `connection.nats_url`, `--nats-url` and `CEDANA_NATS_URL`. The one parser of such lists.

use std::fmt;

/// The port NATS listens on when a URL names none.
pub const DEFAULT_PORT: u16 = 4222;

/// One or more NATS servers (`nats://a:4222,nats://b:4222`), each entry kept as written
/// (trimmed), empty entries dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatsUrl(Vec<String>);

impl NatsUrl {
    /// The servers of a URL list; never fails (a malformed entry fails at connect, naming it).
    pub fn parse(list: &str) -> Self {
        NatsUrl(
            list.split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(String::from)
                .collect(),
        )
    }

    /// The config's `nats_url` (one host or URL, or a list) with `nats://` added where no
    /// scheme is given and `port` (`nats_port`) added to each entry that has no port.
    pub fn from_config(nats_url: &str, port: Option<u16>) -> Self {
        NatsUrl(
            Self::parse(nats_url)
                .0
                .into_iter()
                .map(|u| {
                    let (scheme, rest) = match u.split_once("://") {
                        Some((s, r)) => (s.to_string(), r.to_string()),
                        None => ("nats".to_string(), u),
                    };
                    let host = rest.rsplit('@').next().unwrap_or(&rest);
                    match port {
                        Some(p) if !host.contains(':') => format!("{scheme}://{rest}:{p}"),
                        _ => format!("{scheme}://{rest}"),
                    }
                })
                .collect(),
        )
    }

    /// True when no server is named.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each server as written, for `async_nats::ConnectOptions::connect`.
    pub fn servers(&self) -> &[String] {
        &self.0
    }

    /// `host:port` of each server (scheme, user info and a trailing `/` dropped; the default
    /// port where none is given).
    pub fn addrs(&self) -> Vec<String> {
        self.0
            .iter()
            .filter_map(|one| {
                let hostport = host_port(one)?;
                Some(if hostport.contains(':') {
                    hostport.to_string()
                } else {
                    format!("{hostport}:{DEFAULT_PORT}")
                })
            })
            .collect()
    }

    /// The host of each server (IPv6 addresses without their brackets).
    pub fn hosts(&self) -> Vec<String> {
        self.0
            .iter()
            .filter_map(|one| {
                let hostport = host_port(one)?;
                let host = if let Some(h) = hostport.strip_prefix('[') {
                    h.split(']').next()?
                } else {
                    hostport.split(':').next()?
                };
                (!host.is_empty()).then(|| host.to_string())
            })
            .collect()
    }

    /// Whether every server is on loopback or unspecified (or none is named): a cloud machine
    /// cannot reach it.
    pub fn loopback_only(&self) -> bool {
        self.hosts().iter().all(|h| {
            h.eq_ignore_ascii_case("localhost")
                || h.parse::<std::net::IpAddr>()
                    .map(|ip| ip.is_loopback() || ip.is_unspecified())
                    .unwrap_or(false)
        })
    }
}

/// `host[:port]` of one entry: after the scheme and user info, before a trailing `/`.
fn host_port(one: &str) -> Option<&str> {
    let rest = one.trim().split("://").last()?;
    let hostport = rest.rsplit('@').next()?.trim_end_matches('/');
    (!hostport.is_empty()).then_some(hostport)
}

impl fmt::Display for NatsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

impl std::str::FromStr for NatsUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(NatsUrl::parse(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_lists_split() {
        assert_eq!(
            NatsUrl::parse("nats://a:1, nats://b:2,").servers(),
            ["nats://a:1", "nats://b:2"]
        );
        assert_eq!(NatsUrl::parse("nats://a:1").servers(), ["nats://a:1"]);
        assert!(NatsUrl::parse(" , ").is_empty());
    }

    #[test]
    fn addresses_of_a_list() {
        let a = |u: &str| NatsUrl::parse(u).addrs();
        assert_eq!(a("nats://127.0.0.1:4222"), ["127.0.0.1:4222"]);
        assert_eq!(a("nats://a:1, nats://b:2"), ["a:1", "b:2"]);
        assert_eq!(a("h"), ["h:4222"]);
        assert_eq!(a("nats://tok@h:5/"), ["h:5"]);
    }

    #[test]
    fn config_urls_get_the_port() {
        let c = |u: &str, p| NatsUrl::from_config(u, p).to_string();
        assert_eq!(c("10.0.0.5", Some(4222)), "nats://10.0.0.5:4222");
        assert_eq!(c("nats://h:1", Some(4222)), "nats://h:1");
        assert_eq!(
            c("a, nats://b, c:9", Some(5)),
            "nats://a:5,nats://b:5,nats://c:9"
        );
        assert_eq!(c("nats://a", None), "nats://a");
    }

    #[test]
    fn loopback_urls_are_recognised() {
        let l = |u: &str| NatsUrl::parse(u).loopback_only();
        assert!(l("nats://127.0.0.1:4222"));
        assert!(l("nats://localhost:4222, nats://[::1]:4223"));
        assert!(l("nats://0.0.0.0:4222") && l(""));
        assert!(!l("nats://127.0.0.1:4222,nats://10.0.0.5:4222"));
        assert!(!l("nats://nats.example.org:4222"));
        assert!(!l("nats://[2001:db8::1]:4222"));
    }
}
