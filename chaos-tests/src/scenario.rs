//! Scenarios: start a cluster, drive load, inject one fault per trial, heal, and check the
//! invariants over the recorded history.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::cluster::{ControlPlane, RaftTiming};
use crate::data_plane::{plan_holders, trace_arrivals, worker_health, FailoverClient, Fleet, InferenceLoad};
use crate::linearizability::{
    check, Operation, PlanInput, PlanLog, PlanOutput, Register, RegisterInput, RegisterOutput, Verdict,
};
use crate::net::Network;
use crate::workload::{
    model_spec, plan, probe_write, AdminClient, AdminOp, Event, History, Load, OpResult, Outcome, MODEL,
};

/// The faults of issue 8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scenario {
    LeaderKill,
    FollowerKill,
    LeaderPause,
    LeaderPartition,
    RollingRestart,
    WorkerKill,
    WorkerDrain,
    /// The leader's disk fails to flush (failpoint `append-before-flush=error`, armed over
    /// `PUT /v1/debug/failpoints`): the leader must stop (exit non-zero) without acknowledging
    /// the write, the others take over, and the restarted node rejoins from its disk.
    FsyncFailure,
    /// Membership change under load: remove node 1 from the voters (moving leadership off it
    /// first), wipe its disk, start it blank with `--initial-cluster-state existing` and add it
    /// back (`DELETE`/`POST /v1/members`) while clients keep writing.
    MembershipChange,
    /// Every worker in turn drained (SIGTERM), restarted and active again before the next, as
    /// an upgrade rolls through the data plane, under inference load: no request may fail.
    WorkerRollingRestart,
    /// One of the two endpoint replicas SIGKILLed under inference load: what it held is lost,
    /// and the clients must fail over to the other; it is restarted and must serve again.
    EndpointKill,
    /// Each endpoint replica in turn stopped (SIGTERM: it stops accepting and finishes what it
    /// holds), restarted and serving again before the next: no request may fail.
    EndpointRollingRestart,
}

impl Scenario {
    pub const ALL: [Scenario; 12] = [
        Scenario::LeaderKill,
        Scenario::FollowerKill,
        Scenario::LeaderPause,
        Scenario::LeaderPartition,
        Scenario::RollingRestart,
        Scenario::WorkerKill,
        Scenario::WorkerDrain,
        Scenario::FsyncFailure,
        Scenario::MembershipChange,
        Scenario::WorkerRollingRestart,
        Scenario::EndpointKill,
        Scenario::EndpointRollingRestart,
    ];

    /// The scenarios that run today (the control plane's).
    pub const CONTROL_PLANE: [Scenario; 7] = [
        Scenario::LeaderKill,
        Scenario::FollowerKill,
        Scenario::LeaderPause,
        Scenario::LeaderPartition,
        Scenario::RollingRestart,
        Scenario::FsyncFailure,
        Scenario::MembershipChange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::LeaderKill => "leader-kill",
            Scenario::FollowerKill => "follower-kill",
            Scenario::LeaderPause => "leader-pause",
            Scenario::LeaderPartition => "leader-partition",
            Scenario::RollingRestart => "rolling-restart",
            Scenario::WorkerKill => "worker-kill",
            Scenario::WorkerDrain => "worker-drain",
            Scenario::FsyncFailure => "fsync-failure",
            Scenario::MembershipChange => "membership-change",
            Scenario::WorkerRollingRestart => "worker-rolling-restart",
            Scenario::EndpointKill => "endpoint-kill",
            Scenario::EndpointRollingRestart => "endpoint-rolling-restart",
        }
    }

    /// Graceful events must fail no request; kills may fail at most 0.1%.
    pub fn graceful(self) -> bool {
        matches!(
            self,
            Scenario::RollingRestart
                | Scenario::WorkerDrain
                | Scenario::MembershipChange
                | Scenario::WorkerRollingRestart
                | Scenario::EndpointRollingRestart
        )
    }

    /// Faults of the data plane: workers and two endpoint replicas run beside the control
    /// plane, and the load is inference requests through the endpoints.
    pub fn data_plane(self) -> bool {
        matches!(
            self,
            Scenario::WorkerKill
                | Scenario::WorkerDrain
                | Scenario::WorkerRollingRestart
                | Scenario::EndpointKill
                | Scenario::EndpointRollingRestart
        )
    }
}

impl FromStr for Scenario {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Scenario::ALL.into_iter().find(|sc| sc.name() == s).with_context(|| {
            let names: Vec<_> = Scenario::ALL.iter().map(|s| s.name()).collect();
            format!("unknown scenario {s:?}; one of {} or all", names.join(", "))
        })
    }
}

/// How a scenario run is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `moeless` binary that runs the nodes.
    pub binary: PathBuf,
    pub trials: usize,
    /// How long leader-pause keeps the leader stopped (issue: 10 s).
    pub pause: Duration,
    /// How long leader-partition keeps the leader cut off.
    pub partition: Duration,
    /// Load before each fault.
    pub warmup: Duration,
    /// Load kept up after writes succeed again, before healing.
    pub after_failover: Duration,
    pub clients: u64,
    /// Pause between one client's operations.
    pub think: Duration,
    pub timing: RaftTiming,
    /// Budget of the linearizability search.
    pub check_budget: Duration,
    /// Keep node logs and data of a failed scenario (path in the report).
    pub keep_failed: bool,
    /// Data-plane scenarios replay the Azure LLM trace's arrivals with their gaps divided by
    /// this (see `data_plane::trace_arrivals`).
    pub arrival_rate_scale: f64,
}

