//! Load on the control plane's admin API and the history of what it answered.
//!
//! Clients write the policy (a register: each write carries a unique `keep_alive_ms`), read it,
//! commit placement plans (each with a unique `reason`) and read the latest plan, against a
//! random node each time. Every operation is recorded with its call and return time and an
//! outcome: ok, fail (certainly without effect) or unknown (may have taken effect).
//!
//! Retries follow what the API says: a refused connection never reached a node, and a 503
//! (`not_leader`/`no_leader`) asks the client to go elsewhere, so both are retried on the next
//! node; a timeout, a reset or another 5xx is ambiguous and ends the operation as unknown. A read
//! whose `x-moeless-read` header is not `linearizable` came from a node's local, possibly stale
//! state and is retried on another node. A write that saw a 503 stays unknown if it finally
//! fails, because a follower may have forwarded it to the leader before answering 503.
//!
//! Every write carries an `Idempotency-Key` unique to the operation and kept across its retries,
//! so the API applies it at most once: a write whose answer was lost (timeout, reset) is retried
//! too, and stays unknown only if no attempt is answered before the operation's deadline.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster::ADMIN_TOKEN;

/// The model every plan is committed for (registered once by the harness).
pub const MODEL: &str = "chaos";

/// The latest plan of [`MODEL`].
const LATEST_PLAN: &str = "/v1/placement?model=chaos";

pub fn model_spec() -> Value {
    json!({"name": MODEL, "architecture": "mixtral", "num_layers": 1, "num_experts": 2, "top_k": 1, "weights": "/nonexistent"})
}

/// A policy document whose `keep_alive_ms` tags the write; no scaling loop (interval 0), so the
/// control plane commits no plans of its own.
pub fn policy(tag: u64) -> Value {
    json!({"placement": "moeless", "predictor": "ema", "rebalance_interval_ms": 0, "keep_alive_ms": tag, "max_replicas_per_expert": 2})
}

