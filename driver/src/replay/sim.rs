//! One job on one trace set, under one policy, on a simulated clock.
//!
//! The world: each zone of the set offers a spot market (available while its trace says a
//! spot instance can run; an instance there is preempted when the trace drops to 0, and,
//! when the cloud gives notice, told so [`Model::notice_secs`] before) and each region an
//! on-demand market that is always available. Time moves in steps of [`Model::step_secs`];
//! every instance is billed per second from its launch to its end, starting included.
//!
//! The driver's policies are [`crate::job::policy::Policy`] itself, called where the managed
//! flow ([`crate::job::managed`]) calls it: offers ranked for every launch, a spot market
//! avoided and counted after a notice or a loss, the checkpoint interval after each
//! checkpoint, arbitrage every [`Model::arbitrage_every_secs`]. What the flow does around the
//! decisions (a notice's checkpoint and move, a recovery onto the worker a move had started,
//! the old worker billed until the task is restored elsewhere) is modelled here with the
//! times of [`Model`].

use std::time::Duration;

use serde::Serialize;

use super::trace::{PriceSeries, TraceSet};
use crate::job::policy::{Arbitrage, Overheads, Policy, PolicyOptions};
use crate::providers::{same_offer, Offer};

/// The job and what the machinery costs in time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Model {
    /// Seconds of work the job needs.
    pub work_secs: f64,
    /// The task's memory (what a checkpoint holds).
    pub memory_gib: f64,
    /// The job must finish this many seconds after it starts (`None`: no deadline).
    pub deadline_secs: Option<f64>,
    /// From a launch until the job's setup is done on the new instance (every policy pays it).
    pub start_secs: f64,
    /// How long before a preemption the cloud says so (0: no notice).
    pub notice_secs: f64,
    /// The time a checkpoint stops the task, per GiB (CRIU's dump).
    pub frozen_secs_per_gib: f64,
    /// The time to put a GiB of changed memory into the store (the task runs meanwhile).
    pub upload_secs_per_gib: f64,
    /// The time to fetch and restore a GiB of checkpoint on a new instance.
    pub restore_secs_per_gib: f64,
    /// The share of the task's memory it rewrites per hour (what an incremental checkpoint
    /// sends).
    pub dirty_per_hour: f64,
    /// The driver's periodic checkpoint interval.
    pub interval_secs: f64,
    /// The driver prices the job again this often...
    pub arbitrage_every_secs: f64,
    /// ...and moves when an offer is cheaper by more than this fraction.
    pub arbitrage_margin: f64,
    /// The application-level checkpoint baseline's period.
    pub app_checkpoint_secs: f64,
    /// The driver waits this long for spot capacity before on-demand (with a deadline: as
    /// long as the deadline allows).
    pub wait_for_spot_secs: f64,
    /// The simulation's step.
    pub step_secs: f64,
}

impl Model {
    fn frozen(&self) -> f64 {
        self.memory_gib * self.frozen_secs_per_gib
    }

    fn restore(&self) -> f64 {
        self.memory_gib * self.restore_secs_per_gib
    }

    /// The time until a checkpoint taken `since` seconds after the previous one is stored.
    fn checkpoint(&self, since: f64) -> f64 {
        // The first checkpoint holds everything.
        let dirty = if since.is_finite() {
            (self.dirty_per_hour * since / 3600.0).clamp(0.0, 1.0)
        } else {
            1.0
        };
        self.frozen() + dirty * self.memory_gib * self.upload_secs_per_gib
    }

    /// What the policy is told a move and a checkpoint cost.
    pub fn overheads(&self) -> Overheads {
        Overheads {
            per_move: Duration::from_secs_f64(self.start_secs + self.restore()),
            per_checkpoint: Duration::from_secs_f64(self.frozen()),
        }
    }
}

/// How one policy did on one replay.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Outcome {
    pub policy: String,
    /// Dollars.
    pub cost: f64,
    /// Hours from the start until the work was done (`None`: not done within the trace).
    pub finished_hours: Option<f64>,
    /// Whether it finished by the deadline (`None`: no deadline).
    pub met_deadline: Option<bool>,
    /// Hours of work done twice (lost to preemptions and done again).
    pub redone_hours: f64,
    /// Moves of a running task to another instance (arbitrage, spot notices, the deadline).
    pub moves: u32,
    /// Restarts after an instance was lost.
    pub recoveries: u32,
    pub checkpoints: u32,
    /// Instance-hours billed on spot and on-demand.
    pub spot_hours: f64,
    pub on_demand_hours: f64,
    /// (hours, dollars, hours of work done) every simulated five minutes.
    #[serde(skip)]
    pub timeline: Vec<(f64, f64, f64)>,
}

