//! poodle-prep: prepare frame pairs, optical flow and occlusion from videos into Zarr stores.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use poodle_common::config::DatasetConfig;
use poodle_prep::flowmodel::Device;
use poodle_prep::flowstage::FlowModelOptions;
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
    /// Probe every video once and write the video and pair manifests under OUT/manifest/
    /// (run this before a job array so that its tasks do not all probe).
    Discover(DatasetArgs),
    /// Summarise a store: pairs, arrays, sizes, flow groups, statistics.
    Inspect {
        store: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Warn when a flow group's median occluded fraction is above this.
        #[arg(long, default_value_t = poodle_prep::quality::DEFAULT_MAX_OCCLUDED_MEDIAN)]
        max_occluded_median: f32,
    },
    /// Recompute flow and occlusion over a finished store with another model (no video
    /// decoding) into its own flow group; rerun to resume.
    Flow(FlowArgs),
    /// Accuracy of a flow model against ground truth: AEE, KITTI Fl-all, photometric error.
    EvalFlow(EvalFlowArgs),
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

/// Options shared by every command that runs a flow model.
#[derive(clap::Args)]
struct ModelArgs {
    /// Flow model card (JSON beside the ONNX file). The default computes TV-L1 flow from
    /// first principles; models/raft_small_random.json is RAFT-small with random weights
    /// (tests); export pretrained RAFT with tools/export_raft.py.
    #[arg(
        long,
        env = "POODLE_FLOW_MODEL",
        default_value = "models/tvl1_flow.json"
    )]
    model: PathBuf,
    /// cpu or cuda:N. An unavailable CUDA provider is an error, not a fallback.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// ONNX Runtime shared library (default: $ORT_DYLIB_PATH, then .venv's onnxruntime).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// ONNX Runtime intra-op threads on CPU (0: all cores).
    #[arg(long, default_value_t = 0)]
    flow_threads: usize,
    /// Run the model with plain host arrays instead of an ort I/O binding (inputs written
    /// into the session's input memory and bound once per batch, output copied back once).
    #[arg(long)]
    no_io_binding: bool,
}

impl ModelArgs {
    /// The model to load, writing `flow_group`; `--flow-threads 0` means every core.
    fn options(&self, flow_group: Option<String>) -> FlowModelOptions {
        let threads = if self.flow_threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            self.flow_threads
        };
        FlowModelOptions {
            card: self.model.clone(),
            device: self.device,
            ort_lib: self.ort_lib.clone(),
            threads,
            io_binding: !self.no_io_binding,
            flow_group,
        }
    }
}

/// What a flow job writes: shared by `prep` and `flow`.
#[derive(clap::Args)]
struct FlowOutputArgs {
    /// Name of the flow group (default: the model card's name).
    #[arg(long)]
    flow_group: Option<String>,
    /// Do not store the backward flow (t+dt -> t) and its occlusion (PooDLe's symmetric
    /// loss needs them; they are always computed for the forward occlusion).
    #[arg(long)]
    no_backward: bool,
    /// Pairs per flow batch (recommended: 4 on a GPU, 1-2 on CPU).
    #[arg(long, default_value_t = 2)]
    batch_size: usize,
    /// Warn (naming the model and the videos) when the store's median occluded fraction is
    /// above this.
    #[arg(long, default_value_t = poodle_prep::quality::DEFAULT_MAX_OCCLUDED_MEDIAN)]
    max_occluded_median: f32,
}

#[derive(clap::Args)]
struct FlowArgs {
    /// A finished store (one part).
    store: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    output: FlowOutputArgs,
    /// Hide progress bars.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct EvalFlowArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Folder with the known pairs (Middlebury RubberWhale, KITTI).
    #[arg(long, default_value = "../shared/data/flow")]
    data: PathBuf,
    /// Real videos without ground truth for the consistency check (occluded fraction,
    /// forward-backward and photometric error); skipped when absent.
    #[arg(long, default_value = "../shared/data/video")]
    videos: PathBuf,
    /// The dataset config whose frame size and gaps the video pairs follow.
    #[arg(long, default_value = "manifests/sample.json")]
    video_config: PathBuf,
    /// Pairs per video for the consistency check (0: none).
    #[arg(long, default_value_t = 4)]
    video_pairs: usize,
    /// Extra pairs: IMG1,IMG2,GT (GT: Middlebury .flo or KITTI 16-bit .png). Repeatable.
    #[arg(long, value_delimiter = ';')]
    pair: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Which dataset, where it is, and where its job writes (prep and discover).
#[derive(clap::Args)]
struct DatasetArgs {
    /// Dataset config (manifests/<name>.json).
    #[arg(long)]
    config: PathBuf,
    /// Dataset root (default: the config's default_root).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Output folder; stores are OUT/<name>-part-IIIII-of-NNNNN.zarr, manifests OUT/manifest/.
    #[arg(long)]
    out: PathBuf,
}

impl DatasetArgs {
    /// The config and the root (`--root`, else the config's `default_root`).
    fn load(&self) -> Result<(DatasetConfig, PathBuf)> {
        let config = DatasetConfig::load(&self.config)?;
        let root = match self
            .root
            .clone()
            .or_else(|| config.default_root.clone().map(PathBuf::from))
        {
            Some(r) => r,
            None => anyhow::bail!(
                "--root is required: config {} has no default_root",
                self.config.display()
            ),
        };
        Ok((config, root))
    }
}

#[derive(clap::Args)]
struct PrepArgs {
    // --- What ---
    #[command(flatten)]
    dataset: DatasetArgs,
    /// Use only the first N pairs of the manifest (quick checks).
    #[arg(long)]
    max_pairs: Option<usize>,

