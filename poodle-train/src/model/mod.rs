//! The PooDLe networks on candle: ResNet backbone with torchvision names ([`resnet`]), the
//! spatial decoder module ([`decoder`]), projector and predictor MLPs ([`heads`]), and the
//! layers they share ([`layers`]: BatchNorm with running statistics, the stem max-pool and
//! [`upsample_bilinear`], all with a backward pass).
//!
//! # Networks and names
//! The online network is [`Online`] = [`Encoder`] + [`Predictors`]; the target is an
//! [`Encoder`] alone (EMA of the online encoder). Built from `VarBuilder::from_varmap`, the
//! names in the map are (no prefix of their own; put online and target in two maps):
//!
//! | prefix | module |
//! | --- | --- |
//! | `backbone.` | ResNet, torchvision names below it (`backbone.layer1.0.conv1.weight`) |
//! | `decoder.blocks.{0,1}.{bottleneck,lateral}.` | spatial decoder (if enabled; [`decoder`] maps the authors' names) |
//! | `dense_projector.net.{0,1,3}.` | 1x1 conv, BN2d, 1x1 conv |
//! | `pooled_projector.net.{0,1,3}.` | linear, BN1d, linear |
//! | `dense_predictor.net.{0,1,3}.` | online only |
//! | `pooled_predictor.net.{0,1,3}.` | online only |
//!
//! The target map's names are exactly the online map's names minus the predictors, so an EMA
//! is a loop over the target map's names.
//!
//! # Parameters and buffers
//! BatchNorm running statistics (`*.running_mean`, `*.running_var`) are [`Var`]s in the same
//! map as the parameters: `VarMap::save`/`load` carry them and BN's training forward updates
//! them in place. They never get gradients, and an optimiser must skip them (weight decay
//! would shrink them): use [`trainable_vars`] (or [`is_buffer`]). Weight decay exclusion
//! (biases and BN weight/bias, i.e. every trainable tensor of rank 1): [`param_kind`].
//! `num_batches_tracked` is not kept.
//!
//! # Which features feed which objective
//! * [`Encoder::dense`]: the dense projector on the decoder output (C5's channels at stride 8,
//!   paper Figure 3b), or on C5 itself when the decoder is disabled (FlowE with a dilated
//!   backbone: stride 8; without dilation: stride 32, the Figure 3a baseline).
//! * [`Encoder::pooled`]: C5 (the top encoder level, Figure 3b), spatially averaged, then the
//!   pooled projector (BYOL: average pool, then linear MLP). The paper's wording "each
//!   projection p is averaged-pooled" describes the same objective with BYOL's linear
//!   projector; pooling first is what a linear projector on pooled features means. The
//!   pooled path never runs the decoder.

pub mod decoder;
pub mod heads;
pub mod init;
pub mod layers;
pub mod relu;
pub mod resnet;
pub mod sync_bn_fused;

pub use decoder::{Decoder, DecoderConfig, DecoderOrder};
pub use heads::{HeadKind, Mlp};
pub use layers::{global_avg_pool, max_pool_3x3_s2, BatchNorm};
pub use resnet::{BlockKind, ResNet, ResNetConfig, Stages};

use candle_core::{ModuleT, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

/// Bilinear resize of an NCHW tensor to `h x w`, equal to PyTorch's
/// `F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)` without
/// antialiasing (upsampling and downsampling alike). Implemented as two matmuls with fixed
/// interpolation matrices, so it has a backward pass in candle.
pub fn upsample_bilinear(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    layers::upsample_bilinear(x, h, w)
}

/// The backbone architecture. Serialised as `"resnet18"`, `"resnet50"` or
/// `{"custom": ResNetConfig}` (small test networks).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backbone {
    Resnet18,
    Resnet50,
    Custom(ResNetConfig),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub backbone: Backbone,
    pub decoder: DecoderConfig,
    /// FlowE's dilated layer3/layer4 (C5 at stride 8); for the runs without decoder. This
    /// flag decides dilation (a custom backbone's own `dilated` is overridden).
    #[serde(default)]
    pub dilated: bool,
    /// Hidden width of projectors and predictors (4096).
    pub proj_hidden: usize,
    /// Output width of projectors and predictors (256).
    pub proj_out: usize,
}

