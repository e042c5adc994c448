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
enum Command {}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {}
}
