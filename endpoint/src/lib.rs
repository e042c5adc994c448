//! The MoEless inference endpoint: an OpenAI-compatible HTTP API (axum) in front of the
//! data-plane engine, with continuous batching on a scheduler thread that owns the engine,
//! a paged KV cache with prefix caching and preemption, Hugging Face tokenizers and chat templates, limits,
//! and Prometheus metrics.

pub mod api;
pub mod bench;
pub mod error;
pub mod generation;
pub mod logprobs;
pub mod metrics;
pub mod openapi;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod tokenizer;

pub use error::ApiError;
pub use server::{ServeConfig, ServeError, Server};
pub use tokenizer::TextTokenizer;