impl ModelConfig {
    /// ResNet-50, full SDM, 2048-4096-256 projectors, 256-4096-256 predictors.
    pub fn paper() -> Self {
        Self {
            backbone: Backbone::Resnet50,
            decoder: DecoderConfig::full(),
            dilated: false,
            proj_hidden: 4096,
            proj_out: 256,
        }
    }

    /// ResNet-18 with the full SDM (512 channels, inner 64), hidden 256, out 64.
    pub fn tiny() -> Self {
        Self {
            backbone: Backbone::Resnet18,
            decoder: DecoderConfig::full(),
            dilated: false,
            proj_hidden: 256,
            proj_out: 64,
        }
    }

    /// FlowE / Table 4 rows 1-2: dilated ResNet-50, no decoder.
    pub fn flowe() -> Self {
        Self {
            decoder: DecoderConfig::disabled(),
            dilated: true,
            ..Self::paper()
        }
    }

    pub fn with_decoder(mut self, decoder: DecoderConfig) -> Self {
        self.decoder = decoder;
        self
    }

    /// The backbone's configuration with this config's dilation.
    pub fn resnet(&self) -> ResNetConfig {
        let r = match &self.backbone {
            Backbone::Resnet18 => ResNetConfig::resnet18(),
            Backbone::Resnet50 => ResNetConfig::resnet50(),
            Backbone::Custom(c) => c.clone(),
        };
        r.with_dilation(self.dilated)
    }

    /// Channels of C5, which is also the decoder's width.
    pub fn feature_channels(&self) -> usize {
        self.resnet().stage_channels()[2]
    }

