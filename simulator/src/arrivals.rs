//! Request arrivals from real traces: the readers live in `shared::arrivals` (the endpoint's
//! benchmark and the fault-injection harness read the same traces); here they answer in
//! [`SimError`].

use crate::SimError;
pub use shared::arrivals::Request;
use shared::arrivals::{self as reader, ArrivalError};

impl From<ArrivalError> for SimError {
    fn from(e: ArrivalError) -> Self {
        match e {
            ArrivalError::Line { line, msg } => SimError::Arrivals { line, msg },
            ArrivalError::Empty(what) => SimError::EmptyArrivals(what),
            ArrivalError::BadDuration(d) => SimError::BadDuration(d),
            ArrivalError::BadRateScale(r) => SimError::Config(format!("rate scale must be positive, got {r}")),
        }
    }
}

/// Azure LLM inference trace 2023 (`TIMESTAMP,ContextTokens,GeneratedTokens`).
pub fn parse_azure_csv(input: impl std::io::BufRead) -> Result<Vec<Request>, SimError> {
    Ok(reader::parse_azure_csv(input)?)
}

/// Mooncake JSONL (`{"timestamp": ms, "input_length": n, "output_length": n, ...}`).
pub fn parse_mooncake_jsonl(input: impl std::io::BufRead) -> Result<Vec<Request>, SimError> {
    Ok(reader::parse_mooncake_jsonl(input)?)
}

/// Pick the reader from the first line: JSON object (Mooncake) or the Azure header.
pub fn parse_auto(text: &str) -> Result<Vec<Request>, SimError> {
    Ok(reader::parse_auto(text)?)
}

/// See [`shared::arrivals::window`].
pub fn window(reqs: &[Request], duration_s: f64, rate_scale: f64) -> Result<Vec<Request>, SimError> {
    Ok(reader::window(reqs, duration_s, rate_scale)?)
}
