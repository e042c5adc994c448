//! A worker as a real QUIC server beside a real single-node control plane: it survives forged
//! frames and strangers, follows plans through warm/idle/evicted (loading from a peer when an
//! expert moves), keeps to its memory budget while the engine re-dispatches what it cannot
//! hold, and comes back after a restart with nothing but its id.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use control_plane::client::AdminClient;
use control_plane::state::{ExpertInstance, ModelSpec, PlanIntent, PlanOrigin};
use control_plane::types::{Command, CommandResponse};
use control_plane::{NodeConfig, RunningNode};
use data_plane::backend::CpuBackend;
use data_plane::checkpoint::Checkpoint;
use data_plane::config::{Arch, ModelConfig};
use data_plane::expert::{add_weighted_rows, ExpertFunction, ExpertTask, ExpertWeights};
use data_plane::tensor::Tensor;
use data_plane::testing::{write_random_checkpoint, ModelShape, SaveDtype};
use serde_json::Value;
use shared::{ExpertKey, InstanceId};
use transport::{Client, Identity, Limits, Message, TlsFiles};
use worker::remote::{RemoteExperts, RemoteOptions};
use worker::wire::{encode_request, Dtype, ErrorCode, Frame, TaskRef};
use worker::{RunningWorker, WorkerOptions};

const MODEL: &str = "mixtral-test";
const WAIT: Duration = Duration::from_secs(30);

/// A control plane with the test model registered, certificates for an engine and workers.
struct Cluster {
    rt: tokio::runtime::Runtime,
    node: Option<RunningNode>,
    admin: AdminClient,
    model_dir: PathBuf,
    tls: PathBuf,
    cfg: ModelConfig,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let model_dir = dir.path().join("model");
        let shape = ModelShape::tiny();
        let cfg = write_random_checkpoint(&model_dir, Arch::Mixtral, &shape, 7, SaveDtype::F32).unwrap();
        let tls = dir.path().join("tls");
        transport::generate(&tls, &["engine", "worker-1", "worker-2", "worker-3"], &[]).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut config = NodeConfig::new(1, dir.path().join("cp"));
        // Every plan here is committed by hand.
        config.reconciler = false;
        let node = rt.block_on(control_plane::start(config)).unwrap();
        let spec = ModelSpec {
            name: MODEL.into(),
            architecture: "mixtral".into(),
            num_layers: cfg.num_layers as u32,
            num_experts: cfg.moe.num_experts as u32,
            top_k: cfg.moe.top_k as u32,
            weights: model_dir.to_string_lossy().into_owned(),
        };
        rt.block_on(node.node.write(Command::PutModel(spec), Duration::from_secs(10)))
            .unwrap();
        let admin = AdminClient::new(&node.admin_addr.to_string(), None).unwrap();
        Cluster {
            rt,
            node: Some(node),
            admin,
            model_dir,
            tls,
            cfg,
            dir,
        }
    }

    fn node(&self) -> &RunningNode {
        self.node.as_ref().unwrap()
    }

    fn identity(&self, name: &str) -> Identity {
        Identity::load(&TlsFiles::in_dir(&self.tls, name)).unwrap()
    }

    /// Endpoints bind their socket on a runtime.
    fn client(&self, identity: &Identity) -> Client {
        let _in_runtime = self.rt.enter();
        Client::new(identity, Limits::default()).unwrap()
    }

    fn options(&self, id: u64) -> WorkerOptions {
        WorkerOptions {
            backend: std::sync::Arc::new(CpuBackend),
            id,
            control: vec![self.node().raft_addr.to_string()],
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise: None,
            memory_bytes: 1 << 30,
            threads: 1,
            keep_alive: Duration::from_secs(60),
            heartbeat: Duration::from_millis(50),
            peer_fetch: true,
            limits: Limits::default(),
            // The control plane here listens in plaintext on loopback; the CP link's mTLS is
            // tested in control-plane/tests/t05 and end to end by the local cluster.
            control_tls: None,
        }
    }

    /// Starts an in-process worker and waits until the control plane knows it at its address.
    fn worker(&self, opts: WorkerOptions) -> RunningWorker {
        let id = opts.id;
        let identity = self.identity(&format!("worker-{id}"));
        let w = self.rt.block_on(worker::start(opts, &identity)).unwrap();
        let addr = w.addr.to_string();
        self.wait(&format!("worker {id} registered at {addr}"), || {
            let workers = self.get("/v1/workers");
            let found = workers
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["id"] == id && v["address"] == addr.as_str() && v["health"] == "active");
            found.then_some(())
        });
        w
    }

    fn get(&self, path: &str) -> Value {
        self.rt.block_on(self.admin.get(path)).unwrap()
    }

    /// Polls `f` until it answers, or fails the test after [`WAIT`].
    fn wait<T>(&self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn commit(&self, placement: &[(u64, ExpertKey)]) -> u64 {
        let intent = PlanIntent {
            model: MODEL.into(),
            instances: placement
                .iter()
                .map(|(w, k)| ExpertInstance {
                    layer: k.layer,
                    expert: k.expert,
                    worker: *w,
                    gpu: 0,
                    share: 1.0,
                })
                .collect(),
            reason: "test".into(),
            origin: PlanOrigin::Operator,
        };
        let cmd = Command::CommitPlan {
            intent,
            expected_epoch: None,
        };
        match self
            .rt
            .block_on(self.node().node.write(cmd, Duration::from_secs(10)))
            .unwrap()
            .1
        {
            CommandResponse::PlanCommitted { epoch } => epoch,
            other => panic!("plan not committed: {other:?}"),
        }
    }

    /// The instances worker `id` reported, by expert.
    fn instances(&self, id: u64) -> BTreeMap<(u32, u32), Value> {
        let v = self.get(&format!("/v1/workers/{id}/instances"));
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| {
                let key = (
                    i["layer"].as_u64().unwrap() as u32,
                    i["expert"].as_u64().unwrap() as u32,
                );
                (key, i.clone())
            })
            .collect()
    }

    /// Waits until every key is reported in `state` by worker `id`; returns their reports.
    fn wait_state(&self, id: u64, keys: &[ExpertKey], state: &str) -> Vec<Value> {
        self.wait(&format!("{keys:?} {state} on worker {id}"), || {
            let all = self.instances(id);
            keys.iter()
                .map(|k| all.get(&(k.layer, k.expert)).filter(|i| i["state"] == state).cloned())
                .collect()
        })
    }

    fn worker_view(&self, id: u64) -> Value {
        let workers = self.get("/v1/workers");
        workers
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["id"] == id)
            .cloned()
            .unwrap()
    }

    /// What the expert computes, from the checkpoint in this process.
    fn expected(&self, key: ExpertKey, x: &Tensor) -> Tensor {
        let ckpt = Checkpoint::open(&self.model_dir).unwrap();
        ExpertWeights::load(&ckpt, &self.cfg, key)
            .unwrap()
            .forward(&CpuBackend, x)
    }

    fn input(&self, rows: usize, seed: u32) -> Tensor {
        let h = self.cfg.hidden_size;
        let data = (0..rows * h)
            .map(|i| {
                ((i as u32)
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed.wrapping_mul(40503))
                    % 1000) as f32
                    / 500.0
                    - 1.0
            })
            .collect();
        Tensor::matrix(rows, h, data)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            self.rt.block_on(node.shutdown());
        }
    }
}

