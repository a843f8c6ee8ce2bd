//! The carrier picture (`instrument:carriers/0`) against a real beam.smp: an ETS table filled
//! and 95% emptied leaves ets_alloc carriers each held by a few surviving objects; the report
//! must show them pinned and say so in the fragmentation culprit, and `leaktrace vm` must print
//! the same picture.

use std::{
    fs,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{Node, json, leaktrace, privileged, serial, stderr};

/// Waits until the node's RSS is over `floor_kib` and stops moving: its fill and delete are done.
fn settled(node: &Node, floor_kib: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = 0;
    loop {
        thread::sleep(Duration::from_millis(500));
        let status = fs::read_to_string(format!("/proc/{}/status", node.pid())).unwrap();
        let now: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap();
        if now > floor_kib && now.abs_diff(last) < 1024 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the node never settled: RSS {now} KiB"
        );
        last = now;
    }
}

/// The picture's entry for `name`.
fn allocator<'a>(picture: &'a Value, name: &str) -> &'a Value {
    picture["allocators"]
        .as_array()
        .unwrap_or_else(|| panic!("no allocators in the picture: {picture:#}"))
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in the picture: {picture:#}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[test]
fn emptied_ets_table_shows_its_carriers_pinned_by_few_blocks() {
    if !privileged("emptied_ets_table_shows_its_carriers_pinned_by_few_blocks") {
        return;
    }
    let _s = serial();
    // ~300 MB of ETS objects, all but every 20th deleted: each 8 MiB carrier keeps a few hundred.
    let node = Node::distributed("lt_pinned", "lt_vm:fragment(400000, 40)");
    settled(&node, 100_000);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("carrier_picture");
    let _ = fs::remove_dir_all(&dir);
    let pid = node.pid().to_string();
    let out = leaktrace(&[
        "attach",
        "--pid",
        &pid,
        "--duration",
        "6s",
        "--interval",
        "500ms",
        "--json",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let report = json(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        report["verdict"]["kind"], "fragmentation",
        "{:#}",
        report["verdict"]
    );
    let culprit = &report["verdict"]["culprits"][0];
    assert_eq!(culprit["name"], "ets_alloc", "{:#}", report["verdict"]);

    let picture = &report["vm"]["carriers"];
    assert!(
        picture["skipped"].is_null(),
        "no picture: {:#}",
        picture["skipped"]
    );
    eprintln!(
        "carrier picture: {} carriers counted, {} ms",
        picture["carriers_counted"], picture["wall_ms"]
    );
    let ets = allocator(picture, "ets_alloc");
    let (carriers, pinned) = (u(&ets["carriers"]), u(&ets["pinned"]));
    let evidence = format!(
        "ets_alloc: {carriers} carriers, {pinned} pinned, median {} blocks, emptiest {:#}",
        ets["pinned_median_blocks"], ets["emptiest"]
    );
    eprintln!("{evidence}");
    // The survivors are spread over every carrier the fill used: most are pinned.
    assert!(
        carriers >= 10 && 2 * pinned > carriers,
        "not mostly pinned: {evidence}"
    );
    assert!(u(&ets["pinned_median_blocks"]) > 0, "{evidence}");
    assert!(
        u(&ets["pinned_block_bytes"]) * 4 < u(&ets["pinned_bytes"]),
        "pinned carriers over 25% used: {evidence}"
    );
    assert!(u(&ets["free_holes"]) > 0, "{evidence}");
    // The picture and the node's own figures (allocator_sizes, mbcs plus pool) count the same
    // carriers: the node idles between the two.
    let sample = report["vm"]["samples"].as_array().unwrap().last().unwrap();
    let figures: u64 = sample["allocators"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["name"] == "ets_alloc")
        .map(|a| u(&a["carriers"]))
        .sum();
    let bytes = u(&ets["carrier_bytes"]);
    assert!(
        bytes.abs_diff(figures) * 10 <= figures,
        "picture {bytes} B of ets_alloc carriers, allocator figures {figures} B"
    );

    let detail = culprit["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&format!("{pinned} pinned by few live blocks")) && detail.contains("+MEas"),
        "the culprit does not name its pinned carriers: {detail}"
    );
    let md = fs::read_to_string(dir.join("report.md")).unwrap();
    let table = md
        .split("### Carriers (instrument:carriers)")
        .nth(1)
        .unwrap_or_else(|| panic!("no carrier table in report.md:\n{md}"));
    let row = format!("| ets_alloc | {carriers} |");
    assert!(table.contains(&row), "{row} missing from:\n{table}");
    assert!(md.contains("pinned by few live blocks"), "{md}");
}

#[test]
fn vm_snapshot_prints_the_carrier_picture() {
    if !privileged("vm_snapshot_prints_the_carrier_picture") {
        return;
    }
    let _s = serial();
    let node = Node::distributed("lt_pinned_vm", "lt_vm:fragment(100000, 40)");
    settled(&node, 50_000);
    let pid = node.pid().to_string();
    let out = leaktrace(&["vm", "--pid", &pid]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let section = text
        .split("carriers (instrument:carriers")
        .nth(1)
        .unwrap_or_else(|| panic!("no carrier picture in:\n{text}"));
    // A fresh node has not loaded instrument: the first picture loads it and says so.
    assert!(
        section.contains("loaded OTP's instrument module"),
        "{section}"
    );
    assert!(
        section.lines().any(|l| l.starts_with("ets_alloc ")),
        "no ets_alloc row:\n{section}"
    );
    let out = leaktrace(&["vm", "--pid", &pid, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let snap: Value = serde_json::from_slice(&out.stdout).unwrap();
    let picture = &snap["carriers"];
    assert_eq!(picture["loaded_instrument"], false, "{picture:#}");
    let ets = allocator(picture, "ets_alloc");
    assert!(u(&ets["pinned"]) >= 1, "{ets:#}");
}
