//! Worker liveness drives placement: three simulated workers register and heartbeat over the
//! real WorkerService; a registered model gets an initial plan; a worker that stops
//! heartbeating is declared dead and within 2 s a new plan covers every expert without it; when
//! it heartbeats again it is active again. ListWorkers and the admin API show liveness and the
//! heartbeat's instances, POST /v1/rebalance commits a MoEless plan for a skewed load, and a
//! new leader gives workers a full timeout before declaring any of them dead.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use control_plane::client::AdminClient;
use control_plane::placement::{
    balancedness, load_matrix, policy_plan, round_decision, ExpertLoads, Placement, RoundDecision,
};
use control_plane::reconciler::{BALANCE_THRESHOLD, WARM_UP_REASON};
use control_plane::state::{ExpertInstance, ModelSpec};
use control_plane::RunningNode;
use proto::engine::engine_service_client::EngineServiceClient;
use proto::worker::worker_service_client::WorkerServiceClient;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const LAYERS: u64 = 2;
const EXPERTS: u64 = 6;
/// The target: a usable instance for every expert within 2 s of a worker loss.
const REPLACE_LIMIT: Duration = Duration::from_secs(2);

fn model() -> Value {
    json!({"name": "skewed", "architecture": "mixtral", "num_layers": LAYERS, "num_experts": EXPERTS, "top_k": 2, "weights": "/w"})
}

async fn register(addr: SocketAddr, id: u64) {
    let mut c = WorkerServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect worker service");
    c.register(proto::worker::RegisterRequest {
        worker_id: id,
        address: format!("127.0.0.1:{}", 9000 + id),
        devices: vec![],
        memory_bytes: 1 << 30,
    })
    .await
    .expect("register");
}

