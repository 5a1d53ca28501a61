//! Whether a polling queue holds the driver's kicks, chosen by measuring the driver.
//!
//! Holding kicks (`--poll-us` with EVENT_IDX: avail_event left behind the index) saves the
//! driver its doorbell: a VM exit for a guest, an eventfd write for a libblkio client. But a
//! driver that looks for its answer after ringing and sleeps only if it is not there may be
//! better off ringing: the doorbell's time is enough for the answer to arrive, and it never
//! sleeps. Which one wins depends on what the driver's sleep costs on that host. On the
//! benchmark VM, whose idle vCPUs halt, a QD1 libblkio client took 18–19 µs per request with
//! kicks held and 10–15 µs with them on; with the halts switched off it was the other way round
//! (8–9 against 12–13 µs). So the worker measures instead of assuming.
//!
//! The measure is the driver's cycle at queue depth 1: from picking up one request to picking up
//! the next, when nothing else was in flight (the whole round trip, the doorbell included). Every
//! `PROBE_EVERY` such samples the tuner runs a probe of `EPOCHS` alternating epochs (kicks on,
//! then held), and keeps kicks on only if their median epoch mean is at least `MARGIN` faster.
//! Deeper queues give no samples and keep the current choice; it starts out holding.

use std::time::Duration;

/// Samples before the first probe: short bursts never leave the default.
const FIRST_PROBE: u32 = 2048;
/// Samples between probes once decided (about half a second at QD1 on a fast image).
const PROBE_EVERY: u32 = 32768;
/// Samples per epoch, and epochs per probe (even: as many of each policy, kicks on first).
const EPOCH: u32 = 128;
const EPOCHS: usize = 8;
/// A cycle longer than this is the driver pausing, not the policy's cost.
const MAX_SAMPLE: Duration = Duration::from_millis(1);
/// Kicks on must be at least this much faster (keep mean < hold mean * 9/10).
const MARGIN: (u64, u64) = (9, 10);

#[derive(Debug)]
pub struct KickTuner {
    /// The policy between probes.
    hold: bool,
    /// Samples left before the next probe (only counted between probes).
    until_probe: u32,
    /// The probe's current epoch; `EPOCHS` when not probing.
    epoch: usize,
    n: u32,
    sum_ns: u64,
    means: [u64; EPOCHS],
}

/// What a finished probe measured: mean cycle in ns with kicks on and with kicks held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub hold: bool,
    pub keep_ns: u64,
    pub hold_ns: u64,
}

impl Default for KickTuner {
    fn default() -> Self {
        KickTuner {
            hold: true,
            until_probe: FIRST_PROBE,
            epoch: EPOCHS,
            n: 0,
            sum_ns: 0,
            means: [0; EPOCHS],
        }
    }
}

impl KickTuner {
    /// Whether to hold kicks now: the current choice, or the probe epoch's policy.
    pub fn hold(&self) -> bool {
        if self.epoch < EPOCHS {
            self.epoch % 2 == 1
        } else {
            self.hold
        }
    }

    /// One QD1 cycle of the driver. Returns the verdict when this sample ends a probe.
    pub fn sample(&mut self, cycle: Duration) -> Option<Verdict> {
        if cycle > MAX_SAMPLE {
            return None;
        }
        if self.epoch == EPOCHS {
            self.until_probe = self.until_probe.saturating_sub(1);
            if self.until_probe == 0 {
                self.epoch = 0;
                self.n = 0;
                self.sum_ns = 0;
            }
            return None;
        }
        self.n += 1;
        // Bounded by MAX_SAMPLE, so this never saturates in practice.
        self.sum_ns = self
            .sum_ns
            .saturating_add(u64::try_from(cycle.as_nanos()).unwrap_or(u64::MAX));
        if self.n < EPOCH {
            return None;
        }
        self.means[self.epoch] = self.sum_ns / u64::from(self.n);
        self.n = 0;
        self.sum_ns = 0;
        self.epoch += 1;
        if self.epoch < EPOCHS {
            return None;
        }
        let keep_ns = median(self.means.iter().step_by(2).copied());
        let hold_ns = median(self.means.iter().skip(1).step_by(2).copied());
        self.hold = keep_ns.saturating_mul(MARGIN.1) >= hold_ns.saturating_mul(MARGIN.0);
        self.until_probe = PROBE_EVERY;
        Some(Verdict {
            hold: self.hold,
            keep_ns,
            hold_ns,
        })
    }
}

