//! `cargo xtask demo`: a node whose NIF leaks malloc memory, traced by the release binary.
use std::{fs, thread, time::Duration};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{fixtures, setup, shell};

/// Options of the demo.
#[derive(Args)]
pub struct DemoArgs {
    /// How long to trace the demo node.
    #[arg(long, default_value = "20s")]
    duration: String,
    /// KiB the demo NIF leaks every 100 ms.
    #[arg(long, default_value_t = 512)]
    leak_kib: u64,
}

/// Builds, starts the leaking node, attaches, prints the verdict; fails unless it is native_leak.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let leaktrace = setup::build_release()?;
    let dir = fixtures::build()?;
    let name = format!("leaktrace_demo_{}", std::process::id());
    let eval = format!("lt_load:leak_forever({}, 100).", args.leak_kib * 1024);
    shell::step(&format!(
        "starting demo node {name}: its NIF mallocs {} KiB every 100 ms and never frees it",
        args.leak_kib
    ));
    let node = fixtures::Node::start(fixtures::erl(&dir, &["-sname", &name], &eval))?;
    // Let the node finish booting so the trace watches the leak, not the boot.
    thread::sleep(Duration::from_secs(2));
    let out = shell::workspace_root().join("target/leaktrace-demo");
    shell::step(&format!(
        "tracing beam.smp PID {} for {}",
        node.pid(),
        args.duration
    ));
    let mut attach = std::process::Command::new(&leaktrace);
    attach
        .args([
            "attach",
            "--pid",
            &node.pid().to_string(),
            "--duration",
            &args.duration,
        ])
        .arg("--out")
        .arg(&out);
    eprintln!("    $ {}", shell::show(&attach));
    let status = attach.status().context("running leaktrace")?;
    drop(node);
    let report = out.join("report.json");
    let text =
        fs::read_to_string(&report).with_context(|| format!("reading {}", report.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text).context("parsing report.json")?;
    let kind = json["verdict"]["kind"].as_str().unwrap_or("missing");
    eprintln!();
    let code = status
        .code()
        .map_or_else(|| status.to_string(), |c| c.to_string());
    eprintln!("demo verdict: {kind} (leaktrace exited {code})");
    eprintln!(
        "reports: {} and {}",
        report.display(),
        out.join("report.md").display()
    );
    if kind != "native_leak" {
        bail!("the demo node leaks through its NIF, but the verdict was {kind}");
    }
    Ok(())
}
