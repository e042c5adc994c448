//! Expert instances as serverless functions: the weight store reads exactly one expert's
//! bytes and gives the same weights as the checkpoint loader; the wire encoding round-trips and
//! rejects garbage with typed errors; the instance lifecycle (load, warm, idle, keep-alive,
//! eviction, on-demand cold start) keeps memory within its budget, also under concurrency.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use data_plane::checkpoint::{save_safetensors, Checkpoint, RawTensor};
use data_plane::config::{Arch, ModelConfig};
use data_plane::error::LoadError;
use data_plane::expert::{DecodeError, ExpertWeights};
use data_plane::instances::{InstanceError, InstanceManager, InstanceState};
use data_plane::store::{cold_start_bench, FallbackStore, LoadedExpert, LocalStore, WeightStore};
use data_plane::testing::{write_random_checkpoint, ModelShape, SaveDtype};
use data_plane::weight::Weight;
use shared::ExpertKey;

const CASES: [(Arch, SaveDtype); 4] = [
    (Arch::Mixtral, SaveDtype::F32),
    (Arch::Mixtral, SaveDtype::Bf16),
    (Arch::GptOss, SaveDtype::F32),
    (Arch::GptOss, SaveDtype::Bf16),
];

fn checkpoint(arch: Arch, dtype: SaveDtype) -> (tempfile::TempDir, ModelConfig) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_random_checkpoint(dir.path(), arch, &ModelShape::tiny(), 7, dtype).unwrap();
    (dir, cfg)
}

fn keys(cfg: &ModelConfig) -> Vec<ExpertKey> {
    cfg.moe_layers()
        .into_iter()
        .flat_map(|l| (0..cfg.moe.num_experts).map(move |e| ExpertKey::new(l, e)))
        .collect()
}

/// Bytes of one expert's tensors in the checkpoint.
fn expert_file_bytes(arch: Arch, cfg: &ModelConfig, dtype: SaveDtype) -> u64 {
    let width = if dtype == SaveDtype::F32 { 4 } else { 2 };
    let (h, i) = (cfg.hidden_size as u64, cfg.moe.expert_intermediate as u64);
    match arch {
        // gate_up slab [H, 2I] + its bias [2I] + down slab [I, H] + its bias [H].
        Arch::GptOss => width * (2 * h * i + 2 * i + i * h + h),
        _ => width * 3 * h * i,
    }
}