/// Median of a handful of values (the mean of the middle two for an even count).
fn median(v: impl Iterator<Item = u64>) -> u64 {
    let mut v: Vec<u64> = v.collect();
    v.sort_unstable();
    match v.len() {
        0 => 0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    /// Feeds samples whose length depends on the policy in force, until a probe ends.
    fn run_probe(t: &mut KickTuner, keep: Duration, hold: Duration) -> Verdict {
        for _ in 0..(FIRST_PROBE + PROBE_EVERY + EPOCH * EPOCHS as u32) {
            let d = if t.hold() { hold } else { keep };
            if let Some(v) = t.sample(d) {
                return v;
            }
        }
        panic!("no probe finished");
    }

    #[test]
    fn starts_holding_and_stays_there_through_short_bursts() {
        let mut t = KickTuner::default();
        for _ in 0..FIRST_PROBE - 1 {
            assert!(t.hold());
            assert_eq!(t.sample(10 * US), None);
        }
        assert!(t.hold());
    }

    #[test]
    fn keeps_kicks_when_the_driver_cycles_faster_with_them() {
        let mut t = KickTuner::default();
        let v = run_probe(&mut t, 11 * US, 18 * US);
        assert!(!v.hold);
        assert_eq!((v.keep_ns, v.hold_ns), (11_000, 18_000));
        assert!(!t.hold(), "the choice holds until the next probe");
        for _ in 0..PROBE_EVERY - 1 {
            t.sample(11 * US);
            assert!(!t.hold());
        }
    }

    #[test]
    fn holds_kicks_when_they_win_or_the_gain_is_within_the_margin() {
        let mut t = KickTuner::default();
        assert!(run_probe(&mut t, 12 * US, 8 * US).hold);
        // 5% faster with kicks on is within the noise margin: hold (saves the doorbell).
        assert!(run_probe(&mut t, 9500 * US / 1000, 10 * US).hold);
    }

    #[test]
    fn probe_alternates_policies_and_a_later_probe_can_change_the_choice() {
        let mut t = KickTuner::default();
        assert!(!run_probe(&mut t, 10 * US, 20 * US).hold);
        // The host changed: now the doorbell is the cost.
        let v = run_probe(&mut t, 12 * US, 8 * US);
        assert!(v.hold && t.hold());
        // Within a probe the policies alternate, kicks on first.
        let mut t = KickTuner {
            until_probe: 1,
            ..KickTuner::default()
        };
        t.sample(US);
        let mut seen = Vec::new();
        for _ in 0..EPOCHS as u32 * EPOCH {
            seen.push(t.hold());
            t.sample(US);
        }
        let per_epoch: Vec<bool> = seen.chunks(EPOCH as usize).map(|c| c[0]).collect();
        assert_eq!(
            per_epoch,
            [false, true, false, true, false, true, false, true]
        );
        assert!(
            seen.chunks(EPOCH as usize)
                .all(|c| c.iter().all(|&h| h == c[0]))
        );
    }

    #[test]
    fn long_pauses_are_not_samples() {
        let mut t = KickTuner {
            until_probe: 1,
            ..KickTuner::default()
        };
        t.sample(US);
        // A driver that thinks for 5 ms between requests says nothing about kicks.
        for _ in 0..10 * EPOCH {
            assert_eq!(t.sample(5 * MAX_SAMPLE), None);
        }
        assert!(!t.hold(), "still in the probe's first epoch");
    }

    #[test]
    fn one_outlier_epoch_does_not_decide() {
        let mut t = KickTuner {
            until_probe: 1,
            ..KickTuner::default()
        };
        t.sample(US);
        // Kicks on are slower except in one disturbed hold epoch: the medians still hold.
        let mut epoch = 0;
        loop {
            let d = match (t.hold(), epoch) {
                (true, 1) => 900 * US,
                (true, _) => 8 * US,
                (false, _) => 12 * US,
            };
            if let Some(v) = t.sample(d) {
                assert!(v.hold);
                break;
            }
            epoch = t.epoch;
        }
    }

    #[test]
    fn median_of_small_sets() {
        assert_eq!(median([3, 1, 2].into_iter()), 2);
        assert_eq!(median([4, 1, 3, 2].into_iter()), 2);
        assert_eq!(median(std::iter::empty()), 0);
    }
}
