//! ResNet-18 / ResNet-50 with torchvision's layout and parameter names (v1.5: the stride of a
//! Bottleneck sits on its 3x3 conv), returning the stage outputs C3, C4, C5.
//!
//! Names under the builder's prefix: `conv1.weight`, `bn1.{weight,bias,running_mean,
//! running_var}`, `layer{1..4}.{i}.conv{1,2[,3]}.weight`, `layer{1..4}.{i}.bn{1,2[,3]}.*`,
//! `layer{1..4}.0.downsample.0.weight`, `layer{1..4}.0.downsample.1.*`; no `fc`, no
//! `num_batches_tracked`. Initialisation follows torchvision: convs Kaiming-normal
//! (fan_out, relu), BN weight 1 and bias 0.
//!
//! The dilated variant (FlowE, the paper's "no decoder" rows) is torchvision's
//! `replace_stride_with_dilation=[False, True, True]`: layer3 and layer4 keep stride 1, their
//! first blocks use the previous dilation (1, then 2) and the other blocks dilation 2 and 4,
//! so C4 and C5 stay at stride 8. torchvision refuses dilation in BasicBlock; here a dilated
//! BasicBlock dilates both 3x3 convs.

use super::layers::{
    kaiming_normal_fan_out, max_pool_3x3_s2, torch_default_uniform, BatchNorm, Conv2d,
};
use super::relu::relu;
use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// Two 3x3 convs, expansion 1 (ResNet-18/34).
    Basic,
    /// 1x1, 3x3, 1x1, expansion 4 (ResNet-50/101/152).
    Bottleneck,
}

impl BlockKind {
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResNetConfig {
    pub block: BlockKind,
    /// Blocks per stage.
    pub layers: [usize; 4],
    /// Channels of the stem conv (64 in torchvision).
    pub stem_width: usize,
    /// `planes` of each stage (64, 128, 256, 512 in torchvision); a stage outputs
    /// `planes * expansion` channels.
    pub widths: [usize; 4],
    /// Layer3 and layer4 dilated instead of strided (C5 at stride 8).
    #[serde(default)]
    pub dilated: bool,
}

impl ResNetConfig {
    pub fn resnet18() -> Self {
        Self {
            block: BlockKind::Basic,
            layers: [2, 2, 2, 2],
            stem_width: 64,
            widths: [64, 128, 256, 512],
            dilated: false,
        }
    }

    pub fn resnet50() -> Self {
        Self {
            block: BlockKind::Bottleneck,
            layers: [3, 4, 6, 3],
            stem_width: 64,
            widths: [64, 128, 256, 512],
            dilated: false,
        }
    }

    pub fn with_dilation(mut self, dilated: bool) -> Self {
        self.dilated = dilated;
        self
    }

    /// Channels of C3, C4, C5.
    pub fn stage_channels(&self) -> [usize; 3] {
        let e = self.block.expansion();
        [self.widths[1] * e, self.widths[2] * e, self.widths[3] * e]
    }

    /// Output strides of C3, C4, C5.
    pub fn stage_strides(&self) -> [usize; 3] {
        if self.dilated {
            [8, 8, 8]
        } else {
            [8, 16, 32]
        }
    }
}

/// How a block's convolutions are initialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvInit {
    /// torchvision's ResNet re-initialisation: Kaiming-normal, fan_out, relu.
    ResNet,
    /// PyTorch's `nn.Conv2d` default (uniform in `+-1/sqrt(fan_in)`): a torchvision block
    /// built outside a ResNet, which never runs the ResNet's re-initialisation loop (the
    /// authors' decoder blocks).
    TorchDefault,
}

/// A bias-free conv ("same" padding for its dilation) and the BN after it.
#[allow(clippy::too_many_arguments)]
fn conv_bn(
    in_ch: usize,
    out_ch: usize,
    k: usize,
    stride: usize,
    dilation: usize,
    conv_name: &str,
    bn_name: &str,
    vb: &VarBuilder,
    conv_init: ConvInit,
) -> Result<(Conv2d, BatchNorm)> {
    let padding = dilation * (k - 1) / 2;
    let init = match conv_init {
        ConvInit::ResNet => kaiming_normal_fan_out(out_ch, k),
        ConvInit::TorchDefault => torch_default_uniform(in_ch * k * k),
    };
    let conv = Conv2d::new(
        in_ch,
        out_ch,
        k,
        stride,
        padding,
        dilation,
        false,
        init,
        vb.pp(conv_name),
    )?;
    Ok((conv, BatchNorm::new(out_ch, vb.pp(bn_name))?))
}