/// Raw (dtype-preserving) tensors of a single-file checkpoint.
fn raw_tensors(dir: &Path) -> Vec<RawTensor> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<RawTensor> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| RawTensor {
            name,
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            bytes: view.data().to_vec(),
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Re-writes `src`'s checkpoint into `dst` as `n` shards plus an index.
fn shard(src: &Path, dst: &Path, n: usize) {
    let mut shards: Vec<Vec<RawTensor>> = (0..n).map(|_| vec![]).collect();
    let mut map = serde_json::Map::new();
    for (i, t) in raw_tensors(src).into_iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i % n + 1);
        map.insert(t.name.clone(), serde_json::Value::String(file));
        shards[i % n].push(t);
    }
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    for (i, s) in shards.iter().enumerate() {
        save_safetensors(&dst.join(format!("model-{:05}-of-{n:05}.safetensors", i + 1)), s).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dst.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn local_store_reads_only_the_expert_and_matches_the_checkpoint_loader() {
    for (arch, dtype) in CASES {
        let (dir, cfg) = checkpoint(arch, dtype);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        assert_eq!(store.config(), &cfg);
        let file = std::fs::metadata(dir.path().join("model.safetensors")).unwrap().len();
        let want_bytes = expert_file_bytes(arch, &cfg, dtype);
        for key in keys(&cfg) {
            let want = ExpertWeights::load(&ckpt, &cfg, key).unwrap();
            let got = store.load(key).unwrap();
            assert_eq!(
                got.weights.encode(),
                want.encode(),
                "{arch:?} {dtype:?} {key}: weights differ"
            );
            assert_eq!(got.bytes_read, want_bytes, "{arch:?} {dtype:?} {key}: bytes read");
            // One expert's share of the file, not more: the file holds all of them plus attention.
            assert!(
                got.bytes_read * (keys(&cfg).len() as u64) < file,
                "{} of {file}",
                got.bytes_read
            );
            assert!(got.source.starts_with("local:"), "{}", got.source);
            assert_eq!(store.expected_bytes(key), Some(got.weights.bytes() as u64));
            let ranges = store.expert_ranges(key).unwrap();
            assert_eq!(ranges.iter().map(|r| r.2 - r.1).sum::<u64>(), want_bytes);
        }
        // bf16 matrices stay bf16 where the loader keeps them (per-expert layouts).
        if let (Arch::Mixtral, SaveDtype::Bf16) = (arch, dtype) {
            match store.load(ExpertKey::new(0, 0)).unwrap().weights {
                ExpertWeights::SwiGlu {
                    gate: Weight::Bf16 { .. },
                    ..
                } => {}
                other => panic!("expected bf16 weights, got {other:?}"),
            }
        }
    }
}

#[test]
fn sharded_checkpoints_load_the_same_experts() {
    for (arch, dtype) in [(Arch::Mixtral, SaveDtype::F32), (Arch::GptOss, SaveDtype::Bf16)] {
        let (dir, cfg) = checkpoint(arch, dtype);
        let sharded = tempfile::tempdir().unwrap();
        shard(dir.path(), sharded.path(), 3);
        let single = LocalStore::open(dir.path()).unwrap();
        let multi = LocalStore::open(sharded.path()).unwrap();
        assert!(multi.describe().contains("3 file(s)"), "{}", multi.describe());
        let ckpt = Checkpoint::open(sharded.path()).unwrap();
        for key in keys(&cfg) {
            let a = single.load(key).unwrap();
            let b = multi.load(key).unwrap();
            assert_eq!(a.weights.encode(), b.weights.encode(), "{arch:?} {key}");
            assert_eq!(a.bytes_read, b.bytes_read);
            let c = ExpertWeights::load(&ckpt, &cfg, key).unwrap();
            assert_eq!(c.encode(), b.weights.encode());
        }
    }
}

#[test]
fn missing_tensors_and_truncated_files_are_typed_errors() {
    let (dir, cfg) = checkpoint(Arch::Mixtral, SaveDtype::Bf16);
    let gone = cfg.expert_tensor_names(1, 3)[2].clone();
    let kept: Vec<RawTensor> = raw_tensors(dir.path()).into_iter().filter(|t| t.name != gone).collect();
    let edited = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join("config.json"), edited.path().join("config.json")).unwrap();
    save_safetensors(&edited.path().join("model.safetensors"), &kept).unwrap();
    let store = LocalStore::open(edited.path()).unwrap();
    match store.load(ExpertKey::new(1, 3)) {
        Err(LoadError::MissingTensor { name, .. }) => assert_eq!(name, gone),
        other => panic!("expected a missing tensor, got {other:?}"),
    }
    assert!(store.load(ExpertKey::new(1, 2)).is_ok());
    // Not a routed expert of this model.
    assert!(matches!(
        store.load(ExpertKey::new(9, 0)),
        Err(LoadError::Config { .. })
    ));
    assert!(matches!(
        store.load(ExpertKey::new(0, 99)),
        Err(LoadError::Config { .. })
    ));

    // Truncated before open: the header no longer matches the file.
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    assert!(matches!(
        LocalStore::open(dir.path()),
        Err(LoadError::Checkpoint { .. })
    ));
    std::fs::write(&path, &bytes[..5]).unwrap();
    assert!(matches!(
        LocalStore::open(dir.path()),
        Err(LoadError::Checkpoint { .. })
    ));

    // Truncated while open: the positioned read comes up short.
    std::fs::write(&path, &bytes).unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let key = ExpertKey::new(1, 7);
    let end = store.expert_ranges(key).unwrap().iter().map(|r| r.2).max().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(end - 1)
        .unwrap();
    let last = key;
    assert!(matches!(store.load(last), Err(LoadError::Io { .. })));

    // No checkpoint at all.
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(LocalStore::open(empty.path()), Err(LoadError::Io { .. })));
}

