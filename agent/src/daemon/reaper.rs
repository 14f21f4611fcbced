//! [`Reaper`]: the only `waitpid` in the daemon. The daemon is a child subreaper; one thread
//! reaps every child and routes its exit status to whoever watches its PID (a task, a shell
//! command), keeping exits nobody watched yet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

/// Exit statuses of children, for whoever registered interest in a PID.
#[derive(Default)]
pub(super) struct Reaper {
    inner: Mutex<Waits>,
}

/// Who waits for which PID, and exits nobody waited for yet.
#[derive(Default)]
struct Waits {
    waiting: HashMap<i32, oneshot::Sender<ExitStatus>>,
    unclaimed: HashMap<i32, ExitStatus>,
}

/// How a child ended.
#[derive(Clone, Copy, Debug)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl Reaper {
    /// Makes this process a child subreaper (orphaned descendants become its children) and
    /// starts the thread that reaps every child of this process.
    pub(super) fn start() -> Arc<Self> {
        // SAFETY: prctl with constant arguments.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
        let r = Arc::new(Reaper::default());
        let me = r.clone();
        std::thread::spawn(move || loop {
            use nix::sys::wait::{waitpid, WaitStatus};
            match waitpid(None, None) {
                Ok(WaitStatus::Exited(pid, code)) => me.deliver(
                    pid.as_raw(),
                    ExitStatus {
                        code: Some(code),
                        signal: None,
                    },
                ),
                Ok(WaitStatus::Signaled(pid, sig, _)) => me.deliver(
                    pid.as_raw(),
                    ExitStatus {
                        code: None,
                        signal: Some(sig as i32),
                    },
                ),
                Ok(_) => {}
                // ECHILD (no children yet) or anything else: look again shortly.
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        });
        r
    }

    fn deliver(&self, pid: i32, st: ExitStatus) {
        let mut g = self.inner.lock().expect("reaper lock");
        match g.waiting.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(st);
            }
            None => {
                // Bounded: exits nobody asks for (a dump's guardian, a command's
                // grandchild) do not pile up.
                if g.unclaimed.len() >= 4096 {
                    g.unclaimed.clear();
                }
                g.unclaimed.insert(pid, st);
            }
        }
    }

    /// A future of `pid`'s exit (which may already have happened).
    pub(super) fn watch(&self, pid: i32) -> oneshot::Receiver<ExitStatus> {
        let (tx, rx) = oneshot::channel();
        let mut g = self.inner.lock().expect("reaper lock");
        match g.unclaimed.remove(&pid) {
            Some(st) => {
                let _ = tx.send(st);
            }
            None => {
                g.waiting.insert(pid, tx);
            }
        }
        rx
    }
}
