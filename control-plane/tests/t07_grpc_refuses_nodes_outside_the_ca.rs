//! The control plane's gRPC listener (Raft peers, WorkerService, EngineService) over mutual TLS
//! on real sockets: a client with no certificate, with a certificate from another CA, or in
//! plaintext is refused before any service sees its request; certified workers and peers work,
//! and so does a three-node group whose Raft traffic and forwarded writes all run over mTLS.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use control_plane::state::ModelSpec;
use control_plane::types::Command;
use control_plane::RunningNode;
use pki::grpc::{endpoint, GrpcTls};
use pki::{generate, TlsFiles, SERVER_NAME};
use proto::engine::engine_service_client::EngineServiceClient;
use proto::raft::raft_service_client::RaftServiceClient;
use proto::worker::worker_service_client::WorkerServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const CALL: Duration = Duration::from_secs(10);

struct Certs {
    ours: tempfile::TempDir,
    other: tempfile::TempDir,
}

impl Certs {
    fn new() -> Self {
        let ours = tempfile::tempdir().unwrap();
        generate(ours.path(), &["cp-1", "cp-2", "cp-3", "worker-1"], &[]).unwrap();
        let other = tempfile::tempdir().unwrap();
        generate(other.path(), &["intruder"], &[]).unwrap();
        Self { ours, other }
    }

    fn tls(&self, name: &str) -> GrpcTls {
        GrpcTls::load(&TlsFiles::in_dir(self.ours.path(), name)).unwrap()
    }

    /// A certificate signed by another CA, from a client that does trust our CA.
    fn intruder(&self) -> GrpcTls {
        GrpcTls::load(&TlsFiles {
            ca: self.ours.path().join("ca.pem"),
            ..TlsFiles::in_dir(self.other.path(), "intruder")
        })
        .unwrap()
    }
}

fn channel(addr: SocketAddr, tls: Option<&GrpcTls>) -> Channel {
    endpoint(&addr.to_string(), tls).unwrap().connect_lazy()
}

/// Trusts our CA but presents no certificate.
fn anonymous(addr: SocketAddr, certs: &Certs) -> Channel {
    let ca = std::fs::read(certs.ours.path().join("ca.pem")).unwrap();
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(SERVER_NAME),
        )
        .unwrap()
        .connect_lazy()
}

fn register(id: u64) -> proto::worker::RegisterRequest {
    proto::worker::RegisterRequest {
        worker_id: id,
        address: format!("127.0.0.1:{}", 9000 + id),
        devices: vec![],
        memory_bytes: 1 << 30,
    }
}

async fn try_register(ch: Channel, id: u64) -> Result<(), String> {
    let mut client = WorkerServiceClient::new(ch);
    match tokio::time::timeout(CALL, client.register(register(id))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => panic!("register {id} neither succeeded nor failed within {CALL:?}"),
    }
}

async fn registered(node: &RunningNode) -> Vec<u64> {
    node.node
        .state_machine()
        .read(|s| s.workers.keys().copied().collect())
        .await
}

#[tokio::test]
async fn the_grpc_listener_refuses_clients_outside_the_ca() {
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.tls = Some(certs.tls("cp-1"));
    let node = common::start_single(config).await;
    let addr = node.raft_addr;

    // No certificate, a certificate from another CA, plaintext: refused, and nothing registered.
    let refused = [
        ("no certificate", anonymous(addr, &certs)),
        ("another CA", channel(addr, Some(&certs.intruder()))),
        ("plaintext", channel(addr, None)),
    ];
    for (i, (what, ch)) in refused.into_iter().enumerate() {
        let id = 100 + i as u64;
        let err = try_register(ch.clone(), id).await.expect_err(what);
        eprintln!("{what}: refused with {err}");
        let mut engine = EngineServiceClient::new(ch.clone());
        let listed = tokio::time::timeout(CALL, engine.list_workers(proto::engine::ListWorkersRequest {}));
        assert!(listed.await.unwrap().is_err(), "{what}: EngineService");
        // The Raft service shares the listener: a would-be peer without our CA cannot vote.
        let mut raft = RaftServiceClient::new(ch);
        let vote = raft.vote(proto::raft::RaftMessage {
            payload: b"{}".to_vec(),
            data: vec![],
        });
        assert!(
            tokio::time::timeout(CALL, vote).await.unwrap().is_err(),
            "{what}: RaftService"
        );
    }
    assert!(
        registered(&node).await.is_empty(),
        "a refused client reached the service"
    );

    // A client that trusts another CA refuses our server in turn.
    let suspicious = GrpcTls::load(&TlsFiles::in_dir(certs.other.path(), "intruder")).unwrap();
    assert!(try_register(channel(addr, Some(&suspicious)), 200).await.is_err());

    // Certified workers and engines still get in after all those refusals.
    try_register(channel(addr, Some(&certs.tls("worker-1"))), 1)
        .await
        .expect("a worker with a cluster certificate registers");
    let workers = EngineServiceClient::new(channel(addr, Some(&certs.tls("cp-2"))))
        .list_workers(proto::engine::ListWorkersRequest {})
        .await
        .expect("a certified engine lists workers")
        .into_inner()
        .workers;
    assert_eq!(workers.iter().map(|w| w.worker_id).collect::<Vec<_>>(), vec![1]);
    assert_eq!(registered(&node).await, vec![1]);
    node.shutdown().await;
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], chaos_tests::ports::free_loopback_port()))
}

#[tokio::test]
async fn a_three_node_group_replicates_and_forwards_over_mutual_tls() {
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let peers: BTreeMap<u64, String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| (i as u64 + 1, a.to_string()))
        .collect();
    let mut nodes = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let id = i as u64 + 1;
        let mut c = common::config(&dir.path().join(format!("node{id}")));
        c.id = id;
        c.raft_addr = *addr;
        c.peers = peers.clone();
        c.tls = Some(certs.tls(&format!("cp-{id}")));
        nodes.push(control_plane::start(c).await.expect("node starts"));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let leader = loop {
        if let Some(l) = nodes.iter().find_map(|n| n.node.cluster().leader) {
            break l;
        }
        assert!(Instant::now() < deadline, "no leader elected over mTLS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A follower forwards the write to the leader over the same mTLS links.
    let follower = nodes.iter().find(|n| n.node.id() != leader).unwrap();
    let spec = ModelSpec {
        name: "mixtral-tiny".into(),
        architecture: "mixtral".into(),
        num_layers: 2,
        num_experts: 4,
        top_k: 2,
        weights: "/models/tiny".into(),
    };
    follower
        .node
        .write(Command::PutModel(spec), Duration::from_secs(10))
        .await
        .expect("a write through a follower commits");
    for n in &nodes {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !n
            .node
            .state_machine()
            .read(|s| s.models.contains_key("mixtral-tiny"))
            .await
        {
            assert!(
                Instant::now() < deadline,
                "node {} did not apply the write",
                n.node.id()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for n in nodes {
        n.shutdown().await;
    }
}