impl Config {
    pub fn new(binary: PathBuf) -> Self {
        Self {
            binary,
            trials: 1,
            pause: Duration::from_secs(10),
            partition: Duration::from_secs(10),
            warmup: Duration::from_millis(500),
            after_failover: Duration::from_millis(500),
            clients: 4,
            think: Duration::from_millis(5),
            timing: RaftTiming::default(),
            check_budget: Duration::from_secs(60),
            keep_failed: true,
            arrival_rate_scale: 4.0,
        }
    }
}

/// The report of one scenario (one entry of REPORT.json).
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub scenario: String,
    pub trials: usize,
    /// Every client request: inference and admin (the two below, summed).
    pub requests_ok: u64,
    pub requests_failed: u64,
    /// Completions through the endpoints.
    pub inference_ok: u64,
    pub inference_failed: u64,
    /// The admin clients' operations (the checked history).
    pub admin_ok: u64,
    pub admin_failed: u64,
    /// Successful inference requests that reached an endpoint replica only after another
    /// failed to answer.
    pub requests_failed_over: u64,
    /// Over every fault: time from the fault to the first acknowledged write after it.
    pub failover_ms_max: f64,
    pub failover_ms_p99: f64,
    pub lost_acknowledged_writes: u64,
    pub linearizable: bool,
    /// The longest time from healing to every node up, agreeing on one leader and term, and
    /// caught up with the leader's log as it was at healing.
    pub recovery_ms: f64,
    /// The longest time from healing until every inference request sent before it had
    /// finished: the fault's backlog gone (the next fault waits for it).
    pub drain_ms_max: f64,
    /// Below here: detail beyond the fields.
    pub success_rate: f64,
    /// Acknowledged plan commits that were answered an epoch another commit was also answered,
    /// or that the final log holds under another plan.
    pub duplicate_plan_epochs: u64,
    /// Plans (by unique reason) found under more than one epoch: one request applied twice.
    pub plans_applied_twice: u64,
    pub failover_ms: Vec<f64>,
    pub recovery_ms_all: Vec<f64>,
    pub history_ops: usize,
    pub unknown_ops: usize,
    pub check_ms: f64,
    /// "linearizable", "not linearizable: ...", "timeout".
    pub verdict: String,
    pub network: String,
    pub passed: bool,
    /// Why the scenario failed, if it did (every violated check).
    pub failures: Vec<String>,
    /// Node logs and data kept for a failed scenario.
    pub kept: Option<String>,
    /// The first few failed inference requests, as the client saw them.
    pub request_errors: Vec<String>,
    /// Latency of successful inference requests: median and max, ms.
    pub request_ms_p50: f64,
    pub request_ms_max: f64,
    /// What the load was: the arrival trace and its speed, or the admin clients.
    pub load: String,
}

