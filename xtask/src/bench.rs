//! `cargo xtask bench`: tracing overhead on a fixed BEAM workload. The same workload runs
//! untraced and under `leaktrace run`, alternating round by round, and medians are compared.
//! Then the VM view's own cost: one-shot censuses and a traced run against a node holding many
//! idle processes, measured as the node's CPU time above its idle rate.
//! `--native` measures the native (libc) probes instead, against a memleak-style bpftrace script.
//! `--soak` holds a paced carrier and NIF API churn under `leaktrace attach` for minutes and
//! checks what a long run costs: rate held, losses, tracer memory, time to the report.
use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
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
    /// Run the soak instead (only this section runs): a node churning carriers and NIF API
    /// allocations at `--soak-rate` probe events/s under `leaktrace attach --native on`.
    #[arg(long)]
    soak: bool,
    /// Soak: minutes traced.
    #[arg(long, default_value_t = 10)]
    soak_minutes: u32,
    /// Soak: carrier plus NIF API probe events a second the workload drives, half each.
    #[arg(long, default_value_t = 100_000)]
    soak_rate: u32,
    /// Measure the block probes instead (only this section runs): the workload untraced,
    /// under `--blocks` and under `--blocks sampled`, side by side round by round.
    #[arg(long)]
    blocks: bool,
    /// Blocks: workload rounds per node run (long enough for several sampling windows).
    #[arg(long, default_value_t = 12_000)]
    blocks_work: u32,
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
    if args.native && args.soak {
        bail!("--native and --soak are separate benches: run one at a time");
    }
    let leaktrace = release_binary()?;
    let dir = fixtures::build()?;
    if args.native {
        return native(args, &leaktrace, &dir);
    }
    if args.soak {
        return soak(args, &leaktrace, &dir);
    }
    if args.blocks {
        return blocks(args, &leaktrace, &dir);
    }
    let scratch = fixtures::target_dir().join("leaktrace-bench");
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

/// Builds the release binary and returns it from the target directory that build used
/// (`CARGO_TARGET_DIR` honoured: `setup::build_release` names `target/release` whatever it is).
fn release_binary() -> anyhow::Result<PathBuf> {
    setup::build_release()?;
    let bin = fixtures::target_dir().join("release/leaktrace");
    if !bin.is_file() {
        bail!(
            "the release build left no {}: is CARGO_TARGET_DIR the same as for the build? \
             (`cargo build --release -p leaktrace`)",
            bin.display()
        );
    }
    eprintln!("    measuring {}", bin.display());
    Ok(bin)
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
    stat_cpu_s(Path::new(&format!("/proc/{pid}/stat")))
}

/// CPU seconds (user + system) of a `stat` file of /proc: a process's, or a thread's
/// (/proc/PID/task/TID/stat; /proc/TID/stat would give the whole process).
fn stat_cpu_s(path: &Path) -> anyhow::Result<f64> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let path = path.display();
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
    Ok(under_leaktrace_with(leaktrace, dir, scratch, work, &[])?.0)
}

/// One `leaktrace run` of the workload with `extra` options; also returns its report.json.
fn under_leaktrace_with(
    leaktrace: &Path,
    dir: &Path,
    scratch: &Path,
    work: u32,
    extra: &[&str],
) -> anyhow::Result<(Traced, serde_json::Value)> {
    let out = scratch.join("traced.us");
    let _ = fs::remove_file(&out);
    let report_dir = scratch.join("report");
    let erl = fixtures::erl(dir, &[], &eval(work, &out));
    let mut cmd = Command::new(leaktrace);
    cmd.args(["run", "--no-vm", "--quiet", "--duration", "1h"])
        .args(extra)
        .arg("--out")
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
    let traced = Traced {
        elapsed_us: elapsed(&out)?,
        hits_per_s: if duration > 0.0 {
            hits as f64 / duration
        } else {
            0.0
        },
        peak_rss: report["tracer"]["peak_rss"].as_u64().unwrap_or(0),
        events_lost: report["losses"]["events_lost"].as_u64().unwrap_or(0),
    };
    Ok((traced, report))
}

