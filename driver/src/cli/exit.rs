//! [`Exit`]: every exit code of `cedana-driver`, named. The `--help` texts that list exit
//! codes ([`AFTER`](super::args::AFTER), `price`) say the same; a test checks it.

use std::process::ExitCode;

/// How `cedana-driver` ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 0: done.
    Ok,
    /// 1: the job or the command failed.
    Failed,
    /// 2: bad command line or job file (file:line:column given), or a job file asks for what
    /// this driver does not do; clap ends a bad command line with 2 as well.
    Usage,
    /// 3: bad config (it cannot be read or loaded, names no usable provider, or has no path).
    Config,
    /// 4: no such job, it is not running, or its driver did not answer.
    NoJob,
    /// 5: no offer fits the job's or the command line's spec (`price`, `run` of a managed job).
    NoOffer,
    /// 130: the job was taken down (`down`, Ctrl-C), or `bake` was interrupted.
    Down,
    /// `run`: the task's own exit status (0 when it succeeded, 128+N when signal N ended it).
    Task(u8),
}

impl Exit {
    /// The process exit status.
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Failed => 1,
            Exit::Usage => 2,
            Exit::Config => 3,
            Exit::NoJob => 4,
            Exit::NoOffer => 5,
            Exit::Down => 130,
            Exit::Task(code) => code,
        }
    }

    /// The exit of `run` for the task's status (clamped to 0..=255).
    pub fn task(status: i64) -> Exit {
        Exit::Task(status.clamp(0, 255) as u8)
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixed codes, each with the words `--help` uses for it.
    const DOCUMENTED: [(Exit, &str); 7] = [
        (Exit::Ok, "0 ok"),
        (Exit::Failed, "1 job or command failed"),
        (Exit::Usage, "2 bad command line or job file"),
        (Exit::Config, "3 bad config"),
        (Exit::NoJob, "4 no such job"),
        (Exit::NoOffer, "5 no offer fits"),
        (Exit::Down, "130 job taken down"),
    ];

    #[test]
    fn the_help_lists_every_code_as_the_enum_has_it() {
        let help = super::super::args::AFTER;
        for (exit, words) in DOCUMENTED {
            assert!(
                words.starts_with(&format!("{} ", exit.code())),
                "{exit:?} is {}, not {words:?}",
                exit.code()
            );
            assert!(
                help.contains(words),
                "--help does not say {words:?}: {help}"
            );
        }
        assert!(help.contains("task's exit status"));
        let cli = <super::super::args::Cli as clap::CommandFactory>::command();
        let price = cli.find_subcommand("price").expect("price").clone();
        let about = price
            .get_long_about()
            .expect("price's long help")
            .to_string();
        let words = format!("Exits with {} when nothing fits", Exit::NoOffer.code());
        assert!(
            about.contains(&words),
            "`price --help` does not say {words:?}: {about}"
        );
        let words = format!("with {} when no enabled provider", Exit::Config.code());
        assert!(about.contains(&words), "`price --help`: {about}");
        let check = cli.find_subcommand("check").expect("check").clone();
        let about = check
            .get_long_about()
            .expect("check's long help")
            .to_string();
        for words in [
            format!(
                "Exits with {} when everything enabled is usable",
                Exit::Ok.code()
            ),
            format!("{} when something enabled is not", Exit::Failed.code()),
        ] {
            assert!(about.contains(&words), "`check --help`: {about}");
        }
        assert_eq!(Exit::task(-1), Exit::Task(0));
        assert_eq!(Exit::task(300).code(), 255);
        assert_eq!(Exit::task(137).code(), 137);
    }
}
