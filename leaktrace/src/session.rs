//! One tracing session: check the target, attach, sample the ledger until the duration ends,
//! Ctrl-C, or the target exits, and return what was gathered as a [`Recording`].

use std::{
    fs,
    io::{IsTerminal, Write},
    os::{fd::FromRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use tokio::{
    signal::unix::{SignalKind, signal},
    time::{MissedTickBehavior, interval, sleep_until},
};

use crate::{
    carriers::{CarrierLedger, OwnerNames},
    config::{Launch, TraceConfig},
    error::Error,
    image::ImageView,
    ledger::{self, Accounted, Rss},
    lock::TargetLock,
    privilege,
    probes::{CARRIER_PROBES, Tracer, required_symbols},
    recording::{EndReason, Recording, SCHEMA, Sample, Sources, Target},
    report::human_bytes,
    symbols::SymbolTable,
    target,
    vm::view::VmState,
};

/// How often the ring buffer is drained between samples. Carrier events are rare; this keeps
/// the 1 MiB ring far from full without a wakeup per event.
const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// How long `run` waits for the command to exec beam.smp.
const BEAM_START_TIMEOUT: Duration = Duration::from_secs(30);

/// A traced process and what is known of its image.
struct Traced {
    pid: u32,
    target: Target,
    exe_for_maps: PathBuf,
    symbols: SymbolTable,
    child: Option<Child>,
}

/// Traces per `launch` and `cfg`; the recording holds everything gathered, also after Ctrl-C
/// or the target's exit.
pub async fn trace(launch: &Launch, cfg: &TraceConfig) -> Result<Recording, Error> {
    match launch {
        Launch::Attach { pid } => {
            // Order: a wrong PID is named as such even without privileges.
            target::require_exists(*pid)?;
            privilege::require()?;
            let proc = target::inspect(*pid)?;
            let _lock = TargetLock::acquire(*pid)?;
            let display = proc.exe.display().to_string();
            let symbols = SymbolTable::read(&proc.image, &display)?;
            symbols.require(&required_symbols(CARRIER_PROBES))?;
            let mut tracer = Tracer::load()?;
            tracer.attach(&proc.image, &symbols, *pid, CARRIER_PROBES)?;
            let traced = Traced {
                pid: *pid,
                target: Target {
                    pid: *pid,
                    exe: display,
                    otp_release: proc.otp_release,
                    node: proc.node,
                },
                exe_for_maps: proc.exe,
                symbols,
                child: None,
            };
            sample_loop(traced, tracer, cfg).await
        }
        Launch::Run { command, beam } => {
            privilege::require()?;
            let beam = match beam {
                Some(b) => b.clone(),
                None => find_beam(command)?,
            };
            let display = beam.display().to_string();
            if !target::is_beam(&beam) {
                return Err(Error::BeamNotFound {
                    command: command.join(" "),
                    reason: format!("{display} is not a beam.smp"),
                });
            }
            let symbols = SymbolTable::read(&beam, &display)?;
            symbols.require(&required_symbols(CARRIER_PROBES))?;
            let mut tracer = Tracer::load()?;
            let held = HeldChild::spawn(command, cfg.json)?;
            let pid = held.child.id();
            let _lock = TargetLock::acquire(pid)?;
            // The per-process perf event stays with the task across exec, so probes placed on
            // beam.smp for this PID before the exec see its first allocation.
            if let Err(e) = tracer.attach(&beam, &symbols, pid, CARRIER_PROBES) {
                held.abort();
                return Err(e);
            }
            let child = held.release()?;
            wait_for_beam(pid).await?;
            let cmdline = target::read_cmdline(pid).unwrap_or_default();
            let traced = Traced {
                pid,
                target: Target {
                    pid,
                    exe: display,
                    otp_release: target::otp_release(&beam, &cmdline),
                    node: target::node_name(&cmdline),
                },
                exe_for_maps: fs::canonicalize(&beam).unwrap_or(beam),
                symbols,
                child: Some(child),
            };
            sample_loop(traced, tracer, cfg).await
        }
    }
}

/// Finds the beam.smp an `erl`-style command will exec: `ROOT/bin/erl` -> `ROOT/erts-*/bin/beam.smp`.
pub fn find_beam(command: &[String]) -> Result<PathBuf, Error> {
    let not_found = |reason: String| Error::BeamNotFound {
        command: command.join(" "),
        reason,
    };
    let program = command
        .first()
        .ok_or_else(|| not_found("empty command".into()))?;
    let path = which::which(program).map_err(|e| not_found(format!("{program}: {e}")))?;
    let path =
        fs::canonicalize(&path).map_err(|e| not_found(format!("{}: {e}", path.display())))?;
    if target::is_beam(&path) {
        return Ok(path);
    }
    let root = path
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| not_found(format!("{} has no Erlang root above it", path.display())))?;
    let mut found: Vec<PathBuf> = fs::read_dir(root)
        .map_err(|e| not_found(format!("{}: {e}", root.display())))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("erts-"))
        .map(|e| e.path().join("bin/beam.smp"))
        .filter(|p| p.exists())
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(not_found(format!(
            "no erts-*/bin/beam.smp under {}",
            root.display()
        ))),
        _ => Err(not_found(format!(
            "several erts-*/bin/beam.smp under {}",
            root.display()
        ))),
    }
}

