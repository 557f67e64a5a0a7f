//! Projector and predictor MLPs: `in -> hidden -> out` with BN + ReLU in the middle.
//!
//! * Dense (FlowE): 1x1 convs on NCHW maps, BatchNorm2d.
//! * Pooled (BYOL): linear layers on `(N, C)`, BatchNorm1d.
//!
//! Names under the builder's prefix follow a PyTorch `nn.Sequential` called `net`:
//! `net.0.{weight,bias}` (first layer; dense weight `(hidden, in, 1, 1)`, pooled
//! `(hidden, in)`), `net.1.{weight,bias,running_mean,running_var}` (BN), `net.2` is the ReLU
//! (no parameters), `net.3.{weight,bias}` (last layer). Both layers have a bias, as
//! `nn.Linear` / `nn.Conv2d` do by default; PyTorch's default init.

use super::layers::{torch_default_uniform, BatchNorm, Conv2d, Linear};
use super::relu::relu;
use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    /// 1x1 convs on `(N, C, H, W)`.
    Dense,
    /// Linear layers on `(N, C)`.
    Pooled,
}

#[derive(Clone, Debug)]
enum Layer {
    Conv(Conv2d),
    Linear(Linear),
}

impl Layer {
    fn new(kind: HeadKind, in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(match kind {
            HeadKind::Dense => {
                let init = torch_default_uniform(in_dim);
                Layer::Conv(Conv2d::new(in_dim, out_dim, 1, 1, 0, 1, true, init, vb)?)
            }
            HeadKind::Pooled => Layer::Linear(Linear::new(in_dim, out_dim, vb)?),
        })
    }
}

impl Module for Layer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Layer::Conv(c) => c.forward(x),
            Layer::Linear(l) => l.forward(x),
        }
    }
}

/// `net.0` (layer), `net.1` (BN), `net.2` (ReLU), `net.3` (layer).
#[derive(Clone, Debug)]
pub struct Mlp {
    kind: HeadKind,
    first: Layer,
    bn: BatchNorm,
    last: Layer,
}

impl Mlp {
    pub fn new(
        kind: HeadKind,
        in_dim: usize,
        hidden: usize,
        out_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vb = vb.pp("net");
        Ok(Self {
            kind,
            first: Layer::new(kind, in_dim, hidden, vb.pp("0"))?,
            bn: BatchNorm::new(hidden, vb.pp("1"))?,
            last: Layer::new(kind, hidden, out_dim, vb.pp("3"))?,
        })
    }

    pub fn kind(&self) -> HeadKind {
        self.kind
    }
}

impl ModuleT for Mlp {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let want = match self.kind {
            HeadKind::Dense => 4,
            HeadKind::Pooled => 2,
        };
        if x.rank() != want {
            candle_core::bail!(
                "{:?} head expects rank {want}, got {:?}",
                self.kind,
                x.dims()
            );
        }
        let h = relu(&self.bn.forward_t(&self.first.forward(x)?, train)?)?;
        self.last.forward(&h)
    }
}
