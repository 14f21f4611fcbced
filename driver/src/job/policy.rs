//! The job's decisions, made on any clock: which offer a worker goes to, how often the task is
//! checkpointed, when it moves to a cheaper offer, what a spot market that took a worker back
//! is worth afterwards, and (when the job's progress is known) when only on-demand can still
//! meet a deadline. Nothing here reads a clock or does I/O: the managed flow
//! ([`super::managed`]) asks with the time since the job started, `cedana-driver replay` with
//! a simulated one, and both get the same answers.

use std::time::Duration;

use crate::providers::{same_offer, Offer};

/// How long a spot offer that took a worker back is passed over.
pub const AVOID_AFTER_NOTICE: Duration = Duration::from_secs(30 * 60);
/// How far back preemptions count towards a market's rate.
pub const PREEMPTION_WINDOW: Duration = Duration::from_secs(6 * 3600);
/// The share of a deadline's slack (deadline minus work) a job may fall behind uniform
/// progress by while it waits for spot. The replay over the spot-trace collection is flat
/// between 0.15 and 0.3 (docs/benchmarks.md).
pub const RESERVE: f64 = 0.25;
/// The shortest periodic checkpoint interval the policy picks by itself.
pub const MIN_INTERVAL: Duration = Duration::from_secs(60);

/// When the job moves to a cheaper offer.
#[derive(Clone, Debug, PartialEq)]
pub struct Arbitrage {
    /// Price the spec again this often.
    pub every: Duration,
    /// Move when an offer is cheaper than the current one by more than this fraction of the
    /// current price (0.2: 20 % cheaper).
    pub margin: f64,
}

/// What a move and a checkpoint cost the job in time, as this project measures them
/// (docs/benchmarks.md): the policy weighs preemptions with them.
#[derive(Clone, Debug, PartialEq)]
pub struct Overheads {
    /// The task's time lost to one move or recovery: a new worker's start and the restore.
    pub per_move: Duration,
    /// The time one periodic checkpoint stops the task.
    pub per_checkpoint: Duration,
}

impl Default for Overheads {
    /// A cloud worker's start (90 s) and a few GiB restored; a checkpoint of a few GiB
    /// stopped for CRIU's time.
    fn default() -> Self {
        Overheads {
            per_move: Duration::from_secs(120),
            per_checkpoint: Duration::from_secs(2),
        }
    }
}

/// How the policy decides.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyOptions {
    /// Checkpoint the task this often (`None`: never on a timer). With `adaptive`, the most.
    pub interval: Option<Duration>,
    /// Move to cheaper offers (off when `None`).
    pub arbitrage: Option<Arbitrage>,
    /// Learn from preemptions: checkpoint more often while spot workers are being taken back
    /// (Young's interval, `sqrt(2 · checkpoint cost · time between preemptions)`), and rank
    /// offers by their price plus what their recent preemptions cost in moves. Off: the
    /// fixed interval and the cheapest offer first (the driver before the replay measured it).
    pub adaptive: bool,
    /// When every spot offer is out of capacity, wait this long for one (the task stays in
    /// its checkpoint) before launching on-demand (`None`: on-demand at once).
    pub wait_for_spot: Option<Duration>,
    pub overheads: Overheads,
}

/// The decisions' state: markets avoided and preemptions seen, each with its time on the
/// policy's clock (time since the job started).
#[derive(Clone, Debug)]
pub struct Policy {
    opts: PolicyOptions,
    avoided: Vec<(Offer, Duration)>,
    preempted: Vec<(Offer, Duration)>,
}

impl Policy {
    pub fn new(opts: PolicyOptions) -> Self {
        Policy {
            opts,
            avoided: Vec::new(),
            preempted: Vec::new(),
        }
    }

    pub fn options(&self) -> &PolicyOptions {
        &self.opts
    }

    /// Launch on other offers than `offer` until `now + how_long` (unless nothing else fits).
    pub fn avoid(&mut self, offer: &Offer, now: Duration, how_long: Duration) {
        self.avoided.push((offer.clone(), now + how_long));
    }

    /// A worker on `offer` was taken back (a spot interruption notice) or lost: its market is
    /// avoided for [`AVOID_AFTER_NOTICE`] and, if it is a spot market, the preemption counts
    /// towards the job's rate.
    pub fn preempted(&mut self, offer: &Offer, now: Duration) {
        if offer.spot {
            self.preempted.push((offer.clone(), now));
            self.avoid(offer, now, AVOID_AFTER_NOTICE);
        }
    }

