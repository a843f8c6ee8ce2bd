//! Production faults against real beam.smp nodes: running with capabilities only (each missing
//! one named), the tracer SIGKILLed mid-run (nothing left in the kernel or in the node), the
//! target SIGKILLed mid-run (still a report).
//!
//! "Nothing left in the node" is checked where it would show: a uprobe is an int3 written over
//! the probed instruction in the target's copy of the text, so the executable mappings of
//! beam.smp (and libc, for the native probes) read through /proc/PID/mem must equal the file
//! again once the tracer is gone, while they differ while it traces.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::FileExt,
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::{LEAKTRACE, Node, json, leaktrace, privileged, serial, stderr};

/// setpriv names and bits of the capabilities tracing uses.
const BPF: (&str, u32) = ("bpf", 39);
const PERFMON: (&str, u32) = ("perfmon", 38);
const SYS_PTRACE: (&str, u32) = ("sys_ptrace", 19);
const SYS_ADMIN: (&str, u32) = ("sys_admin", 21);

fn cap_name(cap: (&str, u32)) -> String {
    format!("CAP_{}", cap.0.to_uppercase())
}

/// `setpriv` keeping uid 0 with exactly `caps`: the bounding set limits what the exec'd
/// program gets, and an empty inheritable set adds nothing back.
fn setpriv_caps(caps: &[(&str, u32)]) -> Command {
    let set: String = caps.iter().map(|c| format!(",+{}", c.0)).collect();
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--bounding-set=-all{set}"))
        .arg("--inh-caps=-all")
        .arg("--");
    cmd
}

fn mask(caps: &[(&str, u32)]) -> u64 {
    caps.iter().fold(0, |m, c| m | (1 << c.1))
}

/// CapEff of a process started under `setpriv_caps(caps)`.
fn effective_under(caps: &[(&str, u32)]) -> u64 {
    let out = setpriv_caps(caps)
        .args(["cat", "/proc/self/status"])
        .output()
        .expect("setpriv (util-linux)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no CapEff: {}", stderr(&out)))
}

/// `leaktrace attach` on `pid` for 3 s with `caps` only, uid 0.
fn attach_with_caps(pid: u32, caps: &[(&str, u32)]) -> Output {
    setpriv_caps(caps)
        .arg(LEAKTRACE)
        .args(attach_args(pid, "3s"))
        .stdin(Stdio::null())
        .output()
        .expect("setpriv (util-linux)")
}

