//! Thin entry point: parse, run, map the outcome to an exit code.
//!
//! Exit codes: 0 healthy or fragmentation, 1 native_leak or vm_growth, 2 error, 3 inconclusive.

use std::process::ExitCode;

use clap::Parser;
use leaktrace::{
    Error,
    cli::{Cli, Command},
    config::{ReportConfig, TraceConfig, VmAccess},
    recording::Recording,
    report::{self, Report},
    session,
    vm::{
        discover::{Cookie, CookieSource},
        render,
        view::VmView,
    },
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
                vm: None,
            };
            emit(Report::new(recording), &cfg)
        }
        Command::Vm { pid, access, json } => vm_snapshot(pid, &access, json),
    }
}

fn vm_snapshot(pid: Option<u32>, access: &VmAccess, json: bool) -> Result<u8, Error> {
    let view = match pid {
        Some(pid) => {
            leaktrace::target::inspect(pid)?;
            VmView::connect(pid, access)
        }
        None => {
            let node = access.node.clone().unwrap_or_default();
            let (cookie, source) = match (&access.cookie, &access.cookie_file) {
                (Some(c), _) => (c.clone(), CookieSource::Flag),
                (None, Some(f)) => (
                    Cookie::new(std::fs::read_to_string(f).map_err(|e| {
                        Error::Vm(format!("cannot read --cookie-file {}: {e}", f.display()))
                    })?),
                    CookieSource::File,
                ),
                (None, None) => {
                    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
                    let file = std::path::Path::new(&home).join(".erlang.cookie");
                    let c = std::fs::read_to_string(&file).map_err(|e| {
                        Error::Vm(format!(
                            "no cookie: give --cookie-file ({}: {e})",
                            file.display()
                        ))
                    })?;
                    (Cookie::new(c), CookieSource::HomeFile)
                }
            };
            VmView::connect_node(&node, &cookie, source, access.top)
        }
    };
    let mut view = view.map_err(|e| Error::Vm(e.to_string()))?;
    let sample = view
        .sample(0.0)
        .map_err(|e| Error::Vm(e.to_string()))?
        .clone();
    let census = view.census(0.0).map_err(|e| Error::Vm(e.to_string()))?;
    if json {
        let snapshot = render::Snapshot {
            node: view.node(),
            allocators: &sample,
            usage: render::usage(sample.used(), sample.allocated()),
            census: &census,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&snapshot).expect("serializable")
        );
    } else {
        print!("{}", render::text(view.node(), &sample, &census));
    }
    Ok(0)
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
