//! The data pipeline: stream `poodle-prep` stores, augment frame pairs, cut flow-informed
//! subcrops, and hand the training loop [`Batch`]es of candle tensors.
//!
//! - [`augment`]: one global crop with the same geometry in both frames ([`crop`]; flow and
//!   occlusion resized and rescaled with it), the authors' colour augmentation per frame
//!   ([`colour`]), ImageNet normalisation, and the dense branch's reversible affine per frame
//!   and role ([`crate::geom::Affine`]).
//! - [`subcrops`]: K flow-informed subcrop pairs per direction of the symmetric loss (centres
//!   drawn on a grid in the online frame, moved into the target frame by the flow plus
//!   jitter).
//! - [`loader`]: stores -> shuffled, seeded epochs -> background workers -> bounded prefetch
//!   -> [`Batch`].
//!
//! # Conventions (binding for the loss and the training loop)
//! - Index 0 of every `[_; 2]` is frame `t`, index 1 is frame `t+dt`.
//! - All geometry is in pixels of the *global crop at training resolution* ("crop pixels"),
//!   pixel centres at integers (see `poodle_common::flowmath`).
//! - `flow[0]` is `t -> t+dt` (pixel `x` of frame t moves to `x + flow[0](x)` in frame t+dt),
//!   `flow[1]` is `t+dt -> t`. Flows are *not* affine-transformed: they relate the
//!   un-augmented global crops; the loss composes them with the affines.
//! - `occluded[0]` marks pixels of frame t without a correspondence in t+dt, `occluded[1]`
//!   pixels of frame t+dt without one in t.
//! - `views[i](x) = normalised_crop_i(affines[i] x)` (bilinear, zeros outside, i.e. the
//!   ImageNet mean colour since zero is taken after normalisation).
//! - Randomness: every sample draws from its own [`Rng`] derived from (seed, epoch, position
//!   in the epoch), so results do not depend on the worker count or on timing.

pub mod affine;
pub mod augment;
pub mod colour;
pub mod crop;
pub mod loader;
pub mod sampling;
pub mod subcrops;

pub use augment::{augment_pair, AugmentConfig, AugmentedPair, RawPair};
pub use crop::CropBox;
pub use loader::{
    resolve_store_paths, Batch, EpochIter, Loader, LoaderConfig, LoaderStats, LoaderSummary,
    SampleMeta, StoreSummary,
};
pub use sampling::{PairSampling, VisitUnit};
pub use subcrops::{SubcropConfig, SubcropPair};

use poodle_common::rng::SplitMix64;

/// A small seeded generator for augmentation (SplitMix64 underneath: stable across platforms
/// and crate upgrades, unlike an external RNG's stream).
#[derive(Clone, Debug)]
pub struct Rng(SplitMix64);

/// One SplitMix64 output step as a pure function, used to mix seeds.
fn mix64(x: u64) -> u64 {
    SplitMix64::new(x).next_u64()
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(SplitMix64::new(seed))
    }

    /// A generator determined by `seed` and a path of integers (e.g. `[epoch, position]`):
    /// different paths give independent streams.
    pub fn derive(seed: u64, path: &[u64]) -> Rng {
        let mut h = mix64(seed ^ 0x5851_f42d_4c95_7f2d);
        for &p in path {
            h = mix64(h ^ mix64(p.wrapping_add(0x2545_f491_4f6c_dd1d)));
        }
        Rng(SplitMix64::new(h))
    }

    /// An independent child stream named by `tag` (consumes one draw of `self`).
    pub fn fork(&mut self, tag: u64) -> Rng {
        let s = self.next_u64();
        Rng::derive(s, &[tag])
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)` (`lo` when the range is empty).
    pub fn uniform_in(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// True with probability `p` (always draws, so the stream does not depend on `p`).
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "Rng::below(0)");
        self.0.range_inclusive(0, n as u64 - 1) as usize
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// The random draws of the crop samplers, as a trait so that a test can replay recorded
/// draws (the subcrop reference fixture); training uses [`Rng`].
pub trait Draws {
    /// Uniform in `[0, 1)`.
    fn uniform(&mut self) -> f64;

    /// Uniform integer in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize;

    /// Uniform in `[lo, hi)` (`lo` when the range is empty; one draw either way).
    fn uniform_in(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// `k` indices of `0..n` with equal weights, distinct unless `replacement`
    /// (`torch.multinomial(torch.ones(n), k, replacement)`). Without replacement: the first
    /// `k` of a Fisher-Yates shuffle.
    fn choose(&mut self, n: usize, k: usize, replacement: bool) -> Vec<usize> {
        if replacement {
            return (0..k).map(|_| self.below(n)).collect();
        }
        assert!(k <= n, "choose {k} of {n} without replacement");
        let mut perm: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i + 1);
            perm.swap(i, j);
        }
        perm.truncate(k);
        perm
    }
}

impl Draws for Rng {
    fn uniform(&mut self) -> f64 {
        Rng::uniform(self)
    }

    fn below(&mut self, n: usize) -> usize {
        Rng::below(self, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derive_is_deterministic_and_path_sensitive() {
        let a = Rng::derive(7, &[1, 2]).next_u64();
        assert_eq!(a, Rng::derive(7, &[1, 2]).next_u64());
        assert_ne!(a, Rng::derive(7, &[2, 1]).next_u64());
        assert_ne!(a, Rng::derive(8, &[1, 2]).next_u64());
        assert_ne!(a, Rng::derive(7, &[1]).next_u64());
    }

    #[test]
    fn uniform_and_shuffle() {
        let mut r = Rng::new(3);
        let mut lo = 1.0f64;
        let mut hi = 0.0f64;
        for _ in 0..10_000 {
            let u = r.uniform_in(2.0, 3.0);
            assert!((2.0..3.0).contains(&u));
            lo = lo.min(u - 2.0);
            hi = hi.max(u - 2.0);
        }
        assert!(lo < 0.01 && hi > 0.99);
        let mut v: Vec<usize> = (0..50).collect();
        r.shuffle(&mut v);
        assert_ne!(v, (0..50).collect::<Vec<_>>());
        v.sort();
        assert_eq!(v, (0..50).collect::<Vec<_>>());
        assert!(!r.bernoulli(0.0) && r.bernoulli(1.0));
    }
}
