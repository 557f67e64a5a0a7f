//! Errors shared by the poodle crates. Every variant names the file, pair or option at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("store {path}: {msg}")]
    Store { path: PathBuf, msg: String },
    #[error("zarr {path}: {source}")]
    Zarr {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn store(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Store {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn zarr(
        path: impl Into<String>,
        err: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Zarr {
            path: path.into(),
            source: Box::new(err),
        }
    }
}
