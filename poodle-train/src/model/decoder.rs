//! The Spatial Decoder Module (paper Section 3, Eq. 3, Appendix A): two blocks taking C5 from
//! stride 32 to stride 8,
//!
//! `z_{l+1} = g(upsample(z_l)) + lateral(z_j)`,
//!
//! with `upsample` bilinear (align_corners=False) to the spatial size of the lateral input
//! (2x for sizes divisible by 32), `g` a ResNet Bottleneck on C5's channels with inner width
//! C5/8 and an identity residual (2048 -> 256 -> 256 -> 2048 for ResNet-50), and `lateral` a
//! 1x1 conv with bias from the earlier stage (block 0: C4, block 1: C3) up to C5's channels.
//! The output has C5's channels at C3's resolution.
//!
//! Names under the builder's prefix (`decoder` in [`super::Encoder`]):
//! `blocks.{0,1}.bottleneck.{conv1,bn1,conv2,bn2,conv3,bn3}.*` and
//! `blocks.{0,1}.lateral.{weight,bias}`. The ablations of the paper's Table 4 drop one of the
//! two: [`DecoderConfig::top_down_only`] has no `lateral`, [`DecoderConfig::lateral_only`] no
//! `bottleneck` (upsample + lateral).

use super::layers::{torch_default_uniform, upsample_bilinear, Conv2d};
use super::resnet::{Bottleneck, Stages};
use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecoderConfig {
    /// Without the decoder the dense objective reads C5 (use a dilated backbone for stride 8).
    pub enabled: bool,
    /// The Bottleneck computation block `g` after each upsampling.
    pub top_down: bool,
    /// The lateral 1x1 convs from C4 and C3.
    pub lateral: bool,
}

impl DecoderConfig {
    /// PooDLe's SDM: both parts.
    pub fn full() -> Self {
        Self {
            enabled: true,
            top_down: true,
            lateral: true,
        }
    }

    /// Table 4 row 3: upsample + bottleneck, no lateral connections.
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
        }
    }
}

/// One decoder block: upsample, optional bottleneck, optional lateral sum.
#[derive(Clone, Debug)]
pub struct DecoderBlock {
    bottleneck: Option<Bottleneck>,
    lateral: Option<Conv2d>,
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
            Some(Bottleneck::new(
                channels,
                channels / 8,
                channels,
                1,
                1,
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
        })
    }

    /// `z`: the previous output; `skip`: the earlier stage at the target resolution.
    pub fn forward_t(&self, z: &Tensor, skip: &Tensor, train: bool) -> Result<Tensor> {
        let (_, _, h, w) = skip.dims4()?;
        let mut y = upsample_bilinear(z, h, w)?;
        if let Some(b) = &self.bottleneck {
            y = b.forward_t(&y, train)?;
        }
        if let Some(l) = &self.lateral {
            y = (y + l.forward(skip)?)?;
        }
        Ok(y)
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