    /// Preemptions per hour over the last [`PREEMPTION_WINDOW`]: of `offer`'s market, or of
    /// every spot market the job ran on (`None`).
    pub fn preemption_rate(&self, offer: Option<&Offer>, now: Duration) -> f64 {
        let since = now.saturating_sub(PREEMPTION_WINDOW);
        let n = self
            .preempted
            .iter()
            .filter(|(o, at)| *at >= since && offer.is_none_or(|x| same_offer(o, x)))
            .count();
        let window = now.min(PREEMPTION_WINDOW).max(Duration::from_secs(3600));
        n as f64 / (window.as_secs_f64() / 3600.0)
    }

    /// What an hour on `offer` is expected to cost: its price, and (adaptive) the moves its
    /// recent preemptions cause, each paid at its price for the time the task is not running.
    pub fn hourly_cost(&self, offer: &Offer, now: Duration) -> f64 {
        if !self.opts.adaptive || !offer.spot {
            return offer.price_usd_hour;
        }
        let lost = self.preemption_rate(Some(offer), now)
            * self.opts.overheads.per_move.as_secs_f64()
            / 3600.0;
        offer.price_usd_hour * (1.0 + lost)
    }

    /// The offers to launch on, best first: `offers` without the avoided ones (unless only
    /// avoided ones are left), ordered by [`Policy::hourly_cost`] (the cheapest first when
    /// not adaptive; a stable sort keeps `offers`' order between equals).
    pub fn rank(&mut self, now: Duration, offers: Vec<Offer>) -> Vec<Offer> {
        self.avoided.retain(|(_, until)| *until > now);
        let kept: Vec<Offer> = offers
            .iter()
            .filter(|o| !self.avoided.iter().any(|(a, _)| same_offer(a, o)))
            .cloned()
            .collect();
        let mut ranked = if kept.is_empty() { offers } else { kept };
        let cost: Vec<f64> = ranked.iter().map(|o| self.hourly_cost(o, now)).collect();
        let mut order: Vec<usize> = (0..ranked.len()).collect();
        order.sort_by(|a, b| cost[*a].total_cmp(&cost[*b]).then(a.cmp(b)));
        let mut slots: Vec<Option<Offer>> = ranked.drain(..).map(Some).collect();
        order
            .into_iter()
            .map(|i| slots[i].take().expect("each index once"))
            .collect()
    }

    /// How long after a checkpoint the next is due, on `current` (`None`: none on a timer).
    /// Adaptive, on spot: Young's interval from the job's recent preemption rate, between
    /// [`MIN_INTERVAL`] and the configured interval.
    pub fn checkpoint_interval(&self, now: Duration, current: Option<&Offer>) -> Option<Duration> {
        let base = self.opts.interval?;
        if !self.opts.adaptive || !current.is_some_and(|o| o.spot) {
            return Some(base);
        }
        let rate = self.preemption_rate(None, now);
        if rate <= 0.0 {
            return Some(base);
        }
        let cost = self.opts.overheads.per_checkpoint.as_secs_f64().max(0.1);
        let young = (2.0 * cost * 3600.0 / rate).sqrt();
        Some(Duration::from_secs_f64(young).clamp(MIN_INTERVAL.min(base), base))
    }

    /// The offers worth moving the task to from `current` (as priced now), in `ranked`'s
    /// order ([`Policy::rank`]): those whose expected hourly cost is below `current`'s by more
    /// than the arbitrage margin. Empty: stay (also when arbitrage is off). A move launches on
    /// these only: when none has capacity, the task stays rather than move sideways.
    pub fn moves(&self, now: Duration, current: &Offer, ranked: &[Offer]) -> Vec<Offer> {
        let Some(a) = self.opts.arbitrage.as_ref() else {
            return Vec::new();
        };
        let limit = self.hourly_cost(current, now) * (1.0 - a.margin);
        ranked
            .iter()
            .filter(|o| !same_offer(o, current) && self.hourly_cost(o, now) < limit)
            .cloned()
            .collect()
    }

    /// Whether to wait for spot capacity rather than launch on-demand, having waited since
    /// `since` ([`PolicyOptions::wait_for_spot`]).
    pub fn wait_for_spot(&self, now: Duration, since: Duration) -> bool {
        self.opts
            .wait_for_spot
            .is_some_and(|w| now.saturating_sub(since) < w)
    }

    /// Whether a job with a deadline is on schedule: the work `left` fits in the time left at
    /// the pace the whole job had (`total` work over the time to `deadline` from its start),
    /// give or take [`RESERVE`] of its slack. Waiting for spot is only worth it while it is
    /// (after the Uniform Progress policy of "Can't Be Late", NSDI '24); behind, on-demand,
    /// and back to spot by arbitrage when spot returns.
    pub fn ahead_of_schedule(
        &self,
        now: Duration,
        left: Duration,
        total: Duration,
        deadline: Duration,
    ) -> bool {
        let pace = total.as_secs_f64() / deadline.as_secs_f64().max(1.0);
        let reserve = RESERVE * deadline.saturating_sub(total).as_secs_f64();
        left.as_secs_f64() <= deadline.saturating_sub(now).as_secs_f64() * pace + reserve
    }

