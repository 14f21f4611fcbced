//! Task log tailing: a task's output file (its stdout and stderr) published as
//! [`Event::Log`]s as it grows, whole lines at a time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cedana_protocol::Event;

use super::events::Events;

/// Publishes a task's log as it grows, until the task ended and the end of the log is reached.
pub(super) async fn tail_log(
    events: Arc<Events>,
    task: String,
    log: PathBuf,
    mut offset: u64,
    done: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut pending = Vec::new();
    loop {
        let finished = *done.borrow();
        if let Ok(mut f) = tokio::fs::File::open(&log).await {
            if f.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
                let mut buf = Vec::new();
                if let Ok(n) = f.read_to_end(&mut buf).await {
                    offset += n as u64;
                    pending.extend_from_slice(&buf);
                }
            }
        }
        // Whole lines only, unless the task is over.
        let cut = if finished {
            pending.len()
        } else {
            pending
                .iter()
                .rposition(|b| *b == b'\n')
                .map(|i| i + 1)
                .unwrap_or(0)
        };
        if cut > 0 {
            let data: Vec<u8> = pending.drain(..cut).collect();
            events
                .publish(Event::Log {
                    task: task.clone(),
                    data: String::from_utf8_lossy(&data).into_owned(),
                })
                .await;
        }
        if finished {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