/// The trace set from a start tick, as the simulation sees it.
pub struct World<'a> {
    pub set: &'a TraceSet,
    pub start_tick: usize,
    /// Prices over time from a file, over the traces' own.
    pub prices: &'a PriceSeries,
}

/// A launched instance: its offer and, for spot, its zone's index.
#[derive(Clone, Debug)]
struct Machine {
    offer: Offer,
    zone: Option<usize>,
}

impl World<'_> {
    fn tick(&self, t: f64) -> usize {
        self.start_tick + (t.max(0.0) / self.set.gap) as usize
    }

    /// Whether the trace has run out at `t`.
    pub fn ended(&self, t: f64) -> bool {
        self.tick(t) >= self.set.ticks()
    }

    pub fn available(&self, zone: usize, t: f64) -> bool {
        let k = self.tick(t);
        self.set.zones[zone]
            .available
            .get(k)
            .is_some_and(|n| *n >= 1)
    }

    /// Seconds since the traces' first tick.
    fn abs(&self, t: f64) -> f64 {
        self.start_tick as f64 * self.set.gap + t
    }

    pub fn spot_price(&self, zone: usize, t: f64) -> f64 {
        let z = &self.set.zones[zone];
        if let Some(p) = self.prices.at(&z.name, true, self.abs(t)) {
            return p;
        }
        let k = self.tick(t).min(self.set.ticks().saturating_sub(1));
        match &z.prices {
            Some(p) => p[k],
            None => self.set.spot,
        }
    }

    pub fn on_demand_price(&self, region: &str, t: f64) -> f64 {
        self.prices
            .at(region, false, self.abs(t))
            .unwrap_or(self.set.on_demand)
    }

    /// The cheapest on-demand price of the set's regions at `t`.
    pub(super) fn cheapest_on_demand(&self, t: f64) -> f64 {
        self.set
            .zones
            .iter()
            .map(|z| self.on_demand_price(&z.region, t))
            .fold(f64::INFINITY, f64::min)
    }

    /// Every offer at `t`, cheapest first (on-demand before spot at the same price, then by
    /// place), as the providers list them: capacity is not in a price list.
    fn offers(&self, t: f64) -> Vec<Offer> {
        let mut out = Vec::new();
        let mut regions: Vec<&str> = Vec::new();
        for (i, z) in self.set.zones.iter().enumerate() {
            out.push(self.offer(&z.region, &z.name, self.spot_price(i, t), true));
            if !regions.contains(&z.region.as_str()) {
                regions.push(&z.region);
            }
        }
        for r in regions {
            out.push(self.offer(r, r, self.on_demand_price(r, t), false));
        }
        out.sort_by(|a, b| {
            a.price_usd_hour
                .total_cmp(&b.price_usd_hour)
                .then(a.spot.cmp(&b.spot))
                .then(a.zone.cmp(&b.zone))
        });
        out
    }

    fn offer(&self, region: &str, zone: &str, price: f64, spot: bool) -> Offer {
        Offer {
            provider: self.set.cloud.clone(),
            instance_type: self.set.instance_type.clone(),
            vcpus: 0.0,
            memory_gb: 0.0,
            gpu: None,
            gpu_count: 0,
            vram_gb: 0.0,
            region: region.to_string(),
            zone: spot.then(|| zone.to_string()),
            price_usd_hour: price,
            spot,
            price_source: "trace".into(),
            priced_at: None,
        }
    }

    fn machine(&self, offer: &Offer) -> Machine {
        let zone = offer
            .zone
            .as_ref()
            .and_then(|z| self.set.zones.iter().position(|x| &x.name == z));
        Machine {
            offer: offer.clone(),
            zone,
        }
    }

    fn up(&self, m: &Machine, t: f64) -> bool {
        m.zone.is_none_or(|z| self.available(z, t))
    }

    fn price(&self, m: &Machine, t: f64) -> f64 {
        match m.zone {
            Some(z) => self.spot_price(z, t),
            None => self.on_demand_price(&m.offer.region, t),
        }
    }

    /// Whether the spot instance `m` is preempted within `notice` seconds of `t`.
    fn goes_within(&self, m: &Machine, t: f64, notice: f64) -> bool {
        m.zone.is_some_and(|z| {
            self.available(z, t) && !self.available(z, t + notice) && !self.ended(t + notice)
        })
    }
}

