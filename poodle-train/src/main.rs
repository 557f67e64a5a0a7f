//! poodle-train: PooDLe pre-training on poodle-prep stores.

use anyhow::Result;
use clap::{Parser, Subcommand};
use poodle_common::store::PoodleStore;
use poodle_train::config::TrainConfig;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "poodle-train",
    version,
    about = "PooDLe pre-training on poodle-prep stores"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pre-train. The run prints its git sha and full config, logs JSON lines to
    /// RUN_DIR/metrics.jsonl and checkpoints atomically to RUN_DIR. A RUN_DIR that holds a
    /// checkpoint is continued from it (auto-resume).
    Train {
        #[command(flatten)]
        config: ConfigArgs,
        /// Refuse a RUN_DIR that already holds a run instead of continuing it.
        #[arg(long)]
        no_resume: bool,
        /// Continue RUN_DIR's run (the default; kept for older scripts).
        #[arg(long, hide = true)]
        resume: bool,
        /// Print only the JSON metric lines (also in RUN_DIR/metrics.jsonl) and the summary;
        /// otherwise a progress bar on a terminal, a plain line every run.log_every steps
        /// without one.
        #[arg(long)]
        quiet: bool,
    },
    /// Print the resolved training configuration as JSON (the object a run writes to
    /// RUN_DIR/config.json), e.g. `config show --config ablation --set optim.lr=2e-3`.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Export a checkpoint's backbone for other frameworks.
    Export {
        /// Only `torchvision` (resnet keys and shapes; load with strict=True after
        /// `m.fc = torch.nn.Identity()`).
        #[arg(long, default_value = "torchvision")]
        format: String,
        /// A run folder (its latest checkpoint) or a checkpoint .safetensors file.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The online encoder (default; what PooDLe evaluates) or the EMA target.
        #[arg(long, value_enum)]
        which: Option<poodle_train::export::Which>,
        /// Output .safetensors file.
        out: PathBuf,
    },
    /// Measure the data loader: pairs/s per core at a run's configuration (default the
    /// paper's: 512x1024 crops, K = 6 subcrops of 192 px, full augmentation), beside the
    /// store reads alone; prints JSON. Build with --release.
    BenchLoader {
        #[command(flatten)]
        config: ConfigArgs,
        /// Cores (rayon threads) building batches.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Batches timed, after --warmup untimed ones.
        #[arg(long, default_value_t = 8)]
        batches: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
    },
    /// Parity of the cuDNN ops and of one training step against the CPU, then the ResNet-50
    /// trunk and full-step benchmarks (what `make gpu-check` runs on a GPU; CUDA builds, or
    /// `--device cpu` for the control flow only).
    GpuCheck(poodle_train::gpucheck::GpuCheckArgs),
    /// Pictures of what the objective asks the model to match, for the first pairs of a pass:
    /// crops with subcrop boxes, the dense mask, both views, and the target warped into the
    /// online frame by the flow and the affines as the loss sees it (one PNG per pair).
    ShowBatch {
        #[command(flatten)]
        config: ConfigArgs,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Pairs to draw.
        #[arg(long, default_value_t = 4)]
        pairs: usize,
        /// Pass (epoch of the loader) to draw them from.
        #[arg(long, default_value_t = 0)]
        pass: u64,
    },
    /// PNG curves of runs' metrics.jsonl (one panel per loss term, lr, mask fraction,
    /// projection std, gradient norm and pairs/s; runs overlaid), for a user without
    /// TensorBoard.
    Plot {
        /// Run folders (or metrics.jsonl files); each is one colour in every panel.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Output PNG.
        #[arg(long, default_value = "curves.png")]
        out: PathBuf,
    },
    /// Open stores as the trainer will and report pairs and flow groups.
    CheckStores { stores: Vec<PathBuf> },
    /// Downstream evaluation of a checkpoint's encoder.
    Eval {
        #[command(subcommand)]
        cmd: EvalCmd,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// The preset or file with the overrides applied, validated.
    Show(ConfigArgs),
}