#[test]
fn encoding_round_trips_and_rejects_garbage() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    for (arch, dtype) in CASES {
        let (dir, cfg) = checkpoint(arch, dtype);
        let store = LocalStore::open(dir.path()).unwrap();
        let key = ExpertKey::new(1, 5);
        let w = store.load(key).unwrap().weights;
        let bytes = w.encode();
        // bf16 stays bf16: the encoding is about the size of the weights in memory.
        assert!(bytes.len() < w.bytes() + 128);
        let back = ExpertWeights::decode(&bytes, &cfg, key).unwrap();
        assert_eq!(back, w);
        assert_eq!(back.encode(), bytes, "canonical");

        // Every truncation and every extension is refused.
        for len in 0..bytes.len() {
            let e = ExpertWeights::decode(&bytes[..len], &cfg, key).unwrap_err();
            assert!(matches!(e, LoadError::Decode { .. }), "{e}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        let e = ExpertWeights::decode(&longer, &cfg, key).unwrap_err();
        assert!(
            matches!(
                e,
                LoadError::Decode {
                    source: DecodeError::WrongLength { .. },
                    ..
                }
            ),
            "{e}"
        );

        // Every single-bit flip in the header is caught.
        let header = bytes.len() - w.bytes();
        for byte in 0..header {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[byte] ^= 1 << bit;
                let e = ExpertWeights::decode(&b, &cfg, key).unwrap_err();
                assert!(matches!(e, LoadError::Decode { .. }), "byte {byte} bit {bit}: {e}");
            }
        }

        // Keys that are not routed experts of this model, and another model's shapes.
        for bad in [
            ExpertKey::new(cfg.num_layers, 0),
            ExpertKey::new(0, cfg.moe.num_experts),
        ] {
            let e = ExpertWeights::decode(&bytes, &cfg, bad).unwrap_err();
            assert!(
                matches!(
                    e,
                    LoadError::Decode {
                        source: DecodeError::NotARoutedExpert { .. },
                        ..
                    }
                ),
                "{e}"
            );
        }
        let mut other = cfg.clone();
        other.moe.expert_intermediate += 8;
        let e = ExpertWeights::decode(&bytes, &other, key).unwrap_err();
        assert!(
            matches!(
                e,
                LoadError::Decode {
                    source: DecodeError::WrongShape { .. },
                    ..
                }
            ),
            "{e}"
        );

        // Random garbage, with and without a valid prefix.
        for _ in 0..300 {
            let n = rng.gen_range(0..bytes.len() + 64);
            let mut g: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            if rng.gen_bool(0.5) {
                let k = rng.gen_range(0..header.min(g.len()) + 1);
                g[..k].copy_from_slice(&bytes[..k]);
            }
            if let Ok(x) = ExpertWeights::decode(&g, &cfg, key) {
                // Only possible if the header survived intact: then shapes are right.
                assert_eq!(x.bytes(), w.bytes());
            }
        }
    }
    // Another layout's bytes.
    let (mdir, mcfg) = checkpoint(Arch::Mixtral, SaveDtype::F32);
    let (gdir, gcfg) = checkpoint(Arch::GptOss, SaveDtype::F32);
    let key = ExpertKey::new(0, 1);
    let m = LocalStore::open(mdir.path())
        .unwrap()
        .load(key)
        .unwrap()
        .weights
        .encode();
    let g = LocalStore::open(gdir.path())
        .unwrap()
        .load(key)
        .unwrap()
        .weights
        .encode();
    let e = ExpertWeights::decode(&m, &gcfg, key).unwrap_err();
    assert!(
        matches!(
            e,
            LoadError::Decode {
                source: DecodeError::WrongLayout { .. },
                ..
            }
        ),
        "{e}"
    );
    assert!(ExpertWeights::decode(&g, &mcfg, key).is_err());
}

/// A store that counts loads and can hold them until released.
struct GatedStore {
    inner: LocalStore,
    loads: AtomicU64,
    open: Mutex<bool>,
    opened: Condvar,
}