    // --- Flow ---
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    output: FlowOutputArgs,

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

    // --- Filters (skipped pairs are counted by kind in the summary) ---
    /// Skip near-static pairs: median forward flow below this many pixels (try 0.5).
    #[arg(long)]
    min_median_flow: Option<f32>,
    /// Skip pairs with a black frame or frozen (identical) frames.
    #[arg(long)]
    drop_degenerate: bool,
    /// Hide progress bars.
    #[arg(long)]
    quiet: bool,
}

/// The real-video consistency rows of `eval-flow` (no ground truth).
fn print_clips(clips: &[poodle_prep::evalflow::ClipConsistency]) {
    if clips.is_empty() {
        return;
    }
    println!(
        "{:<28} {:>9} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "video (no ground truth)",
        "size",
        "pairs",
        "occ med",
        "occ mean",
        "fb med",
        "photo md",
        "photo0",
        "time s"
    );
    for c in clips {
        println!(
            "{:<28} {:>9} {:>5} {:>8.3} {:>8.3} {:>8.3} {:>8.2} {:>8.2} {:>8.2}",
            c.video,
            format!("{}x{}", c.size[1], c.size[0]),
            c.pairs.len(),
            c.occluded_frac.median,
            c.occluded_frac.mean,
            c.fb_error.median,
            c.photometric_error.median,
            c.photometric_zero.median,
            c.seconds
        );
    }
    println!("occ: occluded fraction (forward-backward check); fb: forward-backward error px; photo: photometric error over non-occluded pixels; photo0: with zero flow over all pixels");
}

/// The end-of-job quality table and its warning, on stderr (stdout carries the JSON).
fn report_quality(q: &poodle_prep::quality::GroupQuality) {
    for line in poodle_prep::quality::quality_lines(q) {
        eprintln!("{line}");
    }
    if let Some(w) = &q.warning {
        eprintln!("warning: {w}");
    }
}

fn check_model_tools() -> Result<()> {
    poodle_prep::tools::check_ffmpeg()?;
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Prep(a) => prep(a)?,
        Cmd::Flow(a) => flow(a)?,
        Cmd::EvalFlow(a) => eval_flow(a)?,
        Cmd::Discover(d) => discover(d)?,
        Cmd::Inspect {
            store,
            json,
            max_occluded_median,
        } => {
            let i = poodle_prep::inspect::inspect(&store, max_occluded_median)?;
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

/// `prep`: one part of a dataset, then its summary (stderr) and JSON report (stdout).
fn prep(a: PrepArgs) -> Result<()> {
    let (config, root) = a.dataset.load()?;
    let opts = PrepOptions {
        config,
        root,
        out: a.dataset.out,
        part_index: a.part_index,
        num_parts: a.num_parts,
        model: a.model.options(a.output.flow_group),
        store_backward: !a.output.no_backward,
        batch_size: a.output.batch_size,
        decode_workers: a.decode_workers,
        show_progress: !a.quiet,
        max_pairs: a.max_pairs,
        min_median_flow: a.min_median_flow,
        drop_degenerate: a.drop_degenerate,
        max_occluded_median: a.output.max_occluded_median,
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
    report_quality(&s.flow_quality);
    println!("{}", serde_json::to_string(&s)?);
    Ok(())
}

/// `flow`: another model's flow over a finished store.
fn flow(a: FlowArgs) -> Result<()> {
    let opts = poodle_prep::reflow::ReflowOptions {
        store: a.store,
        model: a.model.options(a.output.flow_group),
        store_backward: !a.output.no_backward,
        batch_size: a.output.batch_size,
        show_progress: !a.quiet,
        max_occluded_median: a.output.max_occluded_median,
    };
    let s = poodle_prep::reflow::run_reflow(&opts).context("flow failed")?;
    eprintln!(
        "flow: group {} over {}: {} pairs flowed, {} shards ({} resumed), {} bytes, {:.1} s",
        s.flow_group,
        s.store,
        s.pairs_flowed,
        s.shards_total,
        s.shards_resumed,
        s.group_bytes,
        s.wall_s
    );
    report_quality(&s.flow_quality);
    println!("{}", serde_json::to_string(&s)?);
    Ok(())
}

/// `eval-flow`: a flow model against ground truth and on real clips.
fn eval_flow(a: EvalFlowArgs) -> Result<()> {
    use poodle_prep::evalflow::{eval_pair, known_pairs};
    let mut pairs = known_pairs(&a.data);
    for p in &a.pair {
        let parts: Vec<&str> = p.split(',').collect();
        anyhow::ensure!(parts.len() == 3, "--pair {p:?}: expected IMG1,IMG2,GT");
        pairs.push((
            std::path::Path::new(parts[0])
                .file_stem()
                .map_or(p.clone(), |s| s.to_string_lossy().into_owned()),
            parts[0].into(),
            parts[1].into(),
            parts[2].into(),
        ));
    }
    let use_videos = a.video_pairs > 0 && a.videos.is_dir();
    anyhow::ensure!(
        !pairs.is_empty() || use_videos,
        "no pairs: {} has none of the known files, {} is not a folder and no --pair was given",
        a.data.display(),
        a.videos.display()
    );
    check_model_tools()?;
    let mut model = a.model.options(None).load()?;
    let mut rows = Vec::new();
    for (name, i1, i2, gt) in &pairs {
        rows.push(eval_pair(&mut model, name, i1, i2, gt)?);
    }
    let clips = if use_videos {
        let cfg = DatasetConfig::load(&a.video_config)?;
        poodle_prep::evalflow::eval_clips(&mut model, &cfg, &a.videos, a.video_pairs)
            .with_context(|| format!("consistency check on {}", a.videos.display()))?
    } else {
        vec![]
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"model": model.card.name, "model_sha256": model.model_sha256, "pairs": rows, "videos": clips})
            )?
        );
    } else {
        println!("model {} ({})", model.card.name, a.model.model.display());
        println!(
            "{:<24} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "pair", "size", "AEE px", "Fl-all %", "photo", "photo0", "photoGT", "time s"
        );
        for r in &rows {
            println!(
                "{:<24} {:>10} {:>8.3} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8.2}",
                r.name,
                format!("{}x{}", r.size[1], r.size[0]),
                r.aee,
                r.fl_all,
                r.photometric_pred,
                r.photometric_zero,
                r.photometric_gt,
                r.seconds
            );
        }
        println!("photo: mean |frame1 - warp(frame2)| (0-255) with the predicted flow; photo0 with zero flow; photoGT with the ground truth where it is valid");
        print_clips(&clips);
    }
    Ok(())
}

