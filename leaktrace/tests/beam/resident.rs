//! Where the RSS is when the tracer arrives: the resident breakdown at attach and what glibc
//! holds, against real nodes whose NIF (lt_native.c `hold/3`) malloc'd memory before anyone
//! attached and says exactly how much it keeps and how much it freed.

use std::{
    fs,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{Node, attach_vm, json, leaktrace, privileged, serial, stderr};

/// A scratch directory for `name`, emptied.
fn scratch(name: &str) -> PathBuf {
    super::scratch_in("resident", name)
}

/// A distributed node waiting to run `lt_native:hold(Bytes, Count, KeepEvery)`.
struct Holder {
    node: Node,
    go: PathBuf,
    out: PathBuf,
}

impl Holder {
    fn start(name: &str, bytes: u64, count: u64, keep_every: u64) -> Holder {
        let dir = scratch(name);
        let (go, out) = (dir.join("go"), dir.join("held"));
        let node = Node::distributed(
            name,
            &format!(
                "lt_native:hold_on_go(\"{}\", \"{}\", {bytes}, {count}, {keep_every})",
                go.display(),
                out.display()
            ),
        );
        Holder { node, go, out }
    }

    /// Lets the NIF run; returns (kept, freed) chunk bytes as it counted them.
    fn hold(&self) -> (u64, u64) {
        fs::write(&self.go, b"").unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = fs::read_to_string(&self.out) {
                let mut f = text.split_whitespace().map(|v| v.parse::<u64>().unwrap());
                return (f.next().unwrap(), f.next().unwrap());
            }
            assert!(Instant::now() < deadline, "the NIF never reported");
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> String {
        self.node.pid().to_string()
    }
}

/// `leaktrace vm --json`'s resident breakdown of the node.
fn vm_resident(pid: &str) -> Value {
    let out = leaktrace(&["vm", "--pid", pid, "--json"]);
    assert!(out.status.success(), "leaktrace vm: {}", stderr(&out));
    let v = json(&out);
    assert!(v["resident"]["rss"].is_u64(), "{:#}", v["resident"]);
    v["resident"].clone()
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number: {v:#}"))
}

fn within(got: f64, want: f64, share: f64) -> bool {
    (got - want).abs() <= share * want
}

#[test]
fn freed_memory_glibc_keeps_is_fragmentation_of_the_malloc_arenas() {
    if !privileged("freed_memory_glibc_keeps_is_fragmentation_of_the_malloc_arenas") {
        return;
    }
    let _s = serial();
    // 200 000 blocks of 1 KiB, 98% freed: the 2% kept are spread over the whole heap.
    let h = Holder::start("lt_mfrag", 1024, 200_000, 50);
    let before = vm_resident(&h.pid());
    let (kept, freed) = h.hold();
    let (out, report) = attach_vm(h.node.pid(), "6s", &[]);
    let at = &report["resident"]["at_attach"];
    let evidence = format!(
        "NIF kept {kept} freed {freed}; before {before:#}\nat attach {at:#}\nverdict {:#}",
        report["verdict"]
    );
    assert_eq!(report["verdict"]["kind"], "fragmentation", "{evidence}");
    assert_eq!(out.status.code(), Some(0), "{evidence}");
    let c = &report["verdict"]["culprits"][0];
    assert_eq!(c["name"], "malloc arenas", "{evidence}");
    assert_eq!(c["kind"], "malloc_arenas", "{evidence}");
    let detail = c["detail"].as_str().unwrap();
    assert!(
        detail.contains("malloc_trim(0)") && detail.contains("MALLOC_ARENA_MAX"),
        "{evidence}"
    );
    // What the walk counts beyond what the node held before the NIF ran is what the NIF knows.
    let in_use = u(at, "malloc_in_use") as f64 - u(&before, "malloc_in_use") as f64;
    let free = u(at, "malloc_free") as f64 - u(&before, "malloc_free") as f64;
    assert!(
        within(in_use, kept as f64, 0.10),
        "in use +{in_use} vs kept {kept}: {evidence}"
    );
    assert!(
        within(free, freed as f64, 0.10),
        "free +{free} vs freed {freed}: {evidence}"
    );
    assert_eq!(at["malloc_walk"]["glibc"], "2.36", "{evidence}");
    assert_eq!(at["malloc_walk"]["complete"], true, "{evidence}");
}

#[test]
fn a_native_leak_that_stopped_before_attach_is_not_healthy() {
    if !privileged("a_native_leak_that_stopped_before_attach_is_not_healthy") {
        return;
    }
    let _s = serial();
    // 150 000 blocks of 1 KiB, all kept: a leak that happened before anyone attached.
    let h = Holder::start("lt_mheld", 1024, 150_000, 1);
    let (kept, _) = h.hold();
    let dir = scratch("lt_mheld_out");
    let out_dir = dir.join("bundle");
    let (out, report) = attach_vm(h.node.pid(), "6s", &["--out", out_dir.to_str().unwrap()]);
    let at = &report["resident"]["at_attach"];
    let v = &report["verdict"];
    let evidence = format!("NIF kept {kept}; at attach {at:#}\nverdict {v:#}");
    assert_eq!(v["kind"], "inconclusive", "{evidence}");
    assert_eq!(out.status.code(), Some(3), "{evidence}");
    let summary = v["summary"].as_str().unwrap();
    assert!(
        summary.contains("resident outside the VM at attach"),
        "{evidence}"
    );
    assert!(summary.contains("lt_native.so"), "{evidence}");
    assert!(summary.contains("--native on"), "{evidence}");
    // The breakdown puts it in malloc's arenas, in use.
    assert!(
        u(at, "malloc_arenas") as f64 >= 0.9 * kept as f64,
        "{evidence}"
    );
    assert!(
        u(at, "malloc_in_use") as f64 >= 0.9 * kept as f64,
        "{evidence}"
    );
    assert!(
        u(at, "malloc_in_use") <= u(at, "malloc_arenas") + (16 << 20),
        "{evidence}"
    );
    for key in [
        "rss",
        "file",
        "erts_carriers",
        "mseg_cache",
        "malloc_arenas",
        "malloc_in_use",
        "malloc_free",
        "thread_stacks",
        "other_anon",
        "unaccounted",
    ] {
        assert!(at.get(key).is_some(), "{key} missing: {evidence}");
    }
    // The terminal summary and report.md show it too.
    let md = fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(md.contains("## Resident memory"), "{md}");
    assert!(md.contains("malloc arenas"), "{md}");
}

#[test]
fn leaktrace_vm_prints_the_resident_breakdown() {
    if !privileged("leaktrace_vm_prints_the_resident_breakdown") {
        return;
    }
    let _s = serial();
    let h = Holder::start("lt_mvm", 1024, 100_000, 1);
    let (kept, _) = h.hold();
    let out = leaktrace(&["vm", "--pid", &h.pid()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", stderr(&out));
    let block: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("resident now:"))
        .collect();
    assert!(!block.is_empty(), "no resident block: {text}");
    for line in [
        "file-backed",
        "ERTS carriers",
        "malloc arenas",
        "thread stacks",
        "other anonymous",
    ] {
        assert!(
            block.iter().any(|l| l.trim_start().starts_with(line)),
            "{line}: {text}"
        );
    }
    let arenas = block
        .iter()
        .find(|l| l.trim_start().starts_with("malloc arenas"))
        .unwrap();
    assert!(arenas.contains("glibc 2.36"), "{arenas}");
    let r = vm_resident(&h.pid());
    assert!(
        u(&r, "malloc_in_use") as f64 >= 0.9 * kept as f64,
        "kept {kept}: {r:#}"
    );
}