/// Billing and bookkeeping shared by every policy.
struct Books {
    t: f64,
    cost: f64,
    progress: f64,
    redone: f64,
    moves: u32,
    recoveries: u32,
    checkpoints: u32,
    spot_hours: f64,
    od_hours: f64,
    finished: Option<f64>,
    timeline: Vec<(f64, f64, f64)>,
    next_sample: f64,
}

impl Books {
    fn new() -> Self {
        Books {
            t: 0.0,
            cost: 0.0,
            progress: 0.0,
            redone: 0.0,
            moves: 0,
            recoveries: 0,
            checkpoints: 0,
            spot_hours: 0.0,
            od_hours: 0.0,
            finished: None,
            timeline: vec![(0.0, 0.0, 0.0)],
            next_sample: 300.0,
        }
    }

    fn bill(&mut self, w: &World, m: &Machine, dt: f64) {
        self.cost += w.price(m, self.t) * dt / 3600.0;
        if m.offer.spot {
            self.spot_hours += dt / 3600.0;
        } else {
            self.od_hours += dt / 3600.0;
        }
    }

    /// Work for the last `dt` seconds of this step; true once the job is done.
    fn work(&mut self, model: &Model, step: f64, dt: f64) -> bool {
        let left = model.work_secs - self.progress;
        if dt >= left {
            self.progress = model.work_secs;
            self.finished = Some(self.t + (step - dt) + left);
            return true;
        }
        self.progress += dt;
        false
    }

    /// Progress back to `kept` (lost work counted as redone).
    fn lose(&mut self, kept: f64) {
        self.redone += (self.progress - kept).max(0.0);
        self.progress = kept.min(self.progress);
    }

    fn step(&mut self, dt: f64) {
        self.t += dt;
        if self.t >= self.next_sample {
            self.timeline
                .push((self.t / 3600.0, self.cost, self.progress / 3600.0));
            self.next_sample += 300.0;
        }
    }

    fn outcome(mut self, policy: &str, model: &Model) -> Outcome {
        let end = self.finished.unwrap_or(self.t);
        self.timeline
            .push((end / 3600.0, self.cost, self.progress / 3600.0));
        Outcome {
            policy: policy.to_string(),
            cost: self.cost,
            finished_hours: self.finished.map(|f| f / 3600.0),
            met_deadline: model
                .deadline_secs
                .map(|d| self.finished.is_some_and(|f| f <= d + 1e-6)),
            redone_hours: self.redone / 3600.0,
            moves: self.moves,
            recoveries: self.recoveries,
            checkpoints: self.checkpoints,
            spot_hours: self.spot_hours,
            on_demand_hours: self.od_hours,
            timeline: self.timeline,
        }
    }
}

/// The driver's policy: [`Policy`] with `adaptive` as given, periodic checkpoints, spot
/// notices, recovery, arbitrage, and (with a deadline) on-demand once only it can finish.
/// Which of the driver's decisions a replay uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    /// Preemption-aware: Young's interval, offers weighed by their preemptions.
    pub adaptive: bool,
    /// Waits for spot capacity (without a deadline [`Model::wait_for_spot_secs`], with one
    /// while on schedule).
    pub wait: bool,
}

impl Variant {
    /// The driver before the replay: the fixed interval, the cheapest offer first,
    /// on-demand at once when spot is full.
    pub const BEFORE: Variant = Variant {
        adaptive: false,
        wait: false,
    };
    /// The driver now.
    pub const NOW: Variant = Variant {
        adaptive: true,
        wait: true,
    };
}

