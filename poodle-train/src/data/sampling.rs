//! Which stored pairs a pass over the data trains on.
//!
//! The authors draw fresh frame pairs every time a video is visited: each visit picks R
//! start frames and gaps (`repeat_sample`), so a 300-epoch run sees about 300 distinct pairs
//! per video. Flow is expensive, so poodle computes it once at prep time for a **pool** of P
//! pairs per video (the dataset config's `pairs_per_video`, or `pairs_per_clip` per clip of
//! a long walk) and each visit draws R pairs from that pool:
//!
//! - A **unit** is what a visit draws from: a video (`per_video` sampling), a clip of a long
//!   video (`clips` sampling: the authors' Walking Tours clips of `frames_per_clip` frames),
//!   or, for image sequences (`consecutive` sampling), a single pair.
//! - A **pass** visits every unit `visits_per_pass` times (the authors' Walking Tours
//!   `dataset_repeats`, 1 elsewhere) in a seeded random order; each visit takes the next R
//!   pairs of the unit's **draw stream**: the pool in a seeded random order, then the pool in
//!   a fresh order, and so on, so no pair is reused until the whole pool has been used.
//! - A pass counts as R **paper epochs** (the authors step their epoch counter by R), so the
//!   schedules keep the paper's meaning whatever R and P are. Units that are single pairs
//!   take R = 1: a pass is then one ordinary epoch over the pairs.
//! - `keep_visits_together` keeps a visit's R pairs adjacent, so that a batch of B pairs
//!   holds B / R videos as in the authors' loader (their batch is 2 videos x R = 2 pairs);
//!   otherwise the pass's pairs are shuffled.
//!
//! Everything is a pure function of (seed, pass, unit name), so the order does not depend on
//! the worker count, on timing, or on which other videos the stores hold.

use super::Rng;
use poodle_common::config::Sampling;
use poodle_common::rng::SplitMix64;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const TAG_PASS: u64 = 0x7061_7373;
const TAG_POOL: u64 = 0x706f_6f6c;
const TAG_MIX: u64 = 0x006d_6978;

/// What one visit draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VisitUnit {
    /// `pair` for stores of image sequences (`consecutive` sampling), `video` otherwise.
    Auto,
    /// A video, or a clip of one under `clips` sampling (the authors' unit).
    Video,
    /// A single stored pair: a pass is one epoch over all pairs (poodle's earlier loader).
    Pair,
}

/// How a pass draws pairs from the stores. Defaults: the authors' BDD100K configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PairSampling {
    pub unit: VisitUnit,
    /// R: pairs drawn per visit (authors' `repeat_sample`: 2 for BDD100K and Walking Tours,
    /// 10 for the ablations). A pass counts as R paper epochs.
    pub pairs_per_visit: usize,
    /// Visits of every unit per pass (authors' Walking Tours `dataset_repeats`: 75; 1
    /// elsewhere).
    pub visits_per_pass: usize,
    /// Keep a visit's R pairs adjacent in the pass (authors: a batch is videos x R pairs);
    /// false shuffles all pairs of the pass.
    pub keep_visits_together: bool,
}

impl Default for PairSampling {
    fn default() -> Self {
        PairSampling {
            unit: VisitUnit::Auto,
            pairs_per_visit: 2,
            visits_per_pass: 1,
            keep_visits_together: true,
        }
    }
}

impl PairSampling {
    /// Every stored pair once per pass, in a shuffled order (poodle's earlier loader).
    pub fn every_pair() -> Self {
        PairSampling {
            unit: VisitUnit::Pair,
            pairs_per_visit: 1,
            visits_per_pass: 1,
            keep_visits_together: false,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.pairs_per_visit == 0 || self.visits_per_pass == 0 {
            return Err(format!(
                "sampling.pairs_per_visit and sampling.visits_per_pass must be positive, got {} and {}",
                self.pairs_per_visit, self.visits_per_pass
            ));
        }
        Ok(())
    }

    /// The unit for stores sampled by `sampling` (resolves `auto`).
    pub fn unit_for(&self, sampling: &Sampling) -> VisitUnit {
        match (self.unit, sampling) {
            (VisitUnit::Auto, Sampling::Consecutive) => VisitUnit::Pair,
            (VisitUnit::Auto, _) => VisitUnit::Video,
            (u, _) => u,
        }
    }
}

/// One stored pair as the planner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct PairKey {
    /// Index of the pair in the loader's index of valid pairs.
    pub index: u32,
    /// Name of the unit it belongs to (e.g. `root|video|clip`).
    pub unit: String,
}

/// The clip of a pair starting at frame `t` under `clips` sampling: clips are
/// `round(clip_seconds * fps)` frames long, as poodle-prep cut them.
pub fn clip_of(t: i64, fps: f64, clip_seconds: f64) -> i64 {
    let fps = if fps > 0.0 { fps } else { 30.0 };
    let clip = ((clip_seconds * fps).round() as i64).max(2);
    t.max(0) / clip
}