/// `downsample.0` (1x1 conv with the block's stride) and `downsample.1` (BN).
#[derive(Clone, Debug)]
pub struct Downsample {
    conv: Conv2d,
    bn: BatchNorm,
}

impl Downsample {
    /// The `downsample` branch of a block under `vb`, where torchvision has one: when the
    /// block changes the stride or the width.
    fn if_needed(
        in_ch: usize,
        out_ch: usize,
        stride: usize,
        vb: &VarBuilder,
    ) -> Result<Option<Self>> {
        if stride == 1 && in_ch == out_ch {
            return Ok(None);
        }
        let vb = vb.pp("downsample");
        let (conv, bn) = conv_bn(in_ch, out_ch, 1, stride, 1, "0", "1", &vb, ConvInit::ResNet)?;
        Ok(Some(Self { conv, bn }))
    }
}

/// `relu(y + shortcut(x))`: the end of every residual block.
fn residual(y: Tensor, x: &Tensor, downsample: &Option<Downsample>, train: bool) -> Result<Tensor> {
    let identity = match downsample {
        Some(d) => d.forward_t(x, train)?,
        None => x.clone(),
    };
    relu(&(y + identity)?)
}

impl ModuleT for Downsample {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.bn.forward_t(&self.conv.forward(x)?, train)
    }
}

/// torchvision's `BasicBlock`.
#[derive(Clone, Debug)]
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    downsample: Option<Downsample>,
}

impl BasicBlock {
    pub fn new(
        in_ch: usize,
        planes: usize,
        stride: usize,
        dilation: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let init = ConvInit::ResNet;
        let (conv1, bn1) = conv_bn(
            in_ch, planes, 3, stride, dilation, "conv1", "bn1", &vb, init,
        )?;
        let (conv2, bn2) = conv_bn(planes, planes, 3, 1, dilation, "conv2", "bn2", &vb, init)?;
        let downsample = Downsample::if_needed(in_ch, planes, stride, &vb)?;
        Ok(Self {
            conv1,
            bn1,
            conv2,
            bn2,
            downsample,
        })
    }
}

impl ModuleT for BasicBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = relu(&self.bn1.forward_t(&self.conv1.forward(x)?, train)?)?;
        let y = self.bn2.forward_t(&self.conv2.forward(&y)?, train)?;
        residual(y, x, &self.downsample, train)
    }
}

/// torchvision's `Bottleneck` (v1.5), generalised to any inner width and output width:
/// `conv1` 1x1 in->width, `conv2` 3x3 width->width (stride, dilation), `conv3` 1x1
/// width->out, BN after each, ReLU after the first two and after the residual sum. A
/// `downsample` branch exists when the stride is not 1 or in != out.
#[derive(Clone, Debug)]
pub struct Bottleneck {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    conv3: Conv2d,
    bn3: BatchNorm,
    downsample: Option<Downsample>,
}

impl Bottleneck {
    /// A ResNet stage block (torchvision's ResNet initialisation).
    pub fn new(
        in_ch: usize,
        width: usize,
        out_ch: usize,
        stride: usize,
        dilation: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Self::with_init(in_ch, width, out_ch, stride, dilation, ConvInit::ResNet, vb)
    }

    /// As [`Bottleneck::new`] with the 1x1/3x3/1x1 convs initialised per `init` (a
    /// `downsample` branch, which the decoder never has, keeps the ResNet init).
    pub fn with_init(
        in_ch: usize,
        width: usize,
        out_ch: usize,
        stride: usize,
        dilation: usize,
        init: ConvInit,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (conv1, bn1) = conv_bn(in_ch, width, 1, 1, 1, "conv1", "bn1", &vb, init)?;
        let (conv2, bn2) = conv_bn(width, width, 3, stride, dilation, "conv2", "bn2", &vb, init)?;
        let (conv3, bn3) = conv_bn(width, out_ch, 1, 1, 1, "conv3", "bn3", &vb, init)?;
        let downsample = Downsample::if_needed(in_ch, out_ch, stride, &vb)?;
        Ok(Self {
            conv1,
            bn1,
            conv2,
            bn2,
            conv3,
            bn3,
            downsample,
        })
    }
}

