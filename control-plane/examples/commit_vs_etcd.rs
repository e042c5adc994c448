//! Plan commits on a three-node MoEless control plane against puts of the same size on a
//! three-node etcd cluster (Debian's `etcd-server`), side by side on loopback in one run.
//!
//! Both are driven the same way: HTTP/1.1 + JSON from one client process to the leader
//! (MoEless: `POST /v1/placement` on the admin API; etcd: `POST /v3/kv/put` on its gRPC
//! gateway), each write durable on a majority before it is answered (both fsync their logs).
//! Latency: sequential writes, rounds alternating which system goes first. Throughput: 16
//! concurrent clients.
//!
//! `cargo run --release -p control-plane --example commit_vs_etcd -- [WRITES_PER_ROUND] [ROUNDS] [OUT.json]`
//! (needs `etcd` on PATH: `apt-get install etcd-server`; `MOELESS_BENCH_STORAGE=sled|wal` for the
//! sled backend or the WAL).

use std::collections::BTreeMap;
use std::process::{Child, Command as Proc, Stdio};
use std::time::{Duration, Instant};

use control_plane::state::{ExpertInstance, ModelSpec, PlanIntent, WorkerSpec};
use control_plane::{Command, RunningNode, StorageKind};

mod common;
use common::{free_port, percentile_ms, three_nodes};
use serde_json::{json, Value};

