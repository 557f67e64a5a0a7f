//! Shared pieces of poodle: dataset configs, manifests, the Zarr store schema and CPU flow
//! geometry. `poodle-prep` and `poodle-train` never import each other; they meet here, and the
//! store schema in [`store`] is the one contract between them.

pub mod atomic;
pub mod config;
pub mod error;
pub mod flowmath;
pub mod manifest;
pub mod rng;
pub mod store;
pub mod testenv;

pub use error::{Error, Result};

/// Version of the tool that wrote a store, recorded in its attributes.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");
