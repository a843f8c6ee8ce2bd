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

/// ets_alloc block bytes the VM reports in one VM sample (all instances).
fn vm_ets_blocks(sample: &Value) -> u64 {
    sample["allocators"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|i| i["name"] == "ets_alloc")
                .filter_map(|i| i["blocks"].as_u64())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn block_bytes_agree_with_the_vm_and_max_overhead_detaches() {
    if !privileged("block_bytes_agree_with_the_vm_and_max_overhead_detaches") {
        return;
    }
    let _s = serial();
    let node = Node::distributed("lt_blockvm", "lt_vm:grow_table(2000, 50)");
    thread::sleep(Duration::from_millis(500));
    let pid = node.pid().to_string();
    let out = leaktrace(&[
        "attach",
        "--pid",
        &pid,
        "--duration",
        "8s",
        "--interval",
        "500ms",
        "--native",
        "off",
        "--blocks",
        "--max-overhead",
        "200",
        "--json",
    ]);
    let report = json(&out);
    assert_eq!(
        report["sources"]["vm_connection"],
        true,
        "stderr: {}",
        stderr(&out)
    );
    let vm = report["vm"]["samples"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let attached = report["blocks"]["attached_at_s"]
        .as_f64()
        .unwrap_or(f64::MAX);
    let from = vm
        .iter()
        .find(|s| s["t_s"].as_f64().unwrap_or(0.0) >= attached);
    let (Some(from), Some(to)) = (from, vm.last()) else {
        panic!(
            "no VM samples after the block probes attached: {}",
            evidence(&report)
        );
    };
    let vm_change = vm_ets_blocks(to) as f64 - vm_ets_blocks(from) as f64;
    let probes_end = report["blocks"]["allocators"]
        .as_array()
        .and_then(|a| a.iter().find(|g| g["name"] == "ets_alloc"))
        .and_then(|g| g["net_bytes"].as_i64())
        .unwrap_or(0) as f64;
    // The probes' figure at the VM samples' times, from their series.
    let at = |t: f64| {
        report["blocks"]["series"]
            .as_array()
            .and_then(|s| {
                s.iter()
                    .rfind(|p| p["t_s"].as_f64().unwrap_or(f64::MAX) <= t + 0.01)
                    .and_then(|p| p["by_group"]["ets_alloc"].as_i64())
            })
            .unwrap_or(0) as f64
    };
    let probe_change =
        at(to["t_s"].as_f64().unwrap_or(0.0)) - at(from["t_s"].as_f64().unwrap_or(0.0));
    eprintln!(
        "ets_alloc blocks over the same samples: probes {probe_change:.0} B, VM {vm_change:.0} B (probes at the end {probes_end:.0} B)"
    );
    assert!(vm_change > 10e6, "the table should grow: {vm_change}");
    // The VM counts block headers and alignment: the two agree within 10%.
    assert!(
        (probe_change - vm_change).abs() <= 0.10 * vm_change,
        "probes {probe_change} vs VM {vm_change}\n{}",
        evidence(&report)
    );

    // The same node under a budget of 1% of a CPU: the block probes are detached early, and
    // the report says when and why.
    let out = leaktrace(&[
        "attach",
        "--pid",
        &pid,
        "--duration",
        "6s",
        "--interval",
        "500ms",
        "--native",
        "off",
        "--no-vm",
        "--blocks",
        "--max-overhead",
        "1",
        "--json",
    ]);
    let report = json(&out);
    let detached = report["blocks"]["detached_at_s"].as_f64();
    let reason = report["blocks"]["reason"].as_str().unwrap_or("");
    eprintln!("--max-overhead 1: detached at {detached:?}: {reason}");
    assert!(detached.is_some(), "{}", evidence(&report));
    assert!(reason.contains("--max-overhead 1%"), "{reason}");
    assert_ne!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
}

#[test]
fn piled_up_timers_without_vm_are_vm_growth_of_timer_and_heap_fragment_types() {
    if !privileged("piled_up_timers_without_vm_are_vm_growth_of_timer_and_heap_fragment_types") {
        return;
    }
    let _s = serial();
    let node = Node::start("lt_vm:pile_timers(2000, 50)");
    thread::sleep(Duration::from_millis(500));
    let (out, report) = blocks_run(node.pid(), "6s");
    eprintln!("{}", evidence(&report));
    assert_eq!(
        report["sources"]["block_probes"],
        true,
        "stderr: {}",
        stderr(&out)
    );
    assert_eq!(
        report["verdict"]["kind"],
        "vm_growth",
        "{}",
        evidence(&report)
    );
    let names: Vec<&str> = report["verdict"]["culprits"]
        .as_array()
        .map(|c| c.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        names.iter().any(|n| n.contains("timer")),
        "a timer type should be named: {names:?}"
    );
    assert!(
        names.iter().any(|n| n.contains("heap_frag")),
        "the timers' messages live in heap fragments: {names:?}"
    );
}

#[test]
fn native_sizes_and_lifetimes_become_histograms_per_module() {
    if !privileged("native_sizes_and_lifetimes_become_histograms_per_module") {
        return;
    }
    let _s = serial();
    // 4 KiB blocks kept forever, one every 10 ms.
    let node = Node::start("lt_native:leak_forever(leak_malloc, 4096, 10)");
    thread::sleep(Duration::from_millis(500));
    let pid = node.pid().to_string();
    let out = leaktrace(&[
        "attach",
        "--pid",
        &pid,
        "--duration",
        "5s",
        "--interval",
        "500ms",
        "--native",
        "on",
        "--no-vm",
        "--json",
    ]);
    let report = json(&out);
    let hists: leaktrace::recording::histograms::Histograms =
        serde_json::from_value(report["histograms"].clone()).expect("histograms parse back");
    let module = report["native"]["modules"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["module"] == "lt_native.so"))
        .cloned()
        .unwrap_or_default();
    let allocations = module["allocations"].as_u64().unwrap_or(0);
    let sizes = hists
        .series
        .iter()
        .find(|s| s.name == "native_size/lt_native.so")
        .unwrap_or_else(|| {
            panic!(
                "no native_size/lt_native.so: {:?}; stderr {}",
                hists.series.iter().map(|s| &s.name).collect::<Vec<_>>(),
                stderr(&out)
            )
        });
    let mut count = 0;
    let mut min = u64::MAX;
    for i in &sizes.intervals {
        let h = i.decode().expect("decodes");
        count += h.len();
        min = min.min(h.min());
    }
    eprintln!(
        "native_size/lt_native.so: {count} values in {} intervals (min {min}); {allocations} allocations",
        sizes.intervals.len()
    );
    // Every allocation the probes counted is in the histogram, in the 4096-byte bucket.
    assert_eq!(count, allocations, "histogram count against allocations");
    assert!(allocations > 100, "{module}");
    assert_eq!(min, 4096);
    let life = hists
        .series
        .iter()
        .find(|s| s.name == "native_lifetime/lt_native.so")
        .map(|s| s.censored)
        .unwrap_or(0);
    assert_eq!(life, allocations, "never freed: every lifetime is censored");
}

/// ets_alloc growth (bytes/s) the block probes give in a report.
fn ets_growth(report: &Value) -> f64 {
    report["blocks"]["allocators"]
        .as_array()
        .and_then(|a| a.iter().find(|g| g["name"] == "ets_alloc"))
        .and_then(|g| g["growth_bytes_per_s"].as_f64())
        .unwrap_or(0.0)
}

#[test]
fn sampled_blocks_estimate_the_growth_full_blocks_measure() {
    if !privileged("sampled_blocks_estimate_the_growth_full_blocks_measure") {
        return;
    }
    let _s = serial();
    let node = Node::start("lt_vm:grow_table(2000, 50)");
    thread::sleep(Duration::from_millis(500));
    let (_, full) = blocks_run(node.pid(), "6s");
    let pid = node.pid().to_string();
    let out = leaktrace(&[
        "attach",
        "--pid",
        &pid,
        "--duration",
        "14s",
        "--interval",
        "500ms",
        "--no-vm",
        "--native",
        "off",
        "--blocks",
        "sampled",
        "--max-overhead",
        "200",
        "--json",
    ]);
    let sampled = json(&out);
    let sampling = sampled["blocks"]["sampling"].as_str().unwrap_or("");
    let (f, s) = (ets_growth(&full), ets_growth(&sampled));
    let hits = |r: &Value| -> u64 {
        r["probes"]
            .as_array()
            .map(|p| {
                p.iter()
                    .filter(|p| p["name"] == "block_alloc")
                    .filter_map(|p| p["hits"].as_u64())
                    .sum()
            })
            .unwrap_or(0)
    };
    let (hf, hs) = (
        hits(&full) as f64 / full["duration_s"].as_f64().unwrap_or(1.0),
        hits(&sampled) as f64 / sampled["duration_s"].as_f64().unwrap_or(1.0),
    );
    eprintln!(
        "ets_alloc growth: full {f:.0} B/s, sampled estimate {s:.0} B/s; allocation probe hits/s: full {hf:.0}, sampled {hs:.0}\nsampling: {sampling}\n{}",
        evidence(&sampled)
    );
    assert!(sampling.contains("windows"), "{sampling}");
    assert!(
        s > 0.5 * f && s < 2.0 * f,
        "the sampled estimate should be near the full figure"
    );
    // Allocations outside the windows are not probed.
    assert!(
        hs < 0.5 * hf,
        "sampled mode should probe far fewer allocations"
    );
    assert_eq!(
        sampled["verdict"]["kind"],
        "vm_growth",
        "{}",
        evidence(&sampled)
    );
}

#[test]
fn native_probes_past_the_budget_are_detached_and_say_so() {
    if !privileged("native_probes_past_the_budget_are_detached_and_say_so") {
        return;
    }
    let _s = serial();
    // Allocation-heavy: 20 000 malloc/free pairs per call, a call every millisecond. Traced
    // in full, three probe hits per pair cost far more than 5% of a CPU.
    let node = Node::start("lt_native:churn_forever(churn, 64, 20000, 1)");
    thread::sleep(Duration::from_millis(500));
    let pid = node.pid().to_string();
    let out = leaktrace(&[
        "attach",
        "--pid",
        &pid,
        "--duration",
        "4s",
        "--interval",
        "500ms",
        "--native",
        "on",
        "--max-overhead",
        "5",
        "--no-vm",
        "--json",
    ]);
    let report = json(&out);
    let native = &report["native"];
    let ctx = format!("native {native:#}\nverdict {:#}", report["verdict"]);
    let detached = native["detached_at_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("the probes were not detached: {ctx}"));
    let attached = native["attached_at_s"].as_f64().unwrap();
    assert!(detached >= attached && detached <= attached + 2.0, "{ctx}");
    assert!(
        native["overhead_cpu_share"].as_f64().unwrap() > 0.05,
        "{ctx}"
    );
    let reason = native["reason"].as_str().unwrap();
    assert!(reason.contains("over --max-overhead 5%"), "{ctx}");
    // The verdict says its native figures stop there.
    let said = report["verdict"]["degraded"].as_array().is_some_and(|d| {
        d.iter().any(|n| {
            n.as_str()
                .is_some_and(|n| n.contains("native probes detached"))
        })
    });
    assert!(said, "{ctx}");
}
