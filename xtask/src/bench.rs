//! `cargo xtask bench`: tracing overhead on a fixed BEAM workload. The same workload runs
//! untraced and under `leaktrace run`, alternating round by round, and medians are compared.
use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
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
    Ok(())
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
