//! Deterministic partition tests of the Raft layer on turmoil's simulated network.
//!
//! Three control-plane Raft nodes (our storage on real files, redb or the WAL by seed, our state machine, our gRPC
//! transport and snapshot streaming) run as turmoil hosts; two clients write through
//! `RaftService.ForwardWrite` while a seeded schedule cuts and heals links, isolates the leader
//! or crashes and restarts nodes from their disks. Time is simulated: elections, timeouts and
//! message delays happen in virtual time, so a scenario of many seconds runs in far less, and
//! the network schedule (latencies, partitions, which node a client asks) is a function of the
//! seed. openraft draws election timeouts from the OS random generator, so elections may differ
//! between two runs of one seed; the invariants below must hold for every run.
//!
//! Checked for every seed:
//! - election safety: never two leaders in one term (sampled every simulated millisecond; the
//!   control plane uses standard Raft leader ids, see `control_plane::TypeConfig`);
//! - no acknowledged write lost: every write answered `Done` is in every node's state, once;
//! - no write applied twice, none invented;
//! - real-time order: a write acknowledged before another was sent comes first in the log;
//! - convergence: after the faults end, one leader and identical state on all nodes within 15 s.
//!
//! `MOELESS_TURMOIL_SEEDS=N` runs N seeds per scenario (default 4; CI uses the default), and
//! `MOELESS_TURMOIL_SEED=S` runs the one seed S (to reproduce a failure).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control_plane::network::{raft_client_on, Dialer, ForwardedWrite, GrpcNetwork, RaftServer, MAX_MESSAGE_BYTES};
use control_plane::{initialize_if_first, open_raft, NodeConfig, StorageKind};
use control_plane::{Command, NodeInfo, TypeConfig};
use hyper_util::rt::TokioIo;
use openraft::async_runtime::WatchReceiver;
use openraft::type_config::alias::WatchReceiverOf;
use openraft::ServerState;
use proto::raft::raft_service_server::RaftServiceServer;
use proto::raft::RaftMessage;
use rand::{Rng, SeedableRng};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

const IDS: [u64; 3] = [1, 2, 3];
const RAFT_PORT: u16 = 7000;
/// Snapshot (and purge the log behind it) every this many entries, so a node cut off for a few
/// seconds falls behind the purge point and is caught up by a streamed snapshot.
const SNAPSHOT_EVERY: u64 = 40;

fn host(id: u64) -> String {
    format!("n{id}")
}

fn raft_addr(id: u64) -> String {
    format!("{}:{RAFT_PORT}", host(id))
}

/// A turmoil TCP stream as a tonic server connection.
struct SimConn(turmoil::net::TcpStream);

impl Connected for SimConn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl tokio::io::AsyncRead for SimConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SimConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A lazy gRPC channel over the simulated network.
fn sim_channel(addr: &str) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?;
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(|uri: Uri| async move {
            let host = uri.host().unwrap_or_default().to_string();
            let port = uri.port_u16().unwrap_or(RAFT_PORT);
            let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        })),
    )
}

/// What each node last published about itself (read by the checks outside the simulation).
#[derive(Default)]
struct World {
    metrics: BTreeMap<u64, Metrics>,
    /// Per node: (last applied index, the notes of the cost ledger in order).
    applied: BTreeMap<u64, (u64, Vec<String>)>,
    /// InstallSnapshot streams received, all nodes together.
    snapshots: Arc<std::sync::atomic::AtomicUsize>,
}

type Shared = Arc<Mutex<World>>;
type Metrics = WatchReceiverOf<TypeConfig, openraft::RaftMetrics<TypeConfig>>;

/// Seeds alternate between the default redb store and the WAL.
fn storage_for(seed: u64) -> StorageKind {
    [StorageKind::Redb, StorageKind::Wal][(seed % 2) as usize]
}

fn node_config(id: u64, dir: &std::path::Path, storage: StorageKind) -> NodeConfig {
    let mut c = NodeConfig::new(id, dir.join(host(id)));
    c.storage = storage;
    c.peers = IDS.iter().map(|i| (*i, raft_addr(*i))).collect();
    c.snapshot_every = SNAPSHOT_EVERY;
    c
}

