//! `moeless`: the one command-line entry point of MoEless.

use clap::{Parser, Subcommand};

mod commands;

#[derive(Parser, Debug)]
#[command(name = "moeless", version, about = "Serverless Mixture-of-Experts serving")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Full forward pass of each prompt: logits and the routing of every MoE layer.
    Forward(commands::engine::ForwardArgs),
    /// Greedy generation with the KV cache.
    Generate(commands::engine::GenerateArgs),
    /// Expert placement for given per-layer loads (static EP or EPLB).
    Plan(commands::policy::PlanArgs),
    /// Replay a routing trace step by step under placement policies.
    Replay(commands::policy::ReplayArgs),
    /// Accuracy of the load predictors on a routing trace.
    PredictEval(commands::policy::PredictEvalArgs),
    /// A control-plane node: Raft metadata store, worker/engine gRPC services, admin REST API.
    ControlPlane(commands::control::ControlPlaneArgs),
    /// Call the control plane's admin REST API.
    Admin(commands::control::AdminArgs),
    /// Simulate an MoE serving cluster on real arrival and routing traces (latency, cost).
    Sim(commands::sim::SimArgs),
    /// Validate the simulator: the same small workload on the real engine with CPU workers and
    /// in the simulator with a device profile measured here; the error per metric.
    SimValidate(commands::validate::SimValidateArgs),
    /// OpenAI-compatible inference endpoint for a checkpoint (continuous batching, metrics).
    Serve(commands::serve::ServeArgs),
    /// The endpoint with everything embedded: without --model, the built-in demo model.
    Up(commands::serve::ServeArgs),
    /// A data-plane worker: holds expert instances, follows plans, serves expert work over QUIC.
    Worker(commands::worker::WorkerArgs),
    /// Certificates for mutual TLS between control plane, workers and engines.
    #[command(subcommand)]
    Certs(commands::worker::CertsCommand),
    /// Fault injection against a real local cluster (results belong in docs/RELIABILITY.md).
    #[command(subcommand)]
    Chaos(commands::chaos::ChaosCommand),
    /// Benchmarks (results belong in docs/PERFORMANCE.md).
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Forward(a) => commands::engine::forward(a),
        Command::Generate(a) => commands::engine::generate(a),
        Command::Plan(a) => commands::policy::plan(a),
        Command::Replay(a) => commands::policy::run_replay(a),
        Command::PredictEval(a) => commands::policy::predict_eval(a),
        Command::ControlPlane(a) => commands::control::control_plane(a),
        Command::Admin(a) => commands::control::admin(a),
        Command::Sim(a) => commands::sim::run(a),
        Command::SimValidate(a) => commands::validate::run(a),
        Command::Serve(a) => commands::serve::serve(a, true),
        Command::Up(a) => commands::serve::serve(a, false),
        Command::Bench(c) => commands::bench::run(c),
        Command::Chaos(c) => commands::chaos::run(c),
        Command::Worker(a) => commands::worker::worker(a),
        Command::Certs(c) => commands::worker::certs(c),
    }
}
