//! A task's ports, reached from this machine: a local port forwards each connection to the
//! same or another port of the task, on the worker it runs on at that moment (read from the
//! job's record per connection, so a move re-aims it). `run --expose` (in the job's
//! controller) and `cedana-driver port` use it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::job::record::{JobRecord, WorkerState};

/// Where job `dir`'s task runs now: (its worker, the worker's address), if known.
pub fn task_address(dir: &Path) -> Option<(String, IpAddr)> {
    let r = JobRecord::load(dir).ok()?;
    let t = r.task.as_ref()?;
    let w = r
        .workers
        .iter()
        .find(|w| w.id == t.worker && w.state == WorkerState::Running)?;
    Some((w.id.clone(), w.address?))
}

/// Parses `LOCAL:TASK` or `PORT` (the same on both sides).
pub fn parse_expose(s: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{s:?} is not PORT or LOCAL:TASK (ports from 1 to 65535)"))
    };
    match s.split_once(':') {
        Some((l, t)) => Ok((port(l)?, port(t)?)),
        None => port(s).map(|p| (p, p)),
    }
}

/// Serves `listener` until aborted: each connection goes to `port` of the task of the job in
/// `dir`, wherever it runs then; one that cannot be placed (no task, an address not known)
/// is closed.
pub async fn forward(listener: tokio::net::TcpListener, dir: PathBuf, port: u16) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let dir = dir.clone();
        tokio::spawn(async move {
            let Some((worker, addr)) = task_address(&dir) else {
                tracing::info!("a connection to the task's port, but the task runs nowhere known");
                return;
            };
            match tokio::net::TcpStream::connect((addr, port)).await {
                Ok(mut out) => {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
                Err(e) => {
                    tracing::info!(%worker, %addr, port, error = %e, "cannot reach the task's port")
                }
            }
        });
    }
}
