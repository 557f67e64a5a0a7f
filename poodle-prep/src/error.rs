//! Errors of the prep library. Each names the video, pair, model or option at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PrepError {
    #[error(transparent)]
    Common(#[from] poodle_common::Error),
    #[error("{tool} not found ({hint})")]
    MissingTool { tool: String, hint: String },
    #[error("video {path}: {reason}")]
    Video { path: String, reason: String },
    #[error("flow model {path}: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("ONNX Runtime{context}: {source}")]
    Ort {
        /// What was being done, e.g. " (CUDA execution provider)"; empty when plain.
        context: String,
        #[source]
        source: ort::Error,
    },
    /// The shared library could not be loaded (kept as text: the first failure is cached
    /// for the process and reported to every later caller).
    #[error("ONNX Runtime: {0}")]
    OrtLibrary(String),
    #[error("store {path}: {reason}")]
    Job { path: PathBuf, reason: String },
    #[error("{0}")]
    Usage(String),
}

pub type Result<T> = std::result::Result<T, PrepError>;

impl From<ort::Error> for PrepError {
    fn from(source: ort::Error) -> Self {
        PrepError::Ort {
            context: String::new(),
            source,
        }
    }
}
