//! The driver's side of the wire protocol: sends commands to workers and routes their events
//! (replies to the waiting caller, task output to stdout, exits to whoever waits on a task).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use cedana_agent::protocol::{self, Command, CommandEnvelope, Event, EventEnvelope, Reply};
use futures::StreamExt;
use tokio::sync::{oneshot, watch};

/// Errors talking to workers.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("NATS: {0}")]
    Nats(String),
    #[error("worker {worker} did not answer command {id} within {secs} s")]
    Timeout {
        worker: String,
        id: String,
        secs: u64,
    },
    #[error("worker {worker} did not register within {secs} s")]
    NotRegistered { worker: String, secs: u64 },
}

/// How a task ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

#[derive(Default)]
struct Routes {
    replies: HashMap<String, oneshot::Sender<Reply>>,
    exits: HashMap<String, watch::Sender<Option<Exit>>>,
}

/// A connection to the job's NATS, with the event router running.
#[derive(Clone)]
pub struct Coordinator {
    pub job: String,
    js: jetstream::Context,
    workers: async_nats::jetstream::kv::Store,
    routes: Arc<Mutex<Routes>>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
    prefix: String,
}

impl Coordinator {
    /// Connects, creates the streams and buckets, and starts routing events.
    pub async fn connect(
        url: &str,
        token: &str,
        job: &str,
        echo_logs: bool,
    ) -> Result<Self, CoordError> {
        let client = async_nats::ConnectOptions::with_token(token.to_string())
            .name(format!("cedana-driver {job}"))
            .connection_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|e| CoordError::Connect {
                url: url.into(),
                reason: e.to_string(),
            })?;
        let js = jetstream::new(client.clone());
        let (_, workers, _, _) = cedana_agent::daemon::ensure_layout(&js)
            .await
            .map_err(|(what, e)| CoordError::Nats(format!("{what}: {e}")))?;
        let mut sub = client
            .subscribe(format!("CEDANA.{job}.>"))
            .await
            .map_err(|e| CoordError::Nats(e.to_string()))?;
        let routes = Arc::new(Mutex::new(Routes::default()));
        let r = routes.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if msg.subject.ends_with(".commands") {
                    continue;
                }
                let Ok(env) = protocol::decode::<EventEnvelope>(&msg.payload) else {
                    continue;
                };
                match env.event {
                    Event::Reply { id, reply } => {
                        if let Some(tx) = r.lock().expect("routes").replies.remove(&id) {
                            let _ = tx.send(reply);
                        }
                    }
                    Event::Log { data, .. } => {
                        if echo_logs {
                            use std::io::Write;
                            let mut out = std::io::stdout().lock();
                            let _ = out.write_all(data.as_bytes());
                            let _ = out.flush();
                        }
                    }
                    Event::TaskExited { task, code, signal } => {
                        let tx = r
                            .lock()
                            .expect("routes")
                            .exits
                            .entry(task)
                            .or_insert_with(|| watch::channel(None).0)
                            .clone();
                        let _ = tx.send(Some(Exit { code, signal }));
                    }
                    Event::Heartbeat { .. } => {}
                }
            }
        });
        let prefix = crate::nats::random_hex(4).unwrap_or_default();
        Ok(Coordinator {
            job: job.into(),
            js,
            workers,
            routes,
            next_id: Default::default(),
            prefix,
        })
    }

    /// Waits until `worker` has registered.
    pub async fn wait_registered(&self, worker: &str, secs: u64) -> Result<(), CoordError> {
        let key = format!("{}.{worker}", self.job);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.workers.get(&key).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(CoordError::NotRegistered {
            worker: worker.into(),
            secs,
        })
    }

    /// Sends a command and waits for its reply.
    pub async fn call(
        &self,
        worker: &str,
        command: Command,
        secs: u64,
    ) -> Result<Reply, CoordError> {
        let n = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}-{n}", self.prefix);
        let (tx, rx) = oneshot::channel();
        self.routes
            .lock()
            .expect("routes")
            .replies
            .insert(id.clone(), tx);
        let env = CommandEnvelope {
            v: protocol::VERSION,
            id: id.clone(),
            command,
        };
        let payload = serde_json::to_vec(&env).expect("serializes");
        self.js
            .publish(
                protocol::commands_subject(&self.job, worker),
                payload.into(),
            )
            .await
            .map_err(|e| CoordError::Nats(e.to_string()))?
            .await
            .map_err(|e| CoordError::Nats(e.to_string()))?;
        match tokio::time::timeout(Duration::from_secs(secs), rx).await {
            Ok(Ok(r)) => Ok(r),
            _ => {
                self.routes.lock().expect("routes").replies.remove(&id);
                Err(CoordError::Timeout {
                    worker: worker.into(),
                    id,
                    secs,
                })
            }
        }
    }

    /// Forgets an earlier exit of `task` (before it starts again under the same name).
    pub fn reset_exit(&self, task: &str) {
        self.routes
            .lock()
            .expect("routes")
            .exits
            .insert(task.into(), watch::channel(None).0);
    }

    /// Waits until `task` exits.
    pub async fn wait_exit(&self, task: &str) -> Exit {
        let mut rx = self
            .routes
            .lock()
            .expect("routes")
            .exits
            .entry(task.into())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                return Exit {
                    code: None,
                    signal: None,
                };
            }
        }
    }
}