pub fn driver(w: &World, model: &Model, variant: Variant, name: &str) -> Outcome {
    let Variant { adaptive, wait } = variant;
    let wait = wait.then(|| match model.deadline_secs {
        Some(_) => Duration::MAX,
        None => Duration::from_secs_f64(model.wait_for_spot_secs),
    });
    let mut policy = Policy::new(PolicyOptions {
        interval: Some(Duration::from_secs_f64(model.interval_secs)),
        arbitrage: Some(Arbitrage {
            every: Duration::from_secs_f64(model.arbitrage_every_secs),
            margin: model.arbitrage_margin,
        }),
        adaptive,
        wait_for_spot: wait,
        overheads: model.overheads(),
    });
    let mut waiting_since: Option<f64> = None;
    let dt = model.step_secs;
    let mut b = Books::new();
    // The newest stored checkpoint's progress, and one being stored: (stored at, progress).
    let mut saved: Option<f64> = None;
    let mut pending: Option<(f64, f64)> = None;
    let mut last_checkpoint = f64::NEG_INFINITY;
    let mut cur: Option<Machine> = None;
    // The task runs from `ready` on, except while a checkpoint has it frozen.
    let mut ready = 0.0;
    let mut booted = 0.0;
    let mut frozen_until = 0.0;
    // A move under way: the new instance and when it is up and set up.
    let mut moving: Option<(Machine, f64)> = None;
    // Old instances billed until the task was restored elsewhere.
    let mut draining: Vec<(Machine, f64)> = Vec::new();
    let mut noticed = false;
    let mut committed = false;
    let mut next_checkpoint = f64::INFINITY;
    let mut next_pricing = model.arbitrage_every_secs;

    // The first offer (of `among`, when given) with capacity now, in the policy's order, as
    // `Job::launch_once` walks it: past a full spot market; on-demand only once the policy
    // stops waiting for spot (`None` meanwhile).
    let launch = |policy: &mut Policy,
                  waiting_since: &mut Option<f64>,
                  ahead: bool,
                  t: f64,
                  among: Option<&[Offer]>,
                  od_only: bool| {
        let now = Duration::from_secs_f64(t);
        let ranked = policy.rank(now, w.offers(t));
        let mut spot_full = false;
        for o in ranked
            .iter()
            .filter(|o| among.is_none_or(|a| a.iter().any(|x| same_offer(x, o))))
            .filter(|o| !od_only || !o.spot)
        {
            if spot_full && !o.spot {
                let since = *waiting_since.get_or_insert(t);
                if ahead && policy.wait_for_spot(now, Duration::from_secs_f64(since)) {
                    return None;
                }
            }
            let m = w.machine(o);
            if w.up(&m, t) {
                *waiting_since = None;
                return Some(m);
            }
            spot_full |= o.spot;
        }
        None
    };

    while !w.ended(b.t) {
        let t = b.t;
        let now = Duration::from_secs_f64(t);
        if let Some((at, p)) = pending {
            if t >= at {
                saved = Some(p);
                pending = None;
            }
        }
        let left = Duration::from_secs_f64(model.work_secs - b.progress);
        let ahead = model.deadline_secs.is_none_or(|d| {
            policy.ahead_of_schedule(
                now,
                left,
                Duration::from_secs_f64(model.work_secs),
                Duration::from_secs_f64(d),
            )
        });
        if let Some(d) = model.deadline_secs {
            if !committed && policy.must_use_on_demand(now, left, Duration::from_secs_f64(d)) {
                committed = true;
                if cur.as_ref().is_some_and(|m| m.offer.spot) {
                    moving = launch(&mut policy, &mut waiting_since, ahead, t, None, true)
                        .map(|m| (m, t + model.start_secs));
                }
            }
        }
        // The instance gone: recovery from the newest stored checkpoint, onto the instance a
        // move had started if there is one.
        if let Some(m) = cur.clone().filter(|m| !w.up(m, t)) {
            if t < booted {
                // It never came up: passed over for ten minutes, the next offer tried.
                policy.avoid(&m.offer, now, Duration::from_secs(600));
            } else {
                policy.preempted(&m.offer, now);
                b.recoveries += 1;
            }
            b.lose(saved.unwrap_or(0.0));
            pending = None;
            noticed = false;
            cur = None;
            if let Some((n, up)) = moving.take().filter(|(n, _)| w.up(n, t)) {
                booted = up;
                ready = up.max(t)
                    + if saved.is_some() {
                        model.restore()
                    } else {
                        0.0
                    };
                cur = Some(n);
            }
        }
        if cur.is_none() {
            if let Some(m) = launch(&mut policy, &mut waiting_since, ahead, t, None, committed) {
                booted = t + model.start_secs;
                ready = booted
                    + if saved.is_some() {
                        model.restore()
                    } else {
                        0.0
                    };
                cur = Some(m);
                next_checkpoint = ready + model.interval_secs;
            }
        }
        let Some(m) = cur.clone() else {
            b.step(dt);
            continue;
        };
        let running = t >= ready;
        // A spot notice: a checkpoint (the task keeps running), the market avoided and
        // counted, and a move started.
        if running && !noticed && model.notice_secs > 0.0 && w.goes_within(&m, t, model.notice_secs)
        {
            noticed = true;
            pending = Some((t + model.checkpoint(t - last_checkpoint), b.progress));
            frozen_until = t + model.frozen();
            last_checkpoint = t;
            b.checkpoints += 1;
            policy.preempted(&m.offer, now);
            if moving.is_none() {
                moving = launch(&mut policy, &mut waiting_since, ahead, t, None, committed)
                    .map(|n| (n, t + model.start_secs));
            }
        }
        // A move's new instance: lost while starting (another offer), or up: the task is
        // stopped, checkpointed and restored there.
        if let Some((n, up)) = moving.clone() {
            if !w.up(&n, t) {
                policy.avoid(&n.offer, now, Duration::from_secs(600));
                moving = launch(&mut policy, &mut waiting_since, ahead, t, None, committed)
                    .map(|n| (n, t + model.start_secs));
            } else if t >= up && running {
                let stop = model.checkpoint(t - last_checkpoint);
                pending = Some((t + stop, b.progress));
                last_checkpoint = t;
                b.checkpoints += 1;
                b.moves += 1;
                booted = up;
                ready = t + stop + model.restore();
                draining.push((m.clone(), ready));
                next_checkpoint = ready + interval(&policy, t, &n);
                cur = Some(n);
                moving = None;
                noticed = false;
            }
        }
        if t >= next_pricing {
            next_pricing = t + model.arbitrage_every_secs;
            if moving.is_none() && running && !committed {
                let ranked = policy.rank(now, w.offers(t));
                let current = ranked
                    .iter()
                    .find(|o| same_offer(o, &m.offer))
                    .cloned()
                    .unwrap_or_else(|| m.offer.clone());
                let among = policy.moves(now, &current, &ranked);
                if !among.is_empty() {
                    moving = launch(
                        &mut policy,
                        &mut waiting_since,
                        ahead,
                        t,
                        Some(&among),
                        false,
                    )
                    .map(|n| (n, t + model.start_secs));
                }
            }
        }
        if running && moving.is_none() && t >= next_checkpoint && pending.is_none() {
            pending = Some((t + model.checkpoint(t - last_checkpoint), b.progress));
            frozen_until = t + model.frozen();
            last_checkpoint = t;
            b.checkpoints += 1;
            next_checkpoint = t + interval(&policy, t, &m);
        }
        // Bill, then work.
        if let Some(m) = &cur {
            b.bill(w, m, dt);
        }
        if let Some((n, _)) = &moving {
            b.bill(w, n, dt);
        }
        draining.retain(|(old, until)| *until > t && w.up(old, t));
        for (old, _) in &draining {
            b.bill(w, old, dt);
        }
        let work = if cur.is_some() {
            (b.t + dt - ready.max(frozen_until).max(b.t)).clamp(0.0, dt)
        } else {
            0.0
        };
        if work > 0.0 && b.work(model, dt, work) {
            break;
        }
        b.step(dt);
    }
    b.outcome(name, model)
}

