//! Errors of the data plane, one enum per layer.

use std::path::PathBuf;

/// Loading a model: config, checkpoint files, tensors.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config field `{field}`: {message}")]
    Config { field: String, message: String },
    #[error("unknown architecture (model_type '{model_type}'); supported: {supported}")]
    UnknownArchitecture { model_type: String, supported: String },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("tensor `{name}` is missing from the checkpoint (expected shape {expected:?})")]
    MissingTensor { name: String, expected: Vec<usize> },
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor `{name}` has dtype {dtype}, expected one of F32, BF16, F16")]
    UnsupportedDtype { name: String, dtype: String },
    /// An expert's weights in the wire encoding (`ExpertWeights::decode`) are malformed.
    #[error("encoded weights of expert {key}: {source}")]
    Decode {
        key: shared::ExpertKey,
        #[source]
        source: crate::expert::DecodeError,
    },
    /// Every store of a `FallbackStore` failed; one line per store, in order.
    #[error("no weight store could load expert {key}: {}", attempts.join("; "))]
    NoStore {
        key: shared::ExpertKey,
        attempts: Vec<String>,
    },
}

impl LoadError {
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        LoadError::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Stable label for metrics and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            LoadError::Io { .. } => "io",
            LoadError::Config { .. } => "config",
            LoadError::UnknownArchitecture { .. } => "unknown_architecture",
            LoadError::Checkpoint { .. } => "checkpoint",
            LoadError::MissingTensor { .. } => "missing_tensor",
            LoadError::ShapeMismatch { .. } => "shape_mismatch",
            LoadError::UnsupportedDtype { .. } => "unsupported_dtype",
            LoadError::Decode { .. } => "decode",
            LoadError::NoStore { .. } => "no_store",
        }
    }
}

/// Running the model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("a sequence needs at least one token")]
    EmptySequence,
    #[error("sequence of {len} tokens exceeds the model's maximum of {max} positions")]
    TooLong { len: usize, max: usize },
    #[error("expert function: {0}")]
    Expert(#[from] crate::expert::ExpertError),
    #[error("{0}")]
    KvCache(#[from] crate::kv_cache::OutOfBlocks),
}

impl EngineError {
    pub fn error_type(&self) -> &'static str {
        match self {
            EngineError::TokenOutOfRange { .. } => "token_out_of_range",
            EngineError::EmptySequence => "empty_sequence",
            EngineError::TooLong { .. } => "too_long",
            EngineError::Expert(_) => "expert",
            EngineError::KvCache(_) => "kv_cache_full",
        }
    }
}
