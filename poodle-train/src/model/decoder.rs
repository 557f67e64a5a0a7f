//! The Spatial Decoder Module (SDM, paper Section 3, Appendix A): two blocks taking C5 from
//! stride 32 to stride 8. Block 0 adds C4, block 1 adds C3; the output has C5's channels at
//! C3's resolution.
//!
//! # Order of the operations ([`DecoderOrder`])
//! * [`DecoderOrder::Authors`] (default), as the authors' code runs it
//!   (`src/models/poodle.py`, `Poodle.forward`): `z = g(z)` at the low resolution, then
//!   `z = upsample_x2(z)`, then `z = z + lateral(c)`. The bottleneck runs on 4x fewer
//!   positions than in the paper's order.
//! * [`DecoderOrder::Paper`], the paper's Eq. (3): `z_{l+1} = g(upsample(z_l)) + lateral(c)`,
//!   the bottleneck after upsampling.
//!
//! `upsample` is bilinear with `align_corners=False` to the lateral input's spatial size: for
//! inputs whose sides are multiples of 32 this is exactly the authors'
//! `F.interpolate(scale_factor=2)`; for other sizes (where their code would fail on the sum)
//! it still lines the two up.
//!
//! # Modules
//! `g` is torchvision's `Bottleneck(inplanes=C5, planes=C5/4, base_width=32)` of the authors'
//! `decoder_dims = [C5, C5]`, `decoder_hidden_dim_factor = 0.5`: inner width
//! `planes * base_width / 64 = C5 / 8`, C5 -> C5/8 -> C5/8 -> C5 with an identity residual
//! (2048 -> 256 -> 256 -> 2048 for ResNet-50). `lateral` is a 1x1 conv with bias from C4
//! (block 0) or C3 (block 1) to C5's channels. Initialisation is PyTorch's default for both
//! (convs uniform in `+-1/sqrt(fan_in)`, BN weight 1, bias 0): the authors build these
//! modules in `Poodle.__init__`, outside the ResNet, so torchvision's Kaiming re-init of the
//! ResNet's own modules never touches them.
//!
//! # Names
//! Under the builder's prefix (`decoder` in [`super::Encoder`]):
//! `blocks.{i}.bottleneck.{conv1,bn1,conv2,bn2,conv3,bn3}.*` and `blocks.{i}.lateral.{weight,
//! bias}`, i = 0, 1. The authors' state_dict names the same tensors
//! `decoder_blocks.{i}.{conv1,...}.*` and `decoder_laterals.{i}.{weight,bias}` (one-to-one;
//! [`authors_name`] maps them). The ablations of the paper's Table 4 drop one of the two
//! parts: [`DecoderConfig::top_down_only`] has no `lateral`, [`DecoderConfig::lateral_only`]
//! no `bottleneck` (upsample + lateral; then both orders are the same function).

use super::layers::{torch_default_uniform, upsample_bilinear, Conv2d};
use super::resnet::{Bottleneck, ConvInit, Stages};
use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// Where the bottleneck sits relative to the upsampling (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecoderOrder {
    /// The authors' code: bottleneck at the low resolution, upsample x2, add the lateral.
    #[default]
    Authors,
    /// The paper's Eq. (3): upsample, bottleneck, add the lateral.
    Paper,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecoderConfig {
    /// Without the decoder the dense objective reads C5 (use a dilated backbone for stride 8).
    pub enabled: bool,
    /// The Bottleneck computation block `g` of each block.
    pub top_down: bool,
    /// The lateral 1x1 convs from C4 and C3.
    pub lateral: bool,
    /// Bottleneck before (authors, default) or after (paper) the upsampling.
    #[serde(default)]
    pub order: DecoderOrder,
}

impl DecoderConfig {
    /// PooDLe's SDM: both parts, the authors' order.
    pub fn full() -> Self {
        Self {
            enabled: true,
            top_down: true,
            lateral: true,
            order: DecoderOrder::Authors,
        }
    }

    /// Table 4 row 3: bottleneck + upsample, no lateral connections.
    pub fn top_down_only() -> Self {
        Self {
            lateral: false,
            ..Self::full()
        }
    }

    /// Table 4 row 4: upsample + lateral, no bottleneck.
    pub fn lateral_only() -> Self {
        Self {
            top_down: false,
            ..Self::full()
        }
    }

    /// No decoder (FlowE; pair with a dilated backbone).
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            top_down: false,
            lateral: false,
            order: DecoderOrder::Authors,
        }
    }

    pub fn with_order(mut self, order: DecoderOrder) -> Self {
        self.order = order;
        self
    }
}

/// The authors' state_dict name of a decoder tensor, from its name below `decoder.`
/// (`blocks.0.bottleneck.conv1.weight` -> `decoder_blocks.0.conv1.weight`,
/// `blocks.1.lateral.bias` -> `decoder_laterals.1.bias`); `None` for other names.
pub fn authors_name(name: &str) -> Option<String> {
    let rest = name.strip_prefix("blocks.")?;
    let (i, rest) = rest.split_once('.')?;
    i.parse::<usize>().ok()?;
    if let Some(t) = rest.strip_prefix("bottleneck.") {
        Some(format!("decoder_blocks.{i}.{t}"))
    } else {
        rest.strip_prefix("lateral.")
            .map(|t| format!("decoder_laterals.{i}.{t}"))
    }
}

/// One decoder block: optional bottleneck, upsample, optional lateral sum.
#[derive(Clone, Debug)]
pub struct DecoderBlock {
    bottleneck: Option<Bottleneck>,
    lateral: Option<Conv2d>,
    order: DecoderOrder,
}