fn key(layer: usize, expert: usize) -> ExpertKey {
    ExpertKey::new(layer, expert)
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for (i, (a, b)) in got.data().iter().zip(want.data()).enumerate() {
        assert!((a - b).abs() <= 1e-5 + 1e-5 * b.abs(), "{what}[{i}]: {a} vs {b}");
    }
}

fn decode(message: &Message) -> Frame {
    Frame::decode_chunks(message.chunks()).unwrap()
}

fn expect_error(what: &str, answer: &Message, want: ErrorCode) -> String {
    match decode(answer) {
        Frame::Error { code, message, .. } => {
            assert_eq!(code, want, "{what}: {message}");
            message
        }
        other => panic!("{what}: expected an error frame, got {other:?}"),
    }
}

/// Sends a valid request for `keys` to `addr` and checks every output against local compute.
fn assert_serves(c: &Cluster, client: &Client, addr: std::net::SocketAddr, layer: u32, keys: &[ExpertKey]) {
    let inputs: Vec<Tensor> = (0..keys.len()).map(|i| c.input(3 + i, i as u32)).collect();
    let tasks: Vec<TaskRef> = keys
        .iter()
        .zip(&inputs)
        .map(|(k, x)| TaskRef::plain(*k, 0, x))
        .collect();
    let req = encode_request(42, layer, Dtype::F32, &tasks);
    let answer = c.rt.block_on(client.request(addr, req, WAIT)).unwrap();
    match decode(&answer) {
        Frame::ExpertResponse { id, outputs } => {
            assert_eq!(id, 42);
            assert_eq!(outputs.len(), keys.len());
            for ((k, x), got) in keys.iter().zip(&inputs).zip(&outputs) {
                assert_close(&format!("{k}"), got, &c.expected(*k, x));
            }
        }
        other => panic!("expected outputs, got {other:?}"),
    }
}

