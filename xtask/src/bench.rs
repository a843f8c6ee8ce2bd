//! `cargo xtask bench`: tracing overhead on a fixed BEAM workload. The same workload runs
//! untraced and under `leaktrace run`, alternating round by round, and medians are compared.
//! Then the VM view's own cost: one-shot censuses and a traced run against a node holding many
//! idle processes, measured as the node's CPU time above its idle rate.
//! `--native` measures the native (libc) probes instead, against a memleak-style bpftrace script.
use std::{
    fs,
    io::Read,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{fixtures, setup, shell};

/// Options of the bench.
#[derive(Args)]
pub struct BenchArgs {
    /// Measured pairs (untraced, traced); a warm-up pair runs first and is not counted.
    #[arg(long, default_value_t = 9)]
    rounds: usize,
    /// Workload size: rounds of allocation churn inside each node run.
    #[arg(long, default_value_t = 1500)]
    work: u32,
    /// Idle processes on the node whose VM view cost is measured (0 skips that section).
    #[arg(long, default_value_t = 100_000)]
    census_processes: u32,
    /// Measure the native probes instead (only this section runs): a NIF's malloc/free churn
    /// untraced, under `leaktrace run --native on` and under a memleak-style bpftrace script.
    #[arg(long)]
    native: bool,
    /// Native workload: NIF calls per node run.
    #[arg(long, default_value_t = 250_000)]
    native_calls: u32,
    /// Native workload: malloc+write+free pairs per NIF call.
    #[arg(long, default_value_t = 16)]
    native_pairs: u32,
    /// Native workload: bytes per malloc.
    #[arg(long, default_value_t = 24_576)]
    native_bytes: u32,
}

/// One traced run's figures from its report.
struct Traced {
    elapsed_us: f64,
    hits_per_s: f64,
    peak_rss: u64,
    events_lost: u64,
}

/// Runs the comparison and prints the numbers.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let leaktrace = setup::build_release()?;
    let dir = fixtures::build()?;
    if args.native {
        return native(args, &leaktrace, &dir);
    }
    let scratch = shell::workspace_root().join("target/leaktrace-bench");
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    shell::step(&format!(
        "bench: workload of {} churn rounds, {} measured pairs after one warm-up pair",
        args.work, args.rounds
    ));
    let mut plain = Vec::new();
    let mut traced = Vec::new();
    for round in 0..=args.rounds {
        let p = untraced(&dir, &scratch, args.work)?;
        let t = under_leaktrace(&leaktrace, &dir, &scratch, args.work)?;
        eprintln!(
            "    {} untraced {:8.1} ms   traced {:8.1} ms   hits/s {:8.1}   tracer peak RSS {}",
            if round == 0 { "warm-up " } else { "measured" },
            p / 1e3,
            t.elapsed_us / 1e3,
            t.hits_per_s,
            mib(t.peak_rss)
        );
        if round > 0 {
            plain.push(p);
            traced.push(t);
        }
    }
    let plain_median = median(plain.iter().copied());
    let traced_median = median(traced.iter().map(|t| t.elapsed_us));
    let ratio = traced_median / plain_median;
    println!(
        "leaktrace bench (carrier probes, {} pairs, workload {} rounds)",
        args.rounds, args.work
    );
    println!("  median untraced        {:10.1} ms", plain_median / 1e3);
    println!("  median traced          {:10.1} ms", traced_median / 1e3);
    println!(
        "  overhead ratio         {:10.3}   (target <= 1.02: {})",
        ratio,
        if ratio <= 1.02 { "met" } else { "NOT met" }
    );
    println!(
        "  probe hits/s (median)  {:10.1}",
        median(traced.iter().map(|t| t.hits_per_s))
    );
    println!(
        "  tracer peak RSS (max)  {:>10}",
        mib(traced.iter().map(|t| t.peak_rss).max().unwrap_or(0))
    );
    println!(
        "  events lost (total)    {:10}",
        traced.iter().map(|t| t.events_lost).sum::<u64>()
    );
    if args.census_processes > 0 {
        let cost = census_cost(&leaktrace, &dir, args.census_processes)
            .context("measuring the VM view cost")?;
        cost.print();
    }
    Ok(())
}

