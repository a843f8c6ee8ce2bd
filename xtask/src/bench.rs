//! `cargo xtask bench`: tracing overhead on a fixed BEAM workload. The same workload runs
//! untraced and under `leaktrace run`, alternating round by round, and medians are compared.
//! Then the VM view's own cost: one-shot censuses and a traced run against a node holding many
//! idle processes, measured as the node's CPU time above its idle rate.
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