#[test]
fn malformed_frames_and_strangers_are_refused_and_the_worker_keeps_serving() {
    let c = Cluster::start();
    let mut opts = c.options(1);
    opts.limits.max_message_bytes = 1 << 20;
    let w = c.worker(opts);
    let held = [key(0, 0), key(0, 1)];
    c.commit(&held.map(|k| (1u64, k)));
    c.wait_state(1, &held, "warm");
    let client = c.client(&c.identity("engine"));
    let ask = |bytes: Bytes| c.rt.block_on(client.request(w.addr, bytes, WAIT)).unwrap();
    let valid = encode_request(9, 0, Dtype::F32, &[TaskRef::plain(held[0], 0, &c.input(2, 1))]);

    expect_error(
        "garbage",
        &ask(Bytes::from_static(b"not a frame at all, just bytes")),
        ErrorCode::BadFrame,
    );
    expect_error("empty", &ask(Bytes::new()), ErrorCode::BadFrame);
    let mut magic = valid.to_vec();
    magic[..4].copy_from_slice(b"XEOM");
    expect_error("bad magic", &ask(magic.into()), ErrorCode::BadFrame);
    let mut version = valid.to_vec();
    version[4] = 99;
    expect_error("bad version", &ask(version.into()), ErrorCode::BadFrame);
    let mut kind = valid.to_vec();
    kind[5] = 200;
    expect_error("unknown kind", &ask(kind.into()), ErrorCode::BadFrame);
    expect_error("truncated", &ask(valid.slice(..valid.len() - 7)), ErrorCode::BadFrame);
    expect_error("truncated table", &ask(valid.slice(..30)), ErrorCode::BadFrame);
    let mut longer = valid.to_vec();
    longer.extend_from_slice(&[0; 8]);
    expect_error("trailing bytes", &ask(longer.into()), ErrorCode::BadFrame);
    // A table announcing far more rows than the frame holds must not allocate them.
    let mut forged = BytesMut::new();
    forged.put_slice(&valid[..16]);
    forged.put_u32_le(0); // layer
    forged.put_u32_le(c.cfg.hidden_size as u32);
    forged.put_u8(0);
    forged.put_bytes(0, 3);
    forged.put_u32_le(1);
    forged.put_u32_le(0);
    forged.put_u32_le(0);
    forged.put_u32_le(u32::MAX);
    expect_error("forged row count", &ask(forged.freeze()), ErrorCode::BadFrame);
    let response = Frame::ExpertResponse {
        id: 3,
        outputs: vec![c.input(1, 0)],
    };
    expect_error("a response as request", &ask(response.encode()), ErrorCode::BadFrame);
    let x = c.input(2, 2);
    let msg = expect_error(
        "no such expert",
        &ask(encode_request(4, 0, Dtype::F32, &[TaskRef::plain(key(0, 99), 0, &x)])),
        ErrorCode::BadFrame,
    );
    assert!(msg.contains("not a routed expert"), "{msg}");
    let narrow = Tensor::matrix(2, c.cfg.hidden_size / 2, vec![0.5; c.cfg.hidden_size]);
    expect_error(
        "wrong hidden size",
        &ask(encode_request(5, 0, Dtype::F32, &[TaskRef::plain(held[0], 0, &narrow)])),
        ErrorCode::BadFrame,
    );
    expect_error(
        "layer out of range",
        &ask(encode_request(6, 7, Dtype::F32, &[TaskRef::plain(key(7, 0), 0, &x)])),
        ErrorCode::BadFrame,
    );

    // Over the worker's 1 MiB message limit: refused by the transport, not read into memory.
    let big = c.input(1 << 20 >> 5, 3);
    assert!(big.data().len() * 4 > 1 << 20);
    let oversized = encode_request(7, 0, Dtype::F32, &[TaskRef::plain(held[0], 0, &big)]);
    let refused = c.rt.block_on(client.request(w.addr, oversized, WAIT));
    assert!(refused.is_err(), "an oversized message was answered: {refused:?}");

    // A client whose certificate another CA signed (trusting ours) is refused.
    let other = c.dir.path().join("other-ca");
    transport::generate(&other, &["intruder"], &[]).unwrap();
    let mut files = TlsFiles::in_dir(&other, "intruder");
    files.ca = c.tls.join("ca.pem");
    let stranger = c.client(&Identity::load(&files).unwrap());
    let answer =
        c.rt.block_on(stranger.request(w.addr, valid.clone(), Duration::from_secs(5)));
    assert!(answer.is_err(), "a client of another CA was served: {answer:?}");

    // After all that, still correct.
    let client = c.client(&c.identity("engine"));
    assert_serves(&c, &client, w.addr, 0, &held);
    c.rt.block_on(w.shutdown());
}

