//! Data parallel over real MPI processes (`mpirun -np 2`, Open MPI; poodle-train built with
//! `--features mpi`): two ranks with 2 pairs each train like one process with 4 pairs when
//! BatchNorm is synchronised, measurably not when it is not; killing one rank stops the job,
//! and the job resumes from rank 0's last checkpoint.

mod common;
use common::synthetic::{write_store, Motion, StoreSpec};
use common::tmpdir;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_poodle-train");

/// `mpirun` and an MPI-enabled build; `None` (skip; a failure under CI) otherwise.
fn mpirun() -> Option<PathBuf> {
    if !cfg!(feature = "mpi") {
        poodle_common::testenv::missing(
            "poodle-train built with --features mpi (make test builds it so)",
        );
        return None;
    }
    let found = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("mpirun"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.is_file());
    if found.is_none() {
        poodle_common::testenv::missing("mpirun on PATH (Debian: openmpi-bin)");
    }
    found
}

/// Per-pixel pseudo-random texture, different per channel and pair. Smooth content (a ramp,
/// a few sines) leaves the network at a point where a 1e-6 change of the input views moves
/// the backbone's gradients by 1e-3 (measured: the same shift the rounding of a two-rank sum
/// gives), so two computations of them cannot be compared; on high-entropy frames they agree
/// to 1e-5.
fn texture(c: usize, x: f32, y: f32, offset: f32) -> f32 {
    let (xi, yi) = (x.round() as i64 as u64, y.round() as i64 as u64);
    let mut h = (xi.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        ^ (yi.wrapping_mul(0xC2B2_AE3D_27D4_EB4F))
        ^ ((c as u64 + 1) << 32)
        ^ (offset as u64);
    h ^= h >> 29;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 32;
    (h % 256) as f32
}

/// A store of 16 translated pairs, big enough for the tiny preset's crops.
fn store(d: &Path) -> PathBuf {
    let p = d.join("store.zarr");
    write_store(
        &p,
        &StoreSpec {
            h: 72,
            w: 128,
            pairs: 16,
            per_shard: 4,
            motion: Motion::Translate(5.0, -3.0),
            pattern: texture,
            ..StoreSpec::default()
        },
    );
    p
}

/// Small enough that a step takes a fraction of a second on one core.
fn train_args(store: &Path, run: &Path, batch: usize, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--config",
        "tiny",
        "--quiet",
        "--set",
        "data.sampling={\"unit\":\"pair\",\"pairs_per_visit\":1,\"visits_per_pass\":1,\"keep_visits_together\":false}",
        "--set",
        "data.workers=1",
        "--set",
        "run.picture_every=null",
        "--set",
        "optim.warmup_epochs=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend([
        "--stores".into(),
        store.display().to_string(),
        "--run-dir".into(),
        run.display().to_string(),
        "--set".into(),
        format!("data.batch_size={batch}"),
    ]);
    for e in extra {
        a.extend(["--set".into(), e.to_string()]);
    }
    a
}

fn mpi_command(mpirun: &Path, np: usize, args: &[String]) -> Command {
    let mut c = Command::new(mpirun);
    c.args([
        "-np",
        &np.to_string(),
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .arg(BIN)
    .args(args)
    // Root in containers and CI; one thread per rank keeps the two ranks off each other's
    // core and makes a rank's arithmetic independent of the machine.
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    .env("RAYON_NUM_THREADS", "1");
    c
}

fn single_command(args: &[String]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args).env("RAYON_NUM_THREADS", "1");
    c
}

fn ok(o: Output, what: &str) -> Output {
    assert!(
        o.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    metric(run, "total")
}

/// `(step, value of key)` of every line of the run's metrics.jsonl.
fn metric(run: &Path, key: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v[key].as_f64().unwrap())
        })
        .collect()
}

