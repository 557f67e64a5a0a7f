//! One-off timing of the two decoder orders: forward + backward of `Encoder::dense`
//! (ResNet-50, full SDM, 4096-256 projector), batch 1, 256x512, training mode, CPU.
//!
//!     cargo run --release -p poodle-train --example decoder_order_timing [REPEATS]
//!
//! Prints the median seconds per order and their ratio, then the same for the decoder alone
//! on ResNet-50's stage shapes. Not a test: the numbers depend on the machine and its load.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use poodle_train::model::{Decoder, DecoderConfig, DecoderOrder, Encoder, ModelConfig, Stages};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let repeats: usize = std::env::args().nth(1).map_or(Ok(3), |s| s.parse())?;
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (1, 3, 256, 512), &dev)?;
    let mut encoders = Vec::new();
    for order in [DecoderOrder::Authors, DecoderOrder::Paper] {
        let cfg = ModelConfig::paper().with_decoder(DecoderConfig::full().with_order(order));
        let map = VarMap::new();
        let enc = Encoder::new(&cfg, VarBuilder::from_varmap(&map, DType::F32, &dev))?;
        encoders.push((order, enc, map));
    }
    let step = |enc: &Encoder| -> anyhow::Result<f64> {
        let t = Instant::now();
        let p = enc.dense(&x, true)?;
        let g = p.sqr()?.sum_all()?.backward()?;
        std::hint::black_box(g);
        Ok(t.elapsed().as_secs_f64())
    };
    let mut times = vec![Vec::new(); encoders.len()];
    // One untimed warm-up each, then interleaved repeats so that load changes hit both.
    for (_, enc, _) in &encoders {
        step(enc)?;
    }
    for _ in 0..repeats {
        for (i, (_, enc, _)) in encoders.iter().enumerate() {
            times[i].push(step(enc)?);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let mut med = Vec::new();
    for (i, (order, _, _)) in encoders.iter().enumerate() {
        let m = median(&mut times[i]);
        println!(
            "{order:?}: median {m:.3} s over {repeats} (all: {:?})",
            times[i]
        );
        med.push(m);
    }
    println!("paper / authors = {:.3}", med[1] / med[0]);

    // The decoder alone (forward + backward) on ResNet-50 stage shapes of a 256x512 input.
    let stages = Stages {
        c3: Var::randn(0f32, 1., (1, 512, 32, 64), &dev)?
            .as_tensor()
            .clone(),
        c4: Var::randn(0f32, 1., (1, 1024, 16, 32), &dev)?
            .as_tensor()
            .clone(),
        c5: Var::randn(0f32, 1., (1, 2048, 8, 16), &dev)?
            .as_tensor()
            .clone(),
    };
    let mut dec_med = Vec::new();
    for order in [DecoderOrder::Authors, DecoderOrder::Paper] {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let dec = Decoder::new(
            &DecoderConfig::full().with_order(order),
            [512, 1024, 2048],
            vb,
        )?;
        let run = || -> anyhow::Result<f64> {
            let t = Instant::now();
            let g = dec.forward_t(&stages, true)?.sqr()?.sum_all()?.backward()?;
            std::hint::black_box(g);
            Ok(t.elapsed().as_secs_f64())
        };
        run()?;
        let mut v = (0..repeats)
            .map(|_| run())
            .collect::<anyhow::Result<Vec<f64>>>()?;
        let m = median(&mut v);
        println!("decoder alone, {order:?}: median {m:.3} s (all: {v:?})");
        dec_med.push(m);
    }
    println!(
        "decoder alone: paper / authors = {:.3}",
        dec_med[1] / dec_med[0]
    );
    println!(
        "threads: {} (rayon), cores: {}",
        rayon::current_num_threads(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    Ok(())
}