/// One node's software: Raft on its data directory, its gRPC server on the simulated network,
/// and a task that publishes what it has applied. Run again from the same directory on restart.
fn add_node(sim: &mut turmoil::Sim<'_>, id: u64, dir: std::path::PathBuf, storage: StorageKind, world: Shared) {
    sim.host(host(id), move || {
        let (dir, world) = (dir.clone(), world.clone());
        async move {
            let config = node_config(id, &dir, storage);
            let listener = turmoil::net::TcpListener::bind((IpAddr::from(Ipv4Addr::UNSPECIFIED), RAFT_PORT)).await?;
            let dialer: Dialer = Arc::new(sim_channel);
            let network = GrpcNetwork {
                tls: None,
                dialer: Some(dialer),
            };
            let (raft, sm) = open_raft(&config, network).await?;
            world.lock().unwrap().metrics.insert(id, raft.metrics());
            let publish = world.clone();
            tokio::spawn(async move {
                loop {
                    let notes = sm
                        .read(|s| s.cost.iter().map(|c| c.note.clone()).collect::<Vec<_>>())
                        .await;
                    let (applied, _) = openraft::storage::RaftStateMachine::applied_state(&mut sm.clone())
                        .await
                        .expect("in-memory applied state");
                    publish
                        .lock()
                        .unwrap()
                        .applied
                        .insert(id, (applied.map_or(0, |l| l.index()), notes));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
            let incoming = futures_util::stream::unfold(listener, |l| async move {
                let conn = l.accept().await.map(|(s, _)| SimConn(s));
                Some((conn, l))
            });
            // Counts streamed snapshots received, to show the catch-up path ran.
            let snapshots = world.lock().unwrap().snapshots.clone();
            let server = tonic::transport::Server::builder()
                .trace_fn(move |req| {
                    if req.uri().path().ends_with("/InstallSnapshot") {
                        snapshots.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    tracing::Span::none()
                })
                .add_service(
                    RaftServiceServer::new(RaftServer::new(raft.clone(), id))
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES),
                );
            let serving = tokio::spawn(server.serve_with_incoming(incoming));
            let info = NodeInfo {
                raft_addr: raft_addr(id),
                admin_addr: String::new(),
            };
            initialize_if_first(&raft, &config, &info).await?;
            serving.await??;
            Ok(())
        }
    });
}

/// One write as a client saw it: `invoked`/`answered` in simulated ms since the start.
#[derive(Debug, Clone)]
struct Op {
    note: String,
    invoked: u128,
    answered: u128,
    acked: bool,
    /// Log index of an acknowledged write.
    index: u64,
}

/// A client sending writes one after the other, each to the node it believes leads (learned
/// from NotLeader answers), else to a node drawn from its seeded generator.
fn add_writer(sim: &mut turmoil::Sim<'_>, name: &str, seed: u64, until: Duration, history: Arc<Mutex<Vec<Op>>>) {
    let name = name.to_string();
    let who = name.clone();
    sim.client(name, async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut leader: Option<String> = None;
        let start = tokio::time::Instant::now();
        let mut n = 0u64;
        while start.elapsed() < until {
            n += 1;
            let note = format!("{who}-{n}");
            let target = leader
                .clone()
                .unwrap_or_else(|| raft_addr(IDS[rng.gen_range(0..IDS.len())]));
            let cmd = Command::RecordCost {
                window_end_ms: n,
                gpu_seconds: 0.0,
                cold_starts: 0,
                note: note.clone(),
            };
            let msg = RaftMessage {
                payload: serde_json::to_vec(&cmd)?,
                data: Vec::new(),
            };
            let invoked = start.elapsed().as_millis();
            let mut client = raft_client_on(sim_channel(&target)?);
            let answer = tokio::time::timeout(Duration::from_secs(1), client.forward_write(msg)).await;
            let answered = start.elapsed().as_millis();
            let (mut acked, mut index) = (false, 0);
            match answer {
                Ok(Ok(resp)) => match serde_json::from_slice::<ForwardedWrite>(&resp.into_inner().payload)? {
                    ForwardedWrite::Done { log_index, .. } => (acked, index) = (true, log_index),
                    ForwardedWrite::NotLeader { leader: l } => leader = l.map(|(_, info)| info.raft_addr),
                    ForwardedWrite::Failed { .. } => leader = None,
                },
                // Unreachable or timed out: outcome unknown; ask someone else next time.
                _ => leader = None,
            }
            history.lock().unwrap().push(Op {
                note,
                invoked,
                answered,
                acked,
                index,
            });
            tokio::time::sleep(Duration::from_millis(rng.gen_range(5..25))).await;
        }
        Ok(())
    });
}

/// A fault the schedule applies at a simulated time.
#[derive(Debug, Clone)]
enum Fault {
    /// Cut the current leader off from both other nodes.
    IsolateLeader,
    Isolate(u64),
    /// Cut one link (both directions).
    Cut(u64, u64),
    /// Cut one direction only: messages from the first to the second are lost.
    CutOneWay(u64, u64),
    /// Crash the current leader (its tasks and memory are gone; its disk stays).
    CrashLeader,
    Crash(u64),
    /// Restart every crashed node from its disk.
    RestartAll,
    HealAll,
}

#[derive(Clone, Copy, Debug)]
enum Scenario {
    LeaderIsolated,
    RandomPartitions,
    CrashRestart,
}

fn schedule(scenario: Scenario, rng: &mut rand::rngs::StdRng) -> Vec<(u64, Fault)> {
    match scenario {
        Scenario::LeaderIsolated => vec![
            (rng.gen_range(2_000..3_000), Fault::IsolateLeader),
            (rng.gen_range(6_000..7_000), Fault::HealAll),
            (rng.gen_range(8_000..8_500), Fault::IsolateLeader),
            (rng.gen_range(10_000..10_500), Fault::HealAll),
        ],
        Scenario::RandomPartitions => {
            let mut at = 1_500u64;
            let mut faults = Vec::new();
            while at < 11_000 {
                let a = IDS[rng.gen_range(0..3)];
                let b = IDS
                    .iter()
                    .copied()
                    .filter(|x| *x != a)
                    .nth(rng.gen_range(0..2))
                    .unwrap_or(a);
                let fault = match rng.gen_range(0..5) {
                    0 => Fault::Isolate(a),
                    1 => Fault::Cut(a, b),
                    2 => Fault::CutOneWay(a, b),
                    3 => Fault::IsolateLeader,
                    _ => Fault::HealAll,
                };
                faults.push((at, fault));
                at += rng.gen_range(600..1_800);
            }
            faults.push((11_500, Fault::HealAll));
            faults
        }
        Scenario::CrashRestart => vec![
            (rng.gen_range(2_000..3_000), Fault::CrashLeader),
            (rng.gen_range(4_500..5_500), Fault::RestartAll),
            (rng.gen_range(7_000..7_500), Fault::Crash(IDS[rng.gen_range(0..3)])),
            (rng.gen_range(7_600..8_000), Fault::IsolateLeader),
            (rng.gen_range(9_500..10_000), Fault::RestartAll),
            (rng.gen_range(10_000..10_500), Fault::HealAll),
        ],
    }
}

fn current_leader(world: &Shared) -> Option<u64> {
    let w = world.lock().unwrap();
    w.metrics
        .iter()
        .filter(|(_, m)| m.borrow_watched().state == ServerState::Leader)
        .max_by_key(|(_, m)| m.borrow_watched().current_term)
        .map(|(id, _)| *id)
}

fn apply_fault(sim: &mut turmoil::Sim<'_>, world: &Shared, crashed: &mut Vec<u64>, fault: &Fault) {
    let isolate = |sim: &mut turmoil::Sim<'_>, id: u64| {
        for other in IDS.iter().filter(|o| **o != id) {
            sim.partition(host(id), host(*other));
        }
    };
    match fault {
        Fault::IsolateLeader => {
            if let Some(l) = current_leader(world) {
                isolate(sim, l);
            }
        }
        Fault::Isolate(id) => isolate(sim, *id),
        Fault::Cut(a, b) => sim.partition(host(*a), host(*b)),
        Fault::CutOneWay(a, b) => sim.partition_oneway(host(*a), host(*b)),
        Fault::CrashLeader | Fault::Crash(_) => {
            let target = match fault {
                Fault::Crash(id) => Some(*id),
                _ => current_leader(world),
            };
            if let Some(id) = target.filter(|id| !crashed.contains(id)) {
                sim.crash(host(id));
                world.lock().unwrap().metrics.remove(&id);
                crashed.push(id);
            }
        }
        Fault::RestartAll => {
            for id in crashed.drain(..) {
                sim.bounce(host(id));
            }
        }
        Fault::HealAll => {
            for a in IDS {
                for b in IDS {
                    if a < b {
                        sim.repair(host(a), host(b));
                    }
                }
            }
        }
    }
}

/// Runs one scenario under one seed and checks every invariant; panics with the seed on failure.
fn run(scenario: Scenario, seed: u64) -> (usize, usize, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let world: Shared = Arc::default();
    let history: Arc<Mutex<Vec<Op>>> = Arc::default();
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_secs(60))
        .min_message_latency(Duration::from_micros(200))
        .max_message_latency(Duration::from_millis(5))
        .build();
    for id in IDS {
        add_node(&mut sim, id, dir.path().to_path_buf(), storage_for(seed), world.clone());
    }
    let writes_for = Duration::from_millis(12_000);
    add_writer(&mut sim, "w1", seed ^ 0x11, writes_for, history.clone());
    add_writer(&mut sim, "w2", seed ^ 0x22, writes_for, history.clone());

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut faults = schedule(scenario, &mut rng);
    faults.reverse();
    let mut crashed = Vec::new();
    let mut log = Vec::new();
    let mut leaders: BTreeMap<u64, u64> = BTreeMap::new();
    let ctx = |what: &str| format!("{scenario:?} seed {seed} ({}): {what}", storage_for(seed));
    loop {
        let now = sim.elapsed().as_millis() as u64;
        while faults.last().is_some_and(|(at, _)| *at <= now) {
            let (_, fault) = faults.pop().expect("checked");
            apply_fault(&mut sim, &world, &mut crashed, &fault);
            log.push((now, fault, current_leader(&world)));
        }
        {
            let w = world.lock().unwrap();
            for (id, m) in &w.metrics {
                let m = m.borrow_watched();
                if m.state == ServerState::Leader {
                    let first = *leaders.entry(m.current_term).or_insert(*id);
                    assert_eq!(
                        first,
                        *id,
                        "{}",
                        ctx(&format!("two leaders in term {}", m.current_term))
                    );
                }
            }
        }
        let done = sim
            .step()
            .unwrap_or_else(|e| panic!("{}", ctx(&format!("simulation: {e}"))));
        if done && faults.is_empty() {
            break;
        }
    }
    // Every fault has ended and the writers are done: the cluster must converge on its own.
    for id in crashed.drain(..) {
        sim.bounce(host(id));
    }
    // Converged: one leader, and every node has applied (and published) at least every
    // acknowledged write's index and holds the same state.
    let max_acked = history
        .lock()
        .unwrap()
        .iter()
        .filter(|o| o.acked)
        .map(|o| o.index)
        .max();
    let converge_by = sim.elapsed() + Duration::from_secs(15);
    let final_notes = loop {
        let converged = {
            let w = world.lock().unwrap();
            let one_leader = w
                .metrics
                .values()
                .filter(|m| m.borrow_watched().state == ServerState::Leader)
                .count()
                == 1;
            let states: Vec<_> = IDS.iter().filter_map(|id| w.applied.get(id)).collect();
            let same = states.len() == IDS.len()
                && states.windows(2).all(|p| p[0] == p[1])
                && states.iter().all(|s| Some(s.0) >= max_acked);
            (one_leader && same && w.metrics.len() == IDS.len()).then(|| states[0].1.clone())
        };
        if let Some(notes) = converged {
            break notes;
        }
        if sim.elapsed() >= converge_by {
            let w = world.lock().unwrap();
            let nodes: Vec<String> = w
                .metrics
                .iter()
                .map(|(id, m)| {
                    let m = m.borrow_watched();
                    format!(
                        "n{id}: {:?} term {} leader {:?} last_log {:?} applied {:?} published {:?}",
                        m.state,
                        m.current_term,
                        m.current_leader,
                        m.last_log_index,
                        m.last_applied.map(|l| l.index()),
                        w.applied.get(id).map(|a| a.0)
                    )
                })
                .collect();
            panic!(
                "{}",
                ctx(&format!(
                    "no convergence within 15 s after the faults ended (max acked {max_acked:?}): {nodes:?}; faults {log:?}"
                ))
            );
        }
        // Hosts keep running after the clients are done; step until the state settles.
        let _ = sim.step();
    };

    let history = history.lock().unwrap();
    let position: BTreeMap<&str, usize> = final_notes.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    assert_eq!(position.len(), final_notes.len(), "{}", ctx("a write applied twice"));
    let sent: BTreeMap<&str, &Op> = history.iter().map(|o| (o.note.as_str(), o)).collect();
    for note in &final_notes {
        assert!(
            sent.contains_key(note.as_str()),
            "{}",
            ctx(&format!("{note} was never sent"))
        );
    }
    let acked: Vec<&Op> = history.iter().filter(|o| o.acked).collect();
    for op in &acked {
        assert!(
            position.contains_key(op.note.as_str()),
            "{}",
            ctx(&format!(
                "acknowledged write {op:?} lost; leaders by term {leaders:?}; faults {log:?}; final log around: {:?}",
                history
                    .iter()
                    .filter(|o| o.acked && o.index.abs_diff(op.index) < 4)
                    .collect::<Vec<_>>()
            ))
        );
    }
    // Real-time order: if `a` was acknowledged before `b` was sent, `a` precedes `b`.
    for a in &acked {
        for b in &acked {
            if a.answered < b.invoked {
                assert!(
                    position[a.note.as_str()] < position[b.note.as_str()],
                    "{}",
                    ctx(&format!(
                        "{} acknowledged before {} was sent, but applied after it",
                        a.note, b.note
                    ))
                );
            }
        }
    }
    assert!(!acked.is_empty(), "{}", ctx("no write succeeded at all"));
    let snapshots = world
        .lock()
        .unwrap()
        .snapshots
        .load(std::sync::atomic::Ordering::Relaxed);
    (acked.len(), history.len(), snapshots)
}