/// Every tensor of the run's checkpoint of `step` (online, target, optimiser state).
fn checkpoint(run: &Path, step: u64) -> HashMap<String, Vec<f32>> {
    let file = run.join(format!("checkpoint-{step:08}.safetensors"));
    candle_core::safetensors::load(&file, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let t = t.to_dtype(candle_core::DType::F32).unwrap();
            (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
        .collect()
}

/// The weights every run starts from (online., target. as the checkpoint names them).
fn initial_weights(store: &Path) -> HashMap<String, Vec<f32>> {
    let cfg = config(&train_args(store, Path::new("unused"), 4, &[]));
    let l = poodle_train::run::Learner::new(&cfg, &candle_core::Device::Cpu).unwrap();
    let mut out = HashMap::new();
    for (prefix, map) in [("online", &l.online_map), ("target", &l.target_map)] {
        for (n, v) in poodle_train::model::named_vars(map) {
            let t = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            out.insert(format!("{prefix}.{n}"), t);
        }
    }
    out
}

/// The config `poodle-train train` resolves from `args`.
fn config(args: &[String]) -> poodle_train::config::TrainConfig {
    let sets: Vec<String> = args
        .windows(2)
        .filter(|w| w[0] == "--set")
        .map(|w| w[1].clone())
        .collect();
    poodle_train::config::TrainConfig::load("tiny", &sets).unwrap()
}

/// Largest |a - b| / max(max |b|, 1e-2) over the named tensors, with its name (the floor:
/// biases that start at 0 and move by a few lr steps would make any difference relative).
fn max_rel_diff(
    a: &HashMap<String, Vec<f32>>,
    b: &HashMap<String, Vec<f32>>,
    keys: &[&String],
) -> (f64, String) {
    let mut worst = (0.0, String::new());
    for k in keys {
        let (x, y) = (&a[*k], &b[*k]);
        let scale = f64::from(y.iter().fold(0f32, |m, v| m.max(v.abs()))).max(1e-2);
        let d = x
            .iter()
            .zip(y)
            .map(|(p, q)| f64::from((p - q).abs()))
            .fold(0.0, f64::max)
            / scale;
        if d > worst.0 {
            worst = (d, k.to_string());
        }
    }
    worst
}

#[test]
fn two_mpi_ranks_train_like_one_process_with_their_union() {
    let Some(mpirun) = mpirun() else { return };
    let d = tmpdir("dp-equiv");
    let store = store(&d);
    // Compared: the losses of two steps and the weights after the first. Two computations of
    // this run drift apart after that, one process against itself included. Measured on this
    // store: scaling the input views by 1 +- 1e-7 ... 1e-3 leaves the loss equal to 6e-8 (the
    // stem's BatchNorm makes the network scale-invariant, so only the rounding changes) and
    // moves the decoder's and dense projector's gradients by 1e-5 (L2, relative) in five of
    // six cases, but by 1e-3 (1e-2 of the largest entry) in one: a discrete event, such as a
    // ReLU input at the decoder's 2x4 resolution crossing zero, which one rounding-level
    // difference triggers in float32 (the rounding of a two-rank sum as well; without the
    // decoder's bottleneck the runs part at step 4 all the same). Measured
    // two ranks against one process: losses 5e-8, 5e-7, 1.7e-6 apart at steps 1-3, then 0.7%
    // at step 4; weights 4e-6 after step 1, 2.3e-3 after step 2. And
    // AdamW's first step divides each gradient entry by its own size, so entries near its eps
    // (1e-6 in the presets) turn rounding-level differences into lr-sized steps; eps 0.01
    // keeps that step smooth, so the weights compare the data-parallel machinery.
    let steps = [
        "run.max_steps=2",
        "run.checkpoint_every=1",
        "optim.eps=0.01",
    ];
    // One process with 4 pairs; two ranks with 2 each, SyncBN on (weights checked equal on
    // both ranks at step 2), and off.
    let job = |name: &str, np: usize, extra: &[&str]| {
        let run = d.join(name);
        let mut opts = steps.to_vec();
        opts.extend_from_slice(extra);
        let args = train_args(&store, &run, 4 / np, &opts);
        let mut cmd = if np == 1 {
            single_command(&args)
        } else {
            mpi_command(&mpirun, np, &args)
        };
        ok(cmd.output().unwrap(), name);
        run
    };
    let one = job("one", 1, &[]);
    let two = job("two", 2, &["dist.check_every=2"]);
    let nosync = job("nosync", 2, &["dist.sync_bn=false"]);

    let (l1, l2) = (losses(&one), losses(&two));
    assert_eq!(l1.len(), 2);
    assert_eq!(
        l1.iter().map(|s| s.0).collect::<Vec<_>>(),
        l2.iter().map(|s| s.0).collect::<Vec<_>>()
    );
    for ((s, a), (_, b)) in l1.iter().zip(&l2) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "step {s}: one process {a}, two ranks {b}"
        );
    }
    // The collapse metric is a statistic of the global batch too (a std of each rank's two
    // rows alone, averaged, logged 0.084 where one process logs 0.100).
    let (s1, s2) = (metric(&one, "proj_std"), metric(&two, "proj_std"));
    for ((s, a), (_, b)) in s1.iter().zip(&s2) {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs(),
            "step {s}: proj_std of one process {a}, two ranks {b}"
        );
    }
    let (c1, c2, c3) = (
        checkpoint(&one, 1),
        checkpoint(&two, 1),
        checkpoint(&nosync, 1),
    );
    let weights: Vec<&String> = c1
        .keys()
        .filter(|k| k.starts_with("online.") || k.starts_with("target."))
        .collect();
    assert!(weights.len() > 50, "{} tensors", weights.len());
    let (synced, at) = max_rel_diff(&c2, &c1, &weights);
    eprintln!("two ranks vs one process, largest relative weight difference: {synced:.2e} ({at})");
    assert!(synced < 1e-4, "{at}: {synced}");
    // Without SyncBN each rank normalises with 2 pairs: BatchNorm statistics (and so
    // everything downstream) move away from the 4-pair run.
    let stats: Vec<&String> = weights
        .iter()
        .copied()
        .filter(|k| k.ends_with("running_mean"))
        .collect();
    let (apart, _) = max_rel_diff(&c3, &c1, &stats);
    eprintln!("without SyncBN, largest relative running-mean difference: {apart:.2e}");
    assert!(
        apart > 1e-2 && apart > 100.0 * synced,
        "{apart} vs {synced}"
    );
    // The step moved the weights far more than the tolerance, so the match is not trivial.
    let (moved, _) = max_rel_diff(&c1, &initial_weights(&store), &weights);
    assert!(
        moved > 1e-2,
        "the first step moved the weights by {moved:.2e} only"
    );
    let l3 = losses(&nosync);
    assert!(l3
        .iter()
        .zip(&l1)
        .skip(1)
        .any(|(a, b)| (a.1 - b.1).abs() > 1e-3 * b.1.abs()));
}

