//! A small client of the EC2 instance metadata service, version 2 (IMDSv2), for the two items
//! the daemon watches: the spot interruption notice (`spot/instance-action`) and the rebalance
//! recommendation (`events/recommendations/rebalance`).
//!
//! IMDSv2 is session based: `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds`
//! returns a token, and every `GET` carries it in `X-aws-ec2-metadata-token`. The token is kept
//! and asked for again shortly before it expires, or at once when IMDS answers 401. A 404 on
//! either item means "no notice"; a 200 carries a small JSON document.
//!
//! IMDS is plain HTTP on a link-local address, so this is a hand-written HTTP/1.1 client over
//! `tokio::net::TcpStream` (one request per connection, `Connection: close`): no TLS, no HTTP
//! crate in the static agent. Every exchange is bounded in time and size; errors are values the
//! caller logs, never fatal.

use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where IMDS answers on EC2 (IPv4).
pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
/// Path of the session token.
pub const TOKEN_PATH: &str = "/latest/api/token";
/// Path of the spot interruption notice.
pub const INSTANCE_ACTION_PATH: &str = "/latest/meta-data/spot/instance-action";
/// Path of the rebalance recommendation.
pub const REBALANCE_PATH: &str = "/latest/meta-data/events/recommendations/rebalance";
/// Header asking for a token of that many seconds.
pub const TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
/// Header carrying the token.
pub const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
/// Lifetime asked for: six hours, the most IMDS grants.
pub const TOKEN_TTL_SECS: u64 = 21600;

/// A token is asked for again this long before it expires.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// Time to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Time for a whole exchange (connect, request, response).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest response read (headers and body); IMDS answers are a few hundred bytes.
const MAX_RESPONSE: usize = 64 * 1024;

/// Errors talking to IMDS. None is fatal to the daemon: an instance without IMDS has no
/// notices.
#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("IMDS endpoint {endpoint:?} is not usable: {reason} (expected http://HOST[:PORT], e.g. {DEFAULT_ENDPOINT})")]
    BadEndpoint { endpoint: String, reason: String },
    #[error("cannot reach IMDS at {endpoint}: {source}; is this an EC2 instance with the metadata service enabled?")]
    Io {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("IMDS at {endpoint} did not answer within {} ms", after.as_millis())]
    Timeout { endpoint: String, after: Duration },
    #[error("IMDS at {endpoint} answered {path} with HTTP {status}{hint}")]
    Status {
        endpoint: String,
        path: &'static str,
        status: u16,
        hint: &'static str,
    },
    #[error("IMDS at {endpoint} sent an unusable answer to {path}: {reason}")]
    BadResponse {
        endpoint: String,
        path: &'static str,
        reason: String,
    },
}

/// The spot interruption notice: `{"action": "terminate"|"stop"|"hibernate", "time": "…Z"}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct InstanceAction {
    pub action: String,
    /// When the action happens (UTC, RFC 3339).
    #[serde(default)]
    pub time: Option<String>,
}

/// The rebalance recommendation: `{"noticeTime": "…Z"}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Rebalance {
    #[serde(rename = "noticeTime", default)]
    pub notice_time: Option<String>,
}