/// Node name of the VM view cost section.
const CENSUS_NODE: &str = "lt_bench_census";
/// One-shot censuses measured (the median is printed).
const CENSUS_RUNS: usize = 3;
/// How long the node's idle CPU rate is measured.
const IDLE_BASELINE: Duration = Duration::from_secs(10);
/// Length of the traced run (at leaktrace's default interval).
const TRACED_RUN: &str = "60s";
/// How often the node's CPU time is read during the traced run.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// Steady-state window of the traced run, seconds after the tracer was started: the start
/// census is long done at its start, and the closing census (at the end of the 60 s) has not
/// begun at its end.
const WINDOW: (f64, f64) = (10.0, 55.0);

/// What the VM view costs on a node with many processes (node CPU above its idle rate).
struct CensusCost {
    processes: u32,
    /// Processes the first census counted.
    counted: u64,
    /// Node CPU seconds per second when nobody looks at it.
    idle_rate: f64,
    /// Medians over the one-shot censuses (ms): wall time seen by xtask, node CPU above idle,
    /// and the census's own `limits.wall_ms`.
    census_wall_ms: f64,
    census_cpu_ms: f64,
    census_reported_ms: f64,
    /// The traced run: seconds and interval.
    traced_s: f64,
    interval_s: f64,
    /// Node CPU above idle as a share of one scheduler, over the steady-state window
    /// (its measured bounds, seconds since the tracer started, and the share).
    window: Window,
    /// Node CPU above idle as a share of one scheduler, over the whole traced run.
    whole_share: f64,
    census_every_s: Option<f64>,
    samples: usize,
    samples_with_vm: usize,
    gaps: usize,
}

/// Node CPU above its idle rate between two CPU readings of the traced run.
struct Window {
    from_s: f64,
    to_s: f64,
    share: f64,
}

impl CensusCost {
    fn print(&self) {
        println!("VM view cost (node with {} processes)", self.processes);
        println!(
            "  idle node: {:.2}% of one scheduler; the census counted {} processes",
            self.idle_rate * 100.0,
            self.counted
        );
        println!(
            "  one census: wall {:.1} ms, node CPU {:.1} ms (census wall_ms {:.1}; medians of {CENSUS_RUNS})",
            self.census_wall_ms, self.census_cpu_ms, self.census_reported_ms
        );
        println!(
            "  {:.0} s traced at {} s interval: census every {}; {} of {} samples with VM figures, {} gaps",
            self.traced_s,
            self.interval_s,
            self.census_every_s
                .map_or("— (not reported)".to_owned(), |s| format!("{s:.1} s")),
            self.samples_with_vm,
            self.samples,
            self.gaps
        );
        let samples = self.window.share * 100.0;
        println!(
            "  samples: {samples:.2}% of one scheduler (node CPU above idle from {:.1} s to {:.1} s of the run){}{}",
            self.window.from_s,
            self.window.to_s,
            if samples < 0.0 {
                " (noise: below the idle baseline)"
            } else {
                ""
            },
            match self.census_every_s {
                Some(every) if every < WINDOW.1 => format!(
                    "; periodic censuses every {every:.1} s fall in this window, so it counts them too"
                ),
                _ => String::new(),
            }
        );
        let censuses = self
            .census_every_s
            .map(|every| self.census_cpu_ms / 1e3 / every * 100.0);
        match (censuses, self.census_every_s) {
            (Some(c), Some(every)) => {
                println!(
                    "  censuses: {c:.2}% of one scheduler (one census's node CPU, {:.1} ms, every {every:.1} s)",
                    self.census_cpu_ms
                );
                let total = samples + c;
                println!(
                    "  steady state at the default interval: {samples:.2} + {c:.2} = {total:.2}% of one scheduler (target < 1%: {})",
                    if total < 1.0 { "met" } else { "NOT met" }
                );
            }
            _ => {
                println!("  censuses: not measured (the report gave no vm.census_every_s)");
                println!(
                    "  steady state at the default interval: not measured (target < 1%: NOT met)"
                );
            }
        }
        println!(
            "  whole {:.0} s run incl. start and closing census: {:.2}% of one scheduler",
            self.traced_s,
            self.whole_share * 100.0
        );
    }
}

