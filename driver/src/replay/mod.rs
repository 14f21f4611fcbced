//! `cedana-driver replay`: the driver's decisions ([`crate::job::policy`]) replayed on spot
//! traces ([`trace`]) on a simulated clock ([`sim`]), beside the policies users compare it
//! with: on-demand only, spot restarted from scratch or from an hourly application
//! checkpoint after each preemption (SkyPilot's managed jobs without and with checkpoints),
//! the driver as it was before the replay measured it, the offline optimum (with the same
//! changeover costs) and a lower bound below it (with none).

pub mod optimum;
pub mod plot;
pub mod sim;
pub mod trace;

use std::path::PathBuf;

use serde::Serialize;

pub use sim::{Model, Outcome};
pub use trace::{PriceOverride, PriceSeries, TraceError, TraceSet};

/// The policies, in the order they are reported.
pub const POLICIES: [&str; 7] = [
    "on-demand",
    "spot-restart",
    "spot-app-checkpoint",
    "driver-before",
    "driver",
    "optimum",
    "lower-bound",
];

/// What to replay.
#[derive(Clone, Debug)]
pub struct Replay {
    pub traces: Vec<PathBuf>,
    pub prices: PriceOverride,
    /// Prices over time (`--prices`).
    pub series: PriceSeries,
    /// Also the driver with each change undone alone.
    pub ablation: bool,
    pub model: Model,
    /// Replays per trace set, their starts spread over the set.
    pub starts: usize,
    /// Notice before a preemption, per cloud (seconds): AWS gives 120, GCP 30.
    pub notice_aws: f64,
    pub notice_gcp: f64,
}

/// One start of one set.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    pub start_hours: f64,
    pub outcomes: Vec<Outcome>,
}

/// Every start of one set.
#[derive(Clone, Debug, Serialize)]
pub struct SetReport {
    pub name: String,
    pub instance_type: String,
    pub zones: Vec<String>,
    pub hours: f64,
    pub on_demand: f64,
    pub spot: f64,
    pub notice_secs: f64,
    pub runs: Vec<Run>,
}

/// One policy over every run.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub policy: String,
    pub runs: usize,
    /// Mean cost over the same run's on-demand cost.
    pub over_on_demand: f64,
    /// Mean cost over the same run's offline optimum.
    pub over_optimum: f64,
    /// Mean cost over the same run's spot-restart cost.
    pub over_spot_restart: f64,
    /// The worst cost over the optimum.
    pub worst_over_optimum: f64,
    /// Runs that did not finish within the trace.
    pub unfinished: usize,
    /// Runs that finished after the deadline (or not at all, with one).
    pub missed_deadline: usize,
    pub mean_finish_hours: f64,
    pub mean_redone_hours: f64,
    pub moves: u32,
    pub recoveries: u32,
}

/// The whole replay.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub model: Model,
    pub sets: Vec<SetReport>,
    pub summary: Vec<Summary>,
}

/// Loads the traces and replays every policy on every set from `starts` start points.
pub fn run(r: &Replay) -> Result<Report, TraceError> {
    let sets = trace::load(&r.traces, &r.prices)?;
    let mut reports = Vec::new();
    for set in &sets {
        let notice = if set.cloud == "gcp" {
            r.notice_gcp
        } else {
            r.notice_aws
        };
        let model = Model {
            notice_secs: notice,
            ..r.model.clone()
        };
        let runs = starts(set, &model, r.starts)
            .into_iter()
            .map(|start_tick| {
                let w = sim::World {
                    set,
                    start_tick,
                    prices: &r.series,
                };
                Run {
                    start_hours: start_tick as f64 * set.gap / 3600.0,
                    outcomes: replay_one(&w, &model, r.ablation),
                }
            })
            .collect();
        reports.push(SetReport {
            name: set.name.clone(),
            instance_type: set.instance_type.clone(),
            zones: set.zones.iter().map(|z| z.name.clone()).collect(),
            hours: set.hours(),
            on_demand: set.on_demand,
            spot: set.spot,
            notice_secs: notice,
            runs,
        });
    }
    let summary = summarize(&reports);
    Ok(Report {
        model: r.model.clone(),
        sets: reports,
        summary,
    })
}