fn stats(mut v: Vec<Duration>) -> Value {
    v.sort();
    let mean = v.iter().sum::<Duration>().as_secs_f64() * 1e3 / v.len() as f64;
    json!({"n": v.len(), "p50_ms": percentile_ms(&v, 0.5), "p99_ms": percentile_ms(&v, 0.99), "mean_ms": mean})
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

struct Etcd {
    procs: Vec<Child>,
    clients: Vec<String>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

fn etcd_cluster(dir: &std::path::Path) -> anyhow::Result<Etcd> {
    let peer: Vec<u16> = (0..3).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
    let client: Vec<u16> = (0..3).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
    let initial = (0..3)
        .map(|i| format!("e{i}=http://127.0.0.1:{}", peer[i]))
        .collect::<Vec<_>>()
        .join(",");
    let mut procs = Vec::new();
    for i in 0..3 {
        let log = std::fs::File::create(dir.join(format!("etcd{i}.log")))?;
        procs.push(
            Proc::new("etcd")
                .arg(format!("--name=e{i}"))
                .arg(format!("--data-dir={}", dir.join(format!("etcd{i}")).display()))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{}", peer[i]))
                .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{}", peer[i]))
                .arg(format!("--listen-client-urls=http://127.0.0.1:{}", client[i]))
                .arg(format!("--advertise-client-urls=http://127.0.0.1:{}", client[i]))
                .arg(format!("--initial-cluster={initial}"))
                .arg("--initial-cluster-state=new")
                .arg("--initial-cluster-token=moeless-bench")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|e| anyhow::anyhow!("starting etcd (apt-get install etcd-server): {e}"))?,
        );
    }
    Ok(Etcd {
        procs,
        clients: client.iter().map(|p| format!("http://127.0.0.1:{p}")).collect(),
    })
}

/// The client URL of etcd's leader (waits for the cluster to elect one).
async fn etcd_leader(http: &reqwest::Client, etcd: &Etcd) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for url in &etcd.clients {
            let Ok(r) = http
                .post(format!("{url}/v3/maintenance/status"))
                .json(&json!({}))
                .send()
                .await
            else {
                continue;
            };
            let Ok(v) = r.json::<Value>().await else { continue };
            let me = v["header"]["member_id"].as_str().unwrap_or_default();
            if !me.is_empty() && v["leader"].as_str() == Some(me) {
                return Ok(url.clone());
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "etcd elected no leader in 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The admin URL of the MoEless leader.
async fn moeless_leader(http: &reqwest::Client, nodes: &[RunningNode]) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for n in nodes {
            if n.node.is_leader() {
                return Ok(format!("http://{}", n.admin_addr));
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "no MoEless leader in 30 s");
        let _ = http;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plan placing every expert of an 8-layer, 8-expert model on one worker (64 instances).
fn plan(n: usize) -> Value {
    let instances: Vec<ExpertInstance> = (0..8)
        .flat_map(|layer| {
            (0..8).map(move |expert| ExpertInstance {
                layer,
                expert,
                worker: 1,
                gpu: 0,
                share: 1.0,
            })
        })
        .collect();
    serde_json::to_value(PlanIntent {
        model: "bench".into(),
        instances,
        reason: format!("bench {n}"),
        origin: Default::default(),
    })
    .expect("plan serializes")
}

async fn ours_once(http: &reqwest::Client, leader: &str, n: usize) -> anyhow::Result<Duration> {
    let body = plan(n);
    let t = Instant::now();
    let r = http.post(format!("{leader}/v1/placement")).json(&body).send().await?;
    anyhow::ensure!(r.status().is_success(), "commit: {} {}", r.status(), r.text().await?);
    Ok(t.elapsed())
}

async fn etcd_once(http: &reqwest::Client, leader: &str, n: usize, value: &str) -> anyhow::Result<Duration> {
    let body = json!({"key": base64(format!("plan/{n}").as_bytes()), "value": value});
    let t = Instant::now();
    let r = http.post(format!("{leader}/v3/kv/put")).json(&body).send().await?;
    anyhow::ensure!(r.status().is_success(), "put: {} {}", r.status(), r.text().await?);
    Ok(t.elapsed())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let writes: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);
    let rounds: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3);
    let out = args.next();
    let dir = tempfile::tempdir()?;
    let http = pki::https::http_client_builder().build()?;

    eprintln!("starting 3 MoEless control-plane nodes and 3 etcd members on loopback ...");
    let kind: StorageKind = std::env::var("MOELESS_BENCH_STORAGE")
        .unwrap_or_else(|_| StorageKind::default().to_string())
        .parse()?;
    let nodes = three_nodes(kind, dir.path()).await?;
    let etcd = etcd_cluster(dir.path())?;
    // A worker and a model for the plans to place.
    let w = WorkerSpec {
        id: 1,
        address: "127.0.0.1:9".into(),
        devices: vec![],
        memory_bytes: 1 << 40,
    };
    nodes[0]
        .node
        .write(Command::RegisterWorker(w), Duration::from_secs(30))
        .await?;
    let m = ModelSpec {
        name: "bench".into(),
        architecture: "mixtral".into(),
        num_layers: 8,
        num_experts: 8,
        top_k: 2,
        weights: "/models/bench".into(),
    };
    nodes[0]
        .node
        .write(Command::PutModel(m), Duration::from_secs(30))
        .await?;
    let ours = moeless_leader(&http, &nodes).await?;
    let theirs = etcd_leader(&http, &etcd).await?;
    // etcd stores the same bytes a plan commit replicates: the plan's JSON.
    let bytes = serde_json::to_vec(&plan(0))?.len();
    let value = base64(&vec![b'x'; bytes]);
    eprintln!("leaders: MoEless {ours}, etcd {theirs}; {bytes} bytes per write");
    // Warm-up (connections, first appends).
    for i in 0..10 {
        ours_once(&http, &ours, i).await?;
        etcd_once(&http, &theirs, i, &value).await?;
    }

    let mut lat: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}: {writes} sequential writes each ...", round + 1);
        for k in 0..2 {
            if (round + k) % 2 == 0 {
                for i in 0..writes {
                    lat.entry("moeless")
                        .or_default()
                        .push(ours_once(&http, &ours, i).await?);
                }
            } else {
                for i in 0..writes {
                    lat.entry("etcd")
                        .or_default()
                        .push(etcd_once(&http, &theirs, i, &value).await?);
                }
            }
        }
    }

    let clients = 16;
    let mut tput: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        eprintln!(
            "round {}/{rounds}: throughput, {clients} concurrent clients ...",
            round + 1
        );
        for k in 0..2 {
            let is_ours = (round + k) % 2 == 0;
            let t = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..clients {
                let (http, ours, theirs, value) = (http.clone(), ours.clone(), theirs.clone(), value.clone());
                tasks.push(tokio::spawn(async move {
                    for i in 0..writes / clients {
                        let n = c * 100_000 + i;
                        if is_ours {
                            ours_once(&http, &ours, n).await?;
                        } else {
                            etcd_once(&http, &theirs, n, &value).await?;
                        }
                    }
                    anyhow::Ok(())
                }));
            }
            for task in tasks {
                task.await??;
            }
            let rate = (writes / clients * clients) as f64 / t.elapsed().as_secs_f64();
            tput.entry(if is_ours { "moeless" } else { "etcd" })
                .or_default()
                .push(rate);
        }
    }

    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut report = json!({"bytes_per_write": bytes, "writes_per_round": writes, "rounds": rounds,
        "concurrent_clients": clients});
    println!("| system | p50 ms | p99 ms | mean ms | writes/s ({clients} clients, median of {rounds}) |");
    println!("|---|---|---|---|---|");
    for sys in ["moeless", "etcd"] {
        let s = stats(lat[sys].clone());
        let rate = median(tput[sys].clone());
        println!(
            "| {sys} | {:.2} | {:.2} | {:.2} | {rate:.0} |",
            s["p50_ms"].as_f64().unwrap_or(0.0),
            s["p99_ms"].as_f64().unwrap_or(0.0),
            s["mean_ms"].as_f64().unwrap_or(0.0)
        );
        report[sys] = json!({"latency": s, "writes_per_s": tput[sys]});
    }
    if let Some(path) = out {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
        eprintln!("wrote {path}");
    }
    for n in nodes {
        n.shutdown().await;
    }
    drop(etcd);
    Ok(())
}