impl ModuleT for Bottleneck {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = relu(&self.bn1.forward_t(&self.conv1.forward(x)?, train)?)?;
        let y = relu(&self.bn2.forward_t(&self.conv2.forward(&y)?, train)?)?;
        let y = self.bn3.forward_t(&self.conv3.forward(&y)?, train)?;
        residual(y, x, &self.downsample, train)
    }
}

#[derive(Clone, Debug)]
pub enum Block {
    Basic(BasicBlock),
    Bottleneck(Bottleneck),
}

impl ModuleT for Block {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Block::Basic(b) => b.forward_t(x, train),
            Block::Bottleneck(b) => b.forward_t(x, train),
        }
    }
}

/// Stage outputs of the backbone.
#[derive(Clone, Debug)]
pub struct Stages {
    /// layer2, stride 8.
    pub c3: Tensor,
    /// layer3, stride 16 (8 when dilated).
    pub c4: Tensor,
    /// layer4, stride 32 (8 when dilated).
    pub c5: Tensor,
}

#[derive(Clone, Debug)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm,
    layers: [Vec<Block>; 4],
    cfg: ResNetConfig,
}

impl ResNet {
    pub fn new(cfg: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        let sw = cfg.stem_width;
        let init = kaiming_normal_fan_out(sw, 7);
        let conv1 = Conv2d::new(3, sw, 7, 2, 3, 1, false, init, vb.pp("conv1"))?;
        let bn1 = BatchNorm::new(sw, vb.pp("bn1"))?;
        // torchvision's `_make_layer`, with its running `inplanes` and `dilation`.
        let mut inplanes = sw;
        let mut dilation = 1;
        let mut make_layer = |i: usize, stride: usize, dilate: bool| -> Result<Vec<Block>> {
            let vb = vb.pp(format!("layer{}", i + 1));
            let planes = cfg.widths[i];
            let previous_dilation = dilation;
            let mut stride = stride;
            if dilate {
                dilation *= stride;
                stride = 1;
            }
            let mut blocks = Vec::with_capacity(cfg.layers[i]);
            for b in 0..cfg.layers[i] {
                let (s, d) = if b == 0 {
                    (stride, previous_dilation)
                } else {
                    (1, dilation)
                };
                let vb = vb.pp(b.to_string());
                let block = match cfg.block {
                    BlockKind::Basic => Block::Basic(BasicBlock::new(inplanes, planes, s, d, vb)?),
                    BlockKind::Bottleneck => {
                        Block::Bottleneck(Bottleneck::new(inplanes, planes, planes * 4, s, d, vb)?)
                    }
                };
                inplanes = planes * cfg.block.expansion();
                blocks.push(block);
            }
            Ok(blocks)
        };
        let layers = [
            make_layer(0, 1, false)?,
            make_layer(1, 2, false)?,
            make_layer(2, 2, cfg.dilated)?,
            make_layer(3, 2, cfg.dilated)?,
        ];
        Ok(Self {
            conv1,
            bn1,
            layers,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    fn run_layer(&self, i: usize, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = x.clone();
        for b in &self.layers[i] {
            x = b.forward_t(&x, train)?;
        }
        Ok(x)
    }

    /// Stem and layer1..layer4 on an NCHW image batch.
    pub fn forward_stages(&self, x: &Tensor, train: bool) -> Result<Stages> {
        let x = relu(&self.bn1.forward_t(&self.conv1.forward(x)?, train)?)?;
        let x = max_pool_3x3_s2(&x)?;
        let x = self.run_layer(0, &x, train)?;
        let c3 = self.run_layer(1, &x, train)?;
        let c4 = self.run_layer(2, &c3, train)?;
        let c5 = self.run_layer(3, &c4, train)?;
        Ok(Stages { c3, c4, c5 })
    }
}

impl ModuleT for ResNet {
    /// C5.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.forward_stages(x, train)?.c5)
    }
}
