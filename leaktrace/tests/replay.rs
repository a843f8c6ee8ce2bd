//! Replay: verdicts re-judged from recordings of real runs (`--record`), no root needed. The
//! recordings in tests/recordings were made by `leaktrace attach --record` against the scenarios
//! of tests/beam.rs; corrupt recordings are refused and write nothing.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
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
fn memory_a_nif_held_before_attach_is_inconclusive_naming_the_candidates() {
    let (code, r) = judged("malloc_held.json", &[]);
    assert_eq!(kind(&r), "inconclusive", "{:#}", r["verdict"]);
    assert_eq!(code, 3);
    let summary = r["verdict"]["summary"].as_str().unwrap();
    for want in [
        "resident outside the VM at attach",
        "lt_native.so",
        "--native on",
    ] {
        assert!(summary.contains(want), "{want}: {summary}");
    }
    assert!(!summary.contains("beam.smp"), "{summary}");
    // Raised past the level, the same recording has nothing left to say.
    let (code, r) = judged("malloc_held.json", &["--outside-min", "1024"]);
    assert_eq!(kind(&r), "healthy", "{:#}", r["verdict"]);
    assert_eq!(code, 0);
}

#[test]
fn freed_memory_glibc_keeps_is_fragmentation_of_the_malloc_arenas() {
    let (code, r) = judged("malloc_frag.json", &[]);
    assert_eq!(kind(&r), "fragmentation", "{:#}", r["verdict"]);
    assert_eq!(code, 0);
    assert_eq!(culprit_names(&r), vec!["malloc arenas".to_string()]);
    let detail = r["verdict"]["culprits"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("malloc_trim(0)"), "{detail}");
    // The resident breakdown is in report.json as recorded.
    let at = &r["resident"]["at_attach"];
    assert!(at["malloc_free"].as_u64().unwrap() > 150 << 20, "{at:#}");
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
fn emptied_table_under_blocks_without_vm_is_fragmentation_of_ets_alloc() {
    let (code, r) = judged("blocks_fragmentation.json", &[]);
    assert_eq!(kind(&r), "fragmentation", "{:#}", r["verdict"]);
    assert_eq!(code, 0);
    assert_eq!(r["sources"]["vm_connection"], false);
    assert_eq!(r["verdict"]["culprits"][0]["name"], "ets_alloc");
    let detail = r["verdict"]["culprits"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("probe-derived"), "{detail}");
}

#[test]
fn piled_up_timers_under_blocks_without_vm_name_their_types() {
    let (code, r) = judged("blocks_timers.json", &[]);
    assert_eq!(kind(&r), "vm_growth", "{:#}", r["verdict"]);
    assert_eq!(code, 1);
    let names: Vec<&str> = r["verdict"]["culprits"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["fix_alloc: bif_timer", "eheap_alloc: heap_frag"]);
    // A higher floor than the timers' growth rules it out.
    let (code, r) = judged("blocks_timers.json", &["--min-growth", "20000000"]);
    assert_ne!(kind(&r), "vm_growth", "{:#}", r["verdict"]);
    assert_ne!(code, 1);
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

/// `original()` with `f` applied, as text.
fn mutated(f: impl FnOnce(&mut Value)) -> String {
    let mut v = original();
    f(&mut v);
    v.to_string()
}

#[test]
fn corrupt_recordings_are_refused_and_write_nothing() {
    let text = fs::read_to_string(recording("native_leak.json")).unwrap();
    refused(
        "truncated",
        &text[..text.len() / 2],
        "recording.json is not a valid leaktrace recording: truncated: the JSON ends at line",
    );
    refused(
        "garbage",
        "\u{0}\u{1}not json at all",
        "recording.json is not a valid leaktrace recording: not JSON: ",
    );
    refused(
        "empty",
        "",
        "recording.json is not a valid leaktrace recording: the file is empty",
    );
    refused("blank", " \n\t\n", "the file is empty");
    refused(
        "schema",
        &mutated(|v| v["schema"] = 99.into()),
        "schema 99, this leaktrace reads schema 1",
    );
    refused(
        "no_schema",
        r#"{"samples": []}"#,
        "no \"schema\" field: not a leaktrace recording",
    );
    refused(
        "backwards",
        &mutated(|v| {
            let samples = v["samples"].as_array_mut().unwrap();
            let last = samples.len() - 1;
            samples[last]["t_s"] = 0.0.into();
        }),
        "times go backwards: sample 11 at t_s 0 s does not come after sample 10",
    );
    refused(
        "missing",
        &mutated(|v| {
            v.as_object_mut().unwrap().remove("samples");
        }),
        "not the shape of a schema 1 recording: missing field `samples`",
    );
}

#[test]
fn numbers_out_of_range_are_refused_naming_the_field() {
    // A byte figure that would wrap i64 arithmetic, a time of 10^300 s, a negative time.
    refused(
        "huge_bytes",
        &mutated(|v| v["samples"][3]["rss"] = u64::MAX.into()),
        "the number 18446744073709551615 at samples[3].rss is out of range",
    );
    refused(
        "huge_negative",
        &mutated(|v| v["samples"][2]["carriers"] = i64::MIN.into()),
        "at samples[2].carriers is out of range",
    );
    refused(
        "huge_float",
        &mutated(|v| v["duration_s"] = 1e300.into()),
        "at duration_s is out of range",
    );
    refused(
        "long_run",
        &mutated(|v| v["duration_s"] = 1e9.into()),
        "duration_s is 1000000000: not a time between 0 and",
    );
    refused(
        "negative_time",
        &mutated(|v| v["samples"][0]["t_s"] = (-1.0).into()),
        "sample 0: t_s is -1",
    );
    refused(
        "zero_interval",
        &mutated(|v| v["interval_s"] = 0.0.into()),
        "interval_s is 0: it must be positive",
    );
    refused(
        "negative_u64",
        &mutated(|v| v["samples"][0]["rss"] = (-5).into()),
        "not the shape of a schema 1 recording: invalid value: integer `-5`",
    );
    refused(
        "fraction",
        &mutated(|v| v["thresholds"]["explained_fraction"] = 2.0.into()),
        "thresholds.explained_fraction is 2: it must be within 0..1",
    );
    refused(
        "usage",
        &mutated(|v| v["thresholds"]["frag_max_usage"] = (-0.5).into()),
        "thresholds.frag_max_usage is -0.5: it must be within 0..1",
    );
    refused(
        "floor",
        &mutated(|v| v["thresholds"]["min_growth_bytes_per_s"] = (-1.0).into()),
        "thresholds.min_growth_bytes_per_s is -1: it must be a finite number >= 0",
    );
}

/// `leaktrace report ARGS`, killed (and the test failed) if it runs past 20 s: a FIFO must
/// not make it wait for a writer.
fn report_within_timeout(args: &[&std::ffi::OsStr]) -> Output {
    let mut child = Command::new(LEAKTRACE)
        .arg("report")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "leaktrace report {args:?} hung; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn fifos_directories_and_devices_are_refused_without_waiting() {
    let dir = scratch("special");
    let fifo = dir.join("fifo.json");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (path, kind) in [
        (fifo.as_path(), "is a FIFO, not a regular file"),
        (dir.as_path(), "is a directory, not a regular file"),
        (
            Path::new("/dev/zero"),
            "is a character device, not a regular file",
        ),
    ] {
        let started = Instant::now();
        let out = report_within_timeout(&[path.as_os_str()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", path.display());
        assert!(
            err.contains(&format!("{} {kind}", path.display())),
            "{}: {err}",
            path.display()
        );
        assert!(out.stdout.is_empty());
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}

#[test]
fn an_oversize_file_is_refused_unread() {
    let dir = scratch("oversize");
    let file = dir.join("big.json");
    // Sparse: 256 MiB + 1 byte costs no disk.
    fs::File::create(&file)
        .unwrap()
        .set_len((256 << 20) + 1)
        .unwrap();
    let started = Instant::now();
    let out = report_within_timeout(&[file.as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("is 268435457 bytes, over the 268435456-byte (256 MiB) limit"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "read it anyway?"
    );
}

#[test]
fn thresholds_out_of_range_are_refused() {
    for (arg, expect) in [
        (
            "--min-growth=-1",
            "--min-growth must be a finite number >= 0, got -1",
        ),
        (
            "--min-growth=NaN",
            "--min-growth must be a finite number >= 0, got NaN",
        ),
        (
            "--min-total=inf",
            "--min-total must be a finite number >= 0, got inf",
        ),
        // Finite as given, infinite in bytes.
        (
            "--frag-min-free=1e306",
            "--frag-min-free must be a finite number >= 0",
        ),
        (
            "--explained-fraction=1.5",
            "--explained-fraction must be in (0, 1], got 1.5",
        ),
        (
            "--explained-fraction=NaN",
            "--explained-fraction must be in (0, 1], got NaN",
        ),
        (
            "--frag-max-usage=-0.1",
            "--frag-max-usage must be in (0, 1], got -0.1",
        ),
        ("--min-duration=400d", "durations are at most 365 days"),
    ] {
        let out = report(&recording("healthy.json"), &[arg]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{arg}: {err}");
        assert!(err.contains(expect), "{arg}: {err}");
        assert!(out.stdout.is_empty(), "{arg}");
    }
}

#[test]
fn durations_that_overflow_are_exit_2_not_a_panic() {
    for (opt, value) in [
        ("--duration", "99999999999999999999h"),
        ("--duration", "584942417356y"),
        ("--duration", "18446744073709551615s"),
        ("--duration", "18446744073709551615"),
        ("--duration", "1e300"),
        ("--duration", "366d"),
        ("--interval", "99999999999999999999h"),
    ] {
        // Parsed before anything else: no privilege or target needed.
        let out = Command::new(LEAKTRACE)
            .args(["attach", "--pid", "1", opt, value])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{opt} {value}: {err}");
        assert!(!err.contains("panicked"), "{opt} {value}: {err}");
        assert!(
            err.contains("365 days") || err.contains("too large"),
            "{opt} {value}: {err}"
        );
    }
}

/// `report FILE --out DIR` (summary on stdout).
fn report_out(file: &Path, dir: &Path) -> Output {
    Command::new(LEAKTRACE)
        .arg("report")
        .arg(file)
        .arg("--out")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Exit 2 with the verdict on stdout and, after it, `expect` on stderr.
fn verdict_then_error(out: &Output, expect: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        stdout.starts_with("verdict: fragmentation"),
        "the verdict first: {stdout}"
    );
    assert!(!stdout.contains("report: "), "no report line: {stdout}");
    assert!(
        err.contains("leaktrace: error: could not write the report to"),
        "{err}"
    );
    assert!(err.contains(expect), "{err}");
    assert!(
        err.trim_end().ends_with("(the verdict above stands)"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_symlink_planted_in_out_is_not_written_through() {
    let dir = scratch("symlink_out");
    let outside = dir.join("outside.txt");
    fs::write(&outside, "precious").unwrap();
    let out_dir = dir.join("out");
    fs::create_dir(&out_dir).unwrap();
    std::os::unix::fs::symlink(&outside, out_dir.join("report.json")).unwrap();
    let out = report_out(&recording("fragmentation.json"), &out_dir);
    verdict_then_error(
        &out,
        "out/report.json is a symbolic link, and leaktrace (running as root) never writes through one",
    );
    assert_eq!(fs::read_to_string(&outside).unwrap(), "precious");
    assert!(
        fs::symlink_metadata(out_dir.join("report.json"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // Nothing else written: not report.md, no temporary file.
    assert_eq!(names_in(&out_dir), ["report.json"]);

    // --out itself a symbolic link to a directory: refused too.
    let elsewhere = dir.join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    let out = report_out(&recording("fragmentation.json"), &link);
    verdict_then_error(&out, "link is a symbolic link");
    assert!(names_in(&elsewhere).is_empty());
}

#[test]
fn a_failed_write_comes_after_the_verdict_and_leaves_nothing_partial() {
    let dir = scratch("failed_write");
    // --out under a regular file: cannot be created (for root too).
    let file = dir.join("file");
    fs::write(&file, "").unwrap();
    let out = report_out(&recording("fragmentation.json"), &file.join("out"));
    verdict_then_error(&out, "Not a directory");
    // --out is a regular file.
    let out = report_out(&recording("fragmentation.json"), &file);
    verdict_then_error(&out, "file is a regular file, not a directory");
    assert_eq!(fs::read_to_string(&file).unwrap(), "");
    // report.md is a directory: nothing is written, report.json included.
    let out_dir = dir.join("out");
    fs::create_dir_all(out_dir.join("report.md/inside")).unwrap();
    let out = report_out(&recording("fragmentation.json"), &out_dir);
    verdict_then_error(&out, "report.md is a directory, not a regular file");
    assert_eq!(names_in(&out_dir), ["report.md"]);
    assert_eq!(names_in(&out_dir.join("report.md")), ["inside"]);
}

#[test]
fn reports_replace_old_ones_whole_and_leave_no_temporary_file() {
    let dir = scratch("replace");
    fs::write(
        dir.join("report.json"),
        "old and much longer ".repeat(100_000),
    )
    .unwrap();
    fs::write(dir.join("report.md"), "old").unwrap();
    let out = report_out(&recording("healthy.json"), &dir);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(kind(&written), "healthy");
    assert!(
        fs::read_to_string(dir.join("report.md"))
            .unwrap()
            .starts_with("# leaktrace report: healthy")
    );
    let mut bundle = leaktrace::bundle::FIXED_FILES.to_vec();
    bundle.sort();
    assert_eq!(names_in(&dir), bundle);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let verdict = stdout.find("verdict: healthy").expect("verdict");
    let report_line = stdout.find("report: ").expect("report line");
    assert!(verdict < report_line, "{stdout}");
}

#[test]
fn names_from_a_recording_are_escaped_in_the_terminal_and_markdown() {
    let dir = scratch("escaped");
    let file = dir.join("recording.json");
    let evil = "x\u{1b}[2J|`<b>";
    fs::write(
        &file,
        fs::read_to_string(recording("vm_growth_ets.json"))
            .unwrap()
            .replace("lt_growing", evil.escape_default().to_string().as_str())
            .replace("\\u{1b}", "\\u001b"),
    )
    .unwrap();
    let out = report_out(&file, &dir.join("out"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(!stdout.contains('\u{1b}'), "{stdout}");
    assert!(stdout.contains("x\\u{1b}[2J"), "{stdout}");
    let md = fs::read_to_string(dir.join("out/report.md")).unwrap();
    assert!(!md.contains('\u{1b}'));
    assert!(md.contains("x\\u{1b}[2J\\|'&lt;b&gt;"), "{md}");
}

#[test]
fn missing_recording_is_a_clear_error() {
    let out = report(Path::new("/nonexistent/leaktrace.json"), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/leaktrace.json"));
}
