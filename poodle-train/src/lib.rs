//! poodle-train: the PooDLe learner on candle, reading `poodle-prep` stores.
//!
//! Module map (conventions: docs/conventions.md): `geom` (affine convention shared by augmentation and loss),
//! `model` (ResNet with torchvision names, spatial decoder, heads), `loss` (dense and pooled
//! objectives as pure functions), `data` (streaming loader, augmentations, subcrops),
//! `optim` (AdamW, schedules, EMA).

pub mod checkpoint;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
mod custom_op;
pub mod data;
pub mod dist;
pub mod eval;
pub mod export;
pub mod geom;
pub mod gpucheck;
pub mod loaderbench;
pub mod loss;
pub mod model;
pub mod optim;
pub mod pictures;
pub mod plot;
pub mod progress;
pub mod run;
pub mod tensorboard;
