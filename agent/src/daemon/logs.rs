//! Task log tailing: a task's output file (its stdout and stderr) published as
//! [`Event::Log`]s as it grows, whole lines at a time, in events of at most
//! [`MAX_LOG_EVENT`] bytes.
//!
//! What is held is bounded whatever the task writes: the file is read a piece at a time, a line
//! longer than an event goes out in pieces, and a progress bar's `\r` ends a piece as `\n`
//! does. A burst of output becomes many events, each under the NATS server's message limit,
//! so none is refused (and retried in vain) for its size.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cedana_protocol::Event;

use super::events::Events;

/// The most output one event carries: JSON may write a control byte as six (`\u001b`), and
/// six times this stays under the 1 MiB NATS servers take by default.
pub const MAX_LOG_EVENT: usize = 128 << 10;

/// How much of the file is read at once.
const READ: usize = 64 << 10;

/// Publishes a task's log as it grows, until the task ended and the end of the log is reached.
pub(super) async fn tail_log(
    events: Arc<Events>,
    task: String,
    log: PathBuf,
    mut offset: u64,
    done: tokio::sync::watch::Receiver<bool>,
    mark: Option<PathBuf>,
) {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    // How much was published, kept for a daemon that takes the task back.
    let mark = mark.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(p)
            .ok()
    });
    let note = |sent: u64| {
        if let Some(f) = &mark {
            use std::os::unix::fs::FileExt;
            let _ = f.write_at(&sent.to_le_bytes(), 0);
        }
    };
    let mut pending = Vec::with_capacity(MAX_LOG_EVENT + READ);
    let mut buf = vec![0u8; READ];
    loop {
        let finished = *done.borrow();
        if let Ok(mut f) = tokio::fs::File::open(&log).await {
            if f.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
                // Read to the end a piece at a time, sending what is ready after each piece.
                while let Ok(n) = f.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    offset += n as u64;
                    pending.extend_from_slice(&buf[..n]);
                    send_ready(&events, &task, &mut pending, false).await;
                }
            }
        }
        // Whole lines (or pieces) only, unless the task is over.
        send_ready(&events, &task, &mut pending, finished).await;
        note(offset - pending.len() as u64);
        if finished {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes what of `pending` is ready (see [`ready`]), in order.
async fn send_ready(events: &Events, task: &str, pending: &mut Vec<u8>, all: bool) {
    loop {
        let cut = ready(pending, MAX_LOG_EVENT, all);
        if cut == 0 {
            return;
        }
        let data: Vec<u8> = pending.drain(..cut).collect();
        events
            .publish(Event::Log {
                task: task.to_string(),
                data: String::from_utf8_lossy(&data).into_owned(),
            })
            .await;
    }
}

/// How many bytes at the front of `pending` go out in the next event: up to the last `\n` or
/// `\r` within `max` bytes; without one, `max` bytes of a longer line (cut where a UTF-8
/// character ends); `all` (the task ended) sends the rest too. 0: nothing yet.
fn ready(pending: &[u8], max: usize, all: bool) -> usize {
    if pending.is_empty() {
        return 0;
    }
    if all && pending.len() <= max {
        return pending.len();
    }
    let window = &pending[..pending.len().min(max)];
    if let Some(i) = window.iter().rposition(|b| matches!(b, b'\n' | b'\r')) {
        return i + 1;
    }
    if pending.len() >= max || all {
        return utf8_floor(window);
    }
    0
}

/// The length of `b` without a UTF-8 character cut at its end (all of it when the cut is
/// elsewhere or it is not UTF-8 at all).
fn utf8_floor(b: &[u8]) -> usize {
    match std::str::from_utf8(b) {
        Err(e) if e.error_len().is_none() && e.valid_up_to() > 0 => e.valid_up_to(),
        _ => b.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_lines_then_pieces_of_long_ones() {
        assert_eq!(ready(b"", 8, true), 0);
        assert_eq!(ready(b"ab\ncd", 8, false), 3);
        assert_eq!(ready(b"ab\ncd", 8, true), 5);
        assert_eq!(
            ready(b"10%\r20", 8, false),
            4,
            "a progress bar's \\r ends a piece"
        );
        assert_eq!(ready(b"abcdef", 8, false), 0, "a short partial line waits");
        assert_eq!(
            ready(b"abcdefghij", 8, false),
            8,
            "a long one goes in pieces"
        );
        assert_eq!(ready(b"a\nbcdefghij", 8, false), 2);
        // "é" is two bytes: a piece never ends inside it.
        assert_eq!(ready("abcdefgé".as_bytes(), 8, false), 7);
        assert_eq!(
            ready(b"abcdefghij", 8, true),
            8,
            "more than an event: in pieces"
        );
    }
}
