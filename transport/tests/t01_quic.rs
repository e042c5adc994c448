//! QUIC request/response over real sockets on 127.0.0.1 with mutual TLS: round trips, concurrency,
//! limits, timeouts, reconnection after a server restart, and refusal of foreign certificates.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use transport::{
    codes, generate, CertError, Client, Handler, Identity, Limits, Message, Server, TlsFiles, TransportError,
};

/// Echoes the request; requests starting with `hang` are never answered, `slow` ones after 50 ms.
#[derive(Default)]
struct Echo {
    calls: AtomicUsize,
    peers: Mutex<HashSet<SocketAddr>>,
}

impl Handler for Echo {
    fn handle(&self, peer: SocketAddr, request: Message) -> Pin<Box<dyn Future<Output = Bytes> + Send + '_>> {
        let request = request.into_bytes();
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.peers.lock().unwrap().insert(peer);
        Box::pin(async move {
            if request.starts_with(b"hang") {
                std::future::pending::<()>().await;
            }
            if request.starts_with(b"slow") {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            request
        })
    }
}

struct Cluster {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    server_identity: Identity,
    client_identity: Identity,
}

fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path(), &["server", "client"], &[]).unwrap();
    let server_identity = Identity::load(&TlsFiles::in_dir(dir.path(), "server")).unwrap();
    let client_identity = Identity::load(&TlsFiles::in_dir(dir.path(), "client")).unwrap();
    Cluster {
        dir: dir.path().to_path_buf(),
        _dir: dir,
        server_identity,
        client_identity,
    }
}

