//! [`Flag`]: a flag that is set once and can be waited for, in async code or on a thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// A flag that turns true once and stays so (a worker is gone, a job is taken down). Cheap to
/// clone: clones share the flag. Waiters are woken when it is set: [`Flag::wait`] in async
/// code, [`Flag::wait_timeout`] on a thread.
#[derive(Clone, Default)]
pub struct Flag(Arc<Inner>);

#[derive(Default)]
struct Inner {
    set: AtomicBool,
    notify: Notify,
    lock: Mutex<()>,
    cv: Condvar,
}

impl std::fmt::Debug for Flag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Flag").field(&self.is_set()).finish()
    }
}

impl Flag {
    /// A flag not set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the flag and wakes everyone waiting for it.
    pub fn set(&self) {
        self.0.set.store(true, Ordering::SeqCst);
        {
            let _g = self.0.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.0.cv.notify_all();
        }
        self.0.notify.notify_waiters();
    }

    /// Whether the flag is set.
    pub fn is_set(&self) -> bool {
        self.0.set.load(Ordering::SeqCst)
    }

    /// Waits until the flag is set.
    pub async fn wait(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            // Registered before the check: a `set` in between is not missed.
            notified.as_mut().enable();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }

    /// Blocks the thread until the flag is set or `timeout` has passed; whether it is set.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let g = self.0.lock.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self
            .0
            .cv
            .wait_timeout_while(g, timeout, |_| !self.is_set())
            .unwrap_or_else(|e| e.into_inner());
        self.is_set()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_wake_when_set() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let f = Flag::new();
        assert!(!f.is_set());
        assert!(!f.wait_timeout(Duration::from_millis(10)));
        let waiter = rt.spawn({
            let f = f.clone();
            async move { f.wait().await }
        });
        let thread = std::thread::spawn({
            let f = f.clone();
            move || f.wait_timeout(Duration::from_secs(30))
        });
        std::thread::sleep(Duration::from_millis(20));
        f.set();
        rt.block_on(waiter).unwrap();
        assert!(thread.join().unwrap());
        assert!(f.is_set());
        // Set before waiting: no wait.
        rt.block_on(f.wait());
    }
}
