//! A node whose owner replaced `erpc` (the module every call of the VM view runs through) with
//! one that answers every call with a huge term: the run still ends on time with its report, the
//! VM view off and the cap named, and the tracer's peak RSS stays small.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{LEAKTRACE, Node, privileged, serial};

/// The stand-in: `execute_call/4` exits as erpc's does on success, `{Ref, return, Value}`, with
/// the value named by the node argument `-lt_huge`. Nothing else on the node calls erpc.
const STAND_IN: &str = r#"
-module(erpc).
-export([execute_call/4, execute_call/3]).

execute_call(Ref, _M, _F, _A) -> exit({Ref, return, huge()}).
execute_call(_M, _F, _A) -> huge().

huge() ->
    {ok, [[Kind]]} = init:get_argument(lt_huge),
    case Kind of
        "deep" -> deep(2000000, []);
        "wide" -> lists:duplicate(30000000, 0);
        "budget" -> lists:duplicate(3500000, 0);
        "binary" -> binary:copy(<<0>>, 200000000)
    end.

deep(0, Acc) -> Acc;
deep(N, Acc) -> deep(N - 1, [Acc]).
"#;

/// Peak RSS the tracer may reach, KiB.
const MAX_RSS_KIB: i64 = 256 * 1024;
/// Longest a run of `--duration 8s` may take before it counts as hung.
const HUNG_AFTER: Duration = Duration::from_secs(40);

/// A distributed node running the stand-in erpc (loaded once the node is up; a marker file says
/// when).
fn hostile_node(name: &str, kind: &str, dir: &Path) -> Node {
    let node = hostile_node_after(name, kind, dir, 0);
    let marker = dir.join("loaded");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "the stand-in erpc was never loaded"
        );
        thread::sleep(Duration::from_millis(50));
    }
    node
}

/// A distributed node that loads the stand-in erpc `delay_ms` after boot.
fn hostile_node_after(name: &str, kind: &str, dir: &Path, delay_ms: u32) -> Node {
    let src = dir.join("erpc.erl");
    fs::write(&src, STAND_IN).unwrap();
    let marker = dir.join("loaded");
    let eval = format!(
        "timer:sleep({delay_ms}), \
         {{ok, erpc, Bin}} = compile:file(\"{src}\", [binary, report]), \
         {{module, erpc}} = code:load_binary(erpc, \"{src}\", Bin), \
         ok = file:write_file(\"{marker}\", <<\"ok\">>), \
         timer:sleep(infinity).",
        src = src.display(),
        marker = marker.display(),
    );
    // erpc lives in kernel's sticky directory: -nostick lets the node replace it.
    Node::registered(name, &["-sname", name, "-nostick", "-lt_huge", kind], &eval)
}

/// What one leaktrace run left: exit code, peak RSS (KiB), wall time, stdout, stderr.
struct Run {
    code: Option<i32>,
    max_rss_kib: i64,
    took: Duration,
    stdout: String,
    stderr: String,
}