/// An echo server on a free loopback port with default limits.
fn echo_server(c: &Cluster) -> Server {
    Server::bind(
        localhost(),
        &c.server_identity,
        Limits::default(),
        Arc::new(Echo::default()),
    )
    .unwrap()
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

const LONG: Duration = Duration::from_secs(20);

#[tokio::test]
async fn small_and_multi_mib_messages_round_trip() {
    let c = cluster();
    let server = echo_server(&c);
    let client = Client::new(&c.client_identity, Limits::default()).unwrap();
    for (i, len) in [0usize, 1, 1000, 65_536, 3 << 20, 8 << 20].into_iter().enumerate() {
        let message = pattern(len, i as u8);
        let response = client
            .request(server.local_addr(), message.clone(), LONG)
            .await
            .unwrap();
        assert_eq!(response.len(), len);
        assert!(response == message, "response to a {len}-byte request differs");
    }
    server.shutdown().await;
}

/// Sends 1 MiB requests to `addr` until path MTU discovery has settled (the MTU stops rising)
/// and returns the MTU reached.
async fn settled_mtu(client: &Client, addr: SocketAddr) -> u16 {
    let mut last = 0;
    let mut same = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while same < 5 && Instant::now() < deadline {
        let message = pattern(1 << 20, 3);
        assert!(client.request(addr, message.clone(), LONG).await.unwrap() == message);
        let mtu = client.path_mtu(addr).expect("an open connection");
        same = if mtu == last { same + 1 } else { 0 };
        last = mtu;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    last
}

/// This host's address on its default route, if it has one besides loopback.
fn outward_ip() -> Option<std::net::IpAddr> {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    probe.connect("192.0.2.1:9").ok()?;
    Some(probe.local_addr().ok()?.ip()).filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

#[tokio::test]
async fn peers_on_this_host_get_large_datagrams_others_stay_gso_sized() {
    let c = cluster();
    let client = Client::new(&c.client_identity, Limits::default()).unwrap();
    let local = echo_server(&c);
    let mtu = settled_mtu(&client, local.local_addr()).await;
    assert!(mtu > 6500, "loopback path settled at {mtu} bytes");
    local.shutdown().await;
    if let Ok(v6) = Server::bind(
        "[::1]:0".parse().unwrap(),
        &c.server_identity,
        Limits::default(),
        Arc::new(Echo::default()),
    ) {
        let mtu = settled_mtu(&client, v6.local_addr()).await;
        assert!(mtu > 6500, "IPv6 loopback path settled at {mtu} bytes");
        v6.shutdown().await;
    }
    // The host's own outward address: packets still cross the loopback device, but the peer is
    // not known to be on this host, so discovery stops at the GSO-safe ceiling.
    match outward_ip() {
        Some(ip) => {
            let server = Server::bind(
                SocketAddr::new(ip, 0),
                &c.server_identity,
                Limits::default(),
                Arc::new(Echo::default()),
            )
            .unwrap();
            let mtu = settled_mtu(&client, server.local_addr()).await;
            assert!(mtu <= 6500, "path to {ip} settled at {mtu} bytes");
            server.shutdown().await;
        }
        None => eprintln!("no address besides loopback: the outward path is not checked"),
    }
}

#[tokio::test]
async fn sixty_four_concurrent_requests_share_one_connection() {
    let c = cluster();
    let echo = Arc::new(Echo::default());
    let server = Server::bind(localhost(), &c.server_identity, Limits::default(), echo.clone()).unwrap();
    let client = Client::new(&c.client_identity, Limits::default()).unwrap();
    let addr = server.local_addr();
    let started = Instant::now();
    let tasks: Vec<_> = (0..64u8)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut message = b"slow".to_vec();
                message.extend(pattern(10_000 + i as usize * 1000, i));
                let message = Bytes::from(message);
                let response = client.request(addr, message.clone(), LONG).await.unwrap();
                assert!(response == message);
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    // 64 handlers of 50 ms each: serial would take over 3 s.
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(echo.calls.load(Ordering::SeqCst), 64);
    assert_eq!(
        echo.peers.lock().unwrap().len(),
        1,
        "all requests travel on one connection"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_request_is_refused_while_others_are_served() {
    let c = cluster();
    let echo = Arc::new(Echo::default());
    let server_limits = Limits {
        max_message_bytes: 1 << 20,
        ..Limits::default()
    };
    let server = Server::bind(localhost(), &c.server_identity, server_limits, echo.clone()).unwrap();
    let client = Client::new(&c.client_identity, Limits::default()).unwrap();
    let addr = server.local_addr();

    let big = client.request(addr, pattern(3 << 20, 7), LONG);
    let small = async {
        let mut ok = 0;
        for i in 0..20u8 {
            let message = pattern(1000, i);
            if client.request(addr, message.clone(), LONG).await.unwrap() == message {
                ok += 1;
            }
        }
        ok
    };
    let (big, ok) = tokio::join!(big, small);
    match big {
        Err(TransportError::Remote { code, .. }) => assert_eq!(code, u64::from(codes::TOO_LARGE)),
        other => panic!("expected the server to refuse the message, got {other:?}"),
    }
    assert_eq!(ok, 20);
    // The limit is inclusive and the connection is still good.
    let exact = pattern(1 << 20, 3);
    assert!(client.request(addr, exact.clone(), LONG).await.unwrap() == exact);
    assert_eq!(
        echo.calls.load(Ordering::SeqCst),
        21,
        "the oversized request never reached the handler"
    );

    // The client's own limit is checked before anything is sent.
    let strict = Client::new(
        &c.client_identity,
        Limits {
            max_message_bytes: 10,
            ..Limits::default()
        },
    )
    .unwrap();
    let err = strict.request(addr, pattern(11, 0), LONG).await.unwrap_err();
    assert!(
        matches!(err, TransportError::TooLarge { size: 11, limit: 10 }),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    // ... and so is the response size.
    let err = strict
        .request(addr, Bytes::from_static(b"slow-0123456"[..10].as_ref()), LONG)
        .await;
    assert!(err.is_ok(), "a 10-byte echo fits: {err:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn handler_that_never_answers_times_out() {
    let c = cluster();
    let server = echo_server(&c);
    let client = Client::new(&c.client_identity, Limits::default()).unwrap();
    let addr = server.local_addr();
    let started = Instant::now();
    let err = client
        .request(addr, Bytes::from_static(b"hang"), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::Timeout { after, .. } if after == Duration::from_millis(300)),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(2));
    // The connection keeps serving other requests.
    let response = client.request(addr, Bytes::from_static(b"hello"), LONG).await.unwrap();
    assert_eq!(&response.into_bytes()[..], b"hello");
    server.shutdown().await;
}

#[tokio::test]
async fn client_reconnects_after_the_server_restarts_on_the_same_address() {
    let c = cluster();
    let server = echo_server(&c);
    let addr = server.local_addr();
    let client = Client::new(&c.client_identity, Limits::default()).unwrap();
    assert_eq!(
        &client
            .request(addr, Bytes::from_static(b"one"), LONG)
            .await
            .unwrap()
            .into_bytes()[..],
        b"one"
    );

    server.shutdown().await;
    let err = client
        .request(addr, Bytes::from_static(b"two"), Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(
        err.is_retryable(),
        "a stopped server is worth retrying elsewhere: {err:?}"
    );

    let deadline = Instant::now() + Duration::from_secs(5);
    let server = loop {
        match Server::bind(addr, &c.server_identity, Limits::default(), Arc::new(Echo::default())) {
            Ok(server) => break server,
            Err(e) if Instant::now() < deadline => {
                eprintln!("rebinding {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("rebinding {addr}: {e}"),
        }
    };
    assert_eq!(
        &client
            .request(addr, Bytes::from_static(b"three"), LONG)
            .await
            .unwrap()
            .into_bytes()[..],
        b"three"
    );
    client.forget(addr);
    assert_eq!(
        &client
            .request(addr, Bytes::from_static(b"four"), LONG)
            .await
            .unwrap()
            .into_bytes()[..],
        b"four"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn clients_outside_the_ca_are_refused_at_the_handshake() {
    let c = cluster();
    let echo = Arc::new(Echo::default());
    let server = Server::bind(localhost(), &c.server_identity, Limits::default(), echo.clone()).unwrap();
    let addr = server.local_addr();

    // A certificate from another CA, though it trusts our CA for the server.
    let other = tempfile::tempdir().unwrap();
    generate(other.path(), &["intruder"], &[]).unwrap();
    let foreign = TlsFiles {
        ca: c.dir.join("ca.pem"),
        ..TlsFiles::in_dir(other.path(), "intruder")
    };
    let intruder = Client::new(&Identity::load(&foreign).unwrap(), Limits::default()).unwrap();
    let err = intruder
        .request(addr, Bytes::from_static(b"let me in"), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Refused { .. }), "{err:?}");
    assert!(!err.is_retryable());

    // No certificate at all.
    let anonymous = Client::new(&Identity::roots_only(&c.dir.join("ca.pem")).unwrap(), Limits::default()).unwrap();
    let err = anonymous
        .request(addr, Bytes::from_static(b"let me in"), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Refused { .. }), "{err:?}");

    // A client that trusts another CA refuses our server.
    let suspicious = Client::new(
        &Identity::load(&TlsFiles::in_dir(other.path(), "intruder")).unwrap(),
        Limits::default(),
    )
    .unwrap();
    let err = suspicious
        .request(addr, Bytes::from_static(b"hello?"), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Refused { .. }), "{err:?}");

    assert_eq!(
        echo.calls.load(Ordering::SeqCst),
        0,
        "no refused peer reached the handler"
    );
    // Members still get in.
    let member = Client::new(&c.client_identity, Limits::default()).unwrap();
    assert_eq!(
        &member
            .request(addr, Bytes::from_static(b"hi"), LONG)
            .await
            .unwrap()
            .into_bytes()[..],
        b"hi"
    );
    server.shutdown().await;
}

#[test]
fn missing_and_garbage_pem_are_typed_errors_naming_the_file() {
    let c = cluster();
    let good = TlsFiles::in_dir(&c.dir, "client");

    let missing = TlsFiles {
        cert: c.dir.join("nobody.pem"),
        ..good.clone()
    };
    match Identity::load(&missing) {
        Err(CertError::Cert { path, .. }) => assert_eq!(path, missing.cert),
        other => panic!("expected a Cert error, got {other:?}"),
    }

    let garbage = c.dir.join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let text = c.dir.join("text.pem");
    std::fs::write(&text, "just some text\n").unwrap();
    for bad in [&garbage, &text] {
        for files in [
            TlsFiles {
                ca: bad.clone(),
                ..good.clone()
            },
            TlsFiles {
                cert: bad.clone(),
                ..good.clone()
            },
            TlsFiles {
                key: bad.clone(),
                ..good.clone()
            },
        ] {
            match Identity::load(&files) {
                Err(CertError::Cert { path, reason }) => {
                    assert_eq!(&path, bad, "{reason}");
                }
                other => panic!("expected a Cert error for {}, got {other:?}", bad.display()),
            }
        }
    }
    // A certificate where the key belongs.
    let swapped = TlsFiles {
        key: good.cert.clone(),
        ..good.clone()
    };
    assert!(matches!(Identity::load(&swapped), Err(CertError::Cert { path, .. }) if path == good.cert));
}

/// With `connections_per_peer` = 3, requests take the connections in turn: three are opened,
/// no more, and every message (sequential and concurrent) comes back intact.
#[tokio::test]
async fn requests_spread_over_a_pool_of_connections() {
    let c = cluster();
    let server = echo_server(&c);
    let addr = server.local_addr();
    for (pool, want) in [(1, 1), (3, 3)] {
        let limits = Limits {
            connections_per_peer: pool,
            ..Limits::default()
        };
        let client = Client::new(&c.client_identity, limits).unwrap();
        assert_eq!(client.open_connections(addr), 0);
        for i in 0..6u8 {
            let m = pattern(1000 + i as usize, i);
            assert_eq!(client.request(addr, m.clone(), LONG).await.unwrap(), m);
        }
        let calls: Vec<_> = (0..8u8)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move {
                    let m = pattern(70_000, i);
                    (client.request(addr, m.clone(), LONG).await.unwrap(), m)
                })
            })
            .collect();
        for call in calls {
            let (got, sent) = call.await.unwrap();
            assert_eq!(got, sent);
        }
        assert_eq!(client.open_connections(addr), want, "pool of {pool}");
    }
    server.shutdown().await;
}
