//! Message exchange benchmark: this crate's QUIC (with mutual TLS) against a plain TCP socket
//! carrying the same length-prefixed request/response, between the same two endpoints.
//!
//! The echo side answers every request with its length (8 bytes, little-endian), so the
//! measured direction is request payload only. TCP has no streams: `concurrency` requests in
//! flight means that many TCP connections, against that many streams on `quic_connections`
//! QUIC connections.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{Client, Handler, Identity, Limits, Message, Server, TransportError};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Answers each request with its length. The request is in this process's memory either way:
/// over QUIC as the chunks it arrived in (what the worker's decoder reads), over TCP read into
/// one buffer.
struct LengthEcho;

impl Handler for LengthEcho {
    fn handle(&self, _peer: SocketAddr, request: Message) -> Pin<Box<dyn Future<Output = Bytes> + Send + '_>> {
        let len = request.len() as u64;
        Box::pin(async move { Bytes::copy_from_slice(&len.to_le_bytes()) })
    }
}

/// The QUIC and TCP echo servers of one benchmark.
pub struct EchoServers {
    /// The QUIC server.
    pub quic: Server,
    /// Where the TCP server listens.
    pub tcp_addr: SocketAddr,
    tcp_task: tokio::task::JoinHandle<()>,
}

impl EchoServers {
    /// Stops both servers.
    pub async fn shutdown(self) {
        self.tcp_task.abort();
        self.quic.shutdown().await;
    }
}

/// Starts a QUIC and a TCP echo server on `ip` (ports chosen by the system).
pub async fn serve_echo(
    ip: std::net::IpAddr,
    identity: &Identity,
    limits: Limits,
) -> Result<EchoServers, TransportError> {
    let quic = Server::bind(SocketAddr::new(ip, 0), identity, limits.clone(), Arc::new(LengthEcho))?;
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .map_err(|e| TransportError::io(format!("binding TCP on {ip}"), e))?;
    let tcp_addr = listener
        .local_addr()
        .map_err(|e| TransportError::io("TCP local address", e))?;
    let max = limits.max_message_bytes;
    let tcp_task = tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                if let Err(e) = tcp_echo(stream, max).await {
                    tracing::debug!(%peer, error = %e, "TCP echo connection ended");
                }
            });
        }
    });
    Ok(EchoServers {
        quic,
        tcp_addr,
        tcp_task,
    })
}

async fn tcp_echo(mut stream: TcpStream, max: usize) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    loop {
        let len = match stream.read_u64_le().await {
            Ok(len) => len,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if len > max as u64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{len}-byte message"),
            ));
        }
        // A fresh buffer per message, as the QUIC side's chunks are fresh per datagram.
        let mut body = vec![0u8; len as usize];
        stream.read_exact(&mut body).await?;
        std::hint::black_box(&body);
        stream.write_all(&len.to_le_bytes()).await?;
    }
}

async fn tcp_exchange(stream: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    stream.write_all(&(payload.len() as u64).to_le_bytes()).await?;
    stream.write_all(payload).await?;
    let echoed = stream.read_u64_le().await?;
    if echoed != payload.len() as u64 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "wrong length echoed",
        ));
    }
    Ok(())
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct ExchangeConfig {
    /// Message sizes in bytes.
    pub sizes: Vec<usize>,
    /// Requests in flight during the throughput runs.
    pub concurrency: usize,
    /// Repetitions per size; medians are reported.
    pub repeats: usize,
    /// Payload bytes sent per throughput run and transport (at least `2 * concurrency` messages).
    pub bytes_per_run: usize,
    /// QUIC connections the client keeps to the server (`Limits::connections_per_peer`).
    pub quic_connections: usize,
}

impl Default for ExchangeConfig {
    fn default() -> Self {
        ExchangeConfig {
            sizes: vec![64 << 10, 256 << 10, 1 << 20, 4 << 20, 8 << 20],
            concurrency: 4,
            repeats: 5,
            bytes_per_run: 64 << 20,
            quic_connections: 1,
        }
    }
}

/// Results for one message size: medians over the repetitions plus every repetition.
#[derive(Clone, Debug)]
pub struct ExchangeRow {
    /// Message size in bytes.
    pub size: usize,
    /// Median QUIC throughput in MB/s (10^6 bytes of request payload per second).
    pub quic_mb_s: f64,
    /// Median TCP throughput in MB/s.
    pub tcp_mb_s: f64,
    /// Median of the per-repetition p50 round-trip latencies at concurrency 1, milliseconds.
    pub quic_p50_ms: f64,
    /// The same for TCP.
    pub tcp_p50_ms: f64,
    /// Every repetition's QUIC throughput.
    pub quic_mb_s_runs: Vec<f64>,
    /// Every repetition's TCP throughput.
    pub tcp_mb_s_runs: Vec<f64>,
    /// Every repetition's QUIC p50 latency.
    pub quic_p50_ms_runs: Vec<f64>,
    /// Every repetition's TCP p50 latency.
    pub tcp_p50_ms_runs: Vec<f64>,
}

impl ExchangeRow {
    /// QUIC throughput as a fraction of TCP's.
    pub fn throughput_ratio(&self) -> f64 {
        self.quic_mb_s / self.tcp_mb_s
    }

    /// QUIC p50 latency as a multiple of TCP's.
    pub fn latency_ratio(&self) -> f64 {
        self.quic_p50_ms / self.tcp_p50_ms
    }
}

/// The middle element (upper middle for even counts); NaN for no values.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn bench_io(what: &str, e: std::io::Error) -> TransportError {
    TransportError::io(format!("benchmark over TCP: {what}"), e)
}