/// The policy's checkpoint interval on `m` at `t`, in seconds.
fn interval(policy: &Policy, t: f64, m: &Machine) -> f64 {
    policy
        .checkpoint_interval(Duration::from_secs_f64(t), Some(&m.offer))
        .map_or(f64::INFINITY, |i| i.as_secs_f64())
}

/// On-demand only: the cheapest on-demand offer, never moved.
pub fn on_demand(w: &World, model: &Model) -> Outcome {
    let mut b = Books::new();
    let offer = w
        .offers(0.0)
        .into_iter()
        .find(|o| !o.spot)
        .expect("every set has an on-demand offer");
    let m = w.machine(&offer);
    let dt = model.step_secs;
    while !w.ended(b.t) {
        b.bill(w, &m, dt);
        let work = (b.t + dt - model.start_secs).clamp(0.0, dt);
        if work > 0.0 && b.work(model, dt, work) {
            break;
        }
        b.step(dt);
    }
    b.outcome("on-demand", model)
}

/// Spot as SkyPilot's managed jobs run it: the cheapest spot zone with capacity, relaunched
/// elsewhere after a preemption (no notice used), the work resumed from the application's
/// last checkpoint (`app_checkpoint`: one every [`Model::app_checkpoint_secs`] of work,
/// written while the task waits, and loaded at each restart) or from scratch. No spot
/// anywhere: wait. With a deadline, on-demand from the moment only it can still finish
/// (the paper's greedy policy).
pub fn spot_restart(w: &World, model: &Model, app_checkpoint: bool, name: &str) -> Outcome {
    let dt = model.step_secs;
    let mut b = Books::new();
    let mut cur: Option<Machine> = None;
    let mut kept = 0.0;
    let mut ready = 0.0;
    let mut writing_until = 0.0;
    let mut committed = false;
    let write = model.memory_gib * model.upload_secs_per_gib;
    let load = |kept: f64| if kept > 0.0 { model.restore() } else { 0.0 };
    while !w.ended(b.t) {
        let t = b.t;
        if let Some(m) = cur.clone().filter(|m| !w.up(m, t)) {
            let _ = m;
            b.lose(kept);
            b.recoveries += 1;
            cur = None;
        }
        if let Some(d) = model.deadline_secs {
            let margin = 2.0 * (model.start_secs + model.restore()) + 3600.0;
            if !committed && t + (model.work_secs - kept) + margin >= d {
                committed = true;
                if cur.as_ref().is_some_and(|m| m.offer.spot) {
                    b.lose(kept);
                    b.moves += 1;
                    cur = None;
                }
            }
        }
        if cur.is_none() {
            let m = w
                .offers(t)
                .iter()
                .filter(|o| o.spot != committed)
                .map(|o| w.machine(o))
                .find(|m| w.up(m, t));
            if let Some(m) = m {
                ready = t + model.start_secs + load(kept);
                cur = Some(m);
            }
        }
        if let Some(m) = &cur {
            b.bill(w, m, dt);
            if app_checkpoint
                && t >= ready
                && t >= writing_until
                && b.progress - kept >= model.app_checkpoint_secs
            {
                writing_until = t + write;
                kept = b.progress;
                b.checkpoints += 1;
            }
            let work = (b.t + dt - ready.max(writing_until).max(b.t)).clamp(0.0, dt);
            if work > 0.0 && b.work(model, dt, work) {
                break;
            }
        }
        b.step(dt);
    }
    b.outcome(name, model)
}