/// A plan with no instances: valid without registered workers, so plans need no worker.
pub fn plan(reason: &str) -> Value {
    json!({"model": MODEL, "reason": reason, "instances": []})
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum AdminOp {
    PutPolicy(u64),
    GetPolicy,
    CommitPlan(String),
    GetLatestPlan,
    /// The harness' failover probe: a write (`PUT /v1/predictor`) kept out of the policy
    /// register, because dozens of probes are in flight at once during a fault and, as writes
    /// nobody reads, they would only multiply the orders the checker has to try.
    Probe(u64),
}

impl AdminOp {
    pub fn is_write(&self) -> bool {
        matches!(self, AdminOp::PutPolicy(_) | AdminOp::CommitPlan(_) | AdminOp::Probe(_))
    }

    /// The `Idempotency-Key` of a write: policy tags and plan reasons are unique per operation.
    pub fn idempotency_key(&self) -> Option<String> {
        match self {
            AdminOp::PutPolicy(tag) => Some(format!("policy-{tag}")),
            AdminOp::CommitPlan(reason) => Some(format!("plan-{reason}")),
            AdminOp::Probe(tag) => Some(format!("probe-{tag}")),
            AdminOp::GetPolicy | AdminOp::GetLatestPlan => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum OpResult {
    Written,
    Policy(u64),
    Committed(u64),
    Latest { epoch: u64, reason: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Outcome {
    Ok(OpResult),
    Fail(String),
    Unknown(String),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Event {
    pub client: u64,
    pub op: AdminOp,
    /// Nanoseconds since the history's origin.
    pub call: u64,
    pub ret: u64,
    pub outcome: Outcome,
    /// Requests sent for this operation (retries after refused connections and 503s).
    pub attempts: u32,
}

/// The shared, append-only record of operations.
pub struct History {
    origin: Instant,
    events: Mutex<Vec<Event>>,
}

impl History {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            events: Mutex::new(Vec::new()),
        })
    }

    pub fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    pub fn at(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.origin).as_nanos() as u64
    }

    pub fn record(&self, e: Event) {
        if let Ok(mut v) = self.events.lock() {
            v.push(e);
        }
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// One try of an operation on one node.
enum Attempt {
    Ok(OpResult),
    /// Certainly not applied: try the next node.
    Retry {
        ambiguous: bool,
        why: String,
    },
    Fail(String),
    Unknown(String),
}

/// A client of the admin API over a set of nodes.
#[derive(Clone)]
pub struct AdminClient {
    http: reqwest::Client,
    nodes: Vec<SocketAddr>,
    pub read_timeout: Duration,
    /// Above the node's own 3 s wait for a leader, so a write answers before the client gives up.
    pub write_timeout: Duration,
    /// How long one operation may keep retrying across nodes.
    pub op_deadline: Duration,
}

impl AdminClient {
    pub fn new(nodes: Vec<SocketAddr>) -> anyhow::Result<Self> {
        Ok(Self {
            http: pki::https::http_client_builder()
                .connect_timeout(Duration::from_millis(300))
                .pool_idle_timeout(Duration::from_secs(2))
                .build()?,
            nodes,
            read_timeout: Duration::from_millis(1000),
            write_timeout: Duration::from_millis(4000),
            op_deadline: Duration::from_secs(5),
        })
    }

    async fn attempt(&self, node: SocketAddr, op: &AdminOp) -> Attempt {
        let (method, path, body) = match op {
            AdminOp::PutPolicy(tag) => (reqwest::Method::PUT, "/v1/policy", Some(policy(*tag))),
            AdminOp::GetPolicy => (reqwest::Method::GET, "/v1/policy", None),
            AdminOp::CommitPlan(reason) => (reqwest::Method::POST, "/v1/placement", Some(plan(reason))),
            // The harness' model only: the control plane commits plans of its own for the
            // model the endpoints serve, whose epochs the checker takes from the final log.
            AdminOp::GetLatestPlan => (reqwest::Method::GET, LATEST_PLAN, None),
            AdminOp::Probe(tag) => (
                reqwest::Method::PUT,
                "/v1/predictor",
                Some(json!({"name": "chaos-probe", "parameters": {"tag": tag}})),
            ),
        };
        let timeout = if op.is_write() {
            self.write_timeout
        } else {
            self.read_timeout
        };
        let mut req = self
            .http
            .request(method, format!("http://{node}{path}"))
            .bearer_auth(ADMIN_TOKEN)
            .timeout(timeout);
        if let Some(b) = &body {
            req = req.json(b);
        }
        if let Some(key) = op.idempotency_key() {
            req = req.header("idempotency-key", key);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() => {
                return Attempt::Retry {
                    ambiguous: false,
                    why: format!("connect {node}: {e}"),
                }
            }
            Err(e) => return Attempt::Unknown(format!("{node}: {e}")),
        };
        let status = resp.status().as_u16();
        let linearizable = resp
            .headers()
            .get("x-moeless-read")
            .is_some_and(|v| v.as_bytes() == b"linearizable");
        let value: Value = match resp.json().await {
            Ok(v) => v,
            Err(e) => return Attempt::Unknown(format!("{node}: reading the answer: {e}")),
        };
        match status {
            200..=299 => {}
            503 => {
                return Attempt::Retry {
                    ambiguous: op.is_write(),
                    why: format!("503 from {node}: {value}"),
                }
            }
            404 if *op == AdminOp::GetLatestPlan => {
                if !linearizable {
                    return Attempt::Retry {
                        ambiguous: false,
                        why: format!("{node} answered from local state"),
                    };
                }
                return Attempt::Ok(OpResult::Latest { epoch: 0, reason: None });
            }
            400..=499 => return Attempt::Fail(format!("{status} from {node}: {value}")),
            _ => return Attempt::Unknown(format!("{status} from {node}: {value}")),
        }
        if !op.is_write() && !linearizable {
            return Attempt::Retry {
                ambiguous: false,
                why: format!("{node} answered from local state"),
            };
        }
        let parsed = match op {
            AdminOp::PutPolicy(_) | AdminOp::Probe(_) => Some(OpResult::Written),
            AdminOp::GetPolicy => value["keep_alive_ms"].as_u64().map(OpResult::Policy),
            AdminOp::CommitPlan(_) => value["epoch"].as_u64().map(OpResult::Committed),
            AdminOp::GetLatestPlan => value["epoch"].as_u64().map(|epoch| OpResult::Latest {
                epoch,
                reason: value["reason"].as_str().map(String::from),
            }),
        };
        match parsed {
            Some(r) => Attempt::Ok(r),
            None => Attempt::Unknown(format!("unexpected answer from {node}: {value}")),
        }
    }

    /// POSTs `body` until a node accepts it (2xx), starting at node `first`.
    pub async fn http_post_json(&self, first: usize, path: &str, body: &Value) -> anyhow::Result<()> {
        let node = self.nodes[first % self.nodes.len()];
        let resp = self
            .http
            .post(format!("http://{node}{path}"))
            .bearer_auth(ADMIN_TOKEN)
            .timeout(self.write_timeout)
            .json(body)
            .send()
            .await?;
        let status = resp.status();
        anyhow::ensure!(
            status.is_success(),
            "{status} from {node}{path}: {}",
            resp.text().await.unwrap_or_default()
        );
        Ok(())
    }

    /// GETs `path` from whichever node answers linearizably, starting at node `*k` and leaving
    /// `*k` at the node that answered; `None` for a 404.
    pub async fn http_get_linearizable(
        &self,
        path: &str,
        within: Duration,
        k: &mut usize,
    ) -> anyhow::Result<Option<Value>> {
        let deadline = Instant::now() + within;
        loop {
            let node = self.nodes[*k % self.nodes.len()];
            let resp = self
                .http
                .get(format!("http://{node}{path}"))
                .bearer_auth(ADMIN_TOKEN)
                .timeout(self.read_timeout)
                .send()
                .await;
            if let Ok(r) = resp {
                let linearizable = r
                    .headers()
                    .get("x-moeless-read")
                    .is_some_and(|v| v.as_bytes() == b"linearizable");
                let status = r.status().as_u16();
                if linearizable && status == 404 {
                    return Ok(None);
                }
                if linearizable && status == 200 {
                    return Ok(Some(r.json().await?));
                }
            }
            *k += 1;
            anyhow::ensure!(Instant::now() < deadline, "no linearizable answer to GET {path}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs `op` starting at node `first`, retrying where the API allows; records it.
    pub async fn run(&self, history: &History, client: u64, op: AdminOp, first: usize) -> Outcome {
        let call = history.now();
        let started = Instant::now();
        let mut ambiguous = false;
        let mut node = first;
        let mut last;
        let mut attempts = 0;
        let outcome = loop {
            attempts += 1;
            match self.attempt(self.nodes[node % self.nodes.len()], &op).await {
                Attempt::Ok(r) => break Outcome::Ok(r),
                Attempt::Fail(why) if !ambiguous => break Outcome::Fail(why),
                Attempt::Fail(why) if !op.is_write() => break Outcome::Fail(why),
                Attempt::Fail(why) if op.is_write() => break Outcome::Unknown(why),
                // Keyed, so sending it again cannot apply it twice.
                Attempt::Unknown(why) if op.is_write() => {
                    ambiguous = true;
                    last = why;
                }
                // A read has no effect: whatever happened to it, it may be sent again.
                Attempt::Fail(why) | Attempt::Unknown(why) => last = why,
                Attempt::Retry { ambiguous: a, why } => {
                    ambiguous |= a;
                    last = why;
                }
            }
            if started.elapsed() > self.op_deadline {
                break if ambiguous {
                    Outcome::Unknown(format!("gave up: {last}"))
                } else {
                    Outcome::Fail(format!("gave up: {last}"))
                };
            }
            node += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        history.record(Event {
            client,
            op,
            call,
            ret: history.now(),
            outcome: outcome.clone(),
            attempts,
        });
        outcome
    }
}

/// Unique write tags: client id in the high bits, a sequence number in the low ones.
pub struct Tags {
    client: u64,
    next: AtomicU64,
}

impl Tags {
    pub fn new(client: u64) -> Self {
        Self {
            client,
            next: AtomicU64::new(1),
        }
    }
    pub fn next(&self) -> u64 {
        (self.client << 32) | self.next.fetch_add(1, Ordering::Relaxed)
    }
}

/// xorshift64: enough randomness for operation mixes, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Concurrent clients running a random mix until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(client: &AdminClient, history: &Arc<History>, clients: u64, think: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id());
        let tasks = (1..=clients)
            .map(|id| {
                let (client, history, stop) = (client.clone(), Arc::clone(history), Arc::clone(&stop));
                tokio::spawn(async move {
                    let tags = Tags::new(id);
                    let mut rng = Rng::new(seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    while !stop.load(Ordering::Relaxed) {
                        let op = match rng.below(10) {
                            0..=2 => AdminOp::PutPolicy(tags.next()),
                            3..=5 => AdminOp::GetPolicy,
                            6..=7 => AdminOp::CommitPlan(format!("c{id}-{}", tags.next() & 0xffff_ffff)),
                            _ => AdminOp::GetLatestPlan,
                        };
                        let first = rng.below(client.nodes.len() as u64) as usize;
                        client.run(&history, id, op, first).await;
                        tokio::time::sleep(think).await;
                    }
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops the clients after their current operation.
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Writes predictor state (recorded as client `probe_client`) through the nodes `nodes` only (indices
/// into the client's node list), a new write every `PROBE_EVERY` whether or not earlier ones
/// answered, until one succeeds; returns when it did. A write stuck on a node that lost its
/// leader does not hide that others already succeed: the measure of write availability.
pub async fn probe_write(
    client: &AdminClient,
    history: &Arc<History>,
    probe_client: u64,
    nodes: &[usize],
    within: Duration,
) -> Option<Instant> {
    const PROBE_EVERY: Duration = Duration::from_millis(50);
    let probe = Arc::new(AdminClient {
        nodes: nodes.iter().map(|&i| client.nodes[i]).collect(),
        op_deadline: Duration::ZERO,
        ..client.clone()
    });
    let tags = Arc::new(Tags::new(probe_client));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut k = 0;
    let found = loop {
        if started.elapsed() > within {
            break None;
        }
        k += 1;
        let (probe, tags, history, tx) = (Arc::clone(&probe), Arc::clone(&tags), Arc::clone(history), tx.clone());
        tasks.spawn(async move {
            let op = AdminOp::Probe(tags.next());
            if let Outcome::Ok(_) = probe.run(&history, probe_client, op, k).await {
                let _ = tx.send(Instant::now());
            }
        });
        if let Ok(Some(at)) = tokio::time::timeout(PROBE_EVERY, rx.recv()).await {
            break Some(at);
        }
    };
    // Let the probes in flight finish, so that each is recorded with its outcome.
    while tasks.join_next().await.is_some() {}
    found
}
