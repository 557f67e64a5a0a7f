//! poodle-prep: prepare frame pairs, optical flow and occlusion from videos into Zarr stores.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use poodle_common::config::DatasetConfig;
use poodle_prep::flowmodel::Device;
use poodle_prep::pipeline::{run_prep, PrepOptions};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "poodle-prep",
    version,
    about = "Video -> frame pairs + optical flow + occlusion -> sharded Zarr v3 stores"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Prepare one part of a dataset (rerun the same command to resume).
    Prep(PrepArgs),
    /// Summarise a store: pairs, arrays, sizes, flow groups, statistics.
    Inspect {
        store: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write one pair as a PNG: both frames, the flow colour wheel, the occlusion mask.
    Show {
        store: PathBuf,
        #[arg(long)]
        pair: usize,
        #[arg(long)]
        out: PathBuf,
        /// Flow group (default: the first).
        #[arg(long)]
        flow_group: Option<String>,
    },
}

#[derive(clap::Args)]
struct PrepArgs {
    // --- What ---
    /// Dataset config (manifests/<name>.json).
    #[arg(long)]
    config: PathBuf,
    /// Dataset root (default: the config's default_root).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Output folder; stores are OUT/<name>-part-IIIII-of-NNNNN.zarr.
    #[arg(long)]
    out: PathBuf,
    /// Use only the first N pairs of the manifest (quick checks).
    #[arg(long)]
    max_pairs: Option<usize>,

    // --- Flow ---
    /// Flow model card (JSON beside the ONNX file).
    #[arg(long, default_value = "models/raft_small_random.json")]
    model: PathBuf,
    /// cpu or cuda:N. An unavailable CUDA provider is an error, not a fallback.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// ONNX Runtime shared library (default: $ORT_DYLIB_PATH, then .venv's onnxruntime).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// Name of the flow group (default: the model card's name).
    #[arg(long)]
    flow_group: Option<String>,
    /// Also store the backward flow (t+dt -> t); it is always computed for occlusion.
    #[arg(long)]
    store_backward: bool,
    /// Pairs per flow batch (recommended: 4 on a GPU, 1-2 on CPU).
    #[arg(long, default_value_t = 2)]
    batch_size: usize,

    // --- Parallelism ---
    /// This part's index (default: $SLURM_ARRAY_TASK_ID, else 0).
    #[arg(long, env = "SLURM_ARRAY_TASK_ID", default_value_t = 0)]
    part_index: usize,
    /// Number of parts (default: $SLURM_ARRAY_TASK_COUNT, else 1).
    #[arg(long, env = "SLURM_ARRAY_TASK_COUNT", default_value_t = 1)]
    num_parts: usize,
    /// Decoder threads (each runs one ffmpeg).
    #[arg(long, default_value_t = 2)]
    decode_workers: usize,
    /// ONNX Runtime intra-op threads (CPU).
    #[arg(long, default_value_t = 0)]
    flow_threads: usize,
    /// Hide progress bars.
    #[arg(long)]
    quiet: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Prep(a) => {
            let config = DatasetConfig::load(&a.config)?;
            let root = match a
                .root
                .or_else(|| config.default_root.clone().map(PathBuf::from))
            {
                Some(r) => r,
                None => anyhow::bail!(
                    "--root is required: config {} has no default_root",
                    a.config.display()
                ),
            };
            let threads = if a.flow_threads == 0 {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            } else {
                a.flow_threads
            };
            let opts = PrepOptions {
                config,
                root,
                out: a.out,
                part_index: a.part_index,
                num_parts: a.num_parts,
                model_card: a.model,
                device: a.device,
                ort_lib: a.ort_lib,
                flow_group: a.flow_group,
                store_backward: a.store_backward,
                batch_size: a.batch_size,
                decode_workers: a.decode_workers,
                flow_threads: threads,
                show_progress: !a.quiet,
                max_pairs: a.max_pairs,
            };
            let s = run_prep(&opts).context("prep failed")?;
            eprintln!(
                "prep: {} pairs written, {} skipped, {} shards ({} resumed), {:.0} bytes/pair ({:.1}% of raw), {:.1} s; decode {:.2} pairs/s, flow {:.2} pairs/s, write {:.2} pairs/s",
                s.pairs_written,
                s.pairs_skipped,
                s.shards_total,
                s.shards_resumed,
                s.bytes_per_pair,
                100.0 * s.bytes_per_pair / s.raw_bytes_per_pair,
                s.wall_s,
                s.decode.per_s,
                s.flow.per_s,
                s.write.per_s
            );
            for sp in &s.skipped_pairs {
                eprintln!(
                    "skipped pair {} ({} t={} dt={}): {}",
                    sp.pair, sp.video, sp.t, sp.dt, sp.reason
                );
            }
            for sv in &s.skipped_videos {
                eprintln!("skipped video {}: {}", sv.path, sv.reason);
            }
            println!("{}", serde_json::to_string(&s)?);
        }
        Cmd::Inspect { store, json } => {
            let i = poodle_prep::inspect::inspect(&store)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                poodle_prep::inspect::print_inspection(&i);
            }
        }
        Cmd::Show {
            store,
            pair,
            out,
            flow_group,
        } => {
            poodle_prep::inspect::show(&store, pair, flow_group.as_deref(), &out)?;
            eprintln!("wrote {}", out.display());
        }
    }
    Ok(())
}