    /// Whether only on-demand can still finish `left` of work by `deadline` (times on the
    /// policy's clock): the slack left is less than two moves (one to on-demand, one lost
    /// spot worker's recovery) and an interval's lost work, the work itself counted with the
    /// time its periodic checkpoints stop it. The flow then stays on on-demand.
    pub fn must_use_on_demand(&self, now: Duration, left: Duration, deadline: Duration) -> bool {
        let o = &self.opts.overheads;
        let interval = self.opts.interval.unwrap_or(Duration::from_secs(3600));
        let stopped =
            left.as_secs_f64() * o.per_checkpoint.as_secs_f64() / interval.as_secs_f64().max(1.0);
        let need = now + left + Duration::from_secs_f64(stopped);
        need + 2 * o.per_move + interval + o.per_checkpoint >= deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(zone: &str, price: f64, spot: bool) -> Offer {
        Offer {
            provider: "aws".into(),
            instance_type: "p3.2xlarge".into(),
            vcpus: 8.0,
            memory_gb: 61.0,
            gpu: None,
            gpu_count: 0,
            vram_gb: 0.0,
            region: "us-east-1".into(),
            zone: Some(zone.into()),
            price_usd_hour: price,
            spot,
            price_source: "test".into(),
            priced_at: None,
        }
    }

    fn policy(adaptive: bool) -> Policy {
        Policy::new(PolicyOptions {
            interval: Some(Duration::from_secs(600)),
            arbitrage: Some(Arbitrage {
                every: Duration::from_secs(600),
                margin: 0.2,
            }),
            adaptive,
            wait_for_spot: Some(Duration::from_secs(1800)),
            overheads: Overheads {
                per_move: Duration::from_secs(360),
                per_checkpoint: Duration::from_secs(8),
            },
        })
    }

    const H: u64 = 3600;

    #[test]
    fn a_market_that_took_a_worker_back_is_avoided_for_half_an_hour() {
        let mut p = policy(false);
        let a = offer("a", 1.0, true);
        let b = offer("b", 1.1, true);
        let now = Duration::from_secs(H);
        p.preempted(&a, now);
        let ranked = p.rank(now, vec![a.clone(), b.clone()]);
        assert_eq!(ranked, vec![b.clone()]);
        // Only avoided ones left: they are offered anyway.
        assert_eq!(p.rank(now, vec![a.clone()]), vec![a.clone()]);
        let later = now + AVOID_AFTER_NOTICE;
        assert_eq!(p.rank(later, vec![a.clone(), b.clone()]), vec![a, b]);
    }

    #[test]
    fn on_demand_losses_do_not_count_as_preemptions() {
        let mut p = policy(true);
        let od = offer("a", 3.0, false);
        p.preempted(&od, Duration::from_secs(H));
        assert_eq!(p.preemption_rate(None, Duration::from_secs(H)), 0.0);
        assert_eq!(p.rank(Duration::from_secs(H), vec![od.clone()]), vec![od]);
    }

    #[test]
    fn preemption_rate_counts_the_window_only() {
        let mut p = policy(true);
        let a = offer("a", 1.0, true);
        for h in [1, 2, 3] {
            p.preempted(&a, Duration::from_secs(h * H));
        }
        // Three in the last three hours, counted over at least an hour and at most six.
        assert!((p.preemption_rate(None, Duration::from_secs(3 * H)) - 1.0).abs() < 1e-9);
        assert!((p.preemption_rate(None, Duration::from_secs(6 * H)) - 0.5).abs() < 1e-9);
        // Seven hours after the first, six after the second: two left in the window.
        let r = p.preemption_rate(Some(&a), Duration::from_secs(8 * H));
        assert!((r - 2.0 / 6.0).abs() < 1e-9, "{r}");
        assert_eq!(
            p.preemption_rate(Some(&offer("b", 1.0, true)), Duration::from_secs(8 * H)),
            0.0
        );
    }

    #[test]
    fn adaptive_ranking_weighs_preemptions_by_the_moves_they_cost() {
        let mut p = policy(true);
        let a = offer("a", 1.0, true);
        let b = offer("b", 1.05, true);
        // Six preemptions of `a` in the job's three hours: 2/h · 0.1 h per move = 20 % more
        // per hour (and no longer avoided); `b` is 5 % dearer and never preempted.
        for m in 0..6 {
            p.preempted(&a, Duration::from_secs(H + m * 600));
        }
        let now = Duration::from_secs(3 * H);
        let cost = p.hourly_cost(&a, now);
        assert!((cost - 1.2).abs() < 1e-9, "{cost}");
        assert_eq!(
            p.rank(now, vec![a.clone(), b.clone()]),
            vec![b.clone(), a.clone()]
        );
        // The driver as it was: the cheapest first.
        let mut fixed = policy(false);
        for m in 0..6 {
            fixed.preempted(&a, Duration::from_secs(H + m * 600));
        }
        assert_eq!(fixed.rank(now, vec![a.clone(), b.clone()]), vec![a, b]);
    }

    #[test]
    fn young_interval_while_spot_workers_are_taken_back() {
        let mut p = policy(true);
        let a = offer("a", 1.0, true);
        let od = offer("a", 3.0, false);
        let now = Duration::from_secs(2 * H);
        assert_eq!(
            p.checkpoint_interval(now, Some(&a)),
            Some(Duration::from_secs(600))
        );
        // Two preemptions in two hours: 1/h; sqrt(2 · 8 s · 3600 s) = 240 s.
        p.preempted(&offer("b", 1.0, true), Duration::from_secs(H));
        p.preempted(&offer("c", 1.0, true), Duration::from_secs(2 * H));
        let i = p.checkpoint_interval(now, Some(&a)).unwrap();
        assert_eq!(i.as_secs(), 240);
        // On-demand is not preempted: the configured interval.
        assert_eq!(
            p.checkpoint_interval(now, Some(&od)),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            policy(false).checkpoint_interval(now, Some(&a)),
            Some(Duration::from_secs(600))
        );
        // Never shorter than a minute.
        for m in 0..200 {
            p.preempted(&a, now + Duration::from_secs(m));
        }
        let i = p
            .checkpoint_interval(now + Duration::from_secs(200), Some(&a))
            .unwrap();
        assert_eq!(i, MIN_INTERVAL);
    }

    #[test]
    fn moves_only_past_the_margin_and_only_with_arbitrage() {
        let p = policy(false);
        let now = Duration::from_secs(H);
        let od = offer("a", 3.06, false);
        let spot = offer("b", 0.918, true);
        let close = offer("c", 2.5, true);
        let other = offer("d", 0.9, true);
        assert_eq!(
            p.moves(
                now,
                &od,
                &[spot.clone(), close.clone(), other.clone(), od.clone()]
            ),
            vec![spot.clone(), other]
        );
        assert!(p.moves(now, &od, &[close]).is_empty());
        assert!(p.moves(now, &spot, std::slice::from_ref(&spot)).is_empty());
        let mut off = p.options().clone();
        off.arbitrage = None;
        assert!(Policy::new(off).moves(now, &od, &[spot]).is_empty());
    }

    #[test]
    fn waits_for_spot_as_long_as_allowed() {
        let p = policy(true);
        let since = Duration::from_secs(H);
        assert!(p.wait_for_spot(since, since));
        assert!(p.wait_for_spot(since + Duration::from_secs(1799), since));
        assert!(!p.wait_for_spot(since + Duration::from_secs(1800), since));
        let mut o = p.options().clone();
        o.wait_for_spot = None;
        assert!(!Policy::new(o).wait_for_spot(since, since));
    }

    #[test]
    fn on_schedule_is_uniform_progress_give_or_take_a_quarter_of_the_slack() {
        let p = policy(true);
        let (total, deadline) = (Duration::from_secs(24 * H), Duration::from_secs(36 * H));
        // Pace 2/3; slack 12 h, a quarter of it 3 h. At 6 h, 30 h are left: on schedule
        // with up to 30 · 2/3 + 3 = 23 h of work left.
        let at = Duration::from_secs(6 * H);
        assert!(p.ahead_of_schedule(at, Duration::from_secs(23 * H), total, deadline));
        assert!(!p.ahead_of_schedule(at, Duration::from_secs(23 * H + 1), total, deadline));
        assert!(p.ahead_of_schedule(Duration::ZERO, total, total, deadline));
    }

    #[test]
    fn on_demand_once_the_slack_is_two_moves_and_an_interval() {
        let p = policy(true);
        let deadline = Duration::from_secs(36 * H);
        let left = Duration::from_secs(10 * H);
        // 10 h with a checkpoint stopping it 8 s every 600 s (480 s), then
        // 2 · 360 s + 600 s + 8 s = 1328 s of slack.
        let edge = deadline - left - Duration::from_secs(480 + 1328);
        assert!(!p.must_use_on_demand(edge - Duration::from_secs(1), left, deadline));
        assert!(p.must_use_on_demand(edge, left, deadline));
    }
}