/// Every policy on one world, in [`POLICIES`]' order (then, with `ablation`, the driver
/// without waiting for spot and the driver with a fixed interval and the cheapest first).
pub fn replay_one(w: &sim::World, model: &Model, ablation: bool) -> Vec<Outcome> {
    let mut out = vec![
        sim::on_demand(w, model),
        sim::spot_restart(w, model, false, POLICIES[1]),
        sim::spot_restart(w, model, true, POLICIES[2]),
        sim::driver(w, model, sim::Variant::BEFORE, POLICIES[3]),
        sim::driver(w, model, sim::Variant::NOW, POLICIES[4]),
        optimum::optimum(w, model),
        sim::lower_bound(w, model),
    ];
    if ablation {
        let no_wait = sim::Variant {
            wait: false,
            ..sim::Variant::NOW
        };
        let fixed = sim::Variant {
            adaptive: false,
            ..sim::Variant::NOW
        };
        out.push(sim::driver(w, model, no_wait, "driver-no-wait"));
        out.push(sim::driver(w, model, fixed, "driver-fixed"));
    }
    out
}

/// Start ticks spread evenly over the part of the set that leaves a whole window after them
/// (the deadline, or twice the work); a set shorter than that starts once, at its beginning.
fn starts(set: &TraceSet, model: &Model, n: usize) -> Vec<usize> {
    let window = model.deadline_secs.unwrap_or(2.0 * model.work_secs);
    let window_ticks = (window / set.gap).ceil() as usize;
    let room = set.ticks().saturating_sub(window_ticks);
    let n = n.max(1);
    if room == 0 || n == 1 {
        return vec![0];
    }
    (0..n).map(|i| i * room / (n - 1).max(1)).collect()
}

/// The policies' names, in their order in every run.
fn names(sets: &[SetReport]) -> Vec<String> {
    sets.iter()
        .flat_map(|s| &s.runs)
        .next()
        .map(|r| r.outcomes.iter().map(|o| o.policy.clone()).collect())
        .unwrap_or_default()
}

fn summarize(sets: &[SetReport]) -> Vec<Summary> {
    let mut out = Vec::new();
    for (i, name) in names(sets).iter().enumerate() {
        let mut s = Summary {
            policy: name.to_string(),
            runs: 0,
            over_on_demand: 0.0,
            over_optimum: 0.0,
            over_spot_restart: 0.0,
            worst_over_optimum: 0.0,
            unfinished: 0,
            missed_deadline: 0,
            mean_finish_hours: 0.0,
            mean_redone_hours: 0.0,
            moves: 0,
            recoveries: 0,
        };
        let mut finished = 0usize;
        for run in sets.iter().flat_map(|s| &s.runs) {
            let o = &run.outcomes[i];
            let od = run.outcomes[0].cost;
            let restart = run.outcomes[1].cost;
            let opt = run.outcomes[5].cost;
            s.runs += 1;
            s.over_on_demand += o.cost / od;
            s.over_optimum += o.cost / opt;
            s.over_spot_restart += o.cost / restart;
            s.worst_over_optimum = s.worst_over_optimum.max(o.cost / opt);
            match o.finished_hours {
                Some(h) => {
                    finished += 1;
                    s.mean_finish_hours += h;
                }
                None => s.unfinished += 1,
            }
            if o.met_deadline == Some(false) {
                s.missed_deadline += 1;
            }
            s.mean_redone_hours += o.redone_hours;
            s.moves += o.moves;
            s.recoveries += o.recoveries;
        }
        let n = s.runs.max(1) as f64;
        s.over_on_demand /= n;
        s.over_optimum /= n;
        s.over_spot_restart /= n;
        s.mean_redone_hours /= n;
        s.mean_finish_hours /= finished.max(1) as f64;
        out.push(s);
    }
    out
}