fn seeds() -> Vec<u64> {
    if let Some(s) = std::env::var("MOELESS_TURMOIL_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![s];
    }
    let n = std::env::var("MOELESS_TURMOIL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4u64);
    (1..=n).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect()
}

fn run_seeds(scenario: Scenario) {
    for seed in seeds() {
        let t = std::time::Instant::now();
        let (acked, sent, snapshots) = run(scenario, seed);
        eprintln!(
            "{scenario:?} seed {seed} ({}): {acked}/{sent} writes acknowledged, all kept; {snapshots} snapshots streamed ({:.1} s)",
            storage_for(seed),
            t.elapsed().as_secs_f64()
        );
        if matches!(scenario, Scenario::LeaderIsolated) {
            // The old leader is cut off for seconds while the log is compacted behind it: it
            // can only come back through a streamed snapshot.
            assert!(snapshots > 0, "{scenario:?} seed {seed}: no snapshot was streamed");
        }
    }
}

#[test]
fn leader_isolated_from_the_majority() {
    run_seeds(Scenario::LeaderIsolated);
}

#[test]
fn random_partitions_including_one_way_links() {
    run_seeds(Scenario::RandomPartitions);
}

#[test]
fn crashes_and_restarts_from_disk() {
    run_seeds(Scenario::CrashRestart);
}
