//! The offline optimum: knowing the whole trace, the cheapest way to do the job's work by the
//! deadline (or the trace's end), paying what the policies pay for a launch and a move.
//!
//! A dynamic programme over (time step, work done, where the task runs). Time moves in steps
//! of at most 60 s that divide the trace's tick (a longer horizon doubles the step until the
//! table of choices fits in [`MAX_TABLE`] bytes); each step the task runs in a place (a spot
//! zone with capacity in that step, or the cheapest on-demand region) and is billed there,
//! or no instance runs. Changes cost what [`Model`] says, rounded down to whole steps:
//!
//! - a **launch** (from no instance) bills [`Model::start_secs`] at the new place before the
//!   task runs, plus the restore when it resumes work already done;
//! - a **move** (from a running instance) bills the new instance's start while the old one
//!   still works (it knows when to start it), then the checkpoint's frozen time and the
//!   restore at the new place, when no work is done;
//! - stopping keeps the work (the optimum knows the future: nothing is ever lost to a
//!   preemption, and it never checkpoints otherwise).
//!
//! So it is the cheapest plan a clairvoyant scheduler with this project's changeover costs
//! can follow, and a lower bound for every policy replayed (each pays at least this for every
//! launch and move, plus checkpoints and lost work). [`super::sim::lower_bound`] drops the
//! changeover costs too.

use super::sim::{Model, Outcome, World};

/// The most bytes of recorded choices (a byte per state).
const MAX_TABLE: usize = 192 << 20;
/// Recorded choices: how a state was reached. A place's index is a run there (the same
/// place) or a move from there (another place).
const LAUNCH: u8 = 254;
const WAITED: u8 = 253;
const UNSET: u8 = 255;

/// One step of the cheapest plan, in time order.
#[derive(Clone, Copy, Debug)]
enum Event {
    Run {
        at: usize,
        place: usize,
    },
    Launch {
        at: usize,
        place: usize,
        steps: usize,
    },
    Move {
        at: usize,
        to: usize,
    },
}

