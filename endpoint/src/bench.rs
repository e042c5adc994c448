//! `moeless bench serve`: replays prompts against an OpenAI-compatible server at given arrival
//! times (a trace or a Poisson rate) over streaming `/v1/completions`, and reports request and
//! token throughput, TTFT, TPOT, ITL and end-to-end latency (mean, median, p99) and goodput.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("prompts file: {0}")]
    Prompts(String),
    #[error(transparent)]
    Arrivals(#[from] shared::arrivals::ArrivalError),
    #[error("HTTP client: {0}")]
    Client(String),
}

/// One request to send: its prompt, completion length, and send time from the start.
#[derive(Debug, Clone)]
pub struct BenchRequest {
    pub prompt: String,
    pub max_tokens: usize,
    pub at: Duration,
}

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub base_url: String,
    pub model: Option<String>,
    pub api_key: Option<String>,
    pub requests: Vec<BenchRequest>,
    /// Goodput counts requests meeting both SLOs (milliseconds).
    pub slo_ttft_ms: Option<f64>,
    pub slo_tpot_ms: Option<f64>,
}

/// First human turns of a ShareGPT JSON file (`[{"conversations": [{"from", "value"}]}]`).
pub fn sharegpt_prompts(text: &str) -> Result<Vec<String>, BenchError> {
    let v: Value = serde_json::from_str(text).map_err(|e| BenchError::Prompts(e.to_string()))?;
    let items = v
        .as_array()
        .ok_or_else(|| BenchError::Prompts("expected a JSON array".into()))?;
    let prompts: Vec<String> = items
        .iter()
        .filter_map(|it| {
            it.get("conversations")?
                .as_array()?
                .iter()
                .find(|t| t.get("from").and_then(Value::as_str) == Some("human"))?
                .get("value")?
                .as_str()
                .map(str::to_string)
        })
        .filter(|p| !p.is_empty())
        .collect();
    if prompts.is_empty() {
        return Err(BenchError::Prompts("no human turns found".into()));
    }
    Ok(prompts)
}

/// Arrival offsets and generated lengths of the Azure LLM trace CSV
/// (`TIMESTAMP,ContextTokens,GeneratedTokens`), read by `shared::arrivals`.
pub fn azure_arrivals(text: &str) -> Result<Vec<(Duration, usize)>, BenchError> {
    Ok(shared::arrivals::parse_azure_csv(text.as_bytes())?
        .into_iter()
        .map(|r| (Duration::from_secs_f64(r.arrival_s), r.output_tokens))
        .collect())
}

/// Poisson arrivals at `rate` requests per second (deterministic for a seed).
pub fn poisson_arrivals(n: usize, rate: f64, seed: u64) -> Vec<Duration> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            if rate.is_finite() && rate > 0.0 {
                t += -(1.0 - rng.gen::<f64>()).ln() / rate;
            }
            Duration::from_secs_f64(t)
        })
        .collect()
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub mean: f64,
    pub median: f64,
    pub p99: f64,
}