/// Starts a node with `processes` idle processes and measures what `leaktrace vm` and a traced
/// run's VM view cost it.
fn census_cost(leaktrace: &Path, dir: &Path, processes: u32) -> anyhow::Result<CensusCost> {
    shell::step(&format!(
        "bench: VM view cost on a node with {processes} idle processes"
    ));
    let node = fixtures::Node::start(fixtures::erl(
        dir,
        &["-sname", CENSUS_NODE],
        &format!("lt_prod:idle_processes({processes})"),
    ))
    .context("starting the census node")?;
    let pid = node.pid();
    wait_registered(CENSUS_NODE)?;
    wait_settled(pid)?;

    // a. The idle rate, subtracted from every figure below.
    let (c0, t0) = (cpu_s(pid)?, Instant::now());
    thread::sleep(IDLE_BASELINE);
    let idle_rate = (cpu_s(pid)? - c0) / t0.elapsed().as_secs_f64();
    eprintln!(
        "    idle node: {:.3} CPU s over {:.0} s",
        idle_rate * IDLE_BASELINE.as_secs_f64(),
        IDLE_BASELINE.as_secs_f64()
    );

    // b. One-shot censuses.
    let (mut walls, mut cpus, mut reported) = (Vec::new(), Vec::new(), Vec::new());
    let mut counted = 0;
    for run in 1..=CENSUS_RUNS {
        let mut cmd = Command::new(leaktrace);
        cmd.args(["vm", "--pid", &pid.to_string(), "--json"])
            .stdin(Stdio::null());
        let (c0, t0) = (cpu_s(pid)?, Instant::now());
        let out = cmd
            .output()
            .with_context(|| format!("running `{}`", shell::show(&cmd)))?;
        let wall = t0.elapsed().as_secs_f64();
        let cpu = cpu_s(pid)? - c0 - idle_rate * wall;
        if !out.status.success() {
            bail!(
                "`{}` failed ({}): {}",
                shell::show(&cmd),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("parsing the output of `{}`", shell::show(&cmd)))?;
        let census = &json["census"];
        let wall_ms = census["limits"]["wall_ms"]
            .as_f64()
            .with_context(|| format!("`{}` gave no census.limits.wall_ms", shell::show(&cmd)))?;
        if run == 1 {
            counted = census["process_count"].as_u64().unwrap_or(0);
            if counted < u64::from(processes) {
                eprintln!(
                    "    warning: the census counted {counted} processes, fewer than the {processes} spawned"
                );
            }
        }
        eprintln!(
            "    census {run}: wall {:.1} ms, node CPU {:.1} ms, census wall_ms {wall_ms:.1}, {} processes",
            wall * 1e3,
            cpu * 1e3,
            census["process_count"]
        );
        walls.push(wall * 1e3);
        cpus.push(cpu * 1e3);
        reported.push(wall_ms);
    }

    // c. A traced run at the default interval, the node's CPU time read every POLL_EVERY.
    let mut cmd = Command::new(leaktrace);
    cmd.args([
        "attach",
        "--pid",
        &pid.to_string(),
        "--duration",
        TRACED_RUN,
        "--quiet",
        "--json",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    eprintln!("    traced run: $ {}", shell::show(&cmd));
    let c0 = cpu_s(pid)?;
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running `{}`", shell::show(&cmd)))?;
    // Both pipes are drained by their own threads so that the tracer never blocks on them.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    // (seconds since the tracer started, node CPU seconds)
    let mut polls = vec![(0.0, c0)];
    let mut next = t0 + POLL_EVERY;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for the tracer")? {
            break status;
        }
        thread::sleep(next.saturating_duration_since(Instant::now()));
        next += POLL_EVERY;
        polls.push((t0.elapsed().as_secs_f64(), cpu_s(pid)?));
    };
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_s(pid)? - c0 - idle_rate * elapsed;
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    // Verdicts exit 0, 1 or 3; 2 is an error.
    if status.code() == Some(2) || status.code().is_none() {
        bail!(
            "`{}` failed ({}): {}",
            shell::show(&cmd),
            status,
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    let window = window(&polls, idle_rate).with_context(|| {
        format!(
            "`{}` ended after {elapsed:.1} s, before the end of the steady-state window ({} s)",
            shell::show(&cmd),
            WINDOW.1
        )
    })?;
    let report: serde_json::Value = serde_json::from_slice(&stdout)
        .with_context(|| format!("parsing the report of `{}`", shell::show(&cmd)))?;
    let samples = report["samples"].as_array().map_or(&[][..], Vec::as_slice);
    let vm = &report["vm"];
    for gap in vm["gaps"].as_array().into_iter().flatten() {
        eprintln!(
            "    VM gap at {:.1} s: {}",
            gap["t_s"].as_f64().unwrap_or(f64::NAN),
            gap["reason"].as_str().unwrap_or("?")
        );
    }
    drop(node);
    Ok(CensusCost {
        processes,
        counted,
        idle_rate,
        census_wall_ms: median(walls.into_iter()),
        census_cpu_ms: median(cpus.into_iter()),
        census_reported_ms: median(reported.into_iter()),
        traced_s: elapsed,
        interval_s: report["interval_s"].as_f64().unwrap_or(f64::NAN),
        window,
        whole_share: cpu / elapsed,
        census_every_s: vm["census_every_s"].as_f64(),
        samples: samples.len(),
        samples_with_vm: samples.iter().filter(|s| !s["vm_used"].is_null()).count(),
        gaps: vm["gaps"].as_array().map_or(0, Vec::len),
    })
}

/// Node CPU above `idle_rate` over the steady-state window, from the first reading at or after
/// its start to the last one at or before its end; `None` when the run did not outlast it.
fn window(polls: &[(f64, f64)], idle_rate: f64) -> Option<Window> {
    let &(from_s, from_cpu) = polls.iter().find(|(t, _)| *t >= WINDOW.0)?;
    let &(to_s, to_cpu) = polls.iter().rev().find(|(t, _)| *t <= WINDOW.1)?;
    // The run must have gone on past the window (else its closing census may be inside).
    if to_s <= from_s || polls.last().is_none_or(|(t, _)| *t <= WINDOW.1) {
        return None;
    }
    let span = to_s - from_s;
    Some(Window {
        from_s,
        to_s,
        share: (to_cpu - from_cpu - idle_rate * span) / span,
    })
}

/// Waits until epmd lists `name`.
fn wait_registered(name: &str) -> anyhow::Result<()> {
    let needle = format!("name {name} ");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("epmd")
            .arg("-names")
            .stdin(Stdio::null())
            .output()
            .context("running `epmd -names`")?;
        if String::from_utf8_lossy(&out.stdout).contains(&needle) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("node {name} did not register with epmd within 30 s (`epmd -names`)");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the node has spawned its processes: its CPU time stops rising for 2 s (rising
/// by at most 1% of one scheduler over the last 2 s).
fn wait_settled(pid: u32) -> anyhow::Result<()> {
    const QUIET: Duration = Duration::from_secs(2);
    let start = Instant::now();
    let mut history: Vec<(Instant, f64)> = Vec::new();
    loop {
        let now = Instant::now();
        history.push((now, cpu_s(pid)?));
        if let Some(&(_, then)) = history.iter().rev().find(|(t, _)| now - *t >= QUIET) {
            let (_, latest) = history[history.len() - 1];
            if latest - then <= 0.01 * QUIET.as_secs_f64() {
                eprintln!(
                    "    node settled after {:.1} s ({:.2} CPU s)",
                    start.elapsed().as_secs_f64(),
                    latest
                );
                return Ok(());
            }
        }
        if start.elapsed() > Duration::from_secs(180) {
            bail!("the census node's CPU time was still rising after 180 s");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// CPU seconds (user + system) the process has used: fields 14 and 15 of /proc/PID/stat.
fn cpu_s(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name (which may hold spaces) start with field 3, the state.
    let fields: Vec<&str> = text
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let tick = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .map(|t| t as f64)
            .with_context(|| format!("field {i} of {path} is missing: {text:?}"))
    };
    Ok((tick(14)? + tick(15)?) / clock_ticks())
}

/// Clock ticks per second (`getconf CLK_TCK`; 100, the Linux default, when that fails).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|t: &f64| *t > 0.0)
            .unwrap_or(100.0)
    })
}

fn eval(work: u32, out: &Path) -> String {
    format!("lt_bench:run({work}, \"{}\").", out.display())
}

fn untraced(dir: &Path, scratch: &Path, work: u32) -> anyhow::Result<f64> {
    let out = scratch.join("untraced.us");
    let _ = fs::remove_file(&out);
    let status = fixtures::erl(dir, &[], &eval(work, &out))
        .stdin(Stdio::null())
        .status()
        .context("running the untraced workload")?;
    if !status.success() {
        bail!("the untraced workload failed ({status})");
    }
    elapsed(&out)
}

fn under_leaktrace(
    leaktrace: &Path,
    dir: &Path,
    scratch: &Path,
    work: u32,
) -> anyhow::Result<Traced> {
    let out = scratch.join("traced.us");
    let _ = fs::remove_file(&out);
    let report_dir = scratch.join("report");
    let erl = fixtures::erl(dir, &[], &eval(work, &out));
    let mut cmd = Command::new(leaktrace);
    cmd.args(["run", "--no-vm", "--quiet", "--duration", "1h", "--out"])
        .arg(&report_dir)
        .arg("--")
        .arg(erl.get_program())
        .args(erl.get_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let status = cmd.status().context("running leaktrace")?;
    // Verdicts exit 0, 1 or 3; 2 is an error.
    if status.code() == Some(2) || status.code().is_none() {
        bail!("`{}` failed ({status})", shell::show(&cmd));
    }
    let text =
        fs::read_to_string(report_dir.join("report.json")).context("reading the bench report")?;
    let report: serde_json::Value =
        serde_json::from_str(&text).context("parsing the bench report")?;
    let hits: u64 = report["probes"]
        .as_array()
        .map(|probes| probes.iter().filter_map(|p| p["hits"].as_u64()).sum())
        .unwrap_or(0);
    let duration = report["duration_s"].as_f64().unwrap_or(0.0);
    Ok(Traced {
        elapsed_us: elapsed(&out)?,
        hits_per_s: if duration > 0.0 {
            hits as f64 / duration
        } else {
            0.0
        },
        peak_rss: report["tracer"]["peak_rss"].as_u64().unwrap_or(0),
        events_lost: report["losses"]["events_lost"].as_u64().unwrap_or(0),
    })
}

fn elapsed(file: &Path) -> anyhow::Result<f64> {
    let text = fs::read_to_string(file)
        .with_context(|| format!("the workload wrote no timing to {}", file.display()))?;
    text.trim()
        .parse::<f64>()
        .with_context(|| format!("bad timing {text:?}"))
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

// `--native`: the native (libc) probes on a NIF's malloc/free churn, against the same workload
// untraced and under a memleak-style bpftrace script, alternating round by round.

/// The memleak-style baseline; `:LIBC:` in its probes stands for the target's libc.
const MEMLEAK_BT: &str = include_str!("memleak.bt");
/// What an emulated uprobe trap (`push`, `nop`) costs on this machine, in µs (ARCHITECTURE.md,
/// "Measured on this machine").
const TRAP_FLOOR_US: f64 = 0.9;
/// Per-event cost target, as a multiple of the trap floor.
const FLOOR_TARGET: f64 = 1.2;
/// Entries of bpftrace's maps (BPFTRACE_MAP_KEYS_MAX; its default is 4096): as many as
/// leaktrace's outstanding map holds (`native_limits::OUTSTANDING`).
const BPFTRACE_MAP_KEYS: u32 = 1 << 19;

/// The native workload: `lt_churn:run(Calls, N, Bytes, OutFile)`.
#[derive(Clone, Copy)]
struct Churn {
    calls: u32,
    pairs: u32,
    bytes: u32,
}

impl Churn {
    fn eval(&self, out: &Path) -> String {
        format!(
            "lt_churn:run({}, {}, {}, \"{}\").",
            self.calls,
            self.pairs,
            self.bytes,
            out.display()
        )
    }

    /// malloc/free pairs the workload makes.
    fn total(&self) -> u64 {
        u64::from(self.calls) * u64::from(self.pairs)
    }
}

/// One `leaktrace run --native on` round.
struct NativeRun {
    elapsed_us: f64,
    /// Hits of the native probes: each program once (one program may be listed for several
    /// symbols, with the same counter), the largest count listed for it.
    events: u64,
    outstanding_full: u64,
    modules: usize,
    /// Sum of the modules' outstanding bytes at the end of the run.
    outstanding_bytes: i64,
    unknown_frees: u64,
    /// Allocations and frees attributed to lt_churn.so.
    churn_allocations: u64,
    churn_frees: u64,
    peak_rss: u64,
    events_lost: u64,
}

/// One memleak-style bpftrace round.
struct MemleakRun {
    elapsed_us: f64,
    /// Hits of its probes (entries, returns and frees), as the script counted them.
    events: u64,
    allocations: u64,
    frees: u64,
}

/// Runs the native section and prints its table.
fn native(args: &BenchArgs, leaktrace: &Path, dir: &Path) -> anyhow::Result<()> {
    if args.native_calls == 0 || args.native_pairs == 0 || args.native_bytes == 0 {
        bail!("--native-calls, --native-pairs and --native-bytes must be at least 1");
    }
    let churn = Churn {
        calls: args.native_calls,
        pairs: args.native_pairs,
        bytes: args.native_bytes,
    };
    // Round 0 starts and halts the node without calls: it warms up, and its hits (node startup
    // and halt, which the timed workload does not include) are subtracted from the others.
    let idle = Churn { calls: 0, ..churn };
    let scratch = shell::workspace_root().join("target/leaktrace-bench/native");
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    if scratch.to_string_lossy().contains(char::is_whitespace) {
        // `bpftrace -c` splits its command line at spaces.
        bail!(
            "the bench directory {} holds whitespace, which `bpftrace -c` cannot take",
            scratch.display()
        );
    }
    which::which("bpftrace")
        .context("bpftrace not found: `cargo xtask setup` installs it (Debian package bpftrace)")?;
    let libc = target_libc()?;
    let script = scratch.join("memleak.bt");
    fs::write(
        &script,
        MEMLEAK_BT.replace(":LIBC:", &format!(":{}:", libc.display())),
    )
    .with_context(|| format!("writing {}", script.display()))?;
    shell::step(&format!(
        "bench --native: {} calls x {} malloc({})+write+free ({} pairs), {} measured rounds after \
         one idle round (0 calls); libc {}",
        churn.calls,
        churn.pairs,
        churn.bytes,
        churn.total(),
        args.rounds,
        libc.display()
    ));
    let (mut plain, mut traced, mut memleak) = (Vec::new(), Vec::new(), Vec::new());
    let mut idle_hits = (0, 0);
    for round in 0..=args.rounds {
        let work = if round == 0 { idle } else { churn };
        let p = churn_untraced(dir, &scratch, work)?;
        let t = churn_under_leaktrace(leaktrace, dir, &scratch, work)?;
        let m = churn_under_memleak(dir, &scratch, &script, work)?;
        eprintln!(
            "    {} untraced {:8.1} ms   leaktrace {:8.1} ms ({} hits, outstanding_full {})   \
             memleak-style {:8.1} ms ({} hits)",
            if round == 0 { "idle    " } else { "measured" },
            p / 1e3,
            t.elapsed_us / 1e3,
            t.events,
            t.outstanding_full,
            m.elapsed_us / 1e3,
            m.events
        );
        if round == 0 {
            idle_hits = (t.events, m.events);
        } else {
            plain.push(p);
            traced.push(t);
            memleak.push(m);
        }
    }

    let plain_ms = median(plain.iter().copied()) / 1e3;
    let rows = [
        (
            "leaktrace --native on",
            median(traced.iter().map(|t| t.elapsed_us)) / 1e3,
            median(traced.iter().map(|t| t.events as f64)) - idle_hits.0 as f64,
        ),
        (
            "memleak-style bpftrace",
            median(memleak.iter().map(|m| m.elapsed_us)) / 1e3,
            median(memleak.iter().map(|m| m.events as f64)) - idle_hits.1 as f64,
        ),
    ];
    // (added ms, µs per event) of each tracer
    let costs: Vec<(f64, f64)> = rows
        .iter()
        .map(|(_, ms, events)| (ms - plain_ms, (ms - plain_ms) * 1e3 / events))
        .collect();
    println!(
        "leaktrace bench --native (lt_churn: {} calls x {} malloc({})+write+free = {:.2} M pairs; \
         medians of {} rounds)",
        churn.calls,
        churn.pairs,
        churn.bytes,
        churn.total() as f64 / 1e6,
        args.rounds
    );
    println!(
        "  {:<24}{:>12}{:>9}{:>12}{:>10}{:>11}{:>11}{:>10}",
        "", "median", "ratio", "added", "events", "events/s", "µs/event", "µs/pair"
    );
    println!(
        "  {:<24}{:>9.1} ms{:>8.3}x{:>12}{:>10}{:>11}{:>11}{:>10}",
        "untraced", plain_ms, 1.0, "—", "—", "—", "—", "—"
    );
    for ((name, ms, events), (added, per_event)) in rows.iter().zip(&costs) {
        println!(
            "  {:<24}{:>9.1} ms{:>8.3}x{:>9.1} ms{:>8.2} M{:>9.2} M{:>11.3}{:>10.3}",
            name,
            ms,
            ms / plain_ms,
            added,
            events / 1e6,
            events / 1e6 / (ms / 1e3),
            per_event,
            added * 1e3 / churn.total() as f64
        );
    }
    println!(
        "  events: probe hits of the timed workload = hits of the run - hits of the idle run \
         (node startup and halt: leaktrace {}, memleak-style {}); leaktrace counts its native_ \
         programs, memleak-style its entry, return and free probes; the workload's own share \
         is 3 a pair ({:.2} M)",
        idle_hits.0,
        idle_hits.1,
        3.0 * churn.total() as f64 / 1e6
    );
    let last = traced.last().context("no measured round")?;
    println!(
        "  leaktrace outstanding map: outstanding_full {} (max of rounds), {} modules, {} \
         outstanding at the end, {} unknown frees (last round)",
        traced.iter().map(|t| t.outstanding_full).max().unwrap_or(0),
        last.modules,
        mib(last.outstanding_bytes.max(0) as u64),
        last.unknown_frees
    );
    println!(
        "  leaktrace attribution: lt_churn.so {} allocations, {} frees (the workload made {} \
         of each; last round)",
        last.churn_allocations,
        last.churn_frees,
        churn.total()
    );
    println!(
        "  leaktrace tracer peak RSS {} (max of rounds), events lost {} (total)",
        mib(traced.iter().map(|t| t.peak_rss).max().unwrap_or(0)),
        traced.iter().map(|t| t.events_lost).sum::<u64>()
    );
    let m_last = memleak.last().context("no measured round")?;
    println!(
        "  memleak-style counted {} allocations, {} non-NULL frees (last round)",
        m_last.allocations, m_last.frees
    );
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    let (lt_added, lt_event) = costs[0];
    let (ml_added, _) = costs[1];
    println!(
        "  target: leaktrace native overhead at most half of memleak-style's: {:.1} ms vs {:.1} ms \
         added ({:.3}x): {}",
        lt_added,
        ml_added,
        lt_added / ml_added,
        verdict(lt_added <= 0.5 * ml_added)
    );
    println!(
        "  target: per-event cost within {FLOOR_TARGET}x of the emulated-trap floor (~{TRAP_FLOOR_US} µs \
         here): {:.3} µs ({:.2}x): {}",
        lt_event,
        lt_event / TRAP_FLOOR_US,
        verdict(lt_event <= FLOOR_TARGET * TRAP_FLOOR_US)
    );
    Ok(())
}

/// The libc beam.smp links (`ldd` on the emulator of the `erl` on PATH).
fn target_libc() -> anyhow::Result<std::path::PathBuf> {
    let out = shell::output(Command::new("erl").args([
        "-noshell",
        "-eval",
        "io:format(\"~s/erts-~s/bin/beam.smp\", [code:root_dir(), erlang:system_info(version)]), \
         halt().",
    ]))?;
    let beam = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || !Path::new(&beam).is_file() {
        bail!("`erl` did not name its beam.smp (got {beam:?})");
    }
    let out = shell::output(Command::new("ldd").arg(&beam))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let libc = text
        .lines()
        .filter_map(|l| l.trim().split_once(" => "))
        .find(|(name, _)| name.starts_with("libc.so"))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .with_context(|| format!("`ldd {beam}` names no libc: {text}"))?;
    fs::canonicalize(libc).with_context(|| format!("resolving {libc}"))
}

fn churn_untraced(dir: &Path, scratch: &Path, churn: Churn) -> anyhow::Result<f64> {
    let out = scratch.join("untraced.us");
    let _ = fs::remove_file(&out);
    let status = fixtures::erl(dir, &[], &churn.eval(&out))
        .stdin(Stdio::null())
        .status()
        .context("running the untraced native workload")?;
    if !status.success() {
        bail!("the untraced native workload failed ({status})");
    }
    elapsed(&out)
}

fn churn_under_leaktrace(
    leaktrace: &Path,
    dir: &Path,
    scratch: &Path,
    churn: Churn,
) -> anyhow::Result<NativeRun> {
    let out = scratch.join("leaktrace.us");
    let _ = fs::remove_file(&out);
    let report_dir = scratch.join("report");
    let erl = fixtures::erl(dir, &[], &churn.eval(&out));
    let mut cmd = Command::new(leaktrace);
    cmd.args([
        "run",
        "--native",
        "on",
        "--no-vm",
        "--quiet",
        "--duration",
        "1h",
        "--out",
    ])
    .arg(&report_dir)
    .arg("--")
    .arg(erl.get_program())
    .args(erl.get_args())
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    let status = cmd.status().context("running leaktrace")?;
    // Verdicts exit 0, 1 or 3; 2 is an error.
    if status.code() == Some(2) || status.code().is_none() {
        bail!("`{}` failed ({status})", shell::show(&cmd));
    }
    let text = fs::read_to_string(report_dir.join("report.json"))
        .context("reading the native bench report")?;
    let report: serde_json::Value =
        serde_json::from_str(&text).context("parsing the native bench report")?;
    let mut hits = std::collections::BTreeMap::<&str, u64>::new();
    for probe in report["probes"].as_array().into_iter().flatten() {
        if let Some(name) = probe["name"].as_str().filter(|n| n.starts_with("native_")) {
            let h = probe["hits"].as_u64().unwrap_or(0);
            let max = hits.entry(name).or_default();
            *max = (*max).max(h);
        }
    }
    if hits.is_empty() {
        bail!(
            "`{}` reported no native_ probes (report {})",
            shell::show(&cmd),
            report_dir.join("report.json").display()
        );
    }
    let native = &report["native"];
    let modules = native["modules"].as_array().map_or(&[][..], Vec::as_slice);
    let churn_module = modules
        .iter()
        .filter(|m| m["module"].as_str() == Some("lt_churn.so"));
    let (churn_allocations, churn_frees) = churn_module.fold((0, 0), |(a, f), m| {
        (
            a + m["allocations"].as_u64().unwrap_or(0),
            f + m["frees"].as_u64().unwrap_or(0),
        )
    });
    Ok(NativeRun {
        elapsed_us: elapsed(&out)?,
        events: hits.values().sum(),
        outstanding_full: native["outstanding_full"].as_u64().unwrap_or(0),
        modules: modules.len(),
        outstanding_bytes: modules
            .iter()
            .filter_map(|m| m["outstanding_bytes"].as_i64())
            .sum(),
        unknown_frees: native["unknown_frees"].as_u64().unwrap_or(0),
        churn_allocations,
        churn_frees,
        peak_rss: report["tracer"]["peak_rss"].as_u64().unwrap_or(0),
        events_lost: report["losses"]["events_lost"].as_u64().unwrap_or(0),
    })
}

/// Runs the workload under the memleak-style script: `bpftrace -c` starts the node itself once
/// its probes are attached, through a shell script that execs `erl` (the node keeps that PID).
fn churn_under_memleak(
    dir: &Path,
    scratch: &Path,
    script: &Path,
    churn: Churn,
) -> anyhow::Result<MemleakRun> {
    let out = scratch.join("memleak.us");
    let _ = fs::remove_file(&out);
    let erl = fixtures::erl(dir, &[], &churn.eval(&out));
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"));
    let line = std::iter::once(erl.get_program())
        .chain(erl.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ");
    let node = scratch.join("memleak-node.sh");
    fs::write(&node, format!("#!/bin/sh\nexec {line}\n"))
        .with_context(|| format!("writing {}", node.display()))?;
    let mut cmd = Command::new("bpftrace");
    cmd.args(["-f", "json", "-c"])
        .arg(format!("/bin/sh {}", node.display()))
        .arg(script)
        .env("BPFTRACE_MAP_KEYS_MAX", BPFTRACE_MAP_KEYS.to_string())
        .stdin(Stdio::null());
    let output = shell::output(&mut cmd)?;
    if !output.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            shell::show(&cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    // One JSON object a line; the maps come as {"type": "map", "data": {"@name": value}}.
    let (mut events, mut allocations, mut frees) = (0, 0, 0);
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["type"] != "map" {
            continue;
        }
        let data = &v["data"];
        if let Some(hits) = data["@hits"].as_object() {
            events = hits.values().filter_map(serde_json::Value::as_u64).sum();
        }
        if let Some(n) = data["@allocations"].as_u64() {
            allocations = n;
        }
        if let Some(n) = data["@frees"].as_u64() {
            frees = n;
        }
    }
    if events == 0 {
        bail!(
            "`{}` counted no probe hits: {}",
            shell::show(&cmd),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(MemleakRun {
        elapsed_us: elapsed(&out).with_context(|| {
            format!(
                "under `{}`: {}",
                shell::show(&cmd),
                String::from_utf8_lossy(&output.stderr).trim()
            )
        })?,
        events,
        allocations,
        frees,
    })
}
