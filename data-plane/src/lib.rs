//! The MoEless data plane: checkpoint loading, tensor backends, the MoE engine and the
//! expert-function seam through which every routed expert runs.

pub mod backend;
pub mod checkpoint;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod engine;
pub mod error;
pub mod expert;
pub mod instances;
pub mod kv_cache;
pub mod lru;
pub mod model;
pub mod prompts;
pub mod reference;
pub mod rope;
pub mod store;
pub mod tensor;
pub mod testing;
pub mod weight;

pub use error::{EngineError, LoadError};
