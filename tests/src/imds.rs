//! A fake EC2 instance metadata service (IMDSv2), as published: session tokens from
//! `PUT /latest/api/token` (with a TTL of 1..=21600 s, refused through a proxy), 401 for any
//! metadata request without a valid token, 404 for what does not exist (`spot/instance-action`
//! and `events/recommendations/rebalance` until a notice is set), directory listings, user-data
//! and the instance identity document.
//!
//! It stands in for IMDS because no real one runs here. The spot watcher tests serve it on
//! loopback; the instance simulator serves one per instance at 169.254.169.254:80 inside the
//! instance's network namespace.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::wait_until;

/// The spot interruption notice.
pub const INSTANCE_ACTION: &str = "/latest/meta-data/spot/instance-action";
/// The rebalance recommendation.
pub const REBALANCE: &str = "/latest/meta-data/events/recommendations/rebalance";
const META: &str = "/latest/meta-data/";

/// What the fake serves, and what it was asked and how it answered.
#[derive(Default)]
pub struct ImdsState {
    /// Valid tokens and when they expire.
    pub tokens: HashMap<String, Instant>,
    pub issued: u64,
    /// Body of `spot/instance-action` (404 while `None`).
    pub instance_action: Option<String>,
    /// Body of `events/recommendations/rebalance` (404 while `None`).
    pub rebalance: Option<String>,
    /// Metadata items by path under `/latest/meta-data/` (`instance-id`,
    /// `placement/availability-zone`, ...); directories are listed from them.
    pub metadata: BTreeMap<String, String>,
    /// `/latest/user-data` (404 while `None`).
    pub user_data: Option<String>,
    /// `/latest/dynamic/instance-identity/document` (404 while `None`).
    pub identity: Option<String>,
    /// Metadata GETs answered with a valid token, by path.
    pub served: HashMap<String, usize>,
    /// Metadata GETs refused (401) because they carried no token.
    pub without_token: usize,
    /// Metadata GETs refused (401) because their token was not (or no longer) valid.
    pub bad_token: usize,
    /// Token requests refused (400 or 403).
    pub bad_token_requests: usize,
}

/// IMDSv2 on a listening socket, one thread per connection, every read bounded. Stops (and
/// closes its socket) on drop.
pub struct FakeImds {
    /// The port it listens on.
    pub port: u16,
    addr: SocketAddr,
    state: Arc<Mutex<ImdsState>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeImds {
    /// A fake with no metadata on a free loopback port.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        Self::serve(listener, ImdsState::default())
    }

