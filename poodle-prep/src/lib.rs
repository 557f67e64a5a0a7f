//! poodle-prep: decode videos, sample frame pairs, compute optical flow with an ONNX model,
//! derive occlusion, and write everything into sharded Zarr v3 stores (schema:
//! `poodle_common::store`).

pub mod decode;
pub mod discover;
pub mod error;
pub mod evalflow;
pub mod flowmodel;
pub mod flowstage;
pub mod inspect;
pub mod job;
pub mod pipeline;
pub mod plan;
pub mod quality;
pub mod reflow;
pub mod tools;

pub use error::{PrepError, Result};
