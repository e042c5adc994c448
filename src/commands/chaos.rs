//! `moeless chaos run`: fault-injection scenarios against a real local cluster (chaos-tests).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use chaos_tests::{Config, Scenario, ScenarioReport};
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum ChaosCommand {
    /// Start a cluster, inject a fault per trial, check the invariants; exit 1 if any fails.
    Run(RunArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// A scenario (leader-kill, follower-kill, leader-pause, leader-partition, rolling-restart,
    /// fsync-failure, membership-change, worker-kill, worker-drain, worker-rolling-restart,
    /// endpoint-kill, endpoint-rolling-restart), `control-plane` for the first seven, or `all`.
    #[arg(long)]
    scenario: String,
    /// Faults per scenario (one cluster per scenario, one fault per trial).
    #[arg(long, default_value_t = 1)]
    trials: usize,
    /// Where to write the JSON report (one entry per scenario).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The `moeless` binary the nodes run; this one by default.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// How long leader-pause keeps the leader SIGSTOPped.
    #[arg(long, default_value_t = 10_000)]
    pause_ms: u64,
    /// How long leader-partition keeps the leader cut off.
    #[arg(long, default_value_t = 10_000)]
    partition_ms: u64,
    /// Concurrent admin clients.
    #[arg(long, default_value_t = 4)]
    clients: u64,
    /// Inference load of the data-plane scenarios: the Azure LLM 2023 trace's arrivals (from
    /// MOELESS_SHARED_DIR) with their gaps divided by this (1 = real time, ~5.5 requests/s on
    /// average; the default replays it 4x as fast so that a short trial sees a dozen requests).
    #[arg(long, default_value_t = 4.0)]
    arrival_rate_scale: f64,
}

pub fn run(c: ChaosCommand) -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let ChaosCommand::Run(a) = c;
    let scenarios: Vec<Scenario> = match a.scenario.as_str() {
        "all" => Scenario::ALL.to_vec(),
        "control-plane" => Scenario::CONTROL_PLANE.to_vec(),
        name => vec![name.parse()?],
    };
    let binary = match a.binary {
        Some(b) => b,
        None => std::env::current_exe().context("locating the moeless binary")?,
    };
    let mut cfg = Config::new(binary);
    cfg.trials = a.trials.max(1);
    cfg.pause = Duration::from_millis(a.pause_ms);
    cfg.partition = Duration::from_millis(a.partition_ms);
    cfg.clients = a.clients.max(1);
    if !(a.arrival_rate_scale.is_finite() && a.arrival_rate_scale > 0.0) {
        anyhow::bail!(
            "--arrival-rate-scale must be a positive number, got {}",
            a.arrival_rate_scale
        );
    }
    cfg.arrival_rate_scale = a.arrival_rate_scale;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut reports = Vec::new();
    for s in scenarios {
        eprintln!("chaos: {} x{} ...", s.name(), cfg.trials);
        let r = rt
            .block_on(chaos_tests::run(s, &cfg))
            .with_context(|| format!("scenario {}", s.name()))?;
        for f in &r.failures {
            eprintln!("chaos: {}: {f}", r.scenario);
        }
        reports.push(r);
        if let Some(out) = &a.out {
            // Written after every scenario, so a long run leaves what it measured so far.
            std::fs::write(out, serde_json::to_vec_pretty(&reports)?)
                .with_context(|| format!("writing {}", out.display()))?;
        }
    }
    print_table(&reports);
    let failed = reports.iter().any(|r| r.trials > 0 && !r.passed);
    if failed {
        std::process::exit(1);
    }
    Ok(())
}

fn print_table(reports: &[ScenarioReport]) {
    println!(
        "{:<25} {:>6} {:>8} {:>7} {:>8} {:>9} {:>9} {:>5} {:>6} {:>9} {:>9}  result",
        "scenario",
        "trials",
        "ok",
        "failed",
        "rerouted",
        "fo_max_ms",
        "fo_p99_ms",
        "lost",
        "linear",
        "recov_ms",
        "drain_ms"
    );
    for r in reports {
        let result = if r.trials == 0 {
            r.verdict.clone()
        } else if r.passed {
            "pass".to_string()
        } else {
            format!("FAIL: {}", r.failures.join("; "))
        };
        println!(
            "{:<25} {:>6} {:>8} {:>7} {:>8} {:>9.1} {:>9.1} {:>5} {:>6} {:>9.1} {:>9.1}  {}",
            r.scenario,
            r.trials,
            r.requests_ok,
            r.requests_failed,
            r.requests_failed_over,
            r.failover_ms_max,
            r.failover_ms_p99,
            r.lost_acknowledged_writes,
            r.linearizable,
            r.recovery_ms,
            r.drain_ms_max,
            result
        );
    }
}