fn attach_args(pid: u32, duration: &str) -> Vec<String> {
    [
        "attach",
        "--pid",
        &pid.to_string(),
        "--duration",
        duration,
        "--interval",
        "500ms",
        "--json",
        "--no-vm",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A finished trace: exit 0, 1 or 3 and a report of the target.
fn assert_traced(out: &Output, pid: u32, what: &str) {
    assert!(
        matches!(out.status.code(), Some(0 | 1 | 3)),
        "{what}: exit {:?}: {}",
        out.status.code(),
        stderr(out)
    );
    let report = json(out);
    assert_eq!(report["target"]["pid"], pid, "{what}");
    assert_eq!(report["sources"]["carrier_probes"], true, "{what}");
    assert!(
        !report["samples"].as_array().unwrap().is_empty(),
        "{what}: no samples"
    );
}

/// Whether this kernel refuses uprobes without CAP_SYS_ADMIN (Linux 6.16+, and stable kernels
/// with the July 2025 backport): then the three capabilities alone are named short of it.
fn refused_for_sys_admin(out: &Output) -> bool {
    out.status.code() == Some(2)
        && stderr(out).contains("missing: CAP_SYS_ADMIN (to attach uprobes")
}

#[test]
fn capabilities_alone_trace_as_uid_0() {
    if !privileged("capabilities_alone_trace_as_uid_0") {
        return;
    }
    let _s = serial();
    let three = [BPF, PERFMON, SYS_PTRACE];
    let four = [BPF, PERFMON, SYS_PTRACE, SYS_ADMIN];
    assert_eq!(effective_under(&three), mask(&three), "setpriv kept more");
    assert_eq!(effective_under(&four), mask(&four), "setpriv kept more");

    let node = Node::start("lt_load:healthy_forever(10)");
    thread::sleep(Duration::from_secs(1));

    // CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE: enough before Linux 6.16; since then uprobes
    // need CAP_SYS_ADMIN, and the refusal says exactly that.
    let out = attach_with_caps(node.pid(), &three);
    if refused_for_sys_admin(&out) {
        eprintln!(
            "this kernel requires CAP_SYS_ADMIN for uprobes: {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("needs root"), "{}", stderr(&out));
        assert!(
            !stderr(&out).contains("CAP_BPF (") && !stderr(&out).contains("CAP_PERFMON ("),
            "names capabilities it has: {}",
            stderr(&out)
        );
    } else {
        assert_traced(&out, node.pid(), "CAP_BPF+CAP_PERFMON+CAP_SYS_PTRACE");
    }

    // With CAP_SYS_ADMIN too, and with CAP_SYS_ADMIN (which implies the other two) and
    // CAP_SYS_PTRACE only.
    let out = attach_with_caps(node.pid(), &four);
    assert_traced(&out, node.pid(), "the three and CAP_SYS_ADMIN");
    let out = attach_with_caps(node.pid(), &[SYS_ADMIN, SYS_PTRACE]);
    assert_traced(&out, node.pid(), "CAP_SYS_ADMIN+CAP_SYS_PTRACE");
    assert_eq!(
        patched_bytes(node.pid(), "beam.smp"),
        Some(0),
        "uprobes left"
    );
}

#[test]
fn each_missing_capability_is_named() {
    if !privileged("each_missing_capability_is_named") {
        return;
    }
    let _s = serial();
    let node = Node::start("timer:sleep(60000)");
    let three = [BPF, PERFMON, SYS_PTRACE];
    for dropped in three {
        let caps: Vec<_> = three.iter().copied().filter(|c| *c != dropped).collect();
        let out = attach_with_caps(node.pid(), &caps);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "without {}: {err}", dropped.0);
        assert!(err.contains("needs root"), "{err}");
        let named = format!("{} (", cap_name(dropped));
        assert!(err.contains(&named), "without {}: {err}", dropped.0);
        for kept in &caps {
            assert!(
                !err.contains(&format!("{} (", cap_name(*kept))),
                "names {} it has: {err}",
                kept.0
            );
        }
        assert!(err.contains("setpriv") && err.contains("setcap"), "{err}");
    }
    // CAP_SYS_ADMIN covers CAP_BPF and CAP_PERFMON, never CAP_SYS_PTRACE.
    let out = attach_with_caps(node.pid(), &[BPF, PERFMON, SYS_ADMIN]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("missing: CAP_SYS_PTRACE ("), "{err}");
    assert!(!err.contains("CAP_SYS_ADMIN ("), "{err}");
    assert!(
        fs::read_link(format!("/proc/{}/exe", node.pid())).is_ok(),
        "target harmed"
    );
}

/// `unshare --mount` with a tmpfs mounted on /run/leaktrace with `lock_dir_opts` (mode, owner),
/// so that the lock directory of another user's run is its own and the host's stays untouched;
/// then setpriv to `nobody` keeping `caps` as ambient capabilities, then leaktrace.
fn as_nobody_with_caps(pid: u32, lock_dir_opts: &str, caps: &[(&str, u32)]) -> Output {
    let set: String = caps.iter().map(|c| format!(",+{}", c.0)).collect();
    let script = r#"mount -t tmpfs -o "$1" leaktrace-faults /run/leaktrace && shift && exec "$@""#;
    Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(lock_dir_opts)
        .args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            &format!("--inh-caps=-all{set}"),
            &format!("--ambient-caps=-all{set}"),
            "--",
            LEAKTRACE,
        ])
        .args(attach_args(pid, "3s"))
        .stdin(Stdio::null())
        .output()
        .expect("unshare and setpriv (util-linux)")
}

