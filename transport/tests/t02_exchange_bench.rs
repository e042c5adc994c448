//! The exchange benchmark measures both transports end to end on a tiny configuration.

use transport::bench::{run_exchange, serve_echo, ExchangeConfig};
use transport::{generate, Identity, Limits, TlsFiles};

#[tokio::test]
async fn exchange_benchmark_measures_quic_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path(), &["server", "client"], &[]).unwrap();
    let server = Identity::load(&TlsFiles::in_dir(dir.path(), "server")).unwrap();
    let client = Identity::load(&TlsFiles::in_dir(dir.path(), "client")).unwrap();
    let servers = serve_echo("127.0.0.1".parse().unwrap(), &server, Limits::default())
        .await
        .unwrap();
    let config = ExchangeConfig {
        sizes: vec![4096, 1 << 20],
        concurrency: 2,
        repeats: 2,
        bytes_per_run: 4 << 20,
        quic_connections: 2,
    };
    let mut lines = Vec::new();
    let mut progress = |line: String| lines.push(line);
    let rows = run_exchange(
        &client,
        servers.quic.local_addr(),
        servers.tcp_addr,
        &config,
        &mut progress,
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(row.quic_mb_s_runs.len(), 2);
        assert!(row.quic_mb_s > 0.0 && row.tcp_mb_s > 0.0 && row.quic_p50_ms > 0.0 && row.tcp_p50_ms > 0.0);
        assert!(row.throughput_ratio().is_finite());
    }
    assert_eq!(lines.len(), 4);
    servers.shutdown().await;
}
