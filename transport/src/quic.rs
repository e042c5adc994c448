//! QUIC endpoints: a server answering each request stream on its own task, and a client that
//! keeps one connection per address and sends each request on its own bidirectional stream.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    Connection, ConnectionError, Endpoint, IdleTimeout, ReadError, ReadToEndError, RecvStream, SendStream,
    TransportConfig, VarInt, WriteError,
};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;

use crate::{codes, Identity, Limits, Message, TransportError, SERVER_NAME};

/// Both ends must name the same application protocol.
const ALPN: &[u8] = b"moeless-transport/1";

/// Flow-control windows: large enough that a few multi-MiB messages are in flight at once
/// without waiting for window updates.
const STREAM_RECEIVE_WINDOW: u32 = 16 << 20;
const CONNECTION_RECEIVE_WINDOW: u32 = 64 << 20;
const SEND_WINDOW: u64 = 64 << 20;

/// Requested UDP socket buffer size. Bursts of multi-MiB messages overflow the default
/// (about 208 KiB on Linux), and every dropped datagram shrinks the congestion window; the
/// kernel caps the request at net.core.rmem_max / wmem_max.
const SOCKET_BUFFER: usize = 16 << 20;

/// The ceiling of path MTU discovery towards other hosts (quinn's default is 1452). Quinn hands
/// the kernel up to 10 packets per GSO send, which must total at most 64 KiB, so above about
/// 6.5 KB every batch is refused, counted as loss, and black-hole detection drops the path to
/// 1200 bytes. At 6500 jumbo-frame links carry ~4x fewer, larger packets; on 1500-byte links
/// discovery simply stops lower.
const MAX_UDP_PAYLOAD: u16 = 6500;

/// The ceiling of path MTU discovery towards a peer on this host (workers beside the engine),
/// and the largest UDP payload an endpoint accepts. The loopback device carries 64 KiB
/// datagrams, so there each packet is sent on its own (no GSO batch to stay under 64 KiB) at up
/// to this size: ~10x fewer packets through quinn's per-packet path and its crypto calls than
/// 10-packet GSO batches of 6500 bytes. Alone it measured 1.2-1.4x the throughput for 1-8 MiB
/// messages in exploratory runs; with chunked messages, 1.75-2.1x the session-19 transport
/// (`moeless bench exchange`, docs/PERFORMANCE.md).
const LOOPBACK_MAX_UDP_PAYLOAD: u16 = 65_000;

/// How long [`Server::shutdown`] waits for closed connections to drain.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Answers requests for a [`Server`].
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. `peer` is the remote address. The returned bytes are the response.
    fn handle(&self, peer: SocketAddr, request: Message) -> Pin<Box<dyn Future<Output = Bytes> + Send + '_>>;
}

