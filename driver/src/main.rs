//! The `cedana-driver` command line: parses the arguments, sets up logging, loads the config
//! and hands the command to its handler in [`cli`].

use std::process::ExitCode;

use cedana_driver::coord::control::Action;
use clap::Parser;

use cli::args::{Cli, Cmd};
use cli::exit::Exit;

mod cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_writer(std::io::stderr)
            // Colours only on a terminal: a job's controller writes to a file.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            // A log that cannot be written (the job's disk is full) must not end the
            // controller: the subscriber's own report of that would panic on the same stderr.
            .log_internal_errors(false)
            .finish()
            // The AWS SDK's own debug output holds whole requests: it is never shown.
            .with(tracing_subscriber::filter::filter_fn(
                cedana_driver::log_event_allowed,
            ))
            .init();
    }
    // `bootstrap` reads and repairs the config itself.
    let config = if matches!(cli.command, Cmd::Bootstrap(_)) {
        Ok(cedana_driver::Config::default())
    } else {
        cedana_driver::Config::load_default(cli.config.as_deref())
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            cli::error(e);
            return Exit::Config.into();
        }
    };
    if matches!(
        cli.command,
        Cmd::Status { .. }
            | Cmd::Logs { .. }
            | Cmd::Price { .. }
            | Cmd::Replay(_)
            | Cmd::Check { .. }
    ) {
        // Commands that only print end quietly when their reader goes (`| head`). Commands
        // that talk to servers keep SIGPIPE ignored: a closed socket is an error, not death.
        // SAFETY: no other thread runs yet; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let state_dir = cli
        .state_dir
        .clone()
        .unwrap_or_else(cedana_driver::runner::default_state_dir);
    let exit = match cli.command {
        Cmd::Run {
            script,
            checkpoint_every,
            image,
            arbitrage_every,
            arbitrage_margin,
            wait_for_spot,
            detach,
            expose,
            store,
            controller_for,
        } => cli::run::run(
            cli::run::Run {
                script,
                checkpoint_every,
                image,
                arbitrage_every,
                arbitrage_margin,
                wait_for_spot,
                detach,
                expose,
                controller_for,
            },
            match store {
                Some(url) => cedana_driver::Config {
                    checkpoint_store: Some(cedana_protocol::config::CheckpointStoreConfig { url }),
                    ..config
                },
                None => config,
            },
            cli.config.clone(),
            state_dir,
        ),
        Cmd::Rm { job } => cli::status::rm(&state_dir, &job, &config),
        Cmd::Port { job, port, local } => cli::status::port(&state_dir, &job, port, local),
        Cmd::Prune { older_than } => cli::status::prune(&state_dir, older_than, &config),
        Cmd::Attach { job, all } => cli::attach::attach(&state_dir, &job, all),
        Cmd::Resume {
            job,
            detach,
            standby,
            controller,
        } => cli::run::resume(
            &job,
            cli::run::ResumeHow {
                detach,
                standby,
                controller,
            },
            config,
            state_dir,
        ),
        Cmd::Status { job, json } => cli::status::status(&state_dir, job.as_deref(), json),
        Cmd::Logs { job, follow } => cli::status::logs(&state_dir, &job, follow),
        Cmd::Checkpoint { job } => {
            cli::control::send(&state_dir, &config, &job, Action::Checkpoint)
        }
        Cmd::Migrate { job } => cli::control::send(&state_dir, &config, &job, Action::Migrate),
        Cmd::Down { job } => cli::control::send(&state_dir, &config, &job, Action::Down),
        #[cfg(feature = "aws")]
        Cmd::Bake(args) => cli::bake::run(*args, &config),
        Cmd::Bootstrap(args) => cli::setup::bootstrap(cli.config.as_deref(), *args),
        Cmd::Price {
            cpu,
            memory,
            gpu,
            vram,
            max_price,
            limit,
            json,
            refresh,
        } => cli::price::run(
            cli::price::Price {
                cpu,
                memory,
                gpu,
                vram,
                max_price,
                limit,
                json,
                refresh,
            },
            &config,
        ),
        Cmd::Replay(args) => cli::replay::run(*args),
        Cmd::Check { json } => cli::readiness::run(&config, json),
    };
    exit.into()
}
