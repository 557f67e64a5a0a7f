//! `poodle-train bench-loader`: the data loader's throughput in pairs per second per core at a
//! run's configuration (by default the paper's: 512 x 1024 crops, K = 6 subcrops of 192 px,
//! the full colour and affine recipe), against the store reads alone in the same run.
//!
//! The loader builds batches inline (`workers = 0`) inside a rayon pool of `threads` threads, so
//! exactly `threads` cores do the work; pairs/s divided by `threads` is the per-core figure.
//! The read-only baseline reads the same pairs (frames, both flows, both occlusion masks) on
//! one thread, so `read_share` says how much of a pair's cost is I/O and decompression.

use crate::config::TrainConfig;
use crate::run::open_loader;
use anyhow::{anyhow, Context, Result};
use candle_core::Device;
use poodle_common::store::PoodleStore;
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

/// What one benchmark run measured.
#[derive(Clone, Debug, Serialize)]
pub struct LoaderBench {
    pub stores: Vec<String>,
    /// Stored frame size (height, width).
    pub stored: (usize, usize),
    /// Training crop (height, width), subcrops per frame pair and their side.
    pub crop: (usize, usize),
    pub subcrops: usize,
    pub subcrop_size: usize,
    pub threads: usize,
    pub pairs: usize,
    pub seconds: f64,
    pub pairs_per_s: f64,
    pub pairs_per_s_per_core: f64,
    /// Store reads alone (one thread) of `read_pairs` pairs.
    pub read_pairs: usize,
    pub read_only_pairs_per_s: f64,
    /// Fraction of one core's time per pair spent reading: (1/read rate) / (1/loader rate per core).
    pub read_share: f64,
}

/// Runs `warmup` batches untimed, then times `batches` batches (crossing epochs as needed).
pub fn bench_loader(
    cfg: &TrainConfig,
    threads: usize,
    batches: usize,
    warmup: usize,
) -> Result<LoaderBench> {
    anyhow::ensure!(
        threads > 0 && batches > 0,
        "--threads and --batches must be positive"
    );
    let mut cfg = cfg.clone();
    cfg.data.workers = 0;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("building the rayon pool")?;
    let loader = open_loader(&cfg, &Device::Cpu)?;
    let (pairs, seconds) = pool.install(|| -> Result<(usize, f64)> {
        let mut epoch = 0u64;
        let mut it = loader.epoch(epoch);
        let mut next = || -> Result<usize> {
            loop {
                if let Some(b) = it.next() {
                    return Ok(b?.len());
                }
                epoch += 1;
                it = loader.epoch(epoch);
                anyhow::ensure!(it.num_batches() > 0, "the stores give no full batch");
            }
        };
        for _ in 0..warmup {
            next()?;
        }
        let t0 = Instant::now();
        let mut pairs = 0;
        for _ in 0..batches {
            pairs += next()?;
        }
        Ok((pairs, t0.elapsed().as_secs_f64()))
    })?;
    let (read_pairs, read_s) = time_reads(&loader.epoch_order(0), pairs, cfg.data.flow_group)?;
    let a = &cfg.augment;
    let first = PoodleStore::open(&cfg.data.stores[0]).map_err(|e| anyhow!("{e}"))?;
    let g = first.attrs.geometry;
    let per_core = pairs as f64 / seconds / threads as f64;
    let read_rate = read_pairs as f64 / read_s;
    Ok(LoaderBench {
        stores: cfg
            .data
            .stores
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        stored: (g.height, g.width),
        crop: (a.out_height, a.out_width),
        subcrops: a.subcrops.k,
        subcrop_size: a.subcrops.size,
        threads,
        pairs,
        seconds,
        pairs_per_s: pairs as f64 / seconds,
        pairs_per_s_per_core: per_core,
        read_pairs,
        read_only_pairs_per_s: read_rate,
        read_share: per_core / read_rate,
    })
}

/// Reads `n` pairs of `order` (frames and flow group, cycling) on this thread, stores opened
/// before the clock starts; (pairs, seconds).
fn time_reads(order: &[(PathBuf, usize)], n: usize, group: Option<String>) -> Result<(usize, f64)> {
    let mut stores: HashMap<&PathBuf, (PoodleStore, String)> = HashMap::new();
    for (path, _) in order {
        if !stores.contains_key(path) {
            let s = PoodleStore::open(path).map_err(|e| anyhow!("{e}"))?;
            let g = group.clone().unwrap_or_else(|| s.flow_groups[0].0.clone());
            stores.insert(path, (s, g));
        }
    }
    let t0 = Instant::now();
    let mut done = 0;
    for (path, i) in order.iter().cycle().take(n.max(1)) {
        let (s, g) = &stores[path];
        s.read_pair(*i).map_err(|e| anyhow!("{e}"))?;
        s.read_flow(g, *i).map_err(|e| anyhow!("{e}"))?;
        done += 1;
    }
    Ok((done, t0.elapsed().as_secs_f64()))
}