async fn quic_throughput(
    client: &Client,
    addr: SocketAddr,
    payload: &Bytes,
    messages: usize,
    concurrency: usize,
) -> Result<f64, TransportError> {
    let left = Arc::new(AtomicUsize::new(messages));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, payload, left) = (client.clone(), payload.clone(), left.clone());
            tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    client.request(addr, payload.clone(), TIMEOUT).await?;
                }
                Ok::<(), TransportError>(())
            })
        })
        .collect();
    for worker in workers {
        worker
            .await
            .map_err(|e| TransportError::io("benchmark task", std::io::Error::other(e)))??;
    }
    Ok((messages * payload.len()) as f64 / started.elapsed().as_secs_f64() / 1e6)
}

async fn tcp_throughput(
    conns: &mut Vec<TcpStream>,
    payload: &Bytes,
    messages: usize,
    concurrency: usize,
) -> Result<f64, TransportError> {
    let left = Arc::new(AtomicUsize::new(messages));
    let started = Instant::now();
    let workers: Vec<_> = conns
        .drain(..concurrency)
        .map(|mut stream| {
            let (payload, left) = (payload.clone(), left.clone());
            tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    tcp_exchange(&mut stream, &payload).await?;
                }
                Ok::<TcpStream, std::io::Error>(stream)
            })
        })
        .collect();
    for worker in workers {
        let stream = worker.await.map_err(|e| bench_io("task", std::io::Error::other(e)))?;
        conns.push(stream.map_err(|e| bench_io("exchange", e))?);
    }
    Ok((messages * payload.len()) as f64 / started.elapsed().as_secs_f64() / 1e6)
}

async fn quic_latency(
    client: &Client,
    addr: SocketAddr,
    payload: &Bytes,
    samples: usize,
) -> Result<f64, TransportError> {
    let mut ms = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        client.request(addr, payload.clone(), TIMEOUT).await?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(&ms))
}

async fn tcp_latency(stream: &mut TcpStream, payload: &Bytes, samples: usize) -> Result<f64, TransportError> {
    let mut ms = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        tcp_exchange(stream, payload)
            .await
            .map_err(|e| bench_io("exchange", e))?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(&ms))
}

/// Measures QUIC (to `quic_addr`, as `identity`) and TCP (to `tcp_addr`) side by side against
/// servers started by [`serve_echo`], reporting progress through `progress`.
pub async fn run_exchange(
    identity: &Identity,
    quic_addr: SocketAddr,
    tcp_addr: SocketAddr,
    config: &ExchangeConfig,
    progress: &mut (dyn FnMut(String) + Send),
) -> Result<Vec<ExchangeRow>, TransportError> {
    let concurrency = config.concurrency.max(1);
    let limits = Limits {
        connections_per_peer: config.quic_connections.max(1),
        ..Limits::default()
    };
    let client = Client::new(identity, limits)?;
    let mut conns = Vec::new();
    for _ in 0..concurrency {
        let stream = TcpStream::connect(tcp_addr)
            .await
            .map_err(|e| bench_io("connecting", e))?;
        stream.set_nodelay(true).map_err(|e| bench_io("TCP_NODELAY", e))?;
        conns.push(stream);
    }
    // Warm up both paths (handshake, path MTU discovery, congestion windows).
    let warm = Bytes::from(vec![7u8; 1 << 20]);
    quic_throughput(&client, quic_addr, &warm, 32, concurrency).await?;
    tcp_throughput(&mut conns, &warm, 32, concurrency).await?;

    let mut rows = Vec::new();
    for &size in &config.sizes {
        let payload: Bytes = (0..size).map(|i| i as u8).collect::<Vec<u8>>().into();
        let messages = (config.bytes_per_run / size.max(1)).max(2 * concurrency);
        let samples = messages.clamp(10, 50);
        let mut row = ExchangeRow {
            size,
            quic_mb_s: 0.0,
            tcp_mb_s: 0.0,
            quic_p50_ms: 0.0,
            tcp_p50_ms: 0.0,
            quic_mb_s_runs: Vec::new(),
            tcp_mb_s_runs: Vec::new(),
            quic_p50_ms_runs: Vec::new(),
            tcp_p50_ms_runs: Vec::new(),
        };
        for rep in 0..config.repeats.max(1) {
            // Alternate which transport goes first so drift in machine load hits both alike.
            let (quic, tcp) = if rep % 2 == 0 {
                let q = quic_throughput(&client, quic_addr, &payload, messages, concurrency).await?;
                (q, tcp_throughput(&mut conns, &payload, messages, concurrency).await?)
            } else {
                let t = tcp_throughput(&mut conns, &payload, messages, concurrency).await?;
                (
                    quic_throughput(&client, quic_addr, &payload, messages, concurrency).await?,
                    t,
                )
            };
            let quic_lat = quic_latency(&client, quic_addr, &payload, samples).await?;
            let tcp_lat = tcp_latency(&mut conns[0], &payload, samples).await?;
            progress(format!(
                "  {} KiB, run {}/{}: QUIC {quic:.0} MB/s, TCP {tcp:.0} MB/s; p50 QUIC {quic_lat:.3} ms, TCP {tcp_lat:.3} ms",
                size >> 10,
                rep + 1,
                config.repeats.max(1)
            ));
            row.quic_mb_s_runs.push(quic);
            row.tcp_mb_s_runs.push(tcp);
            row.quic_p50_ms_runs.push(quic_lat);
            row.tcp_p50_ms_runs.push(tcp_lat);
        }
        row.quic_mb_s = median(&row.quic_mb_s_runs);
        row.tcp_mb_s = median(&row.tcp_mb_s_runs);
        row.quic_p50_ms = median(&row.quic_p50_ms_runs);
        row.tcp_p50_ms = median(&row.tcp_p50_ms_runs);
        rows.push(row);
    }
    Ok(rows)
}