/// Whether `ip` is this host (IPv4-mapped loopback included).
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Congestion control stays at quinn's default (Cubic): on loopback, BBR, an 8 MiB initial
/// window and sparser ACKs (ack-frequency) measured no better; the losses that did hurt came
/// from overflowing UDP socket buffers (see [`SOCKET_BUFFER`]). `loopback` selects the
/// settings for a peer on this host (see [`LOOPBACK_MAX_UDP_PAYLOAD`]).
fn transport_config(limits: &Limits, keep_alive: bool, loopback: bool) -> Result<TransportConfig, TransportError> {
    let mut config = TransportConfig::default();
    let idle = IdleTimeout::try_from(limits.idle_timeout)
        .map_err(|_| TransportError::tls(format!("idle timeout {:?} is too long", limits.idle_timeout)))?;
    config
        .max_idle_timeout(Some(idle))
        .max_concurrent_bidi_streams(VarInt::from_u32(limits.max_concurrent_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    if loopback {
        mtu.upper_bound(LOOPBACK_MAX_UDP_PAYLOAD);
        config.enable_segmentation_offload(false);
    } else {
        mtu.upper_bound(MAX_UDP_PAYLOAD);
    }
    config.mtu_discovery_config(Some(mtu));
    if keep_alive {
        // The client keeps cached connections from idling out between requests.
        config.keep_alive_interval(Some(limits.idle_timeout / 3));
    }
    Ok(config)
}

/// Resets the stream unless the message was finished, so that a cancelled or panicking
/// sender never lets a truncated message pass as complete (quinn finishes streams on drop).
struct Outgoing {
    stream: SendStream,
    finished: bool,
}

impl Outgoing {
    fn new(stream: SendStream) -> Self {
        Outgoing {
            stream,
            finished: false,
        }
    }

    async fn send(&mut self, message: Bytes) -> Result<(), WriteError> {
        self.stream.write_chunk(message).await?;
        self.stream.finish()?;
        self.finished = true;
        Ok(())
    }

    fn reset(&mut self, code: u32) {
        let _ = self.stream.reset(VarInt::from_u32(code));
        self.finished = true;
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.stream.reset(VarInt::from_u32(codes::CANCELLED));
        }
    }
}

/// Reads a stream to its end as one message of at most `limit` bytes, kept in the chunks it
/// arrived in (quinn's `read_to_end` zero-fills a buffer of the whole size and copies every
/// chunk into it: two passes over each byte that a chunk-walking reader does not need).
async fn read_message(recv: &mut RecvStream, limit: usize) -> Result<Message, ReadToEndError> {
    let mut chunks = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.map_err(ReadToEndError::Read)? {
        total = total.saturating_add(chunk.bytes.len());
        if total > limit {
            return Err(ReadToEndError::TooLong);
        }
        chunks.push(chunk.bytes);
    }
    Ok(Message::from_chunks(chunks))
}

/// A QUIC server requiring client certificates signed by its identity's CA.
pub struct Server {
    endpoint: Endpoint,
    local_addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Binds a QUIC endpoint on `addr` (port 0 = any) requiring client certificates signed by
    /// the identity's CA (mutual TLS). Must be called inside a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        identity: &Identity,
        limits: Limits,
        handler: Arc<dyn Handler>,
    ) -> Result<Server, TransportError> {
        let Some((chain, key)) = identity.own() else {
            return Err(TransportError::tls(
                "a server needs a certificate of its own, not only CA roots",
            ));
        };
        let verifier = WebPkiClientVerifier::builder_with_provider(identity.roots(), provider())
            .build()
            .map_err(TransportError::tls)?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TransportError::tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.to_vec(), key.clone_key())
            .map_err(TransportError::tls)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = Arc::new(QuicServerConfig::try_from(tls).map_err(TransportError::tls)?);
        let mut config = quinn::ServerConfig::with_crypto(crypto.clone());
        config.transport_config(Arc::new(transport_config(&limits, false, false)?));
        let mut local = quinn::ServerConfig::with_crypto(crypto);
        local.transport_config(Arc::new(transport_config(&limits, false, true)?));
        let endpoint = endpoint_on(addr, Some(config))?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|e| TransportError::io(format!("binding {addr}"), e))?;
        let accept = tokio::spawn(accept_loop(endpoint.clone(), Arc::new(local), limits, handler));
        Ok(Server {
            endpoint,
            local_addr,
            accept,
        })
    }

    /// The address the server listens on (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Closes every connection (peers see a retryable `Closed`) and waits, at most
    /// [`SHUTDOWN_GRACE`], until the peers have been told.
    pub async fn shutdown(self) {
        self.endpoint.close(VarInt::from_u32(codes::SHUTDOWN), b"shutting down");
        // A handshake a client abandoned midway can otherwise hold this for the idle timeout.
        if tokio::time::timeout(SHUTDOWN_GRACE, self.endpoint.wait_idle())
            .await
            .is_err()
        {
            tracing::debug!(addr = %self.local_addr, "connections still draining at shutdown");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.endpoint.close(VarInt::from_u32(codes::SHUTDOWN), b"shutting down");
        self.accept.abort();
    }
}

