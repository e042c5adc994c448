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
            ArrivalError::Format(msg) => SimError::Config(msg),
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

/// A ServeGen client directory (`chunk-<n>-trace.csv`, some `chunk-<n>-dataset.json`; see
/// [`shared::servegen`]), in client order.
pub fn read_servegen_dir(dir: &std::path::Path) -> Result<shared::servegen::ServeGenPool, SimError> {
    let io = |p: &std::path::Path, e: std::io::Error| SimError::Config(format!("reading {}: {e}", p.display()));
    let mut clients: Vec<(u64, String, std::path::PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let path = entry.map_err(|e| io(dir, e))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if let Some(id) = name.strip_prefix("chunk-").and_then(|n| n.strip_suffix("-trace.csv")) {
            let n: u64 = id
                .parse()
                .map_err(|_| SimError::Config(format!("ServeGen file {name}: client id `{id}` is not a number")))?;
            clients.push((n, format!("chunk-{id}"), path));
        }
    }
    if clients.is_empty() {
        return Err(SimError::EmptyArrivals(format!(
            " ({} holds no ServeGen chunk-N-trace.csv)",
            dir.display()
        )));
    }
    clients.sort();
    let mut texts = Vec::with_capacity(clients.len());
    for (_, name, trace) in clients {
        let text = std::fs::read_to_string(&trace).map_err(|e| io(&trace, e))?;
        let ds = dir.join(format!("{name}-dataset.json"));
        let dataset = match std::fs::read_to_string(&ds) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&ds, e)),
        };
        texts.push((name, text, dataset));
    }
    Ok(shared::servegen::ServeGenPool::from_texts(texts)?)
}