/// The pid of rank `rank` among `mpirun`'s children running our binary on `run`.
fn rank_pid(run: &Path, rank: usize) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let has =
            |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
        if has(&cmd, &run.display().to_string())
            && has(&cmd, "poodle-train")
            && !has(&cmd, "mpirun")
            && has(&env, &format!("OMPI_COMM_WORLD_RANK={rank}\0"))
        {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_killed_rank_stops_the_job_and_the_job_resumes() {
    let Some(mpirun) = mpirun() else { return };
    let d = tmpdir("dp-kill");
    let store = store(&d);
    let run = d.join("run");
    let args = train_args(
        &store,
        &run,
        2,
        &["run.max_steps=10", "run.checkpoint_every=2"],
    );
    let mut job = mpi_command(&mpirun, 2, &args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first checkpoint, then kill rank 1.
    let t0 = Instant::now();
    while !run.join("latest.json").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint after 300 s"
        );
        assert!(
            job.try_wait().unwrap().is_none(),
            "the job ended before its first checkpoint"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = rank_pid(&run, 1).expect("rank 1's process");
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let t1 = Instant::now();
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(60),
            "rank 0 went on after rank 1 died"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(job.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(
        !status.success(),
        "the job reported success after a rank was killed"
    );
    let stopped_at = losses(&run).last().map_or(0, |s| s.0);
    assert!(
        stopped_at < 10,
        "the job finished all 10 steps although rank 1 was killed: {err}"
    );
    // The same command resumes from rank 0's last checkpoint and finishes.
    let o = ok(
        mpi_command(&mpirun, 2, &args).output().unwrap(),
        "resumed job",
    );
    let run_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("run.json")).unwrap()).unwrap();
    let from = run_json["resumed_from_step"]
        .as_u64()
        .expect("resumed_from_step");
    assert!(from >= 2 && from.is_multiple_of(2), "{from}");
    let steps: Vec<u64> = losses(&run).iter().map(|s| s.0).collect();
    assert_eq!(
        steps,
        (1..=10).collect::<Vec<_>>(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(run_json["world_size"], 2);
}

/// The same maths without processes: two threads as ranks (shared-memory collectives), each
/// with its share of the batch through the real loader, give the gradients of one learner on
/// the whole batch once averaged, when BatchNorm is synchronised.
#[test]
fn two_thread_ranks_give_the_gradients_of_the_union() {
    use poodle_train::config::TrainConfig;
    use poodle_train::data::loader::Shard;
    use poodle_train::dist::{average_gradients, local::LocalGroup, sync_bn, Collective};
    use poodle_train::optim::Grads;
    use poodle_train::run::{open_loader_shard, Learner};
    use std::sync::Arc;
    let d = tmpdir("dp-threads");
    let store = store(&d);
    let mut cfg = config(&train_args(&store, &d.join("unused"), 4, &[]));
    cfg.data.stores = vec![store.clone()];
    let dev = candle_core::Device::Cpu;
    // The gradients of the first batch, averaged over ranks with `group`.
    let grads_of = |cfg: &TrainConfig, shard: Shard, group: Option<&dyn Collective>| -> Grads {
        let loader = open_loader_shard(cfg, &dev, shard).unwrap();
        let batch = loader.epoch(0).next().unwrap().unwrap();
        let l = Learner::new(cfg, &dev).unwrap();
        let (tot, ..) = l.losses(&batch).unwrap();
        let mut g = Grads::from_store(&tot.backward().unwrap(), l.online_params());
        if let Some(group) = group {
            average_gradients(&mut g, group, 1 << 20).unwrap();
        }
        g
    };
    let whole = grads_of(&cfg, Shard::default(), None);
    let mut half = cfg.clone();
    half.data.batch_size = 2;
    let groups: Vec<Arc<dyn Collective>> = LocalGroup::new(2)
        .into_iter()
        .map(|g| Arc::new(g) as Arc<dyn Collective>)
        .collect();
    let ranks: Vec<Grads> = std::thread::scope(|s| {
        let hs: Vec<_> = groups
            .iter()
            .enumerate()
            .map(|(rank, g)| {
                let (g, half, grads_of) = (g.clone(), &half, &grads_of);
                s.spawn(move || {
                    let _scope = sync_bn::scope(Some(g.clone()));
                    grads_of(half, Shard { rank, world: 2 }, Some(g.as_ref()))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Relative to each tensor's largest entry, with a floor of 1e-3: biases followed by
    // BatchNorm have a true gradient of 0 (rounding noise of 1e-8 here).
    let mut worst = (0.0f64, String::new());
    for (name, w) in whole.iter() {
        let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let r: Vec<f32> = ranks[0]
            .get(name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let other: Vec<f32> = ranks[1]
            .get(name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(r, other, "{name}: the ranks' averaged gradients differ");
        let scale = f64::from(w.iter().fold(0f32, |m, v| m.max(v.abs())));
        let diff = w
            .iter()
            .zip(&r)
            .map(|(a, b)| f64::from((a - b).abs()))
            .fold(0.0, f64::max);
        let rel = diff / scale.max(1e-3);
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    eprintln!(
        "two thread ranks vs one batch, largest relative gradient difference: {:.2e} ({})",
        worst.0, worst.1
    );
    assert!(worst.0 < 1e-4, "{} differs by {:.2e}", worst.1, worst.0);
}