/// The optimum on `w` for `model`.
pub fn optimum(w: &World, model: &Model) -> Outcome {
    let gap = w.set.gap;
    let remaining = w.set.ticks().saturating_sub(w.start_tick) as f64 * gap;
    let horizon = model.deadline_secs.map_or(remaining, |d| d.min(remaining));
    let zones = w.set.zones.len();
    let places = zones + 1; // the zones, then on-demand
    let mut step = gap / (gap / 60.0).ceil();
    let units = |s: f64| (model.work_secs / s).ceil() as usize;
    while ((horizon / step) as usize + 1) * (units(step) + 1) * (places + 1) > MAX_TABLE {
        step *= 2.0;
    }
    let steps = (horizon / step).floor() as usize;
    let work = units(step);

    // Per place and step: whether it can run there for the whole step, and the price of the
    // step; `cum` sums prices, `runs` counts the steps with capacity from each on.
    let mut price = vec![vec![0.0; steps + 1]; places];
    let mut up = vec![vec![true; steps + 1]; places];
    for k in 0..=steps {
        let (t0, t1) = (k as f64 * step, (k + 1) as f64 * step);
        for z in 0..zones {
            price[z][k] = w.spot_price(z, t0) * step / 3600.0;
            let mut t = t0;
            while t < t1 {
                if !w.available(z, t) {
                    up[z][k] = false;
                    break;
                }
                t += gap;
            }
        }
        price[zones][k] = w.cheapest_on_demand(t0) * step / 3600.0;
    }
    let mut cum = vec![vec![0.0; steps + 2]; places];
    let mut runs = vec![vec![0usize; steps + 2]; places];
    for l in 0..places {
        for k in 0..=steps {
            cum[l][k + 1] = cum[l][k] + price[l][k];
        }
        for k in (0..=steps).rev() {
            runs[l][k] = if up[l][k] { runs[l][k + 1] + 1 } else { 0 };
        }
    }
    let floor = |secs: f64| (secs / step + 1e-9).floor() as usize;
    let start = floor(model.start_secs);
    let restore = floor(model.memory_gib * model.restore_secs_per_gib);
    let downtime =
        floor(model.memory_gib * (model.frozen_secs_per_gib + model.restore_secs_per_gib)).max(1);
    let launch_steps = |done: usize| (start + if done > 0 { restore } else { 0 }).max(1);

    // Costs in a ring of layers (a transition reaches at most `depth` steps ahead); choices
    // for every state, running (`places` per amount of work) then idle (one).
    let depth = launch_steps(1).max(downtime) + 1;
    let width = (work + 1) * places;
    let mut cost = vec![f64::INFINITY; depth * width];
    let mut idle = vec![f64::INFINITY; depth * (work + 1)];
    let stride = (work + 1) * (places + 1);
    let mut choice = vec![UNSET; (steps + 1) * stride];
    let at = |t: usize, p: usize, l: usize| t * stride + p * (places + 1) + l;
    let idle_at = |t: usize, p: usize| t * stride + p * (places + 1) + places;
    idle[0] = 0.0;
    let mut done: Option<(f64, usize, usize)> = None; // cost, step, place
    for t in 0..=steps {
        let (row, irow) = ((t % depth) * width, (t % depth) * (work + 1));
        // Finished: the cheapest state with all the work done (the earliest of equal ones,
        // up to rounding).
        for l in 0..places {
            let c = cost[row + work * places + l];
            if c < done.map_or(f64::INFINITY, |d| d.0 - 1e-9) {
                done = Some((c, t, l));
            }
        }
        // Stopping keeps the work.
        for p in 0..=work {
            for l in 0..places {
                let c = cost[row + p * places + l];
                if c < idle[irow + p] {
                    idle[irow + p] = c;
                    choice[idle_at(t, p)] = l as u8;
                }
            }
        }
        if t == steps {
            break;
        }
        let next = ((t + 1) % depth) * width;
        let inext = ((t + 1) % depth) * (work + 1);
        for p in 0..work {
            // Run a step.
            for l in (0..places).filter(|l| up[*l][t]) {
                let c = cost[row + p * places + l] + price[l][t];
                if c < cost[next + (p + 1) * places + l] {
                    cost[next + (p + 1) * places + l] = c;
                    choice[at(t + 1, p + 1, l)] = l as u8;
                }
            }
            // Wait with no instance.
            if idle[irow + p] < idle[inext + p] {
                idle[inext + p] = idle[irow + p];
                choice[idle_at(t + 1, p)] = WAITED;
            }
            // Launch from no instance.
            let a = launch_steps(p);
            if idle[irow + p].is_finite() && t + a <= steps {
                let to = ((t + a) % depth) * width;
                for l in (0..places).filter(|l| runs[*l][t] >= a) {
                    let c = idle[irow + p] + cum[l][t + a] - cum[l][t];
                    if c < cost[to + p * places + l] {
                        cost[to + p * places + l] = c;
                        choice[at(t + a, p, l)] = LAUNCH;
                    }
                }
            }
            // Move a running task elsewhere: from the cheapest place other than the target.
            if p == 0 || t + downtime > steps {
                continue;
            }
            let (mut best, mut second) = ((f64::INFINITY, 0), (f64::INFINITY, 0));
            for l in 0..places {
                let c = cost[row + p * places + l];
                if c < best.0 {
                    second = best;
                    best = (c, l);
                } else if c < second.0 {
                    second = (c, l);
                }
            }
            if !best.0.is_finite() {
                continue;
            }
            let to = ((t + downtime) % depth) * width;
            for l in (0..places).filter(|l| runs[*l][t] >= downtime) {
                let (from_cost, from) = if best.1 == l { second } else { best };
                let c = from_cost + start as f64 * price[l][t] + cum[l][t + downtime] - cum[l][t];
                if c < cost[to + p * places + l] {
                    cost[to + p * places + l] = c;
                    choice[at(t + downtime, p, l)] = from as u8;
                }
            }
        }
        // This layer is reused `depth` steps on.
        cost[row..row + width].fill(f64::INFINITY);
        idle[irow..irow + work + 1].fill(f64::INFINITY);
    }

    // Walk the choices back from the end: the cheapest finish, or else the most work done by
    // the horizon (stopped there).
    let mut events = Vec::new();
    let (mut t, mut p, mut place) = match done {
        Some((_, t, l)) => (t, work, Some(l)),
        None => {
            let p = (0..=work)
                .rev()
                .find(|p| choice[idle_at(steps, *p)] != UNSET || *p == 0)
                .unwrap_or(0);
            (steps, p, None)
        }
    };
    loop {
        match place {
            Some(l) => match choice[at(t, p, l)] {
                c if c as usize == l => {
                    events.push(Event::Run {
                        at: t - 1,
                        place: l,
                    });
                    t -= 1;
                    p -= 1;
                }
                LAUNCH => {
                    let a = launch_steps(p);
                    t -= a;
                    events.push(Event::Launch {
                        at: t,
                        place: l,
                        steps: a,
                    });
                    place = None;
                }
                c if (c as usize) < places => {
                    t -= downtime;
                    events.push(Event::Move { at: t, to: l });
                    place = Some(c as usize);
                }
                _ => break,
            },
            None => match choice[idle_at(t, p)] {
                WAITED => t -= 1,
                c if (c as usize) < places => place = Some(c as usize),
                _ => break,
            },
        }
    }
    events.reverse();

    // The plan's books.
    let secs = |n: usize| n as f64 * step;
    let mut o = Outcome {
        policy: "optimum".into(),
        cost: 0.0,
        finished_hours: None,
        met_deadline: None,
        redone_hours: 0.0,
        moves: 0,
        recoveries: 0,
        checkpoints: 0,
        spot_hours: 0.0,
        on_demand_hours: 0.0,
        timeline: vec![(0.0, 0.0, 0.0)],
    };
    let bill = |o: &mut Outcome, l: usize, n: usize, dollars: f64| {
        o.cost += dollars;
        match l < zones {
            true => o.spot_hours += secs(n) / 3600.0,
            false => o.on_demand_hours += secs(n) / 3600.0,
        }
    };
    let (mut work_done, mut next_sample) = (0usize, 300.0);
    for e in events {
        let end = match e {
            Event::Run { at, place } => {
                bill(&mut o, place, 1, price[place][at]);
                work_done += 1;
                at + 1
            }
            Event::Launch { at, place, steps } => {
                bill(
                    &mut o,
                    place,
                    steps,
                    cum[place][at + steps] - cum[place][at],
                );
                if work_done > 0 {
                    o.moves += 1;
                }
                at + steps
            }
            Event::Move { at, to } => {
                let dollars = start as f64 * price[to][at] + cum[to][at + downtime] - cum[to][at];
                bill(&mut o, to, start + downtime, dollars);
                o.moves += 1;
                o.checkpoints += 1;
                at + downtime
            }
        };
        if secs(end) >= next_sample {
            let progress = secs(work_done).min(model.work_secs);
            o.timeline
                .push((secs(end) / 3600.0, o.cost, progress / 3600.0));
            next_sample = secs(end) + 300.0;
        }
    }
    let progress = secs(work_done).min(model.work_secs);
    o.finished_hours = done.map(|(_, t, _)| secs(t) / 3600.0);
    let end = o.finished_hours.unwrap_or(horizon / 3600.0);
    o.timeline.push((end, o.cost, progress / 3600.0));
    o.met_deadline = model
        .deadline_secs
        .map(|d| done.is_some_and(|(_, t, _)| secs(t) <= d + 1e-6));
    o
}
