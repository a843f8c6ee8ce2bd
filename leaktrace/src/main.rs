//! Thin entry point: parse, run, map the outcome to an exit code.
//!
//! Exit codes: 0 healthy or fragmentation, 1 native_leak or vm_growth, 2 error, 3 inconclusive.

use std::process::ExitCode;

use clap::Parser;
use leaktrace::{
    Error,
    cli::{Cli, Command},
    config::{ReportConfig, TraceConfig},
    recording::Recording,
    report::{self, Report},
    session,
};

const EXIT_ERROR: u8 = 2;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("leaktrace: error: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn run(cli: Cli) -> Result<u8, Error> {
    match cli.into_command()? {
        Command::Trace(launch, cfg) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::Load(format!("cannot start the runtime: {e}")))?;
            let recording = runtime.block_on(session::trace(&launch, &cfg))?;
            if let Some(path) = &cfg.record {
                recording.write(path)?;
            }
            emit(Report::new(recording), &cfg)
        }
        Command::Report(ReportConfig {
            file,
            out,
            json,
            thresholds,
        }) => {
            let mut recording = Recording::read(&file)?;
            recording.thresholds = thresholds.apply(recording.thresholds);
            let cfg = TraceConfig {
                duration: Default::default(),
                interval: Default::default(),
                out,
                json,
                record: None,
                thresholds: recording.thresholds,
                progress: false,
            };
            emit(Report::new(recording), &cfg)
        }
    }
}

fn emit(report: Report, cfg: &TraceConfig) -> Result<u8, Error> {
    if let Some(dir) = &cfg.out {
        report::write_dir(&report, dir)?;
    }
    if cfg.json {
        println!("{}", report::to_json(&report));
    } else {
        println!("{}", report::terminal_summary(&report));
        if let Some(dir) = &cfg.out {
            println!("report: {}", dir.join("report.md").display());
        }
    }
    Ok(report.verdict.kind.exit_code() as u8)
}
