//! Shutdown signals, the same for every long-running command: SIGTERM (what Kubernetes,
//! systemd and `docker stop` send) and SIGINT (Ctrl-C) both ask for a graceful stop.

use anyhow::Context;

/// SIGTERM and SIGINT as one stream of shutdown requests (a second request can mean "now").
pub fn terminate_signal() -> anyhow::Result<tokio::sync::mpsc::Receiver<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Waits for the first SIGTERM or SIGINT (Ctrl-C alone if the handlers cannot be installed).
pub async fn wait_for_signal() {
    match terminate_signal() {
        Ok(mut rx) => {
            rx.recv().await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "only Ctrl-C will stop this process");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