impl GatedStore {
    fn new(dir: &Path, open: bool) -> Arc<Self> {
        Arc::new(GatedStore {
            inner: LocalStore::open(dir).unwrap(),
            loads: AtomicU64::new(0),
            open: Mutex::new(open),
            opened: Condvar::new(),
        })
    }

    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl WeightStore for GatedStore {
    fn load(&self, key: ExpertKey) -> Result<LoadedExpert, LoadError> {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        drop(open);
        self.loads.fetch_add(1, Ordering::SeqCst);
        self.inner.load(key)
    }
    fn describe(&self) -> String {
        "gated".into()
    }
    fn expected_bytes(&self, key: ExpertKey) -> Option<u64> {
        self.inner.expected_bytes(key)
    }
}

fn set(keys: &[ExpertKey]) -> BTreeSet<ExpertKey> {
    keys.iter().copied().collect()
}

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn lifecycle_loading_warm_idle_evicted_and_back() {
    let (dir, cfg) = checkpoint(Arch::Mixtral, SaveDtype::Bf16);
    let store = GatedStore::new(dir.path(), false);
    let keep_alive = Duration::from_millis(200);
    let m = InstanceManager::new(Arc::new(cfg), store.clone(), u64::MAX, keep_alive, 2);
    let (a, b, c) = (ExpertKey::new(0, 1), ExpertKey::new(1, 2), ExpertKey::new(1, 6));

    // Wanted: loading (held at the gate), then warm.
    assert!(m.set_wanted(&set(&[a, b])).is_empty());
    assert_eq!(m.state(a), InstanceState::Loading);
    assert!(!m.all_warm(&set(&[a, b])));
    assert!(!m.wait_warm(&set(&[a, b]), Duration::from_millis(50)));
    assert!(m.memory_used() > 0, "memory is reserved before loading");
    store.release();
    assert!(m.wait_warm(&set(&[a, b]), WAIT));
    assert_eq!(m.state(a), InstanceState::Warm);
    assert_eq!(m.stats().cold_starts_plan, 2);
    let snap = m.snapshot();
    assert_eq!(snap.len(), 2);
    for i in &snap {
        assert!(i.cold_start_ms.is_some() && i.source.starts_with("local:") && i.idle_for_ms.is_none());
    }
    let one = snap[0].bytes;
    assert_eq!(m.memory_used(), 2 * one);
    let json = serde_json::to_value(&snap).unwrap();
    assert_eq!(json[0]["state"], "warm");
    assert_eq!(json[0]["key"]["layer"], 0);

    // Dropped from the plan: idle, still resident, serving work without a reload.
    m.set_wanted(&set(&[b]));
    assert_eq!(m.state(a), InstanceState::Idle);
    assert!(m.all_warm(&set(&[a])));
    m.acquire(a).unwrap();
    m.record_tokens(a, 5);
    assert_eq!(m.state(a), InstanceState::Idle);
    assert_eq!(store.loads.load(Ordering::SeqCst), 2);

    // Wanted again while idle: warm, no new cold start.
    m.set_wanted(&set(&[a, b]));
    assert_eq!(m.state(a), InstanceState::Warm);
    assert_eq!(m.stats().cold_starts(), 2);
    assert_eq!(store.loads.load(Ordering::SeqCst), 2);

    // Keep-alive expiry evicts; a tick before it does not, nor does a peer reading the weights.
    m.set_wanted(&set(&[b]));
    m.tick();
    std::thread::sleep(keep_alive / 2);
    assert!(m.resident(a).is_some());
    std::thread::sleep(keep_alive / 2);
    assert_eq!(m.state(a), InstanceState::Idle);
    std::thread::sleep(Duration::from_millis(20));
    m.tick();
    assert_eq!(m.state(a), InstanceState::Evicted);
    assert!(m.resident(a).is_none());
    assert_eq!(m.state(b), InstanceState::Warm, "warm instances never expire");
    assert_eq!(m.memory_used(), one);
    assert_eq!(m.stats().evictions, 1);
    let evicted = m.snapshot().into_iter().find(|i| i.key == a).unwrap();
    assert_eq!((evicted.state, evicted.tokens), (InstanceState::Evicted, 5));

    // Work for a cold (never loaded) and an evicted expert cold-starts it on demand.
    let w = m.acquire(c).unwrap();
    assert_eq!(w.encode(), store.inner.load(c).unwrap().weights.encode());
    assert_eq!(
        m.state(c),
        InstanceState::Idle,
        "not in the plan: idle, keep-alive running"
    );
    m.acquire(a).unwrap();
    assert_eq!(m.stats().cold_starts_demand, 2);
    assert_eq!(m.memory_used(), 3 * one);

    // A key that is not an expert of this model: a typed error, nothing held.
    let bad = ExpertKey::new(7, 0);
    match m.acquire(bad) {
        Err(InstanceError::Load {
            source: LoadError::Config { .. },
            ..
        }) => {}
        other => panic!("expected a load error, got {other:?}"),
    }
    assert_eq!(m.state(bad), InstanceState::Cold);
    assert_eq!(m.memory_used(), 3 * one);
    assert!(!m.set_wanted(&set(&[b, bad])).is_empty() || !m.wait_warm(&set(&[bad]), WAIT));
    assert_eq!(m.failures().len(), 1);
}

#[test]
fn acquire_waits_for_a_load_in_flight_instead_of_loading_twice() {
    let (dir, cfg) = checkpoint(Arch::GptOss, SaveDtype::Bf16);
    let store = GatedStore::new(dir.path(), false);
    let m = Arc::new(InstanceManager::new(
        Arc::new(cfg),
        store.clone(),
        u64::MAX,
        Duration::from_secs(60),
        1,
    ));
    let (a, b) = (ExpertKey::new(0, 0), ExpertKey::new(0, 1));
    m.set_wanted(&set(&[a, b]));
    // Let the single loader take `a` (it blocks at the gate); `b` stays queued.
    std::thread::sleep(Duration::from_millis(100));
    let waiters: Vec<_> = [a, a, b]
        .into_iter()
        .map(|k| {
            let m = m.clone();
            std::thread::spawn(move || m.acquire(k).map(|w| w.bytes()))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    store.release();
    for w in waiters {
        assert!(w.join().unwrap().unwrap() > 0);
    }
    assert_eq!(store.loads.load(Ordering::SeqCst), 2, "one load per expert");
    let s = m.stats();
    assert_eq!(
        (s.cold_starts_plan, s.cold_starts_demand),
        (1, 1),
        "b was taken over by the request"
    );
    assert!(m.all_warm(&set(&[a, b])));
}

/// Bytes one expert of the tiny Mixtral occupies.
fn expert_bytes(store: &LocalStore) -> u64 {
    store.expected_bytes(ExpertKey::new(0, 0)).unwrap()
}

#[test]
fn budget_refuses_the_fourth_expert_and_never_evicts_warm_ones() {
    let (dir, cfg) = checkpoint(Arch::Mixtral, SaveDtype::F32);
    let store = Arc::new(LocalStore::open(dir.path()).unwrap());
    let e = expert_bytes(&store);
    let m = InstanceManager::new(Arc::new(cfg), store, 3 * e, Duration::from_secs(60), 2);
    let k: Vec<ExpertKey> = (0..5).map(|i| ExpertKey::new(0, i)).collect();
    let errors = m.set_wanted(&set(&k[..4]));
    assert_eq!(errors.len(), 1);
    match &errors[0] {
        InstanceError::OutOfMemory {
            key,
            needed,
            budget,
            in_use,
        } => {
            assert_eq!((*key, *needed, *budget, *in_use), (k[3], e, 3 * e, 3 * e));
        }
        other => panic!("expected out of memory, got {other:?}"),
    }
    assert_eq!(errors[0].error_type(), "out_of_memory");
    assert!(m.wait_warm(&set(&k[..3]), WAIT));
    assert!(
        !m.wait_warm(&set(&k[..4]), WAIT),
        "the fourth is not loading: no point waiting"
    );
    assert_eq!(m.memory_used(), 3 * e);
    // On demand, too: warm instances are never evicted to make room.
    assert!(matches!(m.acquire(k[4]), Err(InstanceError::OutOfMemory { .. })));
    for key in &k[..3] {
        assert_eq!(m.state(*key), InstanceState::Warm);
    }
    assert_eq!(m.stats().out_of_memory, 2);
}

#[test]
fn idle_instances_are_evicted_least_recently_used_first_then_fewest_tokens() {
    let (dir, cfg) = checkpoint(Arch::GptOss, SaveDtype::F32);
    let store = Arc::new(LocalStore::open(dir.path()).unwrap());
    let e = expert_bytes(&store);
    let m = InstanceManager::new(Arc::new(cfg), store, 3 * e, Duration::from_secs(60), 2);
    let k: Vec<ExpertKey> = (0..6).map(|i| ExpertKey::new(1, i)).collect();
    let (a, b, c, d, f) = (k[0], k[1], k[2], k[3], k[4]);

    // Recency: all go idle together, then c and a serve work (in that order): b is LRU.
    m.set_wanted(&set(&[a, b, c]));
    assert!(m.wait_warm(&set(&[a, b, c]), WAIT));
    m.set_wanted(&BTreeSet::new());
    std::thread::sleep(Duration::from_millis(5));
    m.acquire(c).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    m.acquire(a).unwrap();
    assert!(m.set_wanted(&set(&[d])).is_empty());
    assert_eq!(m.state(b), InstanceState::Evicted);
    assert_eq!((m.state(a), m.state(c)), (InstanceState::Idle, InstanceState::Idle));
    assert!(m.wait_warm(&set(&[d]), WAIT));
    assert!(m.set_wanted(&set(&[d, f])).is_empty());
    assert_eq!(m.state(c), InstanceState::Evicted);
    assert_eq!(m.state(a), InstanceState::Idle);
    assert!(m.wait_warm(&set(&[d, f]), WAIT));
    assert!(m.memory_used() <= 3 * e);

    // Equal recency: the instance that served the fewest tokens goes first.
    let m2 = {
        let store = Arc::new(LocalStore::open(dir.path()).unwrap());
        let cfg = Arc::new(store.config().clone());
        InstanceManager::new(cfg, store, 3 * e, Duration::from_secs(60), 2)
    };
    m2.set_wanted(&set(&[a, b, c]));
    assert!(m2.wait_warm(&set(&[a, b, c]), WAIT));
    m2.record_tokens(a, 100);
    m2.record_tokens(b, 5);
    m2.record_tokens(c, 50);
    m2.set_wanted(&BTreeSet::new()); // all idle at the same instant
    m2.set_wanted(&set(&[d]));
    assert_eq!(m2.state(b), InstanceState::Evicted);
    assert_eq!((m2.state(a), m2.state(c)), (InstanceState::Idle, InstanceState::Idle));
}

#[test]
fn memory_stays_within_budget_under_concurrent_acquires() {
    let (dir, cfg) = checkpoint(Arch::Mixtral, SaveDtype::Bf16);
    let store = Arc::new(LocalStore::open(dir.path()).unwrap());
    let e = expert_bytes(&store);
    let all = keys(&cfg);
    let reference: HashMap<ExpertKey, Vec<u8>> = all
        .iter()
        .map(|k| (*k, store.load(*k).unwrap().weights.encode()))
        .collect();
    let m = Arc::new(InstanceManager::new(Arc::new(cfg), store, 3 * e, Duration::ZERO, 2));
    m.set_wanted(&set(&all[..1]));
    let done = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (m, done) = (m.clone(), done.clone());
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::SeqCst) {
                peak = peak.max(m.memory_used());
                m.tick();
                std::thread::yield_now();
            }
            peak
        })
    };
    let workers: Vec<_> = (0..6)
        .map(|t| {
            let (m, all, reference) = (m.clone(), all.clone(), reference.clone());
            std::thread::spawn(move || {
                let (mut ok, mut oom) = (0, 0);
                for i in 0..40 {
                    let key = all[(t * 7 + i * 3) % all.len()];
                    match m.acquire(key) {
                        Ok(w) => {
                            assert_eq!(w.encode(), reference[&key]);
                            m.record_tokens(key, 1);
                            ok += 1;
                        }
                        Err(InstanceError::OutOfMemory { .. }) => oom += 1,
                        Err(other) => panic!("{other}"),
                    }
                }
                (ok, oom)
            })
        })
        .collect();
    let mut ok = 0;
    for w in workers {
        ok += w.join().unwrap().0;
    }
    done.store(true, Ordering::SeqCst);
    let peak = monitor.join().unwrap();
    assert!(peak <= 3 * e, "peak {peak} > budget {}", 3 * e);
    assert!(ok > 0);
    assert!(m.memory_used() <= m.budget());
    let snap = m.snapshot();
    let resident: u64 = snap
        .iter()
        .filter(|i| {
            matches!(
                i.state,
                InstanceState::Warm | InstanceState::Idle | InstanceState::Loading
            )
        })
        .map(|i| i.bytes)
        .sum();
    assert_eq!(resident, m.memory_used(), "accounting matches the instances");
}