/// Block probe hits of a report (every `block_*` program). A program serving several symbols
/// (the `_thr_pref`, `_thr_spec` and `_ts` variants) has one hit counter, shown on each of its
/// rows: counted once.
fn block_hits(report: &serde_json::Value) -> u64 {
    let mut by_program = std::collections::BTreeMap::new();
    for p in report["probes"].as_array().into_iter().flatten() {
        if let Some(name) = p["name"].as_str().filter(|n| n.starts_with("block_")) {
            by_program.insert(name.to_owned(), p["hits"].as_u64().unwrap_or(0));
        }
    }
    by_program.values().sum()
}

/// `--blocks`: the workload untraced, under `--blocks` and under `--blocks sampled`, one
/// after the other each round; medians, ratios and the cost of one block probe hit.
fn blocks(args: &BenchArgs, leaktrace: &Path, dir: &Path) -> anyhow::Result<()> {
    let scratch = fixtures::target_dir().join("leaktrace-bench");
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let work = args.blocks_work;
    shell::step(&format!(
        "bench --blocks: workload of {work} churn rounds, {} measured rounds after one warm-up round (untraced, --blocks, --blocks sampled)",
        args.rounds
    ));
    let modes: [(&str, &[&str]); 2] = [
        (
            "full",
            &["--blocks", "--max-overhead", "200", "--native", "off"],
        ),
        (
            "sampled",
            &[
                "--blocks",
                "sampled",
                "--max-overhead",
                "200",
                "--native",
                "off",
            ],
        ),
    ];
    let mut plain = Vec::new();
    let mut runs: Vec<Vec<(f64, u64, String)>> = vec![Vec::new(); modes.len()];
    for round in 0..=args.rounds {
        let p = untraced(dir, &scratch, work)?;
        let mut line = format!(
            "    {} untraced {:9.1} ms",
            if round == 0 { "warm-up " } else { "measured" },
            p / 1e3
        );
        for (i, (name, extra)) in modes.iter().enumerate() {
            let (t, report) = under_leaktrace_with(leaktrace, dir, &scratch, work, extra)?;
            let hits = block_hits(&report);
            line += &format!(
                "   {name} {:9.1} ms ({hits} block hits)",
                t.elapsed_us / 1e3
            );
            if round > 0 {
                let sampling = report["blocks"]["sampling"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                runs[i].push((t.elapsed_us, hits, sampling));
            }
        }
        eprintln!("{line}");
        if round > 0 {
            plain.push(p);
        }
    }
    let plain_median = median(plain.iter().copied());
    println!(
        "leaktrace bench --blocks ({} rounds, workload {work} rounds of lt_bench churn, --no-vm --native off)",
        args.rounds
    );
    println!("  median untraced          {:10.1} ms", plain_median / 1e3);
    for ((name, _), r) in modes.iter().zip(&runs) {
        let traced = median(r.iter().map(|x| x.0));
        let hits = median(r.iter().map(|x| x.1 as f64));
        let cost_us = if hits > 0.0 {
            (traced - plain_median) / hits
        } else {
            0.0
        };
        println!(
            "  --blocks {name:<8} median {:10.1} ms   ratio {:6.3}   block probe hits {:10.0}   {:5.2} µs of workload time a hit",
            traced / 1e3,
            traced / plain_median,
            hits,
            cost_us
        );
    }
    if let Some(s) = runs.get(1).and_then(|r| r.last()).map(|x| x.2.clone())
        && !s.is_empty()
    {
        println!("  sampled mode: {s}");
    }
    println!(
        "  targets: full well under the 6.3x of one event per call; sampled <= 1.10x (see the ratios)"
    );
    Ok(())
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
    let scratch = fixtures::target_dir().join("leaktrace-bench/native");
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
        // The full cost of attribution is what this bench measures: the budget that would
        // detach the probes on this workload is lifted.
        "--max-overhead",
        "200",
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

// `--soak`: a paced carrier and NIF API churn traced for minutes. What a long run costs: the
// rate held, what was lost, whether the tracer's memory stays flat, how soon the report is out.

/// Largest share of probe events a soak may lose (ring buffer, pending map, native outstanding
/// and site maps, probe errors) at or below its rate.
const SOAK_MAX_LOSS: f64 = 1e-3;
/// Share of `--soak-rate` the carrier plus NIF API probe hits must reach: below it the run says
/// nothing about that rate.
const SOAK_MIN_RATE: f64 = 0.9;
/// Tracer memory is bounded when its RSS peak over the second half of the trace is at most its
/// peak over the first half plus SOAK_RSS_MARGIN_MIB, plus SOAK_RSS_RECORDING_KIB for each
/// second of the second half: the recording keeps every interval's sample, VM figures and
/// native series by design (about 5 KB a second in report.json at a 1 s interval). A per-event
/// leak of even one byte shows at 10^5 events/s as 6 MB a minute.
const SOAK_RSS_MARGIN_MIB: f64 = 8.0;
const SOAK_RSS_RECORDING_KIB: f64 = 8.0;
/// Most seconds from SIGTERM to report.json written.
const SOAK_REPORT_LIMIT_S: f64 = 10.0;
/// Probe hits a workload pair makes: entry, return and release (mseg alloc, its return and
/// dealloc; enif_alloc, its return and enif_free).
const HITS_PER_PAIR: u32 = 3;
/// How often the tracer's memory and both processes' CPU time are read.
const SOAK_POLL: Duration = Duration::from_secs(1);
/// How often the bench looks whether the tracer has exited (the resolution of the end timing).
const SOAK_TICK: Duration = Duration::from_millis(20);
/// How long leaktrace may take to end after SIGTERM before the bench kills it and fails.
const SOAK_END_LIMIT: Duration = Duration::from_secs(120);
/// Name prefixes of the carrier probe programs (`CARRIER_PROBES` in leaktrace/src/probes.rs);
/// NIF API programs start with `nif_`, libc ones with `native_`.
const CARRIER_PROGRAMS: &[&str] = &[
    "mseg_",
    "mmap",
    "munmap",
    "mremap",
    "sys_aligned_",
    "literal_",
];

/// One reading of the soak, `t_s` seconds after the tracer was started.
struct SoakPoll {
    t_s: f64,
    /// The tracer's VmRSS and VmHWM (bytes).
    rss: u64,
    hwm: u64,
    /// CPU seconds used so far by the tracer and by the node.
    tracer_cpu: f64,
    node_cpu: f64,
    /// Taken after the SIGTERM: the report is being written.
    closing: bool,
}

/// The workload's own count (`lt_soak` status file): totals since it started.
#[derive(Clone, Copy, Default)]
struct WorkloadCount {
    t_s: f64,
    carrier_pairs: u64,
    nif_pairs: u64,
    /// Carrier pairs the workload could not make in time and made up with NIF API pairs.
    handed: u64,
    /// The VM's own count of erts_mseg_alloc_opt calls (all threads).
    vm_mseg_allocs: u64,
}

impl WorkloadCount {
    fn read(file: &Path) -> Option<WorkloadCount> {
        let text = fs::read_to_string(file).ok()?;
        let mut f = text.split_whitespace();
        Some(WorkloadCount {
            t_s: f.next()?.parse().ok()?,
            carrier_pairs: f.next()?.parse().ok()?,
            nif_pairs: f.next()?.parse().ok()?,
            handed: f.next()?.parse().ok()?,
            vm_mseg_allocs: f.next()?.parse().ok()?,
        })
    }
}

/// Probe hits of a report by family. A program listed for several symbols shares one counter,
/// so each program counts once, with the largest figure listed for it.
#[derive(Default)]
struct Hits {
    /// Of which `mseg_alloc` (entries of erts_mseg_alloc_opt), to set beside the VM's count.
    mseg_alloc: u64,
    carrier: u64,
    nif_api: u64,
    libc: u64,
    other: u64,
}

impl Hits {
    fn of(report: &serde_json::Value) -> Hits {
        let mut by_program = std::collections::BTreeMap::<&str, u64>::new();
        for probe in report["probes"].as_array().into_iter().flatten() {
            if let Some(name) = probe["name"].as_str() {
                let hits = probe["hits"].as_u64().unwrap_or(0);
                let max = by_program.entry(name).or_default();
                *max = (*max).max(hits);
            }
        }
        let mut h = Hits {
            mseg_alloc: by_program.get("mseg_alloc").copied().unwrap_or(0),
            ..Hits::default()
        };
        for (name, hits) in by_program {
            let family = if name.starts_with("nif_") {
                &mut h.nif_api
            } else if name.starts_with("native_") {
                &mut h.libc
            } else if CARRIER_PROGRAMS.iter().any(|p| name.starts_with(p)) {
                &mut h.carrier
            } else {
                &mut h.other
            };
            *family += hits;
        }
        h
    }

    fn total(&self) -> u64 {
        self.carrier + self.nif_api + self.libc + self.other
    }
}

/// Whether the tracer's memory stayed flat: RSS peaks over the two halves of the trace (polls
/// before the SIGTERM), the allowed margin, and the least-squares slope over the second half.
struct Boundedness {
    first_peak: u64,
    second_peak: u64,
    margin: u64,
    slope_bytes_per_min: f64,
}

impl Boundedness {
    fn of(polls: &[SoakPoll], traced_s: f64) -> Option<Boundedness> {
        let half = traced_s / 2.0;
        let tracing = polls.iter().filter(|p| !p.closing);
        let first_peak = tracing
            .clone()
            .filter(|p| p.t_s < half)
            .map(|p| p.rss)
            .max()?;
        let second: Vec<&SoakPoll> = tracing.filter(|p| p.t_s >= half).collect();
        let second_peak = second.iter().map(|p| p.rss).max()?;
        let margin = (SOAK_RSS_MARGIN_MIB * 1024.0 * 1024.0
            + SOAK_RSS_RECORDING_KIB * 1024.0 * (traced_s - half)) as u64;
        let n = second.len() as f64;
        let (mt, mr) = (
            second.iter().map(|p| p.t_s).sum::<f64>() / n,
            second.iter().map(|p| p.rss as f64).sum::<f64>() / n,
        );
        let (num, den) = second.iter().fold((0.0, 0.0), |(num, den), p| {
            (
                num + (p.t_s - mt) * (p.rss as f64 - mr),
                den + (p.t_s - mt).powi(2),
            )
        });
        Some(Boundedness {
            first_peak,
            second_peak,
            margin,
            slope_bytes_per_min: if den > 0.0 { num / den * 60.0 } else { 0.0 },
        })
    }

    fn bounded(&self) -> bool {
        self.second_peak <= self.first_peak + self.margin
    }
}

/// The tracer, killed if the bench gives up on it, so no leaktrace outlives the bench.
struct TracerProcess(std::process::Child);

impl Drop for TracerProcess {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// CPU seconds so far of each normal scheduler thread of `pid` (threads named `N_scheduler`),
/// by N: whether the churn keeps every scheduler busy, not one.
fn scheduler_cpu(pid: u32) -> std::collections::BTreeMap<u32, f64> {
    let mut by_scheduler = std::collections::BTreeMap::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_scheduler;
    };
    for task in tasks.filter_map(Result::ok) {
        let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if let Some(n) = comm
            .trim()
            .strip_suffix("_scheduler")
            .and_then(|n| n.parse::<u32>().ok())
            && let Ok(cpu) = stat_cpu_s(&task.path().join("stat"))
        {
            by_scheduler.insert(n, cpu);
        }
    }
    by_scheduler
}

/// A field of /proc/PID/status in kB (`VmRSS`, `VmHWM`), in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

/// Runs the soak and prints its figures; fails when a target is not met.
fn soak(args: &BenchArgs, leaktrace: &Path, dir: &Path) -> anyhow::Result<()> {
    if args.soak_minutes == 0 {
        bail!("--soak-minutes must be at least 1");
    }
    // Half the rate each for carrier and NIF API pairs of 3 hits.
    let pairs = args.soak_rate / 2 / HITS_PER_PAIR;
    if pairs == 0 {
        bail!(
            "--soak-rate must be at least {} (two kinds of {HITS_PER_PAIR}-hit pairs)",
            2 * HITS_PER_PAIR
        );
    }
    let traced = Duration::from_secs(60 * u64::from(args.soak_minutes));
    let scratch = fixtures::target_dir().join("leaktrace-bench/soak");
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let report_dir = scratch.join("report");
    let status_file = scratch.join("workload.status");
    for stale in [&report_dir, &status_file] {
        let _ = fs::remove_dir_all(stale);
        let _ = fs::remove_file(stale);
    }
    // A name of its own: other nodes of this machine (tests, other benches) keep theirs.
    let name = format!("lt_soak_{}", std::process::id());
    shell::step(&format!(
        "bench --soak: node {name} churning {pairs} carrier pairs/s (process heaps and binaries \
         above the single-block carrier threshold) and {pairs} enif_alloc/enif_free pairs/s, \
         traced {} min",
        args.soak_minutes
    ));
    let node = fixtures::Node::start(fixtures::erl(
        dir,
        &["-sname", &name],
        &format!(
            "lt_soak:run({pairs}, {pairs}, \"{}\").",
            status_file.display()
        ),
    ))
    .context("starting the soak node")?;
    let pid = node.pid();
    wait_registered(&name)?;
    // The trace starts on a churn already running: two status lines (2 s) first.
    let deadline = Instant::now() + Duration::from_secs(30);
    while WorkloadCount::read(&status_file).is_none_or(|c| c.t_s < 2.0) {
        if Instant::now() > deadline {
            bail!(
                "the soak workload wrote no status to {} within 30 s: does `lt_soak:run/3` \
                 run? (start it by hand: erl -pa {} -eval 'lt_soak:run(10, 10, \"/tmp/s\")')",
                status_file.display(),
                dir.display()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }

    let mut cmd = Command::new(leaktrace);
    cmd.args([
        "attach",
        "--pid",
        &pid.to_string(),
        "--native",
        "on",
        // A guard only: the bench ends the run with SIGTERM after --soak-minutes.
        "--duration",
        &format!("{}m", args.soak_minutes + 5),
        "--interval",
        "1s",
        "--out",
    ])
    .arg(&report_dir)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    eprintln!("    $ {}", shell::show(&cmd));
    let node_cpu0 = cpu_s(pid)?;
    let schedulers0 = scheduler_cpu(pid);
    let count0 = WorkloadCount::read(&status_file).unwrap_or_default();
    let t0 = Instant::now();
    let mut tracer = TracerProcess(
        cmd.spawn()
            .with_context(|| format!("running `{}`", shell::show(&cmd)))?,
    );
    let tracer_pid = tracer.0.id();
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(tracer.0.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(tracer.0.stderr.take().map(|p| Box::new(p) as _));

    let mut polls: Vec<SoakPoll> = Vec::new();
    // (when, wall clock, the workload's count) at the SIGTERM.
    let mut term: Option<(Instant, std::time::SystemTime, WorkloadCount)> = None;
    let mut next_poll = t0;
    let mut next_progress = t0 + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = tracer.0.try_wait().context("waiting for the tracer")? {
            break status;
        }
        let now = Instant::now();
        if term.is_none() && now - t0 >= traced {
            let count = WorkloadCount::read(&status_file).unwrap_or_default();
            shell::run(Command::new("kill").args(["-TERM", &tracer_pid.to_string()]))?;
            term = Some((now, std::time::SystemTime::now(), count));
        }
        if let Some((at, ..)) = term
            && now - at > SOAK_END_LIMIT
        {
            bail!(
                "`{}` had not exited {} s after SIGTERM: killed it (report {})",
                shell::show(&cmd),
                SOAK_END_LIMIT.as_secs(),
                report_dir.display()
            );
        }
        if now >= next_poll {
            next_poll += SOAK_POLL;
            // The tracer may exit between try_wait and these reads: a missing reading is skipped.
            let rss = proc_status_bytes(tracer_pid, "VmRSS");
            let hwm = proc_status_bytes(tracer_pid, "VmHWM");
            let tracer_cpu = cpu_s(tracer_pid).ok();
            if let (Some(rss), Some(hwm), Some(tracer_cpu)) = (rss, hwm, tracer_cpu) {
                polls.push(SoakPoll {
                    t_s: (now - t0).as_secs_f64(),
                    rss,
                    hwm,
                    tracer_cpu,
                    node_cpu: cpu_s(pid)?,
                    closing: term.is_some(),
                });
            }
        }
        if now >= next_progress
            && let Some(p) = polls.last()
        {
            next_progress += Duration::from_secs(60);
            let count = WorkloadCount::read(&status_file).unwrap_or_default();
            let span = (count.t_s - count0.t_s).max(1e-9);
            eprintln!(
                "    {:4.0} s: tracer RSS {} (VmHWM {}), CPU {:.1}% of one core; node CPU {:.1}%; \
                 workload {:.0} carrier + {:.0} NIF API pairs/s",
                p.t_s,
                mib(p.rss),
                mib(p.hwm),
                p.tracer_cpu / p.t_s * 100.0,
                (p.node_cpu - node_cpu0) / p.t_s * 100.0,
                (count.carrier_pairs - count0.carrier_pairs) as f64 / span,
                (count.nif_pairs - count0.nif_pairs) as f64 / span,
            );
        }
        thread::sleep(SOAK_TICK);
    };
    let exited = Instant::now();
    let _ = stdout.join();
    let stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
    let Some((term_at, term_wall, count1)) = term else {
        bail!(
            "`{}` ended after {:.1} s, before the soak's {} min ({status}): {}",
            shell::show(&cmd),
            (exited - t0).as_secs_f64(),
            args.soak_minutes,
            stderr.trim()
        );
    };
    // Verdicts exit 0, 1 or 3; 2 is an error.
    if status.code() == Some(2) || status.code().is_none() {
        bail!(
            "`{}` failed ({status}): {}",
            shell::show(&cmd),
            stderr.trim()
        );
    }
    let node_cpu1 = cpu_s(pid)?;
    let schedulers1 = scheduler_cpu(pid);
    drop(node);

    let report_path = report_dir.join("report.json");
    if !report_path.is_file() {
        bail!(
            "`{}` wrote no {}: {}",
            shell::show(&cmd),
            report_path.display(),
            stderr.trim()
        );
    }
    // The bundle is written when its last file is: the newest modification time in it.
    let written = fs::read_dir(&report_dir)
        .with_context(|| format!("listing {}", report_dir.display()))?
        .filter_map(|e| e.ok()?.metadata().ok()?.modified().ok())
        .max()
        .with_context(|| {
            format!(
                "no file of {} has a modification time",
                report_dir.display()
            )
        })?;
    let text = fs::read_to_string(&report_path)
        .with_context(|| format!("reading {}", report_path.display()))?;
    let report: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", report_path.display()))?;
    let duration_s = report["duration_s"].as_f64().unwrap_or(0.0);
    if duration_s <= 0.0 {
        bail!("{} gives no duration_s", report_path.display());
    }
    let hits = Hits::of(&report);
    let losses = &report["losses"];
    let native = &report["native"];
    let lost_named = [
        ("events_lost", losses["events_lost"].as_u64()),
        ("map_full", losses["map_full"].as_u64()),
        ("probe_errors", losses["probe_errors"].as_u64()),
        (
            "native outstanding_full",
            native["outstanding_full"].as_u64(),
        ),
        ("native sites_full", native["sites_full"].as_u64()),
    ];
    let lost: u64 = lost_named.iter().filter_map(|(_, n)| *n).sum();
    let unreadable: Vec<&str> = losses["unreadable"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
        .collect();
    let loss_share = lost as f64 / hits.total().max(1) as f64;
    let rate = (hits.carrier + hits.nif_api) as f64 / duration_s;
    let lt_native = native["modules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["module"].as_str() == Some("lt_native.so"))
        .fold((0, 0, 0), |(a, f, b), m| {
            (
                a + m["allocations"].as_u64().unwrap_or(0),
                f + m["frees"].as_u64().unwrap_or(0),
                b + m["outstanding_bytes"].as_i64().unwrap_or(0),
            )
        });
    let span = (count1.t_s - count0.t_s).max(1e-9);
    let bounded = Boundedness::of(&polls, (term_at - t0).as_secs_f64());
    let tracing: Vec<&SoakPoll> = polls.iter().filter(|p| !p.closing).collect();
    let at_10s = tracing.iter().find(|p| p.t_s >= 10.0).or(tracing.first());
    let last = tracing.last();
    let hwm = polls.iter().map(|p| p.hwm).max().unwrap_or(0);
    let tracer_cpu = last.map_or(0.0, |p| p.tracer_cpu);
    let to_report = written
        .duration_since(term_wall)
        .map_or(0.0, |d| d.as_secs_f64());
    let to_exit = (exited - term_at).as_secs_f64();
    let verdict = report["verdict"]["kind"].as_str().unwrap_or("?");
    let verdict_summary = report["verdict"]["summary"].as_str().unwrap_or("");
    let degraded: Vec<&str> = report["verdict"]["degraded"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
        .collect();
    let met = |ok: bool| if ok { "met" } else { "NOT met" };

    println!(
        "leaktrace bench --soak ({} min asked at {} carrier + NIF API events/s, half each; \
         `leaktrace attach --native on --interval 1s`, ended by SIGTERM)",
        args.soak_minutes, args.soak_rate
    );
    println!(
        "  traced           {duration_s:.1} s ({:.1} s from start to SIGTERM; end: {})",
        (term_at - t0).as_secs_f64(),
        report["end"].as_str().unwrap_or("?")
    );
    println!(
        "  workload         {:.0} carrier pairs/s ({} handed to NIF calls), {:.0} NIF API \
         pairs/s; node CPU {:.1}% of one core ({} cores; schedulers {})",
        (count1.carrier_pairs - count0.carrier_pairs) as f64 / span,
        count1.handed - count0.handed,
        (count1.nif_pairs - count0.nif_pairs) as f64 / span,
        (node_cpu1 - node_cpu0) / (exited - t0).as_secs_f64() * 100.0,
        std::thread::available_parallelism().map_or(0, usize::from),
        schedulers1
            .iter()
            .map(|(n, cpu)| format!(
                "{n}: {:.1}%",
                (cpu - schedulers0.get(n).copied().unwrap_or(0.0)) / (exited - t0).as_secs_f64()
                    * 100.0
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  cross-check      erts_mseg_alloc_opt calls/s: the VM counted {:.0}, the probes {:.0}",
        (count1.vm_mseg_allocs - count0.vm_mseg_allocs) as f64 / span,
        hits.mseg_alloc as f64 / duration_s
    );
    println!(
        "  events/s         carrier {:.0} + NIF API {:.0} = {rate:.0} (target >= {:.0}: {}); \
         besides: libc {:.0}, other {:.0}",
        hits.carrier as f64 / duration_s,
        hits.nif_api as f64 / duration_s,
        SOAK_MIN_RATE * f64::from(args.soak_rate),
        met(rate >= SOAK_MIN_RATE * f64::from(args.soak_rate)),
        hits.libc as f64 / duration_s,
        hits.other as f64 / duration_s,
    );
    println!(
        "  losses           {} = {lost} of {:.1} M events, {:.4}% (limit {:.1}%: {}){}",
        lost_named
            .iter()
            .map(|(n, v)| format!("{n} {}", v.map_or("—".to_owned(), |v| v.to_string())))
            .collect::<Vec<_>>()
            .join(", "),
        hits.total() as f64 / 1e6,
        loss_share * 100.0,
        SOAK_MAX_LOSS * 100.0,
        met(loss_share <= SOAK_MAX_LOSS && unreadable.is_empty()),
        if unreadable.is_empty() {
            String::new()
        } else {
            format!("; unreadable: {}", unreadable.join(", "))
        }
    );
    println!(
        "  not losses       missed_entries {} (returns whose entry came before attach), \
         stale_calls {}, unknown_frees {} carrier + {} native (freed, allocated before attach)",
        losses["missed_entries"],
        native["stale_calls"],
        losses["unknown_frees"],
        native["unknown_frees"]
    );
    println!(
        "  attribution      lt_native.so: {} allocations, {} frees, {} bytes outstanding at \
         the end (the workload made {:.0} NIF API pairs while traced)",
        lt_native.0,
        lt_native.1,
        lt_native.2,
        (count1.nif_pairs - count0.nif_pairs) as f64 * duration_s / span
    );
    println!(
        "  tracer memory    RSS {} at 10 s, {} at SIGTERM; peak VmHWM {} (report: peak_rss {})",
        at_10s.map_or("—".to_owned(), |p| mib(p.rss)),
        last.map_or("—".to_owned(), |p| mib(p.rss)),
        mib(hwm),
        mib(report["tracer"]["peak_rss"].as_u64().unwrap_or(0))
    );
    match &bounded {
        Some(b) => println!(
            "  bounded          RSS peak first half {}, second half {} (allowed {} more), \
             second-half slope {:+.1} KiB/min: {}",
            mib(b.first_peak),
            mib(b.second_peak),
            mib(b.margin),
            b.slope_bytes_per_min / 1024.0,
            met(b.bounded())
        ),
        None => println!("  bounded          not measured (too few readings): NOT met"),
    }
    println!(
        "  tracer CPU       {:.1}% of one core, {:.2} µs per event ({} events through the ring \
         buffer)",
        tracer_cpu / duration_s * 100.0,
        tracer_cpu * 1e6 / hits.total().max(1) as f64,
        report["tracer"]["events"]
    );
    println!(
        "  end of run       SIGTERM -> report bundle written {to_report:.2} s (limit \
         {SOAK_REPORT_LIMIT_S:.0} s: {}), -> exit {to_exit:.2} s",
        met(to_report <= SOAK_REPORT_LIMIT_S)
    );
    println!(
        "  verdict          {verdict} (balanced churn, expected healthy: {}): {verdict_summary}",
        met(verdict == "healthy")
    );
    for reason in &degraded {
        println!("  degraded         {reason}");
    }

    let mut failed = Vec::new();
    if rate < SOAK_MIN_RATE * f64::from(args.soak_rate) {
        failed.push(format!(
            "the rate was not held ({rate:.0} events/s): is the machine overloaded? \
             try a lower --soak-rate"
        ));
    }
    if loss_share > SOAK_MAX_LOSS || !unreadable.is_empty() {
        failed.push(format!(
            "{:.4}% of events lost (limit {:.1}%){}",
            loss_share * 100.0,
            SOAK_MAX_LOSS * 100.0,
            if unreadable.is_empty() {
                String::new()
            } else {
                format!(", counters unreadable: {}", unreadable.join(", "))
            }
        ));
    }
    if !bounded.as_ref().is_some_and(Boundedness::bounded) {
        failed.push("tracer memory grew in the second half".into());
    }
    if to_report > SOAK_REPORT_LIMIT_S {
        failed.push(format!("the report took {to_report:.1} s after SIGTERM"));
    }
    if verdict != "healthy" {
        failed.push(format!("the verdict was {verdict}, not healthy"));
    }
    if !failed.is_empty() {
        bail!(
            "soak targets not met: {} (report {})",
            failed.join("; "),
            report_dir.display()
        );
    }
    Ok(())
}
