//! `failing-agent`: stands in for a `cedana-agent` whose `check` fails on the machine it runs
//! on (the real agent's check passes on every machine the tests have), so the bake test can
//! see that such an agent gets no image made. `--version` answers as the agent does; `check`
//! prints a FAIL line as the agent does and exits with the agent's status for it (5).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version") => {
            println!("cedana-agent 0.0.0-failing");
            ExitCode::SUCCESS
        }
        Some("check") => {
            println!("[ok  ] kernel          (test stand-in)");
            println!("[FAIL] criu            test stand-in: this agent's check always fails");
            println!();
            println!(
                "Checkpoint and restore will NOT work on this machine: fix the FAIL lines above."
            );
            ExitCode::from(5)
        }
        _ => {
            eprintln!("failing-agent: only --version and check");
            ExitCode::from(2)
        }
    }
}