impl ScenarioReport {
    fn skipped(s: Scenario, why: &str) -> Self {
        Self {
            scenario: s.name().into(),
            trials: 0,
            requests_ok: 0,
            requests_failed: 0,
            requests_failed_over: 0,
            inference_ok: 0,
            inference_failed: 0,
            admin_ok: 0,
            admin_failed: 0,
            failover_ms_max: 0.0,
            failover_ms_p99: 0.0,
            lost_acknowledged_writes: 0,
            linearizable: false,
            recovery_ms: 0.0,
            drain_ms_max: 0.0,
            success_rate: 0.0,
            duplicate_plan_epochs: 0,
            plans_applied_twice: 0,
            failover_ms: vec![],
            recovery_ms_all: vec![],
            history_ops: 0,
            unknown_ops: 0,
            check_ms: 0.0,
            verdict: format!("not run: {why}"),
            network: String::new(),
            passed: false,
            failures: vec![format!("not run: {why}")],
            kept: None,
            request_errors: Vec::new(),
            request_ms_p50: 0.0,
            request_ms_max: 0.0,
            load: String::new(),
        }
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The nearest-rank percentile of `xs`.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Runs one scenario. Errors are setup failures (no cluster, no leader); violated invariants
/// are in the report.
pub async fn run(scenario: Scenario, cfg: &Config) -> Result<ScenarioReport> {
    let network = Network::best(3);
    if scenario == Scenario::LeaderPartition && !network.supports_partitions() {
        return Ok(ScenarioReport::skipped(
            scenario,
            "partitions need network namespaces (root or CAP_NET_ADMIN)",
        ));
    }
    let network_name = network.describe();
    let mut cp = ControlPlane::new(&cfg.binary, 3, network, cfg.timing.clone())?;
    cp.start_all()?;
    cp.wait_leader(Duration::from_secs(20)).await?;
    let nodes: Vec<_> = cp.admin_addrs().into_values().collect();
    let client = AdminClient::new(nodes.clone())?;
    // The whole cluster in every scenario: 4 workers and 2 endpoint replicas serving the
    // built-in model (placed on the workers by the control plane, which commits plans for it),
    // inference load through the endpoints, and admin clients writing the policy and committing
    // plans of the harness' own model (`MODEL`), whose history is checked.
    let dir = cp.data_dir().to_path_buf();
    let mut fleet = {
        let cp = &cp;
        tokio::task::block_in_place(|| Fleet::start(cp, WORKERS, ENDPOINTS, &dir))?
    };
    // Setup, not an invariant: three control-plane nodes, four workers and two endpoints start
    // together; on 2 cores with a debug build, placement once took longer than 30 s in CI.
    wait_for(Duration::from_secs(90), "the model placed on every worker", || async {
        plan_holders(&cp).await.is_some_and(|h| h.len() == WORKERS)
    })
    .await?;
    register_model(&cp, &client).await?;
    let shared_dir = std::env::var_os("MOELESS_SHARED_DIR").map(std::path::PathBuf::from);
    let (pace, source) = trace_arrivals(shared_dir.as_deref(), Duration::from_secs(3600), cfg.arrival_rate_scale);
    let load_source = format!("{source}; {} admin clients, closed loop", cfg.clients);
    let requests = FailoverClient::new(fleet.endpoint_addrs())?;
    let inference = InferenceLoad::start(requests.clone(), pace);
    let backlog = inference.backlog();

    let history = History::new();
    let initial = read_final(&client, &history)
        .await
        .context("reading the initial state")?;
    let load = Load::start(&client, &history, cfg.clients, cfg.think);

    let mut failover = Vec::new();
    let mut recovery = Vec::new();
    let mut drain = Vec::new();
    let mut failures = Vec::new();
    // Probe client ids start above every load client's.
    let mut probe_id = 1000.max(cfg.clients);
    for trial in 0..cfg.trials {
        tokio::time::sleep(cfg.warmup).await;
        let fault = if scenario.data_plane() {
            inject_data_plane(scenario, cfg, &cp, &mut fleet, &requests, trial).await
        } else {
            inject(scenario, cfg, &mut cp, &client, &history, &mut probe_id).await
        };
        let events = match fault {
            Ok(e) => e,
            Err(e) => {
                failures.push(format!("trial {}: {e:#}", trial + 1));
                break;
            }
        };
        for (f, r) in events {
            match f {
                Some(f) => failover.push(ms(f)),
                None => failures.push(format!("trial {}: no write succeeded after the fault", trial + 1)),
            }
            recovery.push(ms(r));
        }
        // The next fault only once this one's backlog is gone: a replica left to carry the
        // load alone queues requests, and a fault on top of an undrained queue would measure
        // the queue, not the fault.
        match backlog.drained(Instant::now(), Duration::from_secs(90)).await {
            Ok(d) => drain.push(ms(d)),
            Err(e) => {
                failures.push(format!("trial {}: {e:#}", trial + 1));
                break;
            }
        }
    }
    load.stop().await;
    let inference = inference.stop().await;
    drop(fleet);
    if let Err(e) = cp.wait_converged(Duration::from_secs(20)).await {
        failures.push(format!("the cluster did not return to health: {e:#}"));
    }
    let last = read_final(&client, &history).await.context("reading the final state")?;

    let events = history.events();
    let analysis = analyse(&events, &initial, &last, cfg.check_budget);
    // Admin requests are the load clients' operations; the harness' own probes (sent every 50
    // ms into the fault, many of them stuck by design) and state reads are in the history only.
    let load: Vec<&Event> = events.iter().filter(|e| e.client <= cfg.clients).collect();
    let admin_ok = load.iter().filter(|e| matches!(e.outcome, Outcome::Ok(_))).count() as u64;
    let admin_failed = load.len() as u64 - admin_ok;
    let (requests_ok, requests_failed) = (inference.ok + admin_ok, inference.failed + admin_failed);
    let rate = |ok: u64, failed: u64| ok as f64 / (ok + failed).max(1) as f64;
    let success_rate = rate(requests_ok, requests_failed);
    if !analysis.verdict.is_linearizable() {
        failures.push(format!("history: {}", analysis.verdict_text));
    }
    if analysis.lost > 0 {
        failures.push(format!("{} acknowledged writes lost", analysis.lost));
    }
    if analysis.duplicate_epochs > 0 || analysis.applied_twice > 0 {
        failures.push(format!(
            "{} plan epochs answered twice, {} plans applied twice {:?}",
            analysis.duplicate_epochs, analysis.applied_twice, analysis.twice
        ));
    }
    for (what, ok, failed) in [
        ("inference", inference.ok, inference.failed),
        ("admin", admin_ok, admin_failed),
    ] {
        if scenario.graceful() && failed > 0 {
            failures.push(format!("{failed} {what} requests failed in a graceful event"));
        } else if rate(ok, failed) < 0.999 {
            failures.push(format!("{what} success rate {:.4} below 0.999", rate(ok, failed)));
        }
    }
    let failover_ms_max = failover.iter().copied().fold(0.0, f64::max);
    if failover_ms_max > 2000.0 {
        failures.push(format!("failover took {failover_ms_max} ms (> 2000)"));
    }
    let passed = failures.is_empty();
    // MOELESS_CHAOS_KEEP=1 keeps the logs of a passing run too.
    let keep_anyway = std::env::var("MOELESS_CHAOS_KEEP").is_ok_and(|v| v == "1");
    let kept = ((!passed && cfg.keep_failed) || keep_anyway).then(|| {
        let dir = cp.keep_logs();
        let lines: Vec<String> = events.iter().filter_map(|e| serde_json::to_string(e).ok()).collect();
        if let Err(e) = std::fs::write(dir.join("history.jsonl"), lines.join("\n")) {
            tracing::warn!(error = %e, "history not kept");
        }
        dir.display().to_string()
    });
    Ok(ScenarioReport {
        scenario: scenario.name().into(),
        trials: cfg.trials,
        requests_ok,
        requests_failed,
        requests_failed_over: inference.failed_over,
        inference_ok: inference.ok,
        inference_failed: inference.failed,
        admin_ok,
        admin_failed,
        failover_ms_max,
        failover_ms_p99: percentile(&failover, 99.0),
        lost_acknowledged_writes: analysis.lost,
        linearizable: analysis.verdict.is_linearizable(),
        recovery_ms: recovery.iter().copied().fold(0.0, f64::max),
        drain_ms_max: drain.iter().copied().fold(0.0, f64::max),
        success_rate,
        duplicate_plan_epochs: analysis.duplicate_epochs,
        plans_applied_twice: analysis.applied_twice,
        failover_ms: failover,
        recovery_ms_all: recovery,
        history_ops: events.len(),
        unknown_ops: events
            .iter()
            .filter(|e| matches!(e.outcome, Outcome::Unknown(_)))
            .count(),
        check_ms: analysis.check_ms,
        verdict: analysis.verdict_text,
        network: network_name,
        passed,
        failures,
        kept,
        request_errors: inference.errors.into_iter().take(5).collect(),
        request_ms_p50: percentile(&inference.latencies_ms, 50.0),
        request_ms_max: inference.latencies_ms.iter().copied().fold(0.0, f64::max),
        load: load_source,
    })
}

/// Registers the harness' model and leaves it without instances. With workers live the
/// control plane places a new model at once ("initial static plan"); the harness waits for that
/// plan and then commits an empty one, so that the checked history starts after every plan of
/// this model the control plane will commit (its weights do not exist, and a plan without
/// instances has nothing to re-place when a worker is lost).
async fn register_model(cp: &ControlPlane, client: &AdminClient) -> Result<()> {
    post_until_accepted(client, "/v1/models", &model_spec(), "registering the model").await?;
    wait_for(Duration::from_secs(30), "the harness' model placed", || async {
        cp.get_any(&format!("/v1/placement?model={MODEL}")).await.is_some()
    })
    .await?;
    post_until_accepted(
        client,
        "/v1/placement",
        &plan("harness: no instances"),
        "emptying its plan",
    )
    .await
}

async fn post_until_accepted(client: &AdminClient, path: &str, body: &serde_json::Value, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.http_post_json(0, path, body).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e.context(what.to_string())),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// One fault and its healing. Returns, per fault event, the failover time (`None` if no write
/// succeeded) and the recovery time.
async fn inject(
    scenario: Scenario,
    cfg: &Config,
    cp: &mut ControlPlane,
    client: &AdminClient,
    history: &Arc<History>,
    probe_id: &mut u64,
) -> Result<Vec<(Option<Duration>, Duration)>> {
    let n = cp.len();
    let leader = cp.wait_leader(Duration::from_secs(10)).await?;
    let others = |x: usize| (0..n).filter(|&j| j != x).collect::<Vec<_>>();
    *probe_id += 1;
    let probe_client = *probe_id;
    let probe_for = Duration::from_secs(15);
    match scenario {
        Scenario::LeaderKill | Scenario::FollowerKill => {
            let victim = if scenario == Scenario::LeaderKill {
                leader
            } else {
                (leader + 1) % n
            };
            let at = Instant::now();
            cp.kill(victim);
            let ok = probe_write(client, history, probe_client, &others(victim), probe_for).await;
            tokio::time::sleep(cfg.after_failover).await;
            let target = leader_log(cp, &others(victim)).await;
            let healed = Instant::now();
            cp.start(victim)?;
            let r = wait_recovered(cp, target, healed).await?;
            Ok(vec![(ok.map(|t| t - at), r)])
        }
        Scenario::LeaderPause => {
            let at = Instant::now();
            cp.pause(leader)?;
            let survivors = others(leader);
            let probe = probe_write(client, history, probe_client, &survivors, probe_for);
            let (ok, ()) = tokio::join!(probe, tokio::time::sleep(cfg.pause));
            let until = at + cfg.pause;
            tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
            let target = leader_log(cp, &others(leader)).await;
            let healed = Instant::now();
            cp.resume(leader)?;
            let r = wait_recovered(cp, target, healed).await?;
            Ok(vec![(ok.map(|t| t - at), r)])
        }
        Scenario::LeaderPartition => {
            let at = Instant::now();
            cp.set_isolated(leader, true)?;
            let survivors = others(leader);
            let probe = probe_write(client, history, probe_client, &survivors, probe_for);
            let (ok, ()) = tokio::join!(probe, tokio::time::sleep(cfg.partition));
            let target = leader_log(cp, &others(leader)).await;
            let healed = Instant::now();
            cp.set_isolated(leader, false)?;
            let r = wait_recovered(cp, target, healed).await?;
            Ok(vec![(ok.map(|t| t - at), r)])
        }
        Scenario::RollingRestart => {
            let mut out = Vec::new();
            for i in 0..n {
                *probe_id += 1;
                let at = Instant::now();
                cp.stop(i, Duration::from_secs(10))?;
                let ok = probe_write(client, history, *probe_id, &others(i), probe_for).await;
                let target = leader_log(cp, &others(i)).await;
                let healed = Instant::now();
                cp.start(i)?;
                let r = wait_recovered(cp, target, healed).await?;
                out.push((ok.map(|t| t - at), r));
                tokio::time::sleep(cfg.after_failover).await;
            }
            Ok(out)
        }
        Scenario::FsyncFailure => {
            let at = Instant::now();
            cp.put(
                leader,
                "/v1/debug/failpoints",
                &serde_json::json!({"append-before-flush": "error"}),
            )
            .await
            .context("arming the failpoint")?;
            let ok = probe_write(client, history, probe_client, &others(leader), probe_for).await;
            // A node that cannot persist must stop, not go on answering from memory.
            match cp.wait_exit(leader, Duration::from_secs(10))? {
                Some(status) if !status.success() => {}
                Some(status) => bail!("node {} exited with {status} after its flush failed", leader + 1),
                None => {
                    cp.kill(leader);
                    bail!("node {} kept running for 10 s after its flush failed", leader + 1)
                }
            }
            tokio::time::sleep(cfg.after_failover).await;
            let target = leader_log(cp, &others(leader)).await;
            let healed = Instant::now();
            cp.start(leader)?;
            let r = wait_recovered(cp, target, healed).await?;
            Ok(vec![(ok.map(|t| t - at), r)])
        }
        Scenario::MembershipChange => {
            // Node 1: it bootstraps a group from an empty store, so bringing it back blank is
            // the case `--initial-cluster-state existing` exists for. When it leads, a graceful
            // restart moves leadership off it first (SIGTERM transfers leadership).
            let long = Duration::from_secs(10);
            let mut leader = leader;
            for _ in 0..3 {
                if leader != 0 {
                    break;
                }
                cp.stop(0, long)?;
                cp.start(0)?;
                leader = cp.wait_leader(long).await?;
            }
            if leader == 0 {
                bail!("node 1 still leads after three graceful restarts");
            }
            let victim = 0;
            let path = format!("/v1/members/{}", victim + 1);
            let at = Instant::now();
            cp.request(reqwest::Method::DELETE, leader, &path, None, long)
                .await
                .context("removing the voter")?;
            cp.stop(victim, Duration::from_secs(10))?;
            cp.wipe(victim)?;
            let ok = probe_write(client, history, probe_client, &others(victim), probe_for).await;
            tokio::time::sleep(cfg.after_failover).await;
            let target = leader_log(cp, &others(victim)).await;
            let healed = Instant::now();
            cp.start_joining(victim)?;
            let member = cp.member(victim);
            let leader = cp.wait_leader(long).await?;
            cp.request(reqwest::Method::POST, leader, "/v1/members", Some(&member), long)
                .await
                .context("adding the blank node back")?;
            let r = wait_recovered(cp, target, healed).await?;
            Ok(vec![(ok.map(|t| t - at), r)])
        }
        other => bail!("{} is a data-plane scenario (see inject_data_plane)", other.name()),
    }
}

/// Workers of the data-plane scenarios.
const WORKERS: usize = 4;
/// Endpoint replicas of the data-plane scenarios (clients fail over between them).
const ENDPOINTS: usize = 2;

async fn wait_for<F, Fut>(within: Duration, what: &str, mut cond: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if cond().await {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One worker fault (trial `trial` picks the worker) while inference load runs, or, for
/// worker-rolling-restart, every worker drained and restarted in turn. Failover: from the fault
/// to the first plan without the worker (`None`: never within 15 s); recovery: from the restart
/// to the worker active again.
///
/// endpoint-kill SIGKILLs one endpoint replica (trial `trial` picks it), endpoint-rolling-restart
/// stops each in turn with SIGTERM. Failover: from the fault to the first answer to a request
/// sent at the fault to that replica first (the client's failover); recovery: from the restart
/// to the replica answering a request itself.
async fn inject_data_plane(
    scenario: Scenario,
    cfg: &Config,
    cp: &ControlPlane,
    fleet: &mut Fleet,
    requests: &FailoverClient,
    trial: usize,
) -> Result<Vec<(Option<Duration>, Duration)>> {
    let replicas = fleet.endpoint_addrs().len();
    match scenario {
        Scenario::EndpointKill => {
            let i = trial % replicas;
            let at = Instant::now();
            fleet.kill_endpoint(i);
            let served = first_answer(requests, i, at, true).await?;
            tokio::time::sleep(cfg.after_failover).await;
            return Ok(vec![(served, restart_endpoint(fleet, i).await?)]);
        }
        Scenario::EndpointRollingRestart => {
            let mut events = Vec::new();
            for i in 0..replicas {
                let at = Instant::now();
                fleet.terminate_endpoint(i)?;
                let served = first_answer(requests, i, at, false).await?;
                let exit = loop {
                    if let Some(status) = fleet.try_exit_endpoint(i)? {
                        break status;
                    }
                    if at.elapsed() > Duration::from_secs(40) {
                        fleet.kill_endpoint(i);
                        bail!("endpoint {} did not exit within 40 s of SIGTERM", i + 1);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                if !exit.success() {
                    bail!(
                        "endpoint {} exited with {exit} after SIGTERM (a graceful stop must exit 0)",
                        i + 1
                    );
                }
                events.push((served, restart_endpoint(fleet, i).await?));
            }
            return Ok(events);
        }
        _ => {}
    }
    // The victim holds experts: a worker back from an earlier trial may hold none (plans do not
    // move experts back to it until a rebalance), so take the trial's turn among the holders.
    let holders: Vec<u64> = plan_holders(cp)
        .await
        .context("reading the latest plan")?
        .into_iter()
        .collect();
    if holders.is_empty() {
        bail!("the latest plan places nothing");
    }
    let id = holders[trial % holders.len()];
    let failover = match scenario {
        Scenario::WorkerKill => {
            fleet.kill_worker((id - 1) as usize);
            let replaced = || async { plan_holders(cp).await.is_some_and(|h| !h.contains(&id)) };
            wait_for(Duration::from_secs(15), "the dead worker's experts re-placed", replaced)
                .await
                .ok()
        }
        Scenario::WorkerDrain => drain_worker(cp, fleet, id).await?,
        Scenario::WorkerRollingRestart => {
            let mut events = Vec::new();
            for id in 1..=fleet.workers() as u64 {
                let held = plan_holders(cp).await.is_some_and(|h| h.contains(&id));
                let moved = drain_worker(cp, fleet, id).await?;
                // A worker that held nothing (back from an earlier drain) has nothing to move.
                let moved = if held { moved } else { Some(Duration::ZERO) };
                events.push((moved, restart_worker(cp, fleet, id).await?));
            }
            return Ok(events);
        }
        other => bail!("{} is not a data-plane scenario", other.name()),
    };
    tokio::time::sleep(cfg.after_failover).await;
    Ok(vec![(failover, restart_worker(cp, fleet, id).await?)])
}

/// SIGTERM worker `id` and wait for its graceful exit (0, within 40 s); the time until a plan
/// no longer places anything on it, if that happened before it exited.
async fn drain_worker(cp: &ControlPlane, fleet: &mut Fleet, id: u64) -> Result<Option<Duration>> {
    let i = (id - 1) as usize;
    let at = Instant::now();
    fleet.terminate_worker(i)?;
    let mut moved = None;
    let exit = loop {
        if moved.is_none() && plan_holders(cp).await.is_some_and(|h| !h.contains(&id)) {
            moved = Some(at.elapsed());
        }
        if let Some(status) = fleet.try_exit(i)? {
            break status;
        }
        if at.elapsed() > Duration::from_secs(40) {
            fleet.kill_worker(i);
            bail!("worker {id} did not exit within 40 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if !exit.success() {
        bail!("worker {id} exited with {exit} after SIGTERM (a drain must exit 0)");
    }
    Ok(moved)
}

/// Starts worker `id` again and waits until the control plane sees it active; how long that took.
async fn restart_worker(cp: &ControlPlane, fleet: &mut Fleet, id: u64) -> Result<Duration> {
    let healed = Instant::now();
    fleet.start_worker((id - 1) as usize)?;
    let active = || async { worker_health(cp, id).await.as_deref() == Some("active") };
    // A drained worker is first seen draining, then registers afresh.
    wait_for(Duration::from_secs(30), "the restarted worker active", active).await?;
    Ok(healed.elapsed())
}

/// How long after `at` a request sent first to endpoint replica `i`, just stopped, was answered
/// (by another replica, once `i` refuses); `None` if it failed. An error if `i` itself answered
/// after it was `killed` (the fault did not happen; a SIGTERMed replica may still answer until
/// it has handled the signal).
async fn first_answer(requests: &FailoverClient, i: usize, at: Instant, killed: bool) -> Result<Option<Duration>> {
    match requests.complete(i, "chaos probe: which replica answers?", 1).await {
        Ok(done) if killed && done.failed_over == 0 => {
            bail!("endpoint {} answered after it was stopped", i + 1)
        }
        Ok(_) => Ok(Some(at.elapsed())),
        Err(e) => {
            tracing::warn!(error = %e, "no replica answered the probe");
            Ok(None)
        }
    }
}

/// Starts endpoint replica `i` again on its port and waits until it answers a completion itself;
/// how long that took.
async fn restart_endpoint(fleet: &mut Fleet, i: usize) -> Result<Duration> {
    let healed = Instant::now();
    tokio::task::block_in_place(|| fleet.start_endpoint(i))?;
    let alone = FailoverClient::new(&fleet.endpoint_addrs()[i..=i])?;
    alone
        .complete(0, "chaos probe: back?", 1)
        .await
        .map_err(|e| anyhow::anyhow!("restarted endpoint {} does not answer: {e}", i + 1))?;
    Ok(healed.elapsed())
}

/// The highest applied index among `nodes` (the leader's, or close to it).
async fn leader_log(cp: &ControlPlane, nodes: &[usize]) -> u64 {
    let mut best = 0;
    for &i in nodes {
        if let Some(v) = cp.view(i).await {
            best = best.max(v.last_applied.unwrap_or(0));
        }
    }
    best
}

/// Waits until every node runs, agrees on one leader and term, and has applied `target`.
async fn wait_recovered(cp: &ControlPlane, target: u64, healed: Instant) -> Result<Duration> {
    let deadline = healed + Duration::from_secs(30);
    loop {
        let mut views = Vec::new();
        for i in 0..cp.len() {
            views.push(cp.view(i).await);
        }
        let all: Option<Vec<_>> = views.into_iter().collect();
        if let Some(vs) = all {
            let first = &vs[0];
            if first.leader.is_some()
                && vs
                    .iter()
                    .all(|v| v.leader == first.leader && v.term == first.term && v.last_applied.unwrap_or(0) >= target)
            {
                return Ok(healed.elapsed());
            }
        }
        if Instant::now() > deadline {
            bail!("not recovered within 30 s of healing");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The state read linearizably through the leader: the policy tag, the latest epoch of the
/// harness' model, and every plan up to it by epoch (the harness' plans by reason; `foreign`: the
/// epochs of other models' plans, the reconciler's for the served model).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub policy: u64,
    pub latest_epoch: u64,
    pub plans: BTreeMap<u64, Option<String>>,
    pub foreign: BTreeSet<u64>,
}

async fn read_final(client: &AdminClient, history: &History) -> Result<Snapshot> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut node = 0;
    let reader = u64::MAX;
    let policy = loop {
        if let Outcome::Ok(OpResult::Policy(p)) = client.run(history, reader, AdminOp::GetPolicy, node).await {
            break p;
        }
        anyhow::ensure!(Instant::now() < deadline, "no linearizable policy read");
        node += 1;
    };
    let latest = loop {
        if let Outcome::Ok(OpResult::Latest { epoch, .. }) =
            client.run(history, reader, AdminOp::GetLatestPlan, node).await
        {
            break epoch;
        }
        anyhow::ensure!(Instant::now() < deadline, "no linearizable plan read");
        node += 1;
    };
    let mut plans = BTreeMap::new();
    let mut foreign = BTreeSet::new();
    for epoch in 1..=latest {
        let v = client
            .http_get_linearizable(&format!("/v1/placement/{epoch}"), Duration::from_secs(10), &mut node)
            .await
            .with_context(|| format!("reading plan {epoch}"))?;
        if v.as_ref().is_some_and(|v| v["model"].as_str() != Some(MODEL)) {
            foreign.insert(epoch);
        }
        plans.insert(epoch, v.and_then(|v| v["reason"].as_str().map(String::from)));
    }
    Ok(Snapshot {
        policy,
        latest_epoch: latest,
        plans,
        foreign,
    })
}

struct Analysis {
    verdict: Verdict,
    verdict_text: String,
    lost: u64,
    duplicate_epochs: u64,
    applied_twice: u64,
    /// The plans applied twice, with their epochs.
    twice: Vec<String>,
    check_ms: f64,
}

type PolicyOp = Operation<RegisterInput<u64>, RegisterOutput<u64>>;
type PlanOp = Operation<PlanInput<String>, PlanOutput<String>>;

/// Checks the history against the register and plan-log models, and the final state against
/// every acknowledged write.
fn analyse(events: &[Event], initial: &Snapshot, last: &Snapshot, budget: Duration) -> Analysis {
    // Where each plan reason ended up in the final log.
    let mut epochs_of: HashMap<&str, Vec<u64>> = HashMap::new();
    for (e, r) in &last.plans {
        if let Some(r) = r {
            epochs_of.entry(r.as_str()).or_default().push(*e);
        }
    }
    let observed: HashSet<u64> = events
        .iter()
        .filter_map(|e| match e.outcome {
            Outcome::Ok(OpResult::Policy(p)) => Some(p),
            _ => None,
        })
        .collect();

    let mut policy_ops: Vec<PolicyOp> = Vec::new();
    let mut plan_ops: Vec<PlanOp> = Vec::new();
    let mut lost = 0;
    let mut acked_epochs: HashMap<u64, u64> = HashMap::new();
    for e in events {
        match (&e.op, &e.outcome) {
            (AdminOp::PutPolicy(v), Outcome::Ok(_)) => policy_ops.push(Operation::ok(
                e.client,
                RegisterInput::Write(*v),
                RegisterOutput::Written,
                e.call,
                e.ret,
            )),
            // An unknown write no read observed may be taken as never applied (values are unique).
            (AdminOp::PutPolicy(v), Outcome::Unknown(_)) if observed.contains(v) => {
                policy_ops.push(Operation::unknown(e.client, RegisterInput::Write(*v), e.call))
            }
            (AdminOp::GetPolicy, Outcome::Ok(OpResult::Policy(p))) => policy_ops.push(Operation::ok(
                e.client,
                RegisterInput::Read,
                RegisterOutput::Read(*p),
                e.call,
                e.ret,
            )),
            (AdminOp::CommitPlan(r), Outcome::Ok(OpResult::Committed(epoch))) => {
                *acked_epochs.entry(*epoch).or_default() += 1;
                if last.plans.get(epoch).and_then(|p| p.as_deref()) != Some(r.as_str()) {
                    lost += 1;
                }
                plan_ops.push(Operation::ok(
                    e.client,
                    PlanInput::Commit(r.clone()),
                    PlanOutput::Committed { epoch: *epoch },
                    e.call,
                    e.ret,
                ))
            }
            // The final log is complete: an unknown commit took effect iff it is there.
            (AdminOp::CommitPlan(r), Outcome::Unknown(_)) => {
                if let Some(&[epoch]) = epochs_of.get(r.as_str()).map(Vec::as_slice) {
                    plan_ops.push(Operation {
                        client: e.client,
                        input: PlanInput::Commit(r.clone()),
                        output: Some(PlanOutput::Committed { epoch }),
                        call: e.call,
                        ret: None,
                    })
                }
            }
            (AdminOp::GetLatestPlan, Outcome::Ok(OpResult::Latest { epoch, reason })) => plan_ops.push(Operation::ok(
                e.client,
                PlanInput::ReadLatest,
                PlanOutput::Latest {
                    epoch: *epoch,
                    plan: reason.clone(),
                },
                e.call,
                e.ret,
            )),
            _ => {}
        }
    }
    // A lost policy write: acknowledged, yet the final value was written (and acknowledged)
    // entirely before it was even sent.
    let final_writer = events.iter().find(|e| e.op == AdminOp::PutPolicy(last.policy));
    match final_writer {
        Some(w) => {
            if let Outcome::Ok(_) = w.outcome {
                lost += events
                    .iter()
                    .filter(|e| matches!(e.op, AdminOp::PutPolicy(_)) && matches!(e.outcome, Outcome::Ok(_)))
                    .filter(|e| e.call > w.ret)
                    .count() as u64;
            }
        }
        None if last.policy != initial.policy => lost += 1,
        None => {
            // Still the initial value: every acknowledged write was lost.
            lost += events
                .iter()
                .filter(|e| matches!(e.op, AdminOp::PutPolicy(_)) && matches!(e.outcome, Outcome::Ok(_)))
                .count() as u64;
        }
    }
    let duplicate_epochs = acked_epochs.values().filter(|&&c| c > 1).map(|c| c - 1).sum();
    // Only the clients' plans carry unique reasons (the reconciler's repeat, e.g. "worker 1 lost").
    let committed: HashSet<&str> = events
        .iter()
        .filter_map(|e| match &e.op {
            AdminOp::CommitPlan(r) => Some(r.as_str()),
            _ => None,
        })
        .collect();
    let mut twice: Vec<String> = epochs_of
        .iter()
        .filter(|(r, e)| e.len() > 1 && committed.contains(*r))
        .map(|(r, e)| format!("{r} at epochs {e:?}"))
        .collect();
    twice.sort();
    let applied_twice = twice.len() as u64;

    let started = Instant::now();
    let initial_reason = initial.plans.get(&initial.latest_epoch).cloned().flatten();
    let policy_verdict = check(
        &Register {
            initial: initial.policy,
        },
        &policy_ops,
        budget,
    );
    let plan_verdict = check(
        &PlanLog {
            initial_epoch: initial.latest_epoch,
            initial_latest: initial_reason,
            foreign: last.foreign.clone(),
        },
        &plan_ops,
        budget,
    );
    let check_ms = ms(started.elapsed());
    let describe = |what: &str, v: &Verdict| match v {
        Verdict::Linearizable => None,
        Verdict::Timeout => Some(format!("{what}: linearizability check timed out")),
        Verdict::NotLinearizable { partition, longest } => Some(format!(
            "{what}: not linearizable ({} ops, longest linearizable prefix {})",
            partition.len(),
            longest.len()
        )),
    };
    let problems: Vec<String> = [
        describe("policy register", &policy_verdict),
        describe("plan log", &plan_verdict),
    ]
    .into_iter()
    .flatten()
    .collect();
    let verdict = if problems.is_empty() {
        Verdict::Linearizable
    } else if matches!(policy_verdict, Verdict::NotLinearizable { .. }) {
        policy_verdict
    } else if matches!(plan_verdict, Verdict::NotLinearizable { .. }) {
        plan_verdict
    } else {
        Verdict::Timeout
    };
    let verdict_text = if problems.is_empty() {
        format!(
            "linearizable ({} policy ops, {} plan ops)",
            policy_ops.len(),
            plan_ops.len()
        )
    } else {
        problems.join("; ")
    };
    Analysis {
        verdict,
        verdict_text,
        lost,
        duplicate_epochs,
        applied_twice,
        twice,
        check_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(client: u64, op: AdminOp, call: u64, ret: u64, outcome: Outcome) -> Event {
        Event {
            client,
            op,
            call,
            ret,
            outcome,
            attempts: 1,
        }
    }

    fn commit(client: u64, reason: &str, call: u64, ret: u64, epoch: u64) -> Event {
        ev(
            client,
            AdminOp::CommitPlan(reason.into()),
            call,
            ret,
            Outcome::Ok(OpResult::Committed(epoch)),
        )
    }

    fn snapshot(policy: u64, plans: &[(u64, &str)]) -> Snapshot {
        Snapshot {
            policy,
            latest_epoch: plans.last().map_or(0, |p| p.0),
            plans: plans.iter().map(|(e, r)| (*e, Some(r.to_string()))).collect(),
            foreign: BTreeSet::new(),
        }
    }

    const BUDGET: Duration = Duration::from_secs(5);

    #[test]
    fn a_clean_history_passes() {
        let events = [
            ev(1, AdminOp::PutPolicy(7), 0, 10, Outcome::Ok(OpResult::Written)),
            commit(2, "a", 5, 15, 1),
            ev(3, AdminOp::GetPolicy, 20, 30, Outcome::Ok(OpResult::Policy(7))),
            // Unknown and never observed: may not have happened.
            ev(
                1,
                AdminOp::CommitPlan("b".into()),
                40,
                50,
                Outcome::Unknown("reset".into()),
            ),
        ];
        let a = analyse(&events, &snapshot(0, &[]), &snapshot(7, &[(1, "a")]), BUDGET);
        assert!(a.verdict.is_linearizable(), "{}", a.verdict_text);
        assert_eq!((a.lost, a.duplicate_epochs, a.applied_twice), (0, 0, 0));
    }

    #[test]
    fn an_acknowledged_commit_missing_from_the_final_log_is_lost() {
        let events = [commit(2, "a", 5, 15, 1), commit(2, "b", 20, 30, 2)];
        let a = analyse(&events, &snapshot(0, &[]), &snapshot(0, &[(1, "a")]), BUDGET);
        assert_eq!(a.lost, 1);
    }

    #[test]
    fn an_overwritten_acknowledged_policy_write_is_lost() {
        // 8 was acknowledged after 7 returned, yet the final value is 7.
        let events = [
            ev(1, AdminOp::PutPolicy(7), 0, 10, Outcome::Ok(OpResult::Written)),
            ev(1, AdminOp::PutPolicy(8), 20, 30, Outcome::Ok(OpResult::Written)),
        ];
        let a = analyse(&events, &snapshot(0, &[]), &snapshot(7, &[]), BUDGET);
        assert_eq!(a.lost, 1);
    }

    #[test]
    fn a_plan_applied_twice_and_a_duplicate_epoch_are_caught() {
        // One request's plan under epochs 1 and 2 (the client was answered 2).
        let events = [commit(2, "a", 5, 50, 2)];
        let a = analyse(&events, &snapshot(0, &[]), &snapshot(0, &[(1, "a"), (2, "a")]), BUDGET);
        assert_eq!(a.applied_twice, 1);
        assert!(!a.verdict.is_linearizable());
        // Two commits answered the same epoch.
        let events = [commit(2, "a", 5, 15, 1), commit(3, "b", 6, 16, 1)];
        let a = analyse(&events, &snapshot(0, &[]), &snapshot(0, &[(1, "b")]), BUDGET);
        assert_eq!(a.duplicate_epochs, 1);
        assert_eq!(a.lost, 1);
        assert!(!a.verdict.is_linearizable());
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let xs: Vec<f64> = (1..=50).map(f64::from).collect();
        assert_eq!(percentile(&xs, 99.0), 50.0);
        assert_eq!(percentile(&xs, 50.0), 25.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
    }
}