#[test]
fn managers_and_stores_are_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<InstanceManager>();
    send_sync::<LocalStore>();
    send_sync::<FallbackStore>();
}

#[test]
fn fallback_store_tries_stores_in_order() {
    struct Broken;
    impl WeightStore for Broken {
        fn load(&self, key: ExpertKey) -> Result<LoadedExpert, LoadError> {
            Err(LoadError::config("peer", format!("no peer holds {key}")))
        }
        fn describe(&self) -> String {
            "peer:none".into()
        }
    }
    let (dir, _) = checkpoint(Arch::Mixtral, SaveDtype::F32);
    let local: Arc<dyn WeightStore> = Arc::new(LocalStore::open(dir.path()).unwrap());
    let chain = FallbackStore(vec![Arc::new(Broken), local.clone()]);
    let key = ExpertKey::new(1, 1);
    assert!(chain.load(key).unwrap().source.starts_with("local:"));
    assert_eq!(chain.expected_bytes(key), local.expected_bytes(key));
    assert!(chain.describe().contains("peer:none"));
    match FallbackStore(vec![Arc::new(Broken), Arc::new(Broken)]).load(key) {
        Err(LoadError::NoStore { attempts, .. }) => assert_eq!(attempts.len(), 2),
        other => panic!("expected every store to fail, got {other:?}"),
    }
}