/// Pools of pairs per unit and the per-pass draw.
#[derive(Clone, Debug)]
pub struct PassPlanner {
    sampling: PairSampling,
    /// R actually drawn per visit (1 for pair units).
    r: usize,
    seed: u64,
    /// (unit name hash, pool of indices sorted ascending), units sorted by name.
    units: Vec<(u64, Vec<u32>)>,
}

impl PassPlanner {
    /// `pairs`: every valid pair with its unit name; `pair_units`: whether the units are
    /// single pairs (then R = 1).
    pub fn new(sampling: &PairSampling, seed: u64, pairs: &[PairKey], pair_units: bool) -> Self {
        let mut by_unit: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for p in pairs {
            by_unit.entry(p.unit.as_str()).or_default().push(p.index);
        }
        let units = by_unit
            .into_iter()
            .map(|(name, mut pool)| {
                pool.sort_unstable();
                (SplitMix64::for_item(TAG_MIX, name).next_u64(), pool)
            })
            .collect();
        PassPlanner {
            sampling: sampling.clone(),
            r: if pair_units {
                1
            } else {
                sampling.pairs_per_visit
            },
            seed,
            units,
        }
    }

    pub fn num_units(&self) -> usize {
        self.units.len()
    }

    /// Pairs drawn per visit (R, or 1 for pair units).
    pub fn pairs_per_visit(&self) -> usize {
        self.r
    }

    /// Paper epochs one pass counts as (R).
    pub fn epochs_per_pass(&self) -> usize {
        self.r
    }

    /// Pairs in every pass.
    pub fn pairs_per_pass(&self) -> usize {
        self.units.len() * self.sampling.visits_per_pass * self.r
    }

    /// Smallest and largest pool.
    pub fn pool_sizes(&self) -> (usize, usize) {
        let it = self.units.iter().map(|(_, p)| p.len());
        (it.clone().min().unwrap_or(0), it.max().unwrap_or(0))
    }

    /// Cycle `cycle` of unit `u`'s draw stream: a fresh permutation of its pool.
    fn cycle(&self, u: usize, cycle: usize) -> Vec<u32> {
        let (hash, pool) = &self.units[u];
        let mut perm = pool.clone();
        Rng::derive(self.seed, &[TAG_POOL, *hash, cycle as u64]).shuffle(&mut perm);
        perm
    }

    /// The pairs of pass `pass`, in training order (indices into the loader's index).
    pub fn pass(&self, pass: u64) -> Vec<u32> {
        let v = self.sampling.visits_per_pass;
        let mut visits: Vec<(usize, usize)> = (0..self.units.len())
            .flat_map(|u| (0..v).map(move |k| (u, k)))
            .collect();
        Rng::derive(self.seed, &[TAG_PASS, pass]).shuffle(&mut visits);
        let first = pass as usize * v * self.r;
        let mut out = Vec::with_capacity(visits.len() * self.r);
        // Permutations are cached per (unit, cycle) within the pass.
        let mut cache: BTreeMap<(usize, usize), Vec<u32>> = BTreeMap::new();
        for (u, k) in visits {
            let p = self.units[u].1.len();
            for j in 0..self.r {
                let q = first + k * self.r + j;
                let perm = cache
                    .entry((u, q / p))
                    .or_insert_with(|| self.cycle(u, q / p));
                out.push(perm[q % p]);
            }
        }
        if !self.sampling.keep_visits_together {
            Rng::derive(self.seed, &[TAG_PASS, pass, 1]).shuffle(&mut out);
        }
        out
    }

