//! gRPC clients of the control plane for workers and engines: any of several addresses, with
//! channels cached per address, over mutual TLS when the cluster's certificates are given.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pki::grpc::GrpcTls;
use proto::engine::engine_service_client::EngineServiceClient;
use proto::worker::worker_service_client::WorkerServiceClient;
use proto::MAX_SERVICE_MESSAGE_BYTES;
use tonic::transport::Channel;

#[derive(Clone)]
pub struct ControlClient {
    addrs: Arc<Vec<String>>,
    tls: Option<GrpcTls>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// Index of the address that answered last.
    preferred: Arc<Mutex<usize>>,
}

impl ControlClient {
    /// `addrs`: HOST:PORT of control-plane nodes; `tls`: this node's certificate for mutual TLS
    /// (`None`: plaintext, for a control plane on loopback without certificates).
    pub fn new(addrs: Vec<String>, tls: Option<GrpcTls>) -> Self {
        Self {
            addrs: Arc::new(addrs),
            tls,
            channels: Arc::default(),
            preferred: Arc::default(),
        }
    }

    pub fn addresses(&self) -> Vec<String> {
        self.addrs.as_ref().clone()
    }

    async fn channel(&self, addr: &str) -> anyhow::Result<Channel> {
        if let Some(c) = self.channels.lock().ok().and_then(|c| c.get(addr).cloned()) {
            return Ok(c);
        }
        let endpoint = pki::grpc::endpoint(addr, self.tls.as_ref())
            .map_err(anyhow::Error::msg)?
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(5));
        let channel = endpoint.connect().await?;
        if let Ok(mut c) = self.channels.lock() {
            c.insert(addr.to_string(), channel.clone());
        }
        Ok(channel)
    }

    /// A channel to the first address that connects, starting with the last one that did.
    async fn any(&self) -> anyhow::Result<Channel> {
        let n = self.addrs.len();
        let start = self.preferred.lock().map(|p| *p).unwrap_or(0);
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            match self.channel(&self.addrs[idx]).await {
                Ok(c) => {
                    if let Ok(mut p) = self.preferred.lock() {
                        *p = idx;
                    }
                    return Ok(c);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no control-plane address")))
    }

    /// Moves on to the next address (after a failed call on the current one).
    pub fn rotate(&self) {
        if let Ok(mut p) = self.preferred.lock() {
            *p = (*p + 1) % self.addrs.len().max(1);
        }
    }

    pub async fn worker(&self) -> anyhow::Result<WorkerServiceClient<Channel>> {
        Ok(WorkerServiceClient::new(self.any().await?).max_decoding_message_size(MAX_SERVICE_MESSAGE_BYTES))
    }

    pub async fn worker_at(&self, addr: String) -> anyhow::Result<WorkerServiceClient<Channel>> {
        Ok(WorkerServiceClient::new(self.channel(&addr).await?).max_decoding_message_size(MAX_SERVICE_MESSAGE_BYTES))
    }

    pub async fn engine(&self) -> anyhow::Result<EngineServiceClient<Channel>> {
        Ok(EngineServiceClient::new(self.any().await?).max_decoding_message_size(MAX_SERVICE_MESSAGE_BYTES))
    }

    /// QUIC addresses by id of the registered workers that are not dead.
    pub async fn worker_addresses(&self) -> anyhow::Result<HashMap<u64, SocketAddr>> {
        let resp = self
            .engine()
            .await?
            .list_workers(proto::engine::ListWorkersRequest {})
            .await?
            .into_inner();
        Ok(resp
            .workers
            .into_iter()
            .filter(|w| w.health != "dead")
            .filter_map(|w| Some((w.worker_id, w.address.parse().ok()?)))
            .collect())
    }
}
