//! `cedana-driver checkpoint`, `migrate` and `down`: a request to the job's driver over NATS.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use cedana_driver::coord::control::{self, Action};
use cedana_driver::job::record::TOKEN_FILE;

use super::exit::Exit;

/// Asks the driver of `job` to do `action`; prints its answer.
pub fn send(state_dir: &Path, config: &cedana_driver::Config, job: &str, action: Action) -> Exit {
    let (dir, record) = match super::status::find(state_dir, job) {
        Ok(f) => f,
        Err(code) => return code,
    };
    if action == Action::Down && !record.state.is_final() && !record.driver_alive() {
        // Its controller died: what it left is ended here.
        let mut record = record;
        for line in cedana_driver::job::orphan::end(&dir, &mut record) {
            println!("{line}");
        }
        let cloud = record.workers.iter().any(|w| {
            w.state == cedana_driver::job::record::WorkerState::Running
                && w.provider != cedana_driver::providers::local::NAME
        });
        if cloud {
            let reporter = cedana_driver::job::report::Silent;
            let providers = match cedana_driver::runner::providers(config, None, &reporter) {
                Ok(p) => p,
                Err(e) => {
                    super::error(format!("cannot reach the job's cloud providers: {e}"));
                    return Exit::Config;
                }
            };
            let rt = match super::runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    super::error(e);
                    return Exit::Failed;
                }
            };
            for line in rt.block_on(cedana_driver::job::orphan::end_cloud(
                &dir,
                &mut record,
                &providers,
            )) {
                println!("{line}");
            }
        }
        if record.state.is_final() {
            println!("job {} is down", record.job);
            return Exit::Ok;
        }
        super::error(format!("job {} still has workers running", record.job));
        return Exit::Failed;
    }
    if !record.driver_alive() {
        super::error(if record.state.is_final() {
            format!(
                "job {} is not running (state {})",
                record.job,
                record.shown_state()
            )
        } else {
            format!(
                "job {} has no controller (state {}); `cedana-driver resume {}` brings it back, `cedana-driver down {}` ends it",
                record.job,
                record.shown_state(),
                record.job,
                record.job
            )
        });
        return Exit::NoJob;
    }
    let token = if record.embedded_nats {
        match std::fs::read_to_string(dir.join(TOKEN_FILE)) {
            Ok(t) => t.trim().to_string(),
            Err(e) => {
                super::error(format!("cannot read job {}'s NATS token: {e}", record.job));
                return Exit::NoJob;
            }
        }
    } else {
        config.connection.auth_token.expose().to_string()
    };
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            super::error(e);
            return Exit::Failed;
        }
    };
    let spinner = std::io::stderr().is_terminal().then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_message(format!("{action:?} {}", record.job).to_lowercase());
        pb.enable_steady_tick(Duration::from_millis(120));
        pb
    });
    let result = rt.block_on(control::request(
        &record.nats_url,
        &token,
        &record.job,
        action,
        if action == Action::Down { 60 } else { 3600 },
    ));
    if let Some(pb) = spinner {
        pb.finish_and_clear();
    }
    match result {
        Ok(a) => {
            println!("{}", a.message);
            Exit::Ok
        }
        Err(e @ control::ControlError::Refused { .. }) => {
            super::error(e);
            Exit::Failed
        }
        Err(e) => {
            super::error(e);
            Exit::NoJob
        }
    }
}
