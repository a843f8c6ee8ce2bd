//! Thin entry point: parse, run, map the outcome to an exit code.
//!
//! Exit codes: 0 healthy or fragmentation, 1 native_leak or vm_growth, 2 error, 3 inconclusive.

use std::{io::Write as _, process::ExitCode};

use clap::Parser;
use leaktrace::{
    Error,
    cli::{Cli, Command},
    config::{ReportConfig, TraceConfig, VmAccess},
    recording::Recording,
    report::{self, Report},
    session,
    vm::{
        discover::{self, Cookie, CookieSource},
        render,
        view::VmView,
    },
};

const EXIT_ERROR: u8 = 2;

fn main() -> ExitCode {
    // The VM view's distribution connection runs in an unprivileged child: this binary again.
    if let Some(code) = leaktrace::vm::sandbox::run_if_child() {
        return ExitCode::from(code);
    }
    leaktrace::vm::sandbox::enable();
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
            // A bad --out or --record is exit 2 before anything is attached.
            report::check_writable(&cfg)?;
            let finished = runtime.block_on(session::trace(&launch, &cfg))?;
            // Verdict first, then --out, then --record (see `emit`).
            let emitted = emit(Report::new(finished.recording), &cfg);
            // Whoever reads the report (a pipe, a test) has it all now; the probes leave the
            // kernel one grace period each, and the process exits only when they are gone.
            release_stdout();
            finished.detaching.wait();
            emitted
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
                native: Default::default(),
                stacks: 0,
                blocks: None,
                max_overhead: 0.0,
            };
            emit(Report::new(recording), &cfg)
        }
        Command::Vm { pid, access, json } => vm_snapshot(pid, &access, json),
        Command::Diff { a, b, json } => {
            let diff = leaktrace::diff::compare_paths(&a, &b)?;
            out(&if json { diff.json() } else { diff.text() });
            Ok(diff.exit_code())
        }
    }
}

fn vm_snapshot(pid: Option<u32>, access: &VmAccess, json: bool) -> Result<u8, Error> {
    let view = match pid {
        Some(pid) => {
            leaktrace::target::inspect(pid)?;
            VmView::connect(pid, access)
        }
        None => {
            let addr = discover::find_node_by_name(access.node.as_deref().unwrap_or_default())
                .map_err(|e| Error::Vm(e.to_string()))?;
            let (cookie, source) = match (&access.cookie, &access.cookie_file) {
                (Some(c), _) => (c.clone(), CookieSource::Flag),
                (None, Some(f)) => (
                    Cookie::new(
                        String::from_utf8_lossy(&discover::read_operator_file(f, 4096).map_err(
                            |e| Error::Vm(format!("cannot use --cookie-file {}: {e}", f.display())),
                        )?)
                        .into_owned(),
                    ),
                    CookieSource::File,
                ),
                (None, None) => {
                    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
                    let file = std::path::Path::new(&home).join(".erlang.cookie");
                    let raw = discover::read_operator_file(&file, 4096).map_err(|e| {
                        Error::Vm(format!(
                            "no cookie: give --cookie-file ({}: {e})",
                            file.display()
                        ))
                    })?;
                    (
                        Cookie::new(String::from_utf8_lossy(&raw).into_owned()),
                        CookieSource::HomeFile,
                    )
                }
            };
            VmView::connect_node(&addr, &cookie, source, access.top)
        }
    };
    let view = view.map_err(|e| Error::Vm(e.to_string()))?;
    let sample = view.sample(0.0).map_err(|e| Error::Vm(e.to_string()))?;
    let census = view.census(0.0).map_err(|e| Error::Vm(e.to_string()))?;
    let snapshot = render::Snapshot {
        node: view.node(),
        found_by: view.found_by(),
        disabled_allocators: view.disabled_allocators(),
        allocators: &sample,
        usage: render::usage(sample.used(), sample.allocated()),
        census: &census,
    };
    if json {
        out(&serde_json::to_string_pretty(&snapshot).expect("serializable"));
    } else {
        out(render::text(&snapshot).trim_end());
    }
    Ok(0)
}

/// Prints the verdict (summary or report.json) first, then writes `--out` and `--record`: a
/// failed write never hides the verdict. Failures are errors after it (exit 2), each one said.
/// Prints a line on stdout; a reader that went away (`| head`) is not an error worth a panic.
fn out(text: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{text}").and_then(|()| stdout.flush());
}

/// Ends stdout (the reader sees end of file) while the process still has work to do.
fn release_stdout() {
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto fd 1 replaces stdout with /dev/null; both fds are valid.
        unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 1) };
    }
}

fn emit(report: Report, cfg: &TraceConfig) -> Result<u8, Error> {
    if cfg.json {
        out(&report::to_json(&report));
    } else {
        out(&report::terminal_summary(&report));
    }
    let _ = std::io::stdout().flush();
    let mut failed = Vec::new();
    if let Some(dir) = &cfg.out {
        match report::write_dir(&report, dir) {
            Ok(()) if !cfg.json => out(&format!("report: {}", dir.join("report.md").display())),
            Ok(()) => {}
            Err(e) => failed.push(e),
        }
    }
    if let Some(path) = &cfg.record
        && let Err(e) = report.recording.write(path)
    {
        failed.push(e);
    }
    let last = failed.pop();
    for e in failed {
        eprintln!("leaktrace: error: {}", Error::AfterVerdict(Box::new(e)));
    }
    match last {
        Some(e) => Err(Error::AfterVerdict(Box::new(e))),
        None => Ok(report.verdict.kind.exit_code() as u8),
    }
}