#[test]
fn cold_start_bench_reports_both_paths() {
    let (dir, cfg) = checkpoint(Arch::Mixtral, SaveDtype::Bf16);
    let ks = keys(&cfg);
    let r = cold_start_bench(dir.path(), &ks, 2).unwrap();
    assert_eq!(r.experts, ks.len());
    assert_eq!(
        r.bytes_per_pass,
        ks.len() as u64 * expert_file_bytes(Arch::Mixtral, &cfg, SaveDtype::Bf16)
    );
    assert_eq!(r.instance_bytes_per_pass, r.bytes_per_pass, "bf16 stays bf16");
    assert!(r.raw_read_gbps > 0.0 && r.instance_gbps > 0.0 && r.ratio > 0.0);
    assert!(r.cache_warm);
}

/// The cold-start benchmark at a realistic expert size (hidden 2048, intermediate 1408).
/// `MOELESS_COLD_START_DIR` picks where the checkpoints go (default: the temp dir).
#[test]
#[ignore = "benchmark: writes ~1.3 GB of checkpoints; run in release with --ignored --nocapture"]
fn cold_start_bench_realistic() {
    let base = std::env::var_os("MOELESS_COLD_START_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let shape = ModelShape {
        vocab: 256,
        hidden: 2048,
        layers: 2,
        heads: 16,
        kv_heads: 4,
        head_dim: 128,
        experts: 8,
        top_k: 2,
        expert_intermediate: 1408,
        dense_intermediate: 1408,
        max_positions: 256,
    };
    let mut out = BTreeMap::new();
    for (name, arch, dtype) in [
        ("mixtral-f32", Arch::Mixtral, SaveDtype::F32),
        ("mixtral-bf16", Arch::Mixtral, SaveDtype::Bf16),
        ("gpt-oss-bf16", Arch::GptOss, SaveDtype::Bf16),
    ] {
        let dir = base.join(format!("moeless-cold-start-{name}"));
        let cfg = if dir.join("config.json").exists() {
            LocalStore::open(&dir).unwrap().config().clone()
        } else {
            write_random_checkpoint(&dir, arch, &shape, 3, dtype).unwrap()
        };
        let r = cold_start_bench(&dir, &keys(&cfg), 9).unwrap();
        out.insert(name, r);
    }
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