#[test]
fn another_user_with_ambient_capabilities_traces() {
    if !privileged("another_user_with_ambient_capabilities_traces") {
        return;
    }
    let _s = serial();
    // The mount point; made as leaktrace makes it.
    let _ = std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o700)
        .create("/run/leaktrace");
    let own = "mode=0700,uid=65534,gid=65534";
    let node = Node::start("lt_load:healthy_forever(10)");
    thread::sleep(Duration::from_secs(1));
    let mut caps = vec![BPF, PERFMON, SYS_PTRACE];
    let probe = as_nobody_with_caps(node.pid(), own, &caps);
    if refused_for_sys_admin(&probe) {
        caps.push(SYS_ADMIN);
    }
    // A lock directory of its own: the trace works (the node is root's: CAP_SYS_PTRACE opens
    // its memory to uid 65534).
    let out = as_nobody_with_caps(node.pid(), own, &caps);
    assert_traced(&out, node.pid(), "uid 65534 with ambient capabilities");
    // Root's lock directory: refused before loading anything, naming the directory.
    let out = as_nobody_with_caps(node.pid(), "mode=0755", &caps);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("needs root") && err.contains("write access to /run/leaktrace for uid 65534"),
        "{err}"
    );
}

/// Executable mappings of `path_suffix` in `pid`: bytes differing from the file (the int3 of
/// each uprobe in place), or None when no such mapping is there.
fn patched_bytes(pid: u32, path_suffix: &str) -> Option<usize> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let mem = fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut found = false;
    let mut differ = 0;
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || !f[1].contains('x') || !f[5].ends_with(path_suffix) {
            continue;
        }
        let (start, end) = f[0].split_once('-')?;
        let start = u64::from_str_radix(start, 16).ok()?;
        let end = u64::from_str_radix(end, 16).ok()?;
        let offset = usize::from_str_radix(f[2], 16).ok()?;
        let file = fs::read(f[5]).ok()?;
        let len = ((end - start) as usize).min(file.len().saturating_sub(offset));
        let mut live = vec![0u8; len];
        mem.read_exact_at(&mut live, start).ok()?;
        differ += live
            .iter()
            .zip(&file[offset..offset + len])
            .filter(|(a, b)| a != b)
            .count();
        found = true;
    }
    found.then_some(differ)
}

/// Polls until `pid`'s mappings of `path_suffix` carry uprobes (`want` true) or none (false).
fn wait_patched(pid: u32, path_suffix: &str, want: bool, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let n = patched_bytes(pid, path_suffix)
            .unwrap_or_else(|| panic!("no executable mapping of {path_suffix} in {pid}"));
        if (n > 0) == want || Instant::now() > deadline {
            return n;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// IDs of the eBPF programs (and links) `pid` holds open, from its fdinfo.
fn held_bpf_ids(pid: u32) -> BTreeSet<(&'static str, u32)> {
    let mut ids = BTreeSet::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for entry in dir.flatten() {
        let Ok(info) = fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in info.lines() {
            for key in ["prog_id", "link_id"] {
                if let Some(v) = line.strip_prefix(key).and_then(|r| r.strip_prefix(':'))
                    && let Ok(id) = v.trim().parse()
                {
                    ids.insert((key, id));
                }
            }
        }
    }
    ids
}

/// Program IDs the kernel still has, by aya and by bpftool (when installed).
fn loaded_program_ids() -> (BTreeSet<u32>, Option<BTreeSet<u32>>) {
    let aya: BTreeSet<u32> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .collect();
    let bpftool = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .map(|v| {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p["id"].as_u64().map(|i| i as u32))
                        .collect()
                })
                .unwrap_or_default()
        });
    (aya, bpftool)
}

/// None of the programs in `held` is loaded any more (the kernel frees them a moment after the
/// last descriptor closes), and no uprobe event names beam.smp in tracefs (where mounted; the
/// perf-event uprobes aya makes do not show there, the int3 check covers them).
fn assert_no_programs_of(held: &BTreeSet<(&'static str, u32)>) {
    let progs: BTreeSet<u32> = held
        .iter()
        .filter(|(k, _)| *k == "prog_id")
        .map(|(_, id)| *id)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (aya, bpftool) = loaded_program_ids();
        let left: Vec<u32> = progs.intersection(&aya).copied().collect();
        let left_bpftool: Vec<u32> = bpftool
            .map(|b| progs.intersection(&b).copied().collect())
            .unwrap_or_default();
        if left.is_empty() && left_bpftool.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "programs left loaded: {left:?} (bpftool: {left_bpftool:?})"
        );
        thread::sleep(Duration::from_millis(100));
    }
    for events in [
        "/sys/kernel/tracing/uprobe_events",
        "/sys/kernel/debug/tracing/uprobe_events",
    ] {
        if let Ok(text) = fs::read_to_string(events) {
            assert!(
                !text.contains("beam.smp") && !text.contains("leaktrace"),
                "{events}: {text}"
            );
        }
    }
}