/// A training configuration: preset or file, then overrides.
#[derive(clap::Args)]
struct ConfigArgs {
    /// A preset (paper, ablation, walking_tours, tiny), a JSON config file, or a run folder
    /// (its config.json).
    #[arg(long, default_value = "paper")]
    config: String,
    /// Overrides, e.g. --set optim.lr=1e-3 --set method.pooled=false
    /// --set data.stores='["out/bdd"]' (values are JSON, else strings).
    #[arg(long = "set")]
    overrides: Vec<String>,
    /// Stores or folders of stores (replaces data.stores).
    #[arg(long)]
    stores: Vec<PathBuf>,
    /// Run folder (replaces run.dir).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// cpu or cuda:N (replaces device).
    #[arg(long)]
    device: Option<String>,
    /// Start from these weights: safetensors (e.g. an export), a torchvision .pth such as
    /// ImageNet-supervised ResNet-50 (the paper's BDD* rows), or a full checkpoint.
    #[arg(long)]
    init: Option<PathBuf>,
}

impl ConfigArgs {
    fn resolve(self) -> Result<TrainConfig> {
        let mut overrides = self.overrides;
        if !self.stores.is_empty() {
            overrides.push(format!(
                "data.stores={}",
                serde_json::to_string(&self.stores)?
            ));
        }
        if let Some(d) = self.run_dir {
            overrides.push(format!("run.dir={}", serde_json::to_string(&d)?));
        }
        if let Some(d) = self.device {
            overrides.push(format!("device={}", serde_json::to_string(&d)?));
        }
        if let Some(p) = self.init {
            overrides.push(format!("init={}", serde_json::to_string(&p)?));
        }
        TrainConfig::load(&self.config, &overrides)
    }
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Linear readout for semantic segmentation: frozen backbone and decoder, a trained 1x1
    /// convolution; reports mIoU, pixel accuracy, IoU per class and the paper's class groups
    /// (table, or JSON with --json; OUT/report.json, OUT/report.md and PNGs always).
    Linear(poodle_train::eval::LinearArgs),
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Train {
            config,
            no_resume,
            resume: _,
            quiet,
        } => {
            let cfg = config.resolve()?;
            let s = poodle_train::run::train(&cfg, !no_resume, quiet)?;
            println!("{}", serde_json::to_string(&s)?);
        }
        Cmd::Config {
            cmd: ConfigCmd::Show(c),
        } => {
            println!("{}", serde_json::to_string_pretty(&c.resolve()?)?);
        }
        Cmd::Export {
            format,
            checkpoint,
            which,
            out,
        } => {
            anyhow::ensure!(
                format == "torchvision",
                "--format {format:?}: only torchvision is supported"
            );
            let r = poodle_train::export::export_torchvision(
                &checkpoint,
                which.unwrap_or_default(),
                &out,
            )?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Cmd::BenchLoader {
            config,
            threads,
            batches,
            warmup,
        } => {
            let cfg = config.resolve()?;
            let r = poodle_train::loaderbench::bench_loader(&cfg, threads, batches, warmup)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        Cmd::ShowBatch {
            config,
            out,
            pairs,
            pass,
        } => {
            let cfg = config.resolve()?;
            let files = poodle_train::pictures::show_pairs(&cfg, pass, pairs, &out)?;
            anyhow::ensure!(!files.is_empty(), "no readable pair to draw");
        }
        Cmd::GpuCheck(args) => poodle_train::gpucheck::run(&args)?,
        Cmd::Plot { runs, out } => {
            let (w, h) = poodle_train::plot::plot_runs(&runs, &out)?;
            eprintln!("{}: {w}x{h}, {} runs", out.display(), runs.len());
        }
        Cmd::CheckStores { stores } => {
            let mut total = 0;
            for p in &stores {
                let s = PoodleStore::open(p)?;
                let groups: Vec<&str> = s.flow_groups.iter().map(|(g, _)| g.as_str()).collect();
                println!(
                    "{}: {} pairs, flow groups {:?}",
                    p.display(),
                    s.num_pairs(),
                    groups
                );
                total += s.num_pairs();
            }
            println!("{total} pairs in {} stores", stores.len());
        }
        Cmd::Eval {
            cmd: EvalCmd::Linear(args),
        } => {
            poodle_train::eval::linear::run_cli(&args)?;
        }
    }
    Ok(())
}