/// Runs leaktrace with `args`, reaping it with wait4 for its rusage; kills it past
/// [`HUNG_AFTER`].
fn run_measured(args: &[&str], dir: &Path) -> Run {
    let out_path = dir.join("stdout");
    let err_path = dir.join("stderr");
    let started = Instant::now();
    // Reaped below by wait4, which is what gives its rusage.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(LEAKTRACE)
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("run leaktrace");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut killed = false;
    loop {
        // SAFETY: pid is our own child, not reaped yet (std::process::Child never waits on
        // its own); status and usage are valid for writes.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        assert!(r >= 0, "wait4: {}", std::io::Error::last_os_error());
        if r == pid {
            break;
        }
        if !killed && started.elapsed() > HUNG_AFTER {
            // SAFETY: signals our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed = true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed();
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    let run = Run {
        code,
        max_rss_kib: usage.ru_maxrss,
        took,
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: fs::read_to_string(&err_path).unwrap_or_default(),
    };
    assert!(
        !killed,
        "leaktrace hung: killed after {HUNG_AFTER:?}\nstderr: {}",
        run.stderr
    );
    run
}

/// `leaktrace attach` against a node answering with `kind`; `cap` is the text the report must
/// name.
fn attach_case(name: &str, kind: &str, cap: &str) {
    if !privileged(name) {
        return;
    }
    let _s = serial();
    let dir = tempfile::tempdir().unwrap();
    let node = hostile_node(name, kind, dir.path());
    let out = dir.path().join("out");
    let pid = node.pid().to_string();
    let run = run_measured(
        &[
            "attach",
            "--pid",
            &pid,
            "--duration",
            "8s",
            "--interval",
            "500ms",
            "--out",
            out.to_str().unwrap(),
        ],
        dir.path(),
    );
    let evidence = format!(
        "exit {:?}, peak RSS {} KiB, took {:?}\nstdout: {}\nstderr: {}",
        run.code, run.max_rss_kib, run.took, run.stdout, run.stderr
    );
    eprintln!("{name}: {evidence}");
    assert!(matches!(run.code, Some(0..=3)), "{evidence}");
    let text = fs::read_to_string(out.join("report.json"))
        .unwrap_or_else(|e| panic!("no report.json ({e}): {evidence}"));
    let report: Value = serde_json::from_str(&text).unwrap();
    let notes = report["source_notes"].to_string();
    assert_eq!(
        report["sources"]["vm_connection"], false,
        "{notes}\n{evidence}"
    );
    assert!(
        notes.contains("the node's replies exceeded a cap") && notes.contains(cap),
        "the report does not say which cap the node's replies exceeded ({cap}): {notes}\n{evidence}"
    );
    assert!(notes.contains("the VM view is off"), "{notes}\n{evidence}");
    // The run kept tracing: samples over the whole duration.
    let samples = report["samples"].as_array().map_or(0, Vec::len);
    assert!(samples >= 10, "{samples} samples\n{evidence}");
    assert!(
        run.max_rss_kib < MAX_RSS_KIB,
        "tracer peak RSS {} KiB, over {MAX_RSS_KIB} KiB\n{evidence}",
        run.max_rss_kib
    );
    assert!(
        run.took < Duration::from_secs(25),
        "an 8 s run took {:?}\n{evidence}",
        run.took
    );
    drop(node);
}

#[test]
fn hostile_reply_nested_two_million_deep_turns_the_vm_view_off() {
    attach_case(
        "lt_hostile_deep",
        "deep",
        "a reply nested deeper than 64 levels",
    );
}

#[test]
fn hostile_reply_of_thirty_million_elements_turns_the_vm_view_off() {
    // 60 MB on the wire: refused from the frame's length, before anything is read.
    attach_case("lt_hostile_wide", "wide", "over the 32 MiB cap");
}

#[test]
fn hostile_reply_over_the_decoding_budget_turns_the_vm_view_off() {
    // 7 MB on the wire, over 96 MiB once decoded: refused from the list's count.
    attach_case(
        "lt_hostile_budget",
        "budget",
        "a list of 3500000 elements needs more than the 96 MiB decoding budget",
    );
}

#[test]
fn hostile_reply_of_a_200_mb_binary_turns_the_vm_view_off() {
    attach_case(
        "lt_hostile_bin",
        "binary",
        "a reply of 201 MB, over the 32 MiB cap",
    );
}

#[test]
fn hostile_reply_to_leaktrace_vm_is_a_clear_error() {
    let name = "hostile_reply_to_leaktrace_vm_is_a_clear_error";
    if !privileged(name) {
        return;
    }
    let _s = serial();
    let dir = tempfile::tempdir().unwrap();
    let node = hostile_node("lt_hostile_vm", "deep", dir.path());
    let run = run_measured(&["vm", "--pid", &node.pid().to_string()], dir.path());
    let evidence = format!(
        "exit {:?}, peak RSS {} KiB, took {:?}\nstdout: {}\nstderr: {}",
        run.code, run.max_rss_kib, run.took, run.stdout, run.stderr
    );
    eprintln!("{name}: {evidence}");
    assert_eq!(run.code, Some(2), "{evidence}");
    assert!(
        run.stderr
            .contains("the node's replies exceeded a cap: a reply nested deeper than 64 levels"),
        "{evidence}"
    );
    assert!(run.max_rss_kib < MAX_RSS_KIB, "{evidence}");
    assert!(run.took < Duration::from_secs(20), "{evidence}");
    drop(node);
}

#[test]
fn hostile_replies_mid_run_stop_the_vm_view_once_keeping_its_figures() {
    let name = "hostile_replies_mid_run_stop_the_vm_view_once_keeping_its_figures";
    if !privileged(name) {
        return;
    }
    let _s = serial();
    let dir = tempfile::tempdir().unwrap();
    // The real erpc answers for the first 3 s, the stand-in after.
    let node = hostile_node_after("lt_hostile_late", "deep", dir.path(), 3000);
    let out = dir.path().join("out");
    let run = run_measured(
        &[
            "attach",
            "--pid",
            &node.pid().to_string(),
            "--duration",
            "8s",
            "--interval",
            "500ms",
            "--out",
            out.to_str().unwrap(),
        ],
        dir.path(),
    );
    let evidence = format!(
        "exit {:?}, peak RSS {} KiB, took {:?}\nstdout: {}\nstderr: {}",
        run.code, run.max_rss_kib, run.took, run.stdout, run.stderr
    );
    eprintln!("{name}: {evidence}");
    assert!(
        dir.path().join("loaded").exists(),
        "stand-in not loaded: {evidence}"
    );
    assert!(matches!(run.code, Some(0..=3)), "{evidence}");
    let report: Value =
        serde_json::from_str(&fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let notes = report["source_notes"].to_string();
    assert!(
        notes.contains("VM connection stopped (figures up to then kept)")
            && notes.contains("a reply nested deeper than 64 levels"),
        "{notes}\n{evidence}"
    );
    let vm = &report["vm"];
    assert!(
        vm["samples"].as_array().is_some_and(|s| !s.is_empty()),
        "no VM figures from before the stand-in: {vm:#}"
    );
    // Stopped once: no gap per remaining interval.
    let gaps = vm["gaps"].as_array().map_or(0, Vec::len);
    assert!(gaps <= 2, "{gaps} gaps: {:#}\n{evidence}", vm["gaps"]);
    assert!(run.max_rss_kib < MAX_RSS_KIB, "{evidence}");
    drop(node);
}

/// The process holding the VM connection: a child of `parent` started with the hidden argument.
fn connection_child(parent: u32) -> Option<(u32, String)> {
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let ppid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse::<u32>().ok());
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(parent)
            && String::from_utf8_lossy(&cmdline).contains(leaktrace::vm::sandbox::CHILD_ARG)
        {
            return Some((pid, status));
        }
    }
    None
}

fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map_or("", str::trim)
}