/// Where IMDS is: `http://HOST[:PORT]`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Endpoint {
    /// As given, for messages.
    url: String,
    /// For connecting (brackets of an IPv6 literal removed).
    host: String,
    port: u16,
    /// The `Host` header.
    authority: String,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Self, ImdsError> {
        let bad = |reason: &str| ImdsError::BadEndpoint {
            endpoint: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(bad(&format!(
                    "scheme {scheme:?}: IMDS is plain HTTP (no TLS)"
                )))
            }
            None => return Err(bad("no http:// in front")),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        if authority.contains(['/', '?', '#', '@']) || authority.chars().any(char::is_whitespace) {
            return Err(bad("only a host and a port are allowed, no path"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed [ in an IPv6 address"))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?),
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?,
        };
        Ok(Endpoint {
            url: url.to_string(),
            host,
            port,
            authority: authority.to_string(),
        })
    }
}

/// An HTTP response: status, headers (names lower-cased), body.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `buf` as a whole response if it is one: `Ok(None)` means more bytes are needed
/// (`eof` says none will come).
fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Response>, String> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if eof {
            Err("connection closed before the headers ended".into())
        } else {
            Ok(None)
        };
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x status line: {status_line:?}"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| format!("no status code in {status_line:?}"))?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("malformed header line {line:?}"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
    };
    let rest = &buf[head_end + 4..];
    let chunked = resp
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    if chunked {
        return match dechunk(rest)? {
            Some(body) => {
                resp.body = body;
                Ok(Some(resp))
            }
            None if eof => Err("connection closed inside a chunked body".into()),
            None => Ok(None),
        };
    }
    match resp.header("content-length") {
        Some(len) => {
            let len: usize = len
                .parse()
                .map_err(|_| format!("bad Content-Length {len:?}"))?;
            if rest.len() >= len {
                resp.body = rest[..len].to_vec();
                Ok(Some(resp))
            } else if eof {
                Err(format!(
                    "connection closed after {} of {len} body bytes",
                    rest.len()
                ))
            } else {
                Ok(None)
            }
        }
        // No length: the body runs to the end of the connection.
        None if eof => {
            resp.body = rest.to_vec();
            Ok(Some(resp))
        }
        None => Ok(None),
    }
}

/// Decodes a chunked body; `Ok(None)` if it is not complete yet.
fn dechunk(mut data: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size_line = std::str::from_utf8(&data[..eol]).map_err(|_| "bad chunk size")?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size {size_line:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            // Trailers (if any) end with an empty line; their absence is tolerated.
            return Ok(Some(body));
        }
        if data.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&data[..size]);
        if &data[size..size + 2] != b"\r\n" {
            return Err("chunk not followed by CRLF".into());
        }
        data = &data[size + 2..];
    }
}

/// A session token and when to ask for the next one (before it expires).
#[derive(Debug)]
struct Token {
    value: String,
    refresh_at: Instant,
}

/// An IMDSv2 client. Cheap; keeps one session token.
#[derive(Debug)]
pub struct Imds {
    endpoint: Endpoint,
    token: Option<Token>,
}

impl Imds {
    /// A client of the IMDS at `endpoint` (`http://HOST[:PORT]`); nothing is contacted yet.
    pub fn new(endpoint: &str) -> Result<Self, ImdsError> {
        Ok(Imds {
            endpoint: Endpoint::parse(endpoint.trim())?,
            token: None,
        })
    }

    /// The endpoint, as given.
    pub fn endpoint(&self) -> &str {
        &self.endpoint.url
    }

    /// The spot interruption notice, if there is one.
    pub async fn instance_action(&mut self) -> Result<Option<InstanceAction>, ImdsError> {
        self.get_json(INSTANCE_ACTION_PATH).await
    }