fn summarize(mut v: Vec<f64>) -> Summary {
    if v.is_empty() {
        return Summary::default();
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Summary {
        mean: v.iter().sum::<f64>() / v.len() as f64,
        median: at(0.5),
        p99: at(0.99),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub completed: usize,
    pub failed: usize,
    pub duration_s: f64,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub ttft_ms: Summary,
    pub tpot_ms: Summary,
    pub itl_ms: Summary,
    pub e2e_ms: Summary,
    pub goodput: Option<f64>,
    pub errors: Vec<String>,
}

/// What happened to one request (seconds from its send time, which is its arrival time).
#[derive(Debug, Clone)]
pub struct Outcome {
    pub ok: bool,
    pub error: Option<String>,
    pub ttft: f64,
    pub itls: Vec<f64>,
    pub e2e: f64,
    /// Token counts the server reported in `usage`.
    pub input_tokens: usize,
    pub output_tokens: usize,
}

async fn one(client: &reqwest::Client, cfg: &BenchConfig, req: &BenchRequest) -> Outcome {
    let mut body = json!({"prompt": req.prompt, "max_tokens": req.max_tokens, "stream": true,
        "stream_options": {"include_usage": true}, "ignore_eos": true, "temperature": 0});
    if let Some(m) = &cfg.model {
        body["model"] = json!(m);
    }
    let mut out = Outcome {
        ok: false,
        error: None,
        ttft: 0.0,
        itls: Vec::new(),
        e2e: 0.0,
        input_tokens: 0,
        output_tokens: 0,
    };
    let start = Instant::now();
    let mut r = client.post(format!("{}/v1/completions", cfg.base_url.trim_end_matches('/')));
    if let Some(k) = &cfg.api_key {
        r = r.bearer_auth(k);
    }
    let resp = match r.json(&body).send().await {
        Ok(resp) => resp,
        Err(e) => {
            out.error = Some(e.to_string());
            return out;
        }
    };
    if !resp.status().is_success() {
        out.error = Some(format!(
            "HTTP {}: {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        ));
        return out;
    }
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut last: Option<Instant> = None;
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                out.error = Some(e.to_string());
                return out;
            }
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(pos) = buf.find("\n\n") {
            let event: String = buf.drain(..pos + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data:")).map(str::trim) else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if let Some(e) = v.get("error") {
                out.error = Some(e.to_string());
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                out.input_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                out.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
            }
            if v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                let now = Instant::now();
                match last {
                    None => out.ttft = now.duration_since(start).as_secs_f64(),
                    Some(p) => out.itls.push(now.duration_since(p).as_secs_f64()),
                }
                last = Some(now);
            }
        }
    }
    out.e2e = start.elapsed().as_secs_f64();
    out.ok = done && out.error.is_none();
    if !done && out.error.is_none() {
        out.error = Some("stream ended without [DONE]".into());
    }
    out
}

pub async fn run(cfg: &BenchConfig) -> Result<BenchReport, BenchError> {
    Ok(run_detailed(cfg).await?.0)
}

/// As [`run`], also returning every request's outcome in the order of `cfg.requests`.
pub async fn run_detailed(cfg: &BenchConfig) -> Result<(BenchReport, Vec<Outcome>), BenchError> {
    let client = pki::https::http_client_builder()
        .pool_max_idle_per_host(1024)
        .build()
        .map_err(|e| BenchError::Client(e.to_string()))?;
    let start = Instant::now();
    let tasks = cfg.requests.iter().map(|req| {
        let client = &client;
        async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(start + req.at)).await;
            one(client, cfg, req).await
        }
    });
    let outcomes = futures_util::future::join_all(tasks).await;
    let duration = start.elapsed().as_secs_f64().max(1e-9);
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok).collect();
    let tpot = |o: &Outcome| (o.e2e - o.ttft) / (o.output_tokens.max(2) - 1) as f64;
    let good = match (cfg.slo_ttft_ms, cfg.slo_tpot_ms) {
        (None, None) => None,
        (a, b) => Some(
            ok.iter()
                .filter(|o| a.is_none_or(|a| o.ttft * 1e3 <= a) && b.is_none_or(|b| tpot(o) * 1e3 <= b))
                .count() as f64
                / duration,
        ),
    };
    let total_in: usize = ok.iter().map(|o| o.input_tokens).sum();
    let total_out: usize = ok.iter().map(|o| o.output_tokens).sum();
    let ms = |v: Vec<f64>| {
        let s = summarize(v);
        Summary {
            mean: s.mean * 1e3,
            median: s.median * 1e3,
            p99: s.p99 * 1e3,
        }
    };
    let mut errors: Vec<String> = outcomes.iter().filter_map(|o| o.error.clone()).collect();
    errors.truncate(10);
    let report = BenchReport {
        completed: ok.len(),
        failed: outcomes.len() - ok.len(),
        duration_s: duration,
        total_input_tokens: total_in,
        total_output_tokens: total_out,
        request_throughput: ok.len() as f64 / duration,
        output_throughput: total_out as f64 / duration,
        total_token_throughput: (total_in + total_out) as f64 / duration,
        ttft_ms: ms(ok.iter().map(|o| o.ttft).collect()),
        tpot_ms: ms(ok.iter().filter(|o| o.output_tokens > 1).map(|o| tpot(o)).collect()),
        itl_ms: ms(ok.iter().flat_map(|o| o.itls.iter().copied()).collect()),
        e2e_ms: ms(ok.iter().map(|o| o.e2e).collect()),
        goodput: good,
        errors,
    };
    Ok((report, outcomes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_azure_rows_and_sharegpt_turns() {
        let csv =
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.5,374,44\n2023-11-16 18:15:50.0,396,109\n";
        let a = azure_arrivals(csv).unwrap();
        assert_eq!(a.len(), 2);
        assert!((a[1].0.as_secs_f64() - 3.5).abs() < 1e-9 && a[1].1 == 109);
        assert!(matches!(
            azure_arrivals("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:x:00,1,2\n"),
            Err(BenchError::Arrivals(shared::arrivals::ArrivalError::Line {
                line: 2,
                ..
            }))
        ));
        let p = sharegpt_prompts(r#"[{"conversations": [{"from": "human", "value": "hi"}]}, {"conversations": []}]"#);
        assert_eq!(p.unwrap(), vec!["hi".to_string()]);
        assert!(sharegpt_prompts("{}").is_err());
    }
}
