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
    vm::{discover, render, view::VmView},
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
            out_mode,
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
                out_mode,
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
    let pid = match pid {
        Some(pid) => pid,
        // A name alone: the process serving it is found and held to the same rules as a PID
        // (its cookie only from what its own user could read), never whatever answers on the
        // port epmd gives.
        None => {
            let given = access.node.as_deref().unwrap_or_default();
            let addr = discover::find_node_by_name(given).map_err(|e| Error::Vm(e.to_string()))?;
            let pids = discover::pids_listening_on(addr.port).map_err(|e| {
                Error::Vm(format!(
                    "cannot tell which process serves node {} on port {} ({e}): pass --pid",
                    addr.name, addr.port
                ))
            })?;
            let beams: Vec<u32> = pids
                .iter()
                .copied()
                .filter(|p| leaktrace::target::inspect(*p).is_ok())
                .collect();
            match beams.as_slice() {
                [one] => *one,
                [] => {
                    return Err(Error::Vm(format!(
                        "epmd has node {} on port {}, but no beam.smp on this host listens there{}: refusing to talk to it; pass --pid PID of the node",
                        addr.name,
                        addr.port,
                        if pids.is_empty() {
                            String::new()
                        } else {
                            format!(
                                " (PID {} does, and is not an Erlang VM)",
                                pids.iter()
                                    .map(u32::to_string)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        }
                    )));
                }
                many => {
                    return Err(Error::Vm(format!(
                        "several processes listen on port {} of node {} (PIDs {}): pass --pid",
                        addr.port,
                        addr.name,
                        many.iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            }
        }
    };
    leaktrace::target::inspect(pid)?;
    let view = VmView::connect(pid, access);
    let view = view.map_err(|e| Error::Vm(e.to_string()))?;
    let sample = view.sample(0.0).map_err(|e| Error::Vm(e.to_string()))?;
    let census = view.census(0.0).map_err(|e| Error::Vm(e.to_string()))?;
    // The carriers are a part of the snapshot a node may refuse (an embedded release without
    // runtime_tools): the rest stands without them.
    let carriers =
        view.carrier_picture(0.0)
            .unwrap_or_else(|e| leaktrace::recording::vm::CarrierPicture {
                skipped: Some(format!("instrument:carriers/0 failed: {e}")),
                ..Default::default()
            });
    let snapshot = render::Snapshot {
        node: view.node(),
        found_by: view.found_by(),
        disabled_allocators: view.disabled_allocators(),
        allocators: &sample,
        usage: render::usage(sample.used(), sample.allocated()),
        census: &census,
        carriers: &carriers,
    };
    // Where the node's resident memory lies now: ERTS carriers told by their shape in the maps
    // (no probes here), glibc's arenas walked; the VM's own carrier figure beside them.
    let resident =
        leaktrace::target::breakdown::measure(pid, leaktrace::carriers::erts_ranges_by_shape);
    if json {
        let mut value = serde_json::to_value(&snapshot).expect("serializable");
        value["resident"] = match &resident {
            Ok(b) => serde_json::to_value(b).expect("serializable"),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        out(&serde_json::to_string_pretty(&value).expect("serializable"));
    } else {
        out(render::text(&snapshot).trim_end());
        match &resident {
            Ok(b) => {
                out("");
                for line in leaktrace::target::breakdown::render("now", b, Some(sample.allocated()))
                {
                    // Object paths come from the target's maps: escaped like every name it gives.
                    out(&render::clean(&line));
                }
            }
            Err(e) => out(&format!(
                "resident breakdown unavailable: {e} (the maps and pagemap of PID {pid} need root or CAP_SYS_ADMIN)"
            )),
        }
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
        match report::write_dir(&report, dir, cfg.out_mode) {
            Ok(()) if !cfg.json => out(&format!("report: {}", dir.join("report.md").display())),
            Ok(()) => {}
            Err(e) => failed.push(e),
        }
    }
    if let Some(path) = &cfg.record
        && let Err(e) = report.recording.write_with_mode(path, cfg.out_mode)
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
