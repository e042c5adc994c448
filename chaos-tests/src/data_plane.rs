//! The data plane under fault: `moeless worker` processes beside the control plane, endpoint
//! replicas (`moeless up --control`, the built-in model) whose experts run on them, and clients
//! that send OpenAI completions through them, fail over between them as a client behind a load
//! balancer does, and count what came back.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::cluster::{generate_certs, ControlPlane};

/// Workers and endpoints, all on this machine's loopback (the control plane may sit in network
/// namespaces; its addresses are reachable from here). The endpoints are replicas of one
/// service, as behind a load balancer: each runs its own engine whose experts run on the
/// workers, and a restarted endpoint comes back on its own port.
pub struct Fleet {
    binary: PathBuf,
    control: String,
    tls: PathBuf,
    dir: PathBuf,
    workers: Vec<Option<Child>>,
    endpoints: Vec<Option<Child>>,
    /// `HOST:PORT` of each endpoint (fixed for the fleet's life).
    endpoint_addrs: Vec<String>,
}

/// SIGTERM: a graceful stop (workers drain, endpoints finish what they hold).
fn terminate(child: &Child, what: &str) -> Result<()> {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    if !status.success() {
        bail!("kill -TERM {what} failed");
    }
    Ok(())
}

/// The process's exit status if it has exited (the slot is then empty).
fn try_exit(slot: &mut Option<Child>, what: &str) -> Result<Option<ExitStatus>> {
    let Some(c) = slot.as_mut() else {
        bail!("{what} is not running");
    };
    let status = c.try_wait()?;
    if status.is_some() {
        *slot = None;
    }
    Ok(status)
}

