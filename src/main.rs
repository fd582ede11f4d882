//! The `kvcompact` command line: parse, set up the thread pool, dispatch to `cli/`. Every failure
//! prints one line `error: ...` and exits 1.

#![allow(clippy::neg_cmp_op_on_partial_ord)] // `!(x >= lo)` also rejects NaN in the flag checks

mod cli;

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kvcompact", version, about = "CPU reference implementation of KV-cache compression for Llama-family models")]
struct Cli {
    /// Worker threads for the kernels (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Generate(cli::generate::Args),
    Logits(cli::logits::Args),
    Convert(cli::convert::Args),
    FetchModel(cli::fetch::Args),
    Bench(cli::bench::Args),
    SynthModel(cli::synth::Args),
    Compact(cli::compact::Args),
    Demo(cli::demo::Args),
    Eval(Box<cli::eval::Args>), // boxed: by far the largest variant
    /// Q-Filters: calibrate the per-head filter directions of a model.
    Qfilters {
        #[command(subcommand)]
        cmd: cli::qfilters::Cmd,
    },
    Budgets(cli::budgets::Args),
    CompactHead(cli::compact_head::Args),
    Serve(cli::serve::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes joined by ": ".
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let threads = match cli.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    // The command runs on a pool worker: parallel loops start there, not from outside the pool.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).thread_name(|i| format!("kvcompact-{i}")).build().context("setting up the thread pool")?;
    pool.install(|| match cli.cmd {
        Cmd::Generate(a) => cli::generate::run(a),
        Cmd::Logits(a) => cli::logits::run(a),
        Cmd::Convert(a) => cli::convert::run(a),
        Cmd::FetchModel(a) => cli::fetch::run(a),
        Cmd::Bench(a) => cli::bench::run(a),
        Cmd::SynthModel(a) => cli::synth::run(a),
        Cmd::Compact(a) => cli::compact::run(a),
        Cmd::Demo(a) => cli::demo::run(a),
        Cmd::Eval(a) => cli::eval::run(*a),
        Cmd::Qfilters { cmd } => cli::qfilters::run(cmd),
        Cmd::Budgets(a) => cli::budgets::run(a),
        Cmd::CompactHead(a) => cli::compact_head::run(a),
        Cmd::Serve(a) => cli::serve::run(a),
    })
}
