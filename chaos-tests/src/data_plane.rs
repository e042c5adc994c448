//! The data plane under fault: `moeless worker` processes beside the control plane, an endpoint
//! (`moeless up --control`, the built-in model) whose experts run on them, and clients that
//! send OpenAI completions through it and count what came back.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::cluster::{generate_certs, ControlPlane};

/// Workers and one endpoint, all on this machine's loopback (the control plane may sit in
/// network namespaces; its addresses are reachable from here).
pub struct Fleet {
    binary: PathBuf,
    control: String,
    tls: PathBuf,
    dir: PathBuf,
    workers: Vec<Option<Child>>,
    endpoint: Option<Child>,
    /// `HOST:PORT` of the endpoint once it listens.
    pub endpoint_addr: String,
}

impl Fleet {
    /// Starts `n` workers (ids 1..=n) and the endpoint, and waits until it serves.
    pub fn start(cp: &ControlPlane, n: usize, dir: &Path) -> Result<Self> {
        let mut names: Vec<String> = (1..=n).map(|i| format!("worker-{i}")).collect();
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
            workers: (0..n).map(|_| None).collect(),
            endpoint: None,
            endpoint_addr: String::new(),
        };
        for i in 0..n {
            fleet.start_worker(i)?;
        }
        fleet.start_endpoint()?;
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

    fn start_endpoint(&mut self) -> Result<()> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port().to_string();
        let mut child = Command::new(&self.binary)
            .args([
                "up",
                "--host",
                "127.0.0.1",
                "--port",
                &port,
                "--served-model-name",
                "moeless",
            ])
            .args(["--control", &self.control])
            .arg("--tls-dir")
            .arg(&self.tls)
            .args(["--cluster-wait-s", "60"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the endpoint")?;
        let stderr = child.stderr.take().context("endpoint stderr")?;
        self.endpoint = Some(child);
        let mut log = self.log("endpoint")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Write;
            for line in BufReader::new(stderr).lines().map_while(std::result::Result::ok) {
                let _ = writeln!(log, "{line}");
                if let Some(rest) = line.split_once("at http://").map(|x| x.1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_string());
                }
            }
        });
        self.endpoint_addr = rx
            .recv_timeout(Duration::from_secs(90))
            .with_context(|| format!("the endpoint did not come up (log in {})", self.dir.display()))?;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// SIGKILL worker `i`.
    pub fn kill_worker(&mut self, i: usize) {
        if let Some(mut c) = self.workers[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM worker `i`: a graceful drain.
    pub fn terminate_worker(&mut self, i: usize) -> Result<()> {
        let c = self.workers[i]
            .as_ref()
            .with_context(|| format!("worker {} is not running", i + 1))?;
        let status = Command::new("kill").args(["-TERM", &c.id().to_string()]).status()?;
        if !status.success() {
            bail!("kill -TERM worker {} failed", i + 1);
        }
        Ok(())
    }

    /// Worker `i`'s exit status if it has exited (it is then no longer running).
    pub fn try_exit(&mut self, i: usize) -> Result<Option<ExitStatus>> {
        let Some(c) = self.workers[i].as_mut() else {
            bail!("worker {} is not running", i + 1);
        };
        let status = c.try_wait()?;
        if status.is_some() {
            self.workers[i] = None;
        }
        Ok(status)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in self.workers.iter_mut().chain(std::iter::once(&mut self.endpoint)) {
            if let Some(mut c) = c.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
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

/// Which workers the latest plan places instances on (GET /v1/placement through any node).
pub async fn plan_holders(cp: &ControlPlane) -> Option<std::collections::BTreeSet<u64>> {
    let plan = cp.get_any("/v1/placement").await?;
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

/// Clients sending completions to the endpoint until stopped; each request is counted ok or
/// failed. Like the `openai` SDK, a client retries a 429 or 503 (the server asks it to, with
/// Retry-After) and nothing else.
pub struct InferenceLoad {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    pub errors: Arc<Mutex<Vec<String>>>,
    /// Latency of every successful request, in milliseconds.
    pub latencies_ms: Arc<Mutex<Vec<f64>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What the inference clients saw.
pub struct InferenceOutcome {
    pub ok: u64,
    pub failed: u64,
    pub errors: Vec<String>,
    pub latencies_ms: Vec<f64>,
}

impl InferenceLoad {
    pub fn start(addr: &str, clients: usize) -> Result<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        let prompts = Arc::new(prompts());
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let latencies_ms = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|c| {
                let (http, prompts, stop) = (http.clone(), prompts.clone(), stop.clone());
                let (ok, failed, errors) = (ok.clone(), failed.clone(), errors.clone());
                let latencies_ms = latencies_ms.clone();
                let url = format!("http://{addr}/v1/completions");
                tokio::spawn(async move {
                    let mut k = c;
                    while !stop.load(Ordering::Relaxed) {
                        let prompt = &prompts[k % prompts.len()];
                        k += clients;
                        let body = json!({"model": "moeless", "prompt": prompt, "max_tokens": 8, "temperature": 0});
                        let sent = std::time::Instant::now();
                        match complete(&http, &url, &body).await {
                            Ok(()) => {
                                if let Ok(mut v) = latencies_ms.lock() {
                                    v.push(sent.elapsed().as_secs_f64() * 1e3);
                                }
                                ok.fetch_add(1, Ordering::Relaxed)
                            }
                            Err(e) => {
                                if let Ok(mut v) = errors.lock() {
                                    v.push(e);
                                }
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        Ok(Self {
            stop,
            ok,
            failed,
            errors,
            latencies_ms,
            tasks,
        })
    }

    pub async fn stop(self) -> InferenceOutcome {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        InferenceOutcome {
            ok: self.ok.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            errors: self.errors.lock().map(|v| v.clone()).unwrap_or_default(),
            latencies_ms: self.latencies_ms.lock().map(|v| v.clone()).unwrap_or_default(),
        }
    }
}

async fn complete(http: &reqwest::Client, url: &str, body: &Value) -> std::result::Result<(), String> {
    for _ in 0..5 {
        let resp = http
            .post(url)
            .json(body)
            .send()
            .await
            .map_err(|e| format!("sending: {e}"))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let v: Value = resp
            .json()
            .await
            .map_err(|e| format!("{status}: reading the answer: {e}"))?;
        match status {
            200 if v["choices"][0]["text"].is_string() => return Ok(()),
            429 | 503 if retry_after.is_some() => {
                tokio::time::sleep(Duration::from_secs(retry_after.unwrap_or(1).min(2))).await;
            }
            _ => return Err(format!("{status}: {v}")),
        }
    }
    Err("still refused after 5 tries".into())
}