    /// Stride of [`Encoder::dense`]'s output: 8 with the decoder or a dilated backbone, else
    /// 32.
    pub fn dense_stride(&self) -> usize {
        if self.decoder.enabled || self.dilated {
            8
        } else {
            32
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.decoder.enabled && self.dilated {
            candle_core::bail!("the decoder upsamples C5 from stride 32; use it without dilation");
        }
        if self.decoder.enabled && !(self.decoder.top_down || self.decoder.lateral) {
            candle_core::bail!("an enabled decoder needs top_down or lateral");
        }
        if self.proj_hidden == 0 || self.proj_out == 0 {
            candle_core::bail!("projector widths must be positive");
        }
        Ok(())
    }
}

/// Backbone, decoder and the two projectors: the function `p = f(x)` of the paper, with
/// online or target (EMA) weights.
#[derive(Clone, Debug)]
pub struct Encoder {
    backbone: ResNet,
    decoder: Option<Decoder>,
    dense_projector: Mlp,
    pooled_projector: Mlp,
    cfg: ModelConfig,
}

impl Encoder {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let rc = cfg.resnet();
        let backbone = ResNet::new(&rc, vb.pp("backbone"))?;
        let channels = rc.stage_channels();
        let decoder = if cfg.decoder.enabled {
            Some(Decoder::new(&cfg.decoder, channels, vb.pp("decoder"))?)
        } else {
            None
        };
        let c = channels[2];
        let (h, o) = (cfg.proj_hidden, cfg.proj_out);
        Ok(Self {
            backbone,
            decoder,
            dense_projector: Mlp::new(HeadKind::Dense, c, h, o, vb.pp("dense_projector"))?,
            pooled_projector: Mlp::new(HeadKind::Pooled, c, h, o, vb.pp("pooled_projector"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn backbone(&self) -> &ResNet {
        &self.backbone
    }

    /// C3, C4, C5 of an NCHW image batch.
    pub fn stages(&self, x: &Tensor, train: bool) -> Result<Stages> {
        self.backbone.forward_stages(x, train)
    }

    /// The features the dense objective (and the linear readout) uses: the decoder output,
    /// or C5 without decoder. `(N, C5 channels, H/s, W/s)` with `s = cfg.dense_stride()`.
    pub fn dense_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let stages = self.stages(x, train)?;
        match &self.decoder {
            Some(d) => d.forward_t(&stages, train),
            None => Ok(stages.c5),
        }
    }

    /// Dense projection `(N, proj_out, H/8, W/8)` (stride per `cfg.dense_stride()`).
    pub fn dense(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.dense_projector
            .forward_t(&self.dense_features(x, train)?, train)
    }

    /// Spatially averaged C5, `(N, C5 channels)`.
    pub fn pooled_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        global_avg_pool(&self.backbone.forward_t(x, train)?)
    }

    /// Pooled projection `(N, proj_out)`.
    pub fn pooled(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.pooled_projector
            .forward_t(&self.pooled_features(x, train)?, train)
    }
}

/// The online predictors `q`: dense (1x1 convs) and pooled (linear), both
/// `proj_out -> proj_hidden -> proj_out`.
#[derive(Clone, Debug)]
pub struct Predictors {
    pub dense: Mlp,
    pub pooled: Mlp,
}

impl Predictors {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (h, o) = (cfg.proj_hidden, cfg.proj_out);
        Ok(Self {
            dense: Mlp::new(HeadKind::Dense, o, h, o, vb.pp("dense_predictor"))?,
            pooled: Mlp::new(HeadKind::Pooled, o, h, o, vb.pp("pooled_predictor"))?,
        })
    }

    /// `q(p)` on a dense projection `(N, out, h, w)`.
    pub fn dense(&self, p: &Tensor, train: bool) -> Result<Tensor> {
        self.dense.forward_t(p, train)
    }

    /// `q(p)` on a pooled projection `(N, out)`.
    pub fn pooled(&self, p: &Tensor, train: bool) -> Result<Tensor> {
        self.pooled.forward_t(p, train)
    }
}

/// The online network: encoder and predictors under one builder (one `VarMap`).
#[derive(Clone, Debug)]
pub struct Online {
    pub encoder: Encoder,
    pub predictors: Predictors,
}

impl Online {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            encoder: Encoder::new(cfg, vb.clone())?,
            predictors: Predictors::new(cfg, vb)?,
        })
    }
}

/// How the optimiser treats a named tensor of a model map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Conv and linear weights: trained, with weight decay.
    Weight,
    /// Biases and BN weight/bias (rank 1): trained, no weight decay.
    NoDecay,
    /// BN running statistics: not trained (no gradient), copied or averaged by the EMA.
    Buffer,
}

/// True for BN running statistics.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with(".running_mean")
        || name.ends_with(".running_var")
        || name == "running_mean"
        || name == "running_var"
}

pub fn param_kind(name: &str, var: &Var) -> ParamKind {
    if is_buffer(name) {
        ParamKind::Buffer
    } else if var.rank() <= 1 {
        ParamKind::NoDecay
    } else {
        ParamKind::Weight
    }
}