    /// The draw stream of unit `u` (for tests and inspection): its first `n` elements.
    pub fn stream(&self, u: usize, n: usize) -> Vec<u32> {
        let p = self.units[u].1.len();
        (0..n).map(|q| self.cycle(u, q / p)[q % p]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    /// `units` units with `pool` pairs each; pair i belongs to unit i / pool.
    fn keys(units: usize, pool: usize) -> Vec<PairKey> {
        (0..units * pool)
            .map(|i| PairKey {
                index: i as u32,
                unit: format!("v{}", i / pool),
            })
            .collect()
    }

    fn planner(r: usize, v: usize, together: bool, units: usize, pool: usize) -> PassPlanner {
        let s = PairSampling {
            unit: VisitUnit::Video,
            pairs_per_visit: r,
            visits_per_pass: v,
            keep_visits_together: together,
        };
        PassPlanner::new(&s, 7, &keys(units, pool), false)
    }

    #[test]
    fn each_pass_visits_every_unit_and_draws_r_pairs_from_its_pool() {
        let p = planner(2, 1, true, 5, 6);
        assert_eq!(p.pairs_per_pass(), 10);
        for pass in 0..4 {
            let order = p.pass(pass);
            assert_eq!(order.len(), 10);
            // Visits kept together: pairs 2k and 2k+1 come from the same video.
            for w in order.chunks(2) {
                assert_eq!(w[0] / 6, w[1] / 6, "pass {pass}: {order:?}");
                assert_ne!(w[0], w[1]);
            }
            let per_unit: HashMap<u32, usize> = order.iter().fold(HashMap::new(), |mut m, i| {
                *m.entry(i / 6).or_default() += 1;
                m
            });
            assert!(per_unit.values().all(|&c| c == 2), "{per_unit:?}");
        }
        assert_ne!(p.pass(0), p.pass(1));
        assert_eq!(
            p.pass(3),
            p.pass(3),
            "a pass is a pure function of its number"
        );
    }

    #[test]
    fn no_pair_is_reused_until_the_pool_is_used_up() {
        // Pool 6, R = 2: passes 0-2 use each pair of a video exactly once, passes 3-5 again.
        let p = planner(2, 1, true, 4, 6);
        let mut seen: Vec<HashSet<u32>> = vec![HashSet::new(); 4];
        for pass in 0..3 {
            for i in p.pass(pass) {
                assert!(
                    seen[(i / 6) as usize].insert(i),
                    "pair {i} reused in pass {pass}"
                );
            }
        }
        assert!(seen.iter().all(|s| s.len() == 6));
        let cycle2: Vec<u32> = (3..6).flat_map(|e| p.pass(e)).collect();
        let distinct: HashSet<u32> = cycle2.iter().copied().collect();
        assert_eq!((cycle2.len(), distinct.len()), (24, 24));
        // The second cycle is a fresh order, not a repeat of the first.
        assert_ne!(p.stream(0, 6), p.stream(0, 12)[6..].to_vec());
    }

    #[test]
    fn pools_smaller_than_r_and_repeated_visits() {
        // Pool 3 < R = 4 within one visit: the stream wraps into the next permutation.
        let p = planner(4, 1, true, 2, 3);
        let order = p.pass(0);
        assert_eq!(order.len(), 8);
        for w in order.chunks(4) {
            let d: HashSet<u32> = w[..3].iter().copied().collect();
            assert_eq!(
                d.len(),
                3,
                "the first P draws of a visit are distinct: {w:?}"
            );
        }
        // Walking Tours: 3 visits per pass, R = 2 -> 6 pairs per unit per pass.
        let p = planner(2, 3, true, 2, 10);
        let order = p.pass(0);
        assert_eq!(order.len(), 12);
        let d: HashSet<u32> = order.iter().copied().collect();
        assert_eq!(
            d.len(),
            12,
            "the first 6 draws from pools of 10 are distinct"
        );
    }

    #[test]
    fn shuffled_passes_mix_videos_and_pair_units_take_one_epoch() {
        let p = planner(2, 1, false, 20, 4);
        let order = p.pass(0);
        let adjacent_same = order.chunks(2).filter(|w| w[0] / 4 == w[1] / 4).count();
        assert!(
            adjacent_same < 10,
            "shuffled: {adjacent_same} of 20 adjacent pairs"
        );
        let s = PairSampling::every_pair();
        let keys: Vec<PairKey> = (0..9)
            .map(|i| PairKey {
                index: i,
                unit: format!("p{i}"),
            })
            .collect();
        let p = PassPlanner::new(&s, 1, &keys, true);
        assert_eq!(p.epochs_per_pass(), 1);
        let mut order = p.pass(2);
        order.sort_unstable();
        assert_eq!(order, (0..9).collect::<Vec<_>>());
    }

    #[test]
    fn units_resolve_by_store_sampling_and_clips_follow_prep() {
        let s = PairSampling::default();
        assert_eq!(s.unit_for(&Sampling::Consecutive), VisitUnit::Pair);
        let per_video = Sampling::PerVideo {
            pairs_per_video: 10,
            dt_min: 15,
            dt_max: 30,
        };
        assert_eq!(s.unit_for(&per_video), VisitUnit::Video);
        let forced = PairSampling {
            unit: VisitUnit::Pair,
            ..s
        };
        assert_eq!(forced.unit_for(&per_video), VisitUnit::Pair);
        // 10 s clips at 30 fps are 300 frames: frames 0..299 -> clip 0, 300.. -> clip 1.
        assert_eq!((clip_of(0, 30.0, 10.0), clip_of(299, 30.0, 10.0)), (0, 0));
        assert_eq!(clip_of(300, 30.0, 10.0), 1);
        assert_eq!(clip_of(300, 29.97, 10.0), 1); // 300 frames (299.7 rounds up)
        assert!(PairSampling {
            pairs_per_visit: 0,
            ..PairSampling::default()
        }
        .validate()
        .is_err());
    }
}
