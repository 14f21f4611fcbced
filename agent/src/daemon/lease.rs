//! The task lease (fencing): tasks run only while the agent can show the job it is there.
//!
//! Every second the agent renews its lease: a write to the `cedana_workers` bucket that the
//! server acknowledged, counted from when it was sent (the server saw it no earlier). If no
//! renewal succeeded for [`LEASE_SECS`], its tasks are frozen (every process stopped, not
//! killed). After each renewal it reads [`revoked_key`]: the driver writes it before it
//! restores this worker's tasks elsewhere, so a task whose lease is revoked is killed (its end
//! is not reported: it goes on elsewhere); otherwise frozen tasks are thawed.
//!
//! Time is `CLOCK_BOOTTIME`: it goes on while the machine is suspended or the process stopped,
//! so a worker paused past its lease freezes its tasks the moment it runs again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use tracing::{info, warn};

use cedana_protocol::{self as protocol, revoked_key, LEASE_SECS};

use super::events::json;
use super::worker::Worker;

/// Nanoseconds of `CLOCK_BOOTTIME`.
fn boottime() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Keeps the lease until aborted: renewals, the revocation check, freezing and thawing.
pub(super) async fn keep_lease(w: Arc<Worker>, workers: kv::Store) {
    let renewed = Arc::new(AtomicU64::new(boottime()));
    let lease = LEASE_SECS * 1_000_000_000;
    // The watchdog: freezes the tasks as soon as the lease has run out.
    let _watchdog = AbortOnDrop({
        let (w, renewed) = (w.clone(), renewed.clone());
        tokio::spawn(async move {
            loop {
                let age = boottime().saturating_sub(renewed.load(Ordering::SeqCst));
                if age > lease && w.freeze() {
                    warn!(
                        secs = age / 1_000_000_000,
                        "lease ran out (NATS unreachable): tasks frozen"
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let key = protocol::lease_key(&w.opts.job, &w.opts.worker);
    let revoked = revoked_key(&w.opts.job, &w.opts.worker);
    loop {
        let sent = boottime();
        let put = tokio::time::timeout(
            Duration::from_secs(2),
            workers.put(&key, json(&protocol::now())),
        )
        .await;
        if matches!(put, Ok(Ok(_))) {
            renewed.fetch_max(sent, Ordering::SeqCst);
            match tokio::time::timeout(Duration::from_secs(2), workers.get(&revoked)).await {
                Ok(Ok(Some(_))) => {
                    let killed = w.fence();
                    if !killed.is_empty() {
                        warn!(tasks = ?killed, "lease revoked (the job moved the tasks elsewhere): tasks killed");
                    }
                }
                Ok(Ok(None)) if w.thaw() => info!("lease renewed: tasks thawed"),
                // Not known: stay as we are until the next renewal says.
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