/// The report as tables: per set the mean of its runs, then every run pooled.
pub fn table(r: &Report) -> String {
    use std::fmt::Write;
    let m = &r.model;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "job: {:.1} h of work, {:.0} GiB of memory{}; start {:.0} s; notice AWS/GCP as set; checkpoint frozen {:.2} s/GiB, upload {:.2} s/GiB, restore {:.2} s/GiB, {:.0}% of memory rewritten per hour; driver interval {:.0} s, arbitrage every {:.0} s at {:.0}%",
        m.work_secs / 3600.0,
        m.memory_gib,
        m.deadline_secs
            .map(|d| format!(", deadline {:.1} h", d / 3600.0))
            .unwrap_or_default(),
        m.start_secs,
        m.frozen_secs_per_gib,
        m.upload_secs_per_gib,
        m.restore_secs_per_gib,
        m.dirty_per_hour * 100.0,
        m.interval_secs,
        m.arbitrage_every_secs,
        m.arbitrage_margin * 100.0
    );
    for set in &r.sets {
        let _ = writeln!(
            out,
            "\n{} ({}, {} zones, {:.0} h, on-demand ${:.3}/h, spot ${:.3}/h unless the trace prices it, notice {:.0} s): {} run{}",
            set.name,
            set.instance_type,
            set.zones.len(),
            set.hours,
            set.on_demand,
            set.spot,
            set.notice_secs,
            set.runs.len(),
            if set.runs.len() == 1 { "" } else { "s" }
        );
        let _ = writeln!(
            out,
            "  {:<20} {:>9} {:>8} {:>8} {:>9} {:>8} {:>6} {:>6} {:>7}",
            "policy", "cost $", "/od", "/opt", "finish h", "redone", "moves", "recov", "missed"
        );
        for (i, name) in names(std::slice::from_ref(set)).iter().enumerate() {
            let n = set.runs.len().max(1) as f64;
            let mean = |f: &dyn Fn(&Run) -> f64| set.runs.iter().map(f).sum::<f64>() / n;
            let cost = mean(&|r| r.outcomes[i].cost);
            let od = mean(&|r| r.outcomes[i].cost / r.outcomes[0].cost);
            let opt = mean(&|r| r.outcomes[i].cost / r.outcomes[5].cost);
            let done: Vec<f64> = set
                .runs
                .iter()
                .filter_map(|r| r.outcomes[i].finished_hours)
                .collect();
            let finish = if done.len() == set.runs.len() {
                format!("{:.1}", done.iter().sum::<f64>() / n)
            } else {
                format!("{}/{} done", done.len(), set.runs.len())
            };
            let redone = mean(&|r| r.outcomes[i].redone_hours);
            let moves: u32 = set.runs.iter().map(|r| r.outcomes[i].moves).sum();
            let recov: u32 = set.runs.iter().map(|r| r.outcomes[i].recoveries).sum();
            let missed = set
                .runs
                .iter()
                .filter(|r| r.outcomes[i].met_deadline == Some(false))
                .count();
            let _ = writeln!(
                out,
                "  {name:<20} {cost:>9.2} {od:>8.3} {opt:>8.3} {finish:>9} {redone:>8.2} {moves:>6} {recov:>6} {missed:>7}"
            );
        }
    }
    let _ = writeln!(out, "\nall runs");
    let _ = writeln!(
        out,
        "  {:<20} {:>5} {:>8} {:>8} {:>9} {:>10} {:>9} {:>7} {:>10}",
        "policy",
        "runs",
        "/od",
        "/opt",
        "worst/opt",
        "/restart",
        "finish h",
        "missed",
        "unfinished"
    );
    for s in &r.summary {
        let _ = writeln!(
            out,
            "  {:<20} {:>5} {:>8.3} {:>8.3} {:>9.3} {:>10.3} {:>9.1} {:>7} {:>10}",
            s.policy,
            s.runs,
            s.over_on_demand,
            s.over_optimum,
            s.worst_over_optimum,
            s.over_spot_restart,
            s.mean_finish_hours,
            s.missed_deadline,
            s.unfinished
        );
    }
    out
}