/// `discover`: the manifest, the pairs and the disk estimate, before a job array.
fn discover(d: DatasetArgs) -> Result<()> {
    let (cfg, root) = d.load()?;
    let out = d.out;
    poodle_prep::tools::check_ffmpeg()?;
    let mp = indicatif::MultiProgress::new();
    let m = poodle_prep::pipeline::load_or_probe(&cfg, &root, &out, &mp)?;
    let (pairs, skipped) = poodle_common::manifest::sample_pairs(&cfg, &m.videos);
    for s in m.skipped.iter().chain(&skipped) {
        eprintln!("skipped video {}: {}", s.path, s.reason);
    }
    let pair_videos: Vec<u32> = pairs.iter().map(|p| p.video).collect();
    let plan = poodle_prep::plan::plan(&cfg, m.videos.len(), &pair_videos, &out);
    eprintln!(
        "{} pairs from {} videos ({}-{} per video), about {} on disk ({} per pair, {})",
        plan.pairs,
        plan.videos,
        plan.pairs_per_video_min,
        plan.pairs_per_video_max,
        poodle_prep::plan::human_bytes(plan.total_bytes),
        poodle_prep::plan::human_bytes(plan.bytes_per_pair),
        plan.measured_from
            .as_deref()
            .map_or("poodle's reference measurement".to_string(), |s| format!(
                "measured on {s}"
            ))
    );
    println!(
        "{}",
        serde_json::json!({"videos": m.videos.len(), "videos_skipped": m.skipped.len() + skipped.len(), "pairs": pairs.len(), "manifest": out.join("manifest"), "disk": plan})
    );
    Ok(())
}