impl DecoderBlock {
    /// `channels`: width of the top-down path (C5's channels); `skip_channels`: the lateral
    /// input's channels.
    pub fn new(
        cfg: &DecoderConfig,
        channels: usize,
        skip_channels: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let bottleneck = if cfg.top_down {
            // torchvision Bottleneck(channels, planes = channels / 4, base_width = 32):
            // inner width channels / 8, output planes * 4 = channels.
            Some(Bottleneck::with_init(
                channels,
                channels / 8,
                channels,
                1,
                1,
                ConvInit::TorchDefault,
                vb.pp("bottleneck"),
            )?)
        } else {
            None
        };
        let lateral = if cfg.lateral {
            let init = torch_default_uniform(skip_channels);
            Some(Conv2d::new(
                skip_channels,
                channels,
                1,
                1,
                0,
                1,
                true,
                init,
                vb.pp("lateral"),
            )?)
        } else {
            None
        };
        Ok(Self {
            bottleneck,
            lateral,
            order: cfg.order,
        })
    }

    fn bottleneck_t(&self, z: Tensor, train: bool) -> Result<Tensor> {
        match &self.bottleneck {
            Some(b) => b.forward_t(&z, train),
            None => Ok(z),
        }
    }

    /// `z`: the previous output; `skip`: the earlier stage at the target resolution.
    pub fn forward_t(&self, z: &Tensor, skip: &Tensor, train: bool) -> Result<Tensor> {
        let (_, _, h, w) = skip.dims4()?;
        let y = match self.order {
            DecoderOrder::Authors => {
                upsample_bilinear(&self.bottleneck_t(z.clone(), train)?, h, w)?
            }
            DecoderOrder::Paper => self.bottleneck_t(upsample_bilinear(z, h, w)?, train)?,
        };
        match &self.lateral {
            Some(l) => y + l.forward(skip)?,
            None => Ok(y),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Decoder {
    blocks: [DecoderBlock; 2],
}

impl Decoder {
    /// `stage_channels`: channels of C3, C4, C5.
    pub fn new(cfg: &DecoderConfig, stage_channels: [usize; 3], vb: VarBuilder) -> Result<Self> {
        if !cfg.enabled || !(cfg.top_down || cfg.lateral) {
            candle_core::bail!("decoder config {cfg:?} builds no decoder");
        }
        let [c3, c4, c5] = stage_channels;
        let vb = vb.pp("blocks");
        Ok(Self {
            blocks: [
                DecoderBlock::new(cfg, c5, c4, vb.pp("0"))?,
                DecoderBlock::new(cfg, c5, c3, vb.pp("1"))?,
            ],
        })
    }

    /// C5's channels at C3's resolution.
    pub fn forward_t(&self, stages: &Stages, train: bool) -> Result<Tensor> {
        let z = self.blocks[0].forward_t(&stages.c5, &stages.c4, train)?;
        self.blocks[1].forward_t(&z, &stages.c3, train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn authors_names_map_one_to_one() {
        assert_eq!(
            authors_name("blocks.0.bottleneck.bn3.running_var").as_deref(),
            Some("decoder_blocks.0.bn3.running_var")
        );
        assert_eq!(
            authors_name("blocks.1.lateral.weight").as_deref(),
            Some("decoder_laterals.1.weight")
        );
        assert_eq!(authors_name("blocks.x.lateral.weight"), None);
        assert_eq!(authors_name("conv1.weight"), None);
    }

    #[test]
    fn order_defaults_to_authors_and_old_configs_parse() {
        let old = r#"{"enabled":true,"top_down":true,"lateral":false}"#;
        let c: DecoderConfig = serde_json::from_str(old).unwrap();
        assert_eq!(c, DecoderConfig::top_down_only());
        assert_eq!(c.order, DecoderOrder::Authors);
        let p = DecoderConfig::full().with_order(DecoderOrder::Paper);
        let s = serde_json::to_string(&p).unwrap();
        assert!(s.contains(r#""order":"paper""#), "{s}");
        assert_eq!(serde_json::from_str::<DecoderConfig>(&s).unwrap(), p);
    }

    #[test]
    fn widths_and_default_init_as_the_authors() {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        Decoder::new(&DecoderConfig::full(), [512, 1024, 2048], vb).unwrap();
        let data = map.data().lock().unwrap();
        let dims = |k: &str| data[k].as_tensor().dims().to_vec();
        assert_eq!(dims("blocks.0.bottleneck.conv1.weight"), [256, 2048, 1, 1]);
        assert_eq!(dims("blocks.0.bottleneck.conv2.weight"), [256, 256, 3, 3]);
        assert_eq!(dims("blocks.1.bottleneck.conv3.weight"), [2048, 256, 1, 1]);
        assert_eq!(dims("blocks.0.lateral.weight"), [2048, 1024, 1, 1]);
        assert_eq!(dims("blocks.1.lateral.weight"), [2048, 512, 1, 1]);
        assert!(!data.keys().any(|k| k.contains("downsample")));
        // PyTorch's default conv init: |w| <= 1/sqrt(fan_in), and a uniform draw reaches
        // close to the bound (Kaiming-normal fan_out would exceed it: std sqrt(2/2048)).
        for (k, fan_in) in [
            ("blocks.0.bottleneck.conv1.weight", 2048.0),
            ("blocks.0.bottleneck.conv2.weight", 256.0 * 9.0),
            ("blocks.1.bottleneck.conv3.weight", 256.0),
            ("blocks.1.lateral.weight", 512.0),
            ("blocks.1.lateral.bias", 512.0),
        ] {
            let t = data[k].as_tensor();
            let m = t
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let bound = 1.0 / f64::sqrt(fan_in) as f32;
            assert!(m <= bound && m > 0.9 * bound, "{k}: max {m}, bound {bound}");
        }
    }
}
