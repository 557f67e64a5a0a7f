//! Downstream evaluations of pre-trained encoders.
//!
//! * [`linear`]: the paper's linear readout for semantic segmentation (frozen backbone and
//!   spatial decoder, a trained 1x1 convolution), with mIoU, pixel accuracy, IoU per class,
//!   the small/large and rare/common class groups of Table 3, JSON and markdown reports and
//!   PNG visualisations. CLI: `poodle-train eval linear` ([`linear::LinearArgs`]).
//! * [`datasets`]: CamVid, BDD100K and Cityscapes layouts, class names, palettes, decoding.
//! * [`readout`]: the 1x1-conv head with its hand-written forward/backward and AdamW.
//! * [`metrics`]: confusion matrix, IoU, class statistics and groups (pure functions).

pub mod datasets;
pub mod linear;
pub mod metrics;
pub mod readout;

pub use datasets::DatasetKind;
pub use linear::{run, LinearArgs, LinearEvalConfig, LinearReport};