/// A `leaktrace attach` in the background, stdout and stderr captured.
fn spawn_tracer(pid: u32, extra: &[&str]) -> Child {
    Command::new(LEAKTRACE)
        .args(attach_args(pid, "60s"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start leaktrace")
}

/// Waits for `child` up to `within`; kills it and fails past that.
fn wait_output(mut child: Child, within: Duration) -> Output {
    let deadline = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("leaktrace did not end within {within:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Ticks of CPU `pid` used so far (utime + stime): a live, churning node keeps adding.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("target gone");
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    assert_ne!(f[0], "Z", "target is a zombie");
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// SIGKILLs a tracer attached to a distributed, churning node (with `extra` options), then
/// checks nothing is left of it: programs, links, int3s in the probed `images`; and that the
/// node still runs, answers over distribution, and can be traced again at once.
fn tracer_sigkill_leaves_nothing(test: &str, extra: &[&str], images: &[&str]) {
    let name = format!("lt_fault_{test}_{}", std::process::id());
    let node = Node::distributed(&name, "lt_load:healthy_forever(10)");
    let pid = node.pid();
    thread::sleep(Duration::from_secs(1));
    for image in images {
        assert_eq!(
            patched_bytes(pid, image),
            Some(0),
            "{image} patched before tracing"
        );
    }
    let mut tracer = spawn_tracer(pid, extra);
    for image in images {
        let n = wait_patched(pid, image, true, Duration::from_secs(30));
        assert!(n > 0, "no uprobe ever placed in {image}");
    }
    let held = held_bpf_ids(tracer.id());
    assert!(
        held.iter().any(|(k, _)| *k == "prog_id"),
        "tracer holds no program: {held:?}"
    );
    let patched: Vec<_> = images.iter().map(|i| (i, patched_bytes(pid, i))).collect();
    let count = |key| held.iter().filter(|(k, _)| *k == key).count();
    eprintln!(
        "{test}: tracer holds {} programs and {} links; bytes patched: {patched:?}",
        count("prog_id"),
        count("link_id")
    );
    // Let it run a little: ring buffer traffic, samples.
    thread::sleep(Duration::from_millis(1500));
    tracer.kill().unwrap(); // SIGKILL
    let status = tracer.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );

    for image in images {
        let n = wait_patched(pid, image, false, Duration::from_secs(3));
        assert_eq!(n, 0, "{n} bytes of {image} still patched after SIGKILL");
    }
    assert_no_programs_of(&held);

    // The node: alive, working, answering.
    let before = cpu_ticks(pid);
    thread::sleep(Duration::from_secs(1));
    assert!(cpu_ticks(pid) > before, "node stopped working");
    let call = Command::new("erl_call")
        .args(["-sname", &name, "-a", "erlang node"])
        .output()
        .expect("erl_call");
    assert!(
        String::from_utf8_lossy(&call.stdout).contains(&name),
        "node does not answer: {} {}",
        String::from_utf8_lossy(&call.stdout),
        stderr(&call)
    );
    // Its lock died with the tracer: a new one traces at once.
    let args = attach_args(pid, "2s");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let again = leaktrace(&args);
    assert_traced(&again, pid, "after the SIGKILL");
    for image in images {
        assert_eq!(
            patched_bytes(pid, image),
            Some(0),
            "{image} after the rerun"
        );
    }
}

#[test]
fn tracer_sigkilled_mid_run_leaves_nothing() {
    if !privileged("tracer_sigkilled_mid_run_leaves_nothing") {
        return;
    }
    let _s = serial();
    tracer_sigkill_leaves_nothing("kill", &["--native", "off"], &["beam.smp"]);
}

#[test]
fn tracer_sigkilled_with_native_probes_leaves_nothing() {
    if !privileged("tracer_sigkilled_with_native_probes_leaves_nothing") {
        return;
    }
    let _s = serial();
    // --native on: probes on libc's malloc family too, placed from the start.
    tracer_sigkill_leaves_nothing("native", &["--native", "on"], &["beam.smp", "libc.so.6"]);
}

#[test]
fn target_sigkilled_mid_run_still_reports() {
    if !privileged("target_sigkilled_mid_run_still_reports") {
        return;
    }
    let _s = serial();
    let mut node = Node::start("lt_load:healthy_forever(10)");
    let pid = node.pid();
    let tracer = spawn_tracer(pid, &[]);
    let tracer_pid = tracer.id();
    wait_patched(pid, "beam.smp", true, Duration::from_secs(30));
    let held = held_bpf_ids(tracer_pid);
    thread::sleep(Duration::from_millis(1500));
    let killed = Instant::now();
    node.child.kill().unwrap(); // SIGKILL to beam.smp itself
    node.child.wait().unwrap();
    let out = wait_output(tracer, Duration::from_secs(30));
    let noticed = killed.elapsed();
    let report = json(&out);
    assert_eq!(report["end"], "target_exited", "stderr: {}", stderr(&out));
    assert_ne!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    assert!(
        !report["samples"].as_array().unwrap().is_empty(),
        "no samples before the kill"
    );
    assert!(
        noticed < Duration::from_secs(15),
        "noticed the exit only after {noticed:?}"
    );
    eprintln!(
        "target SIGKILLed: exit {:?}, end {}, verdict {}, {} samples, reported {noticed:?} after",
        out.status.code(),
        report["end"],
        report["verdict"]["kind"],
        report["samples"].as_array().unwrap().len()
    );
    assert_no_programs_of(&held);
}

#[test]
fn run_of_another_beam_file_is_refused_and_stopped() {
    if !privileged("run_of_another_beam_file_is_refused_and_stopped") {
        return;
    }
    let _s = serial();
    // A byte-identical copy is another inode: probes on it would never fire in the node that
    // `erl` really starts.
    let root = otp_root();
    let beam = format!("{root}/erts-{}/bin/beam.smp", erts_version(&root));
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("beam.smp");
    fs::copy(&beam, &copy).unwrap();
    let marker = format!("lt_blind_{}", std::process::id());
    let out = leaktrace(&[
        "run",
        "--beam",
        copy.to_str().unwrap(),
        "--duration",
        "20s",
        "--",
        "erl",
        "-noshell",
        "-eval",
        &format!("'{marker}', timer:sleep(60000)"),
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(
        err.contains("not the file the probes are on") && err.contains(&format!("--beam {beam}")),
        "the error should name both files and the fix: {err}"
    );
    // The command it started for this run is gone.
    thread::sleep(Duration::from_millis(300));
    let left: Vec<String> = fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&marker))
        .collect();
    assert!(left.is_empty(), "the command was left running: {left:?}");
    eprintln!("refused: {}", err.trim());
}

/// The OTP installation `erl` runs.
fn otp_root() -> String {
    String::from_utf8(
        Command::new("erl")
            .args([
                "-noshell",
                "-eval",
                "io:format(\"~s\", [code:root_dir()]), halt().",
            ])
            .output()
            .expect("erl")
            .stdout,
    )
    .expect("a UTF-8 path")
}

fn erts_version(root: &str) -> String {
    fs::read_dir(root)
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("erts-")
                .map(str::to_owned)
        })
        .max()
        .expect("an erts-* directory")
}

#[test]
fn full_native_map_is_counted_and_the_run_marked_degraded() {
    if !privileged("full_native_map_is_counted_and_the_run_marked_degraded") {
        return;
    }
    let _s = serial();
    // 64-byte blocks kept forever, as fast as the node calls the NIF: past the 2^19 entries of
    // the outstanding map within seconds.
    let node = Node::start("lt_native:leak_forever(leak_malloc, 64, 0)");
    let pid = node.pid().to_string();
    let out = leaktrace(&[
        "attach",
        "--pid",
        &pid,
        "--duration",
        "12s",
        "--interval",
        "500ms",
        "--native",
        "on",
        // Filling the map takes millions of calls: the budget that would detach the probes on
        // such a node first is lifted.
        "--max-overhead",
        "200",
        "--json",
    ]);
    let report = json(&out);
    let native = &report["native"];
    let full = native["outstanding_full"].as_u64().unwrap_or(0);
    let degraded: Vec<String> = report["verdict"]["degraded"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    eprintln!(
        "outstanding_full {full}, verdict {} ({}), degraded {degraded:?}, modules {}",
        report["verdict"]["kind"], report["verdict"]["summary"], native["modules"]
    );
    assert!(full > 0, "the map never filled: {native:#}");
    assert!(
        degraded
            .iter()
            .any(|d| d.contains("untracked") && d.contains("lower bounds")),
        "a full map must mark the run degraded: {degraded:?}"
    );
    // The allocations past the full map are still counted at their site: the leak is named.
    let culprit = report["verdict"]["culprits"][0]["name"]
        .as_str()
        .unwrap_or("");
    assert!(
        culprit.contains("lt_native.so"),
        "culprit: {culprit}; {:#}",
        report["verdict"]
    );
    // What was tracked still names the leak, with figures stated as lower bounds.
    assert_eq!(
        report["verdict"]["kind"], "native_leak",
        "{:#}",
        report["verdict"]
    );
    assert!(
        report["verdict"]["summary"]
            .as_str()
            .unwrap()
            .contains("lower bounds"),
        "{}",
        report["verdict"]["summary"]
    );
}

#[test]
fn node_whose_beam_smp_was_replaced_on_disk_is_traced_from_its_running_image() {
    if !privileged("node_whose_beam_smp_was_replaced_on_disk_is_traced_from_its_running_image") {
        return;
    }
    let _s = serial();
    // An OTP install of its own (a copy), so its beam.smp can be replaced under the running
    // node as a package upgrade does: /proc/PID/exe then ends in " (deleted)".
    let root = otp_root();
    let erts = format!("erts-{}", erts_version(&root));
    let dir = tempfile::tempdir().unwrap();
    let otp = dir.path().join("otp");
    assert!(
        Command::new("cp")
            .args(["-a", &root])
            .arg(&otp)
            .status()
            .unwrap()
            .success()
    );
    let bin = otp.join(&erts).join("bin");
    let child = Command::new(bin.join("erlexec"))
        .env("BINDIR", &bin)
        .env("ROOTDIR", &otp)
        .env("EMU", "beam")
        .env("PROGNAME", "erl")
        .args(["-noshell", "-pa"])
        .arg(super::fixtures())
        .args(["-eval", "lt_native:leak_forever(leak_malloc, 262144, 20)"])
        .stdin(Stdio::null())
        .spawn()
        .expect("start erlexec");
    let node = Node { child };
    let beam = bin.join("beam.smp");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fs::read_link(format!("/proc/{}/exe", node.pid())).is_ok_and(|e| e == beam) {
        assert!(Instant::now() < deadline, "the copy's beam.smp never ran");
        thread::sleep(Duration::from_millis(20));
    }
    // The upgrade: a new file at the same path.
    fs::remove_file(&beam).unwrap();
    fs::copy(format!("{root}/{erts}/bin/beam.smp"), &beam).unwrap();
    let exe = fs::read_link(format!("/proc/{}/exe", node.pid())).unwrap();
    assert!(exe.to_string_lossy().ends_with(" (deleted)"), "{exe:?}");
    let pid = node.pid().to_string();
    let out = leaktrace(&[
        "attach",
        "--pid",
        &pid,
        "--duration",
        "6s",
        "--interval",
        "500ms",
        "--no-vm",
        "--native",
        "on",
        "--blocks",
        "--max-overhead",
        "200",
        "--json",
    ]);
    let report = json(&out);
    let notes = report["source_notes"].to_string();
    eprintln!(
        "verdict {} ({}); notes {notes}",
        report["verdict"]["kind"], report["verdict"]["summary"]
    );
    assert!(notes.contains("replaced on disk"), "{notes}");
    // The image's own tables were read: allocator names, block probes.
    assert!(
        !notes.contains("allocator names could not be read"),
        "{notes}"
    );
    assert!(
        report["blocks"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("probes on erts_alcu")),
        "{}",
        report["blocks"]["reason"]
    );
    assert_eq!(
        report["verdict"]["kind"], "native_leak",
        "{:#}",
        report["verdict"]
    );
    let modules = report["native"]["modules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        modules.iter().all(|m| m["module"] != "beam.smp (deleted)"),
        "the emulator keeps its name: {modules:?}"
    );
    assert!(
        report["verdict"]["culprits"][0]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("lt_native.so")),
        "{:#}",
        report["verdict"]
    );
}
