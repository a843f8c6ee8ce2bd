//! One tracing session: check the target, attach, sample the ledger until the duration ends,
//! Ctrl-C, or the target exits, and return what was gathered as a [`Recording`].

use std::{
    fs,
    io::IsTerminal,
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};

use tokio::{
    signal::unix::{SignalKind, signal},
    time::{MissedTickBehavior, interval, sleep_until},
};

use crate::{
    carriers::{CarrierLedger, OwnerNames},
    config::{Launch, NativeMode, TraceConfig},
    error::Error,
    image::ImageView,
    launch::{self, HeldChild},
    ledger::{self, Accounted, Rss},
    live,
    lock::TargetLock,
    privilege,
    probes::{CARRIER_PROBES, Detaching, NATIVE_PROBES, NIF_API_PROBES, Tracer, required_symbols},
    recording::{EndReason, Recording, SCHEMA, Sources, Target},
    symbols::SymbolTable,
    target,
    vm::view::{LedgerFigures, VmOutcome, VmWorker},
};

/// How often the ring buffer is drained between samples. Carrier events are rare; this keeps
/// the 1 MiB ring far from full without a wakeup per event.
const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// How long the end of a run waits for the node's closing census: after `--duration`, and
/// after Ctrl-C or SIGTERM (which must end the run within a second).
const CLOSING_CENSUS_WAIT: Duration = Duration::from_secs(10);
const CLOSING_CENSUS_WAIT_MIN: Duration = Duration::from_secs(3);
const CLOSING_CENSUS_WAIT_INTERRUPTED: Duration = Duration::from_millis(600);

/// A traced process and what is known of its image.
struct Traced {
    pid: u32,
    /// Start time of the process (clock ticks after boot): a reused PID has another one.
    start_time: Option<u64>,
    /// The emulator file the probes go on.
    image: PathBuf,
    target: Target,
    exe_for_maps: PathBuf,
    symbols: SymbolTable,
    child: Option<Child>,
    /// Why the OTP release is unknown, for the source notes.
    release_unknown: Option<String>,
}