/// Every variable of a map (parameters and buffers), sorted by name.
pub fn named_vars(map: &VarMap) -> Vec<(String, Var)> {
    let data = map.data().lock().expect("VarMap lock");
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The parameters an optimiser updates (everything but BN running statistics), sorted by
/// name.
pub fn trainable_vars(map: &VarMap) -> Vec<(String, Var)> {
    named_vars(map)
        .into_iter()
        .filter(|(n, _)| !is_buffer(n))
        .collect()
}

/// Sets every variable of `dst` to the value of the same name in `src` (e.g. the target
/// encoder from the online network at step 0). Errors if a name of `dst` is missing in `src`.
pub fn copy_vars(src: &VarMap, dst: &VarMap) -> Result<()> {
    let src = src.data().lock().expect("VarMap lock");
    let dst = dst.data().lock().expect("VarMap lock");
    for (name, var) in dst.iter() {
        match src.get(name) {
            Some(s) => var.set(s.as_tensor())?,
            None => candle_core::bail!("copy_vars: {name} missing in the source map"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn build(cfg: &ModelConfig) -> (VarMap, Online) {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let online = Online::new(cfg, vb).unwrap();
        (map, online)
    }

    fn small(decoder: DecoderConfig, dilated: bool) -> ModelConfig {
        ModelConfig {
            backbone: Backbone::Custom(ResNetConfig {
                block: BlockKind::Bottleneck,
                layers: [1, 1, 1, 1],
                stem_width: 8,
                widths: [4, 8, 16, 32],
                dilated: false,
            }),
            decoder,
            dilated,
            proj_hidden: 16,
            proj_out: 8,
        }
    }

    #[test]
    fn config_round_trips_through_json() {
        for cfg in [
            ModelConfig::paper(),
            ModelConfig::tiny(),
            ModelConfig::flowe(),
            small(DecoderConfig::lateral_only(), false),
        ] {
            let s = serde_json::to_string(&cfg).unwrap();
            assert_eq!(serde_json::from_str::<ModelConfig>(&s).unwrap(), cfg);
        }
        let s = serde_json::to_string(&ModelConfig::paper()).unwrap();
        assert!(s.contains("\"backbone\":\"resnet50\""), "{s}");
        assert!(ModelConfig::paper()
            .with_decoder(DecoderConfig::full())
            .validate()
            .is_ok());
        let bad = ModelConfig {
            dilated: true,
            ..ModelConfig::paper()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn shapes_and_names_for_each_decoder_variant() {
        let x = Tensor::randn(0f32, 1., (2, 3, 64, 96), &Device::Cpu).unwrap();
        let cases = [
            (DecoderConfig::full(), false, true, true),
            (DecoderConfig::top_down_only(), false, true, false),
            (DecoderConfig::lateral_only(), false, false, true),
            (DecoderConfig::disabled(), true, false, false),
        ];
        let orders = [DecoderOrder::Authors, DecoderOrder::Paper];
        let cases = cases
            .into_iter()
            .flat_map(|c| orders.map(|o| (c.0.with_order(o), c.1, c.2, c.3)));
        for (dec, dilated, has_bottleneck, has_lateral) in cases {
            let cfg = small(dec, dilated);
            let (map, online) = build(&cfg);
            let p = online.encoder.dense(&x, true).unwrap();
            assert_eq!(p.dims(), &[2, 8, 8, 12], "{dec:?}");
            let q = online.predictors.dense(&p, true).unwrap();
            assert_eq!(q.dims(), p.dims());
            let pp = online.encoder.pooled(&x, true).unwrap();
            assert_eq!(pp.dims(), &[2, 8]);
            assert_eq!(online.predictors.pooled(&pp, true).unwrap().dims(), &[2, 8]);
            let names: Vec<String> = named_vars(&map).into_iter().map(|(n, _)| n).collect();
            let has = |s: &str| names.iter().any(|n| n.starts_with(s));
            assert_eq!(
                has("decoder.blocks.1.bottleneck.conv3.weight"),
                has_bottleneck
            );
            assert_eq!(has("decoder.blocks.0.lateral.bias"), has_lateral);
            assert!(has("backbone.layer4.0.downsample.1.running_var"));
            assert!(has("pooled_predictor.net.3.weight"));
        }
    }

    /// The two orders compute different functions of the same weights when the decoder has
    /// a bottleneck, the same one without (upsample + lateral only).
    #[test]
    fn decoder_orders_differ_only_with_a_bottleneck() {
        let x = Tensor::randn(0f32, 1., (2, 3, 64, 96), &Device::Cpu).unwrap();
        for (dec, differ) in [
            (DecoderConfig::full(), true),
            (DecoderConfig::top_down_only(), true),
            (DecoderConfig::lateral_only(), false),
        ] {
            let (map, online) = build(&small(dec, false));
            let paper = small(dec.with_order(DecoderOrder::Paper), false);
            let (map_p, online_p) = build(&paper);
            copy_vars(&map, &map_p).unwrap();
            let a = online.encoder.dense_features(&x, false).unwrap();
            let b = online_p.encoder.dense_features(&x, false).unwrap();
            let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
            let d = d.to_scalar::<f32>().unwrap();
            let scale = a
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            if differ {
                assert!(d > 1e-2 * scale, "{dec:?}: {d} vs {scale}");
            } else {
                assert_eq!(d, 0.0, "{dec:?}");
            }
        }
    }

    #[test]
    fn tiny_and_paper_widths() {
        let x = Tensor::randn(0f32, 1., (2, 3, 64, 64), &Device::Cpu).unwrap();
        let (_, online) = build(&ModelConfig::tiny());
        let p = online.encoder.dense(&x, true).unwrap();
        assert_eq!(p.dims(), &[2, 64, 8, 8]);
        assert_eq!(
            online.encoder.dense_features(&x, false).unwrap().dims(),
            &[2, 512, 8, 8]
        );
        assert_eq!(ModelConfig::paper().feature_channels(), 2048);
        assert_eq!(ModelConfig::flowe().dense_stride(), 8);
    }

    #[test]
    fn trainable_vars_exclude_buffers_and_no_decay_is_rank_one() {
        let (map, _) = build(&small(DecoderConfig::full(), false));
        let all = named_vars(&map);
        let train = trainable_vars(&map);
        let buffers = all.iter().filter(|(n, _)| is_buffer(n)).count();
        assert!(buffers > 0);
        assert_eq!(train.len() + buffers, all.len());
        for (n, v) in &all {
            let k = param_kind(n, v);
            if n.ends_with(".bias") || n.ends_with("bn1.weight") || n.ends_with("net.1.weight") {
                assert_eq!(k, ParamKind::NoDecay, "{n}");
            }
            if n.ends_with("conv1.weight") || n.ends_with("net.0.weight") {
                assert_eq!(k, ParamKind::Weight, "{n}");
            }
        }
    }

    #[test]
    fn bn_training_forward_writes_running_stats_into_the_map_and_copy_vars_copies_them() {
        let cfg = small(DecoderConfig::full(), false);
        let (online_map, online) = build(&cfg);
        let target_map = VarMap::new();
        let vb = VarBuilder::from_varmap(&target_map, DType::F32, &Device::Cpu);
        let target = Encoder::new(&cfg, vb).unwrap();
        let name = "backbone.bn1.running_mean";
        let get = |m: &VarMap| m.data().lock().unwrap()[name].as_tensor().to_vec1::<f32>();
        assert!(get(&online_map).unwrap().iter().all(|v| *v == 0.0));
        let x = Tensor::randn(1f32, 1., (2, 3, 64, 64), &Device::Cpu).unwrap();
        online.encoder.dense(&x, true).unwrap();
        let after = get(&online_map).unwrap();
        assert!(after.iter().any(|v| *v != 0.0));
        // Eval mode leaves them alone.
        online.encoder.dense(&x, false).unwrap();
        assert_eq!(get(&online_map).unwrap(), after);
        // The target's names are the online names minus the predictors.
        copy_vars(&online_map, &target_map).unwrap();
        assert_eq!(get(&target_map).unwrap(), after);
        let a = online.encoder.dense(&x, false).unwrap();
        let b = target.dense(&x, false).unwrap();
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        let online_names: Vec<String> = named_vars(&online_map).into_iter().map(|n| n.0).collect();
        let target_names: Vec<String> = named_vars(&target_map).into_iter().map(|n| n.0).collect();
        let expected: Vec<String> = online_names
            .into_iter()
            .filter(|n| !n.contains("_predictor."))
            .collect();
        assert_eq!(target_names, expected);
    }
}