/// A command started but held before its exec until the probes are attached (as memleak's
/// `-c` does), through a shell that waits on a pipe.
struct HeldChild {
    child: Child,
    go: Option<fs::File>,
}

impl HeldChild {
    /// With `json_on_stdout`, the command's stdout goes to stderr so that stdout stays JSON.
    fn spawn(command: &[String], json_on_stdout: bool) -> Result<HeldChild, Error> {
        let spawn_err = |reason: String| Error::Spawn {
            command: command.join(" "),
            reason,
        };
        let mut fds = [0; 2];
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(spawn_err(std::io::Error::last_os_error().to_string()));
        }
        let (read_fd, write_fd) = (fds[0], fds[1]);
        let mut cmd = Command::new("/bin/sh");
        // The shell exits without running the command if the pipe closes without a "go" line:
        // a leaktrace that fails to attach never lets the command run untraced.
        cmd.arg("-c")
            .arg(r#"read -r go <&3 && [ "$go" = go ] || exit 125; exec 3<&-; exec "$@""#)
            .arg("leaktrace-run")
            .args(command);
        if json_on_stdout {
            cmd.stdout(std::io::stderr());
        }
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(read_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Own process group: Ctrl-C meant for leaktrace must not reach the node
                // (it would open the BREAK menu or kill it).
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn();
        unsafe { libc::close(read_fd) };
        let go = unsafe { fs::File::from_raw_fd(write_fd) };
        let child = child.map_err(|e| spawn_err(e.to_string()))?;
        Ok(HeldChild {
            child,
            go: Some(go),
        })
    }

    /// Lets the command exec.
    fn release(mut self) -> Result<Child, Error> {
        let mut go = self.go.take().expect("released once");
        go.write_all(b"go\n").map_err(|e| Error::Spawn {
            command: "held command".into(),
            reason: e.to_string(),
        })?;
        drop(go);
        Ok(self.child)
    }

    /// Never lets the command run: closing the pipe makes the shell exit.
    fn abort(mut self) {
        self.go.take();
        let _ = self.child.wait();
    }
}

async fn wait_for_beam(pid: u32) -> Result<(), Error> {
    let deadline = Instant::now() + BEAM_START_TIMEOUT;
    loop {
        match fs::read_link(format!("/proc/{pid}/exe")) {
            Ok(exe) if target::is_beam(&exe) => return Ok(()),
            Ok(_) => {}
            Err(_) => {
                return Err(Error::Spawn {
                    command: format!("PID {pid}"),
                    reason: "the command exited before starting beam.smp".into(),
                });
            }
        }
        if Instant::now() > deadline {
            return Err(Error::Spawn {
                command: format!("PID {pid}"),
                reason: format!(
                    "it did not exec beam.smp within {}s (is it an erl command?)",
                    BEAM_START_TIMEOUT.as_secs()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Target-side state the loop keeps learning: the image (once beam.smp is mapped) gives the
/// literal mapper and allocator names.
struct Learned {
    names: OwnerNames,
    names_read: bool,
}

impl Learned {
    fn learn(&mut self, traced: &Traced, ledger: &mut CarrierLedger) {
        if self.names_read && ledger.knows_literal_mapper() {
            return;
        }
        let Some(view) = ImageView::find(traced.pid, &traced.exe_for_maps, &traced.symbols) else {
            return;
        };
        if !ledger.knows_literal_mapper()
            && let Some(addr) = view.address_of("erts_literal_mmapper")
        {
            ledger.set_literal_mapper(addr);
        }
        if !self.names_read
            && let Some(names) = view.allocator_names()
        {
            self.names = OwnerNames { by_number: names };
            self.names_read = true;
        }
    }
}

fn accounted(ledger: &CarrierLedger, names: &OwnerNames, carriers_live: bool) -> Accounted {
    Accounted {
        carriers: carriers_live.then(|| ledger.carriers_net()),
        mseg_cache: carriers_live.then(|| ledger.mseg_cache_net()),
        native_outstanding: None,
        carriers_by_allocator: if carriers_live {
            ledger.net_by_name(|o| names.name(o))
        } else {
            Default::default()
        },
    }
}

fn progress_line(s: &Sample, rss0: u64, events: u64) -> String {
    let opt = |v: Option<i64>| v.map_or("—".to_string(), |b| human_bytes(b as f64));
    let rate = if s.t_s > 0.0 {
        (s.rss.unwrap_or(0) as f64 - rss0 as f64) / s.t_s
    } else {
        0.0
    };
    let vm = match (s.vm_used, s.vm_allocated) {
        (Some(u), Some(a)) => format!(
            "  vm used/alloc {}/{}",
            human_bytes(u as f64),
            human_bytes(a as f64)
        ),
        _ => String::new(),
    };
    format!(
        "[{:>5.0}s] rss {} ({}/s)  carriers {}  mseg_cache {}  unexplained {}{vm}  events {}",
        s.t_s,
        human_bytes(s.rss.unwrap_or(0) as f64),
        human_bytes(rate),
        opt(s.carriers),
        opt(s.mseg_cache),
        opt(s.unexplained),
        events
    )
}

async fn sample_loop(
    mut traced: Traced,
    mut tracer: Tracer,
    cfg: &TraceConfig,
) -> Result<Recording, Error> {
    let carriers_live = CARRIER_PROBES
        .iter()
        .filter(|p| p.required)
        .all(|p| tracer.attached(p.program));
    let mut ledger = CarrierLedger::new();
    let mut learned = Learned {
        names: OwnerNames::default(),
        names_read: false,
    };
    learned.learn(&traced, &mut ledger);

    let mut vm = VmState::new(cfg.vm.as_ref());
    vm.poll_connect(traced.pid, 0.0);

    let start = Instant::now();
    let Some(rss0) = ledger::read_rss(traced.pid) else {
        return Err(Error::NoSuchProcess { pid: traced.pid });
    };
    let baseline = rss0.anon;
    let mut first = ledger::sample(
        0.0,
        rss0,
        baseline,
        accounted(&ledger, &learned.names, carriers_live),
    );
    if let Some((used, allocated)) = vm.sample(0.0) {
        (first.vm_used, first.vm_allocated) = (Some(used), Some(allocated));
    }
    let mut samples = vec![first];
    let progress = cfg.progress && std::io::stderr().is_terminal();

    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| Error::Load(e.to_string()))?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| Error::Load(e.to_string()))?;
    let mut drain_tick = interval(DRAIN_EVERY);
    drain_tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut sample_tick = interval(cfg.interval);
    sample_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    sample_tick.tick().await; // the first tick is immediate: sample 0 is taken above
    let deadline = tokio::time::Instant::from_std(start + cfg.duration);

    let end = loop {
        tokio::select! {
            _ = drain_tick.tick() => {
                learned.learn(&traced, &mut ledger);
                tracer.drain(|ev| ledger.apply(&ev));
            }
            _ = sample_tick.tick() => {
                learned.learn(&traced, &mut ledger);
                tracer.drain(|ev| ledger.apply(&ev));
                let exited = traced.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
                let rss: Option<Rss> = if exited { None } else { ledger::read_rss(traced.pid) };
                let Some(rss) = rss else { break EndReason::TargetExited };
                let t_s = start.elapsed().as_secs_f64();
                let mut s = ledger::sample(
                    t_s,
                    rss,
                    baseline,
                    accounted(&ledger, &learned.names, carriers_live),
                );
                vm.poll_connect(traced.pid, t_s);
                if let Some((used, allocated)) = vm.sample(t_s) {
                    (s.vm_used, s.vm_allocated) = (Some(used), Some(allocated));
                }
                if progress {
                    eprint!("\r\x1b[2K{}", progress_line(&s, rss0.rss, ledger.events()));
                }
                samples.push(s);
            }
            _ = sleep_until(deadline) => break EndReason::Duration,
            _ = sigint.recv() => break EndReason::Interrupted,
            _ = sigterm.recv() => break EndReason::Interrupted,
        }
    };
    if progress {
        eprintln!();
    }
    tracer.drain(|ev| ledger.apply(&ev));
    let duration_s = start.elapsed().as_secs_f64();

    let mut losses = tracer.losses();
    losses.unknown_frees = ledger.unknown_frees();
    losses.probe_errors += ledger.undecodable();
    let probes = tracer.probe_stats();
    drop(tracer); // detach every probe before anything else can fail

    let (vm_evidence, vm_note) = vm.finish(duration_s);
    let vm_connection = vm_evidence.as_ref().is_some_and(|e| !e.samples.is_empty());
    let mut source_notes: Vec<String> = vm_note.into_iter().collect();
    if !vm_connection {
        source_notes.push("vm_used and vm_allocated are not measured (null)".into());
    }
    source_notes.push(
        "native probes (malloc family, enif/driver API) not attached: native_outstanding is null"
            .into(),
    );
    if !learned.names_read {
        source_notes.push(
            "allocator names could not be read from the target (erts_alc_a2ad): carriers are named by number"
                .into(),
        );
    }
    for p in probes.iter().filter(|p| !p.attached) {
        source_notes.push(format!(
            "probe {} on {} not attached: {}",
            p.name,
            p.symbol,
            p.error.as_deref().unwrap_or("unknown reason")
        ));
    }
    if let Some(child) = traced.child.as_mut()
        && end != EndReason::TargetExited
    {
        source_notes.push(format!(
            "the command (PID {}) was left running when tracing stopped",
            child.id()
        ));
    }

    Ok(Recording {
        schema: SCHEMA,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        target: traced.target.clone(),
        duration_s,
        interval_s: cfg.interval.as_secs_f64(),
        end,
        sources: Sources {
            carrier_probes: carriers_live,
            vm_connection,
            ..Default::default()
        },
        source_notes,
        probes,
        samples,
        allocators: ledger.allocators(|o| learned.names.name(o)),
        losses,
        thresholds: cfg.thresholds,
        tracer: crate::recording::TracerStats {
            peak_rss: ledger::own_peak_rss(),
            events: ledger.events(),
        },
        vm: vm_evidence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_beam_refuses_non_erlang_commands() {
        let err = find_beam(&["true".to_string()]).unwrap_err().to_string();
        assert!(err.contains("--beam"), "{err}");
        let err = find_beam(&["no-such-program-xyz".to_string()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-program-xyz"), "{err}");
    }
}