/// A lower bound below the optimum ([`super::optimum`]): knowing the whole trace, the work
/// done in the cheapest ticks before the deadline (or the trace's end), each at the cheapest
/// price then (spot in a zone with capacity, or on-demand), with no start, checkpoint or
/// restore at all. No policy can pay less.
pub fn lower_bound(w: &World, model: &Model) -> Outcome {
    let gap = w.set.gap;
    let end = w.set.ticks().saturating_sub(w.start_tick);
    let end = match model.deadline_secs {
        Some(d) => end.min((d / gap).floor() as usize),
        None => end,
    };
    let mut ticks: Vec<(f64, bool, usize)> = (0..end)
        .map(|k| {
            let t = k as f64 * gap;
            let spot = (0..w.set.zones.len())
                .filter(|z| w.available(*z, t))
                .map(|z| w.spot_price(z, t))
                .min_by(f64::total_cmp);
            let od = w.cheapest_on_demand(t);
            match spot {
                Some(p) if p < od => (p, true, k),
                _ => (od, false, k),
            }
        })
        .collect();
    ticks.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.2.cmp(&b.2)));
    let mut left = model.work_secs;
    let mut b = Books::new();
    let mut last = 0usize;
    let mut chosen = Vec::new();
    for (price, spot, k) in ticks {
        if left <= 0.0 {
            break;
        }
        let secs = gap.min(left);
        left -= secs;
        b.cost += price * secs / 3600.0;
        if spot {
            b.spot_hours += secs / 3600.0;
        } else {
            b.od_hours += secs / 3600.0;
        }
        last = last.max(k);
        chosen.push((k, secs, price));
    }
    // The timeline in time order.
    chosen.sort_by_key(|c| c.0);
    let (mut cost, mut done) = (0.0, 0.0);
    for (k, secs, price) in &chosen {
        cost += price * secs / 3600.0;
        done += secs;
        b.timeline
            .push(((*k as f64 * gap + secs) / 3600.0, cost, done / 3600.0));
    }
    if left <= 0.0 {
        let tail = chosen.last().map_or(0.0, |c| c.1);
        b.finished = Some(last as f64 * gap + tail);
        b.progress = model.work_secs;
    } else {
        b.progress = model.work_secs - left;
        b.t = end as f64 * gap;
    }
    b.outcome("lower-bound", model)
}

#[cfg(test)]
mod tests {
    //! Each policy's bookkeeping against cases computed by hand. The clock moves in 10 s
    //! steps and instances are billed per step, so an instance is billed up to the end of the
    //! step in which it ends.
    use super::*;
    use crate::replay::optimum::optimum;
    use crate::replay::trace::Zone;

    /// One spot zone ($1/h; on-demand $3/h) whose trace (ticks of 100 s) is `available`.
    fn set(available: Vec<u32>) -> TraceSet {
        TraceSet {
            name: "test/v100_1".into(),
            cloud: "aws".into(),
            device: "v100_1".into(),
            instance_type: "p3.2xlarge".into(),
            on_demand: 3.0,
            spot: 1.0,
            gap: 100.0,
            zones: vec![Zone {
                name: "us-east-1a".into(),
                region: "us-east-1".into(),
                available,
                prices: None,
            }],
        }
    }