    /// The rebalance recommendation, if there is one.
    pub async fn rebalance(&mut self) -> Result<Option<Rebalance>, ImdsError> {
        self.get_json(REBALANCE_PATH).await
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &mut self,
        path: &'static str,
    ) -> Result<Option<T>, ImdsError> {
        let Some(body) = self.get(path).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| ImdsError::BadResponse {
                endpoint: self.endpoint.url.clone(),
                path,
                reason: format!("not the documented JSON ({e})"),
            })
    }

    /// `GET path` with the session token: the body on 200, `None` on 404. A 401 (the token
    /// expired or IMDS restarted) gets a new token and one more try.
    async fn get(&mut self, path: &'static str) -> Result<Option<Vec<u8>>, ImdsError> {
        for attempt in 0..2 {
            let token = self.token().await?;
            let resp = self
                .exchange("GET", path, &[(TOKEN_HEADER, &token)])
                .await?;
            match resp.status {
                200 => return Ok(Some(resp.body)),
                404 => return Ok(None),
                401 if attempt == 0 => self.token = None,
                status => {
                    return Err(ImdsError::Status {
                        endpoint: self.endpoint.url.clone(),
                        path,
                        status,
                        hint: match status {
                            401 => " (the token was refused twice)",
                            403 => " (instance metadata is turned off for this instance)",
                            _ => "",
                        },
                    })
                }
            }
        }
        unreachable!("the loop returns on its second pass")
    }

    /// The session token, asked for when there is none or it is about to expire.
    async fn token(&mut self) -> Result<String, ImdsError> {
        if let Some(t) = &self.token {
            if Instant::now() < t.refresh_at {
                return Ok(t.value.clone());
            }
        }
        self.token = None;
        let requested = Instant::now();
        let ttl = TOKEN_TTL_SECS.to_string();
        let resp = self
            .exchange("PUT", TOKEN_PATH, &[(TTL_HEADER, &ttl)])
            .await?;
        if resp.status != 200 {
            return Err(ImdsError::Status {
                endpoint: self.endpoint.url.clone(),
                path: TOKEN_PATH,
                status: resp.status,
                hint: match resp.status {
                    400 => " (the token request was refused as malformed)",
                    403 => " (instance metadata is turned off for this instance)",
                    404 | 405 => " (no IMDSv2 here)",
                    _ => "",
                },
            });
        }
        // IMDS says how long the token lives; trust it if it is shorter than asked.
        let ttl = resp
            .header(TTL_HEADER)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(TOKEN_TTL_SECS)
            .min(TOKEN_TTL_SECS);
        let value = String::from_utf8(resp.body)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty() && s.len() <= 4096 && s.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| ImdsError::BadResponse {
                endpoint: self.endpoint.url.clone(),
                path: TOKEN_PATH,
                reason: "the token is empty or not printable ASCII".into(),
            })?;
        let ttl = Duration::from_secs(ttl);
        self.token = Some(Token {
            value: value.clone(),
            refresh_at: requested + ttl - REFRESH_MARGIN.min(ttl / 2),
        });
        Ok(value)
    }

    /// One request on a fresh connection, bounded in time and size.
    async fn exchange(
        &self,
        method: &str,
        path: &'static str,
        headers: &[(&str, &str)],
    ) -> Result<Response, ImdsError> {
        let ep = &self.endpoint;
        let io = |source| ImdsError::Io {
            endpoint: ep.url.clone(),
            source,
        };
        let timeout = |after| ImdsError::Timeout {
            endpoint: ep.url.clone(),
            after,
        };
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        let mut stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((ep.host.as_str(), ep.port)),
        )
        .await
        .map_err(|_| timeout(CONNECT_TIMEOUT))?
        .map_err(io)?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: cedana-agent/{}\r\nAccept: */*\r\nConnection: close\r\n",
            ep.authority,
            env!("CARGO_PKG_VERSION")
        );
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        if method != "GET" {
            req.push_str("Content-Length: 0\r\n");
        }
        req.push_str("\r\n");
        let exchange = async {
            stream.write_all(req.as_bytes()).await.map_err(io)?;
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 4096];
            loop {
                let n = stream.read(&mut chunk).await.map_err(io)?;
                buf.extend_from_slice(&chunk[..n]);
                let bad = |reason| ImdsError::BadResponse {
                    endpoint: ep.url.clone(),
                    path,
                    reason,
                };
                if let Some(resp) = parse_response(&buf, n == 0).map_err(bad)? {
                    return Ok(resp);
                }
                if buf.len() > MAX_RESPONSE {
                    return Err(bad(format!("more than {MAX_RESPONSE} bytes")));
                }
            }
        };
        tokio::time::timeout_at(deadline, exchange)
            .await
            .map_err(|_| timeout(REQUEST_TIMEOUT))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let e = Endpoint::parse("http://169.254.169.254").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("169.254.169.254", 80));
        assert_eq!(e.authority, "169.254.169.254");
        let e = Endpoint::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 8080));
        assert_eq!(e.authority, "127.0.0.1:8080");
        let e = Endpoint::parse("http://[fd00:ec2::254]").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("fd00:ec2::254", 80));
        assert_eq!(e.authority, "[fd00:ec2::254]");
        let e = Endpoint::parse("HTTP://[::1]:9").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 9));
        for bad in [
            "https://169.254.169.254",
            "169.254.169.254",
            "http://",
            "http://host/latest",
            "http://host:0",
            "http://host:99999",
            "http://host:x",
            "http://[::1",
            "http://user@host",
        ] {
            let err = Endpoint::parse(bad).unwrap_err();
            assert!(err.to_string().contains("not usable"), "{bad}: {err}");
        }
    }

    #[test]
    fn responses_parse() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"hello");
        assert_eq!(r.header("x-a"), Some("b"));
        // Incomplete until the whole body is there.
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", false).unwrap(),
            None
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", true).is_err());
        // No length: to the end of the connection.
        assert_eq!(
            parse_response(b"HTTP/1.0 404 Not Found\r\n\r\nnope", true)
                .unwrap()
                .unwrap()
                .body,
            b"nope"
        );
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.body, b"abcde");
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab",
                false
            )
            .unwrap(),
            None
        );
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n", false).is_err());
        assert!(parse_response(b"HTTP/1.1 abc\r\n\r\n", false).is_err());
    }

    #[test]
    fn notices_decode_as_documented() {
        let a: InstanceAction =
            serde_json::from_str(r#"{"action": "terminate", "time": "2026-11-21T01:02:03Z"}"#)
                .unwrap();
        assert_eq!(a.action, "terminate");
        assert_eq!(a.time.as_deref(), Some("2026-11-21T01:02:03Z"));
        let r: Rebalance =
            serde_json::from_str(r#"{"noticeTime": "2026-11-21T01:00:00Z"}"#).unwrap();
        assert_eq!(r.notice_time.as_deref(), Some("2026-11-21T01:00:00Z"));
    }

    /// A one-connection-at-a-time server answering with `answers` in order; returns the
    /// requests it read.
    fn serve(answers: Vec<String>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let t = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for answer in answers {
                let (mut s, _) = l.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut req = Vec::new();
                let mut b = [0u8; 1024];
                while !req.ends_with(b"\r\n\r\n") {
                    let n = s.read(&mut b).unwrap();
                    assert!(n > 0);
                    req.extend_from_slice(&b[..n]);
                }
                seen.push(String::from_utf8(req).unwrap());
                s.write_all(answer.as_bytes()).unwrap();
            }
            seen
        });
        (url, t)
    }

    fn answer(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    #[tokio::test]
    async fn a_refused_token_is_replaced_once() {
        let notice = r#"{"action": "stop", "time": "2026-01-01T00:00:00Z"}"#;
        let (url, t) = serve(vec![
            answer("200 OK", "T-1"),
            answer("404 Not Found", ""),
            answer("401 Unauthorized", ""),
            answer("200 OK", "T-2"),
            answer("200 OK", notice),
        ]);
        let mut imds = Imds::new(&url).unwrap();
        assert_eq!(imds.rebalance().await.unwrap(), None);
        let a = imds.instance_action().await.unwrap().unwrap();
        assert_eq!(a.action, "stop");
        let seen = t.join().unwrap();
        assert!(
            seen[0].starts_with("PUT /latest/api/token HTTP/1.1\r\n"),
            "{}",
            seen[0]
        );
        assert!(seen[0].contains("\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\n"));
        assert!(seen[1].starts_with("GET /latest/meta-data/events/recommendations/rebalance "));
        assert!(
            seen[1].contains("\r\nX-aws-ec2-metadata-token: T-1\r\n"),
            "{}",
            seen[1]
        );
        assert!(seen[2].contains("\r\nX-aws-ec2-metadata-token: T-1\r\n"));
        assert!(
            seen[3].starts_with("PUT /latest/api/token "),
            "a 401 asks for a new token"
        );
        assert!(seen[4].starts_with("GET /latest/meta-data/spot/instance-action "));
        assert!(
            seen[4].contains("\r\nX-aws-ec2-metadata-token: T-2\r\n"),
            "{}",
            seen[4]
        );
    }

    #[tokio::test]
    async fn silence_and_absence_are_errors_not_hangs() {
        // Accepts, never answers.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut imds = Imds::new(&format!("http://{}", l.local_addr().unwrap())).unwrap();
        let start = Instant::now();
        let err = imds.instance_action().await.unwrap_err();
        assert!(matches!(err, ImdsError::Timeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
        drop(l);
        // Nobody listens.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut imds = Imds::new(&format!("http://127.0.0.1:{port}")).unwrap();
        let err = imds.rebalance().await.unwrap_err();
        assert!(matches!(err, ImdsError::Io { .. }), "{err}");
        assert!(err.to_string().contains("cannot reach IMDS"), "{err}");
    }
}
