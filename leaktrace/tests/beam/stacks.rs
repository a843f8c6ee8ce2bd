//! `--stacks N`: best-effort frame-pointer stacks of native allocations, on top of the per-site
//! figures (which must not change). lt_native.so is built -O2 without frame pointers: the
//! kernel's walk may stop at once, so only the first frame (the call's site, the return address
//! the probe reads) is certain.

use serde_json::Value;

use super::{
    MIB, View, attach_vm, int, leaktrace, leftover_programs, native_context, native_module,
    native_node, privileged, serial, stderr,
};

/// The `native.stacks` entries of a report (empty when absent).
fn stacks(report: &Value) -> Vec<Value> {
    report["native"]["stacks"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn frames(stack: &Value) -> Vec<&str> {
    stack["frames"]
        .as_array()
        .map(|f| f.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn stacks_name_the_nif_and_leave_the_verdict_alone() {
    let test = "stacks_name_the_nif_and_leave_the_verdict_alone";
    // Refused before anything is traced: no privileges needed.
    let deep = leaktrace(&["attach", "--pid", "1", "--stacks", "33"]);
    assert_eq!(deep.status.code(), Some(2), "{}", stderr(&deep));
    assert!(stderr(&deep).contains("--stacks 33"), "{}", stderr(&deep));
    if !privileged(test) {
        return;
    }
    let _s = serial();
    let node = native_node(View::Os, "lt_native:leak_forever(leak_malloc, 262144, 20)");

    let (out, report) = attach_vm(
        node.pid(),
        "8s",
        &["--no-vm", "--native", "on", "--stacks", "8"],
    );
    let ctx = native_context(&out, &report);
    assert_eq!(report["verdict"]["kind"], "native_leak", "{ctx}");
    assert_eq!(out.status.code(), Some(1), "{ctx}");
    assert_eq!(report["native"]["stack_depth"], 8, "{ctx}");
    assert!(
        report["native"]["stacks_truncated"].as_u64().is_some()
            && report["native"]["stack_errors"].as_u64().is_some(),
        "{ctx}"
    );
    let all = stacks(&report);
    let top = all
        .first()
        .unwrap_or_else(|| panic!("no native.stacks: {ctx}"));
    let top_frames = frames(top);
    assert!(
        (1..=8).contains(&top_frames.len()),
        "{} frames for --stacks 8: {ctx}",
        top_frames.len()
    );
    assert!(
        top_frames.iter().any(|f| f.starts_with("lt_native.so")),
        "no lt_native.so frame in {top_frames:?}: {ctx}"
    );
    // The first frame is the allocating call's site, named as the per-site figures name it.
    assert_eq!(top_frames[0], "lt_native.so: leak_malloc", "{ctx}");
    // ~50 leaks of 256 KiB a second for 8 s: at least a third of it.
    let outstanding = int(top, "outstanding_bytes", &ctx);
    assert!(outstanding > 32 * MIB, "{top:#}\n{ctx}");
    assert!(int(top, "allocations", &ctx) > 8 * 15, "{top:#}\n{ctx}");
    // The stacks split the site's totals; they never add to them.
    let site = native_module(&report, "lt_native.so", "leak_malloc", &ctx);
    let by_stacks: i64 = all
        .iter()
        .filter(|s| frames(s).first() == Some(&"lt_native.so: leak_malloc"))
        .map(|s| int(s, "outstanding_bytes", &ctx))
        .sum();
    let by_site = int(site, "outstanding_bytes", &ctx);
    assert!(
        by_stacks <= by_site && by_stacks * 2 >= by_site,
        "stacks hold {by_stacks} bytes, the site {by_site}: {ctx}"
    );
    let culprit = report["verdict"]["culprits"][0]["name"].clone();

    // Without --stacks: no stacks, the same verdict and culprit.
    let (out, plain) = attach_vm(node.pid(), "8s", &["--no-vm", "--native", "on"]);
    let ctx = native_context(&out, &plain);
    assert_eq!(plain["verdict"]["kind"], "native_leak", "{ctx}");
    assert_eq!(out.status.code(), Some(1), "{ctx}");
    assert_eq!(plain["verdict"]["culprits"][0]["name"], culprit, "{ctx}");
    assert!(stacks(&plain).is_empty(), "{ctx}");
    assert!(plain["native"]["stack_depth"].is_null(), "{ctx}");
    assert!(plain["native"]["stack_errors"].is_null(), "{ctx}");
    assert_eq!(leftover_programs(), 0, "probes left behind");
}
