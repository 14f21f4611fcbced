use clap::Parser;

/// Run long jobs on the cheapest machine that fits and keep them alive across preemption.
///
/// Not implemented yet: this release ships the agent (`cedana-agent`). The driver's commands
/// (`run`, `status`, `logs`, `checkpoint`, `migrate`, `down`, `price`, `bootstrap`, `bake`)
/// come next.
#[derive(Parser)]
#[command(name = "cedana-driver", version)]
struct Cli {}

fn main() -> std::process::ExitCode {
    let _ = Cli::parse();
    eprintln!("cedana-driver: not implemented yet; use cedana-agent to dump and restore processes");
    std::process::ExitCode::from(2)
}