/// A test driver playing one worker: heartbeats every 200 ms to the node in `target` while
/// `alive`, reporting one warm instance and the epoch the control plane last announced.
fn heartbeat(id: u64, target: watch::Receiver<SocketAddr>, alive: Arc<AtomicBool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut applied = 0;
        loop {
            if alive.load(Ordering::SeqCst) {
                let addr = *target.borrow();
                if let Ok(mut c) = WorkerServiceClient::connect(format!("http://{addr}")).await {
                    let req = proto::worker::HeartbeatRequest {
                        worker_id: id,
                        applied_epoch: applied,
                        loads: vec![],
                        instances: vec![proto::worker::InstanceStatus {
                            layer: 0,
                            expert: id as u32,
                            state: "warm".into(),
                            bytes: id << 20,
                            cold_start_ms: 12.5,
                            tokens: 100 * id,
                            source: "local:/w".into(),
                        }],
                        memory_used_bytes: id << 20,
                        memory_budget_bytes: 1 << 30,
                    };
                    if let Ok(r) = c.heartbeat(req).await {
                        applied = r.into_inner().current_epoch;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// Every expert of the model has instances whose shares sum to one.
fn assert_covered(plan: &Value) {
    let mut sums: BTreeMap<(u64, u64), f64> = BTreeMap::new();
    for i in plan["instances"].as_array().expect("instances") {
        let key = (
            i["layer"].as_u64().expect("layer"),
            i["expert"].as_u64().expect("expert"),
        );
        *sums.entry(key).or_default() += i["share"].as_f64().expect("share");
    }
    assert_eq!(sums.len() as u64, LAYERS * EXPERTS, "every expert placed: {plan}");
    for (k, s) in sums {
        assert!((s - 1.0).abs() < 1e-6, "expert {k:?} shares sum to {s}");
    }
}

fn workers_of(plan: &Value) -> Vec<u64> {
    let mut w: Vec<u64> = plan["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| i["worker"].as_u64().expect("worker"))
        .collect();
    w.sort();
    w.dedup();
    w
}

async fn wait_for<F: Fn(&Value) -> bool>(api: &AdminClient, path: &str, within: Duration, pred: F) -> Value {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(v) = api.get(path).await {
            if pred(&v) {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{path} did not reach the expected state within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn worker(workers: &Value, id: u64) -> &Value {
    workers
        .as_array()
        .expect("workers")
        .iter()
        .find(|w| w["id"] == id)
        .expect("worker listed")
}

async fn list_workers(addr: SocketAddr) -> BTreeMap<u64, proto::engine::WorkerInfo> {
    let mut c = EngineServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect engine service");
    let r = c
        .list_workers(proto::engine::ListWorkersRequest {})
        .await
        .expect("list workers");
    r.into_inner().workers.into_iter().map(|w| (w.worker_id, w)).collect()
}

/// A single node with the reconciler on and a 1 s worker timeout, its admin client and the
/// address heartbeat drivers follow; `_guards` (its data directory and the address's sender)
/// must live as long as the test, so callers move the other fields out and keep the rest.
struct ReconcilingNode {
    node: RunningNode,
    api: AdminClient,
    target: watch::Receiver<SocketAddr>,
    _guards: (tempfile::TempDir, watch::Sender<SocketAddr>),
}

async fn reconciling_node() -> ReconcilingNode {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.reconciler = true;
    cfg.worker_timeout_ms = 1000;
    let node = start_single(cfg).await;
    let api = admin(&node);
    let (target_tx, target) = watch::channel(node.raft_addr);
    ReconcilingNode {
        node,
        api,
        target,
        _guards: (dir, target_tx),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_workers_are_replaced_and_come_back() {
    // `n._guards` stays in `n` until the end of the test.
    let n = reconciling_node().await;
    let (node, api, target) = (n.node, n.api, n.target);

    let mut alive = BTreeMap::new();
    let mut drivers = Vec::new();
    for id in 1..=3 {
        register(node.raft_addr, id).await;
        let flag = Arc::new(AtomicBool::new(true));
        drivers.push(heartbeat(id, target.clone(), Arc::clone(&flag)));
        alive.insert(id, flag);
    }
    api.post("/v1/models", Some(&model())).await.expect("model");

    // The reconciler gives the new model a static plan over the three live workers.
    let initial = wait_for(&api, "/v1/placement", Duration::from_secs(3), |p| {
        p["model"] == "skewed"
    })
    .await;
    assert_eq!(initial["reason"], "initial static plan");
    assert_covered(&initial);
    assert_eq!(workers_of(&initial), vec![1, 2, 3]);
    let initial_epoch = initial["epoch"].as_u64().expect("epoch");

    // Liveness as engines and admins see it.
    let listed = wait_for(&api, "/v1/workers", Duration::from_secs(2), |w| {
        w.as_array()
            .is_some_and(|a| a.iter().all(|w| w["applied_epoch"] == initial_epoch))
    })
    .await;
    let w1 = worker(&listed, 1);
    assert_eq!(w1["health"], "active");
    assert_eq!(w1["memory_used_bytes"], 1 << 20);
    assert_eq!(w1["memory_budget_bytes"], 1u64 << 30);
    assert!(w1["heartbeat_age_ms"].as_u64().expect("age") < 1000);
    let engines = list_workers(node.raft_addr).await;
    assert_eq!(engines.len(), 3);
    for w in engines.values() {
        assert_eq!(w.health, "active", "{w:?}");
        assert!(w.heartbeat_age_ms < 1000, "{w:?}");
    }
    assert_eq!(engines[&2].address, "127.0.0.1:9002");
    let inst = api.get("/v1/workers/1/instances").await.expect("instances");
    assert_eq!(
        inst,
        json!([{"layer": 0, "expert": 1, "state": "warm", "bytes": 1 << 20, "cold_start_ms": 12.5, "tokens": 100, "source": "local:/w"}])
    );
    let warm = api.get("/v1/instances?state=warm").await.expect("warm instances");
    assert_eq!(warm.as_array().expect("list").len(), 3);
    assert_eq!(warm[2]["worker"], 3);
    let loading = api.get("/v1/instances?state=loading").await.expect("loading instances");
    assert_eq!(loading, json!([]));
    let err = api.get("/v1/instances?state=hot").await.expect_err("unknown state");
    assert!(err.to_string().contains("400"), "{err}");
    let err = api.get("/v1/workers/99/instances").await.expect_err("unknown worker");
    assert!(err.to_string().contains("404"), "{err}");

    // Worker 3 stops heartbeating: a plan without it, covering every expert, within 2 s.
    alive[&3].store(false, Ordering::SeqCst);
    let stopped = Instant::now();
    let replaced = wait_for(&api, "/v1/placement", Duration::from_secs(5), |p| {
        p["epoch"].as_u64() > Some(initial_epoch)
    })
    .await;
    let took = stopped.elapsed();
    eprintln!("worker 3 re-placed {took:?} after its last heartbeat");
    assert!(took < REPLACE_LIMIT, "re-placement took {took:?}");
    assert_eq!(replaced["reason"], "worker 3 lost");
    assert_covered(&replaced);
    assert_eq!(workers_of(&replaced), vec![1, 2]);
    let engines = list_workers(node.raft_addr).await;
    assert_eq!(engines[&3].health, "dead");
    assert!(engines[&3].heartbeat_age_ms >= 1000, "{:?}", engines[&3]);
    assert_eq!(engines[&1].health, "active");
    let listed = api.get("/v1/workers").await.expect("workers");
    assert_eq!(worker(&listed, 3)["replicated_health"], "dead");
    // A dead worker's plan is not re-placed again and again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let latest = api.get("/v1/placement").await.expect("latest");
    assert_eq!(latest["epoch"], replaced["epoch"], "one plan per loss");

    // It heartbeats again: active again, everywhere.
    alive[&3].store(true, Ordering::SeqCst);
    wait_for(&api, "/v1/workers", Duration::from_secs(2), |w| {
        worker(w, 3)["replicated_health"] == "active" && worker(w, 3)["health"] == "active"
    })
    .await;
    assert_eq!(list_workers(node.raft_addr).await[&3].health, "active");
    let metrics = api.get("/metrics").await.expect("metrics");
    let text = metrics.as_str().expect("text");
    assert!(text.contains("moeless_workers{"), "{text}");
    // Each worker's heartbeat reports one warm instance that took 12.5 ms to start.
    let line = |name: &str| {
        text.lines()
            .find(|l| {
                l.starts_with(name)
                    && l.contains("worker=\"3\"")
                    && (!name.contains("instances") || l.contains("state=\"warm\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
    };
    assert_eq!(line("moeless_worker_instances{").as_deref(), Some("1"), "{text}");
    assert_eq!(
        line("moeless_worker_cold_start_ms_max{").as_deref(),
        Some("12.5"),
        "{text}"
    );

    // A skewed load report and a scaling round under the MoEless policy.
    let policy = json!({"placement": "moeless", "predictor": "ema", "rebalance_interval_ms": 0, "keep_alive_ms": 1000, "max_replicas_per_expert": 4});
    api.put("/v1/policy", &policy).await.expect("policy");
    let none = api.post("/v1/rebalance", None).await.expect("rebalance without load");
    assert_eq!(none["epoch"], Value::Null, "{none}");
    let mut engine = EngineServiceClient::connect(format!("http://{}", node.raft_addr))
        .await
        .expect("connect engine service");
    // Every layer's load as `tokens(layer, expert)`, reported by one engine.
    async fn report(engine: &mut EngineServiceClient<tonic::transport::Channel>, tokens: impl Fn(u32, u32) -> u64) {
        let loads = (0..LAYERS as u32)
            .flat_map(|l| (0..EXPERTS as u32).map(move |e| (l, e)))
            .map(|(l, e)| proto::engine::ExpertLoad {
                layer: l,
                expert: e,
                tokens: tokens(l, e),
            })
            .collect();
        engine
            .report_load(proto::engine::ReportLoadRequest {
                engine_id: "e1".into(),
                window_ms: 1000,
                loads,
            })
            .await
            .expect("report load");
    }
    report(&mut engine, |l, e| if e == l { 60_000 } else { 100 }).await;
    let round = api.post("/v1/rebalance", Some(&json!({}))).await.expect("rebalance");
    let epoch = round["epoch"]
        .as_u64()
        .unwrap_or_else(|| panic!("no plan committed: {round}"));
    let plan = api.get(&format!("/v1/placement/{epoch}")).await.expect("plan");
    // The latest plan of one model over gRPC (what an engine follows); none of an unknown one.
    for (model, want) in [(model()["name"].as_str().expect("name"), Some(epoch)), ("nobody", None)] {
        let got = engine
            .get_plan(proto::engine::GetPlanRequest {
                epoch: 0,
                model: model.into(),
            })
            .await
            .expect("get plan of a model")
            .into_inner()
            .plan;
        assert_eq!(got.map(|p| p.epoch), want, "{model}");
    }
    assert!(
        plan["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("moeless rebalance")),
        "{plan}"
    );
    assert_covered(&plan);
    let hot = plan["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter(|i| i["layer"] == 0 && i["expert"] == 0)
        .count();
    assert!(hot > 1, "the hot expert is replicated: {plan}");
    let m = &round["models"][0];
    assert!(
        m["balancedness_after"].as_f64() > m["balancedness_before"].as_f64(),
        "{round}"
    );
    assert_eq!(m["predictor_error"], Value::Null, "no window before to judge: {round}");

    // The predictor's error, round by round: the window a round plans from is its forecast of
    // the next. The same proportions again: an exact forecast.
    report(&mut engine, |l, e| if e == l { 30_000 } else { 50 }).await;
    let same = api.post("/v1/rebalance", None).await.expect("rebalance");
    let e = same["models"][0]["predictor_error"].as_f64();
    assert!(e.is_some_and(|e| e.abs() < 1e-9), "{same}");
    // Every layer's hot expert moves to the next expert: most of the load was mispredicted.
    report(
        &mut engine,
        |l, e| if e == (l + 1) % EXPERTS as u32 { 60_000 } else { 100 },
    )
    .await;
    let moved = api.post("/v1/rebalance", None).await.expect("rebalance");
    let e = moved["models"][0]["predictor_error"].as_f64();
    assert!(e.is_some_and(|e| e > 0.9), "{moved}");
    let text = api.get("/metrics").await.expect("metrics");
    assert!(
        text.as_str().is_some_and(|t| t.contains("moeless_predictor_error{")),
        "{text}"
    );

    // Warm-up ahead of need: one expert of every layer starts rising. The first load whose
    // candidate would help by more than half the threshold but not all of it (computed here
    // with the planner's own functions from the plan the node serves) must commit the serving
    // plan unchanged plus the candidate's new instances with share 0.
    let workers = [1u64, 2, 3];
    let spec: ModelSpec = serde_json::from_value(model()).expect("model spec");
    let loads_of = |(x, h): (u32, u64)| -> ExpertLoads {
        (0..LAYERS as u32)
            .flat_map(|l| (0..EXPERTS as u32).map(move |e| ((l, e), if e == x { h } else { 1000 })))
            .collect()
    };
    let latest = api.get("/v1/placement").await.expect("latest");
    let current: Vec<ExpertInstance> = serde_json::from_value(latest["instances"].clone()).expect("instances");
    let rises = (0..EXPERTS as u32).flat_map(|x| (1000..6000u64).step_by(20).map(move |h| (x, h)));
    let expected = rises.into_iter().find_map(|h1| {
        let loads = loads_of(h1);
        let matrix = load_matrix(&spec, &loads).ok()?;
        let cand = policy_plan(Placement::Moeless, &spec, &loads, &workers).ok()?;
        let (b, a) = (
            balancedness(&current, &matrix, &workers),
            balancedness(&cand, &matrix, &workers),
        );
        match round_decision(Placement::Moeless, &current, &cand, b, a, BALANCE_THRESHOLD) {
            RoundDecision::WarmUp(w) => Some((h1, w)),
            _ => None,
        }
    });
    let (h1, expected) = expected.expect("some rising load is worth warming up for");
    report(&mut engine, |_, e| loads_of(h1)[&(0, e)]).await;
    let round = api.post("/v1/rebalance", None).await.expect("rebalance");
    let epoch = round["epoch"]
        .as_u64()
        .unwrap_or_else(|| panic!("no warm-up plan: {round}"));
    let warm = api.get(&format!("/v1/placement/{epoch}")).await.expect("plan");
    assert!(
        warm["reason"].as_str().is_some_and(|r| r.starts_with(WARM_UP_REASON)),
        "{warm}"
    );
    assert_covered(&warm);
    let committed: Vec<ExpertInstance> = serde_json::from_value(warm["instances"].clone()).expect("instances");
    assert_eq!(committed, expected, "expert and load {h1:?}");
    assert!(committed.iter().any(|i| i.share == 0.0), "{warm}");
    assert_eq!(
        committed.iter().filter(|i| i.share > 0.0).collect::<Vec<_>>(),
        current.iter().filter(|i| i.share > 0.0).collect::<Vec<_>>(),
        "serving instances unchanged"
    );
    // The same loads again: the standbys are already there, no new epoch.
    report(&mut engine, |_, e| loads_of(h1)[&(0, e)]).await;
    let again = api.post("/v1/rebalance", None).await.expect("rebalance");
    assert_eq!(again["epoch"], Value::Null, "{again}");

    for d in drivers {
        d.abort();
    }
    node.shutdown().await;
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], chaos_tests::ports::free_loopback_port()))
}

/// Three in-process nodes; the workers heartbeat to the leader, which is shut down. The workers
/// find another node only 500 ms after the new leader is elected, so the new leader has not
/// heard from them yet: it must give them a full timeout, not declare them dead at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_does_not_declare_workers_dead_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raft: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let peers: BTreeMap<u64, String> = raft
        .iter()
        .enumerate()
        .map(|(i, a)| (i as u64 + 1, a.to_string()))
        .collect();
    let mut nodes: Vec<Option<RunningNode>> = Vec::new();
    for (i, addr) in raft.iter().enumerate() {
        let id = i as u64 + 1;
        let mut cfg = config(&dir.path().join(format!("node{id}")));
        cfg.id = id;
        cfg.raft_addr = *addr;
        cfg.peers = peers.clone();
        cfg.reconciler = true;
        cfg.election_timeout_ms = (200, 400);
        nodes.push(Some(control_plane::start(cfg).await.expect("node starts")));
    }
    let leader_of = |nodes: &Vec<Option<RunningNode>>| {
        nodes
            .iter()
            .flatten()
            .find(|n| n.node.is_leader())
            .map(|n| (n.node.id(), n.raft_addr, n.admin_addr))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (leader, leader_raft, leader_admin) = loop {
        if let Some(l) = leader_of(&nodes) {
            break l;
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let api = AdminClient::new(&leader_admin.to_string(), Some(TOKEN.into())).expect("client");
    let (target_tx, target) = watch::channel(leader_raft);
    let mut drivers = Vec::new();
    let mut flags = Vec::new();
    for id in 1..=2 {
        register(leader_raft, id).await;
        let flag = Arc::new(AtomicBool::new(true));
        drivers.push(heartbeat(id, target.clone(), Arc::clone(&flag)));
        flags.push(flag);
    }
    api.post("/v1/models", Some(&model())).await.expect("model");
    let initial = wait_for(&api, "/v1/placement", Duration::from_secs(3), |p| {
        p["model"] == "skewed"
    })
    .await;
    let initial_epoch = initial["epoch"].as_u64().expect("epoch");

    // The leader goes away; the workers are silent until they find another node.
    for f in &flags {
        f.store(false, Ordering::SeqCst);
    }
    let old = nodes[(leader - 1) as usize].take().expect("leader running");
    old.shutdown().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let (new_leader, _, new_admin) = loop {
        if let Some(l) = leader_of(&nodes) {
            break l;
        }
        assert!(Instant::now() < deadline, "no new leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let elected = Instant::now();
    eprintln!("node {new_leader} leads after node {leader} stopped");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let survivor = nodes.iter().flatten().next().expect("a survivor").raft_addr;
    target_tx.send(survivor).expect("retarget");
    for f in &flags {
        f.store(true, Ordering::SeqCst);
    }

    let api = AdminClient::new(&new_admin.to_string(), Some(TOKEN.into())).expect("client");
    while elected.elapsed() < Duration::from_millis(2500) {
        let workers = api.get("/v1/workers").await.expect("workers");
        for w in workers.as_array().expect("workers") {
            assert_eq!(w["replicated_health"], "active", "no worker is declared dead: {w}");
        }
        let plan = api.get("/v1/placement").await.expect("plan");
        assert_eq!(plan["epoch"], initial_epoch, "no plan moves instances: {plan}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The survivors still see them alive (the follower relays heartbeats to the leader).
    let engines = list_workers(survivor).await;
    assert!(engines.values().all(|w| w.health == "active"), "{engines:?}");

    for d in drivers {
        d.abort();
    }
    for n in nodes.into_iter().flatten() {
        n.shutdown().await;
    }
}

/// Workers that register after a model's first static plan (they start together, the first
/// tick may see only some) get instances without any load being reported: until load drives a
/// plan, the static spread follows the live workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_joining_after_the_first_plan_get_instances() {
    // `n._guards` stays in `n` until the end of the test.
    let n = reconciling_node().await;
    let (node, api, target) = (n.node, n.api, n.target);
    let mut drivers = Vec::new();
    register(node.raft_addr, 1).await;
    drivers.push(heartbeat(1, target.clone(), Arc::new(AtomicBool::new(true))));
    api.post("/v1/models", Some(&model())).await.expect("model");
    let first = wait_for(&api, "/v1/placement", Duration::from_secs(3), |p| {
        p["model"] == "skewed"
    })
    .await;
    assert_eq!(first["reason"], "initial static plan");
    assert_eq!(first["origin"], "initial_spread");
    assert_eq!(workers_of(&first), vec![1]);

    for id in [2, 3] {
        register(node.raft_addr, id).await;
        drivers.push(heartbeat(id, target.clone(), Arc::new(AtomicBool::new(true))));
    }
    let spread = wait_for(&api, "/v1/placement", Duration::from_secs(5), |p| {
        workers_of(p) == vec![1, 2, 3]
    })
    .await;
    assert_covered(&spread);
    assert!(
        spread["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("initial static plan")),
        "{spread}"
    );
    assert_eq!(spread["origin"], "initial_spread");
    // Nothing more to spread: the epoch stays put.
    let epoch = spread["epoch"].as_u64().expect("epoch");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = api.get("/v1/placement").await.expect("placement");
    assert_eq!(later["epoch"].as_u64(), Some(epoch), "{later}");

    // An operator's plan (all on worker 1) is never replaced by the static spread, even when
    // its body claims to be one: origins are structured, not read from the reason.
    let instances: Vec<Value> = (0..LAYERS)
        .flat_map(|l| (0..EXPERTS).map(move |e| json!({"layer": l, "expert": e, "worker": 1, "gpu": 0, "share": 1.0})))
        .collect();
    let body =
        json!({"model": "skewed", "instances": instances, "reason": "initial static plan", "origin": "initial_spread"});
    let committed = api.post("/v1/placement", Some(&body)).await.expect("operator plan");
    let op_epoch = committed["epoch"].as_u64().expect("epoch");
    register(node.raft_addr, 4).await;
    drivers.push(heartbeat(4, target.clone(), Arc::new(AtomicBool::new(true))));
    wait_for(&api, "/v1/workers", Duration::from_secs(5), |w| {
        w.as_array().is_some_and(|a| a.len() == 4)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let kept = api.get("/v1/placement").await.expect("placement");
    assert_eq!(kept["epoch"].as_u64(), Some(op_epoch), "{kept}");
    assert_eq!(kept["origin"], "operator");
    assert_eq!(workers_of(&kept), vec![1]);
    for d in drivers {
        d.abort();
    }
    node.shutdown().await;
}
