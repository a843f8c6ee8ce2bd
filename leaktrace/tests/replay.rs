//! Replay: verdicts re-judged from recordings of real runs (`--record`), no root needed. The
//! recordings in tests/recordings were made by `leaktrace attach --record` against the scenarios
//! of tests/beam.rs; corrupt recordings are refused and write nothing.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;

const LEAKTRACE: &str = env!("CARGO_BIN_EXE_leaktrace");

fn recording(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/recordings")
        .join(name)
}

fn report(file: &Path, extra: &[&str]) -> Output {
    Command::new(LEAKTRACE)
        .arg("report")
        .arg(file)
        .arg("--json")
        .args(extra)
        .output()
        .expect("run leaktrace report")
}

fn judged(name: &str, extra: &[&str]) -> (i32, Value) {
    let out = report(&recording(name), extra);
    let code = out.status.code().expect("exit code");
    assert_ne!(code, 2, "{name}: {}", String::from_utf8_lossy(&out.stderr));
    let json = serde_json::from_slice(&out.stdout).expect("report.json on stdout");
    (code, json)
}

fn kind(report: &Value) -> &str {
    report["verdict"]["kind"].as_str().expect("verdict.kind")
}

fn culprit_names(report: &Value) -> Vec<String> {
    report["verdict"]["culprits"]
        .as_array()
        .expect("culprits")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("replay")
        .join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn leaking_nif_recording_is_a_native_leak() {
    let (code, r) = judged("native_leak.json", &[]);
    assert_eq!(kind(&r), "native_leak", "{r:#}");
    assert_eq!(code, 1);
    assert!(
        r["verdict"]["culprits"][0]["kind"] == "unexplained",
        "{:#}",
        r["verdict"]
    );
    let ruled: Vec<&str> = r["verdict"]["ruled_out"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x["kind"].as_str())
        .collect();
    assert!(
        ruled.contains(&"fragmentation") && ruled.contains(&"vm_growth"),
        "{ruled:?}"
    );
}

#[test]
fn healthy_recording_is_healthy() {
    let (code, r) = judged("healthy.json", &[]);
    assert_eq!(kind(&r), "healthy", "{:#}", r["verdict"]);
    assert_eq!(code, 0);
}

#[test]
fn emptied_ets_recording_is_fragmentation_of_ets_alloc() {
    let (code, r) = judged("fragmentation.json", &[]);
    assert_eq!(kind(&r), "fragmentation", "{:#}", r["verdict"]);
    assert_eq!(code, 0);
    assert!(
        culprit_names(&r).iter().any(|n| n.starts_with("ets_alloc")),
        "{:#}",
        r["verdict"]
    );
}

#[test]
fn growing_table_recording_is_vm_growth_naming_the_table() {
    let (code, r) = judged("vm_growth_ets.json", &[]);
    assert_eq!(kind(&r), "vm_growth", "{:#}", r["verdict"]);
    assert_eq!(code, 1);
    assert!(
        culprit_names(&r).iter().any(|n| n == "lt_growing"),
        "{:#}",
        r["verdict"]
    );
}

/// The primary culprit's kind and name.
fn top_culprit(r: &Value) -> (String, String) {
    let c = &r["verdict"]["culprits"][0];
    (
        c["kind"].as_str().unwrap_or_default().to_owned(),
        c["name"].as_str().unwrap_or_default().to_owned(),
    )
}

#[test]
fn persistent_term_cache_recording_names_persistent_term() {
    let (code, r) = judged("persistent_term_cache.json", &[]);
    assert_eq!((kind(&r), code), ("vm_growth", 1), "{:#}", r["verdict"]);
    assert_eq!(top_culprit(&r).0, "persistent_term", "{:#}", r["verdict"]);
}

#[test]
fn leaked_workers_recording_names_the_process_group() {
    let (_, r) = judged("leaked_workers.json", &[]);
    assert_eq!(kind(&r), "vm_growth", "{:#}", r["verdict"]);
    assert_eq!(
        top_culprit(&r),
        ("process_group".into(), "lt_prod:worker_init/1".into()),
        "{:#}",
        r["verdict"]
    );
}

#[test]
fn binary_holder_recording_claims_no_more_than_the_node_holds() {
    let (_, r) = judged("binary_holder.json", &[]);
    assert_eq!(kind(&r), "vm_growth", "{:#}", r["verdict"]);
    let (kind_, name) = top_culprit(&r);
    assert_eq!(kind_, "binary_holder");
    assert!(name.starts_with("lt_prod:init/1 <"), "{name}");
    let bytes = r["verdict"]["culprits"][0]["bytes"].as_i64().unwrap();
    let binary = r["vm"]["census_end"]["memory"]["binary"].as_i64().unwrap();
    assert!(
        bytes <= binary,
        "holder {bytes} > erlang:memory(binary) {binary}"
    );
}

#[test]
fn node_without_allocators_recording_is_judged_from_the_census() {
    let (_, r) = judged("meamin_ets.json", &[]);
    assert_eq!(kind(&r), "vm_growth", "{:#}", r["verdict"]);
    assert_eq!(top_culprit(&r), ("ets_table".into(), "lt_growing".into()));
    let native = r["verdict"]["ruled_out"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["kind"] == "native_leak")
        .expect("native_leak ruled out");
    assert!(
        native["reason"]
            .as_str()
            .unwrap()
            .contains("without ERTS allocators"),
        "{native:#}"
    );
}

#[test]
fn two_problems_at_once_are_two_findings() {
    // An ETS table growing ~7 MiB/s and a NIF leaking ~3 MiB/s in one node: the table is the
    // verdict, the NIF's leak is reported beside it with its culprit, not ruled out.
    let (_, r) = judged("two_problems.json", &[]);
    assert_eq!(kind(&r), "vm_growth", "{:#}", r["verdict"]);
    assert_eq!(top_culprit(&r), ("ets_table".into(), "lt_growing".into()));
    let also = r["verdict"]["secondary"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "native_leak")
        .unwrap_or_else(|| panic!("native_leak not reported beside: {:#}", r["verdict"]));
    assert_eq!(also["culprits"][0]["name"], "lt_nif.so: leak", "{also:#}");
    assert!(
        !r["verdict"]["ruled_out"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["kind"] == "native_leak"),
        "{:#}",
        r["verdict"]
    );
}

#[test]
fn carrier_growth_without_the_vm_view_is_inconclusive_and_says_why() {
    let (code, r) = judged("carriers_no_vm.json", &[]);
    assert_eq!(kind(&r), "inconclusive", "{:#}", r["verdict"]);
    assert_eq!(code, 3);
    let summary = r["verdict"]["summary"].as_str().unwrap();
    assert!(summary.contains("VM"), "{summary}");
}

#[test]
fn thresholds_from_the_command_line_change_the_verdict() {
    // The leak grows at a few MiB/s: a noise floor of 1 GiB/s hides it.
    let (code, r) = judged("native_leak.json", &["--min-growth", "1048576"]);
    assert_eq!(kind(&r), "healthy", "{:#}", r["verdict"]);
    assert_eq!(code, 0);
    assert_eq!(
        r["thresholds"]["min_growth_bytes_per_s"].as_f64(),
        Some(1073741824.0)
    );
    // A minimum duration longer than the run makes it inconclusive.
    let (code, r) = judged("native_leak.json", &["--min-duration", "1h"]);
    assert_eq!((kind(&r), code), ("inconclusive", 3));
}

#[test]
fn report_writes_json_and_markdown_that_agree() {
    let out_dir = scratch("written");
    let out = Command::new(LEAKTRACE)
        .arg("report")
        .arg(recording("fragmentation.json"))
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written: Value =
        serde_json::from_str(&fs::read_to_string(out_dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(written["schema"], 1);
    assert_eq!(kind(&written), "fragmentation");
    let md = fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(
        md.contains("fragmentation") && md.contains("ets_alloc"),
        "{md}"
    );
    // The terminal summary names the verdict too.
    assert!(String::from_utf8_lossy(&out.stdout).contains("fragmentation"));
}

/// Writes `text` as a recording, runs `report --out`, expects exit 2 naming `expect`, no output.
fn refused(name: &str, text: &str, expect: &str) {
    let dir = scratch(name);
    let file = dir.join("recording.json");
    fs::write(&file, text).unwrap();
    let out_dir = dir.join("out");
    let out = Command::new(LEAKTRACE)
        .arg("report")
        .arg(&file)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{name}: {err}");
    assert!(err.contains(expect), "{name}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{name}: one line: {err}");
    assert!(out.stdout.is_empty(), "{name}");
    assert!(!out_dir.exists(), "{name}: nothing written");
}

fn original() -> Value {
    serde_json::from_str(&fs::read_to_string(recording("native_leak.json")).unwrap()).unwrap()
}

#[test]
fn corrupt_recordings_are_refused_and_write_nothing() {
    let text = fs::read_to_string(recording("native_leak.json")).unwrap();
    refused("truncated", &text[..text.len() / 2], "recording.json");
    refused("garbage", "\u{0}\u{1}not json at all", "recording.json");
    refused("empty", "", "recording.json");

    let mut foreign = original();
    foreign["schema"] = 99.into();
    refused("schema", &foreign.to_string(), "schema");

    let mut backwards = original();
    let samples = backwards["samples"].as_array_mut().unwrap();
    let last = samples.len() - 1;
    samples[last]["t_s"] = 0.0.into();
    refused("backwards", &backwards.to_string(), "recording.json");

    let mut missing = original();
    missing.as_object_mut().unwrap().remove("samples");
    refused("missing", &missing.to_string(), "samples");
}

#[test]
fn missing_recording_is_a_clear_error() {
    let out = report(Path::new("/nonexistent/leaktrace.json"), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/leaktrace.json"));
}