#[test]
fn instances_go_warm_idle_evicted_and_move_to_a_peer() {
    let c = Cluster::start();
    let mut a = c.options(1);
    a.keep_alive = Duration::from_millis(1500);
    let wa = c.worker(a);
    let wb = c.worker(c.options(2));
    let keys = [key(0, 2), key(1, 5)];

    c.commit(&keys.map(|k| (1u64, k)));
    for i in c.wait_state(1, &keys, "warm") {
        assert!(i["cold_start_ms"].as_f64().unwrap() > 0.0, "{i}");
        assert!(i["source"].as_str().unwrap().starts_with("local:"), "{i}");
        assert!(i["bytes"].as_u64().unwrap() > 0, "{i}");
    }
    let client = c.client(&c.identity("engine"));
    assert_serves(&c, &client, wa.addr, 0, &keys[..1]);

    // Moved to B: idle on A for its keep-alive, loaded by B from A, then evicted on A.
    c.commit(&keys.map(|k| (2u64, k)));
    c.wait_state(1, &keys, "idle");
    for i in c.wait_state(2, &keys, "warm") {
        let source = i["source"].as_str().unwrap();
        assert!(source.starts_with(&format!("peer:{}", wa.addr)), "{i}");
    }
    for i in c.wait_state(1, &keys, "evicted") {
        assert!(i["bytes"].as_u64().unwrap() > 0, "{i}");
    }
    assert_eq!(c.worker_view(1)["memory_used_bytes"], 0);
    assert_serves(&c, &client, wb.addr, 1, &keys[1..]);
    c.rt.block_on(wa.shutdown());
    c.rt.block_on(wb.shutdown());
}