#[test]
fn the_vm_connection_runs_in_a_child_without_privileges() {
    let name = "the_vm_connection_runs_in_a_child_without_privileges";
    if !privileged(name) {
        return;
    }
    let _s = serial();
    let node = Node::distributed("lt_sandboxed", "lt_vm:grow_table(100, 200)");
    thread::sleep(Duration::from_secs(1));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let pid = node.pid().to_string();
    let tracer = Command::new(LEAKTRACE)
        .args([
            "attach",
            "--pid",
            &pid,
            "--duration",
            "6s",
            "--interval",
            "500ms",
            "--out",
            out.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let found = loop {
        if let Some(found) = connection_child(tracer.id()) {
            break Some(found);
        }
        if Instant::now() > deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let done = tracer.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    let (child, status) = found
        .unwrap_or_else(|| panic!("no child process holds the VM connection; stderr: {stderr}"));
    eprintln!("{name}: child {child}:\n{status}");
    for (key, want) in [
        ("CapEff:", "0000000000000000"),
        ("CapPrm:", "0000000000000000"),
        ("CapInh:", "0000000000000000"),
        ("NoNewPrivs:", "1"),
    ] {
        assert_eq!(status_field(&status, key), want, "{key}\n{status}");
    }
    let uids: Vec<&str> = status_field(&status, "Uid:").split_whitespace().collect();
    assert_eq!(uids, ["65534"; 4], "{status}");
    assert!(status_field(&status, "Groups:").is_empty(), "{status}");
    // The VM view worked through it.
    let report: Value =
        serde_json::from_str(&fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        report["sources"]["vm_connection"], true,
        "{:#}\nstderr: {stderr}",
        report["source_notes"]
    );
    assert!(
        report["vm"]["samples"]
            .as_array()
            .is_some_and(|s| s.len() >= 5),
        "{:#}",
        report["vm"]
    );
    drop(node);
}
