//! End to end against real beam.smp nodes running small C NIFs (built here with gcc against
//! erl_nif.h): the leaktrace binary attaches, traces and judges; bad input is refused.

#[path = "beam/blocks.rs"]
mod blocks;
#[path = "beam/carrier_picture.rs"]
mod carrier_picture;
#[path = "beam/containers.rs"]
mod containers;
#[path = "beam/faults.rs"]
mod faults;
#[path = "beam/hostile_access.rs"]
mod hostile_access;
#[path = "beam/hostile_files.rs"]
mod hostile_files;
#[path = "beam/hostile_replies.rs"]
mod hostile_replies;
#[path = "beam/live.rs"]
mod live;
#[path = "beam/outputs.rs"]
mod outputs;
#[path = "beam/resident.rs"]
mod resident;
#[path = "beam/stacks.rs"]
mod stacks;
mod support;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Mutex, MutexGuard, OnceLock},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::privileged;

const LEAKTRACE: &str = env!("CARGO_BIN_EXE_leaktrace");

/// Nodes and tracers share two cores: one scenario at a time keeps timings honest.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A scratch directory `area/name` under the test target directory, emptied.
fn scratch_in(area: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(area).join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn fixtures_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds lt_nif.so, lt_native.so (linking liblt_leaklib.so) and the .beam files once per test
/// binary.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("beam-fixtures");
        fs::create_dir_all(&dir).unwrap();
        let root = run_ok(Command::new("erl").args([
            "-noshell",
            "-eval",
            "io:format(\"~s\", [code:root_dir()]), halt().",
        ]));
        let src = fixtures_src();
        run_ok(
            Command::new("gcc")
                .args(["-shared", "-fPIC", "-O2", "-o"])
                .arg(dir.join("lt_nif.so"))
                .arg(src.join("lt_nif.c"))
                .arg(format!("-I{root}/usr/include")),
        );
        // A plain library that lt_native.so links (and finds by its rpath): its leak must be
        // attributed to it, not to the NIF calling it.
        run_ok(
            Command::new("gcc")
                .args(["-shared", "-fPIC", "-O2", "-o"])
                .arg(dir.join("liblt_leaklib.so"))
                .arg(src.join("lt_leaklib.c")),
        );
        run_ok(
            Command::new("gcc")
                .args(["-shared", "-fPIC", "-O2", "-o"])
                .arg(dir.join("lt_native.so"))
                .arg(src.join("lt_native.c"))
                .arg(format!("-I{root}/usr/include"))
                .arg(format!("-L{}", dir.display()))
                .arg("-llt_leaklib")
                .arg(format!("-Wl,-rpath,{}", dir.display()))
                .arg("-pthread"),
        );
        run_ok(
            Command::new("erlc")
                .arg("-o")
                .arg(&dir)
                .arg(src.join("lt_nif.erl"))
                .arg(src.join("lt_native.erl"))
                .arg(src.join("lt_load.erl"))
                .arg(src.join("lt_vm.erl"))
                .arg(src.join("lt_prod.erl")),
        );
        dir
    })
}

/// A beam.smp node killed on drop.
struct Node {
    child: Child,
}

impl Node {
    fn start(eval: &str) -> Node {
        Node::start_with(&[], eval)
    }

    /// A distributed node (`-sname`), reachable by the VM view with the default cookie file.
    fn distributed(name: &str, eval: &str) -> Node {
        Node::registered(name, &["-sname", name], eval)
    }

    /// A node started with `extra` that registers `name` with epmd (by its flags or by
    /// starting distribution itself); waits until epmd lists it.
    fn registered(name: &str, extra: &[&str], eval: &str) -> Node {
        let node = Node::start_with(extra, eval);
        // Distribution registers with epmd a moment after beam.smp starts.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !Command::new("epmd")
            .arg("-names")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("name {name} ")))
        {
            assert!(
                Instant::now() < deadline,
                "node {name} never registered with epmd"
            );
            thread::sleep(Duration::from_millis(50));
        }
        node
    }

    fn start_with(extra: &[&str], eval: &str) -> Node {
        let child = Command::new("erl")
            .args(extra)
            .args(["-noshell", "-pa"])
            .arg(fixtures())
            .args(["-eval", eval])
            .stdin(Stdio::null())
            .spawn()
            .expect("start erl");
        let node = Node { child };
        // erl execs erlexec, which execs beam.smp: same PID once it is the emulator.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !fs::read_link(format!("/proc/{}/exe", node.pid()))
            .is_ok_and(|e| e.to_string_lossy().ends_with("beam.smp"))
        {
            assert!(Instant::now() < deadline, "node did not start beam.smp");
            thread::sleep(Duration::from_millis(20));
        }
        node
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn leaktrace(args: &[&str]) -> Output {
    Command::new(LEAKTRACE)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run leaktrace")
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not report.json ({e}); stderr: {}\nstdout: {}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn leftover_programs() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            p.name_as_str().is_some_and(|n| {
                n.starts_with("mseg_") || n.starts_with("literal_") || n == "mmap_ret"
            })
        })
        .count()
}

fn attach_json(pid: u32, duration: &str) -> (Output, Value) {
    let out = leaktrace(&[
        "attach",
        "--pid",
        &pid.to_string(),
        "--duration",
        duration,
        "--interval",
        "500ms",
        "--json",
    ]);
    let report = json(&out);
    (out, report)
}

