//! `--blocks`: ERTS's own allocator probed (erts_alcu), judged without a VM connection.

use std::{thread, time::Duration};

use serde_json::Value;

use super::{Node, json, leaktrace, privileged, serial, stderr};

fn blocks_run(pid: u32, duration: &str) -> (std::process::Output, Value) {
    let out = leaktrace(&[
        "attach",
        "--pid",
        &pid.to_string(),
        "--duration",
        duration,
        "--interval",
        "500ms",
        "--no-vm",
        "--native",
        "off",
        "--blocks",
        "--max-overhead",
        "200",
        "--json",
    ]);
    let report = json(&out);
    (out, report)
}

/// The evidence a failing assertion prints: the verdict, the block rows, the probes.
fn evidence(report: &Value) -> String {
    format!(
        "verdict {:#}\nblock allocators {:#}\ntypes {:#}\nreason {}\nprobes {}",
        report["verdict"],
        report["blocks"]["allocators"],
        report["blocks"]["types"]
            .as_array()
            .map(|t| t.iter().take(6).cloned().collect::<Vec<_>>())
            .unwrap_or_default()
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
        report["blocks"]["reason"],
        report["probes"]
            .as_array()
            .map(|p| p
                .iter()
                .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("block")))
                .map(|p| format!("{} {} {}", p["name"], p["symbol"], p["hits"]))
                .collect::<Vec<_>>()
                .join("; "))
            .unwrap_or_default()
    )
}

#[test]
fn growing_ets_table_without_vm_is_vm_growth_of_its_type() {
    if !privileged("growing_ets_table_without_vm_is_vm_growth_of_its_type") {
        return;
    }
    let _s = serial();
    // 4000 objects of ~400 bytes every 50 ms: about 30 MiB/s of ets_alloc blocks.
    let node = Node::start("lt_vm:grow_table(4000, 50)");
    thread::sleep(Duration::from_millis(500));
    let (out, report) = blocks_run(node.pid(), "8s");
    eprintln!("{}", evidence(&report));
    assert_eq!(
        report["sources"]["block_probes"],
        true,
        "stderr: {}",
        stderr(&out)
    );
    assert_eq!(report["sources"]["vm_connection"], false);
    assert_eq!(
        report["verdict"]["kind"],
        "vm_growth",
        "{}",
        evidence(&report)
    );
    let first = report["verdict"]["culprits"][0]["name"]
        .as_str()
        .unwrap_or("");
    assert!(
        first.starts_with("ets_alloc: "),
        "the growing type should be an ets_alloc one: {first}\n{}",
        evidence(&report)
    );
    assert_eq!(report["verdict"]["culprits"][0]["kind"], "block_type");
    // Sizes and lifetimes of ets_alloc blocks reach the recording's histograms.
    let series: Vec<&str> = report["histograms"]["series"]
        .as_array()
        .map(|s| s.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        series.contains(&"block_size/ets_alloc"),
        "histogram series: {series:?}"
    );
}

#[test]
fn emptied_ets_table_without_vm_is_fragmentation_of_ets_alloc() {
    if !privileged("emptied_ets_table_without_vm_is_fragmentation_of_ets_alloc") {
        return;
    }
    let _s = serial();
    // After 3 s (the probes attached by then): ~300 MB of ETS objects, 95% deleted, so the
    // carriers the table gained stay mostly empty.
    let node = Node::start("lt_vm:fragment_later(3000, 400000, 40)");
    let (out, report) = blocks_run(node.pid(), "16s");
    eprintln!("{}", evidence(&report));
    assert_eq!(
        report["sources"]["block_probes"],
        true,
        "stderr: {}",
        stderr(&out)
    );
    assert_eq!(
        report["verdict"]["kind"],
        "fragmentation",
        "{}",
        evidence(&report)
    );
    let first = report["verdict"]["culprits"][0]["name"]
        .as_str()
        .unwrap_or("");
    assert_eq!(first, "ets_alloc", "{}", evidence(&report));
    let detail = report["verdict"]["culprits"][0]["detail"]
        .as_str()
        .unwrap_or("");
    assert!(detail.contains("probe-derived"), "{detail}");
}