    /// An hour of work, 1 GiB; a start takes 100 s, a restore 10 s, a checkpoint stops the
    /// task for 1 s (and stores the first in 5 s more; nothing is rewritten after), notice
    /// 120 s, a checkpoint every 600 s, application checkpoints every 1000 s of work.
    fn model() -> Model {
        Model {
            work_secs: 3600.0,
            memory_gib: 1.0,
            deadline_secs: None,
            start_secs: 100.0,
            notice_secs: 120.0,
            frozen_secs_per_gib: 1.0,
            upload_secs_per_gib: 5.0,
            restore_secs_per_gib: 10.0,
            dirty_per_hour: 0.0,
            interval_secs: 600.0,
            arbitrage_every_secs: 600.0,
            arbitrage_margin: 0.2,
            app_checkpoint_secs: 1000.0,
            wait_for_spot_secs: 1800.0,
            step_secs: 10.0,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    fn check(o: &Outcome, cost_secs_at: &[(f64, f64)], finished: f64) {
        let cost: f64 = cost_secs_at.iter().map(|(s, p)| s * p / 3600.0).sum();
        assert!(
            close(o.cost, cost),
            "{}: cost {} != {cost}",
            o.policy,
            o.cost
        );
        let f = o.finished_hours.expect("finished") * 3600.0;
        assert!(
            close(f, finished),
            "{}: finished at {f} s, not {finished}",
            o.policy
        );
    }

    #[test]
    fn spot_always_there() {
        let s = set(vec![1; 100]);
        let prices = PriceSeries::default();
        let w = World {
            set: &s,
            start_tick: 0,
            prices: &prices,
        };
        let m = model();
        // Start 100 s, then the hour.
        let od = on_demand(&w, &m);
        check(&od, &[(3700.0, 3.0)], 3700.0);
        let restart = spot_restart(&w, &m, false, "spot-restart");
        check(&restart, &[(3700.0, 1.0)], 3700.0);
        assert_eq!((restart.recoveries, restart.redone_hours), (0, 0.0));
        // Application checkpoints at 1000, 2000 and 3000 s of work, 5 s each (the third
        // seen at the step after: 3005 s of work).
        let app = spot_restart(&w, &m, true, "spot-app-checkpoint");
        check(&app, &[(3720.0, 1.0)], 3715.0);
        assert_eq!(app.checkpoints, 3);
        // The driver: checkpoints at 700, 1300, ..., 3700 s (six, each stopping the task
        // 1 s): done at 3706 s, billed to 3710 s.
        for adaptive in [false, true] {
            let d = driver(
                &w,
                &m,
                if adaptive {
                    Variant::NOW
                } else {
                    Variant::BEFORE
                },
                "driver",
            );
            check(&d, &[(3710.0, 1.0)], 3706.0);
            assert_eq!((d.checkpoints, d.moves, d.recoveries), (6, 0, 0));
        }
        // The optimum: 36 ticks of spot.
        let opt = lower_bound(&w, &m);
        check(&opt, &[(3600.0, 1.0)], 3600.0);
        // The optimum pays its start: 100 s, then the hour.
        let opt = optimum(&w, &m);
        check(&opt, &[(3700.0, 1.0)], 3700.0);
        assert_eq!((opt.moves, opt.redone_hours), (0, 0.0));
    }

    #[test]
    fn a_preemption_with_notice() {
        // Spot until 2000 s, none from 2000 to 3000 s, then again.
        let mut a = vec![1; 20];
        a.extend([0; 10]);
        a.extend([1; 70]);
        let s = set(a);
        let prices = PriceSeries::default();
        let w = World {
            set: &s,
            start_tick: 0,
            prices: &prices,
        };
        let m = model();
        // Restart from scratch: 1900 s of work lost at 2000 s, spot again at 3000 s, up at
        // 3100 s, done at 6700 s.
        let restart = spot_restart(&w, &m, false, "spot-restart");
        check(&restart, &[(2000.0, 1.0), (3700.0, 1.0)], 6700.0);
        assert_eq!(restart.recoveries, 1);
        assert!(close(restart.redone_hours * 3600.0, 1900.0));
        // Application checkpoint at 1000 s of work (t = 1100 s, written by 1105 s): 895 s
        // lost at 2000 s; back at 3000 s, up at 3100 s, loaded by 3110 s; checkpoints at 2000
        // (t = 4110 s) and 3005 s of work (t = 5120 s); done at 5720 s.
        let app = spot_restart(&w, &m, true, "spot-app-checkpoint");
        check(&app, &[(2000.0, 1.0), (2720.0, 1.0)], 5720.0);
        assert_eq!((app.recoveries, app.checkpoints), (1, 3));
        assert!(close(app.redone_hours * 3600.0, 895.0));
        // The driver: checkpoints at 700 and 1300 s; the notice at 1880 s (a checkpoint, the
        // zone avoided, an on-demand instance launched, up at 1980 s); the task stopped at
        // 1980 s with 1877 s of work done (1 s checkpoint, 10 s restore: running at 1991 s);
        // checkpoints at 2591 and 3191 s; done at 1991 + 1723 + 2 = 3716 s. Spot billed to
        // the end of the step in which the task left it (2000 s), on-demand from 1880 s to
        // 3720 s. Nothing lost, no recovery; the spot zone is avoided until 3680 s and the job
        // done before the next pricing could move it back.
        for adaptive in [false, true] {
            let d = driver(
                &w,
                &m,
                if adaptive {
                    Variant::NOW
                } else {
                    Variant::BEFORE
                },
                "driver",
            );
            check(&d, &[(2000.0, 1.0), (1840.0, 3.0)], 3716.0);
            assert_eq!((d.checkpoints, d.moves, d.recoveries), (6, 1, 0));
            assert_eq!(d.redone_hours, 0.0);
        }
        // The optimum: ticks 0-19 and 30-45 of spot.
        let opt = lower_bound(&w, &m);
        check(&opt, &[(3600.0, 1.0)], 4600.0);
        // The optimum, with no deadline, waits for the spot that stays: launched at 3000 s,
        // done at 6700 s, one start paid. With a deadline at 5000 s it cannot wait: spot from
        // 0 s (1900 s of work by 2000 s, stopped), again from 3000 s (a start, no restore at
        // this step's size), done at 4800 s: two starts, and nothing bought on-demand.
        let opt = optimum(&w, &m);
        check(&opt, &[(3700.0, 1.0)], 6700.0);
        assert_eq!(opt.moves, 0);
        let deadline = Model {
            deadline_secs: Some(5000.0),
            ..m.clone()
        };
        let opt = optimum(&w, &deadline);
        check(&opt, &[(3800.0, 1.0)], 4800.0);
        assert_eq!((opt.moves, opt.met_deadline), (1, Some(true)));
        assert_eq!(opt.on_demand_hours, 0.0);
        // No policy pays less.
        for d in [
            driver(&w, &deadline, Variant::NOW, "driver"),
            spot_restart(&w, &deadline, true, "app"),
            on_demand(&w, &deadline),
        ] {
            assert!(
                d.cost >= opt.cost,
                "{} pays {} < {}",
                d.policy,
                d.cost,
                opt.cost
            );
        }
    }

    #[test]
    fn waiting_for_spot_and_the_deadline() {
        // No spot at all: the driver before went on-demand at once; the driver waits while it
        // is on schedule: pace 1/2, a quarter of the hour of slack (900 s) in reserve, so
        // while 3600 ≤ (7200 - t) / 2 + 900, to 1800 s. On-demand from the step at 1810 s,
        // up at 1910 s, checkpoints at 2510, ..., 5510 s (six), done at 5516 s.
        let s = set(vec![0; 100]);
        let prices = PriceSeries::default();
        let w = World {
            set: &s,
            start_tick: 0,
            prices: &prices,
        };
        let m = Model {
            deadline_secs: Some(7200.0),
            ..model()
        };
        let d = driver(&w, &m, Variant::NOW, "driver");
        check(&d, &[(3710.0, 3.0)], 5516.0);
        assert_eq!(d.met_deadline, Some(true));
        let before = driver(&w, &m, Variant::BEFORE, "driver-before");
        check(&before, &[(3710.0, 3.0)], 3706.0);
        // Without a deadline the driver waits its 1800 s, then on-demand: up at 1900 s.
        let m = model();
        let d = driver(&w, &m, Variant::NOW, "driver");
        check(&d, &[(3710.0, 3.0)], 5506.0);
        // The optimum cannot beat on-demand when there is no spot: the hour at $3.
        let opt = lower_bound(&w, &m);
        check(&opt, &[(3600.0, 3.0)], 3600.0);
        // The optimum: on-demand, its start paid.
        let opt = optimum(&w, &m);
        check(&opt, &[(3700.0, 3.0)], 3700.0);
        // A deadline too close for anything but on-demand from the start, and never missed.
        let m = Model {
            deadline_secs: Some(3800.0),
            ..model()
        };
        assert_eq!(
            driver(&w, &m, Variant::NOW, "driver").met_deadline,
            Some(true)
        );
    }
}
