//! Requests to a running job from other processes (`cedana-driver checkpoint|migrate|down
//! JOB`): core NATS request/reply on `CEDANA.<job>.driver.control`, served by the job's driver.

use std::time::Duration;

pub use cedana_protocol::control::{Action, Answer, Request};
use cedana_protocol::control_subject as subject;
use futures::StreamExt;

/// A request waiting for the job's loop, with where its answer goes.
pub type Pending = (Action, tokio::sync::oneshot::Sender<Answer>);

/// Errors of a control request.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach job {job}'s NATS at {url}: {reason}")]
    Connect {
        job: String,
        url: String,
        reason: String,
    },
    #[error("job {job}'s driver did not answer within {secs} s (is it still running? `cedana-driver status`)")]
    NoAnswer { job: String, secs: u64 },
    #[error("job {job}: {message}")]
    Refused { job: String, message: String },
}

/// Serves control requests for `job`. Managed jobs get them through `tx`; a script that runs
/// its own code only takes `down`. `down` sets `down` at once, so every wait of the job ends.
pub async fn serve(
    client: async_nats::Client,
    job: String,
    tx: Option<std::sync::mpsc::Sender<Pending>>,
    down: crate::util::Flag,
) -> Result<(), async_nats::SubscribeError> {
    let mut sub = client.subscribe(subject(&job)).await?;
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Some(reply_to) = msg.reply.clone() else {
                continue;
            };
            let answer = match serde_json::from_slice::<Request>(&msg.payload) {
                Err(e) => Answer {
                    v: cedana_protocol::VERSION,
                    ok: false,
                    message: format!("bad request: {e}"),
                },
                Ok(req) => {
                    if req.action == Action::Down {
                        down.set();
                    }
                    match (&tx, req.action) {
                        // Answered at once: the job's loop ends without another turn.
                        (_, Action::Down) => Answer {
                            v: cedana_protocol::VERSION,
                            ok: true,
                            message: "taking the job down".into(),
                        },
                        (Some(tx), action) => {
                            let (atx, arx) = tokio::sync::oneshot::channel();
                            if tx.send((action, atx)).is_err() {
                                Answer {
                                    v: cedana_protocol::VERSION,
                                    ok: false,
                                    message: "the job is ending".into(),
                                }
                            } else {
                                match tokio::time::timeout(Duration::from_secs(3600), arx).await {
                                    Ok(Ok(a)) => a,
                                    _ => Answer {
                                        v: cedana_protocol::VERSION,
                                        ok: false,
                                        message: "the job ended before answering".into(),
                                    },
                                }
                            }
                        }
                        (None, _) => Answer {
                            v: cedana_protocol::VERSION,
                            ok: false,
                            message: "this job's script drives its own checkpoints and migrations; only jobs on the managed flow take them from the command line".into(),
                        },
                    }
                }
            };
            let _ = client
                .publish(
                    reply_to,
                    serde_json::to_vec(&answer).expect("serializes").into(),
                )
                .await;
            let _ = client.flush().await;
        }
    });
    Ok(())
}

/// Sends `action` to the driver of `job` and waits for its answer.
pub async fn request(
    url: &str,
    token: &str,
    job: &str,
    action: Action,
    secs: u64,
) -> Result<Answer, ControlError> {
    let client = cedana_protocol::NatsCredential::parse(&cedana_protocol::Secret::new(token))
        .connect_options()
        .name("cedana-driver control")
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(secs)))
        .connect(cedana_protocol::NatsUrl::parse(url).servers().to_vec())
        .await
        .map_err(|e| ControlError::Connect {
            job: job.into(),
            url: url.into(),
            reason: e.to_string(),
        })?;
    let body = serde_json::to_vec(&Request {
        v: cedana_protocol::VERSION,
        action,
    })
    .expect("serializes");
    let msg = client
        .request(subject(job), body.into())
        .await
        .map_err(|_| ControlError::NoAnswer {
            job: job.into(),
            secs,
        })?;
    let answer: Answer =
        serde_json::from_slice(&msg.payload).map_err(|e| ControlError::Refused {
            job: job.into(),
            message: format!("unreadable answer: {e}"),
        })?;
    if answer.ok {
        Ok(answer)
    } else {
        Err(ControlError::Refused {
            job: job.into(),
            message: answer.message,
        })
    }
}