fn kill(slot: &mut Option<Child>) {
    if let Some(mut c) = slot.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Fleet {
    /// Starts `workers` workers (ids 1..=workers) and `endpoints` endpoints, and waits until
    /// every endpoint serves.
    pub fn start(cp: &ControlPlane, workers: usize, endpoints: usize, dir: &Path) -> Result<Self> {
        let mut names: Vec<String> = (1..=workers).map(|i| format!("worker-{i}")).collect();
        names.push("engine".into());
        // Adds certificates under the control plane's CA.
        generate_certs(cp.binary(), &cp.tls_dir(), &names)?;
        let control = cp
            .raft_addrs()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut fleet = Fleet {
            binary: cp.binary().to_path_buf(),
            control,
            tls: cp.tls_dir(),
            dir: dir.to_path_buf(),
            workers: (0..workers).map(|_| None).collect(),
            endpoints: (0..endpoints).map(|_| None).collect(),
            endpoint_addrs: (0..endpoints)
                .map(|_| format!("127.0.0.1:{}", crate::ports::free_loopback_port()))
                .collect(),
        };
        for i in 0..workers {
            fleet.start_worker(i)?;
        }
        for i in 0..endpoints {
            fleet.start_endpoint(i)?;
        }
        Ok(fleet)
    }

    fn log(&self, name: &str) -> Result<File> {
        File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .with_context(|| format!("opening {name}.log"))
    }

    /// Starts worker `i` (id `i + 1`); a restarted worker rejoins under the same id.
    pub fn start_worker(&mut self, i: usize) -> Result<()> {
        if self.workers[i].is_some() {
            bail!("worker {} is already running", i + 1);
        }
        let id = (i + 1).to_string();
        let child = Command::new(&self.binary)
            .args([
                "worker",
                "--id",
                &id,
                "--control",
                &self.control,
                "--listen",
                "127.0.0.1:0",
            ])
            .arg("--tls-dir")
            .arg(&self.tls)
            .args(["--tls-name", &format!("worker-{id}")])
            .args(["--heartbeat-ms", "50", "--threads", "1", "--memory-gb", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log(&format!("worker-{id}"))?)
            .spawn()
            .context("starting a worker")?;
        self.workers[i] = Some(child);
        Ok(())
    }

    /// Starts endpoint `i` on its port and waits (up to 90 s) until it says it serves.
    pub fn start_endpoint(&mut self, i: usize) -> Result<()> {
        if self.endpoints[i].is_some() {
            bail!("endpoint {} is already running", i + 1);
        }
        let (host, port) = self.endpoint_addrs[i].rsplit_once(':').context("endpoint address")?;
        let mut child = Command::new(&self.binary)
            .args([
                "up",
                "--host",
                host,
                "--port",
                port,
                "--served-model-name",
                SERVED_MODEL,
            ])
            .args(["--control", &self.control])
            .arg("--tls-dir")
            .arg(&self.tls)
            .args(["--cluster-wait-s", "60"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting an endpoint")?;
        let stderr = child.stderr.take().context("endpoint stderr")?;
        self.endpoints[i] = Some(child);
        let mut log = self.log(&format!("endpoint-{}", i + 1))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Write;
            for line in BufReader::new(stderr).lines().map_while(std::result::Result::ok) {
                let _ = writeln!(log, "{line}");
                if line.contains("at http://") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(90))
            .with_context(|| format!("endpoint {} did not come up (log in {})", i + 1, self.dir.display()))
    }

    /// How many workers the fleet has (ids 1..=N).
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// `HOST:PORT` of every endpoint, running or not.
    pub fn endpoint_addrs(&self) -> &[String] {
        &self.endpoint_addrs
    }

    /// SIGKILL worker `i`.
    pub fn kill_worker(&mut self, i: usize) {
        kill(&mut self.workers[i]);
    }

    /// SIGTERM worker `i`: a graceful drain.
    pub fn terminate_worker(&mut self, i: usize) -> Result<()> {
        let c = self.workers[i]
            .as_ref()
            .with_context(|| format!("worker {} is not running", i + 1))?;
        terminate(c, &format!("worker {}", i + 1))
    }

    /// Worker `i`'s exit status if it has exited (it is then no longer running).
    pub fn try_exit(&mut self, i: usize) -> Result<Option<ExitStatus>> {
        try_exit(&mut self.workers[i], &format!("worker {}", i + 1))
    }

    /// SIGKILL endpoint `i`.
    pub fn kill_endpoint(&mut self, i: usize) {
        kill(&mut self.endpoints[i]);
    }

    /// SIGTERM endpoint `i`: it stops accepting and finishes the requests it holds.
    pub fn terminate_endpoint(&mut self, i: usize) -> Result<()> {
        let c = self.endpoints[i]
            .as_ref()
            .with_context(|| format!("endpoint {} is not running", i + 1))?;
        terminate(c, &format!("endpoint {}", i + 1))
    }

    /// Endpoint `i`'s exit status if it has exited (it is then no longer running).
    pub fn try_exit_endpoint(&mut self, i: usize) -> Result<Option<ExitStatus>> {
        try_exit(&mut self.endpoints[i], &format!("endpoint {}", i + 1))
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in self.workers.iter_mut().chain(self.endpoints.iter_mut()) {
            kill(c);
        }
    }
}

/// The health the control plane reports for worker `id` (`active`, `draining`, `dead`).
pub async fn worker_health(cp: &ControlPlane, id: u64) -> Option<String> {
    cp.get_any("/v1/workers")
        .await?
        .as_array()?
        .iter()
        .find(|w| w["id"].as_u64() == Some(id))
        .and_then(|w| w["health"].as_str())
        .map(String::from)
}

/// The model the endpoints serve (registered by the first of them to start).
pub const SERVED_MODEL: &str = "moeless";

/// Which workers the latest plan of the served model places instances on (`GET
/// /v1/placement?model=` through any node).
pub async fn plan_holders(cp: &ControlPlane) -> Option<std::collections::BTreeSet<u64>> {
    let plan = cp.get_any(&format!("/v1/placement?model={SERVED_MODEL}")).await?;
    Some(
        plan["instances"]
            .as_array()?
            .iter()
            .filter_map(|x| x["worker"].as_u64())
            .collect(),
    )
}

/// Prompts for the load: ShareGPT's first human turns from the reference data when it is
/// there (`MOELESS_SHARED_DIR`), cut to a few hundred bytes (the built-in model's tokenizer is
/// byte-level), else a fixed few.
pub fn prompts() -> Vec<String> {
    let from_shared = std::env::var_os("MOELESS_SHARED_DIR")
        .map(|d| PathBuf::from(d).join("data/prompts/ShareGPT_V3_filtered_1000.json"))
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| {
            let list: Vec<String> = v
                .as_array()?
                .iter()
                .filter_map(|c| c["conversations"][0]["value"].as_str())
                .map(|s| s.chars().take(200).collect())
                .filter(|s: &String| !s.is_empty())
                .collect();
            (!list.is_empty()).then_some(list)
        });
    from_shared.unwrap_or_else(|| {
        [
            "Explain expert parallelism.",
            "Write a haiku about GPUs.",
            "What is Raft?",
        ]
        .map(String::from)
        .to_vec()
    })
}

/// The Azure LLM inference trace 2023 (conversation), relative to `MOELESS_SHARED_DIR`.
pub const AZURE_CONV_TRACE: &str = "data/arrivals/azure-llm-2023/AzureLLMInferenceTrace_conv.csv";

/// Completion lengths are capped at this: the trace's own lengths (median ~130 tokens) would
/// keep a 2-core machine's CPU workers busy for minutes per trial.
pub const MAX_TOKENS_CAP: usize = 16;

/// When inference requests are sent: one request per arrival (open loop, as production traffic
/// arrives whatever the server's state), as offsets from the start and completion lengths.
#[derive(Debug, Clone)]
pub struct Pace(pub Vec<(Duration, usize)>);

/// Request arrivals for the inference load: the Azure LLM 2023 conversation trace under
/// `shared_dir` (the reference data, `MOELESS_SHARED_DIR`), its gaps divided by `rate_scale` (4 replays it four times as fast, ~22
/// requests/s on average, in the trace's own bursts) and repeated end to end to cover `duration`, completion lengths capped at
/// [`MAX_TOKENS_CAP`]; with it, a description of the source for the report. Without the
/// reference data (or when it cannot be read), the trace's mean rate (5.5 requests/s) times
/// `rate_scale`, evenly spaced, and the description says so.
pub fn trace_arrivals(shared_dir: Option<&Path>, duration: Duration, rate_scale: f64) -> (Pace, String) {
    let path = shared_dir.map(|d| d.join(AZURE_CONV_TRACE));
    let read = path.as_ref().map(|p| -> Result<Vec<(Duration, usize)>> {
        let file = File::open(p).with_context(|| format!("opening {}", p.display()))?;
        let all = shared::arrivals::parse_azure_csv(BufReader::new(file))?;
        let cut = shared::arrivals::window(&all, duration.as_secs_f64(), rate_scale)?;
        Ok(cut
            .into_iter()
            .map(|r| {
                (
                    Duration::from_secs_f64(r.arrival_s),
                    r.output_tokens.clamp(1, MAX_TOKENS_CAP),
                )
            })
            .collect())
    });
    match read {
        Some(Ok(arrivals)) => (
            Pace(arrivals),
            format!("azure-llm-2023 conv arrivals x{rate_scale}, max_tokens <= {MAX_TOKENS_CAP}"),
        ),
        other => {
            let rate = 5.5 * rate_scale;
            if let Some(Err(e)) = other {
                tracing::warn!(error = %format!("{e:#}"), rate, "arrival trace unreadable; evenly spaced arrivals instead");
            }
            let n = (duration.as_secs_f64() * rate) as u32;
            let steady = (0..n)
                .map(|i| (Duration::from_secs_f64(f64::from(i) / rate), 8))
                .collect();
            (
                Pace(steady),
                format!("evenly spaced, {rate} requests/s (no arrival trace)"),
            )
        }
    }
}

/// OpenAI completions sent to a set of endpoint replicas, as a client behind a load balancer
/// sees them: request `k` goes first to endpoint `k mod N`; a connection that cannot be made
/// or breaks before the answer, or a 503/429 (the server asking the client to come back), sends
/// it on to the next endpoint (completions hold no server state, so a retry is safe). Only
/// after every endpoint refused does it back off (Retry-After, at most 2 s) and go round again,
/// five rounds in all. Anything else (a 4xx, a 500, a malformed answer, a 30 s timeout) fails
/// the request.
#[derive(Clone)]
pub struct FailoverClient {
    http: reqwest::Client,
    urls: Arc<Vec<String>>,
}

/// How one successful request went.
#[derive(Debug, Clone, Copy)]
pub struct Completed {
    /// Endpoints tried before the one that answered.
    pub failed_over: usize,
}

/// Why one try did not complete.
enum Try {
    /// Send it elsewhere (after `Some(s)` seconds once every endpoint said so).
    Elsewhere(String, Option<u64>),
    Fail(String),
}

const ROUNDS: usize = 5;

impl FailoverClient {
    pub fn new(addrs: &[String]) -> Result<Self> {
        if addrs.is_empty() {
            bail!("no endpoint to send requests to");
        }
        let http = pki::https::http_client_builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        let urls = addrs.iter().map(|a| format!("http://{a}/v1/completions")).collect();
        Ok(Self {
            http,
            urls: Arc::new(urls),
        })
    }

    /// Sends one completion, starting at endpoint `first` (mod N).
    pub async fn complete(
        &self,
        first: usize,
        prompt: &str,
        max_tokens: usize,
    ) -> std::result::Result<Completed, String> {
        let body = json!({"model": SERVED_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0});
        let n = self.urls.len();
        let mut last = String::new();
        let mut wait = 0;
        for attempt in 0..ROUNDS * n {
            let url = &self.urls[(first + attempt) % n];
            match self.try_once(url, &body).await {
                Ok(()) => return Ok(Completed { failed_over: attempt }),
                Err(Try::Fail(e)) => return Err(format!("{url}: {e}")),
                Err(Try::Elsewhere(e, retry_after)) => {
                    last = format!("{url}: {e}");
                    wait = wait.max(retry_after.unwrap_or(0));
                }
            }
            if (attempt + 1) % n == 0 {
                // Every endpoint refused this round: back off before the next.
                let pause = if wait > 0 {
                    Duration::from_secs(wait.min(2))
                } else {
                    Duration::from_millis(100)
                };
                tokio::time::sleep(pause).await;
                wait = 0;
            }
        }
        Err(format!("no endpoint answered in {ROUNDS} rounds; last: {last}"))
    }

    async fn try_once(&self, url: &str, body: &Value) -> std::result::Result<(), Try> {
        let resp = match self.http.post(url).json(body).send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Err(Try::Fail(format!("timed out: {e}"))),
            // Refused, reset or closed before an answer: the endpoint is down or going down.
            Err(e) => return Err(Try::Elsewhere(format!("sending: {e}"), None)),
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            // The connection broke while the answer came.
            Err(e) => return Err(Try::Elsewhere(format!("{status}: reading the answer: {e}"), None)),
        };
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Try::Fail(format!("{status}: an answer that is not JSON: {e}")))?;
        match status {
            200 if v["choices"][0]["text"].is_string() => Ok(()),
            429 | 503 => Err(Try::Elsewhere(format!("{status}: {v}"), retry_after.or(Some(1)))),
            _ => Err(Try::Fail(format!("{status}: {v}"))),
        }
    }
}

/// Requests sent through a [`FailoverClient`] until stopped; each is counted ok or failed.
pub struct InferenceLoad {
    stop: Arc<AtomicBool>,
    tally: Tally,
    dispatcher: tokio::task::JoinHandle<()>,
}

/// What the inference clients saw.
pub struct InferenceOutcome {
    pub ok: u64,
    pub failed: u64,
    /// Successful requests that one endpoint or more failed to answer first.
    pub failed_over: u64,
    pub errors: Vec<String>,
    pub latencies_ms: Vec<f64>,
}

/// The requests' outcomes.
#[derive(Clone, Default)]
struct Tally {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    failed_over: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    latencies_ms: Arc<Mutex<Vec<f64>>>,
    backlog: Backlog,
}

/// The requests in flight (by arrival number) and when each was sent.
#[derive(Clone, Default)]
pub struct Backlog(Arc<Mutex<BTreeMap<usize, std::time::Instant>>>);

impl Backlog {
    fn sent_before(&self, t: std::time::Instant) -> usize {
        self.0
            .lock()
            .map(|m| m.values().filter(|&&s| s < t).count())
            .unwrap_or(0)
    }

    /// Waits until every request sent before `since` has finished (answered or failed), so
    /// that a fault's backlog is gone before the next fault; how long that took. An error if
    /// some are still in flight after `limit`.
    pub async fn drained(&self, since: std::time::Instant, limit: Duration) -> Result<Duration> {
        loop {
            let left = self.sent_before(since);
            if left == 0 {
                return Ok(since.elapsed());
            }
            if since.elapsed() > limit {
                bail!("{left} requests sent before healing still in flight {limit:?} after it");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Tally {
    async fn send(&self, client: &FailoverClient, k: usize, prompt: &str, max_tokens: usize) {
        let sent = std::time::Instant::now();
        if let Ok(mut m) = self.backlog.0.lock() {
            m.insert(k, sent);
        }
        let result = client.complete(k, prompt, max_tokens).await;
        if let Ok(mut m) = self.backlog.0.lock() {
            m.remove(&k);
        }
        match result {
            Ok(done) => {
                if let Ok(mut v) = self.latencies_ms.lock() {
                    v.push(sent.elapsed().as_secs_f64() * 1e3);
                }
                if done.failed_over > 0 {
                    self.failed_over.fetch_add(1, Ordering::Relaxed);
                }
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                if let Ok(mut v) = self.errors.lock() {
                    v.push(e);
                }
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl InferenceLoad {
    /// The requests in flight, to wait for a fault's backlog to drain.
    pub fn backlog(&self) -> Backlog {
        self.tally.backlog.clone()
    }

    /// Sends one request per arrival of `pace` through `client`, spread over its endpoints.
    pub fn start(client: FailoverClient, pace: Pace) -> Self {
        let prompts = Arc::new(prompts());
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Tally::default();
        let Pace(arrivals) = pace;
        let dispatcher = {
            let (stop, tally) = (stop.clone(), tally.clone());
            tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                let mut in_flight = tokio::task::JoinSet::new();
                'arrivals: for (k, (at, max_tokens)) in arrivals.into_iter().enumerate() {
                    // Wait for the arrival, looking at `stop` at least every 100 ms.
                    loop {
                        if stop.load(Ordering::Relaxed) {
                            break 'arrivals;
                        }
                        let now = tokio::time::Instant::now();
                        if now >= start + at {
                            break;
                        }
                        tokio::time::sleep((start + at - now).min(Duration::from_millis(100))).await;
                    }
                    let (client, prompts, tally) = (client.clone(), prompts.clone(), tally.clone());
                    in_flight.spawn(async move {
                        tally.send(&client, k, &prompts[k % prompts.len()], max_tokens).await;
                    });
                    // Reap finished requests as we go.
                    while in_flight.try_join_next().is_some() {}
                }
                // Requests already sent finish (or time out) and are counted.
                while in_flight.join_next().await.is_some() {}
            })
        };
        Self {
            stop,
            tally,
            dispatcher,
        }
    }

    pub async fn stop(self) -> InferenceOutcome {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.dispatcher.await;
        let t = self.tally;
        InferenceOutcome {
            ok: t.ok.load(Ordering::Relaxed),
            failed: t.failed.load(Ordering::Relaxed),
            failed_over: t.failed_over.load(Ordering::Relaxed),
            errors: t.errors.lock().map(|v| v.clone()).unwrap_or_default(),
            latencies_ms: t.latencies_ms.lock().map(|v| v.clone()).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real trace from the reference data (`MOELESS_SHARED_DIR`, default `../shared`).
    #[test]
    fn arrivals_follow_the_azure_trace_at_the_asked_speed() {
        let dir = std::env::var_os("MOELESS_SHARED_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
        assert!(
            dir.join(AZURE_CONV_TRACE).exists(),
            "reference data {} is missing: set MOELESS_SHARED_DIR",
            dir.display()
        );
        let (Pace(a), source) = trace_arrivals(Some(&dir), Duration::from_secs(600), 4.0);
        assert!(source.starts_with("azure-llm-2023"), "{source}");
        assert_eq!(a[0].0, Duration::ZERO);
        assert!(a.windows(2).all(|w| w[0].0 <= w[1].0), "arrivals in order");
        assert!(a
            .iter()
            .all(|(at, n)| *at < Duration::from_secs(600) && (1..=MAX_TOKENS_CAP).contains(n)));
        // The trace averages ~5.5 requests/s; four times as fast over 600 s is ~13,000.
        let rate = a.len() as f64 / 600.0;
        assert!((15.0..30.0).contains(&rate), "{rate} requests/s");
        // Real arrivals are bursty, not evenly spaced.
        let gaps: Vec<f64> = a.windows(2).map(|w| (w[1].0 - w[0].0).as_secs_f64()).collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
        assert!(var.sqrt() > 0.5 * mean, "gaps vary (cv {})", var.sqrt() / mean);
    }

    #[test]
    fn without_the_trace_arrivals_are_evenly_spaced_and_said_so() {
        let dir = tempfile::tempdir().unwrap();
        let (Pace(a), source) = trace_arrivals(Some(dir.path()), Duration::from_secs(10), 2.0);
        assert!(source.contains("no arrival trace"), "{source}");
        assert_eq!(a.len(), 110);
        let (Pace(b), _) = trace_arrivals(None, Duration::from_secs(10), 2.0);
        assert_eq!(a, b);
    }
}
