//! `cargo xtask`: everything a fresh machine needs to build, demonstrate, test and measure
//! leaktrace. Each task installs what is missing first (idempotently, saying what it does).
mod bench;
mod demo;
mod fixtures;
mod setup;
mod shell;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Set up, build, demo, test and bench leaktrace"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: Erlang/OTP, gcc, bpftool, nightly + rust-src, bpf-linker.
    Setup,
    /// Set up, then build the release binary at target/release/leaktrace.
    Build,
    /// Set up, build, start a node whose NIF leaks, trace it and print the verdict.
    Demo(demo::DemoArgs),
    /// Set up, then run every test tier: format, lints, unit, replay, eBPF, end to end.
    Test,
    /// Set up, build, then measure tracing overhead on a fixed BEAM workload.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> anyhow::Result<()> {
    setup::provision()?;
    match task {
        Task::Setup => Ok(()),
        Task::Build => setup::build_release().map(|_| ()),
        Task::Demo(args) => demo::run(&args),
        Task::Test => test::run(),
        Task::Bench(args) => bench::run(&args),
    }
}