#[test]
fn a_worker_keeps_to_its_budget_and_the_engine_sends_what_it_cannot_hold_elsewhere() {
    let c = Cluster::start();
    let ckpt = Checkpoint::open(&c.model_dir).unwrap();
    let one = ExpertWeights::load(&ckpt, &c.cfg, key(0, 0)).unwrap().bytes() as u64;
    let budget = 2 * one + one / 2;
    let mut a = c.options(1);
    a.memory_bytes = budget;
    let wa = c.worker(a);
    let wb = c.worker(c.options(2));
    let on_a: Vec<ExpertKey> = (0..4).map(|e| key(0, e)).collect();
    let mut plan: Vec<(u64, ExpertKey)> = on_a.iter().map(|k| (1, *k)).collect();
    plan.extend((4..8).map(|e| (2, key(0, e))));
    let epoch = c.commit(&plan);

    let warm = c.wait("two warm instances on the small worker", || {
        let view = c.worker_view(1);
        let used = view["memory_used_bytes"].as_u64().unwrap();
        assert!(
            used <= budget,
            "worker reports {used} bytes in use over its budget of {budget}"
        );
        let warm: Vec<ExpertKey> = c
            .instances(1)
            .into_iter()
            .filter(|(_, i)| i["state"] == "warm")
            .map(|((l, e), _)| key(l as usize, e as usize))
            .collect();
        (warm.len() == 2 && view["applied_epoch"] == epoch).then_some(warm)
    });
    let view = c.worker_view(1);
    assert_eq!(view["memory_budget_bytes"], budget);
    let held: u64 = c.instances(1).values().map(|i| i["bytes"].as_u64().unwrap()).sum();
    assert_eq!(view["memory_used_bytes"], held);
    let client = c.client(&c.identity("engine"));
    for k in on_a.iter().filter(|k| !warm.contains(k)) {
        let x = c.input(2, 5);
        let answer =
            c.rt.block_on(client.request(
                wa.addr,
                encode_request(1, 0, Dtype::F32, &[TaskRef::plain(*k, 0, &x)]),
                WAIT,
            ))
            .unwrap();
        expect_error(&format!("{k} over budget"), &answer, ErrorCode::OutOfMemory);
    }
    assert_serves(&c, &client, wa.addr, 0, &warm);
    assert!(c.worker_view(1)["memory_used_bytes"].as_u64().unwrap() <= budget);

    // The engine's dispatcher: A's message fails as a whole, B computes it instead.
    let mut ro = RemoteOptions::new(vec![c.node().raft_addr.to_string()], MODEL);
    ro.suspect_for = Duration::from_millis(1);
    let remote = RemoteExperts::connect(ro, &c.identity("engine"), None, WAIT).unwrap();
    let inputs: Vec<Tensor> = (0..8).map(|e| c.input(2, 10 + e)).collect();
    let tasks = inputs
        .iter()
        .enumerate()
        .map(|(e, x)| ExpertTask {
            instance: InstanceId {
                key: key(0, e),
                replica: 0,
            },
            input: x.clone(),
            tokens: Vec::new(),
            weights: Vec::new(),
        })
        .collect();
    let outputs = remote.execute(0, tasks).unwrap();
    for (e, (x, got)) in inputs.iter().zip(&outputs).enumerate() {
        assert_close(&format!("expert {e}"), got, &c.expected(key(0, e), x));
    }
    let stats = remote.stats();
    assert!(stats.failed_messages >= 1, "{stats:?}");
    assert!(stats.redispatched_tasks >= 4, "{stats:?}");

    // Combining: a worker answers one weighted sum per token it was sent, not one row per
    // (token, expert); A's failed message is again re-dispatched to B.
    let h = c.cfg.hidden_size;
    let batch = c.input(3, 40);
    let mut want = Tensor::zeros(vec![3, h]);
    let tasks = (0..8)
        .map(|e| {
            let tokens = vec![(e % 3) as u32, ((e + 1) % 3) as u32];
            let weights = vec![0.25 + e as f32 * 0.1, 0.5];
            let input = batch.gather_rows(&tokens.iter().map(|&t| t as usize).collect::<Vec<_>>());
            add_weighted_rows(&mut want, &c.expected(key(0, e), &input), &tokens, &weights).unwrap();
            ExpertTask {
                instance: InstanceId {
                    key: key(0, e),
                    replica: 0,
                },
                input,
                tokens,
                weights,
            }
        })
        .collect();
    let before = remote.stats();
    let mut got = Tensor::zeros(vec![3, h]);
    remote.execute_into(0, tasks, &mut got).unwrap();
    assert_close("combined", &got, &want);
    let after = remote.stats();
    let received = after.bytes_received - before.bytes_received;
    // 16 rows computed; at most two answered messages of 3 sums each.
    assert!(
        received <= (2 * 3 * h * 4) as u64,
        "{received} bytes for {before:?} -> {after:?}"
    );
    assert!(c.worker_view(1)["memory_used_bytes"].as_u64().unwrap() <= budget);
    drop(remote);
    c.rt.block_on(wa.shutdown());
    c.rt.block_on(wb.shutdown());
}

#[test]
fn a_restarted_worker_registers_again_gets_its_instances_and_serves() {
    let c = Cluster::start();
    let w = c.worker(c.options(1));
    let keys = [key(0, 3), key(0, 6)];
    c.commit(&keys.map(|k| (1u64, k)));
    c.wait_state(1, &keys, "warm");
    let old = w.addr;
    c.rt.block_on(w.shutdown());
    c.wait("the stopped worker seen dead", || {
        (c.worker_view(1)["health"] == "dead").then_some(())
    });

    // Same id, new port, empty memory: the current plan is given to it again.
    let w = c.worker(c.options(1));
    assert_ne!(w.addr, old);
    for i in c.wait_state(1, &keys, "warm") {
        assert!(i["source"].as_str().unwrap().starts_with("local:"), "{i}");
    }
    let client = c.client(&c.identity("engine"));
    assert_serves(&c, &client, w.addr, 0, &keys);

    // And the next plan too.
    let next = [key(1, 1)];
    let epoch = c.commit(&next.map(|k| (1u64, k)));
    c.wait_state(1, &next, "warm");
    c.wait_state(1, &keys, "idle");
    c.wait("the next plan applied", || {
        (c.worker_view(1)["applied_epoch"] == epoch).then_some(())
    });
    assert_serves(&c, &client, w.addr, 1, &next);
    c.rt.block_on(w.shutdown());
}
