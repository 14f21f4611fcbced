//! `cedana-driver check`: prints [`cedana_driver::readiness::check`]'s findings.

use super::exit::Exit;

pub fn run(config: &cedana_driver::Config, json: bool) -> Exit {
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            super::error(format!("cannot start the runtime: {e}"));
            return Exit::Failed;
        }
    };
    let findings = cedana_driver::readiness::check(config, rt.handle());
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&findings).expect("serializes")
        );
    } else {
        for f in &findings {
            let mark = match (f.enabled, f.ok) {
                (_, true) => "ok  ",
                (true, false) => "FAIL",
                (false, false) => "off ",
            };
            println!("[{mark}] {:<11}{}", f.name, f.detail);
        }
    }
    if findings.iter().any(|f| f.enabled && !f.ok) {
        Exit::Failed
    } else {
        Exit::Ok
    }
}