#[test]
fn leaking_nif_is_a_native_leak() {
    if !privileged("leaking_nif_is_a_native_leak") {
        return;
    }
    let _s = serial();
    // 256 KiB every 20 ms, pages touched: about 12 MiB/s outside any ERTS carrier.
    let node = Node::start("lt_load:leak_forever(262144, 20)");
    thread::sleep(Duration::from_secs(1));
    let (out, report) = attach_json(node.pid(), "8s");
    assert_eq!(
        out.status.code(),
        Some(1),
        "stderr: {}\n{report:#}",
        stderr(&out)
    );
    assert_eq!(
        report["verdict"]["kind"], "native_leak",
        "{:#}",
        report["verdict"]
    );
    assert_eq!(report["schema"], 1);
    assert_eq!(report["target"]["pid"], node.pid());
    assert_eq!(
        report["target"]["otp_release"]
            .as_str()
            .map(|s| s.starts_with("2")),
        Some(true)
    );
    assert_eq!(report["sources"]["carrier_probes"], true);
    assert_eq!(report["sources"]["vm_connection"], false);
    let samples = report["samples"].as_array().unwrap();
    assert!(samples.len() >= 12, "{} samples", samples.len());
    let first = &samples[0];
    let last = samples.last().unwrap();
    let grew = last["rss_anon"].as_i64().unwrap() - first["rss_anon"].as_i64().unwrap();
    assert!(grew > 50 << 20, "rss_anon grew only {grew} bytes");
    // --native auto: the growth outside carriers attached the native probes, which name the
    // NIF's function and account for the growth in native_outstanding.
    assert!(last["vm_used"].is_null());
    assert!(
        report["native"]["attached_at_s"].as_f64().is_some(),
        "{:#}",
        report["native"]
    );
    assert!(
        last["native_outstanding"].as_i64().unwrap() > 40 << 20,
        "{last:#}"
    );
    let named = report["verdict"]["culprits"][0]["name"].as_str().unwrap();
    assert_eq!(named, "lt_nif.so: leak", "{:#}", report["verdict"]);
    let attached: Vec<&str> = report["probes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["attached"] == true)
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for required in [
        "mseg_alloc",
        "mseg_alloc_ret",
        "mseg_dealloc",
        "mmap",
        "mmap_ret",
        "munmap",
    ] {
        assert!(
            attached.contains(&required),
            "{required} not attached: {attached:?}"
        );
    }
    assert_eq!(report["losses"]["events_lost"], 0);
    assert_eq!(leftover_programs(), 0, "probes left behind");
    drop(node);
}

#[test]
fn healthy_churning_node_is_healthy() {
    if !privileged("healthy_churning_node_is_healthy") {
        return;
    }
    let _s = serial();
    let node = Node::start("lt_load:healthy_forever(10)");
    // Let the node reach its working set: growth during boot is not what we judge.
    thread::sleep(Duration::from_secs(3));
    let out = leaktrace(&[
        "attach",
        "--pid",
        &node.pid().to_string(),
        "--duration",
        "8s",
        "--interval",
        "500ms",
        "--native",
        "on",
        "--json",
    ]);
    let report = json(&out);
    assert_eq!(
        report["verdict"]["kind"], "healthy",
        "{:#}",
        report["verdict"]
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    // What the workload guarantees is its NIF's malloc/free every tick (carrier calls it may
    // or may not make): the native probes saw them, balanced.
    let nif = report["native"]["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["module"] == "lt_nif.so" && m["nif_api"] == false)
        .unwrap_or_else(|| {
            panic!(
                "the NIF's churn was not seen: native {:#}\nprobes {:#}",
                report["native"], report["probes"]
            )
        });
    let (allocations, frees) = (
        nif["allocations"].as_u64().unwrap(),
        nif["frees"].as_u64().unwrap(),
    );
    assert!(
        allocations > 100 && frees + 2 >= allocations,
        "{nif:#}\nprobes {:#}",
        report["probes"]
    );
}

#[test]
fn run_traces_from_the_first_allocation_and_ends_with_the_command() {
    if !privileged("run_traces_from_the_first_allocation_and_ends_with_the_command") {
        return;
    }
    let _s = serial();
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("run.json");
    let pa = fixtures().to_str().unwrap().to_owned();
    let out = leaktrace(&[
        "run",
        "--duration",
        "60s",
        "--interval",
        "500ms",
        "--json",
        "--record",
        record.to_str().unwrap(),
        "--",
        "erl",
        "-noshell",
        "-pa",
        &pa,
        "-eval",
        "lists:foreach(fun(_) -> lt_nif:leak(262144), timer:sleep(20) end, lists:seq(1, 350)), halt().",
    ]);
    let report = json(&out);
    assert_eq!(report["end"], "target_exited", "stderr: {}", stderr(&out));
    assert_eq!(
        report["verdict"]["kind"], "native_leak",
        "{:#}",
        report["verdict"]
    );
    // Boot creates carriers for every allocator: seeing them proves the probes were live
    // before beam.smp's first allocation.
    let mseg_hits = report["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "mseg_alloc_ret")
        .unwrap()["hits"]
        .as_u64()
        .unwrap();
    assert!(mseg_hits >= 10, "only {mseg_hits} carriers seen from boot");
    let named: Vec<String> = report["allocators"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        named.iter().any(|n| n == "eheap_alloc"),
        "allocators: {named:?}"
    );

    // The recording re-judges to the same verdict without privileges or a node.
    let again = leaktrace(&["report", record.to_str().unwrap(), "--json"]);
    assert_eq!(again.status.code(), Some(1));
    assert_eq!(json(&again)["verdict"]["kind"], "native_leak");
}

#[test]
fn target_exiting_mid_run_still_reports() {
    if !privileged("target_exiting_mid_run_still_reports") {
        return;
    }
    let _s = serial();
    let node = Node::start("timer:sleep(3000), halt().");
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("report");
    let started = Instant::now();
    let out = leaktrace(&[
        "attach",
        "--pid",
        &node.pid().to_string(),
        "--duration",
        "60s",
        "--out",
        out_dir.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "did not notice the exit"
    );
    let report = json(&out);
    assert_eq!(report["end"], "target_exited");
    assert_ne!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    assert!(out_dir.join("report.json").exists() && out_dir.join("report.md").exists());
    assert_eq!(leftover_programs(), 0);
}

#[test]
fn interrupt_ends_the_run_and_still_reports() {
    if !privileged("interrupt_ends_the_run_and_still_reports") {
        return;
    }
    let _s = serial();
    let node = Node::start("lt_load:healthy_forever(10)");
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("report");
    let tracer = Command::new(LEAKTRACE)
        .args([
            "attach",
            "--pid",
            &node.pid().to_string(),
            "--duration",
            "5m",
        ])
        .arg("--out")
        .arg(&out_dir)
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_secs(4));
    // What Ctrl-C sends.
    run_ok(Command::new("kill").args(["-INT", &tracer.id().to_string()]));
    let out = tracer.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let report = json(&out);
    assert_eq!(report["end"], "interrupted");
    assert!(report["samples"].as_array().unwrap().len() >= 3);
    assert!(out_dir.join("report.json").exists() && out_dir.join("report.md").exists());
    assert_eq!(leftover_programs(), 0, "probes left behind");
    // The target carries on.
    thread::sleep(Duration::from_millis(200));
    assert!(fs::read_link(format!("/proc/{}/exe", node.pid())).is_ok());
}

#[test]
fn bad_input_is_refused_with_exit_2_and_leaves_nothing() {
    if !privileged("bad_input_is_refused_with_exit_2_and_leaves_nothing") {
        return;
    }
    let _s = serial();
    // A PID that does not exist.
    let out = leaktrace(&["attach", "--pid", "99999999", "--duration", "2s"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no process with PID 99999999"),
        "{}",
        stderr(&out)
    );

    // A PID that is not beam.smp.
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let out = leaktrace(&[
        "attach",
        "--pid",
        &sleeper.id().to_string(),
        "--duration",
        "2s",
    ]);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not beam.smp"), "{}", stderr(&out));

    let node = Node::start("timer:sleep(60000)");
    let pid = node.pid().to_string();

    // Without privileges (no capabilities, user nobody).
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .args([LEAKTRACE, "attach", "--pid", &pid, "--duration", "2s"])
        .output()
        .expect("setpriv (util-linux)");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("needs root"), "{}", stderr(&out));

    // A second leaktrace on the same target.
    let first = Command::new(LEAKTRACE)
        .args(["attach", "--pid", &pid, "--duration", "6s", "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(1500));
    let second = leaktrace(&["attach", "--pid", &pid, "--duration", "2s"]);
    let first = first.wait_with_output().unwrap();
    assert_eq!(second.status.code(), Some(2), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("already tracing"),
        "{}",
        stderr(&second)
    );
    assert_ne!(
        first.status.code(),
        Some(2),
        "first tracer failed: {}",
        stderr(&first)
    );

    // A corrupt recording.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    fs::write(&bad, b"{\"schema\": 1, \"samples\": [").unwrap();
    let out = leaktrace(&["report", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("not a valid leaktrace recording"),
        "{}",
        stderr(&out)
    );

    // The node survived all of it, and no probe is left in the kernel.
    assert!(
        fs::read_link(format!("/proc/{pid}/exe")).is_ok(),
        "target harmed"
    );
    assert_eq!(leftover_programs(), 0, "probes left behind");
}

fn attach_vm(pid: u32, duration: &str, extra: &[&str]) -> (Output, Value) {
    let pid = pid.to_string();
    let mut args = vec![
        "attach",
        "--pid",
        &pid,
        "--duration",
        duration,
        "--interval",
        "500ms",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = leaktrace(&args);
    let report = json(&out);
    (out, report)
}

fn culprit_names(report: &Value) -> Vec<String> {
    report["verdict"]["culprits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn emptied_ets_table_is_fragmentation_of_ets_alloc() {
    if !privileged("emptied_ets_table_is_fragmentation_of_ets_alloc") {
        return;
    }
    let _s = serial();
    // ~300 MB of ETS objects, 95% deleted: carriers pinned by the survivors stay mostly empty.
    let node = Node::distributed("lt_frag", "lt_vm:fragment(400000, 40)");
    // Wait until the fill and delete are done: RSS stops moving.
    let mut last = 0;
    for _ in 0..60 {
        thread::sleep(Duration::from_millis(500));
        let rss = fs::read_to_string(format!("/proc/{}/status", node.pid())).unwrap();
        let now: u64 = rss
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap();
        if now > 100_000 && now.abs_diff(last) < 1024 {
            break;
        }
        last = now;
    }
    let (out, report) = attach_vm(node.pid(), "6s", &[]);
    assert_eq!(
        report["sources"]["vm_connection"], true,
        "{:#}",
        report["source_notes"]
    );
    assert_eq!(
        report["verdict"]["kind"], "fragmentation",
        "{:#}",
        report["verdict"]
    );
    assert_eq!(out.status.code(), Some(0));
    let names = culprit_names(&report);
    assert!(
        names.first().is_some_and(|n| n.starts_with("ets_alloc")),
        "culprits: {names:?}"
    );
    let last = report["samples"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    let (used, allocated) = (
        last["vm_used"].as_u64().unwrap(),
        last["vm_allocated"].as_u64().unwrap(),
    );
    assert!(
        allocated > 4 * used,
        "usage {used}/{allocated} is not fragmented"
    );
    let kinds: Vec<&str> = report["verdict"]["ruled_out"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"native_leak"),
        "native_leak not ruled out: {kinds:?}"
    );
}

/// Starts a distributed node running `eval`, traces it 8 s with the VM view, and checks the
/// verdict is vm_growth with exit code 1.
fn vm_growth_report(name: &str, eval: &str) -> Value {
    let node = Node::distributed(name, eval);
    thread::sleep(Duration::from_secs(1));
    let (out, report) = attach_vm(node.pid(), "8s", &[]);
    assert_eq!(
        report["verdict"]["kind"], "vm_growth",
        "{:#}",
        report["verdict"]
    );
    assert_eq!(out.status.code(), Some(1));
    report
}

#[test]
fn growing_ets_table_is_vm_growth_naming_the_table() {
    if !privileged("growing_ets_table_is_vm_growth_naming_the_table") {
        return;
    }
    let _s = serial();
    // 4000 objects of ~450 bytes every 50 ms: about 35 MiB/s into one table.
    let report = vm_growth_report("lt_table", "lt_vm:grow_table(4000, 50)");
    let names = culprit_names(&report);
    assert!(
        names.iter().any(|n| n.contains("lt_growing")),
        "culprits: {names:?}"
    );
    // The probes and the VM see the same carrier growth, give or take carriers in flight.
    let check = &report["cross_check"];
    let probes = check["probe_carriers_change"].as_i64().unwrap();
    let vm = check["vm_carriers_change"].as_i64().unwrap();
    assert!(vm > 32 << 20, "VM carriers grew only {vm}: {check:#}");
    assert!(
        check["difference"].as_i64().unwrap().abs() < vm / 4,
        "probes {probes} vs VM {vm}: {check:#}"
    );
    let hit_rate = check["mseg_hit_rate_lifetime"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&hit_rate), "{check:#}");
}

#[test]
fn growing_mailbox_is_vm_growth_naming_the_process() {
    if !privileged("growing_mailbox_is_vm_growth_naming_the_process") {
        return;
    }
    let _s = serial();
    let report = vm_growth_report("lt_mbox", "lt_vm:grow_mailbox(3000, 50)");
    let culprits = report["verdict"]["culprits"].as_array().unwrap();
    let sink = culprits
        .iter()
        .find(|c| c["name"].as_str().is_some_and(|n| n.contains("lt_sink")))
        .unwrap_or_else(|| panic!("lt_sink not named: {culprits:#?}"));
    let detail = sink["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("message_queue_len"), "{sink:#}");
}

#[test]
fn wrong_cookie_gives_os_level_report_with_the_reason() {
    if !privileged("wrong_cookie_gives_os_level_report_with_the_reason") {
        return;
    }
    let _s = serial();
    let node = Node::distributed("lt_cookie", "lt_load:leak_forever(262144, 20)");
    thread::sleep(Duration::from_secs(1));
    let (out, report) = attach_vm(node.pid(), "6s", &["--cookie", "not-the-cookie"]);
    assert_eq!(report["sources"]["vm_connection"], false);
    let notes = report["source_notes"].to_string();
    assert!(notes.contains("wrong cookie"), "{notes}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("not-the-cookie"),
        "cookie leaked into the report"
    );
    assert!(
        !stderr(&out).contains("not-the-cookie"),
        "cookie leaked to stderr"
    );
    assert_eq!(
        report["verdict"]["kind"], "native_leak",
        "{:#}",
        report["verdict"]
    );
}

#[test]
fn vm_snapshot_names_allocators_processes_and_tables() {
    if !privileged("vm_snapshot_names_allocators_processes_and_tables") {
        return;
    }
    let _s = serial();
    let node = Node::distributed("lt_snap", "lt_vm:grow_table(100, 200)");
    thread::sleep(Duration::from_secs(1));
    let out = leaktrace(&["vm", "--pid", &node.pid().to_string()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "ets_alloc",
        "eheap_alloc",
        "lt_growing",
        "lt_table_owner",
        "atoms:",
        "mseg cache: hit rate",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    let out = leaktrace(&["vm", "--pid", &node.pid().to_string(), "--json"]);
    let snap: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(snap["census"]["process_count"].as_u64().unwrap() > 10);
    assert!(snap["usage"].as_f64().unwrap() > 0.0);
    // A node that is not distributed: clear error, exit 2.
    let plain = Node::start("timer:sleep(60000)");
    let out = leaktrace(&["vm", "--pid", &plain.pid().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not distributed"), "{}", stderr(&out));
}

/// The culprits of a report (primary first) as (kind, name, bytes).
fn culprits(report: &Value) -> Vec<(String, String, i64)> {
    report["verdict"]["culprits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["kind"].as_str().unwrap().to_owned(),
                c["name"].as_str().unwrap().to_owned(),
                c["bytes"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Traces `node` for `duration` with the VM view and requires a live VM connection.
fn traced_with_vm(node: &Node, duration: &str) -> (Output, Value) {
    let (out, report) = attach_vm(node.pid(), duration, &[]);
    assert_eq!(
        report["sources"]["vm_connection"],
        true,
        "no VM view: {:#}\nstderr: {}",
        report["source_notes"],
        stderr(&out)
    );
    (out, report)
}

#[test]
fn node_starting_distribution_itself_is_found_and_its_gen_server_named() {
    if !privileged("node_starting_distribution_itself_is_found_and_its_gen_server_named") {
        return;
    }
    let _s = serial();
    // No -sname: the node calls net_kernel:start/2 itself. An unregistered gen_server keeps
    // every cast it gets (~1 KiB, 1000 every 100 ms).
    let node = Node::registered(
        "lt_selfdist",
        &[],
        "lt_prod:distributed(lt_selfdist, {lt_prod, queue_backlog, [1000, 100]})",
    );
    thread::sleep(Duration::from_secs(1));
    let (out, report) = traced_with_vm(&node, "8s");
    let notes = report["source_notes"].to_string();
    assert!(
        notes.contains("lt_selfdist") && notes.contains("epmd"),
        "how the node was found is not reported: {notes}"
    );
    assert_eq!(
        report["vm"]["node"]
            .as_str()
            .map(|n| n.starts_with("lt_selfdist@")),
        Some(true)
    );
    assert_eq!(
        report["verdict"]["kind"], "vm_growth",
        "{:#}",
        report["verdict"]
    );
    assert_eq!(out.status.code(), Some(1));
    let found = culprits(&report);
    assert!(
        found
            .iter()
            .any(|(kind, name, _)| kind == "process" && name.starts_with("lt_prod:init/1 <")),
        "the gen_server is not named by its initial call: {found:?}"
    );

    // The one-shot snapshot finds it the same way and names the process alike.
    let snap = leaktrace(&["vm", "--pid", &node.pid().to_string()]);
    assert_eq!(snap.status.code(), Some(0), "{}", stderr(&snap));
    let text = String::from_utf8_lossy(&snap.stdout);
    assert!(text.contains("found by epmd"), "{text}");
    assert!(text.contains("lt_prod:init/1"), "{text}");
}

#[test]
fn node_named_in_an_args_file_is_found() {
    if !privileged("node_named_in_an_args_file_is_found") {
        return;
    }
    let _s = serial();
    let dir = tempfile::tempdir().unwrap();
    let args = dir.path().join("vm.args");
    fs::write(&args, "# as releases write it\n-sname lt_argsfile\n").unwrap();
    let node = Node::registered(
        "lt_argsfile",
        &["-args_file", args.to_str().unwrap()],
        "lt_vm:grow_table(4000, 50)",
    );
    thread::sleep(Duration::from_secs(1));
    let (_, report) = traced_with_vm(&node, "6s");
    assert_eq!(
        report["vm"]["node"]
            .as_str()
            .map(|n| n.starts_with("lt_argsfile@")),
        Some(true),
        "{:#}",
        report["vm"]["node"]
    );
    assert_eq!(
        report["verdict"]["kind"], "vm_growth",
        "{:#}",
        report["verdict"]
    );
}

#[test]
fn shared_binary_holder_claims_no_more_than_the_node_holds() {
    if !privileged("shared_binary_holder_claims_no_more_than_the_node_holds") {
        return;
    }
    let _s = serial();
    // A gen_server receiving 500 sub-binaries of a new 2 MiB binary every 200 ms: 500
    // references to each binary, about 10 MiB/s of distinct binaries.
    let node = Node::distributed("lt_binhold", "lt_prod:binary_holder(2097152, 500, 200)");
    thread::sleep(Duration::from_secs(1));
    let (_, report) = traced_with_vm(&node, "8s");
    assert_eq!(
        report["verdict"]["kind"], "vm_growth",
        "{:#}",
        report["verdict"]
    );
    let end = &report["vm"]["census_end"];
    let binary_memory = end["memory"]["binary"].as_i64().unwrap();
    let rss = report["samples"].as_array().unwrap().last().unwrap()["rss"]
        .as_i64()
        .unwrap();
    let found = culprits(&report);
    let holder = found
        .iter()
        .find(|(kind, name, _)| kind == "binary_holder" && name.starts_with("lt_prod:init/1"))
        .unwrap_or_else(|| panic!("holder not named: {found:?}\n{:#}", report["verdict"]));
    assert!(
        holder.2 <= binary_memory && holder.2 <= rss,
        "holder claims {} bytes; erlang:memory(binary) {binary_memory}, RSS {rss}",
        holder.2
    );
    // It holds most of the node's binaries: the figure is not a small fraction either.
    assert!(
        holder.2 * 2 > binary_memory,
        "{holder:?} vs {binary_memory}"
    );
    for c in report["verdict"]["culprits"].as_array().unwrap() {
        let rate = c["growth_bytes_per_s"].as_f64().unwrap();
        assert!(rate < 200.0 * 1024.0 * 1024.0, "impossible rate: {c:#}");
    }
}

#[test]
fn persistent_term_cache_is_vm_growth_naming_persistent_term() {
    if !privileged("persistent_term_cache_is_vm_growth_naming_persistent_term") {
        return;
    }
    let _s = serial();
    // A new key every 10 ms, each a tuple of 4000 words (~32 KiB): ~3 MiB/s into literal_alloc.
    let node = Node::distributed("lt_pterm", "lt_prod:persistent_cache(4000, 10)");
    thread::sleep(Duration::from_secs(1));
    let (out, report) = traced_with_vm(&node, "8s");
    assert_eq!(
        report["verdict"]["kind"], "vm_growth",
        "{:#}",
        report["verdict"]
    );
    assert_eq!(out.status.code(), Some(1));
    let found = culprits(&report);
    assert_eq!(
        found.first().map(|c| c.0.as_str()),
        Some("persistent_term"),
        "{found:?}\n{:#}",
        report["verdict"]
    );
}

#[test]
fn leaked_workers_are_vm_growth_naming_their_group() {
    if !privileged("leaked_workers_are_vm_growth_naming_their_group") {
        return;
    }
    let _s = serial();
    // 500 proc_lib workers every 100 ms, none ever ending, none large.
    let node = Node::distributed("lt_workers", "lt_prod:leak_workers(500, 100)");
    thread::sleep(Duration::from_secs(1));
    let (_, report) = traced_with_vm(&node, "8s");
    assert_eq!(
        report["verdict"]["kind"], "vm_growth",
        "{:#}",
        report["verdict"]
    );
    let top = &report["verdict"]["culprits"][0];
    assert_eq!(top["kind"], "process_group", "{:#}", report["verdict"]);
    assert_eq!(top["name"], "lt_prod:worker_init/1", "{top:#}");
    assert!(
        top["detail"].as_str().unwrap().contains("processes"),
        "{top:#}"
    );
}

#[test]
fn node_without_erts_allocators_is_judged_from_its_census() {
    if !privileged("node_without_erts_allocators_is_judged_from_its_census") {
        return;
    }
    let _s = serial();
    // +Mea min: every allocation goes to malloc; erlang:memory/0 answers notsup.
    let node = Node::registered(
        "lt_meamin",
        &["+Mea", "min", "-sname", "lt_meamin"],
        "lt_vm:grow_table(4000, 50)",
    );
    thread::sleep(Duration::from_secs(1));
    let (_, report) = traced_with_vm(&node, "8s");
    let disabled = report["vm"]["disabled_allocators"].to_string();
    assert!(disabled.contains("ets_alloc"), "{disabled}");
    assert_eq!(
        report["verdict"]["kind"], "vm_growth",
        "{:#}",
        report["verdict"]
    );
    let found = culprits(&report);
    assert!(
        found.iter().any(|(_, name, _)| name == "lt_growing"),
        "{found:?}"
    );
    let notes = report["source_notes"].to_string();
    assert!(notes.contains("without ERTS allocators"), "{notes}");
}

#[test]
fn slow_rpc_never_stalls_the_trace() {
    if !privileged("slow_rpc_never_stalls_the_trace") {
        return;
    }
    let _s = serial();
    // From 2 s after start, every scheduler spins at max priority for 4 s: rpc requests
    // cannot run on the node.
    let node = Node::distributed("lt_slow", "lt_prod:slow_rpc(2000, 4000, lt_slow_tab)");
    // The report is on stdout (closed once written) when the run ends; removing the probes
    // afterwards takes the kernel a grace period per probe, not the user's time.
    let started = Instant::now();
    let mut tracer = Command::new(LEAKTRACE)
        .args([
            "attach",
            "--pid",
            &node.pid().to_string(),
            "--duration",
            "10s",
            "--interval",
            "500ms",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut text = Vec::new();
    std::io::Read::read_to_end(tracer.stdout.as_mut().unwrap(), &mut text).unwrap();
    let took = started.elapsed();
    let out = tracer.wait_with_output().unwrap();
    let report: Value = serde_json::from_slice(&text).unwrap_or_else(|e| {
        panic!(
            "stdout is not report.json ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&text),
            stderr(&out)
        )
    });
    assert!(
        took < Duration::from_secs(14),
        "a 10 s trace gave its report after {took:?}: stderr {}",
        stderr(&out)
    );
    assert_eq!(report["end"], "duration");
    assert_eq!(
        report["sources"]["vm_connection"], true,
        "{:#}",
        report["source_notes"]
    );
    let gaps = report["vm"]["gaps"].as_array().unwrap();
    assert!(!gaps.is_empty(), "no gaps reported: {:#}", report["vm"]);
    // The view came back after the hog: late samples have VM figures.
    let samples = report["samples"].as_array().unwrap();
    let late_with_vm = samples
        .iter()
        .filter(|s| s["t_s"].as_f64().unwrap() > 7.5 && !s["vm_used"].is_null())
        .count();
    assert!(
        late_with_vm > 0,
        "no VM figures after the hog ended; gaps: {gaps:#?}"
    );
    // The ring buffer was drained on time all along.
    assert_eq!(report["losses"]["events_lost"], 0);
    assert!(samples.len() >= 15, "{} samples", samples.len());
}

// Native attribution: lt_native.so (lt_native.c) leaks or churns through each allocation path
// the native probes cover; liblt_leaklib.so (lt_leaklib.c) leaks from inside a linked library.
// Every leak runs at 256 KiB every 20 ms, pages written: about 12 MiB/s (120 MiB in a 10 s
// trace, measured by VmRSS), well under the nodes' memory budget.

const MIB: i64 = 1 << 20;

/// How a native scenario's node runs and is traced.
#[derive(Clone, Copy)]
enum View {
    /// A node without distribution, traced with `--no-vm`.
    Os,
    /// A distributed node of this name, traced with the VM view (which must come up): memory
    /// from enif_alloc and resources lives inside ERTS carriers.
    Vm(&'static str),
}

/// Starts a node running `eval` as `view` says, and lets it get going.
fn native_node(view: View, eval: &str) -> Node {
    let node = match view {
        View::Os => Node::start(eval),
        View::Vm(name) => Node::distributed(name, eval),
    };
    thread::sleep(Duration::from_secs(1));
    node
}

/// What to print when a native assertion fails: the verdict, `native` and `probes`.
fn native_context(out: &Output, report: &Value) -> String {
    format!(
        "verdict: {:#}\nnative: {:#}\nprobes: {:#}\nsources: {:#} {:#}\nstderr: {}",
        report["verdict"],
        report["native"],
        report["probes"],
        report["sources"],
        report["source_notes"],
        stderr(out)
    )
}

/// Traces `node` for 10 s with `--native MODE` (None: the default, auto); the VM view is
/// required for `View::Vm`, refused with `--no-vm` for `View::Os`. Returns the report and the
/// failure context; the native probes must have attached.
fn trace_native(node: &Node, view: View, native: Option<&str>) -> (Output, Value, String) {
    let mut extra = Vec::new();
    if let Some(mode) = native {
        extra.extend(["--native", mode]);
    }
    if matches!(view, View::Os) {
        extra.push("--no-vm");
    }
    let (out, report) = attach_vm(node.pid(), "10s", &extra);
    let ctx = native_context(&out, &report);
    if matches!(view, View::Vm(_)) {
        assert_eq!(
            report["sources"]["vm_connection"], true,
            "no VM view: {ctx}"
        );
    }
    assert_eq!(report["sources"]["native_probes"], true, "{ctx}");
    (out, report, ctx)
}

/// The `native.modules` entry of `module` (object file name) and `function`.
fn native_module<'a>(report: &'a Value, module: &str, function: &str, ctx: &str) -> &'a Value {
    report["native"]["modules"]
        .as_array()
        .unwrap_or_else(|| panic!("no native.modules: {ctx}"))
        .iter()
        .find(|m| m["module"] == module && m["function"] == function)
        .unwrap_or_else(|| panic!("no native.modules entry for {module}: {function}: {ctx}"))
}

fn int(v: &Value, field: &str, ctx: &str) -> i64 {
    v[field]
        .as_i64()
        .unwrap_or_else(|| panic!("{field} is not an integer in {v:#}\n{ctx}"))
}

/// Requires a native_leak verdict (exit 1) whose primary culprit is native and named
/// "`module`: `function`", holding and growing as a 12 MiB/s leak traced for `traced_s` seconds
/// would, with a matching `native.modules` entry; other native culprits hold little.
fn assert_native_leak(
    out: &Output,
    report: &Value,
    ctx: &str,
    (module, function): (&str, &str),
    traced_s: f64,
) {
    assert_eq!(report["verdict"]["kind"], "native_leak", "{ctx}");
    assert_eq!(out.status.code(), Some(1), "{ctx}");
    let culprits = report["verdict"]["culprits"]
        .as_array()
        .unwrap_or_else(|| panic!("no culprits: {ctx}"));
    let top = culprits
        .first()
        .unwrap_or_else(|| panic!("no culprit: {ctx}"));
    assert_eq!(top["kind"], "native", "{ctx}");
    assert_eq!(top["name"], format!("{module}: {function}"), "{ctx}");

    // At least a third of what 12 MiB/s leaks in the traced time, at most what the node holds.
    let least = (traced_s * 4.0) as i64 * MIB;
    let bytes = int(top, "bytes", ctx);
    let rss = report["samples"]
        .as_array()
        .and_then(|s| s.last())
        .map_or(0, |s| int(s, "rss", ctx));
    assert!(
        bytes > least && bytes <= rss,
        "{bytes} bytes outstanding (want > {least}, <= RSS {rss}): {ctx}"
    );
    let rate = top["growth_bytes_per_s"].as_f64().unwrap_or(0.0);
    assert!(
        (4.0 * MIB as f64..40.0 * MIB as f64).contains(&rate),
        "growth {rate} B/s for a ~12 MiB/s leak: {ctx}"
    );
    let detail = top["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("alloc"),
        "detail lacks allocation counts: {ctx}"
    );
    for other in &culprits[1..] {
        if other["kind"] == "native" {
            assert!(
                int(other, "bytes", ctx) < bytes / 10,
                "another native culprit holds much: {other:#}\n{ctx}"
            );
        }
    }

    let entry = native_module(report, module, function, ctx);
    assert!(
        entry["path"]
            .as_str()
            .is_some_and(|p| p.ends_with(&format!("/{module}"))),
        "{entry:#}\n{ctx}"
    );
    let allocations = int(entry, "allocations", ctx);
    let frees = int(entry, "frees", ctx);
    assert!(
        allocations as f64 > traced_s * 20.0 && frees * 10 <= allocations,
        "{allocations} allocations, {frees} frees for ~50 leaks/s: {ctx}"
    );
    assert!(
        int(entry, "outstanding_bytes", ctx) > least,
        "{entry:#}\n{ctx}"
    );
    assert!(entry["growth_bytes_per_s"].as_f64().is_some(), "{ctx}");
}

/// A leaking native fixture: the node's -eval and where leaktrace must say the leak is.
struct Leak {
    test: &'static str,
    view: View,
    eval: &'static str,
    /// Object file name and function symbol of the allocating code.
    culprit: (&'static str, &'static str),
}

/// Traces `leak` with the native probes on from the start and requires its culprit named.
fn native_leak_case(leak: Leak) {
    if !privileged(leak.test) {
        return;
    }
    let _s = serial();
    let node = native_node(leak.view, leak.eval);
    let (out, report, ctx) = trace_native(&node, leak.view, Some("on"));
    assert_native_leak(&out, &report, &ctx, leak.culprit, 10.0);
    assert_eq!(leftover_programs(), 0, "probes left behind");
}

/// A native fixture allocating and freeing heavily: the node's -eval and the function whose
/// allocations the probes must see balanced.
struct Balanced {
    test: &'static str,
    view: View,
    eval: &'static str,
    function: &'static str,
    /// Fewest allocations a 10 s trace must see.
    least_allocations: i64,
}

/// Traces `churn` with the native probes on: not a native leak, ruled out as balanced, and the
/// allocating function's frees match its allocations.
fn balanced_case(churn: Balanced) {
    if !privileged(churn.test) {
        return;
    }
    let _s = serial();
    let node = native_node(churn.view, churn.eval);
    let (_, report, ctx) = trace_native(&node, churn.view, Some("on"));
    assert_ne!(report["verdict"]["kind"], "native_leak", "{ctx}");
    let ruled_out = report["verdict"]["ruled_out"]
        .as_array()
        .unwrap_or_else(|| panic!("no ruled_out: {ctx}"));
    let native = ruled_out
        .iter()
        .find(|r| r["kind"] == "native_leak")
        .unwrap_or_else(|| panic!("native_leak not ruled out: {ctx}"));
    assert!(
        native["reason"]
            .as_str()
            .is_some_and(|r| r.contains("balanced")),
        "the reason does not say balanced: {ctx}"
    );
    let entry = native_module(&report, "lt_native.so", churn.function, &ctx);
    let allocations = int(entry, "allocations", &ctx);
    let frees = int(entry, "frees", &ctx);
    let outstanding = int(entry, "outstanding_bytes", &ctx);
    // A few buffers may be in flight when the trace ends (at most 16 of 256 KiB).
    assert!(
        allocations >= churn.least_allocations
            && frees + 16 >= allocations
            && outstanding.abs() <= 4 * MIB,
        "{allocations} allocations, {frees} frees, {outstanding} bytes outstanding: {ctx}"
    );
    assert!(
        report["native"]["unknown_frees"].as_i64().is_some(),
        "{ctx}"
    );
}

#[test]
fn nif_malloc_leak_is_native_leak_naming_the_function() {
    native_leak_case(Leak {
        test: "nif_malloc_leak_is_native_leak_naming_the_function",
        view: View::Os,
        eval: "lt_native:leak_forever(leak_malloc, 262144, 20)",
        culprit: ("lt_native.so", "leak_malloc"),
    });
}

#[test]
fn dirty_nif_calloc_leak_is_native_leak_naming_the_function() {
    native_leak_case(Leak {
        test: "dirty_nif_calloc_leak_is_native_leak_naming_the_function",
        view: View::Os,
        eval: "lt_native:leak_forever(leak_calloc, 262144, 20)",
        culprit: ("lt_native.so", "leak_calloc"),
    });
}

#[test]
fn nif_posix_memalign_leak_is_native_leak_naming_the_function() {
    native_leak_case(Leak {
        test: "nif_posix_memalign_leak_is_native_leak_naming_the_function",
        view: View::Os,
        eval: "lt_native:leak_forever(leak_memalign, 262144, 20)",
        culprit: ("lt_native.so", "leak_memalign"),
    });
}

#[test]
fn nif_aligned_alloc_leak_is_native_leak_naming_the_function() {
    native_leak_case(Leak {
        test: "nif_aligned_alloc_leak_is_native_leak_naming_the_function",
        view: View::Os,
        eval: "lt_native:leak_forever(leak_aligned, 262144, 20)",
        culprit: ("lt_native.so", "leak_aligned"),
    });
}

#[test]
fn nif_thread_leak_is_native_leak_naming_the_thread_function() {
    // A new thread every second, each leaking 50 x 256 KiB 10 ms apart, the NIF long returned.
    native_leak_case(Leak {
        test: "nif_thread_leak_is_native_leak_naming_the_thread_function",
        view: View::Os,
        eval: "lt_native:leak_in_thread_forever(262144, 50, 1000)",
        culprit: ("lt_native.so", "leak_in_thread_body"),
    });
}

#[test]
fn nif_enif_alloc_leak_is_native_leak_naming_the_function() {
    native_leak_case(Leak {
        test: "nif_enif_alloc_leak_is_native_leak_naming_the_function",
        view: View::Vm("lt_nenif"),
        eval: "lt_native:leak_forever(leak_enif, 262144, 20)",
        culprit: ("lt_native.so", "leak_enif"),
    });
}

#[test]
fn nif_resource_kept_too_often_is_native_leak_naming_the_function() {
    native_leak_case(Leak {
        test: "nif_resource_kept_too_often_is_native_leak_naming_the_function",
        view: View::Vm("lt_nres"),
        eval: "lt_native:leak_forever(leak_resource, 262144, 20)",
        culprit: ("lt_native.so", "leak_resource"),
    });
}

#[test]
fn leak_inside_a_linked_library_names_the_library_not_the_nif() {
    native_leak_case(Leak {
        test: "leak_inside_a_linked_library_names_the_library_not_the_nif",
        view: View::Os,
        eval: "lt_native:leak_forever(leak_via_lib, 262144, 20)",
        culprit: ("liblt_leaklib.so", "ltl_remember"),
    });
}

#[test]
fn nif_malloc_churn_is_not_a_native_leak() {
    // 16 malloc/free pairs of 256 KiB every 20 ms: ~800 pairs, 200 MiB a second.
    balanced_case(Balanced {
        test: "nif_malloc_churn_is_not_a_native_leak",
        view: View::Os,
        eval: "lt_native:churn_forever(churn, 262144, 16, 20)",
        function: "churn",
        least_allocations: 2000,
    });
}

#[test]
fn nif_enif_churn_is_not_a_native_leak() {
    balanced_case(Balanced {
        test: "nif_enif_churn_is_not_a_native_leak",
        view: View::Vm("lt_nchurn"),
        eval: "lt_native:churn_forever(churn_enif, 262144, 16, 20)",
        function: "churn_enif",
        least_allocations: 2000,
    });
}

#[test]
fn nif_cross_thread_free_is_not_a_native_leak() {
    // Each call: a producer thread mallocs 16 x 256 KiB, a consumer thread frees them.
    balanced_case(Balanced {
        test: "nif_cross_thread_free_is_not_a_native_leak",
        view: View::Os,
        eval: "lt_native:churn_forever(cross_thread_free, 262144, 16, 20)",
        function: "cross_thread_producer",
        least_allocations: 1000,
    });
}

#[test]
fn auto_native_mode_attaches_on_growth_and_names_the_nif() {
    let test = "auto_native_mode_attaches_on_growth_and_names_the_nif";
    if !privileged(test) {
        return;
    }
    let _s = serial();
    let node = native_node(View::Os, "lt_native:leak_forever(leak_malloc, 262144, 20)");
    // The default --native auto: attached once growth outside carriers shows.
    let (out, report, ctx) = trace_native(&node, View::Os, None);
    let attached_at = report["native"]["attached_at_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("native.attached_at_s is not a number: {ctx}"));
    assert!(
        (0.0..7.0).contains(&attached_at),
        "attached at {attached_at} s, too late to judge: {ctx}"
    );
    assert!(
        report["native"]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{ctx}"
    );
    assert_native_leak(
        &out,
        &report,
        &ctx,
        ("lt_native.so", "leak_malloc"),
        10.0 - attached_at,
    );
    assert_eq!(leftover_programs(), 0, "probes left behind");
}
