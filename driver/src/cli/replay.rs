//! `cedana-driver replay`: reads the flags, runs [`cedana_driver::replay`], prints.

use std::io::Write;

use cedana_driver::replay::{self, Model, PriceOverride, Replay};

use super::args::ReplayArgs;
use super::exit::Exit;

pub fn run(a: ReplayArgs) -> Exit {
    let positive = [
        ("--job-hours", a.job_hours),
        ("--memory-gib", a.memory_gib),
        ("--interval-secs", a.interval_secs),
        ("--arbitrage-every-secs", a.arbitrage_every_secs),
        ("--app-checkpoint-secs", a.app_checkpoint_secs),
    ];
    for (flag, v) in positive {
        if !(v.is_finite() && v > 0.0 && v <= 1e7) {
            super::error(format!(
                "{flag} {v}: give a number above 0 (and at most 10000000)"
            ));
            return Exit::Usage;
        }
    }
    let non_negative = [
        ("--start-secs", a.start_secs),
        ("--notice-aws-secs", a.notice_aws_secs),
        ("--notice-gcp-secs", a.notice_gcp_secs),
        ("--frozen-secs-per-gib", a.frozen_secs_per_gib),
        ("--upload-secs-per-gib", a.upload_secs_per_gib),
        ("--restore-secs-per-gib", a.restore_secs_per_gib),
        ("--dirty-per-hour", a.dirty_per_hour),
        ("--arbitrage-margin", a.arbitrage_margin),
        ("--wait-for-spot-secs", a.wait_for_spot_secs),
    ];
    for (flag, v) in non_negative {
        if !(v.is_finite() && (0.0..=1e6).contains(&v)) {
            super::error(format!("{flag} {v}: give a number from 0 to 1000000"));
            return Exit::Usage;
        }
    }
    if let Some(d) = a
        .deadline_hours
        .filter(|d| !(d.is_finite() && *d >= a.job_hours))
    {
        super::error(format!(
            "--deadline-hours {d}: the deadline must be at least the job's {} hours",
            a.job_hours
        ));
        return Exit::Usage;
    }
    if !(1..=1000).contains(&a.starts) {
        super::error(format!("--starts {}: give 1 to 1000", a.starts));
        return Exit::Usage;
    }
    for p in [a.on_demand_price, a.spot_price].into_iter().flatten() {
        if !(p.is_finite() && p >= 0.0) {
            super::error(format!("price {p}: give dollars per hour, 0 or more"));
            return Exit::Usage;
        }
    }
    let series = match &a.prices {
        Some(p) => match replay::PriceSeries::load(p) {
            Ok(s) => s,
            Err(e) => {
                super::error(e);
                return Exit::Config;
            }
        },
        None => replay::PriceSeries::default(),
    };
    let r = Replay {
        series,
        ablation: a.ablation,
        traces: a.traces,
        prices: PriceOverride {
            on_demand: a.on_demand_price,
            spot: a.spot_price,
        },
        model: Model {
            work_secs: a.job_hours * 3600.0,
            memory_gib: a.memory_gib,
            deadline_secs: a.deadline_hours.map(|d| d * 3600.0),
            start_secs: a.start_secs,
            notice_secs: a.notice_aws_secs,
            frozen_secs_per_gib: a.frozen_secs_per_gib,
            upload_secs_per_gib: a.upload_secs_per_gib,
            restore_secs_per_gib: a.restore_secs_per_gib,
            dirty_per_hour: a.dirty_per_hour,
            interval_secs: a.interval_secs,
            arbitrage_every_secs: a.arbitrage_every_secs,
            arbitrage_margin: a.arbitrage_margin / 100.0,
            app_checkpoint_secs: a.app_checkpoint_secs,
            wait_for_spot_secs: a.wait_for_spot_secs,
            step_secs: 10.0,
        },
        starts: a.starts,
        notice_aws: a.notice_aws_secs,
        notice_gcp: a.notice_gcp_secs,
    };
    let report = match replay::run(&r) {
        Ok(report) => report,
        Err(e) => {
            super::error(format!("{e}"));
            return Exit::Config;
        }
    };
    if let Some(dir) = &a.plot {
        if let Err(e) = std::fs::create_dir_all(dir) {
            super::error(format!("cannot create {}: {e}", dir.display()));
            return Exit::Failed;
        }
        for set in &report.sets {
            let file = dir.join(format!("{}.svg", set.name.replace('/', "_")));
            let title = format!(
                "{} ({}), {:.0} h job from hour {:.1}",
                set.name,
                set.instance_type,
                report.model.work_secs / 3600.0,
                set.runs[0].start_hours
            );
            if let Err(e) = replay::plot::draw(&file, &title, &set.runs[0].outcomes) {
                super::error(e);
                return Exit::Failed;
            }
        }
    }
    let text = if a.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => s + "\n",
            Err(e) => {
                super::error(e);
                return Exit::Failed;
            }
        }
    } else {
        replay::table(&report)
    };
    let _ = std::io::stdout().write_all(text.as_bytes());
    Exit::Ok
}