/// Accepts connections: peers on this host with the loopback settings (`local`), others with the
/// endpoint's default ones.
async fn accept_loop(endpoint: Endpoint, local: Arc<quinn::ServerConfig>, limits: Limits, handler: Arc<dyn Handler>) {
    while let Some(incoming) = endpoint.accept().await {
        let limits = limits.clone();
        let handler = handler.clone();
        let local = local.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let connecting = match is_loopback(remote.ip()) {
                true => incoming.accept_with(local),
                false => incoming.accept(),
            };
            match connecting {
                Ok(connecting) => match connecting.await {
                    Ok(conn) => serve_connection(conn, limits, handler).await,
                    // Includes clients without a certificate from our CA.
                    Err(e) => tracing::info!(peer = %remote, error = %e, "refused a connection at the handshake"),
                },
                Err(e) => tracing::info!(peer = %remote, error = %e, "refused a connection"),
            }
        });
    }
}

async fn serve_connection(conn: Connection, limits: Limits, handler: Arc<dyn Handler>) {
    let peer = conn.remote_address();
    tracing::debug!(%peer, "connection accepted");
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let task = serve_stream(
                    conn.clone(),
                    peer,
                    send,
                    recv,
                    limits.max_message_bytes,
                    handler.clone(),
                );
                tokio::spawn(task);
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "connection ended");
                return;
            }
        }
    }
}

async fn serve_stream(
    conn: Connection,
    peer: SocketAddr,
    send: SendStream,
    mut recv: RecvStream,
    limit: usize,
    handler: Arc<dyn Handler>,
) {
    let mut out = Outgoing::new(send);
    let request = match read_message(&mut recv, limit).await {
        Ok(message) => message,
        Err(ReadToEndError::TooLong) => {
            tracing::warn!(%peer, limit, "request larger than the limit refused");
            let _ = recv.stop(VarInt::from_u32(codes::TOO_LARGE));
            out.reset(codes::TOO_LARGE);
            return;
        }
        Err(e) => {
            tracing::debug!(%peer, error = %e, "request not received");
            return;
        }
    };
    let response = {
        let stopped = out.stream.stopped();
        tokio::select! {
            response = handler.handle(peer, request) => response,
            // The client gave up (timeout) or went away: stop working on its behalf.
            _ = stopped => return,
            _ = conn.closed() => return,
        }
    };
    if let Err(e) = out.send(response).await {
        tracing::debug!(%peer, error = %e, "response not sent");
    }
}

/// A QUIC client: `Limits::connections_per_peer` cached connections per server address (used
/// in turn), one stream per request. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

type Slot = Arc<tokio::sync::Mutex<Option<Connection>>>;