/// Traces per `launch` and `cfg`; the recording holds everything gathered, also after Ctrl-C
/// or the target's exit.
pub async fn trace(launch: &Launch, cfg: &TraceConfig) -> Result<Finished, Error> {
    match launch {
        Launch::Attach { pid } => {
            // Order: a wrong PID is named as such even without privileges.
            target::require_exists(*pid)?;
            privilege::require()?;
            let proc = target::inspect(*pid)?;
            let _lock = TargetLock::acquire(*pid)?;
            let (symbols, mut tracer) = prepare(&proc.image, &proc.exe)?;
            tracer.attach(&proc.image, &symbols, *pid, CARRIER_PROBES)?;
            let traced = Traced {
                pid: *pid,
                start_time: target::start_time(*pid),
                image: proc.image.clone(),
                target: Target {
                    pid: *pid,
                    exe: proc.exe.display().to_string(),
                    otp_release: proc.otp_release,
                    node: proc.node,
                    cgroup: crate::cgroup::locate(*pid).ok().map(|l| l.describe()),
                },
                // A beam.smp replaced on disk since the node started (an upgrade) is still the
                // running image: probes and tables go through /proc/PID/exe; its mappings name
                // the old path with " (deleted)", which ImageView leaves out.
                exe_for_maps: PathBuf::from(
                    proc.exe
                        .to_string_lossy()
                        .strip_suffix(" (deleted)")
                        .map(str::to_owned)
                        .unwrap_or_else(|| proc.exe.to_string_lossy().into_owned()),
                ),
                symbols,
                child: None,
                release_unknown: proc.otp_release_unknown,
            };
            sample_loop(traced, tracer, cfg).await
        }
        Launch::Run {
            command,
            beam,
            user,
        } => {
            privilege::require()?;
            let beam = match beam {
                Some(b) => b.clone(),
                None => launch::find_beam(command)?,
            };
            if !target::is_beam(&beam) {
                return Err(Error::BeamNotFound {
                    command: command.join(" "),
                    reason: format!("{} is not a beam.smp", beam.display()),
                });
            }
            let (symbols, mut tracer) = prepare(&beam, &beam)?;
            let held = HeldChild::spawn(command, cfg.json, user.as_ref())?;
            let pid = held.child.id();
            let _lock = TargetLock::acquire(pid)?;
            // The per-process perf event stays with the task across exec, so probes placed on
            // beam.smp for this PID before the exec see its first allocation.
            if let Err(e) = tracer.attach(&beam, &symbols, pid, CARRIER_PROBES) {
                held.abort();
                return Err(e);
            }
            let mut child = held.release()?;
            if let Err(e) = launch::wait_for_beam(pid, &beam).await {
                // Our own child, started for this run: a blind trace of it is no use to anyone.
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
            let cmdline = target::read_cmdline(pid).unwrap_or_default();
            let release = target::otp_release(pid, &beam, &cmdline);
            let traced = Traced {
                pid,
                start_time: target::start_time(pid),
                image: beam.clone(),
                target: Target {
                    pid,
                    exe: beam.display().to_string(),
                    otp_release: release.as_ref().ok().cloned(),
                    node: target::node_name(&cmdline),
                    cgroup: crate::cgroup::locate(pid).ok().map(|l| l.describe()),
                },
                exe_for_maps: fs::canonicalize(&beam).unwrap_or(beam),
                symbols,
                child: Some(child),
                release_unknown: release.err(),
            };
            sample_loop(traced, tracer, cfg).await
        }
    }
}

/// A finished run: what was gathered, and its probes on their way out of the kernel.
#[derive(Debug)]
pub struct Finished {
    /// Everything gathered.
    pub recording: Recording,
    /// Wait on it before exiting (dropping it waits too).
    pub detaching: Detaching,
}

/// What `attach` and `run` share before attaching: the image's symbols (every required one
/// present) and the loaded eBPF programs.
fn prepare(image: &std::path::Path, exe: &std::path::Path) -> Result<(SymbolTable, Tracer), Error> {
    let symbols = SymbolTable::read(image, &exe.display().to_string())?;
    symbols.require(&required_symbols(CARRIER_PROBES))?;
    let tracer = Tracer::load()?;
    Ok((symbols, tracer))
}

/// The native probes over a run: when they attached and what they saw.
struct NativeProbes {
    mode: NativeMode,
    ledger: Option<crate::native::NativeLedger>,
    attached_at_s: Option<f64>,
    libc: Option<String>,
    /// The libc file read, held open for as long as its probes are.
    libc_symbols: Option<SymbolTable>,
    reason: String,
    /// `--stacks`: frames of user stack per allocation call (0: none).
    stacks: u32,
    /// What they may cost (`--max-overhead`), and when they were detached for costing more.
    budget: Budget,
}

/// The cost budget of one probe family (`--max-overhead`): at each check its cost is estimated
/// from the hits since the last check times its cost per hit; past the budget the family is
/// detached (by its owner) and stays so.
struct Budget {
    /// Estimated cost of one hit, seconds.
    cost_per_hit_s: f64,
    /// Most of one CPU the family may cost (a fraction).
    max: f64,
    /// Hits and time at the last check.
    last: (u64, f64),
    /// Share of one CPU at the last check.
    overhead: f64,
    /// When the family was detached for costing more than `max`.
    detached_at_s: Option<f64>,
}

impl Budget {
    fn new(cost_per_hit_s: f64, max: f64) -> Budget {
        Budget {
            cost_per_hit_s,
            max,
            last: (0, 0.0),
            overhead: 0.0,
            detached_at_s: None,
        }
    }

    /// The family is attached: its hits are counted from `hits` at `t_s`.
    fn start(&mut self, hits: u64, t_s: f64) {
        self.last = (hits, t_s);
    }

    /// Updates the estimate with the `hits` counted by `t_s`. Over the budget, marks the
    /// family detached at `t_s` and says why (for its reason); the caller detaches it.
    fn check(&mut self, hits: u64, t_s: f64, family: &str) -> Option<String> {
        let dt = t_s - self.last.1;
        if dt > 0.0 {
            self.overhead = hits.saturating_sub(self.last.0) as f64 * self.cost_per_hit_s / dt;
            self.last = (hits, t_s);
        }
        if self.detached_at_s.is_some() || self.overhead <= self.max {
            return None;
        }
        self.detached_at_s = Some(t_s);
        Some(format!(
            "detached at {t_s:.1} s: {:.0} {family} probe hits/s cost an estimated {:.0}% of a CPU, over --max-overhead {:.0}%",
            self.overhead / self.cost_per_hit_s,
            self.overhead * 100.0,
            self.max * 100.0
        ))
    }
}

/// Estimated cost of one hit of a native probe: an emulated entry probe or the return
/// trampoline, about 1 µs each on this kernel (a malloc/free pair is three hits; see the bench).
const NATIVE_HIT_COST_S: f64 = 1.0e-6;

/// Counter ids and program names of every native probe (libc and NIF API), each once.
fn native_ids_and_programs() -> (Vec<u32>, Vec<&'static str>) {
    let mut ids: Vec<u32> = Vec::new();
    let mut programs: Vec<&'static str> = Vec::new();
    for spec in crate::probes::NATIVE_PROBES
        .iter()
        .chain(crate::probes::NIF_API_PROBES)
    {
        if !ids.contains(&spec.id) {
            ids.push(spec.id);
        }
        if !programs.contains(&spec.program) {
            programs.push(spec.program);
        }
    }
    (ids, programs)
}

impl NativeProbes {
    fn new(mode: NativeMode, stacks: u32, max_overhead: f64) -> NativeProbes {
        NativeProbes {
            mode,
            stacks,
            budget: Budget::new(NATIVE_HIT_COST_S, max_overhead),
            ledger: None,
            attached_at_s: None,
            libc: None,
            libc_symbols: None,
            reason: match mode {
                NativeMode::Auto => {
                    "--native auto: memory outside ERTS carriers did not grow".into()
                }
                NativeMode::On => "--native on".into(),
                NativeMode::Off => "--native off".into(),
            },
        }
    }

    /// Attaches the libc probes of the target; a failure is recorded as the reason.
    fn attach(&mut self, traced: &Traced, tracer: &mut Tracer, t_s: f64, why: String) {
        let maps = crate::native::read_maps(traced.pid);
        let Some(libc) = crate::native::find_libc(&maps) else {
            self.reason = format!("{why}, but the target maps no libc");
            self.mode = NativeMode::Off;
            return;
        };
        // The very file the target maps (its map_files link), also in a container; checked to
        // be a regular file of sane size before a byte of it is read.
        let (path, symbols) =
            match crate::target::open::open_mapped_object(traced.pid, &maps, &libc)
                .map_err(|why| format!("{libc} {why}"))
                .and_then(|(file, path)| {
                    SymbolTable::from_file(file, &libc)
                        .map(|symbols| (path, symbols))
                        .map_err(|e| e.to_string())
                }) {
                Ok(opened) => opened,
                Err(e) => {
                    self.reason = format!("{why}, but the target's libc cannot be read: {e}");
                    self.mode = NativeMode::Off;
                    return;
                }
            };
        // Before the entry probes attach: every call they see captures its stack, or none does.
        if self.stacks > 0
            && let Err(e) = tracer.set_stack_depth(self.stacks)
        {
            log::warn!("--stacks: {e}");
            self.stacks = 0;
        }
        let libc_probes = tracer.attach_native(
            &path,
            &symbols,
            traced.pid,
            NATIVE_PROBES,
            &["native_malloc", "native_calloc"],
        );
        // The NIF API lives in beam.smp: its memory is inside carriers, its caller names the NIF.
        if let Err(e) = tracer.attach_native(
            &traced.image,
            &traced.symbols,
            traced.pid,
            NIF_API_PROBES,
            &["nif_alloc", "nif_resource"],
        ) {
            log::warn!("NIF API probes: {e}");
        }
        match libc_probes {
            Ok(()) => {
                let mut ledger = crate::native::NativeLedger::new(
                    traced.pid,
                    &traced.exe_for_maps.display().to_string(),
                );
                ledger.set_stack_depth(self.stacks);
                self.ledger = Some(ledger);
                self.attached_at_s = Some(t_s);
                let (ids, _) = native_ids_and_programs();
                self.budget.start(tracer.hits_of(&ids), t_s);
                self.reason = why;
                self.libc = Some(libc);
                // Its descriptor stays open while the probes may be put back (`/proc/self/fd/N`).
                self.libc_symbols = Some(symbols);
            }
            Err(e) => {
                self.reason = format!("{why}, but attaching failed: {e}");
                self.mode = NativeMode::Off;
            }
        }
    }

    /// Reads the kernel's site totals into the ledger, the sample and the histograms; detaches
    /// the probes when they cost more than `--max-overhead`.
    fn account(
        &mut self,
        tracer: &mut Tracer,
        s: &mut crate::recording::Sample,
        h: &mut crate::recording::histograms::Histograms,
    ) {
        let Some(ledger) = self.ledger.as_mut() else {
            return;
        };
        if self.budget.detached_at_s.is_none() {
            ledger.update(tracer.native_sites());
            ledger.histograms_into(tracer.native_hists(), h);
            if self.stacks > 0 {
                ledger.update_stacks(tracer.stack_sites(), |id| tracer.stack_frames(id));
            }
            // The series ends where the probes did: a frozen figure is not a flat trend.
            ledger.record_point(s.t_s);
        }
        let native = ledger.outstanding();
        s.native_outstanding = Some(native);
        s.unexplained = s.unexplained.map(|u| u - native);
        if self.budget.detached_at_s.is_none() {
            self.keep_within_budget(tracer, s.t_s);
        }
    }

    /// Estimates what the probes cost since the last check (hits/s x cost per hit) and
    /// detaches them past `--max-overhead`: an allocation-heavy node is never slowed for long.
    fn keep_within_budget(&mut self, tracer: &mut Tracer, t_s: f64) {
        let (ids, programs) = native_ids_and_programs();
        if let Some(why) = self.budget.check(tracer.hits_of(&ids), t_s, "native") {
            tracer.detach_programs(&programs);
            self.reason = format!(
                "{}; {why}; native figures after that are frozen (run with a higher --max-overhead, or --native off, on an allocation-heavy node)",
                self.reason
            );
        }
    }

    /// The evidence for the recording (None with `--native off`), and the native loss
    /// counters that could not be read.
    fn finish(
        mut self,
        tracer: &Tracer,
        h: &mut crate::recording::histograms::Histograms,
    ) -> (Option<crate::recording::NativeEvidence>, Vec<String>) {
        if self.mode == NativeMode::Off && self.ledger.is_none() && self.attached_at_s.is_none() {
            let e = (self.reason != "--native off").then(|| crate::recording::NativeEvidence {
                reason: self.reason,
                ..Default::default()
            });
            return (e, Vec::new());
        }
        // The totals as they stand at the end (the last sample can be up to an interval old);
        // frozen where the probes were detached over budget.
        let frozen = self.budget.detached_at_s.is_some();
        if let Some(l) = self.ledger.as_mut() {
            if !frozen {
                l.update(tracer.native_sites());
                l.histograms_into(tracer.native_hists(), h);
            }
            l.censor_into(h);
            if self.stacks > 0 && !frozen {
                l.update_stacks(tracer.stack_sites(), |id| tracer.stack_frames(id));
            }
        }
        let mut e = match &self.ledger {
            Some(l) => l.evidence(self.attached_at_s, self.reason),
            None => crate::recording::NativeEvidence {
                reason: self.reason,
                ..Default::default()
            },
        };
        e.libc = self.libc;
        e.detached_at_s = self.budget.detached_at_s;
        e.overhead_cpu_share = self.budget.overhead;
        let unreadable = tracer.native_losses(&mut e);
        (Some(e), unreadable)
    }
}

/// Estimated cost of one hit of a block probe: an emulated entry probe (push) about 1.2 µs, a
/// return probe about as much again (measured on this kernel, see the bench).
const BLOCK_HIT_COST_S: f64 = 1.2e-6;

/// Block probe programs, for detaching them early.
const BLOCK_PROGRAMS: [&str; 5] = [
    "block_alloc",
    "block_alloc_ret",
    "block_realloc",
    "block_realloc_ret",
    "block_free",
];

/// Block probe programs on allocations: what `--blocks sampled` takes out between windows.
const BLOCK_ALLOC_PROGRAMS: [&str; 4] = [
    "block_alloc",
    "block_alloc_ret",
    "block_realloc",
    "block_realloc_ret",
];

/// The block probes (`--blocks`) over a run.
struct BlockProbes {
    wanted: bool,
    /// `--blocks sampled`: allocation probes only in windows.
    sampled: bool,
    /// Whether the allocation probes are in (always, unless sampled).
    window_open: bool,
    /// Seconds the allocation window has been open since attach.
    open_s: f64,
    /// Allocation probes on their way out at the end of the last window.
    pausing: Option<Detaching>,
    ledger: Option<crate::blocks::BlockLedger>,
    attached_at_s: Option<f64>,
    reason: String,
    /// Tries left to find the image and attach (beam.smp may not be mapped yet in `run`).
    tries_left: u32,
    /// What they may cost (`--max-overhead`); its last check is also where the sampling
    /// windows count time from.
    budget: Budget,
}

impl BlockProbes {
    fn new(cfg: &TraceConfig) -> BlockProbes {
        BlockProbes {
            wanted: cfg.blocks.is_some(),
            sampled: cfg.blocks == Some(crate::config::BlockMode::Sampled),
            window_open: true,
            open_s: 0.0,
            pausing: None,
            ledger: None,
            attached_at_s: None,
            reason: if cfg.blocks.is_some() {
                "--blocks: not attached yet".into()
            } else {
                String::new()
            },
            tries_left: LEARN_TRIES,
            budget: Budget::new(BLOCK_HIT_COST_S, cfg.max_overhead),
        }
    }

    /// Attaches once the image of beam.smp is mapped and its tables read.
    fn try_attach(&mut self, traced: &Traced, tracer: &mut Tracer, t_s: f64) {
        if !self.wanted || self.ledger.is_some() || self.tries_left == 0 {
            return;
        }
        self.tries_left -= 1;
        let Some(view) = ImageView::find(traced.pid, &traced.exe_for_maps, &traced.symbols) else {
            if self.tries_left == 0 {
                self.reason =
                    "--blocks: beam.smp's image was never found mapped in the target".into();
            }
            return;
        };
        let used = match crate::blocks::used_functions(&view) {
            Ok(u) => u,
            Err(e) => {
                self.reason = format!("--blocks: {e}");
                self.tries_left = 0;
                return;
            }
        };
        let names = match crate::blocks::TypeNames::read(&view) {
            Ok(n) => n,
            Err(e) => {
                self.reason = format!("--blocks: {e}");
                self.tries_left = 0;
                return;
            }
        };
        let specs = crate::probes::block_specs(&used);
        match tracer.attach_native(
            &traced.image,
            &traced.symbols,
            traced.pid,
            &specs,
            &["block_alloc"],
        ) {
            Ok(()) => {
                self.ledger = Some(crate::blocks::BlockLedger::new(
                    names,
                    used.iter().map(|f| f.to_string()).collect(),
                ));
                self.attached_at_s = Some(t_s);
                self.budget.start(0, t_s);
                self.reason = format!(
                    "--blocks: probes on {} (the functions erts_allctrs[] points to)",
                    used.join(", ")
                );
            }
            Err(e) => {
                self.reason = format!("--blocks: attaching failed: {e}");
                self.tries_left = 0;
            }
        }
    }

    /// Reads the kernel's totals into the ledger, the sample and the histograms; detaches the
    /// probes when they cost more than `--max-overhead`.
    fn account(
        &mut self,
        tracer: &mut Tracer,
        s: &mut crate::recording::Sample,
        h: &mut crate::recording::histograms::Histograms,
    ) {
        let Some(ledger) = self.ledger.as_mut() else {
            return;
        };
        if self.budget.detached_at_s.is_none() {
            ledger.update(tracer.block_stats());
            ledger.histograms_into(h);
        }
        if self.sampled
            && self.budget.detached_at_s.is_none()
            && let Some(at) = self.attached_at_s
        {
            use crate::config::{SAMPLE_PERIOD_S, SAMPLE_WINDOW_S};
            if self.window_open {
                self.open_s += s.t_s - self.budget.last.1;
            }
            let since = s.t_s - at;
            if since > 0.0 && self.open_s > 0.0 {
                ledger.set_scale(since / self.open_s);
            }
            let want_open = since % SAMPLE_PERIOD_S < SAMPLE_WINDOW_S;
            if want_open != self.window_open {
                if want_open {
                    let failed = tracer.resume(&BLOCK_ALLOC_PROGRAMS);
                    if failed > 0 {
                        log::warn!("--blocks sampled: {failed} allocation probes not re-attached");
                    }
                } else {
                    // The previous window's probes are long gone (windows are seconds apart).
                    self.pausing = Some(tracer.pause(&BLOCK_ALLOC_PROGRAMS));
                }
                self.window_open = want_open;
            }
        }
        ledger.record_point(s.t_s);
        s.blocks_net = Some(ledger.net_total());
        if self.budget.detached_at_s.is_some() {
            return;
        }
        use leaktrace_common::probe_id as P;
        let hits = tracer.hits_of(&[
            P::BLOCK_ALLOC,
            P::BLOCK_ALLOC_RET,
            P::BLOCK_REALLOC,
            P::BLOCK_REALLOC_RET,
            P::BLOCK_FREE,
        ]);
        if let Some(why) = self.budget.check(hits, s.t_s, "block") {
            tracer.detach_programs(&BLOCK_PROGRAMS);
            self.reason = format!(
                "{}; {why}; block figures after that are frozen",
                self.reason
            );
        }
    }

    /// The evidence for the recording (None without `--blocks`).
    fn finish(
        mut self,
        tracer: &Tracer,
        h: &mut crate::recording::histograms::Histograms,
    ) -> Option<crate::recording::blocks::BlockEvidence> {
        if !self.wanted {
            return None;
        }
        // The last window's allocation probes are out before the final totals are read.
        if let Some(p) = self.pausing.take() {
            p.wait();
        }
        let Some(ledger) = self.ledger.as_mut() else {
            return Some(crate::recording::blocks::BlockEvidence {
                reason: self.reason,
                ..Default::default()
            });
        };
        if self.budget.detached_at_s.is_none() {
            ledger.update(tracer.block_stats());
            ledger.histograms_into(h);
        }
        ledger.censor_into(h);
        let since = self.budget.last.1 - self.attached_at_s.unwrap_or(0.0);
        let sampling = self.sampled.then(|| {
            format!(
                "allocations watched in windows of {:.0} s every {:.0} s (open {:.1} s of {:.1} s), every free watched; net bytes and growth scaled by {:.1} (the windows' share of time): an estimate, biased when allocations follow the windows' rhythm; counts and histograms are the sampled ones",
                crate::config::SAMPLE_WINDOW_S,
                crate::config::SAMPLE_PERIOD_S,
                self.open_s,
                since,
                if self.open_s > 0.0 { since / self.open_s } else { 1.0 }
            )
        });
        let mut e = ledger.evidence(self.attached_at_s, self.reason);
        e.sampling = sampling;
        e.detached_at_s = self.budget.detached_at_s;
        (e.live_full, e.types_full) = tracer.block_losses();
        e.overhead_cpu_share = self.budget.overhead;
        Some(e)
    }
}

/// Carrier sizes and lifetimes observed since the last call into the histograms, named by
/// allocator (`carrier_size/ets_alloc`, `carrier_lifetime/ets_alloc`).
fn carrier_histograms(
    ledger: &mut CarrierLedger,
    names: &OwnerNames,
    h: &mut crate::recording::histograms::Histograms,
) {
    use crate::{carriers::CarrierObservation as O, recording::histograms::HistogramUnit as U};
    let (seen, dropped) = ledger.take_observations();
    for o in seen {
        match o {
            O::Size(owner, size) => h.record(
                &format!("carrier_size/{}", names.name(owner)),
                U::Bytes,
                size,
            ),
            O::Lifetime(owner, us) => h.record(
                &format!("carrier_lifetime/{}", names.name(owner)),
                U::Us,
                us,
            ),
        }
    }
    h.dropped = h.dropped.saturating_add(dropped);
}

/// Puts VM figures into the ledger samples they were asked for.
fn fill_vm_figures(samples: &mut [crate::recording::Sample], figures: Vec<LedgerFigures>) {
    for f in figures {
        if let Some(s) = samples.get_mut(f.index) {
            (s.vm_used, s.vm_allocated) = (f.used, f.allocated);
        }
    }
}

/// Target-side state the loop keeps learning: the image (once beam.smp is mapped) gives the
/// literal mapper and allocator names.
struct Learned {
    names: OwnerNames,
    names_read: bool,
    /// Looks at the target's mappings left: a beam.smp without `erts_literal_mmapper` must not
    /// have its maps re-read every drain for the whole run.
    tries_left: u32,
}

/// Whether probes may still be placed later in the run: the native probes of `--native auto`
/// before they trigger, block probes not yet found a place, and `--blocks sampled`, whose
/// windows take their probes out and put them back.
fn attach_pending(native: &NativeProbes, blocks: &BlockProbes) -> bool {
    let native_pending = native.mode == NativeMode::Auto && native.ledger.is_none();
    let blocks_pending = blocks.wanted
        && ((blocks.ledger.is_none() && blocks.tries_left > 0)
            || (blocks.sampled && blocks.budget.detached_at_s.is_none()));
    native_pending || blocks_pending
}

/// The capabilities the run holds, phase by phase: every one at attach, then only what
/// reading the target and placing later probes need (see [`privilege::tracing_keeps`]).
struct Privileges {
    phases: Vec<crate::recording::PrivilegePhase>,
    /// Effective set of the tracing thread now.
    held: u64,
}

impl Privileges {
    /// Records what the run starts with. The VM connection and every reply live in a process
    /// of their own without privileges (`vm::sandbox`).
    fn new() -> Privileges {
        let held = privilege::thread_effective();
        let phases = vec![crate::recording::PrivilegePhase {
            phase: "attach".into(),
            at_s: 0.0,
            held: privilege::names(held),
        }];
        Privileges { phases, held }
    }

    /// Keeps only what reading the target needs, plus what attaching needs while
    /// `attach_pending`; a phase is recorded when the set changes.
    fn settle(&mut self, phase: &str, t_s: f64, attach_pending: bool) {
        let keep = privilege::tracing_keeps()
            | if attach_pending {
                privilege::attaching_keeps()
            } else {
                0
            };
        if self.held & !keep == 0 {
            return;
        }
        match privilege::keep_only(keep) {
            Ok(held) => {
                self.held = held;
                self.phases.push(crate::recording::PrivilegePhase {
                    phase: if attach_pending {
                        format!("{phase} (probes may still attach)")
                    } else {
                        format!("{phase} (every probe placed)")
                    },
                    at_s: t_s,
                    held: privilege::names(held),
                });
            }
            Err(e) => log::warn!("cannot give up capabilities no longer needed: {e}"),
        }
    }
}

/// How many drains (50 ms apart) the image is looked for: ten seconds.
const LEARN_TRIES: u32 = 200;

impl Learned {
    fn learn(&mut self, traced: &Traced, ledger: &mut CarrierLedger) {
        if (self.names_read && ledger.knows_literal_mapper()) || self.tries_left == 0 {
            return;
        }
        self.tries_left -= 1;
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

fn accounted(
    ledger: &mut CarrierLedger,
    names: &OwnerNames,
    carriers_live: bool,
    pid: u32,
) -> Accounted {
    // Resident bytes of the carrier and cached-segment ranges (pagemap), comparable with
    // rss_anon; the mapped sizes stay in the CarrierLedger. Unmeasurable residency (pagemap
    // unreadable) leaves the lines unmeasured rather than mapped.
    let measured = carriers_live && ledger.measure(pid);
    if carriers_live
        && !measured
        && let Some(why) = ledger.take_residency_warning()
    {
        log::warn!("carrier residency not measured: {why}");
    }
    Accounted {
        carriers: measured.then(|| ledger.carriers_resident_net()),
        mseg_cache: measured.then(|| ledger.mseg_cache_resident_net()),
        native_outstanding: None,
        carriers_by_allocator: if measured {
            ledger.resident_by_name(|o| names.name(o))
        } else {
            Default::default()
        },
        carriers_mapped: carriers_live.then(|| ledger.carriers_net()),
    }
}

async fn sample_loop(
    mut traced: Traced,
    mut tracer: Tracer,
    cfg: &TraceConfig,
) -> Result<Finished, Error> {
    let carriers_live = CARRIER_PROBES
        .iter()
        .filter(|p| p.required)
        .all(|p| tracer.attached(p.program));
    let container_notes = crate::namespace::container_notes(traced.pid);
    let mut ledger = CarrierLedger::new();
    let mut learned = Learned {
        names: OwnerNames::default(),
        names_read: false,
        tries_left: LEARN_TRIES,
    };
    learned.learn(&traced, &mut ledger);

    let start = Instant::now();
    let mut privileges = Privileges::new();
    let mut vm = VmWorker::spawn(traced.pid, cfg.vm.as_ref(), start);

    // The baseline after the first drain: carriers made between attach and now are in both
    // the ledger and the RSS read below, never in one only.
    tracer.drain(|ev| ledger.apply(&ev));
    let Some(rss0) = ledger::read_rss(traced.pid) else {
        return Err(Error::NoSuchProcess { pid: traced.pid });
    };
    let baseline = rss0.anon;
    // The level at attach: where the resident memory already lies before any trend exists.
    let resident_at_attach =
        crate::target::breakdown::measure(traced.pid, crate::carriers::erts_ranges_by_shape).ok();
    let first = ledger::sample(
        0.0,
        rss0,
        baseline,
        accounted(&mut ledger, &learned.names, carriers_live, traced.pid),
    );
    vm.request(0.0, 0);
    let mut samples = vec![first];
    let mut native = NativeProbes::new(cfg.native, cfg.stacks, cfg.max_overhead);
    let mut blocks = BlockProbes::new(cfg);
    let mut histograms = crate::recording::histograms::Histograms::default();
    blocks.try_attach(&traced, &mut tracer, 0.0);
    if cfg.native == NativeMode::On {
        native.attach(&traced, &mut tracer, 0.0, "--native on".into());
    }
    // The probes this run needs are placed (or wait for a trigger): what is not needed from
    // here on is given up.
    privileges.settle(
        "tracing",
        start.elapsed().as_secs_f64(),
        attach_pending(&native, &blocks),
    );
    // The live view (crate::live) on a terminal, from the first sample on; nothing per sample
    // when stderr is not a terminal.
    let progress = cfg.progress && std::io::stderr().is_terminal();
    let mut live_screen: Option<live::Screen> = None;

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
                blocks.try_attach(&traced, &mut tracer, start.elapsed().as_secs_f64());
                tracer.drain(|ev| ledger.apply(&ev));
            }
            _ = sample_tick.tick() => {
                learned.learn(&traced, &mut ledger);
                tracer.drain(|ev| ledger.apply(&ev));
                let exited = traced.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
                // A PID the kernel gave to another process since attach is not our target.
                let reused = target::start_time(traced.pid) != traced.start_time;
                let rss: Option<Rss> = if exited || reused { None } else { ledger::read_rss(traced.pid) };
                let Some(rss) = rss else { break EndReason::TargetExited };
                let t_s = start.elapsed().as_secs_f64();
                let s = ledger::sample(
                    t_s,
                    rss,
                    baseline,
                    accounted(&mut ledger, &learned.names, carriers_live, traced.pid),
                );
                // VM figures arrive from the worker when the node answers; the loop never waits.
                vm.request(t_s, samples.len());
                let mut s = s;
                native.account(&mut tracer, &mut s, &mut histograms);
                blocks.account(&mut tracer, &mut s, &mut histograms);
                carrier_histograms(&mut ledger, &learned.names, &mut histograms);
                histograms.close_interval(t_s);
                samples.push(s);
                if native.mode == NativeMode::Auto
                    && native.ledger.is_none()
                    && let Some(reason) = crate::native::auto_trigger(&samples, &cfg.thresholds)
                {
                    native.attach(&traced, &mut tracer, t_s, reason);
                }
                privileges.settle("tracing", t_s, attach_pending(&native, &blocks));
                fill_vm_figures(&mut samples, vm.take_figures());
                if progress {
                    let screen = live_screen.get_or_insert_with(live::Screen::enter);
                    let hits = tracer.total_hits();
                    let hits_per_s = screen.hits_per_s(t_s, hits);
                    let modules = native.ledger.as_ref().map(|l| l.modules()).unwrap_or_default();
                    let mut losses = tracer.losses();
                    losses.unknown_frees = ledger.unknown_frees();
                    screen.draw(&live::LiveState {
                        pid: traced.pid,
                        node: traced.target.node.as_deref(),
                        elapsed_s: t_s,
                        duration_s: cfg.duration.as_secs_f64(),
                        interval_s: cfg.interval.as_secs_f64(),
                        samples: &samples,
                        thresholds: &cfg.thresholds,
                        native_attached_at_s: native.attached_at_s,
                        native_reason: &native.reason,
                        native_modules: &modules,
                        hits_per_s,
                        hits,
                        events: ledger.events(),
                        losses: &losses,
                    });
                }
            }
            _ = sleep_until(deadline) => break EndReason::Duration,
            _ = sigint.recv() => break EndReason::Interrupted,
            _ = sigterm.recv() => break EndReason::Interrupted,
        }
    };
    // Back on the normal screen before the closing census and the verdict.
    if let Some(screen) = live_screen.take() {
        screen.leave(start.elapsed().as_secs_f64());
    }
    tracer.drain(|ev| ledger.apply(&ev));
    let duration_s = start.elapsed().as_secs_f64();

    let (native_evidence, native_unreadable) = native.finish(&tracer, &mut histograms);
    let block_evidence = blocks.finish(&tracer, &mut histograms);
    carrier_histograms(&mut ledger, &learned.names, &mut histograms);
    for (owner, live) in ledger.live_seen_by() {
        histograms.censored(
            &format!("carrier_lifetime/{}", learned.names.name(owner)),
            crate::recording::histograms::HistogramUnit::Us,
            live,
        );
    }
    histograms.close_interval(duration_s);
    let mut losses = tracer.losses();
    losses.unreadable.extend(native_unreadable);
    losses.unknown_frees = ledger.unknown_frees();
    losses.probe_errors += ledger.undecodable();
    let probes = tracer.probe_stats();
    let detaching = tracer.detach_in_background();

    let wait = match end {
        EndReason::Duration => vm.closing_wait(CLOSING_CENSUS_WAIT_MIN, CLOSING_CENSUS_WAIT),
        EndReason::Interrupted => CLOSING_CENSUS_WAIT_INTERRUPTED,
        EndReason::TargetExited => Duration::ZERO,
    };
    let VmOutcome {
        evidence: vm_evidence,
        note: vm_note,
        figures,
    } = vm.finish(wait);
    fill_vm_figures(&mut samples, figures);
    let vm_connection = vm_evidence.as_ref().is_some_and(|e| !e.samples.is_empty());
    let mut source_notes: Vec<String> = vec![vm_note];
    source_notes.extend(container_notes);
    if let Some(why) = &traced.release_unknown {
        source_notes.push(format!("OTP release unknown: {why}"));
    }
    if let Some(e) = vm_evidence
        .as_ref()
        .filter(|e| !e.disabled_allocators.is_empty())
    {
        source_notes.push(format!(
            "the node runs without ERTS allocators {} (+M flags): their memory comes from malloc, outside any carrier; carriers and vm_used cannot account for it, the census does",
            e.disabled_allocators.join(", ")
        ));
    }
    if !vm_connection {
        source_notes.push("vm_used and vm_allocated are not measured (null)".into());
    }
    match &native_evidence {
        Some(n) if n.attached_at_s.is_some() => source_notes.push(format!(
            "native probes on {} attached at {:.1} s: {}",
            n.libc.as_deref().unwrap_or("libc"),
            n.attached_at_s.unwrap_or(0.0),
            n.reason
        )),
        Some(n) => source_notes.push(format!(
            "native probes not attached: {}; native_outstanding is null",
            n.reason
        )),
        None => {
            source_notes.push("native probes off (--native off): native_outstanding is null".into())
        }
    }
    if let Some(b) = &block_evidence {
        source_notes.push(b.reason.clone());
    }
    if traced.target.exe.ends_with(" (deleted)") {
        source_notes.push(format!(
            "{} was replaced on disk since the node started (an upgrade): probes, symbols and tables were read from the running image through /proc/{}/exe",
            traced.target.exe.trim_end_matches(" (deleted)"),
            traced.pid
        ));
    }
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

    let resident_at_end =
        crate::target::breakdown::measure(traced.pid, crate::carriers::erts_ranges_by_shape).ok();
    let recording = Recording {
        resident: (resident_at_attach.is_some() || resident_at_end.is_some()).then_some({
            crate::recording::resident::ResidentLevels {
                at_attach: resident_at_attach,
                at_end: resident_at_end,
            }
        }),
        schema: SCHEMA,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        target: traced.target.clone(),
        duration_s,
        interval_s: cfg.interval.as_secs_f64(),
        end,
        sources: Sources {
            carrier_probes: carriers_live,
            native_probes: native_evidence
                .as_ref()
                .is_some_and(|n| n.attached_at_s.is_some()),
            nif_api_probes: probes.iter().any(|p| p.attached && p.name == "nif_alloc"),
            vm_connection,
            block_probes: block_evidence
                .as_ref()
                .is_some_and(|b| b.attached_at_s.is_some()),
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
        native: native_evidence,
        blocks: block_evidence,
        histograms,
        privileges: privileges.phases,
        command_line: crate::report::redact_command_line(
            &std::env::args().collect::<Vec<String>>(),
        ),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|k| k.trim().chars().take(128).collect()),
    };
    Ok(Finished {
        recording,
        detaching,
    })
}