    /// Serves `state` on `listener` (bound wherever the caller wants, e.g. inside a network
    /// namespace).
    pub fn serve(listener: TcpListener, state: ImdsState) -> Self {
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let state = Arc::new(Mutex::new(state));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("imds-{addr}"))
            .spawn(move || {
                while !sp.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let st = st.clone();
                            std::thread::spawn(move || serve(conn, &st));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
            .expect("spawn the IMDS thread");
        FakeImds {
            port: addr.port(),
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut ImdsState) -> T) -> T {
        f(&mut self.state.lock().expect("fake state"))
    }

    /// How many times `path` was served with a valid token.
    pub fn served(&self, path: &str) -> usize {
        self.with(|s| s.served.get(path).copied().unwrap_or(0))
    }

    /// Waits until `path` was served `n` more times than `from`.
    pub fn wait_served(&self, path: &str, from: usize, n: usize) {
        wait_until(
            Duration::from_secs(30),
            &format!("{n} GETs of {path} with a valid token"),
            || self.served(path) >= from + n,
        );
    }
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers one request on `conn` as IMDSv2 does.
fn serve(mut conn: TcpStream, state: &Mutex<ImdsState>) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(3)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let mut request = lines.next().unwrap_or_default().split(' ');
    let (method, path) = (
        request.next().unwrap_or_default(),
        request.next().unwrap_or_default(),
    );
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let (status, body, extra) = answer(method, path, &headers, state);
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let content_type = if body.starts_with('{') {
        "application/octet-stream"
    } else {
        "text/plain"
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\nServer: EC2ws\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(response.as_bytes());
}

/// Status, body and extra header lines for one request.
fn answer(
    method: &str,
    path: &str,
    headers: &HashMap<String, String>,
    state: &Mutex<ImdsState>,
) -> (u16, String, String) {
    let mut s = state.lock().expect("fake state");
    if path == "/latest/api/token" {
        if method != "PUT" {
            return (405, String::new(), String::new());
        }
        // Token requests through a proxy are refused, and the TTL must be 1..=21600 seconds.
        if headers.contains_key("x-forwarded-for") {
            s.bad_token_requests += 1;
            return (403, String::new(), String::new());
        }
        let ttl = headers
            .get("x-aws-ec2-metadata-token-ttl-seconds")
            .and_then(|t| t.parse::<u64>().ok())
            .filter(|t| (1..=21600).contains(t));
        let Some(ttl) = ttl else {
            s.bad_token_requests += 1;
            return (400, String::new(), String::new());
        };
        s.issued += 1;
        let token = format!("AQAEAFake{}Token{}==", std::process::id(), s.issued);
        s.tokens
            .insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
        return (
            200,
            token,
            format!("X-aws-ec2-metadata-token-ttl-seconds: {ttl}\r\n"),
        );
    }
    if method != "GET" {
        return (405, String::new(), String::new());
    }
    match headers.get("x-aws-ec2-metadata-token") {
        None => {
            s.without_token += 1;
            return (401, String::new(), String::new());
        }
        Some(t) if s.tokens.get(t).is_none_or(|exp| *exp <= Instant::now()) => {
            s.bad_token += 1;
            return (401, String::new(), String::new());
        }
        Some(_) => {}
    }
    *s.served.entry(path.to_string()).or_default() += 1;
    let item = match path {
        INSTANCE_ACTION => s.instance_action.clone(),
        REBALANCE => s.rebalance.clone(),
        "/latest/user-data" | "/latest/user-data/" => s.user_data.clone(),
        "/latest/dynamic/instance-identity/document" => s.identity.clone(),
        _ => path.strip_prefix(META).and_then(|p| metadata(&s, p)),
    };
    match item {
        Some(body) => (200, body, String::new()),
        None => (404, not_found(), String::new()),
    }
}

/// A metadata item under `/latest/meta-data/`, or the listing of a directory (children one per
/// line, directories with a trailing `/`).
fn metadata(s: &ImdsState, path: &str) -> Option<String> {
    if let Some(v) = s.metadata.get(path) {
        return Some(v.clone());
    }
    let dir = if path.is_empty() || path.ends_with('/') {
        path.to_string()
    } else {
        format!("{path}/")
    };
    let mut keys: Vec<String> = s.metadata.keys().cloned().collect();
    if s.instance_action.is_some() {
        keys.push("spot/instance-action".into());
    }
    if s.rebalance.is_some() {
        keys.push("events/recommendations/rebalance".into());
    }
    let mut children: Vec<String> = keys
        .iter()
        .filter_map(|k| k.strip_prefix(&dir))
        .map(|rest| match rest.split_once('/') {
            Some((d, _)) => format!("{d}/"),
            None => rest.to_string(),
        })
        .collect();
    children.sort();
    children.dedup();
    (!children.is_empty()).then(|| children.join("\n"))
}

/// IMDS's 404 page.
fn not_found() -> String {
    "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n<html><head><title>404 - Not Found</title></head><body><h1>404 - Not Found</h1></body></html>\n".into()
}

/// One raw request; the status code and the body.
pub fn raw_request(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to IMDS");
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {out:?}"));
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_directories_and_serves_items() {
        let mut s = ImdsState::default();
        s.metadata.insert("instance-id".into(), "i-1".into());
        s.metadata
            .insert("placement/availability-zone".into(), "us-east-1a".into());
        s.metadata
            .insert("placement/region".into(), "us-east-1".into());
        assert_eq!(metadata(&s, "instance-id").as_deref(), Some("i-1"));
        assert_eq!(metadata(&s, "").as_deref(), Some("instance-id\nplacement/"));
        assert_eq!(
            metadata(&s, "placement/").as_deref(),
            Some("availability-zone\nregion")
        );
        assert_eq!(metadata(&s, "spot/"), None);
        s.instance_action = Some("{}".into());
        assert_eq!(metadata(&s, "spot").as_deref(), Some("instance-action"));
    }
}