struct ClientInner {
    config: quinn::ClientConfig,
    /// For servers on this host.
    local: quinn::ClientConfig,
    limits: Limits,
    v4: Endpoint,
    v6: Mutex<Option<Endpoint>>,
    connections: Mutex<HashMap<SocketAddr, Vec<Slot>>>,
    /// Which of a peer's connections the next request takes.
    turn: std::sync::atomic::AtomicUsize,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A UDP socket with large buffers, wrapped in a quinn endpoint on the current tokio runtime.
fn endpoint_on(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> Result<Endpoint, TransportError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let io = |e| TransportError::io(format!("binding UDP on {addr}"), e);
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(io)?;
    // Best effort: a smaller buffer than asked for costs throughput, not correctness.
    if let Err(e) = socket.set_recv_buffer_size(SOCKET_BUFFER) {
        tracing::debug!(%addr, error = %e, "UDP receive buffer left at its default");
    }
    if let Err(e) = socket.set_send_buffer_size(SOCKET_BUFFER) {
        tracing::debug!(%addr, error = %e, "UDP send buffer left at its default");
    }
    socket.bind(&addr.into()).map_err(io)?;
    let runtime = quinn::default_runtime().ok_or_else(|| {
        io(std::io::Error::other(
            "no tokio runtime: create endpoints from inside one",
        ))
    })?;
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(LOOPBACK_MAX_UDP_PAYLOAD)
        .map_err(|e| io(std::io::Error::other(e)))?;
    Endpoint::new(config, server, socket.into(), runtime).map_err(io)
}

fn client_endpoint(bind: SocketAddr, config: &quinn::ClientConfig) -> Result<Endpoint, TransportError> {
    let mut endpoint = endpoint_on(bind, None)?;
    endpoint.set_default_client_config(config.clone());
    Ok(endpoint)
}

impl Client {
    /// A client presenting the identity's certificate (if it has one) and trusting only its CA.
    /// Must be called inside a tokio runtime.
    pub fn new(identity: &Identity, limits: Limits) -> Result<Client, TransportError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TransportError::tls)?
            .with_root_certificates(identity.roots());
        let mut tls = match identity.own() {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain.to_vec(), key.clone_key())
                .map_err(TransportError::tls)?,
            None => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = Arc::new(QuicClientConfig::try_from(tls).map_err(TransportError::tls)?);
        let mut config = quinn::ClientConfig::new(crypto.clone());
        config.transport_config(Arc::new(transport_config(&limits, true, false)?));
        let mut local = quinn::ClientConfig::new(crypto);
        local.transport_config(Arc::new(transport_config(&limits, true, true)?));
        let v4 = client_endpoint(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), &config)?;
        Ok(Client {
            inner: Arc::new(ClientInner {
                config,
                local,
                limits,
                v4,
                v6: Mutex::new(None),
                connections: Mutex::new(HashMap::new()),
                turn: std::sync::atomic::AtomicUsize::new(0),
            }),
        })
    }

    /// Sends one request and waits for its response. Keeps `connections_per_peer` connections
    /// per address (reconnecting one when it is closed); each request is its own bidirectional
    /// stream, so many may be in flight at once on one connection. `timeout` covers connecting
    /// too.
    pub async fn request(
        &self,
        addr: SocketAddr,
        request: Bytes,
        timeout: Duration,
    ) -> Result<Message, TransportError> {
        let limit = self.inner.limits.max_message_bytes;
        if request.len() > limit {
            return Err(TransportError::TooLarge {
                size: request.len(),
                limit,
            });
        }
        match tokio::time::timeout(timeout, self.exchange(addr, request)).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout { addr, after: timeout }),
        }
    }

    /// How many open connections to `addr` are cached (at most `connections_per_peer`).
    pub fn open_connections(&self, addr: SocketAddr) -> usize {
        let slots = locked(&self.inner.connections).get(&addr).cloned().unwrap_or_default();
        slots
            .iter()
            .filter(|s| {
                s.try_lock()
                    .is_ok_and(|c| c.as_ref().is_some_and(|c| c.close_reason().is_none()))
            })
            .count()
    }

    /// The largest UDP payload the first open connection to `addr` currently sends (path MTU
    /// discovery's result so far), if there is one: up to 6500 bytes towards other hosts, up to
    /// 65,000 towards this one.
    pub fn path_mtu(&self, addr: SocketAddr) -> Option<u16> {
        let slots = locked(&self.inner.connections).get(&addr).cloned().unwrap_or_default();
        slots.iter().find_map(|s| {
            s.try_lock().ok().and_then(|c| {
                c.as_ref()
                    .filter(|c| c.close_reason().is_none())
                    .map(|c| c.stats().path.current_mtu)
            })
        })
    }

    /// Drops the cached connections to `addr` (after a failure); the next request reconnects.
    /// Requests already in flight on it finish undisturbed.
    pub fn forget(&self, addr: SocketAddr) {
        locked(&self.inner.connections).remove(&addr);
    }

    async fn exchange(&self, addr: SocketAddr, request: Bytes) -> Result<Message, TransportError> {
        let conn = self.connection(addr).await?;
        let (send, mut recv) = conn.open_bi().await.map_err(|e| closed(addr, e))?;
        let mut out = Outgoing::new(send);
        out.send(request).await.map_err(|e| match e {
            WriteError::Stopped(code) => TransportError::Remote {
                addr,
                code: code.into_inner(),
            },
            WriteError::ConnectionLost(e) => closed(addr, e),
            other => TransportError::Protocol {
                addr,
                reason: other.to_string(),
            },
        })?;
        let limit = self.inner.limits.max_message_bytes;
        match read_message(&mut recv, limit).await {
            Ok(message) => Ok(message),
            Err(ReadToEndError::TooLong) => {
                let _ = recv.stop(VarInt::from_u32(codes::TOO_LARGE));
                Err(TransportError::TooLarge {
                    size: limit.saturating_add(1),
                    limit,
                })
            }
            Err(ReadToEndError::Read(ReadError::Reset(code))) => Err(TransportError::Remote {
                addr,
                code: code.into_inner(),
            }),
            Err(ReadToEndError::Read(ReadError::ConnectionLost(e))) => Err(closed(addr, e)),
            Err(ReadToEndError::Read(other)) => Err(TransportError::Protocol {
                addr,
                reason: other.to_string(),
            }),
        }
    }

    fn endpoint_for(&self, addr: SocketAddr) -> Result<Endpoint, TransportError> {
        if addr.is_ipv4() {
            return Ok(self.inner.v4.clone());
        }
        let mut v6 = locked(&self.inner.v6);
        if let Some(endpoint) = v6.as_ref() {
            return Ok(endpoint.clone());
        }
        let endpoint = client_endpoint(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)), &self.inner.config)?;
        *v6 = Some(endpoint.clone());
        Ok(endpoint)
    }

    /// One of the cached connections to `addr` in turn, or a new one in its place. Concurrent
    /// callers of one place wait for one handshake instead of each opening their own.
    async fn connection(&self, addr: SocketAddr) -> Result<Connection, TransportError> {
        let n = self.inner.limits.connections_per_peer.max(1);
        let i = self.inner.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n;
        let slot = locked(&self.inner.connections)
            .entry(addr)
            .or_insert_with(|| (0..n).map(|_| Slot::default()).collect())[i]
            .clone();
        let mut cached = slot.lock().await;
        if let Some(conn) = cached.as_ref() {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
            tracing::debug!(%addr, "cached connection closed; reconnecting");
        }
        *cached = None;
        let config = match is_loopback(addr.ip()) {
            true => self.inner.local.clone(),
            false => self.inner.config.clone(),
        };
        let connecting = self
            .endpoint_for(addr)?
            .connect_with(config, addr, SERVER_NAME)
            .map_err(|e| TransportError::Connect {
                addr,
                reason: e.to_string(),
            })?;
        let conn = connecting.await.map_err(|e| match closed(addr, e) {
            TransportError::Closed { addr, reason } => TransportError::Connect { addr, reason },
            refused => refused,
        })?;
        *cached = Some(conn.clone());
        Ok(conn)
    }
}

/// TLS alerts travel as QUIC transport error codes 0x100..=0x1ff (RFC 9001, section 4.8).
fn is_tls_alert(code: quinn::TransportErrorCode) -> bool {
    (0x100..=0x1ff).contains(&u64::from(code))
}

/// Classifies a lost connection: a TLS failure (ours or the peer's) is a refusal, anything
/// else is a closed connection worth retrying.
fn closed(addr: SocketAddr, e: ConnectionError) -> TransportError {
    let refused = match &e {
        ConnectionError::TransportError(t) => is_tls_alert(t.code),
        ConnectionError::ConnectionClosed(close) => is_tls_alert(close.error_code),
        _ => false,
    };
    if refused {
        TransportError::Refused {
            addr,
            reason: e.to_string(),
        }
    } else {
        TransportError::Closed {
            addr,
            reason: e.to_string(),
        }
    }
}
